//! `twinfer info`: the CPU and its SIMD levels, the GPU adapter (or why there is none), and which
//! engine `auto` picks for each phase, and why.

use serde_json::{Value, json};
use twinfer::cpu::SimdLevel;
use twinfer::gpu::GpuEngine;
use twinfer::{Attention, Backend};

pub fn run(as_json: bool) -> Result<(), String> {
    let levels: Vec<&str> = SimdLevel::available().iter().map(|l| l.name()).collect();
    let auto = Attention::new(Backend::Auto).map_err(|e| e.to_string())?;
    let info = auto.info();
    let gpu = GpuEngine::new();
    let gpu_json: Value = match &gpu {
        Ok(g) => {
            let a = &g.context().summary;
            json!({"available": true, "name": a.name, "backend": a.backend, "device_type": a.device_type,
                "driver": a.driver, "shader_f16": a.shader_f16, "subgroups": a.subgroups,
                "subgroup_sizes": [a.subgroup_sizes.0, a.subgroup_sizes.1], "timestamps": a.timestamps,
                "cooperative_matrix": a.cooperative_matrix,
                "tensor_cores": a.tensor_cores,
                "max_storage_binding_bytes": a.max_storage_binding, "max_workgroup_storage_bytes": a.max_workgroup_storage,
                "max_invocations": a.max_invocations, "variant": g.variant_name()})
        }
        Err(e) => json!({"available": false, "reason": e.to_string()}),
    };
    // The startup choice is one engine for both phases; `twinfer plan` measures each phase apart.
    let phase = json!({"backend": info.backend, "variant": info.variant, "device": info.device, "reason": info.reason});
    if as_json {
        let doc = json!({"cpu": twinfer::cpu_model_name(), "simd_available": levels, "simd_chosen": SimdLevel::detect().name(),
            "threads": info.threads, "gpu": gpu_json, "auto": {"prefill": phase, "decode": phase}});
        println!("{doc}");
        return Ok(());
    }
    println!("cpu:            {}", twinfer::cpu_model_name());
    println!("simd available: {} (chosen: {})", levels.join(", "), SimdLevel::detect().name());
    println!(
        "bf16 products:  {}",
        if SimdLevel::detect().bf16_dot() {
            "dot-product instructions (bf16 weights, `--quantize bf16`, and prompts over `--kv-dtype bf16`)"
        } else {
            "f32 arithmetic (this CPU has no bf16 dot products)"
        }
    );
    match &gpu {
        Ok(g) => println!("gpu:            {} | variant {}", g.context().summary, g.variant_name()),
        Err(e) => println!("gpu:            none: {e}"),
    }
    println!("backend:        {} ({}, {} threads)", info.backend, info.variant, info.threads);
    println!("reason:         {}", info.reason);
    println!(
        "auto, prefill:  {} {} | auto, decode: {} {} (`twinfer plan` times each phase on every engine)",
        info.backend, info.variant, info.backend, info.variant
    );
    Ok(())
}

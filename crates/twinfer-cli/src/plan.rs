//! `twinfer plan`: time every engine on this device for each phase and write the winning config.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use twinfer::DType;
use twinfer::bench::plan::{PlanOptions, candidates, plan};
use twinfer::model::{Model, ModelSource, Network, preset, random_decoder};

#[derive(Args)]
pub struct PlanArgs {
    /// A decoder model to plan for: a folder, a GGUF file or a Hub name (org/name[@revision]).
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Or a model shape with random weights: smollm-135m, smollm-360m, qwen2.5-0.5b, tiny.
    #[arg(long)]
    pub preset: Option<String>,
    /// Prompt-chunk length timed for prefill.
    #[arg(long, default_value_t = 256)]
    pub prefill_tokens: usize,
    /// Sequences in the timed decode step.
    #[arg(long, default_value_t = 8)]
    pub decode_batch: usize,
    /// Context of each sequence in the decode step.
    #[arg(long, default_value_t = 512)]
    pub decode_context: usize,
    /// Page sizes to try for decode (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub page_sizes: Vec<usize>,
    /// Where to write the config that `run` and `bench serve` take with `--config`.
    #[arg(long, default_value = "twinfer-plan.json")]
    pub out: PathBuf,
    /// Print the plan as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Time only the engines whose name contains one of these (comma-separated), e.g.
    /// `gpu,cpu avx512`; all of them by default.
    #[arg(long, value_delimiter = ',')]
    pub engines: Vec<String>,
    /// Quantize the model's projections at load, or round them to bf16.
    #[arg(long, value_enum)]
    pub quantize: Option<crate::options::QuantizeArg>,
    /// How quantized projections quantize their activations on the CPU (written into the config).
    #[arg(long, value_enum)]
    pub activations: Option<crate::options::ActivationsArg>,
    /// A time-per-output-token objective written into the config, so that `run`, `serve` and
    /// `bench serve --config` cut prompt chunks to keep decoding requests within it.
    #[arg(long, value_name = "MS")]
    pub tpot_target_ms: Option<f64>,
    /// KV cache storage of the timed steps.
    #[arg(long, value_enum, default_value = "f16")]
    pub kv_dtype: crate::options::KvDtypeArg,
}

pub fn run(args: PlanArgs) -> Result<(), String> {
    if let Some(ms) = args.tpot_target_ms
        && !(ms > 0.0 && ms.is_finite())
    {
        return Err(format!("--tpot-target-ms {ms}: give a positive number of milliseconds"));
    }
    if args.page_sizes.is_empty() || args.prefill_tokens == 0 || args.decode_batch == 0 || args.decode_context == 0 {
        return Err("prefill tokens, decode batch, decode context and page sizes must be positive".into());
    }
    let mut model = match (&args.model, &args.preset) {
        (Some(dir), _) => {
            match Model::load(ModelSource::dir(crate::hub::resolve(dir)?)).map_err(|e| e.to_string())?.network {
                Network::Decoder(m) => m,
                Network::Encoder(_) => return Err(format!("{}: plan needs a decoder model", dir.display())),
            }
        }
        (None, Some(name)) => {
            random_decoder(preset(name).map_err(|e| e.to_string())?, DType::F16, 1).map_err(|e| e.to_string())?
        }
        (None, None) => return Err("give --model DIR or --preset NAME".into()),
    };
    if let Some(format) = args.quantize {
        model.quantize(twinfer::model::WeightFormat::from(format)).map_err(|e| e.to_string())?;
    }
    if let Some(codes) = args.activations {
        model.set_activations(codes.into());
    }
    let opts = PlanOptions {
        prefill_tokens: args.prefill_tokens,
        decode_batch: args.decode_batch,
        decode_context: args.decode_context,
        page_sizes: args.page_sizes,
        kv_dtype: args.kv_dtype.into(),
        ..Default::default()
    };
    let mut found = candidates();
    if !args.engines.is_empty() {
        found.retain(|c| args.engines.iter().any(|e| c.name.contains(e.as_str())));
        if found.is_empty() {
            return Err(format!("no engine on this device matches {:?}", args.engines));
        }
    }
    let p = plan(&Arc::new(model), &opts, &found).map_err(|e| e.to_string())?;
    let mut doc = p.to_json();
    if let Some(ms) = args.tpot_target_ms {
        doc["tpot_target_ms"] = serde_json::json!(ms);
    }
    if let Some(codes) = args.activations {
        doc["activations"] = serde_json::json!(twinfer::cpu::ActivationCodes::from(codes).name());
    }
    std::fs::write(&args.out, format!("{doc:#}\n")).map_err(|e| format!("{}: {e}", args.out.display()))?;
    if args.json {
        println!("{doc}");
        return Ok(());
    }
    println!("engines on this device: {}", found.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "));
    // A GPU engine's name carries the KV storage of its op-by-op path; the resident path stores
    // the cache's own dtype.
    println!(
        "KV cache of the timed steps: {} (on the resident GPU path: int8 stays int8, f16 stays f16 where the \
         adapter has shader-f16, anything else is f32)",
        p.kv_dtype
    );
    let w = p.measurements.iter().map(|m| m.candidate.len()).max().unwrap_or(6).max(6);
    println!(
        "{:<w$} {:<8} {:>5} {:>7} {:>11} {:>18} {:>11} {:>10} {:>9}",
        "engine", "phase", "page", "tokens", "median ms", "[min..max] ms", "tokens/s", "kernels ms", "record ms"
    );
    for m in &p.measurements {
        println!(
            "{:<w$} {:<8} {:>5} {:>7} {:>11.2} {:>18} {:>11.0} {:>10} {:>9}",
            m.candidate,
            m.phase,
            m.page_size,
            m.tokens,
            m.seconds.median * 1e3,
            format!("[{:.2}..{:.2}]", m.seconds.min * 1e3, m.seconds.max * 1e3),
            m.tokens_per_s(),
            m.device_seconds.as_ref().map_or("-".into(), |d| format!("{:.2}", d.median * 1e3)),
            m.record_seconds.map_or("-".into(), |s| format!("{:.2}", s * 1e3))
        );
    }
    // Where a resident step's kernel time goes: each kernel's dispatches replayed alone.
    for m in p.measurements.iter().filter(|m| !m.device_kernels.is_empty()) {
        let shares: Vec<String> = m
            .device_kernels
            .iter()
            .map(|k| {
                format!("{} x{} {:.3} ms", k.kernel.trim_end_matches(".wgsl"), k.dispatches, k.seconds.median * 1e3)
            })
            .collect();
        println!("kernels of {} {} page {}: {}", m.candidate, m.phase, m.page_size, shares.join(", "));
    }
    println!(
        "plan: prefill on {}, decode on {} with pages of {}, projections on {}",
        p.prefill.0,
        p.decode.0,
        p.page_size,
        p.simd.name()
    );
    for r in &p.reasons {
        println!("  - {r}");
    }
    println!("config written to {} (use it with --config)", args.out.display());
    Ok(())
}

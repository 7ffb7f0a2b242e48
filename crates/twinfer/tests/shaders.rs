//! Every shader file in every variant parses and validates with naga, with no GPU; and every
//! uniform struct has the same layout in Rust and WGSL.

#![cfg(not(target_arch = "wasm32"))]

use naga::valid::{Capabilities, ValidationFlags, Validator};
use twinfer::gpu::params::layouts;
use twinfer::gpu::shaders::{Kernel, KvStorage, Target, Variant, source};

fn parse(kernel: Kernel, variant: Variant, kv: KvStorage) -> naga::Module {
    let src = source(kernel, variant, kv, Target::Naga);
    naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{} ({variant:?}, {kv}) does not parse:\n{}", kernel.file(), e.emit_to_string(&src)))
}

#[test]
fn every_kernel_and_variant_validates() {
    let mut checked = 0;
    for kernel in Kernel::ALL {
        for variant in Variant::ALL {
            for kv in KvStorage::ALL.into_iter().filter(|&kv| kernel.supports(kv)) {
                let module = parse(kernel, variant, kv);
                let mut caps = Capabilities::empty();
                if kv == KvStorage::F16 {
                    // unpack2x16float: core WGSL, a downlevel flag every wgpu backend sets.
                    caps |= Capabilities::SHADER_FLOAT16 | Capabilities::SHADER_FLOAT16_IN_FLOAT32;
                }
                if variant == Variant::Subgroup {
                    caps |= Capabilities::SUBGROUP;
                }
                if kernel.uses_cooperative_matrices() {
                    caps |= Capabilities::SUBGROUP | Capabilities::COOPERATIVE_MATRIX;
                }
                let info = Validator::new(ValidationFlags::all(), caps).validate(&module);
                if let Err(e) = info {
                    let src = source(kernel, variant, kv, Target::Naga);
                    panic!("{} ({variant:?}, {kv}) fails validation:\n{}", kernel.file(), e.emit_to_string(&src));
                }
                checked += 1;
            }
        }
    }
    // Float storage for every kernel, int8 for the five that read or write a K/V pool, f16 only
    // for the tensor-core matmul, its input split and the tensor-core prefill.
    assert_eq!(checked, (Kernel::ALL.len() - 3) * 4 + 5 * 2 + 3 * 2);
}

/// The baseline must not need subgroups: it validates with no capability but f16 where asked.
/// (The tensor-core matmul is native only and needs subgroups by design.)
#[test]
fn baseline_needs_no_subgroup_capability() {
    for kernel in Kernel::ALL.into_iter().filter(|k| !k.uses_cooperative_matrices()) {
        // The tensor cores' input split writes f16 by design.
        let (kv, caps) = if kernel.supports(KvStorage::F32) {
            (KvStorage::F32, Capabilities::empty())
        } else {
            (KvStorage::F16, Capabilities::SHADER_FLOAT16 | Capabilities::SHADER_FLOAT16_IN_FLOAT32)
        };
        let module = parse(kernel, Variant::Baseline, kv);
        Validator::new(ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {e:?}", kernel.file()));
    }
}

#[test]
fn uniform_structs_agree_with_wgsl() {
    // Every kernel that declares a mirrored struct must agree with it, not only the first found.
    let storage = |k: Kernel| if k.supports(KvStorage::F32) { KvStorage::F32 } else { KvStorage::F16 };
    let modules: Vec<naga::Module> = Kernel::ALL.iter().map(|&k| parse(k, Variant::Baseline, storage(k))).collect();
    for (name, size, fields) in layouts() {
        let mut found = 0;
        for m in &modules {
            let Some((_, ty)) = m.types.iter().find(|(_, t)| t.name.as_deref() == Some(name)) else { continue };
            found += 1;
            let naga::TypeInner::Struct { members, span } = &ty.inner else { panic!("{name} is not a struct") };
            assert_eq!(*span as usize, size, "{name}: WGSL size {span}, Rust {size}");
            assert_eq!(members.len(), fields.len(), "{name}: member count");
            for (mem, (field, offset)) in members.iter().zip(&fields) {
                assert_eq!(mem.name.as_deref(), Some(*field), "{name}: member order");
                assert_eq!(mem.offset as usize, *offset, "{name}.{field}: WGSL offset {}, Rust {offset}", mem.offset);
            }
        }
        assert!(found > 0, "no WGSL struct {name}");
    }
}

/// The prefill kernel with every tile configuration the host picks (32- and 16-column chunks,
/// narrow and wide heads) resolves its overrides, including the workgroup array sized by them,
/// and still validates.
#[test]
fn prefill_tile_overrides_resolve() {
    for variant in Variant::ALL {
        for kv in KvStorage::ALL {
            let module = parse(Kernel::Prefill, variant, kv);
            let mut caps = Capabilities::SHADER_FLOAT16 | Capabilities::SHADER_FLOAT16_IN_FLOAT32;
            if variant == Variant::Subgroup {
                caps |= Capabilities::SUBGROUP;
            }
            let info = Validator::new(ValidationFlags::all(), caps).validate(&module).unwrap();
            for dk in [16.0, 32.0] {
                for wide in [0.0, 1.0] {
                    let mut constants = naga::back::PipelineConstants::default();
                    constants.insert("WG".into(), 256.0);
                    constants.insert("DK".into(), dk);
                    constants.insert("WIDE".into(), wide);
                    let (resolved, _) = naga::back::pipeline_constants::process_overrides(
                        &module,
                        &info,
                        Some((naga::ShaderStage::Compute, "main")),
                        &constants,
                    )
                    .unwrap_or_else(|e| panic!("DK {dk}, WIDE {wide} ({variant:?}, {kv}): {e}"));
                    let stage_bytes = resolved
                        .global_variables
                        .iter()
                        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
                        .map(|(_, g)| resolved.types[g.ty].inner.size(resolved.to_ctx()))
                        .sum::<u32>();
                    assert_eq!(stage_bytes, if dk == 32.0 { 48 * 1024 } else { 32 * 1024 }, "DK {dk}");
                }
            }
        }
    }
}

/// No adapter in CI has cooperative matrices, so the tensor-core kernels are compiled to SPIR-V
/// here (what wgpu does on Vulkan before the driver sees it), with their capability declared and
/// the prefill's overrides resolved for each head dim it takes (its workgroup memory is 48 KiB,
/// what the host checks the adapter for).
#[test]
fn tensor_core_kernels_translate_to_spirv() {
    let caps = Capabilities::SHADER_FLOAT16
        | Capabilities::SHADER_FLOAT16_IN_FLOAT32
        | Capabilities::SUBGROUP
        | Capabilities::COOPERATIVE_MATRIX;
    let head_dims: [Option<f64>; 9] =
        [None, Some(16.0), Some(32.0), Some(48.0), Some(64.0), Some(80.0), Some(96.0), Some(112.0), Some(128.0)];
    for (kernel, dims) in [(Kernel::LinearMatmulCoop, &head_dims[..1]), (Kernel::PrefillCoop, &head_dims[1..])] {
        let module = parse(kernel, Variant::Subgroup, KvStorage::F16);
        let info = Validator::new(ValidationFlags::all(), caps).validate(&module).unwrap();
        for hd in dims {
            let mut constants = naga::back::PipelineConstants::default();
            if let Some(hd) = hd {
                constants.insert("HD".into(), *hd);
            }
            let (resolved, info) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, "main")),
                &constants,
            )
            .unwrap_or_else(|e| panic!("{} HD {hd:?}: {e}", kernel.file()));
            if kernel == Kernel::PrefillCoop {
                let stage_bytes = resolved
                    .global_variables
                    .iter()
                    .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
                    .map(|(_, g)| resolved.types[g.ty].inner.size(resolved.to_ctx()))
                    .sum::<u32>();
                assert_eq!(stage_bytes, twinfer::gpu::PREFILL_COOP_STORAGE, "HD {hd:?}");
            }
            let options = naga::back::spv::Options { lang_version: (1, 3), ..Default::default() };
            let pipeline = naga::back::spv::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: "main".into(),
            };
            let words = naga::back::spv::write_vec(&resolved, &info, &options, Some(&pipeline))
                .unwrap_or_else(|e| panic!("{} HD {hd:?}: {e}", kernel.file()));
            // OpCapability CooperativeMatrixKHR (6022) is declared.
            assert!(words.windows(2).any(|w| w == [(2 << 16) | 17, 6022]), "no CooperativeMatrixKHR capability");
        }
    }
}

//! The conformance suite on the WGSL engine, instantiated once per shader variant (baseline or
//! subgroup reductions, f32 or f16 K/V storage), plus GPU == CPU on the same inputs.
//!
//! With no adapter the tests print a loud SKIPPED, and fail when `TWINFER_REQUIRE_GPU=1` (CI).

#![cfg(not(target_arch = "wasm32"))]

use std::sync::OnceLock;

use proptest::prelude::*;
use twinfer::cpu::{CpuEngine, SplitK};
use twinfer::gpu::{GpuEngine, GpuOptions, ShaderChecks, Variant};
use twinfer::{DType, TwinferError};
use twinfer_tests::{Case, CaseData, KvKind, Mode, case_strategy};

/// Property cases per test: `TWINFER_GPU_TEST_CASES`, 12 by default (lavapipe is slow).
fn cases() -> u32 {
    option_env!("TWINFER_GPU_TEST_CASES").and_then(|s| s.parse().ok()).unwrap_or(12)
}

/// The device's default engine, opened once per test binary.
fn base() -> Option<&'static GpuEngine> {
    static BASE: OnceLock<Result<GpuEngine, TwinferError>> = OnceLock::new();
    match BASE.get_or_init(GpuEngine::new) {
        Ok(e) => Some(e),
        Err(e) => {
            if std::env::var("TWINFER_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("TWINFER_REQUIRE_GPU=1 but the GPU engine is unavailable: {e}");
            }
            eprintln!("SKIPPED: no usable GPU ({e}); the WGSL kernels are NOT tested on this machine");
            None
        }
    }
}

/// The engine for a variant, or a loud skip when the adapter lacks it (a failure under
/// `TWINFER_REQUIRE_GPU=1`, since CI's lavapipe has every feature used here).
fn engine(
    variant: Variant,
    f16_kv: bool,
    split_k: SplitK,
    decode_wg: u32,
    portable_prefill: bool,
) -> Option<GpuEngine> {
    let base = base()?;
    let opts = GpuOptions { variant, f16_kv, split_k, decode_wg, portable_prefill, ..base.options() };
    match base.with_options(opts) {
        Ok(e) => Some(e),
        Err(e) => {
            if std::env::var("TWINFER_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("TWINFER_REQUIRE_GPU=1 but variant {opts:?} is unavailable: {e}");
            }
            eprintln!("SKIPPED: variant {opts:?} unavailable here: {e}");
            None
        }
    }
}

fn run(engine: &GpuEngine, case: &Case) -> Result<(Vec<f32>, Option<Vec<f32>>), TestCaseError> {
    let data = CaseData::new(case);
    let r = match case.mode {
        Mode::Prefill => data.run(|p, d, out| engine.prefill(p, &d.prefill_input(case.kv_kind), out)),
        Mode::Decode => data.run(|p, d, out| engine.decode(p, &d.decode_input(), out)),
    };
    r.map_err(|e| TestCaseError::fail(e.to_string()))
}

fn check(engine: &GpuEngine, case: &Case) -> Result<(), TestCaseError> {
    let data = CaseData::new(case);
    let (o, lse) = run(engine, case)?;
    data.check(&o, lse.as_deref(), &data.reference()).map_err(TestCaseError::fail)
}

/// GPU and CPU engines on the same inputs agree within the output dtype's tolerance.
fn check_against_cpu(engine: &GpuEngine, case: &Case) -> Result<(), TestCaseError> {
    let data = CaseData::new(case);
    let cpu = CpuEngine::new();
    let (o_gpu, lse_gpu) = run(engine, case)?;
    let (o_cpu, lse_cpu) = match case.mode {
        Mode::Prefill => data.run(|p, d, out| cpu.prefill(p, &d.prefill_input(case.kv_kind), out)),
        Mode::Decode => data.run(|p, d, out| cpu.decode(p, &d.decode_input(), out)),
    }
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    // The CPU's prompt blocks over bf16 K/V take bf16 dot products where its level has them
    // (the GPU keeps f32): the two roundings' bound then applies (see `Tolerance`).
    let bf16_products = case.mode == Mode::Prefill && case.kv_dtype == DType::BF16 && cpu.level().bf16_dot();
    let tol = twinfer_tests::Tolerance { bf16_products, ..twinfer_tests::Tolerance::for_output(case.o_dtype) };
    let want = data.reference();
    let d = data.params.head_dim;
    for (i, (g, c)) in o_gpu.iter().zip(&o_cpu).enumerate() {
        let bound = 2.0 * tol.o_bound(*c as f64, want.score_abs[i / d], want.v_abs[i / d]);
        prop_assert!(((g - c).abs() as f64) <= bound, "o[{i}]: gpu {g}, cpu {c}");
    }
    if let (Some(lg), Some(lc)) = (lse_gpu, lse_cpu) {
        for (i, (g, c)) in lg.iter().zip(&lc).enumerate() {
            let same_inf = *g == f32::NEG_INFINITY && *c == f32::NEG_INFINITY;
            let bf16 = if bf16_products { twinfer_tests::BF16_UNIT * want.score_abs[i] } else { 0.0 };
            let bound = 1e-4 * c.abs().max(1.0) as f64 + bf16;
            prop_assert!(same_inf || ((g - c).abs() as f64) <= bound, "lse[{i}]: gpu {g}, cpu {c}");
        }
    }
    Ok(())
}

/// Forces the K/V dtype to f16 for the f16-storage variants (f32 K/V would run the f32 kernels).
fn with_kv(case: Case, f16_kv: bool) -> Case {
    if f16_kv { Case { kv_dtype: DType::F16, ..case } } else { case }
}

macro_rules! variant_suite {
    ($name:ident, $variant:expr, $f16:expr, $wg:expr) => {
        variant_suite!($name, $variant, $f16, $wg, false);
    };
    ($name:ident, $variant:expr, $f16:expr, $wg:expr, $portable_prefill:expr) => {
        mod $name {
            use super::*;

            fn e(split_k: SplitK) -> Option<GpuEngine> {
                engine($variant, $f16, split_k, $wg, $portable_prefill)
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(cases()))]

                #[test]
                fn prefill_matches_oracle(case in case_strategy(Mode::Prefill, 3, 160, true)) {
                    if let Some(e) = e(SplitK::Auto) { check(&e, &with_kv(case, $f16))?; }
                }

                #[test]
                fn decode_matches_oracle(case in case_strategy(Mode::Decode, 8, 400, true)) {
                    if let Some(e) = e(SplitK::Auto) { check(&e, &with_kv(case, $f16))?; }
                }

                #[test]
                fn split_k_decode_matches_oracle(
                    case in case_strategy(Mode::Decode, 3, 700, true),
                    chunk in prop_oneof![Just(1usize), Just(64), Just(100), Just(256)],
                ) {
                    if let Some(e) = e(SplitK::ChunkSize(chunk)) { check(&e, &with_kv(case, $f16))?; }
                }

                #[test]
                fn gpu_equals_cpu(
                    case in prop_oneof![case_strategy(Mode::Decode, 4, 300, true), case_strategy(Mode::Prefill, 2, 100, true)],
                ) {
                    if let Some(e) = e(SplitK::Auto) { check_against_cpu(&e, &with_kv(case, $f16))?; }
                }

                /// Decode through a shuffled page table (among garbage pages) equals decode over
                /// the gathered keys, bit for bit.
                #[test]
                fn paged_equals_contiguous(case in case_strategy(Mode::Decode, 4, 300, true)) {
                    if let Some(e) = e(SplitK::Off) {
                        let case = with_kv(case, $f16);
                        let data = CaseData::new(&case);
                        let gathered = CaseData::contiguous(&case);
                        let paged = data
                            .run(|p, d, out| e.decode(p, &d.decode_input(), out))
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let contiguous = gathered
                            .run(|p, d, out| e.decode(p, &d.decode_input(), out))
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let bits = |x: &Vec<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        prop_assert_eq!(bits(&paged.0), bits(&contiguous.0));
                        prop_assert_eq!(paged.1.map(|l| bits(&l)), contiguous.1.map(|l| bits(&l)));
                    }
                }
            }

            /// Pinned: fully masked rows (o = 0, lse = -inf), zero and narrow windows, soft-cap,
            /// ALiBi, GQA 4, page size 3, against both KV kinds; page sizes 1, 16, 64 in decode.
            #[test]
            fn pinned_cases() {
                let Some(e) = e(SplitK::Auto) else { return };
                for (window_left, qo, kv_kind) in
                    [(None, 9, KvKind::Paged), (Some(0), 5, KvKind::Ragged), (Some(3), 40, KvKind::Paged)]
                {
                    let case = Case {
                        page_size: 3,
                        head_dim: 72,
                        causal: true,
                        window_left,
                        soft_cap: Some(5.0),
                        alibi: true,
                        seed: 7,
                        ..Case::pinned(Mode::Prefill, kv_kind, vec![qo, 1], vec![4, 17])
                    };
                    check(&e, &case).unwrap();
                }
                // Large logits in f32 (q gain 12, head_dim 256, ALiBi): the score's own f32
                // rounding reaches 2e-5 here, which the magnitude-aware bound allows.
                let large_logits = Case {
                    group: 8,
                    num_kv_heads: 1,
                    head_dim: 256,
                    page_size: 64,
                    alibi: true,
                    sm_scale: Some(0.42288738),
                    q_dtype: DType::F16,
                    kv_dtype: if $f16 { DType::F16 } else { DType::F32 },
                    q_gain: 12.0,
                    seed: 1885591823837477125,
                    ..Case::pinned(Mode::Prefill, KvKind::Ragged, vec![61, 39], vec![65, 63])
                };
                check(&e, &large_logits).unwrap();
                // One chunk over 700 pages of one key: the staged page ids (256 at a time) are
                // restaged mid-chunk, at a step boundary and not.
                if let Some(unsplit) = self::e(SplitK::Off) {
                    for kv in [700, 513] {
                        let case = Case {
                            page_size: 1,
                            alibi: true,
                            kv_dtype: if $f16 { DType::F16 } else { DType::F32 },
                            seed: 13,
                            ..Case::pinned(Mode::Decode, KvKind::Paged, vec![1, 1], vec![kv, 300])
                        };
                        check(&unsplit, &case).unwrap();
                    }
                }
                for (page_size, group, kv) in [(1, 8, 97), (16, 1, 300), (64, 3, 129), (16, 16, 65)] {
                    let case = Case {
                        page_size,
                        group,
                        head_dim: 256,
                        window_left: Some(70),
                        sm_scale: Some(0.1),
                        q_dtype: DType::F16,
                        kv_dtype: if $f16 { DType::F16 } else { DType::F32 },
                        o_dtype: DType::F16,
                        q_gain: 12.0,
                        seed: 11,
                        ..Case::pinned(Mode::Decode, KvKind::Paged, vec![1, 1, 1], vec![kv, 1, 54])
                    };
                    check(&e, &case).unwrap();
                }
            }
        }
    };
}

variant_suite!(baseline_f32, Variant::Baseline, false, 64);
variant_suite!(baseline_f16, Variant::Baseline, true, 64);
variant_suite!(subgroup_f32, Variant::Subgroup, false, 64);
variant_suite!(subgroup_f16, Variant::Subgroup, true, 64);
// Wide decode workgroups: the key-group split of the value pass (the default on real GPUs).
variant_suite!(subgroup_f16_wg256, Variant::Subgroup, true, 256);
variant_suite!(baseline_f32_wg128, Variant::Baseline, false, 128);
// The portable prefill kernel that browsers on SwiftShader run.
variant_suite!(baseline_f32_portable_prefill, Variant::Baseline, false, 64, true);

/// Prefill on the tensor cores (`prefill_attention_coop.wgsl`, opt-in): f16 K/V and every head
/// dim it takes, against the oracle with the f32 path's tolerance, and against the FMA kernel. Adapters
/// without tensor cores (lavapipe in CI) skip loudly; `TWINFER_REQUIRE_TENSOR_CORES=1` turns the
/// skip into a failure on a device that should have them.
mod tensor_core_prefill {
    use super::*;

    fn engines() -> Option<(GpuEngine, GpuEngine)> {
        let base = base()?;
        if !base.context().summary.tensor_cores {
            if std::env::var("TWINFER_REQUIRE_TENSOR_CORES").is_ok_and(|v| v == "1") {
                panic!("TWINFER_REQUIRE_TENSOR_CORES=1 but {} has no tensor cores", base.context().summary.name);
            }
            eprintln!(
                "SKIPPED: {} has no tensor cores; the tensor-core prefill is NOT tested here",
                base.context().summary.name
            );
            return None;
        }
        let on = GpuOptions { f16_kv: true, tensor_core_prefill: true, ..base.options() };
        let off = GpuOptions { tensor_core_prefill: false, ..on };
        Some((base.with_options(on).unwrap(), base.with_options(off).unwrap()))
    }

    /// The tensor-core and FMA kernels agree as two f32-accurate results do.
    fn check_both(on: &GpuEngine, off: &GpuEngine, case: &Case) -> Result<(), TestCaseError> {
        prop_assert_eq!(on.prefill_kernel(case.head_dim, DType::F16), "prefill_attention_coop.wgsl");
        prop_assert_eq!(off.prefill_kernel(case.head_dim, DType::F16), "prefill_attention.wgsl");
        check(on, case)?;
        let data = CaseData::new(case);
        let (o_on, _) = run(on, case)?;
        let (o_off, _) = run(off, case)?;
        let tol = twinfer_tests::Tolerance::for_output(case.o_dtype);
        let want = data.reference();
        let d = data.params.head_dim;
        for (i, (a, b)) in o_on.iter().zip(&o_off).enumerate() {
            let bound = 2.0 * tol.o_bound(*b as f64, want.score_abs[i / d], want.v_abs[i / d]);
            prop_assert!(((a - b).abs() as f64) <= bound, "o[{}]: tensor cores {}, FMA {}", i, a, b);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn matches_oracle_and_fma_kernel(
            case in twinfer_tests::case_strategy(Mode::Prefill, 3, 300, true),
            head_dim in prop_oneof![Just(16usize), Just(32), Just(48), Just(64), Just(80), Just(96), Just(112), Just(128)],
        ) {
            if let Some((on, off)) = engines() {
                check_both(&on, &off, &Case { head_dim, kv_dtype: DType::F16, ..case })?;
            }
        }
    }

    /// Pinned: long rows whose maximum jumps mid-way (q gain 12: the lazy rescale runs), ALiBi
    /// and soft-cap, a window narrower than a tile, page size 3, GQA 8 over 2 KV heads, and
    /// more than one workgroup of rows per sequence.
    #[test]
    fn pinned_cases() {
        let Some((on, off)) = engines() else { return };
        for (head_dim, window_left, soft_cap, alibi, kv_kind) in [
            (128, None, None, false, KvKind::Paged),
            (64, Some(40), Some(30.0), true, KvKind::Ragged),
            (96, None, Some(5.0), true, KvKind::Paged),
        ] {
            let case = Case {
                page_size: 3,
                group: 8,
                num_kv_heads: 2,
                head_dim,
                causal: true,
                window_left,
                soft_cap,
                alibi,
                kv_dtype: DType::F16,
                q_gain: 12.0,
                seed: 29,
                ..Case::pinned(Mode::Prefill, kv_kind, vec![300, 17], vec![700, 17])
            };
            check_both(&on, &off, &case).unwrap();
        }
    }
}

#[test]
fn adapter_is_reported() {
    let Some(e) = base() else { return };
    let s = &e.context().summary;
    assert!(!s.name.is_empty());
    eprintln!("GPU tests ran on: {s}");
}

/// Every level of compiled-in checks gives the same outputs as the device's default (the
/// checks only clamp indices and bound loops that valid inputs never reach).
#[test]
fn shader_check_levels_agree() {
    let Some(base) = base() else { return };
    let case = Case {
        head_dim: 128,
        causal: true,
        seed: 5,
        ..Case::pinned(Mode::Prefill, KvKind::Paged, vec![70, 3], vec![90, 130])
    };
    let decode = Case { mode: Mode::Decode, qo_lens: vec![1, 1], ..case.clone() };
    let want: Vec<_> = [&case, &decode].map(|c| run(base, c).unwrap()).into();
    for checks in [ShaderChecks::Full, ShaderChecks::Bounds, ShaderChecks::Unchecked] {
        let e = base.with_options(GpuOptions { shader_checks: checks, ..base.options() }).unwrap();
        for (c, w) in [&case, &decode].into_iter().zip(&want) {
            assert_eq!(&run(&e, c).unwrap(), w, "{checks:?}, {:?}", c.mode);
        }
    }
}

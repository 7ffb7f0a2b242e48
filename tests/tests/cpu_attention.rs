//! The conformance suite on the CPU engine, instantiated once per SIMD level.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use proptest::prelude::*;
use twinfer::cpu::{CpuEngine, SimdLevel, SplitK};
use twinfer_tests::{Case, CaseData, KvKind, Mode, case_strategy};

/// Property cases per test: `TWINFER_TEST_CASES` (emulated targets use fewer), 32 by default.
fn cases() -> u32 {
    option_env!("TWINFER_TEST_CASES").and_then(|s| s.parse().ok()).unwrap_or(32)
}

/// The engine for a level by name, or a loud skip when this CPU lacks it.
fn engine(level: &str) -> Option<CpuEngine> {
    match SimdLevel::by_name(level) {
        Some(l) => Some(CpuEngine::with_level(l)),
        None => {
            eprintln!("SKIPPED: this CPU has no {level}; its kernels are not tested on this machine");
            None
        }
    }
}

fn check_prefill(engine: &CpuEngine, case: &Case) -> Result<(), TestCaseError> {
    let data = CaseData::new(case);
    let want = data.reference();
    let (o, lse) = data
        .run(|p, d, out| engine.prefill(p, &d.prefill_input(case.kv_kind), out))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    // Prompt blocks over bf16 K/V take bf16 dot products where the level has them.
    if engine.level().bf16_dot() {
        data.check_bf16_products(&o, lse.as_deref(), &want).map_err(TestCaseError::fail)
    } else {
        data.check(&o, lse.as_deref(), &want).map_err(TestCaseError::fail)
    }
}

fn check_decode(engine: &CpuEngine, case: &Case) -> Result<(), TestCaseError> {
    let data = CaseData::new(case);
    let want = data.reference();
    let (o, lse) = data
        .run(|p, d, out| engine.decode(p, &d.decode_input(), out))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    data.check(&o, lse.as_deref(), &want).map_err(TestCaseError::fail)
}

macro_rules! simd_level_suite {
    ($level:ident) => {
        mod $level {
            use super::*;
            // Explicit, so that it shadows both the glob above and the built-in `#[test]`.
            #[cfg(target_arch = "wasm32")]
            use wasm_bindgen_test::wasm_bindgen_test as test;

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(cases()))]

                #[test]
                fn prefill_matches_oracle(case in case_strategy(Mode::Prefill, 4, 160, true)) {
                    if let Some(e) = engine(stringify!($level)) {
                        check_prefill(&e, &case)?;
                    }
                }

                #[test]
                fn decode_matches_oracle(case in case_strategy(Mode::Decode, 8, 400, true)) {
                    if let Some(e) = engine(stringify!($level)) {
                        check_decode(&e, &case)?;
                    }
                }

                #[test]
                fn split_k_decode_matches_oracle(
                    case in case_strategy(Mode::Decode, 3, 700, true),
                    chunk in prop_oneof![Just(1usize), Just(64), Just(100), Just(256)],
                ) {
                    if let Some(e) = engine(stringify!($level)) {
                        check_decode(&e.with_split_k(SplitK::ChunkSize(chunk)), &case)?;
                    }
                }

                /// Decode through a shuffled page table (among garbage pages) equals decode over
                /// the gathered keys, bit for bit (same tiles in the same order).
                #[test]
                fn paged_equals_contiguous(case in case_strategy(Mode::Decode, 6, 300, true)) {
                    if let Some(e) = engine(stringify!($level)) {
                        let e = e.with_split_k(SplitK::Off);
                        let data = CaseData::new(&case);
                        let gathered = CaseData::contiguous(&case);
                        let paged = data
                            .run(|p, d, out| e.decode(p, &d.decode_input(), out))
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let contiguous = gathered
                            .run(|p, d, out| e.decode(p, &d.decode_input(), out))
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert!(data.paged().num_pages() > gathered.paged().num_pages(), "garbage pages must surround the shuffled ones");
                        let bits = |x: &Vec<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        prop_assert_eq!(bits(&paged.0), bits(&contiguous.0));
                        prop_assert_eq!(paged.1.map(|l| bits(&l)), contiguous.1.map(|l| bits(&l)));
                    }
                }
            }

            /// Pinned: more queries than keys under a causal mask leaves the first rows with no
            /// visible key (o = 0, lse = -inf), and a zero window sees only the diagonal.
            #[test]
            fn pinned_fully_masked_rows_and_zero_window() {
                let Some(e) = engine(stringify!($level)) else { return };
                for (window_left, qo) in [(None, 9), (Some(0), 5), (Some(3), 40)] {
                    let case = Case {
                        mode: Mode::Prefill,
                        kv_kind: KvKind::Paged,
                        qo_lens: vec![qo, 1],
                        kv_lens: vec![4, 17],
                        page_size: 3,
                        num_kv_heads: 2,
                        group: 4,
                        head_dim: 72,
                        causal: true,
                        window_left,
                        soft_cap: Some(5.0),
                        alibi: true,
                        sm_scale: None,
                        q_dtype: twinfer::DType::F32,
                        kv_dtype: twinfer::DType::F16,
                        o_dtype: twinfer::DType::F32,
                        want_lse: true,
                        q_gain: 4.0,
                        seed: 7,
                    };
                    check_prefill(&e, &case).unwrap();
                }
            }
        }
    };
}

simd_level_suite!(scalar);
#[cfg(target_arch = "x86_64")]
simd_level_suite!(avx2);
#[cfg(target_arch = "x86_64")]
simd_level_suite!(avx512);
#[cfg(target_arch = "aarch64")]
simd_level_suite!(neon);
#[cfg(target_arch = "wasm32")]
simd_level_suite!(simd128);

#[test]
fn best_level_is_detected_and_listed() {
    let best = SimdLevel::detect();
    let all = SimdLevel::available();
    assert_eq!(all.last().map(|l| l.name()), Some(best.name()));
    assert_eq!(all[0].name(), "scalar");
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    assert_eq!(best.name(), "simd128", "a +simd128 build must run the simd128 kernels");
    #[cfg(target_arch = "aarch64")]
    assert_eq!(best.name(), "neon");
}

/// A sequence's decode output is bit-identical alone and in a batch: the split-K partition depends
/// on its own length only (`SplitK::Auto` sizes chunks from it and the thread count), so its keys are reduced in the same
/// order whatever its neighbours. The engine's "a request's output does not depend on the batch"
/// rests on this.
#[test]
fn decode_is_batch_invariant() {
    use twinfer::{AttentionOutput, DecodeInput, PageTable};
    let engine = CpuEngine::with_level(SimdLevel::detect());
    let lens = vec![1, 700, 64, 257, 3000, 90];
    let case = Case::pinned(Mode::Decode, KvKind::Paged, vec![1; lens.len()], lens.clone());
    let data = CaseData::new(&case);
    let (batched, _) = data.run(|p, d, out| engine.decode(p, &d.decode_input(), out)).unwrap();
    let row = data.params.num_qo_heads * data.params.head_dim;
    let q = data.q.to_f32();
    for b in 0..lens.len() {
        let pages = &data.page_indices[data.page_indptr[b] as usize..data.page_indptr[b + 1] as usize];
        let (indptr, last) = ([0, pages.len() as u32], [data.last_page_len[b]]);
        let input = DecodeInput {
            q: q[b * row..(b + 1) * row].into(),
            kv: data.paged(),
            table: PageTable::new(&indptr, pages, &last),
        };
        let mut alone = vec![f32::NAN; row];
        engine.decode(&data.params, &input, &mut AttentionOutput::new(alone.as_mut_slice())).unwrap();
        let bits = |xs: &[f32]| xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&alone),
            bits(&batched[b * row..(b + 1) * row]),
            "sequence {b} (len {}) alone vs batched",
            lens[b]
        );
    }
}

/// A prompt's rows are bit-identical whether it is prefilled whole or in chunks that start at
/// multiples of `PREFILL_ALIGN` (the scheduler's cut points): the whole prompt's blocks share
/// their widened K/V tiles in groups, the chunks' few blocks run alone, and each block must still
/// visit the same tiles in the same order. With and without a sliding window (whose blocks'
/// tiles start at different keys and so never share).
#[test]
fn prefill_is_chunk_invariant() {
    use twinfer::cpu::PREFILL_ALIGN;
    use twinfer::{AttentionOutput, KvInput, PageTable, PrefillInput};
    let engine = CpuEngine::with_level(SimdLevel::detect());
    // The last block holds one token (blocks are 16 tokens here).
    let len = 10 * PREFILL_ALIGN + 33;
    for window_left in [None, Some(100)] {
        let case =
            Case { causal: true, window_left, ..Case::pinned(Mode::Prefill, KvKind::Paged, vec![len], vec![len]) };
        let data = CaseData::new(&case);
        let (whole, _) = data.run(|p, d, out| engine.prefill(p, &d.prefill_input(KvKind::Paged), out)).unwrap();
        let row = data.params.num_qo_heads * data.params.head_dim;
        let q = data.q.to_f32();
        let page = case.page_size;
        for c0 in (0..len).step_by(PREFILL_ALIGN) {
            let c1 = (c0 + PREFILL_ALIGN).min(len);
            let pages = &data.page_indices[..c1.div_ceil(page)];
            let (indptr, last) = ([0, pages.len() as u32], [(c1 - (pages.len() - 1) * page) as u32]);
            let qo_indptr = [0, (c1 - c0) as u32];
            let input = PrefillInput {
                q: q[c0 * row..c1 * row].into(),
                qo_indptr: &qo_indptr,
                kv: KvInput::Paged { kv: data.paged(), table: PageTable::new(&indptr, pages, &last) },
            };
            let mut chunk = vec![f32::NAN; (c1 - c0) * row];
            engine.prefill(&data.params, &input, &mut AttentionOutput::new(chunk.as_mut_slice())).unwrap();
            let first_diff = chunk.iter().zip(&whole[c0 * row..c1 * row]).position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(first_diff, None, "rows {c0}..{c1}, window {window_left:?}: first differing element");
        }
    }
}

//! `merge_state` and `merge_state_in_place` against the oracle, and the composition property that
//! split-K decode and cascade (shared-prefix) attention rest on: attention over keys `[0, a)`
//! merged with attention over `[a, n)` equals attention over `[0, n)`.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use proptest::prelude::*;
use twinfer::cpu::CpuEngine;
use twinfer::reference::{self, RefOutput};
use twinfer::{AttentionOutput, AttentionParams, DType, KvInput, PrefillInput, merge_state, merge_state_in_place};
use twinfer_tests::problem::Buf;
use twinfer_tests::rng::Rng;
use twinfer_tests::{BF16_UNIT, Tolerance};

/// Property cases per test: `TWINFER_TEST_CASES` (emulated targets use fewer), 32 by default.
fn cases() -> u32 {
    option_env!("TWINFER_TEST_CASES").and_then(|s| s.parse().ok()).unwrap_or(32)
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

/// One row's pair of LSEs: mostly finite, with either side, or both, `-inf` (no visible key),
/// equal values, and values so far apart that one weight underflows.
fn lse_pair() -> impl Strategy<Value = (f32, f32)> {
    let finite = || -30.0f32..30.0;
    prop_oneof![
        4 => (finite(), finite()),
        1 => finite().prop_map(|b| (f32::NEG_INFINITY, b)),
        1 => finite().prop_map(|a| (a, f32::NEG_INFINITY)),
        1 => Just((f32::NEG_INFINITY, f32::NEG_INFINITY)),
        1 => finite().prop_map(|a| (a, a)),
        1 => (finite(), prop_oneof![Just(-120.0f32), Just(-60.0), Just(60.0), Just(120.0)])
            .prop_map(|(a, gap)| (a, a + gap)),
    ]
}

/// A random merge: `[rows, heads, head_dim]` states in any dtype, f32, f16 or bf16 out.
#[derive(Debug, Clone)]
struct MergeCase {
    rows: usize,
    heads: usize,
    head_dim: usize,
    a_dtype: DType,
    b_dtype: DType,
    out_dtype: DType,
    lse: Vec<(f32, f32)>,
    seed: u64,
}

fn merge_case() -> impl Strategy<Value = MergeCase> {
    let shape = (0..=5usize, 1..=4usize, prop_oneof![Just(1usize), Just(3), Just(8), Just(64), Just(72), Just(256)]);
    (shape, dtype(), dtype(), dtype(), any::<u64>()).prop_flat_map(
        |((rows, heads, head_dim), a_dtype, b_dtype, out_dtype, seed)| {
            prop::collection::vec(lse_pair(), rows * heads).prop_map(move |lse| MergeCase {
                rows,
                heads,
                head_dim,
                a_dtype,
                b_dtype,
                out_dtype,
                lse,
                seed,
            })
        },
    )
}

/// The two states of a case, rounded to their dtypes.
fn states(c: &MergeCase) -> (Buf, Buf, Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(c.seed);
    let n = c.rows * c.heads * c.head_dim;
    let o_a: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
    let o_b: Vec<f32> = (0..n).map(|_| rng.uniform() * 4.0).collect();
    let (lse_a, lse_b) = c.lse.iter().copied().unzip();
    (Buf::from_f32(c.a_dtype, &o_a), Buf::from_f32(c.b_dtype, &o_b), lse_a, lse_b)
}

fn to_f64(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| x as f64).collect()
}

/// Where the prefill took bf16 dot products (bf16 K/V on a CPU with them), the bound of their two
/// roundings (see `Tolerance`), `times` over: the oracle's score and value magnitudes per row.
#[derive(Clone, Copy)]
struct Bf16Slack<'a> {
    oracle: &'a RefOutput,
    times: f64,
}

impl Bf16Slack<'_> {
    fn o(&self, row: usize) -> f64 {
        self.times * BF16_UNIT * self.oracle.v_abs[row] * (1.0 + 2.0 * self.oracle.score_abs[row])
    }
    fn lse(&self, row: usize) -> f64 {
        self.times * BF16_UNIT * self.oracle.score_abs[row]
    }
}

/// Checks a merged state against the oracle: rows with both LSEs `-inf` must be exactly 0 and
/// `-inf`; others within `tol` (o) and `lse_rtol * max(1, |lse|)` (LSE), plus `bf16`'s slack.
fn check_merge(
    o: &[f32],
    lse: &[f32],
    want: &RefOutput,
    head_dim: usize,
    tol: Tolerance,
    lse_rtol: f64,
    bf16: Option<Bf16Slack<'_>>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(o.len(), want.o.len());
    prop_assert_eq!(lse.len(), want.lse.len());
    for (r, (&got, &w)) in lse.iter().zip(&want.lse).enumerate() {
        if w == f64::NEG_INFINITY {
            prop_assert!(got == f32::NEG_INFINITY, "row {}: lse {} for an empty row", r, got);
            for (c, &x) in o[r * head_dim..(r + 1) * head_dim].iter().enumerate() {
                prop_assert!(x == 0.0, "row {}, col {}: {} for an empty row (must be 0)", r, c, x);
            }
        } else {
            let err = (got as f64 - w).abs();
            let slack = bf16.map_or(0.0, |b| b.lse(r));
            prop_assert!(err <= lse_rtol * w.abs().max(1.0) + slack, "row {}: lse {} vs oracle {}", r, got, w);
        }
    }
    for (i, (&got, &w)) in o.iter().zip(&want.o).enumerate() {
        let bound = tol.atol + tol.rtol * w.abs() + bf16.map_or(0.0, |b| b.o(i / head_dim));
        prop_assert!(
            (got as f64 - w).abs() <= bound,
            "o[row {}, col {}] = {} vs oracle {} (bound {})",
            i / head_dim,
            i % head_dim,
            got,
            w,
            bound
        );
    }
    Ok(())
}

/// f32 merge arithmetic: a few ulps of the exponent differences (up to ~100) and of the sum.
const F32_MERGE: Tolerance = Tolerance { atol: 1e-5, rtol: 1e-5, lse_atol: 1e-5, bf16_products: false };

fn tolerance(out: DType) -> Tolerance {
    match out {
        DType::F32 => F32_MERGE,
        other => Tolerance::for_output(other),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases() * 4))]

    #[test]
    fn merge_state_matches_oracle(c in merge_case()) {
        let (o_a, o_b, lse_a, lse_b) = states(&c);
        let want = reference::merge_state(
            &to_f64(&o_a.to_f32()), &to_f64(&lse_a), &to_f64(&o_b.to_f32()), &to_f64(&lse_b),
        ).unwrap();
        let mut out = Buf::zeros(c.out_dtype, c.rows * c.heads * c.head_dim);
        out.view_mut().poison();
        let mut lse = vec![f32::NAN; c.rows * c.heads];
        merge_state(o_a.view(), &lse_a, o_b.view(), &lse_b, out.view_mut(), &mut lse)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_merge(&out.to_f32(), &lse, &want, c.head_dim, tolerance(c.out_dtype), F32_MERGE.lse_atol, None)?;
    }

    /// The in-place form agrees with the oracle and, bit for bit, with `merge_state` to f32.
    #[test]
    fn merge_state_in_place_matches_oracle_and_out_of_place(c in merge_case()) {
        let (o_a, o_b, lse_a, lse_b) = states(&c);
        let (a, b) = (o_a.to_f32(), o_b.to_f32());
        let want = reference::merge_state(&to_f64(&a), &to_f64(&lse_a), &to_f64(&b), &to_f64(&lse_b)).unwrap();
        let (mut o, mut lse) = (a.clone(), lse_a.clone());
        merge_state_in_place(&mut o, &mut lse, &b, &lse_b).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_merge(&o, &lse, &want, c.head_dim, F32_MERGE, F32_MERGE.lse_atol, None)?;

        let mut out = vec![f32::NAN; a.len()];
        let mut lse_out = vec![f32::NAN; lse_a.len()];
        merge_state(o_a.view(), &lse_a, o_b.view(), &lse_b, (&mut out[..]).into(), &mut lse_out)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&o), bits(&out));
        prop_assert_eq!(bits(&lse), bits(&lse_out));
    }
}

/// Pinned: both sides empty gives 0 and `-inf` in every output dtype, whatever the inputs hold;
/// one side empty gives the other side unchanged.
#[test]
fn pinned_empty_sides() {
    let d = 8;
    let o_a: Vec<f32> = (0..2 * d).map(|i| i as f32 * 0.125 - 1.0).collect();
    let o_b: Vec<f32> = (0..2 * d).map(|i| 1.0 - i as f32 * 0.0625).collect();
    let lse_a = [f32::NEG_INFINITY, f32::NEG_INFINITY];
    let lse_b = [f32::NEG_INFINITY, 2.5];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut out = Buf::zeros(dtype, 2 * d);
        out.view_mut().poison();
        let mut lse = [f32::NAN; 2];
        merge_state((&o_a[..]).into(), &lse_a, (&o_b[..]).into(), &lse_b, out.view_mut(), &mut lse).unwrap();
        let out = out.to_f32();
        assert_eq!(lse[0], f32::NEG_INFINITY, "{dtype}");
        assert!(out[..d].iter().all(|&x| x == 0.0), "{dtype}: {out:?}");
        assert_eq!(lse[1], 2.5, "{dtype}");
        let b = Buf::from_f32(dtype, &o_b[d..]).to_f32();
        assert_eq!(&out[d..], &b[..], "{dtype}");
    }
    let (mut o, mut lse) = (o_a.clone(), lse_a);
    merge_state_in_place(&mut o, &mut lse, &o_b, &lse_b).unwrap();
    assert_eq!(lse, [f32::NEG_INFINITY, 2.5]);
    assert!(o[..d].iter().all(|&x| x == 0.0));
    assert_eq!(&o[d..], &o_b[d..]);
}

// ---------------------------------------------------------------------------------------------
// Composition: prefill over a split of the keys, merged, equals prefill over all of them.

/// A batch of sequences whose keys are split at `splits[b]` (0 and `kv_len` included: one side
/// then has no key at all). Non-causal: a causal mask aligns queries to the end of the keys and
/// so depends on where the keys stop; soft-cap and scale act per score and compose.
#[derive(Debug, Clone)]
struct SplitCase {
    qo_lens: Vec<usize>,
    kv_lens: Vec<usize>,
    splits: Vec<usize>,
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    q_dtype: DType,
    kv_dtype: DType,
    soft_cap: Option<f32>,
    sm_scale: Option<f32>,
    q_gain: f32,
    seed: u64,
}

fn split_case() -> impl Strategy<Value = SplitCase> {
    (
        (
            1..=3usize,
            1..=2usize,
            prop_oneof![Just(1usize), Just(2), Just(4)],
            prop_oneof![Just(8usize), Just(64), Just(72), Just(128)],
        ),
        (prop_oneof![Just(DType::F32), Just(DType::F16)], dtype()),
        (
            prop_oneof![2 => Just(None), 1 => Just(Some(5.0f32))],
            prop_oneof![2 => Just(None), 1 => (0.02f32..0.4).prop_map(Some)],
        ),
        prop_oneof![Just(1.0f32), Just(4.0)],
        any::<u64>(),
    )
        .prop_map(
            |((batch, num_kv_heads, group, head_dim), (q_dtype, kv_dtype), (soft_cap, sm_scale), q_gain, seed)| {
                let mut rng = Rng::new(seed);
                let kv_lens: Vec<usize> =
                    (0..batch).map(|_| [1, 2, 63, 64, 65, 97, 200, 1 + rng.below(300)][rng.below(8)]).collect();
                let splits = kv_lens
                    .iter()
                    .map(|&n| [0, 1, n / 2, n - 1, n, 64.min(n), rng.below(n + 1)][rng.below(7)])
                    .collect();
                let qo_lens = (0..batch).map(|_| 1 + rng.below(20)).collect();
                SplitCase {
                    qo_lens,
                    kv_lens,
                    splits,
                    num_kv_heads,
                    group,
                    head_dim,
                    q_dtype,
                    kv_dtype,
                    soft_cap,
                    sm_scale,
                    q_gain,
                    seed,
                }
            },
        )
}

fn offsets(lens: impl IntoIterator<Item = usize>) -> Vec<u32> {
    let mut v = vec![0u32];
    for l in lens {
        v.push(v[v.len() - 1] + l as u32);
    }
    v
}

/// Prefill with LSE over ragged KV on NaN-poisoned f32 outputs.
fn prefill(
    engine: &CpuEngine,
    params: &AttentionParams,
    q: &Buf,
    qo_indptr: &[u32],
    k: &Buf,
    v: &Buf,
    kv_indptr: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let rows = q.view().len() / params.head_dim;
    let mut o = vec![f32::NAN; rows * params.head_dim];
    let mut lse = vec![f32::NAN; rows];
    let input = PrefillInput { q: q.view(), qo_indptr, kv: KvInput::Ragged { k: k.view(), v: v.view(), kv_indptr } };
    engine.prefill(params, &input, &mut AttentionOutput::with_lse(&mut o[..], &mut lse[..])).unwrap();
    (o, lse)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn split_prefill_merges_to_full_prefill(c in split_case()) {
        let mut rng = Rng::new(c.seed.rotate_left(9));
        let (hk, d) = (c.num_kv_heads, c.head_dim);
        let hq = hk * c.group;
        let row = hk * d;
        let total_q: usize = c.qo_lens.iter().sum();
        let total_kv: usize = c.kv_lens.iter().sum();
        let q: Vec<f32> = (0..total_q * hq * d).map(|_| rng.uniform() * c.q_gain).collect();
        let k: Vec<f32> = (0..total_kv * row).map(|_| rng.uniform()).collect();
        let v: Vec<f32> = (0..total_kv * row).map(|_| rng.uniform()).collect();
        // The two halves of every sequence's keys, each packed as its own ragged batch.
        let (mut k_a, mut v_a, mut k_b, mut v_b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        for (&n, &a) in c.kv_lens.iter().zip(&c.splits) {
            k_a.extend_from_slice(&k[start * row..(start + a) * row]);
            v_a.extend_from_slice(&v[start * row..(start + a) * row]);
            k_b.extend_from_slice(&k[(start + a) * row..(start + n) * row]);
            v_b.extend_from_slice(&v[(start + a) * row..(start + n) * row]);
            start += n;
        }
        let params = AttentionParams::new(hq, hk, d).logits_soft_cap(c.soft_cap).sm_scale(c.sm_scale);
        let q = Buf::from_f32(c.q_dtype, &q);
        let kv = |x: &[f32]| Buf::from_f32(c.kv_dtype, x);
        let qo_indptr = offsets(c.qo_lens.iter().copied());
        let kv_indptr = offsets(c.kv_lens.iter().copied());
        let engine = CpuEngine::new();

        let full = prefill(&engine, &params, &q, &qo_indptr, &kv(&k), &kv(&v), &kv_indptr);
        let part_a = prefill(&engine, &params, &q, &qo_indptr, &kv(&k_a), &kv(&v_a), &offsets(c.splits.iter().copied()));
        let part_b = prefill(
            &engine, &params, &q, &qo_indptr, &kv(&k_b), &kv(&v_b),
            &offsets(c.kv_lens.iter().zip(&c.splits).map(|(n, a)| n - a)),
        );

        // The full pass is itself right (else two equally wrong answers could agree).
        let oracle = reference::prefill(&params, &PrefillInput {
            q: q.view(),
            qo_indptr: &qo_indptr,
            kv: KvInput::Ragged { k: kv(&k).view(), v: kv(&v).view(), kv_indptr: &kv_indptr },
        }).unwrap();
        // Prompt blocks over bf16 K/V take bf16 dot products where the CPU has them: each pass
        // then carries their roundings, so the full pass and the merge of two passes differ by up
        // to twice that bound.
        let bf16_products = c.kv_dtype == DType::BF16 && engine.level().bf16_dot();
        let slack = |times| bf16_products.then_some(Bf16Slack { oracle: &oracle, times });
        check_merge(&full.0, &full.1, &oracle, d, Tolerance::for_output(DType::F32), 5e-5, slack(1.0))?;

        let mut o = vec![f32::NAN; full.0.len()];
        let mut lse = vec![f32::NAN; full.1.len()];
        merge_state((&part_a.0[..]).into(), &part_a.1, (&part_b.0[..]).into(), &part_b.1, (&mut o[..]).into(), &mut lse)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let rows = full.1.len();
        let as_ref = RefOutput { o: to_f64(&full.0), lse: to_f64(&full.1), score_abs: vec![0.0; rows], v_abs: vec![0.0; rows] };
        check_merge(&o, &lse, &as_ref, d, F32_MERGE, 1e-5, slack(2.0))?;

        let (mut o_in, mut lse_in) = part_a.clone();
        merge_state_in_place(&mut o_in, &mut lse_in, &part_b.0, &part_b.1)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_merge(&o_in, &lse_in, &as_ref, d, F32_MERGE, 1e-5, slack(2.0))?;
    }
}

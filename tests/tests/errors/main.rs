//! Typed errors at the edge: every bad input to the public attention API is reported as the right
//! [`TwinferError`] variant, leaves the outputs untouched, and never panics.
//!
//! Each check runs through every entry point that takes the input: the `Attention` facade, the
//! `CpuEngine` directly and (for input errors) the oracle, which shares the validation.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use twinfer::cpu::{CpuEngine, SimdLevel};
use twinfer::reference;
use twinfer::{Attention, AttentionOutput, AttentionParams, DType, DecodeInput, PrefillInput, Result};
use twinfer_tests::problem::Buf;
use twinfer_tests::{Case, CaseData, KvKind, Mode};

/// The input of one attention call.
#[derive(Debug, Clone, Copy)]
enum Input<'a> {
    Prefill(PrefillInput<'a>),
    Decode(DecodeInput<'a>),
}

/// Calls every entry point that takes `input` on NaN-poisoned outputs of the given lengths, and
/// returns each result. An error must leave both outputs untouched (still NaN). The oracle does
/// not look at outputs, so it only joins when `oracle` is set (input errors).
fn call_all(
    params: &AttentionParams,
    input: Input<'_>,
    o_len: usize,
    lse_len: Option<usize>,
    oracle: bool,
) -> Vec<(&'static str, Result<()>)> {
    let facade = Attention::cpu(SimdLevel::detect());
    let engine = CpuEngine::new();
    let mut results = Vec::new();
    for who in ["Attention", "CpuEngine"] {
        let mut o = vec![f32::NAN; o_len];
        let mut lse = lse_len.map(|n| vec![f32::NAN; n]);
        let mut out = AttentionOutput { o: (&mut o[..]).into(), lse: lse.as_deref_mut() };
        let r = match (who, input) {
            ("Attention", Input::Prefill(i)) => facade.prefill(params, &i, &mut out),
            ("Attention", Input::Decode(i)) => facade.decode(params, &i, &mut out),
            (_, Input::Prefill(i)) => engine.prefill(params, &i, &mut out),
            (_, Input::Decode(i)) => engine.decode(params, &i, &mut out),
        };
        if r.is_err() {
            assert!(o.iter().all(|x| x.is_nan()), "{who} wrote o before failing with {r:?}");
            assert!(lse.iter().flatten().all(|x| x.is_nan()), "{who} wrote lse before failing with {r:?}");
        }
        results.push((who, r));
    }
    if oracle {
        let r = match input {
            Input::Prefill(i) => reference::prefill(params, &i),
            Input::Decode(i) => reference::decode(params, &i),
        };
        results.push(("oracle", r.map(|_| ())));
    }
    results
}

/// Asserts that every result is an error matching the pattern (with an optional guard).
macro_rules! assert_all_err {
    ($results:expr, $pattern:pat $(if $guard:expr)?) => {{
        let results = $results;
        assert!(!results.is_empty());
        for (who, r) in &results {
            assert!(
                matches!(r, Err($pattern) $(if $guard)?),
                "{who}: expected {}, got {r:?}",
                stringify!($pattern $(if $guard)?)
            );
        }
    }};
}

/// A small valid problem: two sequences, GQA 2, head_dim 16, page size 4, everything f32.
fn fixture(mode: Mode, kv_kind: KvKind, kv_lens: Vec<usize>) -> CaseData {
    let qo_lens = match mode {
        Mode::Prefill => kv_lens.iter().map(|&l| l.clamp(1, 3)).collect(),
        Mode::Decode => vec![1; kv_lens.len()],
    };
    CaseData::new(&Case {
        mode,
        kv_kind,
        qo_lens,
        kv_lens,
        page_size: 4,
        num_kv_heads: 2,
        group: 2,
        head_dim: 16,
        causal: mode == Mode::Prefill,
        window_left: None,
        soft_cap: None,
        alibi: false,
        sm_scale: None,
        q_dtype: DType::F32,
        kv_dtype: DType::F32,
        o_dtype: DType::F32,
        want_lse: true,
        q_gain: 1.0,
        seed: 11,
    })
}

fn prefill_fixture(kind: KvKind) -> CaseData {
    fixture(Mode::Prefill, kind, vec![5, 9])
}

fn decode_fixture() -> CaseData {
    fixture(Mode::Decode, KvKind::Paged, vec![5, 9])
}

/// Query rows times query heads of a fixture (the LSE length).
fn rows(d: &CaseData) -> usize {
    d.case.qo_lens.iter().sum::<usize>() * d.params.num_qo_heads
}

fn input(d: &CaseData) -> Input<'_> {
    match d.case.mode {
        Mode::Prefill => Input::Prefill(d.prefill_input(d.case.kv_kind)),
        Mode::Decode => Input::Decode(d.decode_input()),
    }
}

/// Runs a fixture with its own params and right-sized outputs, the oracle included.
fn call(d: &CaseData) -> Vec<(&'static str, Result<()>)> {
    call_all(&d.params, input(d), rows(d) * d.params.head_dim, Some(rows(d)), true)
}

/// Runs a fixture with other params (same buffers).
fn call_with(d: &CaseData, params: &AttentionParams) -> Vec<(&'static str, Result<()>)> {
    call_all(params, input(d), rows(d) * d.params.head_dim, Some(rows(d)), true)
}

/// The three fixtures every input-independent check runs on.
fn all_fixtures() -> Vec<CaseData> {
    vec![prefill_fixture(KvKind::Ragged), prefill_fixture(KvKind::Paged), decode_fixture()]
}

fn f32_buf(n: usize) -> Buf {
    Buf::F32((0..n).map(|i| (i as f32 * 0.37).sin()).collect())
}

// ---------------------------------------------------------------------------------------------
// The control: unmodified fixtures succeed, so each error below is caused by its one change.

#[test]
fn unmodified_fixtures_succeed_and_write_everything() {
    let mut fixtures = all_fixtures();
    fixtures.push(fixture(Mode::Decode, KvKind::Paged, vec![5, 0, 9]));
    fixtures.push(fixture(Mode::Prefill, KvKind::Paged, vec![5, 0, 9]));
    for d in &fixtures {
        let facade = Attention::cpu(SimdLevel::detect());
        let mut o = vec![f32::NAN; rows(d) * d.params.head_dim];
        let mut lse = vec![f32::NAN; rows(d)];
        let mut out = AttentionOutput::with_lse(&mut o[..], &mut lse[..]);
        match input(d) {
            Input::Prefill(i) => facade.prefill(&d.params, &i, &mut out),
            Input::Decode(i) => facade.decode(&d.params, &i, &mut out),
        }
        .unwrap();
        let want = d.reference();
        d.check(&o, Some(&lse), &want).unwrap();
        for (who, r) in call(d) {
            assert!(r.is_ok(), "{who}: {r:?} on {:?}", d.case);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checks, by responsibility.

mod fuzz;
mod inputs;
mod params;
mod parts;

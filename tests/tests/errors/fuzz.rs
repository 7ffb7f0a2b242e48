//! Fuzz: random, mostly invalid, CSR arrays and lengths. Any answer is fine except a panic; an Ok
//! must have written every output element.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use twinfer::cpu::SimdLevel;
use twinfer::kv::{KvLayout, PageTable, PagedKv};
use twinfer::reference;
use twinfer::{Attention, AttentionOutput, AttentionParams, DType, DecodeInput, KvInput, PrefillInput};
use twinfer_tests::problem::Buf;
use twinfer_tests::rng::Rng;

/// Property cases per test: `TWINFER_TEST_CASES` (emulated targets use fewer), 32 by default.
fn cases() -> u32 {
    option_env!("TWINFER_TEST_CASES").and_then(|s| s.parse().ok()).unwrap_or(32)
}

/// Runs `f`, turning a panic into an error on native targets (wasm32 cannot unwind: a panic
/// there fails the test directly).
fn no_panic<R>(f: impl FnOnce() -> R) -> std::result::Result<R, String> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into())
        })
    }
    #[cfg(target_arch = "wasm32")]
    {
        Ok(f())
    }
}

/// A CSR offsets array over `lens`.
fn offsets(lens: &[usize]) -> Vec<u32> {
    let mut v = vec![0u32];
    for &l in lens {
        v.push(v[v.len() - 1] + l as u32);
    }
    v
}

/// Perturbs one element or the length of `xs`.
fn mutate_u32(rng: &mut Rng, xs: &mut Vec<u32>) {
    match rng.below(6) {
        0 => xs.push(rng.below(20) as u32),
        1 => {
            xs.pop();
        }
        2 if !xs.is_empty() => {
            let i = rng.below(xs.len());
            xs[i] = xs[i].wrapping_add(1);
        }
        3 if !xs.is_empty() => {
            let i = rng.below(xs.len());
            xs[i] = xs[i].wrapping_sub(1);
        }
        4 if !xs.is_empty() => {
            let i = rng.below(xs.len());
            xs[i] = [0, 1, u32::MAX, u32::MAX / 2, rng.below(64) as u32][rng.below(5)];
        }
        _ => xs.clear(),
    }
}

fn mutate_len(rng: &mut Rng, n: usize, row: usize) -> usize {
    match rng.below(5) {
        0 => n + 1,
        1 => n.saturating_sub(1),
        2 => n + row,
        3 => n.saturating_sub(row),
        _ => rng.below(2 * n + 2),
    }
}

/// Returns how many of the attention calls succeeded.
fn fuzz_once(seed: u64, mutations: usize) -> std::result::Result<usize, String> {
    let mut rng = Rng::new(seed);
    let hk = [1, 2, 0, 3][rng.below(4)];
    let hq = hk * [1, 2, 4][rng.below(3)] + usize::from(rng.below(6) == 0);
    let head_dim = [8, 16, 0, 12, 264][rng.below(5).min(rng.below(5))];
    let page_size = [1, 3, 4, 16, 0, 257][rng.below(6).min(rng.below(6))];
    let batch = rng.below(4);
    let kv_lens: Vec<usize> = (0..batch).map(|_| rng.below(12)).collect();
    let qo_lens: Vec<usize> = (0..batch).map(|_| rng.below(5)).collect();
    let pages: Vec<usize> = kv_lens.iter().map(|&l| if page_size == 0 { 0 } else { l.div_ceil(page_size) }).collect();
    let num_pages = pages.iter().sum::<usize>() + rng.below(3);

    let (mut qo_indptr, mut kv_indptr, mut page_indptr) = (offsets(&qo_lens), offsets(&kv_lens), offsets(&pages));
    let mut indices: Vec<u32> = (0..pages.iter().sum::<usize>()).map(|_| rng.below(num_pages) as u32).collect();
    let mut last_page_len: Vec<u32> =
        kv_lens.iter().map(|&l| if l == 0 || page_size == 0 { 0 } else { ((l - 1) % page_size + 1) as u32 }).collect();
    let total_q: usize = qo_lens.iter().sum();
    let total_kv: usize = kv_lens.iter().sum();
    let (q_row, kv_row) = (hq * head_dim, hk * head_dim);
    let mut lens = [
        total_q * q_row,                // prefill q
        batch * q_row,                  // decode q
        total_kv * kv_row,              // ragged k
        total_kv * kv_row,              // ragged v
        num_pages * page_size * kv_row, // k pool
        num_pages * page_size * kv_row, // v pool
        total_q * q_row,                // prefill o
        total_q * hq,                   // prefill lse
        batch * q_row,                  // decode o
        batch * hq,                     // decode lse
    ];
    let rows = [q_row, q_row, kv_row, kv_row, kv_row, kv_row, q_row, hq, q_row, hq];
    let mut v_dtype = DType::F32;
    for _ in 0..mutations {
        match rng.below(9) {
            0 => mutate_u32(&mut rng, &mut qo_indptr),
            1 => mutate_u32(&mut rng, &mut kv_indptr),
            2 => mutate_u32(&mut rng, &mut page_indptr),
            3 => mutate_u32(&mut rng, &mut indices),
            4 => mutate_u32(&mut rng, &mut last_page_len),
            5 => v_dtype = DType::F16,
            _ => {
                let i = rng.below(lens.len());
                lens[i] = mutate_len(&mut rng, lens[i], rows[i].max(1));
            }
        }
    }
    let params = AttentionParams::new(hq, hk, head_dim)
        .causal(rng.below(2) == 0)
        .window_left([None, Some(0), Some(3), Some(usize::MAX)][rng.below(4)]);
    let buf = |n: usize, rng: &mut Rng| -> Vec<f32> { (0..n).map(|_| rng.uniform()).collect() };
    let (q, q_dec, k, v, k_pool, v_pool) = (
        buf(lens[0], &mut rng),
        buf(lens[1], &mut rng),
        buf(lens[2], &mut rng),
        Buf::from_f32(v_dtype, &buf(lens[3], &mut rng)),
        buf(lens[4], &mut rng),
        Buf::from_f32(v_dtype, &buf(lens[5], &mut rng)),
    );
    // Skip `PagedKv::new` half of the time: the calls must re-check a hand-built view.
    let layout = KvLayout { page_size, num_kv_heads: hk, head_dim };
    let pool = if rng.below(2) == 0 {
        Some(PagedKv { k: (&k_pool[..]).into(), v: v_pool.view(), layout })
    } else {
        no_panic(|| PagedKv::new((&k_pool[..]).into(), v_pool.view(), layout))
            .map_err(|e| format!("PagedKv::new panicked: {e}"))?
            .ok()
    };
    let table = PageTable::new(&page_indptr, &indices, &last_page_len);
    let _ =
        no_panic(|| table.validate(page_size, num_pages)).map_err(|e| format!("PageTable::validate panicked: {e}"))?;
    let _ = no_panic(|| KvLayout::new(page_size, hk, head_dim)).map_err(|e| format!("KvLayout::new panicked: {e}"))?;

    let ragged = KvInput::Ragged { k: (&k[..]).into(), v: v.view(), kv_indptr: &kv_indptr };
    let mut kvs = vec![("ragged prefill", ragged)];
    if let Some(kv) = pool {
        kvs.push(("paged prefill", KvInput::Paged { kv, table }));
    }
    let facade = Attention::cpu(SimdLevel::detect());
    let mut succeeded = 0;
    for (what, kv) in kvs {
        let input = PrefillInput { q: (&q[..]).into(), qo_indptr: &qo_indptr, kv };
        let mut o = vec![f32::NAN; lens[6]];
        let mut lse = vec![f32::NAN; lens[7]];
        let r = no_panic(|| facade.prefill(&params, &input, &mut AttentionOutput::with_lse(&mut o[..], &mut lse[..])))
            .map_err(|e| format!("{what} panicked: {e}"))?;
        if r.is_ok() && o.iter().chain(&lse).any(|x| x.is_nan()) {
            return Err(format!("{what} returned Ok but left NaN in its output"));
        }
        succeeded += usize::from(r.is_ok());
        let _ = no_panic(|| reference::prefill(&params, &input)).map_err(|e| format!("oracle {what} panicked: {e}"))?;
    }
    if let Some(kv) = pool {
        let input = DecodeInput { q: (&q_dec[..]).into(), kv, table };
        let mut o = vec![f32::NAN; lens[8]];
        let mut lse = vec![f32::NAN; lens[9]];
        let r = no_panic(|| facade.decode(&params, &input, &mut AttentionOutput::with_lse(&mut o[..], &mut lse[..])))
            .map_err(|e| format!("decode panicked: {e}"))?;
        if r.is_ok() && o.iter().chain(&lse).any(|x| x.is_nan()) {
            return Err("decode returned Ok but left NaN in its output".into());
        }
        succeeded += usize::from(r.is_ok());
        let _ = no_panic(|| reference::decode(&params, &input)).map_err(|e| format!("oracle decode panicked: {e}"))?;
    }
    Ok(succeeded)
}

proptest! {
    // Seeds persist next to this file (`fuzz.proptest-regressions`). The default looks up the tree for a
    // `main.rs`, finds this test's, and would use `../proptest-regressions/fuzz.txt` instead.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::with_cases(cases() * 8)
    })]

    /// Random, often invalid, CSR arrays, page ids, last-page lengths, buffer lengths, head
    /// shapes and page sizes: every call returns Ok or Err, never panics, and an Ok writes
    /// every output element.
    #[test]
    fn fuzz_never_panics(seed in any::<u64>(), mutations in 0..4usize) {
        fuzz_once(seed, mutations).map_err(TestCaseError::fail)?;
    }
}

/// The fuzz's own control: unmutated inputs with valid shapes succeed, so the property above
/// reaches the kernels and not only the validation.
#[test]
fn fuzz_reaches_the_kernels() {
    let succeeded: usize = (0..64).map(|seed| fuzz_once(seed, 0).unwrap()).sum();
    // 64 seeds x 3 calls; about half of the seeds draw valid heads, head_dim and page size.
    assert!(succeeded >= 48, "only {succeeded} of 192 unmutated calls succeeded");
}

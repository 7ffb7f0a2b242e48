//! The inputs and outputs of a call: query rows and their offsets, ragged KV, paged KV (the page
//! table, the pool view and their agreement with the params) and the output buffers.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use super::*;
use twinfer::kv::{KvLayout, PagedKv};
use twinfer::{KvInput, TensorRef, TwinferError, f16};

// ---------------------------------------------------------------------------------------------
// Query rows and their CSR offsets.

#[test]
fn q_length_not_a_multiple_of_a_row() {
    for kind in [KvKind::Ragged, KvKind::Paged] {
        let mut d = prefill_fixture(kind);
        let n = d.q.view().len();
        for len in [n + 1, n - 1, 7] {
            d.q = f32_buf(len);
            assert_all_err!(call(&d), TwinferError::ShapeMismatch { what, got, .. } if what.starts_with("q ") && *got == len);
        }
    }
    let mut d = decode_fixture();
    let n = d.q.view().len();
    let row = d.params.num_qo_heads * d.params.head_dim;
    for len in [n + 1, n - 1, n + row, 0] {
        d.q = f32_buf(len);
        assert_all_err!(
            call(&d),
            TwinferError::ShapeMismatch { what, expected, got } if what.starts_with("q ") && *expected == n && *got == len
        );
    }
}

#[test]
fn qo_indptr_invalid() {
    for kind in [KvKind::Ragged, KvKind::Paged] {
        let d = prefill_fixture(kind);
        let total = d.qo_indptr[d.qo_indptr.len() - 1];
        assert_eq!(d.qo_indptr.len(), 3);
        let cases: [(Vec<u32>, usize); 5] = [
            (vec![1, 3, total], 0),         // does not start at 0
            (vec![0, total + 1, total], 2), // decreases
            (vec![0, 2, total - 1], 2),     // ends short of the queries
            (vec![0, 2, total + 1], 2),     // ends past them
            (vec![], 0),                    // empty
        ];
        for (indptr, position) in cases {
            let mut d = d.clone();
            d.qo_indptr = indptr.clone();
            assert_all_err!(
                call(&d),
                TwinferError::IndptrInvalid { what: "qo_indptr", position: p, end } if *p == position && *end == total as usize
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ragged KV.

#[test]
fn ragged_kv_indptr_wrong_length_or_invalid() {
    let d = prefill_fixture(KvKind::Ragged);
    let total = *d.kv_indptr.last().unwrap();
    for indptr in [vec![0, total], vec![0, 5, 9, total], vec![]] {
        let mut d = d.clone();
        d.kv_indptr = indptr.clone();
        assert_all_err!(
            call(&d),
            TwinferError::ShapeMismatch { what: "kv_indptr (batch + 1)", expected: 3, got } if *got == indptr.len()
        );
    }
    for (indptr, position) in [(vec![2, 5, total], 0), (vec![0, total, 5], 2)] {
        let mut d = d.clone();
        d.kv_indptr = indptr;
        assert_all_err!(call(&d), TwinferError::IndptrInvalid { what: "kv_indptr", position: p, .. } if *p == position);
    }
}

#[test]
fn ragged_k_v_length_mismatch() {
    let d = prefill_fixture(KvKind::Ragged);
    let n = d.k.view().len();
    let row = d.params.num_kv_heads * d.params.head_dim;
    for len in [n + 1, n - 1, n + row, n - row, 0] {
        let mut dk = d.clone();
        dk.k = f32_buf(len);
        assert_all_err!(call(&dk), TwinferError::ShapeMismatch { what, expected, got } if what.starts_with("k ") && *expected == n && *got == len);
        let mut dv = d.clone();
        dv.v = f32_buf(len);
        assert_all_err!(call(&dv), TwinferError::ShapeMismatch { what, expected, got } if what.starts_with("v ") && *expected == n && *got == len);
    }
    // The indptr promises more keys than k holds.
    let mut d = d.clone();
    *d.kv_indptr.last_mut().unwrap() += 1;
    assert_all_err!(call(&d), TwinferError::ShapeMismatch { what, .. } if what.starts_with("k "));
}

#[test]
fn ragged_k_v_dtype_mismatch() {
    let d = prefill_fixture(KvKind::Ragged);
    for (k_dtype, v_dtype) in [(DType::F32, DType::F16), (DType::F16, DType::BF16), (DType::BF16, DType::F32)] {
        let mut d = d.clone();
        d.k = Buf::from_f32(k_dtype, &d.k.to_f32());
        d.v = Buf::from_f32(v_dtype, &d.v.to_f32());
        assert_all_err!(
            call(&d),
            TwinferError::DtypeMismatch { expected, got, .. } if *expected == k_dtype && *got == v_dtype
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Paged KV: the page table, the pool view and their agreement with the params.

/// The paged fixtures (prefill and decode) the page-table checks run on.
fn paged_fixtures() -> Vec<CaseData> {
    vec![prefill_fixture(KvKind::Paged), decode_fixture()]
}

#[test]
fn page_index_out_of_range() {
    for d in paged_fixtures() {
        let num_pages = d.paged().num_pages();
        for (position, page) in [(0, num_pages as u32), (2, num_pages as u32 + 7), (1, u32::MAX)] {
            let mut d = d.clone();
            d.page_indices[position] = page;
            assert_all_err!(
                call(&d),
                TwinferError::PageIndexOutOfRange { position: p, page: g, num_pages: n }
                    if (*p, *g, *n) == (position, page, num_pages)
            );
        }
    }
}

#[test]
fn last_page_len_out_of_range() {
    for d in paged_fixtures() {
        for (seq, value) in [(0, 0), (1, 0), (0, 5), (1, 4 + 1), (1, u32::MAX)] {
            let mut d = d.clone();
            d.last_page_len[seq] = value;
            assert_all_err!(
                call(&d),
                TwinferError::LastPageLenOutOfRange { seq: s, value: v, page_size: 4 } if (*s, *v) == (seq, value)
            );
        }
    }
    // A sequence with no pages must say 0.
    for mode in [Mode::Prefill, Mode::Decode] {
        let mut d = fixture(mode, KvKind::Paged, vec![5, 0, 9]);
        assert_eq!(d.last_page_len[1], 0);
        d.last_page_len[1] = 1;
        assert_all_err!(call(&d), TwinferError::LastPageLenOutOfRange { seq: 1, value: 1, .. });
    }
}

#[test]
fn last_page_len_wrong_length() {
    for d in paged_fixtures() {
        for len in [0, 1, 3] {
            let mut d = d.clone();
            d.last_page_len.resize(len, 1);
            assert_all_err!(
                call(&d),
                TwinferError::ShapeMismatch { what: "kv_last_page_len", expected: 2, got } if *got == len
            );
        }
    }
}

#[test]
fn page_indptr_invalid() {
    for d in paged_fixtures() {
        let end = d.page_indices.len() as u32;
        for (indptr, position) in [
            (vec![1, 2, end], 0),
            (vec![0, end, 2], 2),
            (vec![0, 2, end - 1], 2),
            (vec![0, 2, end + 1], 2),
            (vec![], 0),
        ] {
            let mut d = d.clone();
            d.page_indptr = indptr;
            assert_all_err!(call(&d), TwinferError::IndptrInvalid { what: "kv_indptr", position: p, .. } if *p == position);
        }
    }
}

/// The page table must have one entry per query sequence (prefill).
#[test]
fn paged_prefill_table_batch_mismatch() {
    let d = prefill_fixture(KvKind::Paged);
    let mut short = d.clone();
    let first = short.page_indptr[1];
    short.page_indptr.truncate(2);
    short.page_indices.truncate(first as usize);
    short.last_page_len.truncate(1);
    assert_all_err!(call(&short), TwinferError::ShapeMismatch { what: "kv_indptr (batch + 1)", expected: 3, got: 2 });
}

#[test]
fn paged_kv_heads_or_head_dim_disagree_with_params() {
    for d in paged_fixtures() {
        let (hq, hk, dim) = (d.params.num_qo_heads, d.params.num_kv_heads, d.params.head_dim);
        // Params with one KV head (a valid ratio) against a pool laid out for two.
        let p = AttentionParams::new(hq, 1, dim).causal(d.params.causal);
        assert_all_err!(
            call_with(&d, &p),
            TwinferError::ShapeMismatch { what: "paged KV num_kv_heads", expected: 1, got } if *got == hk
        );
        // A pool laid out with another head_dim, the same total size.
        let layout = KvLayout::new(d.layout.page_size, hk * 2, dim / 2).unwrap();
        let kv = PagedKv::new(d.k_pool.view(), d.v_pool.view(), layout).unwrap();
        let input = match input(&d) {
            Input::Prefill(i) => Input::Prefill(PrefillInput { kv: KvInput::Paged { kv, table: d.table() }, ..i }),
            Input::Decode(i) => Input::Decode(DecodeInput { kv, ..i }),
        };
        let p = AttentionParams::new(hq, hk * 2, dim).causal(d.params.causal);
        let results = call_all(&p, input, rows(&d) * dim, Some(rows(&d)), true);
        assert_all_err!(
            results,
            TwinferError::ShapeMismatch { what: "paged KV head_dim", expected, got } if *expected == dim && *got == dim / 2
        );
    }
}

/// Pinned: the view's fields are public, so a hand-built `PagedKv` (skipping `PagedKv::new`) with a bad
/// layout or mismatched pools must be rejected by the call, not read out of bounds.
#[test]
fn pinned_hand_built_paged_kv_is_revalidated() {
    for d in paged_fixtures() {
        let good = d.paged();
        let (k, v) = (d.k_pool.view(), d.v_pool.view());
        let half_v = match &d.v_pool {
            Buf::F32(x) => TensorRef::F32(&x[..x.len() / 2]),
            _ => unreachable!("the fixture is f32"),
        };
        let v16: Vec<f16> = d.v_pool.to_f32().iter().map(|&x| f16::from_f32(x)).collect();
        let bad: [(PagedKv<'_>, &str); 5] = [
            (PagedKv { layout: KvLayout { page_size: 0, ..good.layout }, ..good }, "page_size 0"),
            (PagedKv { layout: KvLayout { page_size: 257, ..good.layout }, ..good }, "page_size 257"),
            (PagedKv { k, v: half_v, layout: good.layout }, "v shorter than k"),
            (PagedKv { k: half_v, v, layout: good.layout }, "k shorter than v"),
            (PagedKv { k, v: TensorRef::F16(&v16), layout: good.layout }, "dtypes differ"),
        ];
        for (kv, why) in bad {
            let input = match input(&d) {
                Input::Prefill(i) => Input::Prefill(PrefillInput { kv: KvInput::Paged { kv, table: d.table() }, ..i }),
                Input::Decode(i) => Input::Decode(DecodeInput { kv, ..i }),
            };
            let results = call_all(&d.params, input, rows(&d) * d.params.head_dim, Some(rows(&d)), true);
            for (who, r) in &results {
                let ok = match why {
                    "page_size 0" => matches!(r, Err(TwinferError::PageSizeUnsupported { page_size: 0 })),
                    "page_size 257" => matches!(r, Err(TwinferError::PageSizeUnsupported { page_size: 257 })),
                    "dtypes differ" => matches!(r, Err(TwinferError::DtypeMismatch { .. })),
                    _ => {
                        matches!(r, Err(TwinferError::ShapeMismatch { .. } | TwinferError::PageIndexOutOfRange { .. }))
                    }
                };
                assert!(ok, "{who}, {why}: {r:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outputs.

#[test]
fn output_wrong_length() {
    for d in all_fixtures() {
        let (r, dim) = (rows(&d), d.params.head_dim);
        for o_len in [0, r * dim - 1, r * dim + 1, r * dim + dim] {
            assert_all_err!(
                call_all(&d.params, input(&d), o_len, Some(r), false),
                TwinferError::ShapeMismatch { what, expected, got } if what.starts_with("o ") && *expected == r * dim && *got == o_len
            );
        }
        for lse_len in [0, r - 1, r + 1, r * dim] {
            assert_all_err!(
                call_all(&d.params, input(&d), r * dim, Some(lse_len), false),
                TwinferError::ShapeMismatch { what, expected, got } if what.starts_with("lse ") && *expected == r && *got == lse_len
            );
        }
        // Without LSE the right o is enough.
        assert!(call_all(&d.params, input(&d), r * dim, None, false).iter().all(|(_, r)| r.is_ok()));
    }
}

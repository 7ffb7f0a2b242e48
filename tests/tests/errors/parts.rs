//! The building blocks on their own: `KvLayout::new`, `PagedKv::new`, `PageTable::validate`,
//! `merge_state` and `merge_state_in_place`.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use twinfer::kv::{KvLayout, PageTable, PagedKv};
use twinfer::{DType, Result, TwinferError, f16, merge_state, merge_state_in_place};

#[test]
fn kv_layout_new_rejects_bad_shapes() {
    for page_size in [0, 257, 1024] {
        assert!(
            matches!(KvLayout::new(page_size, 2, 64), Err(TwinferError::PageSizeUnsupported { page_size: p }) if p == page_size)
        );
    }
    for head_dim in [0, 12, 264, 1] {
        assert!(
            matches!(KvLayout::new(16, 2, head_dim), Err(TwinferError::HeadDimUnsupported { head_dim: h }) if h == head_dim)
        );
    }
    assert!(matches!(KvLayout::new(16, 0, 64), Err(TwinferError::InvalidParameter(_))));
    // A page whose element count overflows usize.
    assert!(matches!(KvLayout::new(256, usize::MAX / 64, 256), Err(TwinferError::InvalidParameter(_))));
    for (page_size, heads, head_dim) in [(1, 1, 8), (256, 8, 256), (3, 5, 72)] {
        let l = KvLayout::new(page_size, heads, head_dim).unwrap();
        assert_eq!(l.page_elems(), page_size * heads * head_dim);
    }
}

#[test]
fn paged_kv_new_rejects_bad_pools() {
    let layout = KvLayout::new(4, 2, 16).unwrap();
    let page = layout.page_elems();
    let k = vec![0.5f32; 3 * page];
    let v16 = vec![f16::ONE; 3 * page];
    assert!(matches!(
        PagedKv::new((&k[..]).into(), (&v16[..]).into(), layout),
        Err(TwinferError::DtypeMismatch { expected: DType::F32, got: DType::F16, .. })
    ));
    for len in [page - 1, 3 * page + 1, 1] {
        let k = vec![0.5f32; len];
        assert!(matches!(
            PagedKv::new((&k[..]).into(), (&k[..]).into(), layout),
            Err(TwinferError::ShapeMismatch { got, .. }) if got == len
        ));
    }
    let v = vec![0.5f32; 2 * page];
    assert!(matches!(
        PagedKv::new((&k[..]).into(), (&v[..]).into(), layout),
        Err(TwinferError::ShapeMismatch { what: "paged V", expected, got }) if expected == 3 * page && got == 2 * page
    ));
    // Hand-built layouts (the fields are public) are checked too.
    let hand_built = |bad: KvLayout| PagedKv::new((&k[..]).into(), (&k[..]).into(), bad);
    let r = hand_built(KvLayout { page_size: 0, ..layout });
    assert!(matches!(r, Err(TwinferError::PageSizeUnsupported { page_size: 0 })), "{r:?}");
    let r = hand_built(KvLayout { head_dim: 0, ..layout });
    assert!(matches!(r, Err(TwinferError::HeadDimUnsupported { head_dim: 0 })), "{r:?}");
    let r = hand_built(KvLayout { num_kv_heads: 0, ..layout });
    assert!(matches!(r, Err(TwinferError::InvalidParameter(_))), "{r:?}");
    let pool = PagedKv::new((&k[..]).into(), (&k[..]).into(), layout).unwrap();
    assert_eq!(pool.num_pages(), 3);
}

#[test]
fn page_table_validate_reports_each_invariant() {
    // Two sequences: 2 pages (5 tokens) and 3 pages (9 tokens) of size 4, in a pool of 6.
    let (indptr, indices, last) = (vec![0u32, 2, 5], vec![5u32, 0, 3, 1, 2], vec![1u32, 1]);
    let t = |i: &[u32], x: &[u32], l: &[u32]| PageTable::new(i, x, l).validate(4, 6);
    assert_eq!(t(&indptr, &indices, &last), Ok(()));
    assert_eq!(PageTable::new(&indptr, &indices, &last).kv_len(1, 4), 9);
    assert!(matches!(t(&[], &indices, &last), Err(TwinferError::IndptrInvalid { position: 0, .. })));
    assert!(matches!(t(&[1, 2, 5], &indices, &last), Err(TwinferError::IndptrInvalid { position: 0, .. })));
    assert!(matches!(t(&[0, 3, 2], &indices, &last), Err(TwinferError::IndptrInvalid { position: 2, .. })));
    assert!(matches!(t(&[0, 2, 4], &indices, &last), Err(TwinferError::IndptrInvalid { position: 2, end: 5, .. })));
    assert!(matches!(t(&indptr, &indices, &[1]), Err(TwinferError::ShapeMismatch { expected: 2, got: 1, .. })));
    assert!(matches!(
        t(&indptr, &[5, 0, 6, 1, 2], &last),
        Err(TwinferError::PageIndexOutOfRange { position: 2, page: 6, num_pages: 6 })
    ));
    assert!(matches!(
        t(&indptr, &indices, &[0, 1]),
        Err(TwinferError::LastPageLenOutOfRange { seq: 0, value: 0, page_size: 4 })
    ));
    assert!(matches!(
        t(&indptr, &indices, &[4, 5]),
        Err(TwinferError::LastPageLenOutOfRange { seq: 1, value: 5, page_size: 4 })
    ));
    // An empty sequence must have last_page_len 0.
    assert_eq!(t(&[0, 2, 2, 5], &indices, &[4, 0, 1]), Ok(()));
    assert!(matches!(
        t(&[0, 2, 2, 5], &indices, &[4, 1, 1]),
        Err(TwinferError::LastPageLenOutOfRange { seq: 1, value: 1, .. })
    ));
    // An empty batch is valid.
    assert_eq!(t(&[0], &[], &[]), Ok(()));
}

#[test]
fn merge_state_rejects_bad_shapes() {
    let (rows, d) = (3, 8);
    let o = vec![0.5f32; rows * d];
    let lse = vec![0.0f32; rows];
    let call = |o_a: &[f32], lse_a: &[f32], o_b: &[f32], lse_b: &[f32], o_len: usize, lse_len: usize| {
        let mut out = vec![f32::NAN; o_len];
        let mut lse_out = vec![f32::NAN; lse_len];
        let r = merge_state(o_a.into(), lse_a, o_b.into(), lse_b, (&mut out[..]).into(), &mut lse_out);
        if r.is_err() {
            assert!(out.iter().chain(&lse_out).all(|x| x.is_nan()), "merge_state wrote before failing: {r:?}");
        }
        r
    };
    assert_eq!(call(&o, &lse, &o, &lse, rows * d, rows), Ok(()));
    let shape = |r: Result<()>, name: &str| {
        assert!(matches!(&r, Err(TwinferError::ShapeMismatch { what, .. }) if what.starts_with(name)), "{name}: {r:?}")
    };
    shape(call(&o, &lse, &o, &lse[..2], rows * d, rows), "lse_b");
    shape(call(&o, &lse, &o, &lse, rows * d, rows + 1), "lse_out");
    shape(call(&o[..rows * d - 1], &lse, &o, &lse, rows * d, rows), "o_a");
    shape(call(&o, &lse, &o[..rows * d - d], &lse, rows * d, rows), "o_b");
    shape(call(&o, &lse, &o, &lse, rows * d + d, rows), "o_out");
    shape(call(&o, &[], &o, &[], rows * d, 0), "o_a");
    assert!(matches!(call(&[], &lse, &[], &lse, 0, rows), Err(TwinferError::InvalidParameter(_))));
    assert_eq!(call(&[], &[], &[], &[], 0, 0), Ok(()));
    // Mixed input dtypes are allowed; a short f16 input is still a shape error.
    let o16 = vec![f16::ONE; rows * d - 1];
    let mut out = vec![f32::NAN; rows * d];
    let mut lse_out = vec![f32::NAN; rows];
    let r = merge_state((&o[..]).into(), &lse, (&o16[..]).into(), &lse, (&mut out[..]).into(), &mut lse_out);
    assert!(matches!(r, Err(TwinferError::ShapeMismatch { what: "o_b", .. })), "{r:?}");
}

#[test]
fn merge_state_in_place_rejects_bad_shapes() {
    let (rows, d) = (3, 8);
    let call = |o_len: usize, lse_len: usize, other_len: usize, lse_other_len: usize| {
        let mut o = vec![f32::NAN; o_len];
        let mut lse = vec![f32::NAN; lse_len];
        let r = merge_state_in_place(&mut o, &mut lse, &vec![0.5; other_len], &vec![0.0; lse_other_len]);
        if r.is_err() {
            assert!(o.iter().chain(&lse).all(|x| x.is_nan()), "merge_state_in_place wrote before failing: {r:?}");
        }
        r
    };
    let shape = |r: Result<()>, name: &str| {
        assert!(matches!(&r, Err(TwinferError::ShapeMismatch { what, .. }) if what.starts_with(name)), "{name}: {r:?}")
    };
    assert_eq!(call(rows * d, rows, rows * d, rows), Ok(()));
    shape(call(rows * d, rows, rows * d, rows - 1), "lse_other");
    shape(call(rows * d, rows, rows * d + 1, rows), "o_other");
    shape(call(rows * d + 1, rows, rows * d + 1, rows), "o ");
    shape(call(rows * d, 0, rows * d, 0), "o");
    // head_dim 0 is an error here as in merge_state.
    assert!(matches!(call(0, rows, 0, rows), Err(TwinferError::InvalidParameter(_))));
    assert_eq!(call(0, 0, 0, 0), Ok(()));
}

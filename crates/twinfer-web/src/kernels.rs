//! The attention kernels on their own: batch paged decode and ragged prefill over f32 arrays,
//! for callers that bring their own model (and for the page-level kernel benchmark).

use std::sync::OnceLock;

use twinfer::{
    Attention, AttentionOutput, AttentionParams, Backend, DecodeInput, KvInput, KvLayout, PageTable, PagedKv,
    PrefillInput, TensorRef, TwinferError,
};
use wasm_bindgen::prelude::*;

use crate::errors::to_js_error;
use crate::install_panic_hook;

/// Batch decode, one query token per sequence, against a paged KV pool (f32).
///
/// - `q`: `[batch, num_qo_heads, head_dim]`
/// - `k_pool`, `v_pool`: `[num_pages, page_size, num_kv_heads, head_dim]`
/// - `kv_indptr` `[batch + 1]`, `kv_indices`, `kv_last_page_len` `[batch]`: the CSR page table
///
/// Returns `o`, `[batch, num_qo_heads, head_dim]`. Scale `1 / sqrt(head_dim)`, no mask.
#[wasm_bindgen]
pub fn decode(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    page_size: usize,
    num_qo_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    kv_indptr: &[u32],
    kv_indices: &[u32],
    kv_last_page_len: &[u32],
) -> Result<Vec<f32>, js_sys::Error> {
    let shape = Heads { num_qo_heads, num_kv_heads, head_dim };
    let table = PageTable::new(kv_indptr, kv_indices, kv_last_page_len);
    decode_f32(q, k_pool, v_pool, page_size, shape, table).map_err(to_js_error)
}

/// Batch prefill over ragged contiguous KV (f32).
///
/// - `q`: `[qo_indptr[batch], num_qo_heads, head_dim]`; `qo_indptr`: `[batch + 1]`
/// - `k`, `v`: `[kv_indptr[batch], num_kv_heads, head_dim]`; `kv_indptr`: `[batch + 1]`
/// - `causal`: causal mask aligned bottom-right (query `i` of `n` sees keys up to `i + kv_len - n`)
///
/// Returns `o`, shaped like `q`. Scale `1 / sqrt(head_dim)`.
#[wasm_bindgen]
pub fn prefill(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qo_indptr: &[u32],
    kv_indptr: &[u32],
    num_qo_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Result<Vec<f32>, js_sys::Error> {
    let shape = Heads { num_qo_heads, num_kv_heads, head_dim };
    prefill_f32(q, k, v, qo_indptr, kv_indptr, shape, causal).map_err(to_js_error)
}

/// Head configuration of a call.
#[derive(Debug, Clone, Copy)]
struct Heads {
    num_qo_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// The CPU engine of the kernel calls, chosen once on first use (which also installs the panic hook).
pub(crate) fn engine() -> twinfer::Result<&'static Attention> {
    static ENGINE: OnceLock<twinfer::Result<Attention>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            install_panic_hook();
            Attention::new(Backend::Cpu)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn decode_f32(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    page_size: usize,
    heads: Heads,
    table: PageTable<'_>,
) -> twinfer::Result<Vec<f32>> {
    checked_sizes(heads, page_size, &[table.indptr.len().saturating_sub(1)])?;
    let layout = KvLayout::new(page_size, heads.num_kv_heads, heads.head_dim)?;
    let kv = PagedKv::new(TensorRef::F32(k_pool), TensorRef::F32(v_pool), layout)?;
    let params = AttentionParams::new(heads.num_qo_heads, heads.num_kv_heads, heads.head_dim);
    // A valid `q` has exactly as many elements as `o`; a wrong one is rejected before any write.
    let mut o = vec![0.0f32; q.len()];
    let input = DecodeInput { q: TensorRef::F32(q), kv, table };
    engine()?.decode(&params, &input, &mut AttentionOutput::new(&mut o[..]))?;
    Ok(o)
}

fn prefill_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qo_indptr: &[u32],
    kv_indptr: &[u32],
    heads: Heads,
    causal: bool,
) -> twinfer::Result<Vec<f32>> {
    let last = |p: &[u32]| p.last().map_or(0, |&x| x as usize);
    checked_sizes(heads, 1, &[last(qo_indptr), last(kv_indptr)])?;
    let params = AttentionParams::new(heads.num_qo_heads, heads.num_kv_heads, heads.head_dim).causal(causal);
    let mut o = vec![0.0f32; q.len()];
    let input = PrefillInput {
        q: TensorRef::F32(q),
        qo_indptr,
        kv: KvInput::Ragged { k: TensorRef::F32(k), v: TensorRef::F32(v), kv_indptr },
    };
    engine()?.prefill(&params, &input, &mut AttentionOutput::new(&mut o[..]))?;
    Ok(o)
}

/// Rejects head counts whose element counts overflow `usize` (32 bits in wasm): the core multiplies
/// `rows * heads * head_dim` and `page_size * heads * head_dim` unchecked, and a product that wraps
/// could pass its length checks. `rows` are the row counts (batch, tokens) the call will address.
fn checked_sizes(heads: Heads, page_size: usize, rows: &[usize]) -> twinfer::Result<()> {
    let too_big = || {
        TwinferError::InvalidParameter(format!(
            "num_qo_heads {} / num_kv_heads {} x head_dim {} (x page_size {page_size}, x rows {rows:?}) \
             overflows the address space",
            heads.num_qo_heads, heads.num_kv_heads, heads.head_dim
        ))
    };
    let widest = heads.num_qo_heads.max(heads.num_kv_heads);
    let row = widest.checked_mul(heads.head_dim).ok_or_else(too_big)?;
    row.checked_mul(page_size).ok_or_else(too_big)?;
    for &r in rows {
        row.checked_mul(r.max(1)).ok_or_else(too_big)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(num_qo_heads: usize, num_kv_heads: usize, head_dim: usize) -> Heads {
        Heads { num_qo_heads, num_kv_heads, head_dim }
    }

    #[test]
    fn decode_matches_prefill_of_one_token() {
        // One sequence, 5 keys on pages [2, 0] of size 3, 2 KV heads, GQA 2, head_dim 8.
        let (hq, hk, d, ps) = (4, 2, 8, 3);
        let pool: Vec<f32> = (0..3 * ps * hk * d).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let vpool: Vec<f32> = pool.iter().map(|x| x * 0.5 + 0.25).collect();
        let q: Vec<f32> = (0..hq * d).map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0).collect();
        let table = PageTable::new(&[0, 2], &[2, 0], &[2]);
        let o = decode_f32(&q, &pool, &vpool, ps, heads(hq, hk, d), table).unwrap();

        let row = hk * d;
        let gather = |p: &[f32]| -> Vec<f32> {
            let mut out = p[2 * ps * row..3 * ps * row].to_vec();
            out.extend_from_slice(&p[0..2 * row]);
            out
        };
        let want = prefill_f32(&q, &gather(&pool), &gather(&vpool), &[0, 1], &[0, 5], heads(hq, hk, d), false).unwrap();
        for (a, b) in o.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let q = vec![0.0f32; 8];
        let pool = vec![0.0f32; 8];
        let err = |r: twinfer::Result<Vec<f32>>| r.unwrap_err();
        let e = err(decode_f32(&q, &pool, &pool, 1, heads(1, 1, 8), PageTable::new(&[0, 1], &[1], &[1])));
        assert!(matches!(e, TwinferError::PageIndexOutOfRange { page: 1, num_pages: 1, .. }), "{e}");
        let e = err(decode_f32(&q[..7], &pool, &pool, 1, heads(1, 1, 8), PageTable::new(&[0, 1], &[0], &[1])));
        assert!(matches!(e, TwinferError::ShapeMismatch { .. }), "{e}");
        let e = err(decode_f32(&q, &pool, &pool, 1, heads(1, 1, 8), PageTable::new(&[], &[], &[])));
        assert!(matches!(e, TwinferError::IndptrInvalid { .. }), "{e}");
        let e = err(prefill_f32(&q, &pool, &pool, &[0, 1], &[0, 2], heads(1, 1, 8), true));
        assert!(matches!(e, TwinferError::ShapeMismatch { .. }), "{e}");
        assert_eq!(crate::errors::error_code(&e), "ShapeMismatch");
    }

    #[test]
    fn sizes_that_wrap_are_rejected() {
        let q = vec![0.0f32; 8];
        let huge = usize::MAX / 4 + 1;
        let e = decode_f32(&q, &q, &q, 1, heads(huge, 1, 8), PageTable::new(&[0, 1], &[0], &[1])).unwrap_err();
        assert!(matches!(e, TwinferError::InvalidParameter(_)), "{e}");
        let e = prefill_f32(&q, &q, &q, &[0, 1], &[0, 1], heads(huge, 1, 8), false).unwrap_err();
        assert!(matches!(e, TwinferError::InvalidParameter(_)), "{e}");
        let e = decode_f32(&q, &q, &q, 256, heads(1, huge / 256, 8), PageTable::new(&[0, 1], &[0], &[1])).unwrap_err();
        assert!(matches!(e, TwinferError::InvalidParameter(_)), "{e}");
    }
}

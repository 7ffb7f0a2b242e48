//! Writing new K/V rows into a paged pool: FlashInfer's `append_paged_kv_cache`.
//!
//! The page table already covers the new tokens (pages were reserved beforehand), so an append
//! only scatters rows: sequence `b`'s `n` new rows land in its last `n` positions.

use crate::dtype::{TensorMut, TensorRef};
use crate::error::{Result, TwinferError, check_len};
use crate::kv::layout::{KvLayout, PageTable, PagedKv, check_indptr};

/// Writes `k` and `v` (each `[append_indptr[batch], num_kv_heads, head_dim]`) into the pools
/// (each `[num_pages, page_size, num_kv_heads, head_dim]`): the rows
/// `append_indptr[b]..append_indptr[b + 1]` become the last positions of sequence `b` in `table`.
///
/// Rows and pools must share one dtype (no conversion happens here; Q8 rows come quantized, one
/// scale per head). Everything is checked before
/// the first write, so on error the pools are untouched.
pub fn append_paged_kv(
    k_pool: TensorMut<'_>,
    v_pool: TensorMut<'_>,
    layout: KvLayout,
    table: &PageTable<'_>,
    append_indptr: &[u32],
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<()> {
    check_append(k_pool.as_ref(), v_pool.as_ref(), layout, table, append_indptr, k, v)?;
    write_append(k_pool, v_pool, layout, table, append_indptr, k, v)
}

/// Every check of [`append_paged_kv`]; after it passes, [`write_append`] cannot index out of bounds.
pub(crate) fn check_append(
    k_pool: TensorRef<'_>,
    v_pool: TensorRef<'_>,
    layout: KvLayout,
    table: &PageTable<'_>,
    append_indptr: &[u32],
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<()> {
    // The fields are public, so a hand-built layout (page_size 0, say) must be re-checked.
    let layout = KvLayout::new(layout.page_size, layout.num_kv_heads, layout.head_dim)?;
    let pool = PagedKv::new(k_pool, v_pool, layout)?;
    table.validate(layout.page_size, pool.num_pages())?;
    for (what, rows) in [("appended K", k), ("appended V", v)] {
        if rows.dtype() != pool.dtype() {
            return Err(TwinferError::DtypeMismatch { what, expected: pool.dtype(), got: rows.dtype() });
        }
    }
    let batch = table.batch_size();
    check_len("append_indptr ([batch + 1])", batch + 1, append_indptr.len())?;
    let rows = append_indptr[batch] as usize;
    check_len(
        "appended K ([append_indptr[batch], num_kv_heads, head_dim])",
        rows.saturating_mul(layout.row_elems()),
        k.len(),
    )?;
    check_len("appended V", k.len(), v.len())?;
    check_indptr("append_indptr", append_indptr, rows)?;
    crate::kv::layout::check_q8_rows("appended K", k, layout.head_dim)?;
    crate::kv::layout::check_q8_rows("appended V", v, layout.head_dim)?;
    for b in 0..batch {
        let n = (append_indptr[b + 1] - append_indptr[b]) as usize;
        let kv_len = table.kv_len(b, layout.page_size);
        if n > kv_len {
            return Err(TwinferError::InvalidParameter(format!(
                "append: sequence {b} appends {n} rows but its page table covers only {kv_len}; reserve them first"
            )));
        }
    }
    Ok(())
}

/// The scatter itself; the arguments must have passed [`check_append`].
pub(crate) fn write_append(
    k_pool: TensorMut<'_>,
    v_pool: TensorMut<'_>,
    layout: KvLayout,
    table: &PageTable<'_>,
    append_indptr: &[u32],
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<()> {
    match (k_pool, v_pool, k, v) {
        (TensorMut::F32(kp), TensorMut::F32(vp), TensorRef::F32(k), TensorRef::F32(v)) => {
            scatter(kp, k, layout, table, append_indptr);
            scatter(vp, v, layout, table, append_indptr);
        }
        (TensorMut::F16(kp), TensorMut::F16(vp), TensorRef::F16(k), TensorRef::F16(v)) => {
            scatter(kp, k, layout, table, append_indptr);
            scatter(vp, v, layout, table, append_indptr);
        }
        (TensorMut::BF16(kp), TensorMut::BF16(vp), TensorRef::BF16(k), TensorRef::BF16(v)) => {
            scatter(kp, k, layout, table, append_indptr);
            scatter(vp, v, layout, table, append_indptr);
        }
        (TensorMut::Q8(kp), TensorMut::Q8(vp), TensorRef::Q8(k), TensorRef::Q8(v)) => {
            // Codes scatter as rows of elements, scales as rows of one value per head.
            let scales = KvLayout { head_dim: 1, ..layout };
            scatter(kp.codes, k.codes, layout, table, append_indptr);
            scatter(kp.scales, k.scales, scales, table, append_indptr);
            scatter(vp.codes, v.codes, layout, table, append_indptr);
            scatter(vp.scales, v.scales, scales, table, append_indptr);
        }
        (kp, _, k, _) => {
            return Err(TwinferError::DtypeMismatch { what: "appended K/V", expected: kp.dtype(), got: k.dtype() });
        }
    }
    Ok(())
}

/// Copies each sequence's rows to its last positions, one page-contiguous run at a time.
fn scatter<T: Copy>(pool: &mut [T], rows: &[T], layout: KvLayout, table: &PageTable<'_>, append_indptr: &[u32]) {
    let (row, page_size) = (layout.row_elems(), layout.page_size);
    for b in 0..table.batch_size() {
        let (start, end) = (append_indptr[b] as usize, append_indptr[b + 1] as usize);
        let pages = table.pages(b);
        let mut pos = table.kv_len(b, page_size) - (end - start);
        let mut src = start;
        while src < end {
            let (page, slot) = (pages[pos / page_size] as usize, pos % page_size);
            // Consecutive slots of one page are contiguous in NHD, as are consecutive input rows.
            let run = (page_size - slot).min(end - src);
            let dst = layout.offset(page, slot, 0);
            pool[dst..dst + run * row].copy_from_slice(&rows[src * row..(src + run) * row]);
            pos += run;
            src += run;
        }
    }
}

//! What happens to a tile of scores between the two products: the variants (soft-cap, ALiBi),
//! the mask, and the online-softmax step, for prompt blocks (key-major tiles, a vector of rows at
//! a time) and decode rows alike; and the final normalisation.

use pulp::Simd;

use crate::cpu::block::Scratch;
use crate::cpu::math::{exp_f32s, exp_sub_sum, max_of, scale_in_place};

/// A tile of keys `[j0, j0 + cols)`; `masked` when some row of the block cannot see all of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tile {
    pub j0: usize,
    pub cols: usize,
    pub masked: bool,
}

/// Who the rows of one head's block are: row `r` is token `tok0 + r / group` (of a sequence of
/// `qo_len` queries over `kv_len` keys) and query head `qo_head0 + r % group`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadRows {
    pub qo_head0: usize,
    pub group: usize,
    pub tok0: usize,
    pub qo_len: usize,
    pub kv_len: usize,
}

/// Soft-cap, ALiBi and the mask on a key-major score tile (`st[c * rp + r]`, rows past the
/// block's untouched), in that order, as [`transform_row`] does for one row.
pub(crate) fn transform_tile(
    prm: &crate::attention::AttentionParams,
    h: HeadRows,
    tile: Tile,
    range: &[(usize, usize)],
    st: &mut [f32],
    rp: usize,
) {
    let head_rows = range.len() * h.group;
    if let Some(cap) = prm.logits_soft_cap {
        let inv = 1.0 / cap;
        for c in 0..tile.cols {
            st[c * rp..c * rp + head_rows].iter_mut().for_each(|s| *s = cap * (*s * inv).tanh());
        }
    }
    if prm.alibi_slopes.is_some() {
        for r in 0..head_rows {
            let slope = prm.alibi_slope(h.qo_head0 + r % h.group);
            let pos = prm_position(h.tok0 + r / h.group, h.qo_len, h.kv_len);
            for c in 0..tile.cols {
                st[c * rp + r] += slope * ((tile.j0 + c) as i64 - pos) as f32;
            }
        }
    }
    if tile.masked {
        // A token's rows are `group` adjacent lanes: mask the keys outside its range, a run at a
        // time (no per-element division).
        for (t, &(lo, hi)) in range.iter().enumerate() {
            let rows = t * h.group..(t + 1) * h.group;
            for c in 0..tile.cols {
                let j = tile.j0 + c;
                if j < lo || j >= hi {
                    st[c * rp + rows.start..c * rp + rows.end].fill(f32::NEG_INFINITY);
                }
            }
        }
    }
}

/// The online-softmax step on a key-major score tile, a vector of rows at a time: moves each
/// row's running max `m`, rescales its denominator `l`, leaves the probabilities (relative to the
/// new max) in `st` and each row's rescale factor for its output in `alpha` (1 while a row has
/// seen no key, whose probabilities are all 0).
#[inline(always)]
pub(crate) fn softmax_tile<S: Simd>(
    simd: S,
    st: &mut [f32],
    rp: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    let vectors = rp / S::F32_LANES;
    let cols = st.len() / rp;
    let neg_inf = simd.splat_f32s(f32::NEG_INFINITY);
    let (zero, one) = (simd.splat_f32s(0.0), simd.splat_f32s(1.0));
    let st = S::as_mut_simd_f32s(st).0;
    let (m, l, alpha) = (S::as_mut_simd_f32s(m).0, S::as_mut_simd_f32s(l).0, S::as_mut_simd_f32s(alpha).0);
    for v in 0..vectors {
        let mut m_new = m[v];
        for c in 0..cols {
            m_new = simd.max_f32s(m_new, st[c * vectors + v]);
        }
        let none = simd.equal_f32s(m_new, neg_inf);
        let shift = simd.select_f32s(none, zero, m_new);
        let a = simd.select_f32s(none, one, exp_f32s(simd, simd.sub_f32s(m[v], shift)));
        let mut sum = zero;
        for c in 0..cols {
            let e = exp_f32s(simd, simd.sub_f32s(st[c * vectors + v], shift));
            st[c * vectors + v] = e;
            sum = simd.add_f32s(sum, e);
        }
        l[v] = simd.mul_add_e_f32s(l[v], a, sum);
        m[v] = m_new;
        alpha[v] = a;
    }
}

/// Normalises every output row by its denominator and turns the running max into the LSE.
#[inline(always)]
pub(crate) fn finish_rows<S: Simd>(simd: S, sc: &mut Scratch, rows: usize, dp: usize) {
    for r in 0..rows {
        let out = &mut sc.acc[r * dp..(r + 1) * dp];
        if sc.l[r] > 0.0 {
            scale_in_place(simd, out, 1.0 / sc.l[r]);
            sc.m[r] += sc.l[r].ln();
        } else {
            out.fill(0.0);
            sc.m[r] = f32::NEG_INFINITY;
        }
    }
}

/// Where one score row sits: its query head and position, the tile's first key, and the keys
/// `[lo, hi)` the row may see.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowWindow {
    pub qo_head: usize,
    pub pos: i64,
    pub j0: usize,
    pub lo: usize,
    pub hi: usize,
}

/// The online-softmax step for one row of a score tile: applies the variant and the mask, moves
/// the running max `m`, rescales the denominator `l` and the output row, and leaves the tile's
/// probabilities (relative to the new max) in `row`.
#[inline(always)]
pub(crate) fn softmax_row<S: Simd>(
    simd: S,
    prm: &crate::attention::AttentionParams,
    w: RowWindow,
    row: &mut [f32],
    m: &mut f32,
    l: &mut f32,
    acc_row: &mut [f32],
) {
    transform_row(prm, w.qo_head, w.pos, w.j0, w.lo, w.hi, row);
    let m_new = m.max(max_of(simd, row));
    if m_new == f32::NEG_INFINITY {
        row.fill(0.0); // nothing visible yet: contributes nothing
        return;
    }
    // Once the running max settles, most tiles leave it unchanged: exp(0) is exactly 1, so the
    // call (a scalar exp per row and tile, a tenth of a decode tile's cost) can be skipped.
    let alpha = if m_new == *m { 1.0 } else { (*m - m_new).exp() };
    let sum = exp_sub_sum(simd, row, m_new);
    *l = *l * alpha + sum;
    if alpha != 1.0 {
        scale_in_place(simd, acc_row, alpha);
    }
    *m = m_new;
}

#[inline(always)]
pub(crate) fn prm_position(i: usize, qo_len: usize, kv_len: usize) -> i64 {
    crate::attention::AttentionParams::query_position(i, qo_len, kv_len)
}

/// Applies soft-cap, ALiBi and the mask to one row of a score tile starting at key `j0`.
#[inline(always)]
fn transform_row(
    prm: &crate::attention::AttentionParams,
    qo_head: usize,
    pos: i64,
    j0: usize,
    lo: usize,
    hi: usize,
    row: &mut [f32],
) {
    if let Some(cap) = prm.logits_soft_cap {
        let inv = 1.0 / cap;
        row.iter_mut().for_each(|s| *s = cap * (*s * inv).tanh());
    }
    let slope = prm.alibi_slope(qo_head);
    if slope != 0.0 {
        for (c, s) in row.iter_mut().enumerate() {
            *s += slope * ((j0 + c) as i64 - pos) as f32;
        }
    }
    // Most tiles of a long prompt lie wholly inside the row's window: nothing to mask.
    if lo <= j0 && j0 + row.len() <= hi {
        return;
    }
    for (c, s) in row.iter_mut().enumerate() {
        let j = j0 + c;
        if j < lo || j >= hi {
            *s = f32::NEG_INFINITY;
        }
    }
}

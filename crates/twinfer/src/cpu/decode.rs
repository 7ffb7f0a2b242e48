//! The decode work item: one query token, a range of KV heads (all of them in decode), a chunk of keys.
//!
//! Unlike prefill, each key is used by only `group` query rows, so converting K/V tiles to f32
//! in memory would cost as much as the arithmetic. Here the kernels read the pool directly and
//! widen f16/bf16 to f32 in registers ([`LoadLanes`]); a tile's rows are walked page by page in
//! order, all heads of a row together, and the next tile is prefetched while this one computes.

use pulp::Simd;

use crate::attention::problem::Problem;
use crate::cpu::block::{Scratch, WorkItem};
use crate::cpu::convert::{LoadLanes, prefetch_slice};
use crate::cpu::microkernel::{accumulate, score_block};
use crate::cpu::softmax::{RowWindow, finish_rows, prm_position, softmax_row};
use crate::dtype::TensorRef;

/// Keys per decode tile: the score tile is `[heads * group, DECODE_TILE]`. On a 2-core AVX-512
/// machine 32 and 64 measured alike, 16 slower (per-tile overhead) and 128 slower (the current
/// and the prefetched tile no longer fit in L2 together).
const DECODE_TILE: usize = 32;

/// Whether the fused kernel handles this item: one token, and head rows that are whole vectors
/// (otherwise the padded-tile path of [`crate::cpu::block`] runs it).
pub(crate) fn fused_applies<S: Simd>(p: &Problem<'_>, item: &WorkItem) -> bool {
    item.tok1 - item.tok0 == 1 && p.params.head_dim.is_multiple_of(S::F32_LANES)
}

/// Runs one decode item; results land in `sc.acc` / `sc.m` exactly as [`crate::cpu::block::run_item`] leaves them.
#[inline(always)]
pub(crate) fn run_decode_item<S: Simd>(simd: S, p: &Problem<'_>, item: WorkItem, sc: &mut Scratch) {
    match (p.kv.k(), p.kv.v()) {
        (TensorRef::F32(k), TensorRef::F32(v)) => decode_typed(simd, p, item, sc, k, v, None),
        (TensorRef::F16(k), TensorRef::F16(v)) => decode_typed(simd, p, item, sc, k, v, None),
        (TensorRef::BF16(k), TensorRef::BF16(v)) => decode_typed(simd, p, item, sc, k, v, None),
        (TensorRef::Q8(k), TensorRef::Q8(v)) => {
            decode_typed(simd, p, item, sc, k.codes, v.codes, Some((k.scales, v.scales)))
        }
        _ => unreachable!("validation guarantees K and V share a dtype"),
    }
}

/// `scales` (int8 K/V: one per row of a head, `[.., head_dim]` codes each): the codes are widened
/// in registers like f16 and each key's scale multiplies its scores, each value's scale its
/// probabilities, instead of every element.
#[inline(always)]
fn decode_typed<S: Simd, E: LoadLanes>(
    simd: S,
    p: &Problem<'_>,
    item: WorkItem,
    sc: &mut Scratch,
    k: &[E],
    v: &[E],
    scales: Option<(&[f32], &[f32])>,
) {
    let prm = p.params;
    let (d, group, h_qo) = (prm.head_dim, prm.group_size(), prm.num_qo_heads);
    let heads = item.head1 - item.head0;
    let rows = heads * group;
    let dp = d; // a multiple of the vector width: `fused_applies`
    sc.prepare(rows, 1, dp, 0, DECODE_TILE);
    let scale = prm.resolved_sm_scale();
    let (q_start, q_end) = p.qo.range(item.b);
    let (qo_len, tok) = (q_end - q_start, item.tok0);
    let q_off = ((q_start + tok) * h_qo + item.head0 * group) * d;
    p.q.read_f32(q_off, &mut sc.q[..rows * d]);
    crate::cpu::math::scale_in_place(simd, &mut sc.q[..rows * d], scale);

    let kv_len = p.kv.kv_len(item.b);
    let (lo, hi) = prm.visible_range(tok, qo_len, kv_len);
    let (lo, hi) = (lo.max(item.kv0), hi.min(item.kv1));
    let pos = prm_position(tok, qo_len, kv_len);
    let mut offs = [0usize; DECODE_TILE];
    let mut next_offs = [0usize; DECODE_TILE];
    let tile_offsets = |j0: usize, offs: &mut [usize; DECODE_TILE]| {
        let cols = DECODE_TILE.min(hi.saturating_sub(j0));
        for (c, off) in offs[..cols].iter_mut().enumerate() {
            *off = p.kv.row_offset(item.b, j0 + c, item.head0);
            // Bounds of every vector read below: this row's heads [head0, head1).
            assert!(*off + heads * d <= k.len() && *off + heads * d <= v.len());
        }
        cols
    };
    let mut j0 = lo;
    let mut cols = tile_offsets(j0, &mut offs);
    while j0 < hi {
        let next_cols = tile_offsets(j0 + cols, &mut next_offs);
        // Scores key-major: K is read row after row (all heads of a row are contiguous). The next
        // tile's K is prefetched during the scores and its V during the value pass, a few lines
        // per step, so memory stays busy while the arithmetic runs.
        scores_key_major(
            simd,
            &sc.q[..rows * d],
            k,
            &offs[..cols],
            &next_offs[..next_cols],
            heads,
            group,
            d,
            &mut sc.s,
        );
        for hh in 0..heads {
            let r0 = hh * group;
            if let Some((k_scales, _)) = scales {
                scale_columns(&mut sc.s, r0, group, &offs[..cols], hh, d, k_scales);
            }
            for g in 0..group {
                let r = r0 + g;
                let window = RowWindow { qo_head: (item.head0 + hh) * group + g, pos, j0, lo, hi };
                let row = &mut sc.s[r * DECODE_TILE..r * DECODE_TILE + cols];
                softmax_row(simd, prm, window, row, &mut sc.m[r], &mut sc.l[r], &mut sc.acc[r * d..(r + 1) * d]);
            }
            // The denominator is taken: scaling the probabilities now scales only the values.
            if let Some((_, v_scales)) = scales {
                scale_columns(&mut sc.s, r0, group, &offs[..cols], hh, d, v_scales);
            }
            let s_head = &sc.s[r0 * DECODE_TILE..(r0 + group) * DECODE_TILE];
            accumulate(
                simd,
                s_head,
                (DECODE_TILE, 1),
                v,
                &offs[..cols],
                hh * d,
                d,
                &mut sc.acc[r0 * d..(r0 + group) * d],
                &next_offs[..next_cols],
            );
        }
        j0 += cols;
        offs = next_offs;
        cols = next_cols;
    }
    finish_rows(simd, sc, rows, dp);
}

/// Multiplies column c of score rows `r0..r0 + group` by the scale of key c's row of head `hh`
/// (`offs[c]` is the key's row offset at the item's first head, in codes of `d`).
#[inline(always)]
fn scale_columns(s: &mut [f32], r0: usize, group: usize, offs: &[usize], hh: usize, d: usize, scales: &[f32]) {
    let mut col = [0f32; DECODE_TILE];
    for (c, &off) in offs.iter().enumerate() {
        col[c] = scales[off / d + hh];
    }
    for r in r0..r0 + group {
        for (x, &f) in s[r * DECODE_TILE..r * DECODE_TILE + offs.len()].iter_mut().zip(&col) {
            *x *= f;
        }
    }
}

/// `s[(h * group + g) * DECODE_TILE + c] = dot(q[h * group + g], k[offs[c] + h * d ..][..d])`,
/// walking keys in pairs and, per pair, every head in memory order.
#[inline(always)]
fn scores_key_major<S: Simd, E: LoadLanes>(
    simd: S,
    q: &[f32],
    k: &[E],
    offs: &[usize],
    next_offs: &[usize],
    heads: usize,
    group: usize,
    d: usize,
    s: &mut [f32],
) {
    let mut c = 0;
    while c < offs.len() {
        let nc = (offs.len() - c).min(2);
        let ahead = next_offs.get(c..(c + nc).min(next_offs.len())).unwrap_or(&[]);
        for hh in 0..heads {
            // This head's slice of the next tile's rows: a few lines per score block, so the
            // prefetches trickle out at the pace of the arithmetic instead of flooding the
            // miss queues in bursts (bursts measured slower).
            for &off in ahead {
                prefetch_slice(k, off + hh * d, d);
            }
            let mut r = hh * group;
            let end = r + group;
            while r < end {
                let mr = (end - r).min(4);
                let head_off = hh * d;
                block_shape!(mr, nc, score_block::<S, E>(simd, q, d, k, offs, head_off, r, c, s, DECODE_TILE));
                r += mr;
            }
        }
        c += nc;
    }
}

//! The decode work item: one query token, a range of KV heads (all of them in decode), a chunk of keys.
//!
//! Unlike prefill, each key is used by only `group` query rows, so converting K/V tiles to f32
//! in memory would cost as much as the arithmetic. Here the kernels read the pool directly and
//! widen f16/bf16 to f32 in registers ([`LoadLanes`]); a tile's rows are walked page by page in
//! order, all heads of a row together, and the next tile is prefetched while this one computes.

use pulp::Simd;

use crate::attention::problem::Problem;
use crate::cpu::block::{RowWindow, Scratch, WorkItem, finish_rows, prm_position, softmax_row};
use crate::cpu::convert::{LoadLanes, prefetch};
use crate::cpu::microkernel::{accumulate, score_block};
use crate::dtype::{Q8Ref, TensorRef};

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
        (TensorRef::F32(k), TensorRef::F32(v)) => decode_typed(simd, p, item, sc, k, v),
        (TensorRef::F16(k), TensorRef::F16(v)) => decode_typed(simd, p, item, sc, k, v),
        (TensorRef::BF16(k), TensorRef::BF16(v)) => decode_typed(simd, p, item, sc, k, v),
        (TensorRef::Q8(k), TensorRef::Q8(v)) => decode_q8(simd, p, item, sc, k, v),
        _ => unreachable!("validation guarantees K and V share a dtype"),
    }
}

#[inline(always)]
fn decode_typed<S: Simd, E: LoadLanes>(simd: S, p: &Problem<'_>, item: WorkItem, sc: &mut Scratch, k: &[E], v: &[E]) {
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
            for g in 0..group {
                let r = r0 + g;
                let window = RowWindow { qo_head: (item.head0 + hh) * group + g, pos, j0, lo, hi };
                let row = &mut sc.s[r * DECODE_TILE..r * DECODE_TILE + cols];
                softmax_row(simd, prm, window, row, &mut sc.m[r], &mut sc.l[r], &mut sc.acc[r * d..(r + 1) * d]);
            }
            let s_head = &sc.s[r0 * DECODE_TILE..(r0 + group) * DECODE_TILE];
            accumulate(
                simd,
                s_head,
                DECODE_TILE,
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

/// [`decode_typed`] over int8 K/V, a head at a time: the tile's rows of that head are
/// dequantized into small scratch tiles (`DECODE_TILE * head_dim` f32, which stay in L1), one
/// multiply per element giving the value the oracle reads, and the f32 kernels run on them. The
/// next tile's codes are prefetched meanwhile.
#[inline(always)]
fn decode_q8<S: Simd>(simd: S, p: &Problem<'_>, item: WorkItem, sc: &mut Scratch, k: Q8Ref<'_>, v: Q8Ref<'_>) {
    let prm = p.params;
    let (d, group, h_qo) = (prm.head_dim, prm.group_size(), prm.num_qo_heads);
    let heads = item.head1 - item.head0;
    let rows = heads * group;
    sc.prepare(rows, 1, d, DECODE_TILE * d, DECODE_TILE);
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
    // Row c of a scratch tile starts at c * d.
    let mut local = [0usize; DECODE_TILE];
    for (c, off) in local.iter_mut().enumerate() {
        *off = c * d;
    }
    let mut offs = [0usize; DECODE_TILE];
    let mut j0 = lo;
    while j0 < hi {
        let cols = DECODE_TILE.min(hi - j0);
        for (c, off) in offs[..cols].iter_mut().enumerate() {
            *off = p.kv.row_offset(item.b, j0 + c, item.head0);
        }
        for j in j0 + cols..hi.min(j0 + 2 * cols) {
            let off = p.kv.row_offset(item.b, j, item.head0);
            prefetch(TensorRef::Q8(k), off, heads * d);
            prefetch(TensorRef::Q8(v), off, heads * d);
        }
        for hh in 0..heads {
            let r0 = hh * group;
            for (c, &off) in offs[..cols].iter().enumerate() {
                dequantize_row(k, off + hh * d, &mut sc.k[c * d..(c + 1) * d]);
            }
            let q = &sc.q[r0 * d..(r0 + group) * d];
            let s_head = &mut sc.s[r0 * DECODE_TILE..(r0 + group) * DECODE_TILE];
            scores_key_major(simd, q, &sc.k[..cols * d], &local[..cols], &[], 1, group, d, s_head);
            for g in 0..group {
                let r = r0 + g;
                let window = RowWindow { qo_head: (item.head0 + hh) * group + g, pos, j0, lo, hi };
                let s_row = &mut sc.s[r * DECODE_TILE..r * DECODE_TILE + cols];
                softmax_row(simd, prm, window, s_row, &mut sc.m[r], &mut sc.l[r], &mut sc.acc[r * d..(r + 1) * d]);
            }
            for (c, &off) in offs[..cols].iter().enumerate() {
                dequantize_row(v, off + hh * d, &mut sc.v[c * d..(c + 1) * d]);
            }
            let s_head = &sc.s[r0 * DECODE_TILE..(r0 + group) * DECODE_TILE];
            let acc = &mut sc.acc[r0 * d..(r0 + group) * d];
            accumulate(simd, s_head, DECODE_TILE, &sc.v[..cols * d], &local[..cols], 0, d, acc, &[]);
        }
        j0 += cols;
    }
    finish_rows(simd, sc, rows, d);
}

/// One row of a head (`dst.len()` codes from `at`, which starts a row) times its scale: a plain
/// loop that the enclosing SIMD context vectorises.
#[inline(always)]
fn dequantize_row(q: Q8Ref<'_>, at: usize, dst: &mut [f32]) {
    let scale = q.scales[at / q.group];
    let codes = &q.codes[at..at + dst.len()];
    for (o, &c) in dst.iter_mut().zip(codes) {
        *o = c as f32 * scale;
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
    let kt = E::view(k);
    let mut c = 0;
    while c < offs.len() {
        let nc = (offs.len() - c).min(2);
        let ahead = next_offs.get(c..(c + nc).min(next_offs.len())).unwrap_or(&[]);
        for hh in 0..heads {
            // This head's slice of the next tile's rows: a few lines per score block, so the
            // prefetches trickle out at the pace of the arithmetic instead of flooding the
            // miss queues in bursts (bursts measured slower).
            for &off in ahead {
                prefetch(kt, off + hh * d, d);
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

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

/// Keys per decode tile: the score tile is `[heads * group, DECODE_TILE]`, and the next tile is
/// prefetched while this one computes. On the Zen 5 VM (2026-12-08) 16 read 1.1-1.4x faster than
/// 32 at contexts that stream from memory (at GQA 32/8, d 128 a tile of 32 keys is 64 KiB of K
/// and 64 of V, beyond the 48-KiB L1 with its prefetched successor), and cost about 13% more in
/// bookkeeping when the KV sits in cache; 8 was slower than 16 at page 16. (On the AVX-512 VM of
/// 2026-12-05, with T1 prefetches, 32 and 64 had measured alike and 16 slower.) Elsewhere no
/// software prefetch runs ([`prefetch_slice`] is x86-only), so only the bookkeeping would change:
/// wasm's f32-KV decode in headless Chromium took 10-18% longer with 16 (two runs an hour
/// apart, not alternated; the native ceilings of the second were 8% lower).
const DECODE_TILE: usize = if cfg!(target_arch = "x86_64") { 16 } else { 32 };

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
            (heads, group, d),
            quad_reduce_applies::<S>() && group.is_multiple_of(4),
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
/// walking keys in pairs (in fours with `by_four`: [`score_block_4x4`], where
/// [`quad_reduce_applies`] and the group is a multiple of four) and, per step, every head in
/// memory order.
#[inline(always)]
fn scores_key_major<S: Simd, E: LoadLanes>(
    simd: S,
    q: &[f32],
    k: &[E],
    offs: &[usize],
    next_offs: &[usize],
    (heads, group, d): (usize, usize, usize),
    by_four: bool,
    s: &mut [f32],
) {
    let mut c = 0;
    while c < offs.len() {
        // Fours while four keys are left, then pairs (`block_shape!` takes at most two).
        let left = offs.len() - c;
        let nc = if by_four && left >= 4 { 4 } else { left.min(2) };
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
                if nc == 4 {
                    score_block_4x4::<S, E>(q, d, k, &offs[c..c + 4], head_off, r, c, s);
                } else {
                    block_shape!(mr, nc, score_block::<S, E>(simd, q, d, k, offs, head_off, r, c, s, DECODE_TILE));
                }
                r += mr;
            }
        }
        c += nc;
    }
}

/// Whether [`score_block_4x4`] runs on this level: AVX-512, whose 32 registers hold the sixteen
/// sums and whose `vhaddps` tree reduces four of them to one vector.
#[inline(always)]
fn quad_reduce_applies<S: Simd>() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<S>() == std::any::TypeId::of::<pulp::x86::V4>() {
        return true;
    }
    false
}

/// Scores of four query rows (`r0..r0 + 4`) against four keys (`offs`, columns `c0..c0 + 4`):
/// sixteen running sums, each K vector widened once for four rows. Each row's four sums reduce
/// in one `vhaddps` tree and land with one 4-wide store, where [`score_block`] reduced the four
/// rows of one key and stored them one lane at a time. Every sum is added in the same order as
/// there, so the scores are bit for bit those of the pair blocks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_block_4x4<S: Simd, E: LoadLanes>(
    q: &[f32],
    len: usize,
    k: &[E],
    offs: &[usize],
    head_off: usize,
    r0: usize,
    c0: usize,
    s: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<S>() == std::any::TypeId::of::<pulp::x86::V4>() {
        use core::arch::x86_64::*;
        const LANES: usize = 16;
        assert!(len.is_multiple_of(LANES) && (r0 + 4) * len <= q.len() && offs.len() == 4);
        assert!((r0 + 3) * DECODE_TILE + c0 + 4 <= s.len());
        let k_rows: [*const E; 4] = core::array::from_fn(|c| {
            let start = offs[c] + head_off;
            assert!(start + len <= k.len());
            k[start..].as_ptr()
        });
        // SAFETY: V4 guarantees AVX-512F/DQ (and AVX); every read and write is inside the bounds
        // asserted above; `f32s` is `__m512` bit for bit.
        unsafe {
            let qp = q.as_ptr();
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            let mut i = 0;
            while i < len {
                let kv: [__m512; 4] = core::array::from_fn(|c| {
                    core::mem::transmute_copy::<S::f32s, __m512>(&E::load_lanes::<S>(k_rows[c].add(i)))
                });
                for (r, row) in acc.iter_mut().enumerate() {
                    let qv = _mm512_loadu_ps(qp.add((r0 + r) * len + i));
                    for (a, &kc) in row.iter_mut().zip(&kv) {
                        *a = _mm512_fmadd_ps(qv, kc, *a);
                    }
                }
                i += LANES;
            }
            let sp = s.as_mut_ptr();
            for (r, row) in acc.iter().enumerate() {
                let h: [__m256; 4] = core::array::from_fn(|c| {
                    _mm256_add_ps(_mm512_castps512_ps256(row[c]), _mm512_extractf32x8_ps::<1>(row[c]))
                });
                let t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
                let sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
                _mm_storeu_ps(sp.add((r0 + r) * DECODE_TILE + c0), sums);
            }
            return;
        }
    }
    let _ = (q, len, k, offs, head_off, r0, c0, s);
    unreachable!("score_block_4x4 runs only where quad_reduce_applies");
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    struct Scores<'a> {
        q: &'a [f32],
        k: &'a [half::f16],
        offs: &'a [usize],
        by_four: bool,
    }

    impl pulp::WithSimd for Scores<'_> {
        type Output = Vec<u32>;
        fn with_simd<S: Simd>(self, simd: S) -> Vec<u32> {
            let (heads, group, d) = (2, 8, 64);
            let mut s = vec![f32::NAN; heads * group * DECODE_TILE];
            scores_key_major(simd, self.q, self.k, self.offs, &[], (heads, group, d), self.by_four, &mut s);
            let cols = self.offs.len();
            (0..heads * group)
                .flat_map(|r| s[r * DECODE_TILE..r * DECODE_TILE + cols].to_vec())
                .map(f32::to_bits)
                .collect()
        }
    }

    /// The four-key blocks reduce every sum in the pair blocks' order: a tile's scores are the
    /// same bits either way, for every tile length (fours, then a pair or a single key).
    #[test]
    fn four_key_blocks_give_the_pair_blocks_bits() {
        let Some(v4) = pulp::x86::V4::try_new() else {
            eprintln!("skipped: this CPU has no AVX-512, where the four-key blocks run");
            return;
        };
        let (heads, group, d) = (2, 8, 64);
        let wave = |i: usize, f: f32| ((i as f32) * f).sin();
        let q: Vec<f32> = (0..heads * group * d).map(|i| wave(i, 0.37)).collect();
        let rows = 40;
        let k: Vec<half::f16> = (0..rows * heads * d).map(|i| half::f16::from_f32(wave(i, 0.61))).collect();
        for cols in [1, 2, 3, 4, 5, 7, 8, DECODE_TILE - 1, DECODE_TILE] {
            // Keys out of order, as pages are.
            let offs: Vec<usize> = (0..cols).map(|c| ((c * 7 + 3) % rows) * heads * d).collect();
            let run = |by_four| pulp::Simd::vectorize(v4, Scores { q: &q, k: &k, offs: &offs, by_four });
            let (fours, pairs) = (run(true), run(false));
            assert!(fours.iter().all(|&b| !f32::from_bits(b).is_nan()), "{cols} keys: a score left unwritten");
            assert_eq!(fours, pairs, "{cols} keys");
        }
    }
}

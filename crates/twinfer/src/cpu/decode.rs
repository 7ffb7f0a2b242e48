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
use crate::dtype::TensorRef;

/// Keys per decode tile: the score tile is `[heads * group, DECODE_TILE]`. 32 measured best on
/// a 2-core AVX-512 machine (16: per-tile overhead; 64 and 128: the prefetched next tile and the
/// current one no longer sit in cache together).
const DECODE_TILE: usize = 32;

/// Whether the fused kernel handles this item: one token, and head rows that are whole vectors
/// (otherwise the padded-tile path of [`crate::cpu::block`] runs it). f16 under AVX2 also takes
/// the tile path: pulp's AVX2 context lacks F16C, so an in-register conversion would be an
/// out-of-line call per vector, while the tile path converts whole rows per call.
pub(crate) fn fused_applies<S: Simd>(p: &Problem<'_>, item: &WorkItem) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<S>() == std::any::TypeId::of::<pulp::x86::V3>()
        && p.kv.k().dtype() == crate::dtype::DType::F16
    {
        return false;
    }
    item.tok1 - item.tok0 == 1 && p.params.head_dim.is_multiple_of(S::F32_LANES)
}

/// Runs one decode item; results land in `sc.acc` / `sc.m` exactly as [`crate::cpu::block::run_item`] leaves them.
#[inline(always)]
pub(crate) fn run_decode_item<S: Simd>(simd: S, p: &Problem<'_>, item: WorkItem, sc: &mut Scratch) {
    match (p.kv.k(), p.kv.v()) {
        (TensorRef::F32(k), TensorRef::F32(v)) => decode_typed(simd, p, item, sc, k, v),
        (TensorRef::F16(k), TensorRef::F16(v)) => decode_typed(simd, p, item, sc, k, v),
        (TensorRef::BF16(k), TensorRef::BF16(v)) => decode_typed(simd, p, item, sc, k, v),
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
        // tile is prefetched a few rows at a time throughout this one, its K during the scores
        // and its V during the head-major value pass, so memory stays busy while the arithmetic
        // runs, without flooding the miss queues.
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
            for &off in &next_offs[next_cols * hh / heads..next_cols * (hh + 1) / heads] {
                prefetch(p.kv.v(), off, heads * d);
            }
            for g in 0..group {
                let r = r0 + g;
                let window = RowWindow { qo_head: (item.head0 + hh) * group + g, pos, j0, lo, hi };
                let row = &mut sc.s[r * DECODE_TILE..r * DECODE_TILE + cols];
                softmax_row(simd, prm, window, row, &mut sc.m[r], &mut sc.l[r], &mut sc.acc[r * d..(r + 1) * d]);
            }
            let s_head = &sc.s[r0 * DECODE_TILE..(r0 + group) * DECODE_TILE];
            accumulate_from_pool(simd, s_head, v, &offs[..cols], hh * d, d, &mut sc.acc[r0 * d..(r0 + group) * d]);
        }
        j0 += cols;
        offs = next_offs;
        cols = next_cols;
    }
    finish_rows(simd, sc, rows, dp);
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
        for &off in next_offs.get(c..(c + nc).min(next_offs.len())).unwrap_or(&[]) {
            prefetch(kt, off, heads * d);
        }
        for hh in 0..heads {
            let mut r = hh * group;
            let end = r + group;
            while r < end {
                let mr = (end - r).min(4);
                let head_off = hh * d;
                block_shape!(mr, nc, score_block::<S, E>(simd, q, k, offs, head_off, d, r, c, s));
                r += mr;
            }
        }
        c += nc;
    }
}

#[inline(always)]
fn score_block<S: Simd, E: LoadLanes, const MR: usize, const NC: usize>(
    simd: S,
    q: &[f32],
    k: &[E],
    offs: &[usize],
    head_off: usize,
    d: usize,
    r0: usize,
    c0: usize,
    s: &mut [f32],
) {
    let lanes = S::F32_LANES;
    assert!((r0 + MR) * d <= q.len() && c0 + NC <= offs.len());
    let k_rows: [*const E; NC] = core::array::from_fn(|c| {
        let start = offs[c0 + c] + head_off;
        assert!(start + d <= k.len());
        k[start..].as_ptr()
    });
    let qp = q.as_ptr();
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NC]; MR];
    let mut i = 0;
    while i < d {
        // SAFETY: i + lanes <= d (d is a multiple of lanes), and each row holds d elements.
        unsafe {
            let kv: [S::f32s; NC] = core::array::from_fn(|c| E::load_lanes::<S>(k_rows[c].add(i)));
            for r in 0..MR {
                let qv = *(qp.add((r0 + r) * d + i) as *const S::f32s);
                for c in 0..NC {
                    acc[r][c] = simd.mul_add_e_f32s(qv, kv[c], acc[r][c]);
                }
            }
        }
        i += lanes;
    }
    for c in 0..NC {
        if MR == 4
            && let Some(sums) = reduce4::<S>([acc[0][c], acc[1][c], acc[2][c], acc[3][c]])
        {
            for r in 0..4 {
                s[(r0 + r) * DECODE_TILE + c0 + c] = sums[r];
            }
            continue;
        }
        for r in 0..MR {
            s[(r0 + r) * DECODE_TILE + c0 + c] = simd.reduce_sum_f32s(acc[r][c]);
        }
    }
}

/// Horizontal sums of four vectors at once where the ISA has a cheap transpose-and-add
/// (AVX-512: fold to 256 bits, then a `vhaddps` tree), about a third of four separate reductions.
#[inline(always)]
fn reduce4<S: Simd>(v: [S::f32s; 4]) -> Option<[f32; 4]> {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<S>() == std::any::TypeId::of::<pulp::x86::V4>() {
        use core::arch::x86_64::*;
        // SAFETY: V4 guarantees AVX-512F/DQ (and so AVX); `f32s` is `__m512` bit for bit.
        unsafe {
            let w: [__m512; 4] = core::array::from_fn(|i| core::mem::transmute_copy::<S::f32s, __m512>(&v[i]));
            let h: [__m256; 4] = core::array::from_fn(|i| {
                _mm256_add_ps(_mm512_castps512_ps256(w[i]), _mm512_extractf32x8_ps::<1>(w[i]))
            });
            let t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
            let q = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
            let mut out = [0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), q);
            return Some(out);
        }
    }
    let _ = v;
    None
}

/// `acc[r] += sum_c p[r * DECODE_TILE + c] * v[offs[c] + head_off ..][..d]` for every query row.
#[inline(always)]
fn accumulate_from_pool<S: Simd, E: LoadLanes>(
    simd: S,
    p: &[f32],
    v: &[E],
    offs: &[usize],
    head_off: usize,
    d: usize,
    acc: &mut [f32],
) {
    let rows = acc.len() / d;
    let nvec = d / S::F32_LANES;
    let mut r = 0;
    while r < rows {
        let mr = (rows - r).min(4);
        let mut c = 0;
        while c < nvec {
            // 4 rows x 4 vectors of accumulators need the 32 registers of AVX-512.
            let wide = S::REGISTER_COUNT >= 32;
            let nv = (nvec - c).min(if wide { 4 } else { 2 });
            block_shape!(wide mr, nv, pv_block::<S, E>(simd, p, v, offs, head_off, d, r, c, acc));
            let nv = if mr == 4 { nv } else { nv.min(2) };
            c += nv;
        }
        r += mr;
    }
}

#[inline(always)]
fn pv_block<S: Simd, E: LoadLanes, const MR: usize, const NV: usize>(
    simd: S,
    p: &[f32],
    v: &[E],
    offs: &[usize],
    head_off: usize,
    d: usize,
    r0: usize,
    c0: usize,
    acc: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let cols = offs.len();
    assert!((r0 + MR) * d <= acc.len() && (c0 + NV) * lanes <= d);
    assert!(cols == 0 || (r0 + MR - 1) * DECODE_TILE + cols <= p.len());
    let ap = acc.as_mut_ptr();
    // SAFETY: offsets below stay within the asserted bounds of `acc` and `p`, and each V row
    // holds d elements (asserted per row).
    unsafe {
        let mut regs: [[S::f32s; NV]; MR] = core::array::from_fn(|r| {
            core::array::from_fn(|c| *(ap.add((r0 + r) * d + (c0 + c) * lanes) as *const S::f32s))
        });
        for (j, &off) in offs.iter().enumerate() {
            let start = off + head_off;
            assert!(start + d <= v.len());
            let row = v.as_ptr().add(start);
            let vv: [S::f32s; NV] = core::array::from_fn(|c| E::load_lanes::<S>(row.add((c0 + c) * lanes)));
            for r in 0..MR {
                let pr = simd.splat_f32s(*p.get_unchecked((r0 + r) * DECODE_TILE + j));
                for c in 0..NV {
                    regs[r][c] = simd.mul_add_e_f32s(pr, vv[c], regs[r][c]);
                }
            }
        }
        for r in 0..MR {
            for c in 0..NV {
                *(ap.add((r0 + r) * d + (c0 + c) * lanes) as *mut S::f32s) = regs[r][c];
            }
        }
    }
}

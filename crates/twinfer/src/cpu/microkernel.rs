//! Register-blocked micro-kernels shared by the prefill and decode paths.
//!
//! Keys and values are addressed as rows: row `c` starts at `offs[c] + head_off` in a slice of
//! any storage type, read one vector at a time through [`LoadLanes`] (f16 and bf16 widen in
//! registers). The decode path points the offsets straight into the paged pool; the prefill
//! path points them into an f32 tile it converted once for many query rows. Query, output and
//! score rows are f32 with a stride of `len` (a multiple of the vector width).

use pulp::Simd;

use crate::cpu::convert::{LoadLanes, prefetch_slice};

/// One `MR x NC` block of scores, `s[r * s_stride + c] = dot(q[r], k[offs[c] + head_off ..][..len])`
/// (decode): 4 query rows x up to 4 key rows keep their accumulators in registers.
#[inline(always)]
pub(crate) fn score_block<S: Simd, E: LoadLanes, const MR: usize, const NC: usize>(
    simd: S,
    q: &[f32],
    len: usize,
    k: &[E],
    offs: &[usize],
    head_off: usize,
    r0: usize,
    c0: usize,
    s: &mut [f32],
    s_stride: usize,
) {
    let lanes = S::F32_LANES;
    // The pointer reads below stay inside these bounds, checked once per block.
    assert!(len.is_multiple_of(lanes) && (r0 + MR) * len <= q.len() && c0 + NC <= offs.len());
    let k_rows: [*const E; NC] = core::array::from_fn(|c| {
        let start = offs[c0 + c] + head_off;
        assert!(start + len <= k.len());
        k[start..].as_ptr()
    });
    let qp = q.as_ptr();
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NC]; MR];
    let mut i = 0;
    while i < len {
        // SAFETY: i + lanes <= len, and every row holds `len` elements (asserted above).
        unsafe {
            let kv: [S::f32s; NC] = core::array::from_fn(|c| E::load_lanes::<S>(k_rows[c].add(i)));
            for r in 0..MR {
                let qv = *(qp.add((r0 + r) * len + i) as *const S::f32s);
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
                s[(r0 + r) * s_stride + c0 + c] = sums[r];
            }
            continue;
        }
        for r in 0..MR {
            s[(r0 + r) * s_stride + c0 + c] = simd.reduce_sum_f32s(acc[r][c]);
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

/// `acc[r] += sum_c p[r * p_stride + c * p_key_stride] * v[offs[c] + head_off ..][..len]` for every row of `acc`
/// (stride `len`). Blocks of 4 rows x 2 vectors (x 4 with AVX-512's 32 registers) stay in
/// registers across the whole key loop; each value vector is loaded once per block of rows.
/// `prefetch_offs` (may be empty) names rows to prefetch (at `head_off`, `len` long), one per key
/// step of the first block, so that the next tile streams in while this one computes.
#[inline(always)]
pub(crate) fn accumulate<S: Simd, E: LoadLanes>(
    simd: S,
    p: &[f32],
    (p_stride, p_key_stride): (usize, usize),
    v: &[E],
    offs: &[usize],
    head_off: usize,
    len: usize,
    acc: &mut [f32],
    prefetch_offs: &[usize],
) {
    let rows = acc.len() / len;
    let nvec = len / S::F32_LANES;
    let wide = crate::cpu::wide_registers::<S>();
    let mut r = 0;
    while r < rows {
        let mr = (rows - r).min(4);
        let mut c = 0;
        while c < nvec {
            let nv = (nvec - c).min(if wide && mr == 4 { 4 } else { 2 });
            let pf = if r == 0 && c == 0 { prefetch_offs } else { &[] };
            block_shape!(wide mr, nv, pv_block::<S, E>(simd, p, (p_stride, p_key_stride), v, offs, head_off, len, r, c, acc, pf));
            c += nv;
        }
        r += mr;
    }
}

/// One `MR x NV` block of [`accumulate`].
#[inline(always)]
fn pv_block<S: Simd, E: LoadLanes, const MR: usize, const NV: usize>(
    simd: S,
    p: &[f32],
    (p_stride, p_key_stride): (usize, usize),
    v: &[E],
    offs: &[usize],
    head_off: usize,
    len: usize,
    r0: usize,
    c0: usize,
    acc: &mut [f32],
    prefetch_offs: &[usize],
) {
    let lanes = S::F32_LANES;
    let cols = offs.len();
    assert!(len.is_multiple_of(lanes) && (r0 + MR) * len <= acc.len() && (c0 + NV) * lanes <= len);
    assert!(cols == 0 || (r0 + MR - 1) * p_stride + (cols - 1) * p_key_stride < p.len());
    let ap = acc.as_mut_ptr();
    // SAFETY: offsets below stay within the asserted bounds of `acc` and `p`, and each value
    // row holds `len` elements (asserted per row).
    unsafe {
        let mut regs: [[S::f32s; NV]; MR] = core::array::from_fn(|r| {
            core::array::from_fn(|c| *(ap.add((r0 + r) * len + (c0 + c) * lanes) as *const S::f32s))
        });
        for (j, &off) in offs.iter().enumerate() {
            if let Some(&ahead) = prefetch_offs.get(j) {
                prefetch_slice(v, ahead + head_off, len);
            }
            let start = off + head_off;
            assert!(start + len <= v.len());
            let row = v.as_ptr().add(start);
            let vv: [S::f32s; NV] = core::array::from_fn(|c| E::load_lanes::<S>(row.add((c0 + c) * lanes)));
            for r in 0..MR {
                let pr = simd.splat_f32s(*p.get_unchecked((r0 + r) * p_stride + j * p_key_stride));
                for c in 0..NV {
                    regs[r][c] = simd.mul_add_e_f32s(pr, vv[c], regs[r][c]);
                }
            }
        }
        for r in 0..MR {
            for c in 0..NV {
                *(ap.add((r0 + r) * len + (c0 + c) * lanes) as *mut S::f32s) = regs[r][c];
            }
        }
    }
}

/// Scores of a prompt block with its queries transposed: `st[c * rp + r] = Σ_i qt[i * rp + r] *
/// k[c * k_stride + k_off + i]` for keys `c < cols`, rows `r < rp` (a multiple of the vector
/// width) and `i < len`. Each key element is broadcast against vectors of query rows, so a score
/// is one lane's running sum over `i` in order (no horizontal sums, and no dependence on the
/// blocking), and the softmax that follows runs down the key axis on whole vectors of rows.
/// Blocks of 6 keys x 4 row vectors (24 accumulators) with AVX-512's 32 registers, else 6 x 2
/// (12 accumulators, the 2 row vectors and a broadcast fill AVX2's 16; 12 chains hide the FMA
/// latency that 8 did not); the last keys in fours, pairs, then one. wasm keeps 4 x 2: engines
/// keep a scratch register of the 16.
#[inline(always)]
pub(crate) fn scores_t<S: Simd>(
    simd: S,
    qt: &[f32],
    rp: usize,
    len: usize,
    (k, k_stride, k_off): (&[f32], usize, usize),
    cols: usize,
    st: &mut [f32],
) {
    let wide = crate::cpu::wide_registers::<S>();
    let (nc_max, nv_max) = match () {
        _ if wide => (6, 4),
        _ if cfg!(target_arch = "wasm32") => (4, 2),
        _ => (6, 2),
    };
    let vectors = rp / S::F32_LANES;
    let mut v = 0;
    while v < vectors {
        let nv = match vectors - v {
            n if n >= nv_max => nv_max,
            n if n >= 2 => 2,
            _ => 1,
        };
        let mut c = 0;
        while c < cols {
            // Key blocks of nc_max, then the tail's fours, pairs, then 1.
            let nc = match cols - c {
                n if n >= nc_max => nc_max,
                n if n >= 4 => 4,
                n if n >= 2 => 2,
                _ => 1,
            };
            let args = (qt, rp, len, (k, k_stride, k_off), c, v, &mut *st);
            // Every shape spelled out: a catch-all arm would compute fewer row vectors than the
            // loop then skips.
            match (nc, nv) {
                (6, 4) => st_block::<S, 6, 4>(simd, args),
                (6, 2) => st_block::<S, 6, 2>(simd, args),
                (6, 1) => st_block::<S, 6, 1>(simd, args),
                (4, 4) => st_block::<S, 4, 4>(simd, args),
                (4, 2) => st_block::<S, 4, 2>(simd, args),
                (4, 1) => st_block::<S, 4, 1>(simd, args),
                (2, 4) => st_block::<S, 2, 4>(simd, args),
                (2, 2) => st_block::<S, 2, 2>(simd, args),
                (2, 1) => st_block::<S, 2, 1>(simd, args),
                (1, 4) => st_block::<S, 1, 4>(simd, args),
                (1, 2) => st_block::<S, 1, 2>(simd, args),
                (1, 1) => st_block::<S, 1, 1>(simd, args),
                _ => unreachable!("key blocks are 6, 4, 2 or 1 keys and row blocks 4, 2 or 1 vectors"),
            }
            c += nc;
        }
        v += nv;
    }
}

type StArgs<'a> = (&'a [f32], usize, usize, (&'a [f32], usize, usize), usize, usize, &'a mut [f32]);

/// One `NC keys x NV row vectors` block of [`scores_t`], from key `c0` and row vector `v0`.
#[inline(always)]
fn st_block<S: Simd, const NC: usize, const NV: usize>(simd: S, args: StArgs<'_>) {
    let (qt, rp, len, (k, k_stride, k_off), c0, v0, st) = args;
    let lanes = S::F32_LANES;
    let r0 = v0 * lanes;
    // The pointer reads and writes below stay inside these bounds, checked once per block.
    assert!(len > 0 && (len - 1) * rp + r0 + NV * lanes <= qt.len());
    assert!((c0 + NC - 1) * k_stride + k_off + len <= k.len());
    assert!((c0 + NC - 1) * rp + r0 + NV * lanes <= st.len());
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NV]; NC];
    // SAFETY: every offset below is inside the asserted bounds.
    unsafe {
        let krow: [*const f32; NC] = core::array::from_fn(|c| k.as_ptr().add((c0 + c) * k_stride + k_off));
        let mut qp = qt.as_ptr().add(r0);
        for i in 0..len {
            let qv: [S::f32s; NV] = core::array::from_fn(|v| *(qp.add(v * lanes) as *const S::f32s));
            qp = qp.add(rp);
            for c in 0..NC {
                let kb = simd.splat_f32s(*krow[c].add(i));
                for v in 0..NV {
                    acc[c][v] = simd.mul_add_e_f32s(kb, qv[v], acc[c][v]);
                }
            }
        }
        let sp = st.as_mut_ptr();
        for c in 0..NC {
            for v in 0..NV {
                *(sp.add((c0 + c) * rp + r0 + v * lanes) as *mut S::f32s) = acc[c][v];
            }
        }
    }
}

/// Values of a prompt block with key-major probabilities: `acc[r * len + i] += Σ_c pt[c * rp + r] *
/// v[c * v_stride + v_off + i]` for keys `c < cols`, rows `r < acc.len() / len` and `i < len` (a
/// multiple of the vector width). Each output element sums over the keys in order, whatever the
/// blocking. The tile's rows sit at a fixed stride, so the key loop walks two pointers (the
/// paged [`accumulate`] looks each row up). Blocks of 4 rows x 4 vectors with 32 registers, else
/// 6 x 2 (12 accumulators: enough chains for the FMA latency; wasm keeps 4 x 2).
#[inline(always)]
pub(crate) fn values_t<S: Simd>(
    simd: S,
    pt: &[f32],
    rp: usize,
    (v, v_stride, v_off): (&[f32], usize, usize),
    cols: usize,
    len: usize,
    acc: &mut [f32],
) {
    let wide = crate::cpu::wide_registers::<S>();
    let (mr_max, nv_max) = match () {
        _ if wide => (4, 4),
        _ if cfg!(target_arch = "wasm32") => (4, 2),
        _ => (6, 2),
    };
    let rows = acc.len() / len;
    let nvec = len / S::F32_LANES;
    let mut r = 0;
    while r < rows {
        let mr = match rows - r {
            n if n >= mr_max => mr_max,
            n if n >= 4 => 4,
            n if n >= 2 => 2,
            _ => 1,
        };
        let mut c = 0;
        while c < nvec {
            let nv = match nvec - c {
                n if n >= nv_max => nv_max,
                n if n >= 2 => 2,
                _ => 1,
            };
            let args = (pt, rp, (v, v_stride, v_off), cols, len, r, c, &mut *acc);
            // Every shape spelled out, as in `scores_t`.
            match (mr, nv) {
                (6, 2) => vt_block::<S, 6, 2>(simd, args),
                (6, 1) => vt_block::<S, 6, 1>(simd, args),
                (4, 4) => vt_block::<S, 4, 4>(simd, args),
                (4, 2) => vt_block::<S, 4, 2>(simd, args),
                (4, 1) => vt_block::<S, 4, 1>(simd, args),
                (2, 4) => vt_block::<S, 2, 4>(simd, args),
                (2, 2) => vt_block::<S, 2, 2>(simd, args),
                (2, 1) => vt_block::<S, 2, 1>(simd, args),
                (1, 4) => vt_block::<S, 1, 4>(simd, args),
                (1, 2) => vt_block::<S, 1, 2>(simd, args),
                (1, 1) => vt_block::<S, 1, 1>(simd, args),
                _ => unreachable!("row blocks are 6, 4, 2 or 1 rows and 4, 2 or 1 vectors wide"),
            }
            c += nv;
        }
        r += mr;
    }
}

type VtArgs<'a> = (&'a [f32], usize, (&'a [f32], usize, usize), usize, usize, usize, usize, &'a mut [f32]);

/// One `MR rows x NV vectors` block of [`values_t`], from row `r0` and vector `c0`.
#[inline(always)]
fn vt_block<S: Simd, const MR: usize, const NV: usize>(simd: S, args: VtArgs<'_>) {
    let (pt, rp, (v, v_stride, v_off), cols, len, r0, c0, acc) = args;
    let lanes = S::F32_LANES;
    // The pointer reads and writes below stay inside these bounds, checked once per block.
    assert!(len.is_multiple_of(lanes) && (r0 + MR) * len <= acc.len() && (c0 + NV) * lanes <= len);
    assert!(cols == 0 || ((cols - 1) * rp + r0 + MR <= pt.len() && (cols - 1) * v_stride + v_off + len <= v.len()));
    // SAFETY: every offset below is inside the asserted bounds.
    unsafe {
        let ap = acc.as_mut_ptr().add(c0 * lanes);
        let mut regs: [[S::f32s; NV]; MR] =
            core::array::from_fn(|r| core::array::from_fn(|c| *(ap.add((r0 + r) * len + c * lanes) as *const S::f32s)));
        let mut vp = v.as_ptr().add(v_off + c0 * lanes);
        let mut pp = pt.as_ptr().add(r0);
        for _ in 0..cols {
            let vv: [S::f32s; NV] = core::array::from_fn(|c| *(vp.add(c * lanes) as *const S::f32s));
            for r in 0..MR {
                let pr = simd.splat_f32s(*pp.add(r));
                for c in 0..NV {
                    regs[r][c] = simd.mul_add_e_f32s(pr, vv[c], regs[r][c]);
                }
            }
            vp = vp.add(v_stride);
            pp = pp.add(rp);
        }
        for r in 0..MR {
            for c in 0..NV {
                *(ap.add((r0 + r) * len + c * lanes) as *mut S::f32s) = regs[r][c];
            }
        }
    }
}

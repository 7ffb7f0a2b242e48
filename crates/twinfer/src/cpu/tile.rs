//! Register-blocked micro-kernels on f32 tiles held in L1/L2-sized scratch.
//!
//! Rows of every tile have a padded stride `dp` (a multiple of the vector width) whose padding is
//! zero, so the kernels never handle a tail along the head dimension.

use pulp::Simd;

/// `s[r * s_stride + j] = dot(q[r], k[j])` for `r < rows`, `j < cols`; `q` rows have stride `dp`,
/// `k` rows `k_stride` (several heads may be interleaved in a key tile), both `dp` long.
///
/// Blocks of 4 query rows x 2 key rows keep 8 accumulators in registers and share every load
/// between 2 or 4 FMAs, so the loop is FMA-bound rather than load-bound.
#[inline(always)]
pub(crate) fn scores<S: Simd>(
    simd: S,
    q: &[f32],
    k: &[f32],
    k_stride: usize,
    dp: usize,
    rows: usize,
    cols: usize,
    s: &mut [f32],
    s_stride: usize,
) {
    let mut r = 0;
    while r < rows {
        let mr = (rows - r).min(4);
        let mut j = 0;
        while j < cols {
            let nc = (cols - j).min(2);
            block_shape!(mr, nc, score_block::<S>(simd, q, k, k_stride, dp, r, j, s, s_stride));
            j += nc;
        }
        r += mr;
    }
}

#[inline(always)]
fn score_block<S: Simd, const MR: usize, const NC: usize>(
    simd: S,
    q: &[f32],
    k: &[f32],
    k_stride: usize,
    dp: usize,
    r0: usize,
    j0: usize,
    s: &mut [f32],
    s_stride: usize,
) {
    let lanes = S::F32_LANES;
    let n = dp / lanes;
    // The pointer reads below stay inside these bounds; checking once keeps the loop free of
    // per-element bounds checks.
    assert!(dp.is_multiple_of(lanes) && k_stride.is_multiple_of(lanes));
    assert!((r0 + MR) * dp <= q.len() && (j0 + NC - 1) * k_stride + dp <= k.len());
    let qp = q.as_ptr() as *const S::f32s;
    let kp = k.as_ptr() as *const S::f32s;
    let q_row: [usize; MR] = core::array::from_fn(|r| (r0 + r) * n);
    let k_row: [usize; NC] = core::array::from_fn(|c| (j0 + c) * (k_stride / lanes));
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NC]; MR];
    for i in 0..n {
        // SAFETY: i < n and the asserts above bound every row start plus n vectors.
        unsafe {
            let kv: [S::f32s; NC] = core::array::from_fn(|c| *kp.add(k_row[c] + i));
            for r in 0..MR {
                let qv = *qp.add(q_row[r] + i);
                for c in 0..NC {
                    acc[r][c] = simd.mul_add_e_f32s(qv, kv[c], acc[r][c]);
                }
            }
        }
    }
    for r in 0..MR {
        for c in 0..NC {
            s[(r0 + r) * s_stride + j0 + c] = simd.reduce_sum_f32s(acc[r][c]);
        }
    }
}

/// `acc[r] += sum_j p[r * p_stride + j] * v[j]` for `r < rows`, `j < cols`; `acc` rows have stride
/// `dp`, `v` rows `v_stride` (a multiple of the vector width).
///
/// Blocks of 4 rows x 2 vectors of the head dimension stay in registers across the whole key loop;
/// each value vector is loaded once and used by 4 FMAs.
#[inline(always)]
pub(crate) fn accumulate_pv<S: Simd>(
    simd: S,
    p: &[f32],
    p_stride: usize,
    v: &[f32],
    v_stride: usize,
    dp: usize,
    rows: usize,
    cols: usize,
    acc: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let nvec = dp / lanes;
    let mut r = 0;
    while r < rows {
        let mr = (rows - r).min(4);
        let mut c = 0;
        while c < nvec {
            let nv = (nvec - c).min(2);
            block_shape!(mr, nv, pv_block::<S>(simd, p, p_stride, v, v_stride, dp, r, c, cols, acc));
            c += nv;
        }
        r += mr;
    }
}

#[inline(always)]
fn pv_block<S: Simd, const MR: usize, const NV: usize>(
    simd: S,
    p: &[f32],
    p_stride: usize,
    v: &[f32],
    v_stride: usize,
    dp: usize,
    r0: usize,
    c0: usize,
    cols: usize,
    acc: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let nvec = dp / lanes;
    let v_step = v_stride / lanes;
    // Bounds for the pointer accesses below, checked once.
    assert!(dp.is_multiple_of(lanes) && v_stride.is_multiple_of(lanes) && c0 + NV <= nvec);
    assert!(cols == 0 || (cols - 1) * v_stride + dp <= v.len());
    assert!((r0 + MR) * dp <= acc.len() && (r0 + MR - 1) * p_stride + cols <= p.len());
    let vp = v.as_ptr() as *const S::f32s;
    let pp = p.as_ptr();
    let ap = acc.as_mut_ptr() as *mut S::f32s;
    // SAFETY: every offset is below the bounds asserted above.
    unsafe {
        let mut regs: [[S::f32s; NV]; MR] =
            core::array::from_fn(|r| core::array::from_fn(|c| *ap.add((r0 + r) * nvec + c0 + c)));
        for j in 0..cols {
            let vv: [S::f32s; NV] = core::array::from_fn(|c| *vp.add(j * v_step + c0 + c));
            for r in 0..MR {
                let pr = simd.splat_f32s(*pp.add((r0 + r) * p_stride + j));
                for c in 0..NV {
                    regs[r][c] = simd.mul_add_e_f32s(pr, vv[c], regs[r][c]);
                }
            }
        }
        for r in 0..MR {
            for c in 0..NV {
                *ap.add((r0 + r) * nvec + c0 + c) = regs[r][c];
            }
        }
    }
}

//! `y = x · Wᵀ + b` with `W` block-quantized ([`PackedQuant`]): `x` is `[rows, k]` f32, `y` is
//! `[rows, n]`. Activations stay f32; each weight is decoded in registers (shift, and, or: the
//! code becomes `f = 1 + code / 2^B`; one FMA with the block's map gives the weight, which
//! equals the reference's decoding) and multiplied into an f32 accumulator.
//!
//! A vector of `lanes` words carries the codes of `C` features (8 for 4-bit codes, 4 for 8-bit)
//! at `k = j .. j + lanes`, so it pairs with one vector of `x` and feeds `C` accumulators. As in
//! the float kernel, every output element's arithmetic is the same whatever the batch: lane-wise
//! FMAs over `k` in order, one horizontal sum, then the bias. A sequence's logits are therefore
//! bit-identical alone or batched.
//!
//! Work: chunks of `GROUPS_PER_TASK` feature groups go to the worker threads; a chunk's words
//! (64 features x 576 inputs x 4 bits = 18 KiB) stay in L1/L2 while the rows of `x` pass by.

use pulp::Simd;

use crate::cpu::SimdLevel;
use crate::error::{Result, TwinferError, check_len};
use crate::quant::{BLOCK, PackedQuant};

/// Output features per parallel task, as in the float kernel.
const COLS_PER_TASK: usize = 64;

/// Checks shapes and runs the product on `level`.
pub fn linear_quant(
    level: SimdLevel,
    x: &[f32],
    rows: usize,
    w: &PackedQuant,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let (n, k) = (w.n, w.k);
    check_len("quantized linear x ([rows, k])", rows * k, x.len())?;
    check_len("quantized linear y ([rows, n])", rows * n, y.len())?;
    if let Some(b) = bias {
        check_len("quantized linear bias ([n])", n, b.len())?;
    }
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return Err(TwinferError::InvalidParameter(format!("quantized linear: k = {k} is not a multiple of {BLOCK}")));
    }
    let per = w.cols_per_word();
    let groups_per_task = (COLS_PER_TASK / per).max(1);
    let tasks = w.groups().div_ceil(groups_per_task);
    let out = OutPtr(y.as_mut_ptr());
    let task = |t: usize| {
        let groups = t * groups_per_task..((t + 1) * groups_per_task).min(w.groups());
        match w.format.code_bits() {
            4 => level.dispatch(Chunk::<4, 8> { x, rows, w, groups, bias, out }),
            _ => level.dispatch(Chunk::<8, 4> { x, rows, w, groups, bias, out }),
        }
    };
    #[cfg(not(target_arch = "wasm32"))]
    if rows * n * k >= 1 << 16 {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(task);
        return Ok(());
    }
    (0..tasks).for_each(task);
    Ok(())
}

/// The output's base pointer, shared by tasks that write disjoint feature ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only the features of its own groups, so no two threads touch one
// element.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Feature groups `groups` of `w` for every row; `B` bits per code, `C` features per word.
struct Chunk<'a, const B: u32, const C: usize> {
    x: &'a [f32],
    rows: usize,
    w: &'a PackedQuant,
    groups: std::ops::Range<usize>,
    bias: Option<&'a [f32]>,
    out: OutPtr,
}

impl<const B: u32, const C: usize> pulp::WithSimd for Chunk<'_, B, C> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let (k, lanes) = (self.w.k, S::F32_LANES);
        assert!(BLOCK.is_multiple_of(lanes), "a vector must not straddle two blocks");
        let blocks = k / BLOCK;
        assert!(self.groups.end * k <= self.w.words().len() && self.groups.end <= self.w.groups());
        assert!(self.rows * k <= self.x.len());
        // Code s sits at bits s*B; it must land under the exponent of 1.0, at bit 23 - B.
        let field = simd.splat_u32s(((1u32 << B) - 1) << (23 - B));
        let one = simd.splat_u32s(0x3F80_0000);
        let shifts: [(bool, S::u32s); C] = core::array::from_fn(|s| {
            let to = 23 - B as i32 - s as i32 * B as i32;
            (to >= 0, simd.splat_u32s(to.unsigned_abs()))
        });
        let decode = Decode { field, one, shifts };
        // A group's block maps, turned from the stored (d, m) into (a, b) once per group.
        let mut affine = vec![[0f32; 2]; blocks * C];
        for g in self.groups.clone() {
            self.w.group_affine(g, &mut affine);
            let mut r = 0;
            while r < self.rows {
                // Each decoded weight vector serves up to 4 rows; the arithmetic per output
                // element is the same whatever the block of rows it is in.
                match self.rows - r {
                    1 => self.rows_block::<S, 1>(simd, &decode, &affine, g, r),
                    2 => self.rows_block::<S, 2>(simd, &decode, &affine, g, r),
                    3 => self.rows_block::<S, 3>(simd, &decode, &affine, g, r),
                    _ => self.rows_block::<S, 4>(simd, &decode, &affine, g, r),
                }
                r += (self.rows - r).min(4);
            }
        }
    }
}

/// The constants that turn a word vector into the weights of feature `s`.
struct Decode<S: Simd, const C: usize> {
    field: S::u32s,
    one: S::u32s,
    shifts: [(bool, S::u32s); C],
}

impl<const B: u32, const C: usize> Chunk<'_, B, C> {
    /// Feature group `g` for rows `r0 .. r0 + R`.
    #[inline(always)]
    fn rows_block<S: Simd, const R: usize>(&self, simd: S, d: &Decode<S, C>, gm: &[[f32; 2]], g: usize, r0: usize) {
        let (k, n, lanes) = (self.w.k, self.w.n, S::F32_LANES);
        let blocks = k / BLOCK;
        let gw = &self.w.words()[g * k..(g + 1) * k];
        assert!((r0 + R) * k <= self.x.len() && gm.len() == blocks * C);
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; C]; R];
        for blk in 0..blocks {
            let m = &gm[blk * C..(blk + 1) * C];
            let mut j = blk * BLOCK;
            while j < (blk + 1) * BLOCK {
                // SAFETY: j + lanes <= k, inside this group's words and rows r0..r0+R of x.
                let (wv, xv) = unsafe {
                    let wv = core::ptr::read_unaligned(gw.as_ptr().add(j) as *const S::u32s);
                    let xv: [S::f32s; R] = core::array::from_fn(|r| {
                        core::ptr::read_unaligned(self.x.as_ptr().add((r0 + r) * k + j) as *const S::f32s)
                    });
                    (wv, xv)
                };
                for s in 0..C {
                    let (left, by) = d.shifts[s];
                    let moved =
                        if left { simd.wrapping_dyn_shl_u32s(wv, by) } else { simd.wrapping_dyn_shr_u32s(wv, by) };
                    let f = simd.transmute_f32s_u32s(simd.or_u32s(simd.and_u32s(moved, d.field), d.one));
                    let weight = simd.mul_add_e_f32s(f, simd.splat_f32s(m[s][0]), simd.splat_f32s(m[s][1]));
                    for r in 0..R {
                        acc[r][s] = simd.mul_add_e_f32s(weight, xv[r], acc[r][s]);
                    }
                }
                j += lanes;
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (s, acc) in acc.iter().enumerate() {
                let c = g * C + s;
                if c >= n {
                    break;
                }
                let mut sum = simd.reduce_sum_f32s(*acc);
                if let Some(bias) = self.bias {
                    sum += bias[c];
                }
                // SAFETY: (r0 + r, c) is inside [rows, n], and feature c belongs to this task alone.
                unsafe { *self.out.0.add((r0 + r) * n + c) = sum };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QuantFormat, QuantRows};

    /// Uniform in [-0.5, 0.5), independent between seeds (a hash, not a linear sequence, so
    /// that x and W are uncorrelated and a dot product has terms of both signs).
    fn data(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                let mut z = i.wrapping_add(seed << 32).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z ^= z >> 31;
                (z >> 40) as f32 / 16_777_216.0 - 0.5
            })
            .collect()
    }

    /// Against an f64 product over the reference decoding of the same blocks, on every level;
    /// each row alone gives the same bits as inside the batch.
    #[test]
    fn matches_f64_over_the_reference_decoding_and_is_batch_invariant() {
        for level in SimdLevel::available() {
            for format in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1] {
                for &(rows, n, k) in &[(1, 3, 32), (7, 70, 96), (5, 130, 64), (2, 64, 576)] {
                    let x = data(rows * k, 1);
                    let rows_q = QuantRows::quantize(format, &data(n * k, 2), n, k).unwrap();
                    let reference = rows_q.to_f32();
                    let packed = PackedQuant::from_rows(&rows_q);
                    let bias = data(n, 3);
                    let mut y = vec![f32::NAN; rows * n];
                    linear_quant(level, &x, rows, &packed, Some(&bias), &mut y).unwrap();
                    for r in 0..rows {
                        for c in 0..n {
                            let dot: f64 =
                                (0..k).map(|j| x[r * k + j] as f64 * reference[c * k + j] as f64).sum::<f64>();
                            let mag: f64 = (0..k).map(|j| (x[r * k + j] * reference[c * k + j]).abs() as f64).sum();
                            let want = dot + bias[c] as f64;
                            let got = y[r * n + c] as f64;
                            // The error bound of f32 sums: each lane adds k / lanes terms in
                            // order, then the lanes are summed pairwise and the bias added, each
                            // addition rounding by at most half an ulp of the partial sum (which
                            // is at most the sum of magnitudes). Decoding itself is exact (the
                            // packing test checks it bit for bit).
                            let lanes = level.f32_lanes() as f64;
                            let adds = (k as f64 / lanes).max(1.0) + 2.0 * lanes.log2() + 2.0;
                            let tol = adds * f32::EPSILON as f64 / 2.0 * (mag + bias[c].abs() as f64);
                            assert!(
                                (got - want).abs() <= tol,
                                "{level} {format:?} {rows}x{n}x{k} [{r},{c}]: {got} vs {want}"
                            );
                        }
                        let mut alone = vec![f32::NAN; n];
                        linear_quant(level, &x[r * k..(r + 1) * k], 1, &packed, Some(&bias), &mut alone).unwrap();
                        assert_eq!(alone, y[r * n..(r + 1) * n], "{level} {format:?}: row {r} of {rows}");
                    }
                }
            }
        }
    }

    #[test]
    fn shape_errors_are_typed() {
        let rows = QuantRows::quantize(QuantFormat::Q8_0, &[0.0; 64], 2, 32).unwrap();
        let packed = PackedQuant::from_rows(&rows);
        let mut y = vec![0.0; 2];
        let e = linear_quant(SimdLevel::Scalar, &[0.0; 31], 1, &packed, None, &mut y).unwrap_err();
        assert!(matches!(e, TwinferError::ShapeMismatch { .. }));
    }
}

//! aarch64 NEON kernels, a quarter tile (4 features) at a time:
//! - with the dot-product extension (FEAT_DotProd: Cortex-A55/A76 and later, Apple M1 and later,
//!   Graviton 2 and later), `sdot` sums four byte products into each i32 lane, one instruction per
//!   16 products, on the tile's layout as it is (each 32-bit lane one feature's four codes);
//! - without it (Cortex-A53/A72, such as a Raspberry Pi 3 or 4), widening multiplies
//!   (`smull`/`smlal`, signed bytes to i16) and pairwise accumulation into i32 (`sadalp`): four
//!   instructions per 16 products. No product pair can overflow i16: `128 * 127` for 8-bit codes,
//!   `2 * 15 * 127` for two 4-bit ones.
//!
//! Both take each activation code as two int8 digits and join the digits' sums
//! (`255 * coarse + fine`) in integers, so they give the same i32 sums as the other levels and,
//! through the same float epilogue, the same bits.

use core::arch::aarch64::*;
use core::arch::asm;
use core::ptr::read_unaligned;

use super::{F16_REBASE, QuantizedRows, TileRef, for_rows};
use crate::quant::TILE;

/// # Safety
/// NEON must be present and `t.check(a, r0, rows)` must hold.
#[target_feature(enable = "neon")]
pub(super) unsafe fn tile_rows(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, rows: usize, out: &mut [[f32; TILE]]) {
    // SAFETY: forwarded.
    unsafe { for_rows!(narrow rows, kernel(t, a, r0, out)) }
}

/// Four f16 scales (bits) as f32, exactly (see [`F16_REBASE`]).
#[inline(always)]
unsafe fn f16x4(p: *const u16) -> float32x4_t {
    // SAFETY: the caller passes 4 readable scales.
    unsafe {
        let h = vmovl_u16(vld1_u16(p));
        let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
        let magnitude = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7fff)));
        let f = vmulq_f32(vreinterpretq_f32_u32(magnitude), vdupq_n_f32(F16_REBASE));
        vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(f), sign))
    }
}

/// Four i8 multipliers as f32.
#[inline(always)]
unsafe fn i8x4(p: *const i8) -> float32x4_t {
    // SAFETY: the caller passes 4 readable bytes.
    unsafe {
        let bytes = vreinterpret_s8_s32(vdup_n_s32(read_unaligned(p as *const i32)));
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(bytes))))
    }
}

/// Features `4q .. 4q + 4`'s scales for half `h` of block `blk` (the f16 scale times the
/// K-quants' multiplier, exact).
///
/// # Safety
/// `blk`, `h` and `q` inside the tile (`check`).
#[inline(always)]
unsafe fn scales4(t: &TileRef<'_>, blk: usize, h: usize, q: usize) -> float32x4_t {
    // SAFETY: `check` bounds `d` and `ds` for every block and half.
    unsafe {
        let d = f16x4(t.d.as_ptr().add(t.group(blk) + 4 * q));
        if t.ds.is_empty() { d } else { vmulq_f32(d, i8x4(t.ds.as_ptr().add(t.sub(blk, h) + 4 * q))) }
    }
}

/// Features `4q .. 4q + 4`'s minima in block `blk`, if the format has them.
///
/// # Safety
/// As [`scales4`].
#[inline(always)]
unsafe fn minima4(t: &TileRef<'_>, blk: usize, q: usize) -> Option<float32x4_t> {
    if t.m.is_empty() {
        return None;
    }
    // SAFETY: `check` bounds `m` and `ms` for every block.
    unsafe {
        let m = f16x4(t.m.as_ptr().add(t.group(blk) + 4 * q));
        Some(if t.ms.is_empty() { m } else { vmulq_f32(m, i8x4(t.ms.as_ptr().add(blk * TILE + 4 * q))) })
    }
}

/// Where a block half's sums belong: rows from `r0`, block `blk`, half `h`, features
/// `4 quarter .. 4 quarter + 4`.
#[derive(Clone, Copy)]
struct Place {
    r0: usize,
    blk: usize,
    h: usize,
    quarter: usize,
}

/// `acc[r] +=` the block half's exact integer sums of row `r0 + r` (one i32 lane per feature,
/// per digit: joined here), less the codes' zero point, times the features' scales and the row's activation scale.
///
/// # Safety
/// `t.check(a, r0, R)` must hold and the place be inside the tile.
#[inline(always)]
unsafe fn add_scaled<const R: usize>(
    acc: &mut [float32x4_t; R],
    sums: [[int32x4_t; 2]; R],
    t: &TileRef<'_>,
    a: &QuantizedRows,
    p: Place,
) {
    // SAFETY: per the caller, as in the kernels.
    unsafe {
        let d = scales4(t, p.blk, p.h, p.quarter);
        for r in 0..R {
            let at = (p.r0 + r) * t.blocks + p.blk;
            let zero = vdupq_n_s32(t.zero * a.half_sum(at, p.h, t.halves));
            let joined = vmlaq_n_s32(sums[r][1], sums[r][0], super::DIGIT_BASE);
            let s = vsubq_s32(joined, zero);
            let scale = vmulq_f32(d, vdupq_n_f32(*a.dx.get_unchecked(at)));
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(s), scale);
        }
    }
}

/// `acc[r] +=` the features' block minima times row `r0 + r`'s block sum, for formats with minima.
///
/// # Safety
/// As [`add_scaled`].
#[inline(always)]
unsafe fn add_minima<const R: usize>(
    acc: &mut [float32x4_t; R],
    t: &TileRef<'_>,
    a: &QuantizedRows,
    r0: usize,
    blk: usize,
    quarter: usize,
) {
    // SAFETY: per the caller.
    unsafe {
        if let Some(m) = minima4(t, blk, quarter) {
            for r in 0..R {
                let at = (r0 + r) * t.blocks + blk;
                acc[r] = vfmaq_f32(acc[r], m, vdupq_n_f32(*a.sx.get_unchecked(at)));
            }
        }
    }
}

/// Whether this CPU has `sdot` (the kernels check it per call; std caches the answer).
pub(super) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `acc` plus, in each i32 lane, the dot product of that lane's four i8 of `a` and of `b`. The
/// `vdotq_s32` intrinsic is not stable yet, hence the instruction itself.
///
/// # Safety
/// The CPU must have the dot-product extension.
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: a register-only instruction, present per the caller.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Activation bytes `4i .. 4i + 4` of a block in every 32-bit lane.
#[inline(always)]
unsafe fn quad_lanes(x: *const i8, i: usize) -> int8x16_t {
    // SAFETY: the caller passes a block start with 32 bytes behind it.
    unsafe { vreinterpretq_s8_s32(vdupq_n_s32(read_unaligned(x.add(4 * i) as *const i32))) }
}

/// # Safety
/// NEON and the dot-product extension must be present and `t.check(a, r0, rows)` must hold.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn tile_rows_dotprod(
    t: &TileRef<'_>,
    a: &QuantizedRows,
    r0: usize,
    rows: usize,
    out: &mut [[f32; TILE]],
) {
    // SAFETY: forwarded.
    unsafe { for_rows!(narrow rows, kernel_dotprod(t, a, r0, out)) }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn kernel_dotprod<const R: usize>(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, out: &mut [[f32; TILE]]) {
    let (bb, nb) = (t.block_bytes(), t.blocks);
    for quarter in 0..4 {
        let mut acc = [vdupq_n_f32(0.0); R];
        for blk in 0..nb {
            // SAFETY (all reads below): as in `kernel`; `sdot` is present per the caller.
            unsafe {
                let base = t.codes.as_ptr().add(blk * bb + quarter * 16);
                let xs: [[*const i8; 2]; R] = core::array::from_fn(|r| {
                    core::array::from_fn(|d| a.digits.as_ptr().add(a.digit_at(r0 + r, d, blk)))
                });
                for h in 0..t.halves {
                    // One i32 lane per feature of the quarter.
                    let mut sums = [[vdupq_n_s32(0); 2]; R];
                    if t.bits == 4 {
                        for g in 0..4 {
                            let v = vld1q_u8(base.add(g * 64));
                            let lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
                            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                            for r in 0..R {
                                for d in 0..2 {
                                    sums[r][d] = sdot(sums[r][d], lo, quad_lanes(xs[r][d], g));
                                    sums[r][d] = sdot(sums[r][d], hi, quad_lanes(xs[r][d], g + 4));
                                }
                            }
                        }
                    } else {
                        for g in t.rows_of_half(h) {
                            let v = vld1q_s8(base.add(g * 64) as *const i8);
                            for r in 0..R {
                                for d in 0..2 {
                                    sums[r][d] = sdot(sums[r][d], v, quad_lanes(xs[r][d], g));
                                }
                            }
                        }
                    }
                    add_scaled(&mut acc, sums, t, a, Place { r0, blk, h, quarter });
                }
                add_minima(&mut acc, t, a, r0, blk, quarter);
            }
        }
        for r in 0..R {
            // SAFETY: out[r] holds 16 floats; this quarter writes 4q..4q+4.
            unsafe { vst1q_f32(out[r].as_mut_ptr().add(quarter * 4), acc[r]) };
        }
    }
}

#[inline(always)]
unsafe fn quad(x: *const i8, i: usize) -> int8x8_t {
    // SAFETY: the caller passes a block start with 32 bytes behind it.
    unsafe { vreinterpret_s8_s32(vdup_n_s32(read_unaligned(x.add(4 * i) as *const i32))) }
}

#[target_feature(enable = "neon")]
unsafe fn kernel<const R: usize>(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, out: &mut [[f32; TILE]]) {
    let (bb, nb) = (t.block_bytes(), t.blocks);
    for quarter in 0..4 {
        let mut acc = [vdupq_n_f32(0.0); R];
        for blk in 0..nb {
            // SAFETY (all reads below): `check` guarantees nb blocks of codes and scales, and
            // rows r0..r0+R of k activations; a quarter reads 16 bytes of each 64-byte row.
            unsafe {
                let base = t.codes.as_ptr().add(blk * bb + quarter * 16);
                let xs: [[*const i8; 2]; R] = core::array::from_fn(|r| {
                    core::array::from_fn(|d| a.digits.as_ptr().add(a.digit_at(r0 + r, d, blk)))
                });
                for h in 0..t.halves {
                    // Features (0, 1) and (2, 3) of the quarter, each as two partial sums, per
                    // row and digit.
                    let mut pa = [[vdupq_n_s32(0); 2]; R];
                    let mut pb = [[vdupq_n_s32(0); 2]; R];
                    if t.bits == 4 {
                        for g in 0..4 {
                            let v = vld1q_u8(base.add(g * 64));
                            let lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
                            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                            for r in 0..R {
                                for d in 0..2 {
                                    let (xl, xh) = (quad(xs[r][d], g), quad(xs[r][d], g + 4));
                                    let first = vmlal_s8(vmull_s8(vget_low_s8(lo), xl), vget_low_s8(hi), xh);
                                    let second = vmlal_s8(vmull_s8(vget_high_s8(lo), xl), vget_high_s8(hi), xh);
                                    pa[r][d] = vpadalq_s16(pa[r][d], first);
                                    pb[r][d] = vpadalq_s16(pb[r][d], second);
                                }
                            }
                        }
                    } else {
                        for g in t.rows_of_half(h) {
                            let v = vld1q_s8(base.add(g * 64) as *const i8);
                            for r in 0..R {
                                for d in 0..2 {
                                    let x = quad(xs[r][d], g);
                                    pa[r][d] = vpadalq_s16(pa[r][d], vmull_s8(vget_low_s8(v), x));
                                    pb[r][d] = vpadalq_s16(pb[r][d], vmull_s8(vget_high_s8(v), x));
                                }
                            }
                        }
                    }
                    let sums: [[int32x4_t; 2]; R] =
                        core::array::from_fn(|r| core::array::from_fn(|d| vpaddq_s32(pa[r][d], pb[r][d])));
                    add_scaled(&mut acc, sums, t, a, Place { r0, blk, h, quarter });
                }
                add_minima(&mut acc, t, a, r0, blk, quarter);
            }
        }
        for r in 0..R {
            // SAFETY: out[r] holds 16 floats; this quarter writes 4q..4q+4.
            unsafe { vst1q_f32(out[r].as_mut_ptr().add(quarter * 4), acc[r]) };
        }
    }
}

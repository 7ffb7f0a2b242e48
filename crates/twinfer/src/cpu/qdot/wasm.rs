//! wasm simd128 kernel, a quarter tile (4 features) at a time: the weight codes widened to 16 bits
//! times the 16-bit activation codes in pairs (`i32x4.dot_i16x8_s`, `pmaddwd` on x86), as the
//! AVX2 kernel does. simd128 has no fused multiply-add, so the float part is a multiply and an add.
//! In the relaxed-SIMD build, 4-bit codes take `i32x4.relaxed_dot_i8x16_i7x16_add_s` instead, on
//! the activation codes as two int8 digits (their sums join in integers, `255 * coarse + fine`):
//! one instruction sums four activation bytes times four codes per feature. Its result is defined
//! exactly when the second operand's bytes fit 7 bits, which nibbles (0..=15) do, so the sums are
//! the same integers as the plain path's; 8-bit codes (-128..=127) take the 16-bit products.
//! With 8-bit activation codes ([`super::ActivationCodes::Int8`]) the coarse digits are zero, and
//! the relaxed build skips their dot products: half the instructions on 4-bit weights.

use core::arch::wasm32::*;
use core::ptr::read_unaligned;

use super::{ActivationCodes, DIGIT_BASE, F16_REBASE, QuantizedRows, TileRef, for_rows};
use crate::quant::{BLOCK, TILE};

/// # Safety
/// The module must be built with simd128 and `t.check(a, r0, rows)` must hold.
#[target_feature(enable = "simd128")]
pub(super) unsafe fn tile_rows(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, rows: usize, out: &mut [[f32; TILE]]) {
    // SAFETY: forwarded.
    unsafe { for_rows!(narrow rows, kernel(t, a, r0, out)) }
}

/// Four f16 scales (bits) as f32, exactly (see [`F16_REBASE`]).
#[inline(always)]
unsafe fn f16x4(p: *const u16) -> v128 {
    // SAFETY: the caller passes 4 readable scales.
    let h = unsafe { u32x4_load_extend_u16x4(p) };
    let sign = u32x4_shl(v128_and(h, u32x4_splat(0x8000)), 16);
    let magnitude = u32x4_shl(v128_and(h, u32x4_splat(0x7fff)), 13);
    v128_or(f32x4_mul(magnitude, f32x4_splat(F16_REBASE)), sign)
}

/// Four i8 multipliers as f32.
#[inline(always)]
unsafe fn i8x4(p: *const i8) -> v128 {
    // SAFETY: the caller passes 4 readable bytes.
    let bytes = i32x4_splat(unsafe { read_unaligned(p as *const i32) });
    f32x4_convert_i32x4(i32x4_extend_low_i16x8(i16x8_extend_low_i8x16(bytes)))
}

/// Features `4q .. 4q + 4`'s scales for half `h` of block `blk` (the f16 scale times the
/// K-quants' multiplier, exact).
///
/// # Safety
/// `blk`, `h` and `q` inside the tile (`check`).
#[inline(always)]
unsafe fn scales4(t: &TileRef<'_>, blk: usize, h: usize, q: usize) -> v128 {
    // SAFETY: `check` bounds `d` and `ds` for every block and half.
    unsafe {
        let d = f16x4(t.d.as_ptr().add(t.group(blk) + 4 * q));
        if t.ds.is_empty() { d } else { f32x4_mul(d, i8x4(t.ds.as_ptr().add(t.sub(blk, h) + 4 * q))) }
    }
}

/// Features `4q .. 4q + 4`'s minima in block `blk`, if the format has them.
///
/// # Safety
/// As [`scales4`].
#[inline(always)]
unsafe fn minima4(t: &TileRef<'_>, blk: usize, q: usize) -> Option<v128> {
    if t.m.is_empty() {
        return None;
    }
    // SAFETY: `check` bounds `m` and `ms` for every block.
    unsafe {
        let m = f16x4(t.m.as_ptr().add(t.group(blk) + 4 * q));
        Some(if t.ms.is_empty() { m } else { f32x4_mul(m, i8x4(t.ms.as_ptr().add(blk * TILE + 4 * q))) })
    }
}

/// Digit bytes `4i .. 4i + 4` of a block, in every lane (the relaxed build's dot product).
#[cfg(all(feature = "relaxed-simd", target_feature = "relaxed-simd"))]
#[inline(always)]
unsafe fn quad(x: *const i8, i: usize) -> v128 {
    // SAFETY: the caller passes a block start with 32 bytes behind it.
    i32x4_splat(unsafe { read_unaligned(x.add(4 * i) as *const i32) })
}

/// Activation codes `4i .. 4i + 4` of a block, in both 64-bit halves.
#[inline(always)]
unsafe fn quad16(x: *const i16, i: usize) -> v128 {
    // SAFETY: the caller passes a block start with 32 codes behind it.
    i64x2_splat(unsafe { read_unaligned(x.add(4 * i) as *const i64) })
}

/// Whether this build has relaxed SIMD's integer dot product.
const RELAXED_DOT: bool = cfg!(all(feature = "relaxed-simd", target_feature = "relaxed-simd"));

/// A 4-bit block's integer sums for one quarter tile (features `4q .. 4q + 4` at `base`) and
/// each row: `Σ lo(code) * x[4g + j] + hi(code) * x[16 + 4g + j]` over the 4 code rows, per digit
/// from `FIRST_DIGIT` (1: the fine digits alone, whose coarse ones are zero; the coarse sums stay
/// zero).
///
/// # Safety
/// As the kernel's reads: 4 code rows of 64 bytes from `base`, 32 activation bytes per row.
#[cfg(all(feature = "relaxed-simd", target_feature = "relaxed-simd"))]
#[inline(always)]
unsafe fn nibble_dots<const R: usize, const FIRST_DIGIT: usize>(
    base: *const u8,
    xs: &[[*const i8; 2]; R],
) -> [[v128; 2]; R] {
    let mut p = [[i32x4_splat(0); 2]; R];
    for g in 0..4 {
        // SAFETY: forwarded from the caller.
        unsafe {
            let v = v128_load(base.add(g * 64) as *const v128);
            let (lo, hi) = (v128_and(v, u8x16_splat(0x0f)), u8x16_shr(v, 4));
            for r in 0..R {
                for d in FIRST_DIGIT..2 {
                    p[r][d] = i32x4_relaxed_dot_i8x16_i7x16_add(quad(xs[r][d], g), lo, p[r][d]);
                    p[r][d] = i32x4_relaxed_dot_i8x16_i7x16_add(quad(xs[r][d], g + 4), hi, p[r][d]);
                }
            }
        }
    }
    p
}

/// The plain build never calls it (`RELAXED_DOT` is false there).
#[cfg(not(all(feature = "relaxed-simd", target_feature = "relaxed-simd")))]
#[inline(always)]
unsafe fn nibble_dots<const R: usize, const FIRST_DIGIT: usize>(
    _base: *const u8,
    _xs: &[[*const i8; 2]; R],
) -> [[v128; 2]; R] {
    unreachable!("relaxed SIMD is not in this build")
}

#[target_feature(enable = "simd128")]
unsafe fn kernel<const R: usize>(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, out: &mut [[f32; TILE]]) {
    let (bb, nb) = (t.block_bytes(), t.blocks);
    for quarter in 0..4 {
        let mut acc = [f32x4_splat(0.0); R];
        for blk in 0..nb {
            // SAFETY (all reads below): `check` guarantees nb blocks of codes and scales, and
            // rows r0..r0+R of k activations; a quarter reads 16 bytes of each 64-byte row.
            unsafe {
                let base = t.codes.as_ptr().add(blk * bb + quarter * 16);
                let xs16: [*const i16; R] = core::array::from_fn(|r| a.q.as_ptr().add((r0 + r) * a.k + blk * BLOCK));
                for h in 0..t.halves {
                    // Features (0, 1) and (2, 3) of the quarter, each as two partial sums.
                    let mut pa = [i32x4_splat(0); R];
                    let mut pb = [i32x4_splat(0); R];
                    // Per-feature sums straight from the relaxed dot product, per digit (4-bit
                    // codes only).
                    let mut dots: Option<[[v128; 2]; R]> = None;
                    if t.bits == 4 && RELAXED_DOT {
                        let xs: [[*const i8; 2]; R] = core::array::from_fn(|r| {
                            core::array::from_fn(|d| a.digits.as_ptr().add(a.digit_at(r0 + r, d, blk)))
                        });
                        dots = Some(match a.codes {
                            ActivationCodes::Int16 => nibble_dots::<R, 0>(base, &xs),
                            ActivationCodes::Int8 => nibble_dots::<R, 1>(base, &xs),
                        });
                    } else if t.bits == 4 {
                        for g in 0..4 {
                            let v = v128_load(base.add(g * 64) as *const v128);
                            let lo = v128_and(v, u8x16_splat(0x0f));
                            let hi = u8x16_shr(v, 4);
                            let (lo_a, lo_b) = (u16x8_extend_low_u8x16(lo), u16x8_extend_high_u8x16(lo));
                            let (hi_a, hi_b) = (u16x8_extend_low_u8x16(hi), u16x8_extend_high_u8x16(hi));
                            for r in 0..R {
                                let (xl, xh) = (quad16(xs16[r], g), quad16(xs16[r], g + 4));
                                let first = i32x4_add(i32x4_dot_i16x8(lo_a, xl), i32x4_dot_i16x8(hi_a, xh));
                                let second = i32x4_add(i32x4_dot_i16x8(lo_b, xl), i32x4_dot_i16x8(hi_b, xh));
                                pa[r] = i32x4_add(pa[r], first);
                                pb[r] = i32x4_add(pb[r], second);
                            }
                        }
                    } else {
                        for g in t.rows_of_half(h) {
                            let v = v128_load(base.add(g * 64) as *const v128);
                            let (wa, wb) = (i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v));
                            for r in 0..R {
                                let x = quad16(xs16[r], g);
                                pa[r] = i32x4_add(pa[r], i32x4_dot_i16x8(wa, x));
                                pb[r] = i32x4_add(pb[r], i32x4_dot_i16x8(wb, x));
                            }
                        }
                    }
                    let d = scales4(t, blk, h, quarter);
                    for r in 0..R {
                        let at = (r0 + r) * nb + blk;
                        let sums = match dots {
                            Some(dots) => i32x4_add(i32x4_mul(dots[r][0], i32x4_splat(DIGIT_BASE)), dots[r][1]),
                            None => i32x4_add(
                                i32x4_shuffle::<0, 2, 4, 6>(pa[r], pb[r]),
                                i32x4_shuffle::<1, 3, 5, 7>(pa[r], pb[r]),
                            ),
                        };
                        let s = i32x4_sub(sums, i32x4_splat(t.zero * a.half_sum(at, h, t.halves)));
                        let scale = f32x4_mul(d, f32x4_splat(*a.dx.get_unchecked(at)));
                        acc[r] = f32x4_add(acc[r], f32x4_mul(f32x4_convert_i32x4(s), scale));
                    }
                }
                if let Some(m) = minima4(t, blk, quarter) {
                    for r in 0..R {
                        let at = (r0 + r) * nb + blk;
                        acc[r] = f32x4_add(acc[r], f32x4_mul(m, f32x4_splat(*a.sx.get_unchecked(at))));
                    }
                }
            }
        }
        for r in 0..R {
            // SAFETY: out[r] holds 16 floats; this quarter writes 4q..4q+4.
            unsafe { v128_store(out[r].as_mut_ptr().add(quarter * 4) as *mut v128, acc[r]) };
        }
    }
}

//! x86-64 kernels for AVX-512 VNNI (`vpdpbusd`: 64 byte products a cycle into 16 features, once
//! per digit of the activations), and what the AVX2 kernel ([`super::x86_avx2`]) shares with them.
//!
//! VNNI takes unsigned bytes times signed bytes. 4-bit codes are unsigned already. 8-bit codes are
//! signed: VNNI biases them by +128 (xor 0x80) and subtracts `128 * Σq` from the joined sum.

use core::arch::x86_64::*;
use core::ptr::read_unaligned;

use super::{ActivationCodes, QuantizedRows, TileRef, for_rows};
use crate::quant::TILE;

/// How far ahead of the block being summed its tile's codes are prefetched. The hardware
/// prefetcher alone left decode at about 5 GB/s per core: a task's tiles are short streams.
pub(super) const PREFETCH_AHEAD: usize = 2048;

/// Prefetches the `bytes` that follow `base + PREFETCH_AHEAD` into L1.
#[inline(always)]
pub(super) fn prefetch_ahead(base: *const u8, bytes: usize) {
    let ahead = base.wrapping_add(PREFETCH_AHEAD);
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8) };
    }
}

pub(super) fn has_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Activation bytes `4i .. 4i + 4` of a block's digits, as one i32 for a broadcast.
#[inline(always)]
pub(super) unsafe fn quad(x: *const i8, i: usize) -> i32 {
    // SAFETY: the caller passes a block start with 32 bytes behind it.
    unsafe { read_unaligned(x.add(4 * i) as *const i32) }
}

/// The 16 features' scales for half `h` of block `blk`: the f16 scale, times the K-quants'
/// multiplier (exact).
///
/// # Safety
/// AVX-512 F must be present and `blk`, `h` inside the tile (`check`).
#[inline]
#[target_feature(enable = "avx512f,avx2,f16c")]
unsafe fn scales16(t: &TileRef<'_>, blk: usize, h: usize) -> __m512 {
    // SAFETY: `check` bounds `d` and `ds` for every block and half.
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr().add(t.group(blk)) as *const __m256i));
        if t.ds.is_empty() {
            return d;
        }
        let mult = _mm_loadu_si128(t.ds.as_ptr().add(t.sub(blk, h)) as *const __m128i);
        _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(mult)))
    }
}

/// The 16 features' minima in block `blk` (with Q4_K's multipliers), if the format has them.
///
/// # Safety
/// As [`scales16`].
#[inline]
#[target_feature(enable = "avx512f,avx2,f16c")]
unsafe fn minima16(t: &TileRef<'_>, blk: usize) -> Option<__m512> {
    if t.m.is_empty() {
        return None;
    }
    // SAFETY: `check` bounds `m` and `ms` for every block.
    unsafe {
        let m = _mm512_cvtph_ps(_mm256_loadu_si256(t.m.as_ptr().add(t.group(blk)) as *const __m256i));
        if t.ms.is_empty() {
            return Some(m);
        }
        let mult = _mm_loadu_si128(t.ms.as_ptr().add(blk * TILE) as *const __m128i);
        Some(_mm512_mul_ps(m, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(mult))))
    }
}

/// # Safety
/// AVX-512 F/BW/VNNI must be present and `t.check(a, r0, rows)` must hold.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn tile_rows_vnni(
    t: &TileRef<'_>,
    a: &QuantizedRows,
    r0: usize,
    rows: usize,
    out: &mut [[f32; TILE]],
) {
    // SAFETY: forwarded.
    unsafe {
        match a.codes {
            ActivationCodes::Int16 => for_rows!(rows, vnni_two_digits(t, a, r0, out)),
            ActivationCodes::Int8 => for_rows!(rows, vnni_one_digit(t, a, r0, out)),
        }
    }
}

/// [`vnni`] over both digits of 16-bit codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_two_digits<const R: usize>(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, out: &mut [[f32; TILE]]) {
    // SAFETY: forwarded.
    unsafe { vnni::<R, false>(t, a, r0, out) }
}

/// [`vnni`] over the fine digits alone: 8-bit codes' coarse digits are zero.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_one_digit<const R: usize>(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, out: &mut [[f32; TILE]]) {
    // SAFETY: forwarded.
    unsafe { vnni::<R, true>(t, a, r0, out) }
}

/// Two tiles of a format with one scale a block (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; not the K-quants):
/// [`vnni`]'s
/// arithmetic for each tile, bit for bit, but each broadcast activation feeds both tiles and each
/// block's scaling shares its loads, so the `vpdpbusd` are a larger share of the instructions.
///
/// # Safety
/// AVX-512 F/BW/VNNI must be present, `t[i].check(a, r0, rows)` must hold for both, and both must
/// be [`pairs_apply`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn tile_pair_rows_vnni(
    t: [&TileRef<'_>; 2],
    a: &QuantizedRows,
    r0: usize,
    rows: usize,
    out: [&mut [[f32; TILE]]; 2],
) {
    // SAFETY: forwarded.
    unsafe {
        match a.codes {
            ActivationCodes::Int16 => for_rows!(rows, vnni_pair_two_digits(t, a, r0, out)),
            ActivationCodes::Int8 => for_rows!(rows, vnni_pair_one_digit(t, a, r0, out)),
        }
    }
}

/// Whether [`tile_pair_rows_vnni`] takes these tiles.
pub(super) fn pairs_apply(t: &TileRef<'_>) -> bool {
    t.halves == 1 && t.ds.is_empty() && t.ms.is_empty()
}

/// [`vnni_pair`] over both digits of 16-bit codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_pair_two_digits<const R: usize>(
    t: [&TileRef<'_>; 2],
    a: &QuantizedRows,
    r0: usize,
    out: [&mut [[f32; TILE]]; 2],
) {
    // SAFETY: forwarded.
    unsafe { vnni_pair::<R, false>(t, a, r0, out) }
}

/// [`vnni_pair`] over the fine digits alone.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_pair_one_digit<const R: usize>(
    t: [&TileRef<'_>; 2],
    a: &QuantizedRows,
    r0: usize,
    out: [&mut [[f32; TILE]]; 2],
) {
    // SAFETY: forwarded.
    unsafe { vnni_pair::<R, true>(t, a, r0, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_pair<const R: usize, const FINE_ONLY: bool>(
    t: [&TileRef<'_>; 2],
    a: &QuantizedRows,
    r0: usize,
    out: [&mut [[f32; TILE]]; 2],
) {
    let (bb, nb) = (t[0].block_bytes(), t[0].blocks);
    let low = _mm512_set1_epi8(0x0f);
    let flip = _mm512_set1_epi8(-128);
    // 8-bit codes are biased by 128 here, so their zero is 128, as in `vnni`.
    let zero = if t[0].bits == 8 { 128 } else { t[0].zero };
    // The digits summed: the coarse (0) and the fine (1), or the fine alone.
    let digits = if FINE_ONLY { 1..2 } else { 0..2 };
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for blk in 0..nb {
        // SAFETY (all reads below): `check` guarantees nb blocks of codes and scales in each
        // tile, and rows r0..r0+R of k activations (two digit rows each) with nb scales and sums.
        unsafe {
            let base = [t[0].codes.as_ptr().add(blk * bb), t[1].codes.as_ptr().add(blk * bb)];
            prefetch_ahead(base[0], bb);
            prefetch_ahead(base[1], bb);
            let xs: [[*const i8; 2]; R] =
                core::array::from_fn(|r| core::array::from_fn(|d| a.digits.as_ptr().add(a.digit_at(r0 + r, d, blk))));
            // `[row][tile][digit]`; the fine sums start at the zero code's share, `-zero * Σq`.
            let mut isum: [[[__m512i; 2]; 2]; R] = core::array::from_fn(|r| {
                let less_zero = _mm512_set1_epi32(-zero * *a.qsum.get_unchecked((r0 + r) * nb + blk));
                [[_mm512_setzero_si512(), less_zero]; 2]
            });
            if t[0].bits == 4 {
                // Each byte holds inputs g and g + 16 of a feature's block: low and high nibbles.
                for g in [0, 1, 2, 3] {
                    let v: [__m512i; 2] =
                        core::array::from_fn(|i| _mm512_loadu_si512(base[i].add(g * 64) as *const __m512i));
                    let lo = v.map(|v| _mm512_and_si512(v, low));
                    let hi = v.map(|v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), low));
                    for r in 0..R {
                        for d in digits.clone() {
                            let x_lo = _mm512_set1_epi32(quad(xs[r][d], g));
                            let x_hi = _mm512_set1_epi32(quad(xs[r][d], g + 4));
                            for i in 0..2 {
                                let s = _mm512_dpbusd_epi32(isum[r][i][d], lo[i], x_lo);
                                isum[r][i][d] = _mm512_dpbusd_epi32(s, hi[i], x_hi);
                            }
                        }
                    }
                }
            } else {
                for g in [0, 1, 2, 3, 4, 5, 6, 7] {
                    let v: [__m512i; 2] = core::array::from_fn(|i| {
                        _mm512_xor_si512(_mm512_loadu_si512(base[i].add(g * 64) as *const __m512i), flip)
                    });
                    for r in 0..R {
                        for d in digits.clone() {
                            let x = _mm512_set1_epi32(quad(xs[r][d], g));
                            for i in 0..2 {
                                isum[r][i][d] = _mm512_dpbusd_epi32(isum[r][i][d], v[i], x);
                            }
                        }
                    }
                }
            }
            let d = [scales16(t[0], blk, 0), scales16(t[1], blk, 0)];
            for r in 0..R {
                let dx = _mm512_set1_ps(*a.dx.get_unchecked((r0 + r) * nb + blk));
                for i in 0..2 {
                    let [coarse, fine] = isum[r][i];
                    let s = if FINE_ONLY { fine } else { join_digits16(coarse, fine) };
                    acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d[i], dx), acc[r][i]);
                }
            }
            let m = [minima16(t[0], blk), minima16(t[1], blk)];
            for (i, m) in m.into_iter().enumerate() {
                if let Some(m) = m {
                    for r in 0..R {
                        let sx = _mm512_set1_ps(*a.sx.get_unchecked((r0 + r) * nb + blk));
                        acc[r][i] = _mm512_fmadd_ps(m, sx, acc[r][i]);
                    }
                }
            }
        }
    }
    for (i, out) in out.into_iter().enumerate() {
        for r in 0..R {
            // SAFETY: out[r] holds TILE = 16 floats.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r][i]) };
        }
    }
}

/// `255 * coarse + fine`: a row's two digit sums joined (exact in i32).
#[inline]
#[target_feature(enable = "avx512f")]
fn join_digits16(coarse: __m512i, fine: __m512i) -> __m512i {
    _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32::<8>(coarse), coarse), fine)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni<const R: usize, const FINE_ONLY: bool>(
    t: &TileRef<'_>,
    a: &QuantizedRows,
    r0: usize,
    out: &mut [[f32; TILE]],
) {
    let (bb, nb) = (t.block_bytes(), t.blocks);
    let low = _mm512_set1_epi8(0x0f);
    let flip = _mm512_set1_epi8(-128);
    // 8-bit codes are biased by 128 here, so their zero is 128: the joined digit sums carry
    // `128 * Σq`.
    let zero = if t.bits == 8 { 128 } else { t.zero };
    let mut acc = [_mm512_setzero_ps(); R];
    for blk in 0..nb {
        // SAFETY (all reads below): `check` guarantees nb blocks of codes and scales, and rows
        // r0..r0+R of k activations (two digit rows each) with nb scales each.
        unsafe {
            let base = t.codes.as_ptr().add(blk * bb);
            prefetch_ahead(base, bb);
            let xs: [[*const i8; 2]; R] =
                core::array::from_fn(|r| core::array::from_fn(|d| a.digits.as_ptr().add(a.digit_at(r0 + r, d, blk))));
            for h in 0..t.halves {
                // Two sums a row: with both digits, the coarse and the fine; with the fine alone,
                // alternate halves of the products, so that each row still has two dependency
                // chains of `vpdpbusd` (one chain a row left it waiting on the latency).
                // The zero code's share, `-zero * Σq`, starts the fine sum (integers: exact in
                // any order).
                let mut isum: [[__m512i; 2]; R] = core::array::from_fn(|r| {
                    let at = (r0 + r) * nb + blk;
                    let less_zero = _mm512_set1_epi32(-zero * a.half_sum(at, h, t.halves));
                    if FINE_ONLY { [less_zero, _mm512_setzero_si512()] } else { [_mm512_setzero_si512(), less_zero] }
                });
                if t.bits == 4 {
                    for g in 0..4 {
                        let v = _mm512_loadu_si512(base.add(g * 64) as *const __m512i);
                        let lo = _mm512_and_si512(v, low);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                        for r in 0..R {
                            if FINE_ONLY {
                                let x = xs[r][1];
                                isum[r][0] = _mm512_dpbusd_epi32(isum[r][0], lo, _mm512_set1_epi32(quad(x, g)));
                                isum[r][1] = _mm512_dpbusd_epi32(isum[r][1], hi, _mm512_set1_epi32(quad(x, g + 4)));
                                continue;
                            }
                            for d in 0..2 {
                                let s = _mm512_dpbusd_epi32(isum[r][d], lo, _mm512_set1_epi32(quad(xs[r][d], g)));
                                isum[r][d] = _mm512_dpbusd_epi32(s, hi, _mm512_set1_epi32(quad(xs[r][d], g + 4)));
                            }
                        }
                    }
                } else if FINE_ONLY {
                    // Code rows in pairs: a half holds 4 or 8 of them (a fixed count unrolls).
                    let pair = |g: usize, isum: &mut [[__m512i; 2]; R]| {
                        let v: [__m512i; 2] = core::array::from_fn(|i| {
                            _mm512_xor_si512(_mm512_loadu_si512(base.add((g + i) * 64) as *const __m512i), flip)
                        });
                        for r in 0..R {
                            for (i, v) in v.iter().enumerate() {
                                let x = _mm512_set1_epi32(quad(xs[r][1], g + i));
                                isum[r][i] = _mm512_dpbusd_epi32(isum[r][i], *v, x);
                            }
                        }
                    };
                    if t.halves == 1 {
                        for g in [0, 2, 4, 6] {
                            pair(g, &mut isum);
                        }
                    } else {
                        for g in t.rows_of_half(h).step_by(2) {
                            pair(g, &mut isum);
                        }
                    }
                } else {
                    for g in t.rows_of_half(h) {
                        let v = _mm512_xor_si512(_mm512_loadu_si512(base.add(g * 64) as *const __m512i), flip);
                        for r in 0..R {
                            for d in 0..2 {
                                let x = _mm512_set1_epi32(quad(xs[r][d], g));
                                isum[r][d] = _mm512_dpbusd_epi32(isum[r][d], v, x);
                            }
                        }
                    }
                }
                let d = scales16(t, blk, h);
                for r in 0..R {
                    let at = (r0 + r) * nb + blk;
                    let s = if FINE_ONLY {
                        _mm512_add_epi32(isum[r][0], isum[r][1])
                    } else {
                        join_digits16(isum[r][0], isum[r][1])
                    };
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*a.dx.get_unchecked(at)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
                }
            }
            if let Some(m) = minima16(t, blk) {
                for r in 0..R {
                    let at = (r0 + r) * nb + blk;
                    acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(*a.sx.get_unchecked(at)), acc[r]);
                }
            }
        }
    }
    for r in 0..R {
        // SAFETY: out[r] holds TILE = 16 floats.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
}

//! The activation quantizer ([`Digits::quantize`]) in AVX2, for the AVX2 and AVX-512 levels: a
//! block's 32 values sit in four vectors, and every step is the portable code's operation lane by
//! lane (a multiply then a subtract, never fused; the same rounding by adding and removing
//! 1.5 * 2^23), so the codes and scales are the same bits. Compiled from the portable loop it
//! took 1.4-2.3 ns per value, a seventh of a Q4_1 prompt's time; this takes about 0.5 (an
//! AVX-512 version, two vectors per block, took 0.7: its horizontal maxima and sums cost more).

use core::arch::x86_64::*;

use super::{Digits, SMALLEST_AMAX};
use crate::quant::BLOCK;

/// Quantizes `x` (`[rows, k]`, the rows `d` holds) into both digits.
///
/// # Safety
/// AVX2 must be present; `x.len()` must be a multiple of `k`, itself of `BLOCK`, and `d`'s
/// buffers must hold those rows (as [`super::QuantizedRows::quantize`] sizes them).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_rows(d: &mut Digits<'_>, x: &[f32], k: usize) {
    let nb = k / BLOCK;
    let rows = x.len() / k;
    assert!(k.is_multiple_of(BLOCK) && rows * k == x.len());
    assert!(d.q.len() >= 2 * rows * k && d.dx.len() >= 2 * rows * nb && d.sx.len() >= 2 * rows * nb);
    assert!(d.qsum.len() >= 2 * rows * nb && d.qsum_low.len() >= 2 * rows * nb);
    for r in 0..rows {
        for blk in 0..nb {
            // SAFETY: the block lies inside row r of x (asserted above).
            let v: [__m256; 4] = unsafe {
                let p = x.as_ptr().add(r * k + blk * BLOCK);
                core::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)))
            };
            let amax_bits = largest_magnitude_bits(v);
            let finite = amax_bits < f32::INFINITY.to_bits();
            let coarse = (2 * r) * nb + blk;
            // SAFETY: `coarse` and `coarse + nb` are blocks of these rows (asserted above).
            unsafe {
                let (dx1, codes) = digit(d, coarse, v, f32::from_bits(amax_bits), finite);
                let step = _mm256_set1_ps(dx1);
                let residual: [__m256; 4] =
                    core::array::from_fn(|i| _mm256_sub_ps(v[i], _mm256_mul_ps(step, _mm256_cvtepi32_ps(codes[i]))));
                let amax2 = largest_magnitude_bits(residual);
                digit(d, coarse + nb, residual, f32::from_bits(amax2), finite);
            }
        }
    }
}

/// The largest `bits & 0x7fffffff` of the block: for floats, its largest magnitude, with any
/// infinity or NaN at or above the infinity's bits.
#[inline]
#[target_feature(enable = "avx2")]
fn largest_magnitude_bits(v: [__m256; 4]) -> u32 {
    let mask = _mm256_set1_epi32(0x7fff_ffff);
    let a: [__m256i; 4] = core::array::from_fn(|i| _mm256_and_si256(_mm256_castps_si256(v[i]), mask));
    let m = _mm256_max_epu32(_mm256_max_epu32(a[0], a[1]), _mm256_max_epu32(a[2], a[3]));
    let m = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
    let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
    let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
    _mm_cvtsi128_si32(m) as u32
}

/// The sum of two vectors of eight codes.
#[inline]
#[target_feature(enable = "avx2")]
fn sum16(a: __m256i, b: __m256i) -> i32 {
    let s = _mm256_add_epi32(a, b);
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// One digit of one block, as [`Digits::digit`]: writes its codes, scale and sums at block `at`
/// and returns the scale and the codes.
///
/// # Safety
/// Block `at` must be inside `d`'s buffers.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn digit(d: &mut Digits<'_>, at: usize, v: [__m256; 4], amax: f32, finite: bool) -> (f32, [__m256i; 4]) {
    let (dx, inv) = match (finite, amax >= SMALLEST_AMAX) {
        (false, _) => (f32::NAN, 0.0),
        (true, false) => (0.0, 0.0),
        (true, true) => {
            let dx = amax / 127.0;
            (dx, 1.0 / dx)
        }
    };
    let codes: [__m256i; 4] = if finite {
        let (inv, magic, big) = (_mm256_set1_ps(inv), _mm256_set1_ps(12_582_912.0), _mm256_set1_ps(4_194_304.0));
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        core::array::from_fn(|i| {
            let p = _mm256_mul_ps(v[i], inv);
            let small = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(p, abs), big);
            let rounded = _mm256_blendv_ps(p, _mm256_sub_ps(_mm256_add_ps(p, magic), magic), small);
            _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(rounded, lo), hi))
        })
    } else {
        [_mm256_setzero_si256(); 4]
    };
    // SAFETY: block `at` is inside the buffers, as the caller promises.
    unsafe {
        // i32 -> i8 in order: packs work within 128-bit lanes, so restore the order after.
        let w01 = _mm256_packs_epi32(codes[0], codes[1]);
        let w23 = _mm256_packs_epi32(codes[2], codes[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(d.q.as_mut_ptr().add(at * BLOCK) as *mut __m256i, b);
        let low = sum16(codes[0], codes[1]);
        let sum = low + sum16(codes[2], codes[3]);
        *d.qsum_low.get_unchecked_mut(at) = low;
        *d.dx.get_unchecked_mut(at) = dx;
        *d.sx.get_unchecked_mut(at) = dx * sum as f32;
        *d.qsum.get_unchecked_mut(at) = sum;
    }
    (dx, codes)
}

//! The activation quantizer ([`Digits::quantize`]) in AVX-512: a block's 32 values sit in two
//! vectors, and every step is the portable code's operation lane by lane (a multiply then a
//! subtract, never fused; the same rounding by adding and removing 1.5 * 2^23), so the codes and
//! scales are the same bits. Compiled from the portable loop, the horizontal maxima and sums and
//! the conversions took about 2 ns per value, a seventh of a Q4_1 prompt's time.

use core::arch::x86_64::*;

use super::{Digits, SMALLEST_AMAX};
use crate::quant::BLOCK;

const HALF: usize = BLOCK / 2;

/// Quantizes `x` (`[rows, k]`, the rows `d` holds) into both digits.
///
/// # Safety
/// AVX-512 F must be present; `x.len()` must be a multiple of `k`, itself of `BLOCK`, and `d`'s
/// buffers must hold those rows (as [`super::QuantizedRows::quantize`] sizes them).
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
pub(super) unsafe fn quantize_rows(d: &mut Digits<'_>, x: &[f32], k: usize) {
    let nb = k / BLOCK;
    let rows = x.len() / k;
    assert!(k.is_multiple_of(BLOCK) && rows * k == x.len());
    assert!(d.q.len() >= 2 * rows * k && d.dx.len() >= 2 * rows * nb && d.sx.len() >= 2 * rows * nb);
    assert!(d.qsum.len() >= 2 * rows * nb && d.qsum_low.len() >= 2 * rows * nb);
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    for r in 0..rows {
        for blk in 0..nb {
            // SAFETY: the block lies inside row r of x (asserted above).
            let v = unsafe {
                let p = x.as_ptr().add(r * k + blk * BLOCK);
                [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(HALF))]
            };
            let amax_bits = largest_magnitude_bits(v, abs_mask);
            let finite = amax_bits < f32::INFINITY.to_bits();
            let coarse = (2 * r) * nb + blk;
            // SAFETY: `coarse` and `coarse + nb` are blocks of these rows (asserted above).
            unsafe {
                let (dx1, codes) = digit(d, coarse, v, f32::from_bits(amax_bits), finite);
                let step = _mm512_set1_ps(dx1);
                let residual: [__m512; 2] =
                    core::array::from_fn(|h| _mm512_sub_ps(v[h], _mm512_mul_ps(step, _mm512_cvtepi32_ps(codes[h]))));
                let amax2 = largest_magnitude_bits(residual, abs_mask);
                digit(d, coarse + nb, residual, f32::from_bits(amax2), finite);
            }
        }
    }
}

/// The largest `bits & 0x7fffffff` of the block: for floats, its largest magnitude, with any
/// infinity or NaN at or above the infinity's bits.
#[inline]
#[target_feature(enable = "avx512f")]
fn largest_magnitude_bits(v: [__m512; 2], abs_mask: __m512i) -> u32 {
    let a = _mm512_and_si512(_mm512_castps_si512(v[0]), abs_mask);
    let b = _mm512_and_si512(_mm512_castps_si512(v[1]), abs_mask);
    _mm512_reduce_max_epu32(_mm512_max_epu32(a, b))
}

/// One digit of one block, as [`Digits::digit`]: writes its codes, scale and sums at block `at`
/// and returns the scale and the codes.
///
/// # Safety
/// Block `at` must be inside `d`'s buffers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn digit(d: &mut Digits<'_>, at: usize, v: [__m512; 2], amax: f32, finite: bool) -> (f32, [__m512i; 2]) {
    let (dx, inv) = match (finite, amax >= SMALLEST_AMAX) {
        (false, _) => (f32::NAN, 0.0),
        (true, false) => (0.0, 0.0),
        (true, true) => {
            let dx = amax / 127.0;
            (dx, 1.0 / dx)
        }
    };
    let codes: [__m512i; 2] = if finite {
        let (inv, magic, big) = (_mm512_set1_ps(inv), _mm512_set1_ps(12_582_912.0), _mm512_set1_ps(4_194_304.0));
        let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        core::array::from_fn(|h| {
            let p = _mm512_mul_ps(v[h], inv);
            // |p| < 2^22: round to the nearest integer, ties to even; larger values clamp anyway.
            let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(p), big);
            let rounded = _mm512_mask_blend_ps(small, p, _mm512_sub_ps(_mm512_add_ps(p, magic), magic));
            // Finite here, so min/max clamp as `f32::clamp` does; the conversion is exact.
            _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(rounded, lo), hi))
        })
    } else {
        [_mm512_setzero_si512(); 2]
    };
    // SAFETY: block `at` is inside the buffers, as the caller promises.
    unsafe {
        let q = d.q.as_mut_ptr().add(at * BLOCK);
        _mm_storeu_si128(q as *mut __m128i, _mm512_cvtepi32_epi8(codes[0]));
        _mm_storeu_si128(q.add(HALF) as *mut __m128i, _mm512_cvtepi32_epi8(codes[1]));
        let low = _mm512_reduce_add_epi32(codes[0]);
        let sum = low + _mm512_reduce_add_epi32(codes[1]);
        *d.qsum_low.get_unchecked_mut(at) = low;
        *d.dx.get_unchecked_mut(at) = dx;
        *d.sx.get_unchecked_mut(at) = dx * sum as f32;
        *d.qsum.get_unchecked_mut(at) = sum;
    }
    (dx, codes)
}

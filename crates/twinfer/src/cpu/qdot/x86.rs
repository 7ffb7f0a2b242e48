//! x86-64 kernels: AVX-512 VNNI (`vpdpbusd`: 64 byte products a cycle into 16 features) and
//! AVX2 (`vpmaddubsw` + `vpmaddwd`, 8 features a vector), used by the AVX-512 level on CPUs
//! without VNNI too.
//!
//! Both take unsigned bytes times signed bytes. 4-bit codes are unsigned already. 8-bit codes are
//! signed: VNNI biases them by +128 (xor 0x80) and subtracts `128 * Σq` from the block's sum;
//! AVX2 multiplies `|c|` by `q` carrying `c`'s sign (`vpsignb`), which cannot saturate a pair
//! sum: `2 * 128 * 127 < 2^15` (activations stop at ±127). 4-bit pair sums stay under
//! `2 * 2 * 15 * 127`.

use core::arch::x86_64::*;
use core::ptr::read_unaligned;

use super::{QuantizedRows, TileRef, for_rows};
use crate::quant::{BLOCK, TILE};

/// How far ahead of the block being summed its tile's codes are prefetched. The hardware
/// prefetcher alone left decode at about 5 GB/s per core: a task's tiles are short streams.
const PREFETCH_AHEAD: usize = 2048;

/// Prefetches the `bytes` that follow `base + PREFETCH_AHEAD` into L1.
#[inline(always)]
fn prefetch_ahead(base: *const u8, bytes: usize) {
    let ahead = base.wrapping_add(PREFETCH_AHEAD);
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8) };
    }
}

pub(super) fn has_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Activation bytes `4i .. 4i + 4` of a block, as one i32 for a broadcast.
#[inline(always)]
unsafe fn quad(x: *const i8, i: usize) -> i32 {
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

/// [`scales16`] for features `8 * part .. 8 * part + 8`.
///
/// # Safety
/// AVX2 and F16C must be present and `blk`, `h` inside the tile (`check`).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn scales8(t: &TileRef<'_>, blk: usize, h: usize, part: usize) -> __m256 {
    // SAFETY: `check` bounds `d` and `ds` for every block and half.
    unsafe {
        let d = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(t.group(blk) + 8 * part) as *const __m128i));
        if t.ds.is_empty() {
            return d;
        }
        let mult = _mm_loadl_epi64(t.ds.as_ptr().add(t.sub(blk, h) + 8 * part) as *const __m128i);
        _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mult)))
    }
}

/// [`minima16`] for features `8 * part .. 8 * part + 8`.
///
/// # Safety
/// As [`scales8`].
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn minima8(t: &TileRef<'_>, blk: usize, part: usize) -> Option<__m256> {
    if t.m.is_empty() {
        return None;
    }
    // SAFETY: `check` bounds `m` and `ms` for every block.
    unsafe {
        let m = _mm256_cvtph_ps(_mm_loadu_si128(t.m.as_ptr().add(t.group(blk) + 8 * part) as *const __m128i));
        if t.ms.is_empty() {
            return Some(m);
        }
        let mult = _mm_loadl_epi64(t.ms.as_ptr().add(blk * TILE + 8 * part) as *const __m128i);
        Some(_mm256_mul_ps(m, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mult))))
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
    unsafe { for_rows!(wide rows, vnni(t, a, r0, out)) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni<const R: usize>(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, out: &mut [[f32; TILE]]) {
    let (bb, nb) = (t.block_bytes(), t.blocks);
    let low = _mm512_set1_epi8(0x0f);
    let flip = _mm512_set1_epi8(-128);
    // 8-bit codes are biased by 128 here, so their zero is 128.
    let zero = if t.bits == 8 { 128 } else { t.zero };
    let mut acc = [_mm512_setzero_ps(); R];
    for blk in 0..nb {
        // SAFETY (all reads below): `check` guarantees nb blocks of codes and scales, and rows
        // r0..r0+R of k activations with nb scales each.
        unsafe {
            let base = t.codes.as_ptr().add(blk * bb);
            prefetch_ahead(base, bb);
            let xs: [*const i8; R] = core::array::from_fn(|r| a.q.as_ptr().add((r0 + r) * a.k + blk * BLOCK));
            for h in 0..t.halves {
                let mut isum = [_mm512_setzero_si512(); R];
                if t.bits == 4 {
                    for g in 0..4 {
                        let v = _mm512_loadu_si512(base.add(g * 64) as *const __m512i);
                        let lo = _mm512_and_si512(v, low);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                        for r in 0..R {
                            isum[r] = _mm512_dpbusd_epi32(isum[r], lo, _mm512_set1_epi32(quad(xs[r], g)));
                            isum[r] = _mm512_dpbusd_epi32(isum[r], hi, _mm512_set1_epi32(quad(xs[r], g + 4)));
                        }
                    }
                } else {
                    for g in t.rows_of_half(h) {
                        let v = _mm512_xor_si512(_mm512_loadu_si512(base.add(g * 64) as *const __m512i), flip);
                        for r in 0..R {
                            isum[r] = _mm512_dpbusd_epi32(isum[r], v, _mm512_set1_epi32(quad(xs[r], g)));
                        }
                    }
                }
                let d = scales16(t, blk, h);
                for r in 0..R {
                    let at = (r0 + r) * nb + blk;
                    let s = _mm512_sub_epi32(isum[r], _mm512_set1_epi32(zero * a.half_sum(at, h, t.halves)));
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

/// # Safety
/// AVX2, FMA and F16C must be present and `t.check(a, r0, rows)` must hold.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_rows_avx2(
    t: &TileRef<'_>,
    a: &QuantizedRows,
    r0: usize,
    rows: usize,
    out: &mut [[f32; TILE]],
) {
    // SAFETY: forwarded.
    unsafe { for_rows!(rows, avx2(t, a, r0, out)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<const R: usize>(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, out: &mut [[f32; TILE]]) {
    let (bb, nb) = (t.block_bytes(), t.blocks);
    let low = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    // Features 0..8, then 8..16: a half tile's accumulators fit the 16 registers.
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); R];
        for blk in 0..nb {
            // SAFETY (all reads below): as in `vnni`; half h reads bytes 32h..32h+32 of each
            // 64-byte row and scales 8h..8h+8.
            unsafe {
                let base = t.codes.as_ptr().add(blk * bb + h * 32);
                if h == 0 {
                    prefetch_ahead(base, bb);
                }
                let xs: [*const i8; R] = core::array::from_fn(|r| a.q.as_ptr().add((r0 + r) * a.k + blk * BLOCK));
                for half in 0..t.halves {
                    let mut isum = [_mm256_setzero_si256(); R];
                    if t.bits == 4 {
                        for g in 0..4 {
                            let v = _mm256_loadu_si256(base.add(g * 64) as *const __m256i);
                            let lo = _mm256_and_si256(v, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                            for r in 0..R {
                                let p = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo, _mm256_set1_epi32(quad(xs[r], g))),
                                    _mm256_maddubs_epi16(hi, _mm256_set1_epi32(quad(xs[r], g + 4))),
                                );
                                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, ones));
                            }
                        }
                    } else {
                        for g in t.rows_of_half(half) {
                            let v = _mm256_loadu_si256(base.add(g * 64) as *const __m256i);
                            let magnitude = _mm256_abs_epi8(v);
                            for r in 0..R {
                                let signed_x = _mm256_sign_epi8(_mm256_set1_epi32(quad(xs[r], g)), v);
                                let p = _mm256_maddubs_epi16(magnitude, signed_x);
                                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, ones));
                            }
                        }
                    }
                    let d = scales8(t, blk, half, h);
                    for r in 0..R {
                        let at = (r0 + r) * nb + blk;
                        let zero = t.zero * a.half_sum(at, half, t.halves);
                        let s = _mm256_sub_epi32(isum[r], _mm256_set1_epi32(zero));
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*a.dx.get_unchecked(at)));
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
                    }
                }
                if let Some(m) = minima8(t, blk, h) {
                    for r in 0..R {
                        let at = (r0 + r) * nb + blk;
                        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.sx.get_unchecked(at)), acc[r]);
                    }
                }
            }
        }
        for r in 0..R {
            // SAFETY: out[r] holds 16 floats; this half writes 8h..8h+8.
            unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(h * 8), acc[r]) };
        }
    }
}

//! x86-64 kernels: AVX-512 VNNI (`vpdpbusd`: 64 byte products a cycle into 16 features, once
//! per digit of the activations) and AVX2 (`vpmaddwd`: the 16-bit codes times the weight codes
//! widened to 16 bits, 8 features a vector), used by the AVX-512 level on CPUs without VNNI too.
//!
//! VNNI takes unsigned bytes times signed bytes. 4-bit codes are unsigned already. 8-bit codes are
//! signed: VNNI biases them by +128 (xor 0x80) and subtracts `128 * Σq` from the joined sum.
//! AVX2's pair products (`|c| * 32385 * 2 < 2^31`) and their sums over a block cannot overflow.
//!
//! AVX2 once multiplied bytes (`vpmaddubsw`) digit by digit: per 64 products of a row 6
//! multiplies (two digits of 2 `vpmaddubsw` and a widening `vpmaddwd`) against 4 `vpmaddwd`
//! on the 16-bit codes, whose weights widen once for all the rows. With 8-bit codes (one digit)
//! and 4-bit weights it multiplies bytes again: 2 `vpmaddubsw` per 64 products, their 16-bit sums
//! widened once a block.

use core::arch::x86_64::*;
use core::ptr::read_unaligned;

use super::{ActivationCodes, QuantizedRows, TileRef, for_rows};
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

/// Activation bytes `4i .. 4i + 4` of a block's digits, as one i32 for a broadcast.
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
    // 8-bit codes times 4-bit weights fit `vpmaddubsw`'s byte products (below); 8-bit weights
    // keep the 16-bit products, which are as many instructions as byte products with the sign
    // trick those would need.
    let one_digit = a.codes == ActivationCodes::Int8 && t.bits == 4;
    // SAFETY: forwarded.
    unsafe {
        match (rows, one_digit) {
            (1, false) => avx2::<1, 2, false>(t, a, r0, out),
            (2, false) => avx2::<2, 2, false>(t, a, r0, out),
            (3, false) => avx2::<3, 1, false>(t, a, r0, out),
            (_, false) => avx2::<4, 1, false>(t, a, r0, out),
            (1, true) => avx2::<1, 2, true>(t, a, r0, out),
            (2, true) => avx2::<2, 2, true>(t, a, r0, out),
            (3, true) => avx2::<3, 1, true>(t, a, r0, out),
            (_, true) => avx2::<4, 1, true>(t, a, r0, out),
        }
    }
}

/// Activation codes `4i .. 4i + 4` of a block, broadcast to every 64-bit lane.
///
/// # Safety
/// `x` must be a block start with 32 codes behind it and `i < 8`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn quad16(x: *const i16, i: usize) -> __m256i {
    // SAFETY: as the caller promises.
    _mm256_set1_epi64x(unsafe { read_unaligned(x.add(4 * i) as *const i64) })
}

/// A row's 8 feature sums from its two pair accumulators: `pairs_a` holds features (0, 1 | 4,
/// 5) and `pairs_b` (2, 3 | 6, 7), each as two partial sums (the byte order of `vpunpck*bw`).
#[inline]
#[target_feature(enable = "avx2")]
fn feature_sums(pairs_a: __m256i, pairs_b: __m256i) -> __m256i {
    _mm256_hadd_epi32(pairs_a, pairs_b)
}

/// Rows `r0 .. r0 + R` times the tile, `H` halves of 8 features a pass: both halves for one or
/// two rows, whose accumulators leave room, so that each activation broadcast and block scale
/// serves 16 features; one half at a time for more rows.
///
/// `BYTES` (4-bit weights and 8-bit codes only): the codes' fine digits times the nibbles in
/// `vpmaddubsw` (unsigned times signed bytes, pairs summed to 16 bits), the block's 8 products
/// summed in 16 bits (at most `8 * 2 * 15 * 127 = 30480`, no saturation) and widened once by
/// `vpmaddwd` with ones: half the instructions of the 16-bit products, and the same integers,
/// so the same bits.
///
/// A block's float part (scales, conversion, two chained FMAs) runs at the top of the next
/// block's step, ahead of that block's integer sums in program order: its inputs are ready, so its
/// latency overlaps the integer work instead of holding the reorder buffer at the block's end.
/// The operations and their order per output are unchanged.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<const R: usize, const H: usize, const BYTES: bool>(
    t: &TileRef<'_>,
    a: &QuantizedRows,
    r0: usize,
    out: &mut [[f32; TILE]],
) {
    let (bb, nb) = (t.block_bytes(), t.blocks);
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let ones = _mm256_set1_epi16(1);
    for h0 in (0..2).step_by(H) {
        let mut acc = [[_mm256_setzero_ps(); H]; R];
        // The integer feature sums of the previous block, per half of its inputs.
        let mut sums = [[[zero; H]; R]; 2];
        for step in 0..=nb {
            // SAFETY (all reads below): as in `vnni`; the pass reads bytes 32 h0 .. 32 (h0 + H)
            // of each 64-byte row and scales 8 h0 .. 8 (h0 + H).
            unsafe {
                if step > 0 {
                    let blk = step - 1;
                    for (half, sums) in sums.iter().enumerate().take(t.halves) {
                        for hh in 0..H {
                            let d = scales8(t, blk, half, h0 + hh);
                            for r in 0..R {
                                let at = (r0 + r) * nb + blk;
                                let mut s = sums[r][hh];
                                // Most formats have no zero code: skip its product and broadcast.
                                if t.zero != 0 {
                                    let zero_code = t.zero * a.half_sum(at, half, t.halves);
                                    s = _mm256_sub_epi32(s, _mm256_set1_epi32(zero_code));
                                }
                                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*a.dx.get_unchecked(at)));
                                acc[r][hh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r][hh]);
                            }
                        }
                    }
                    for hh in 0..H {
                        if let Some(m) = minima8(t, blk, h0 + hh) {
                            for r in 0..R {
                                let at = (r0 + r) * nb + blk;
                                acc[r][hh] = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.sx.get_unchecked(at)), acc[r][hh]);
                            }
                        }
                    }
                }
                if step == nb {
                    break;
                }
                let blk = step;
                let base = t.codes.as_ptr().add(blk * bb + h0 * 32);
                if h0 == 0 {
                    prefetch_ahead(base, bb);
                }
                if BYTES {
                    // 4-bit codes have one half (`check`).
                    let fine: [*const i8; R] =
                        core::array::from_fn(|r| a.digits.as_ptr().add(a.digit_at(r0 + r, 1, blk)));
                    let mut prods = [[zero; H]; R];
                    for g in 0..4 {
                        for hh in 0..H {
                            let v = _mm256_loadu_si256(base.add(g * 64 + 32 * hh) as *const __m256i);
                            let lo = _mm256_and_si256(v, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                            for r in 0..R {
                                let xl = _mm256_set1_epi32(quad(fine[r], g));
                                let xh = _mm256_set1_epi32(quad(fine[r], g + 4));
                                let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                                prods[r][hh] = _mm256_add_epi16(prods[r][hh], p);
                            }
                        }
                    }
                    for r in 0..R {
                        for hh in 0..H {
                            sums[0][r][hh] = _mm256_madd_epi16(prods[r][hh], ones);
                        }
                    }
                    continue;
                }
                let xs: [*const i16; R] = core::array::from_fn(|r| a.q.as_ptr().add((r0 + r) * a.k + blk * BLOCK));
                for (half, sums) in sums.iter_mut().enumerate().take(t.halves) {
                    // Codes widen to 16 bits in `vpunpck*bw`'s order: the low unpack takes
                    // features (0, 1 | 4, 5), the high one (2, 3 | 6, 7), four inputs each.
                    let mut pa = [[zero; H]; R];
                    let mut pb = [[zero; H]; R];
                    if t.bits == 4 {
                        for g in 0..4 {
                            let xl: [__m256i; R] = core::array::from_fn(|r| quad16(xs[r], g));
                            let xh: [__m256i; R] = core::array::from_fn(|r| quad16(xs[r], g + 4));
                            for hh in 0..H {
                                let v = _mm256_loadu_si256(base.add(g * 64 + 32 * hh) as *const __m256i);
                                let lo = _mm256_and_si256(v, low);
                                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                                let (lo_a, lo_b) = (_mm256_unpacklo_epi8(lo, zero), _mm256_unpackhi_epi8(lo, zero));
                                let (hi_a, hi_b) = (_mm256_unpacklo_epi8(hi, zero), _mm256_unpackhi_epi8(hi, zero));
                                for r in 0..R {
                                    let (a_, b_) = (&mut pa[r][hh], &mut pb[r][hh]);
                                    *a_ = _mm256_add_epi32(*a_, _mm256_madd_epi16(lo_a, xl[r]));
                                    *b_ = _mm256_add_epi32(*b_, _mm256_madd_epi16(lo_b, xl[r]));
                                    *a_ = _mm256_add_epi32(*a_, _mm256_madd_epi16(hi_a, xh[r]));
                                    *b_ = _mm256_add_epi32(*b_, _mm256_madd_epi16(hi_b, xh[r]));
                                }
                            }
                        }
                    } else {
                        for g in t.rows_of_half(half) {
                            let x: [__m256i; R] = core::array::from_fn(|r| quad16(xs[r], g));
                            for hh in 0..H {
                                let v = _mm256_loadu_si256(base.add(g * 64 + 32 * hh) as *const __m256i);
                                let sign = _mm256_cmpgt_epi8(zero, v);
                                let (wa, wb) = (_mm256_unpacklo_epi8(v, sign), _mm256_unpackhi_epi8(v, sign));
                                for r in 0..R {
                                    pa[r][hh] = _mm256_add_epi32(pa[r][hh], _mm256_madd_epi16(wa, x[r]));
                                    pb[r][hh] = _mm256_add_epi32(pb[r][hh], _mm256_madd_epi16(wb, x[r]));
                                }
                            }
                        }
                    }
                    for r in 0..R {
                        for hh in 0..H {
                            sums[r][hh] = feature_sums(pa[r][hh], pb[r][hh]);
                        }
                    }
                }
            }
        }
        for r in 0..R {
            for hh in 0..H {
                // SAFETY: out[r] holds 16 floats; half h writes 8h..8h+8.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add((h0 + hh) * 8), acc[r][hh]) };
            }
        }
    }
}

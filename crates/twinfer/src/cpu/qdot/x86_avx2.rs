//! The AVX2 kernel, also run by the AVX-512 level on CPUs without VNNI: `vpmaddwd` multiplies the
//! 16-bit codes by the weight codes widened to 16 bits, 8 features a vector. Its pair products
//! (`|c| * 32385 * 2 < 2^31`) and their sums over a block cannot overflow.
//!
//! AVX2 once multiplied bytes (`vpmaddubsw`) digit by digit: per 64 products of a row 6
//! multiplies (two digits of 2 `vpmaddubsw` and a widening `vpmaddwd`) against 4 `vpmaddwd`
//! on the 16-bit codes, whose weights widen once for all the rows. With 8-bit codes (one digit)
//! and 4-bit weights it multiplies bytes again: 2 `vpmaddubsw` per 64 products, their 16-bit sums
//! widened once a block. So it does for both digits of 16-bit codes at one or two rows (decode),
//! where the weights' widening serves too few rows: 4 `vpmaddubsw` per 64 products and no unpack,
//! each digit's sums widened once a block. On a Zen 3 VM that made a one-row q4_1 product 1.25x
//! faster on one thread in cache (0.009 to 0.007 ms for 384 x 576), and SmolLM2's layer
//! projections 3-17% faster in decode (steps alternated within one process); at three rows it
//! measured the same as the 16-bit products.

use core::arch::x86_64::*;
use core::ptr::read_unaligned;

use super::x86::{prefetch_ahead, quad};
use super::{ActivationCodes, QuantizedRows, TileRef};
use crate::quant::{BLOCK, TILE};

/// The 8 features `8 * part .. 8 * part + 8`'s scales for half `h` of block `blk`: the f16 scale,
/// times the K-quants' multiplier (exact).
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

/// The 8 features `8 * part .. 8 * part + 8`'s minima in block `blk`, if the format has them.
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
    // One or two rows of 16-bit codes times 4-bit weights: the two digits as bytes (below),
    // where the 16-bit products' widening of the weights is shared by too few rows to pay.
    let two_digits = a.codes == ActivationCodes::Int16 && t.bits == 4 && rows <= 2;
    // SAFETY: forwarded.
    unsafe {
        if two_digits {
            return if rows == 1 {
                avx2::<1, 2, true, true>(t, a, r0, out)
            } else {
                avx2::<2, 2, true, true>(t, a, r0, out)
            };
        }
        match (rows, one_digit) {
            (1, false) => avx2::<1, 2, false, false>(t, a, r0, out),
            (2, false) => avx2::<2, 2, false, false>(t, a, r0, out),
            (3, false) => avx2::<3, 1, false, false>(t, a, r0, out),
            (_, false) => avx2::<4, 1, false, false>(t, a, r0, out),
            (1, true) => avx2::<1, 2, true, false>(t, a, r0, out),
            (2, true) => avx2::<2, 2, true, false>(t, a, r0, out),
            (3, true) => avx2::<3, 1, true, false>(t, a, r0, out),
            (_, true) => avx2::<4, 1, true, false>(t, a, r0, out),
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
/// `BYTES` (4-bit weights only; 8-bit codes, or 16-bit ones with `COARSE`, whose coarse digits
/// go through the same steps and join the fine ones' sums at the block's end): the codes' fine digits times the nibbles in
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
unsafe fn avx2<const R: usize, const H: usize, const BYTES: bool, const COARSE: bool>(
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
                    let coarse: [*const i8; R] =
                        core::array::from_fn(|r| a.digits.as_ptr().add(a.digit_at(r0 + r, 0, blk)));
                    let mut prods = [[zero; H]; R];
                    let mut prods_coarse = [[zero; H]; R];
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
                                if COARSE {
                                    let xl = _mm256_set1_epi32(quad(coarse[r], g));
                                    let xh = _mm256_set1_epi32(quad(coarse[r], g + 4));
                                    let p =
                                        _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                                    prods_coarse[r][hh] = _mm256_add_epi16(prods_coarse[r][hh], p);
                                }
                            }
                        }
                    }
                    for r in 0..R {
                        for hh in 0..H {
                            let f = _mm256_madd_epi16(prods[r][hh], ones);
                            sums[0][r][hh] = if COARSE {
                                // q = 255 coarse + fine: 255 times the coarse digits' sum, as
                                // `(c << 8) - c` (a feature's sum is at most 32 * 15 * 127 in
                                // magnitude, so exact), plus the fine digits' sum.
                                let c = _mm256_madd_epi16(prods_coarse[r][hh], ones);
                                _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32::<8>(c), c), f)
                            } else {
                                f
                            };
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

//! bf16 dot products on AVX512-BF16 (`vdpbf16ps`): lane `i` of a vector of 16 accumulators takes
//! elements `2i` and `2i + 1` of 32 activations and 32 weights, both in their natural order, and
//! adds the odd product then the even one, each product exact and each sum rounded to nearest
//! (checked against that description in the tests). So a row's data needs no repacking, and an
//! output's arithmetic is one accumulator walked over `k` in order, whatever the block around it.

use core::arch::x86_64::*;

use half::bf16;

use super::bf16::widen;
use super::{Block, Dot, reduce};

/// bf16 elements per vector.
const LANES: usize = 32;

/// Whether the CPU has AVX512-BF16 (AVX-512 F and BW come with the level that asks).
pub(super) fn detected() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
}

/// Activation rows as bf16 bits times bf16 weight rows.
pub(super) struct Bf16Dot<'a> {
    x: &'a [u16],
    w: &'a [bf16],
    k: usize,
}

impl<'a> Bf16Dot<'a> {
    /// Panics unless the CPU has AVX512-BF16, which the kernel's safety rests on.
    pub(super) fn new(x: &'a [u16], w: &'a [bf16], k: usize) -> Self {
        assert!(detected(), "bf16 dot products on a CPU without AVX512-BF16");
        Self { x, w, k }
    }
}

impl Dot for Bf16Dot<'_> {
    #[inline(always)]
    fn block<const R: usize, const C: usize, const PREFETCH: bool>(&self, at: &Block) -> [[f32; C]; R] {
        assert!((at.r0 + R) * self.k <= self.x.len() && (at.feature(C - 1) + 1) * self.k <= self.w.len());
        // SAFETY: AVX512-BF16 was detected when `self` was made (AVX-512 F and BW with the
        // AVX-512 level that reaches here), and the block's rows are inside x and w (above).
        unsafe { block::<R, C, PREFETCH>(self, at) }
    }
}

/// # Safety
/// AVX-512 F, BW and BF16 must be present, and the block's rows inside `d.x` and `d.w`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
unsafe fn block<const R: usize, const C: usize, const PREFETCH: bool>(d: &Bf16Dot<'_>, at: &Block) -> [[f32; C]; R] {
    let (k, r0) = (d.k, at.r0);
    let body = k - k % LANES;
    let (xp, wp) = (d.x.as_ptr(), d.w.as_ptr() as *const u16);
    // Zeros the compiler cannot see as a constant: a constant array of zeros became a call to
    // memset on the stack at every block (5-10% of a prompt chunk's samples in a profile, though
    // removing it changed no timing beyond the noise).
    let zero = _mm512_castsi512_ps(_mm512_set1_epi32(core::hint::black_box(0)));
    let mut acc = [[zero; C]; R];
    let mut i = 0;
    while i < body {
        // A vector is a cache line of weights: fetch the next stream's line every step.
        if PREFETCH {
            for c in 0..C {
                let next = at.next::<C>(c) * k + i;
                if next < d.w.len() {
                    _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(next) as *const i8);
                }
            }
        }
        // SAFETY: i + LANES <= body <= k, inside the block's rows (the caller's promise);
        // __m512i and __m512bh are both 64 bytes of lanes.
        unsafe {
            let mut wv: [__m512bh; C] = [core::mem::transmute::<__m512, __m512bh>(zero); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = core::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    wp.add(at.feature(c) * k + i) as *const __m512i
                ));
            }
            for r in 0..R {
                let xv: __m512bh = core::mem::transmute(_mm512_loadu_si512(xp.add((r0 + r) * k + i) as *const __m512i));
                for c in 0..C {
                    acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
                }
            }
        }
        i += LANES;
    }
    // (Loops, not closures, which might be compiled without this function's features; and no
    // array copies, which became calls to memmove.)
    let mut out = core::mem::MaybeUninit::<[[f32; C]; R]>::uninit();
    let out_p = out.as_mut_ptr() as *mut f32;
    for r in 0..R {
        // Every output through the same summation tree, four at a time (padded with zeros,
        // which add exactly).
        let lane = |c: usize| if c < C { acc[r][c] } else { _mm512_setzero_ps() };
        // SAFETY: AVX-512 F is present (the caller's promise).
        let sums4 = unsafe { reduce::sum4_avx512(&[lane(0), lane(1), lane(2), lane(3)]) };
        let xr = &d.x[(r0 + r) * k..(r0 + r + 1) * k];
        for (c, &first) in sums4.iter().enumerate().take(C) {
            let wr = &d.w[at.feature(c) * k..(at.feature(c) + 1) * k];
            let mut sum = first;
            for j in body..k {
                sum = widen(xr[j]).mul_add(wr[j].to_f32(), sum);
            }
            // SAFETY: r < R and c < C: inside the array.
            unsafe { out_p.add(r * C + c).write(sum) };
        }
    }
    // SAFETY: every element was written above.
    unsafe { out.assume_init() }
}

#[cfg(test)]
mod tests {
    use super::super::bf16::round_bits;
    use super::*;

    /// One `vdpbf16ps` against its description: per lane, the odd product then the even one,
    /// added to the accumulator one at a time in f32, products exact.
    #[test]
    fn the_instruction_adds_the_odd_product_then_the_even_one() {
        if !detected() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn dp(acc: &[f32; 16], a: &[u16; 32], b: &[u16; 32]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: the arrays hold 16 f32 and 32 u16 (64 bytes each).
            unsafe {
                let a: __m512bh = core::mem::transmute(_mm512_loadu_si512(a.as_ptr() as *const __m512i));
                let b: __m512bh = core::mem::transmute(_mm512_loadu_si512(b.as_ptr() as *const __m512i));
                _mm512_storeu_ps(out.as_mut_ptr(), _mm512_dpbf16_ps(_mm512_loadu_ps(acc.as_ptr()), a, b));
            }
            out
        }
        let mut seed = 11u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for _ in 0..20_000 {
            let mut value = || (next() as f32 / 2f32.powi(31) - 1.0) * 2f32.powi((next() % 24) as i32 - 12);
            let a: [u16; 32] = core::array::from_fn(|_| round_bits(value()));
            let b: [u16; 32] = core::array::from_fn(|_| round_bits(value()));
            let acc: [f32; 16] = core::array::from_fn(|_| value());
            // SAFETY: detected above.
            let got = unsafe { dp(&acc, &a, &b) };
            for i in 0..16 {
                let product = |j: usize| widen(a[j]) * widen(b[j]);
                let want = acc[i] + product(2 * i + 1) + product(2 * i);
                assert_eq!(got[i].to_bits(), want.to_bits(), "lane {i}");
            }
        }
    }

    /// The scalar rounding is the instruction's, subnormals, ties and NaNs included.
    #[test]
    fn rounding_matches_the_conversion_instruction() {
        if !detected() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn convert(x: &[f32; 32]) -> [u16; 32] {
            let mut out = [0u16; 32];
            // SAFETY: 32 f32 in, 32 u16 (64 bytes) out.
            unsafe {
                let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.as_ptr().add(16)), _mm512_loadu_ps(x.as_ptr()));
                _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, core::mem::transmute::<__m512bh, __m512i>(v));
            }
            out
        }
        let mut seed = 5u64;
        for round in 0..20_000 {
            let x: [f32; 32] = core::array::from_fn(|j| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let bits = (seed >> 32) as u32;
                // Every other round: subnormals, ties and values next to them.
                match (round % 2, j % 4) {
                    (1, 0) => f32::from_bits(bits & 0x807f_ffff),
                    (1, 1) => f32::from_bits((bits & 0xffff_0000) | 0x8000),
                    (1, 2) => f32::from_bits((bits & 0x8000_0000) | 0x0080_0000 | (bits & 0xffff)),
                    _ => f32::from_bits(bits),
                }
            });
            // SAFETY: detected above.
            let got = unsafe { convert(&x) };
            for j in 0..32 {
                if x[j].is_nan() {
                    assert!(widen(got[j]).is_nan());
                } else {
                    assert_eq!(got[j], round_bits(x[j]), "{:e} ({:#010x})", x[j], x[j].to_bits());
                }
            }
        }
    }
}

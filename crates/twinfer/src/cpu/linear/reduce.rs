//! The horizontal sums that end each output's dot product.
//!
//! Every output is its accumulator's lanes summed by the SIMD level's own tree (pulp's
//! `reduce_sum_f32s`; on AVX-512: lane `j` plus lane `j + 8`, then `+ 4`, `+ 2`, `+ 1`). On
//! AVX-512 a register block's four outputs are summed together, transposed: the same pairs
//! added at each level (addition commutes exactly), so the same bits, in 8 shuffles and 6 adds
//! where four separate sums take about 16 and 16, on the ports the FMAs need.

use pulp::Simd;

/// The horizontal sum of each accumulator in `acc`.
#[inline(always)]
pub(super) fn sums<S: Simd, const C: usize>(simd: S, acc: &[S::f32s; C]) -> [f32; C] {
    #[cfg(target_arch = "x86_64")]
    if C == 4 && std::any::TypeId::of::<S>() == std::any::TypeId::of::<pulp::x86::V4>() {
        // SAFETY: S is V4, so AVX-512 F is present and its f32s is 16 f32 (aligned to 4 bytes
        // only, hence the unaligned loads); C == 4 makes the array four of them.
        let four = unsafe {
            use core::arch::x86_64::_mm512_loadu_ps;
            let f = acc.as_ptr() as *const f32;
            sum4_avx512(&[
                _mm512_loadu_ps(f),
                _mm512_loadu_ps(f.add(16)),
                _mm512_loadu_ps(f.add(32)),
                _mm512_loadu_ps(f.add(48)),
            ])
        };
        let mut out = [0f32; C];
        out.copy_from_slice(&four[..C]);
        return out;
    }
    core::array::from_fn(|c| simd.reduce_sum_f32s(acc[c]))
}

/// The four sums of `a`, each by V4's `reduce_sum_f32s` tree.
///
/// # Safety
/// AVX-512 F must be present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn sum4_avx512(a: &[core::arch::x86_64::__m512; 4]) -> [f32; 4] {
    use core::arch::x86_64::*;
    // SAFETY: AVX-512 F is present (the caller's promise).
    unsafe {
        // Lane j + lane j + 8: the 256-bit halves of two accumulators side by side, then added.
        let ab = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a[0], a[1]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a[0], a[1]),
        );
        let cd = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a[2], a[3]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a[2], a[3]),
        );
        // Quarters now [a0-3 a4-7 b0-3 b4-7] and [c.. d..]: lane j + lane j + 4, one 128-bit
        // quarter per accumulator.
        let quarters =
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd), _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd));
        // Within each quarter: lane j + lane j + 2, then lane 0 + lane 1.
        let pairs = _mm512_add_ps(quarters, _mm512_permute_ps::<0b01_00_11_10>(quarters));
        let total = _mm512_add_ps(pairs, _mm512_permute_ps::<0b10_11_00_01>(pairs));
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), total);
        [lanes[0], lanes[4], lanes[8], lanes[12]]
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The transposed sums give the bits of four separate `reduce_sum_f32s`, on values whose
    /// sums depend on the order of addition.
    #[test]
    fn four_at_once_equal_four_one_by_one() {
        let Some(simd) = pulp::x86::V4::try_new() else {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        };
        let mut seed = 7u64;
        for _ in 0..2000 {
            let acc: [pulp::f32x16; 4] = core::array::from_fn(|_| {
                let lanes: [f32; 16] = core::array::from_fn(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let mantissa = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    mantissa * 2f32.powi(((seed >> 20) % 40) as i32 - 20)
                });
                pulp::cast(lanes)
            });
            let want: [f32; 4] = core::array::from_fn(|c| simd.reduce_sum_f32s(acc[c]));
            let got = simd.vectorize(
                #[inline(always)]
                || sums(simd, &acc),
            );
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "{acc:?}");
        }
    }
}

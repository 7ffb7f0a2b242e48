//! bf16 weights take bf16 activations, as llama.cpp's and PyTorch's bf16 products do: each row
//! of `x` is rounded to bf16 once per call, then every product of two bf16 values is exact in
//! f32 and only the sums round. Where the CPU has bf16 dot products (AVX512-BF16's
//! `vdpbf16ps`: 32 products a vector, twice the FMA's 16) the kernel takes the rounded bits
//! ([`super::bf16_dot`]); every other level widens them back to f32 and runs its FMA kernel, so
//! every level computes the same products and differs only in the order of the sums.
//!
//! The rounding is the instruction's (`vcvtne2ps2bf16`): to nearest, ties to even, subnormal
//! inputs and results flushed to zero, NaN kept a quiet NaN.

use crate::cpu::SimdLevel;

/// `x` rounded to bf16 bits, as `vcvtne2ps2bf16` rounds it.
#[inline(always)]
pub(crate) fn round_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let magnitude = bits & 0x7fff_ffff;
    if magnitude > 0x7f80_0000 {
        return ((bits >> 16) | 0x0040) as u16;
    }
    if magnitude < 0x0080_0000 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    // Ties to even: add just under half a unit, plus one when the kept lowest bit is odd. A
    // rounding past the largest finite value gives infinity, as it should.
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits (exact).
#[inline(always)]
pub(crate) fn widen(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Whether `level` runs bf16 weights through bf16 dot products (AVX-512 with AVX512-BF16).
pub(crate) fn has_dot(level: SimdLevel) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let SimdLevel::Avx512(_) = level {
        return super::bf16_dot::detected();
    }
    let _ = level;
    false
}

/// `out = x` rounded to bf16 bits, element by element (compiled with the level's features, so
/// the loop is vectorized).
pub(super) fn round_to_bits(level: SimdLevel, x: &[f32], out: &mut [u16]) {
    struct Round<'a>(&'a [f32], &'a mut [u16]);
    impl pulp::WithSimd for Round<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            self.1.iter_mut().zip(self.0).for_each(|(o, &v)| *o = round_bits(v));
        }
    }
    level.dispatch(Round(x, out));
}

/// `out = x` rounded to bf16 values, kept as f32 (for the levels that multiply in f32).
pub(super) fn round_to_values(level: SimdLevel, x: &[f32], out: &mut [f32]) {
    struct Round<'a>(&'a [f32], &'a mut [f32]);
    impl pulp::WithSimd for Round<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            self.1.iter_mut().zip(self.0).for_each(|(o, &v)| *o = widen(round_bits(v)));
        }
    }
    level.dispatch(Round(x, out));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rounding is `half`'s round-to-nearest-even on normal values, and the instruction's
    /// flush to zero on subnormal ones.
    #[test]
    fn rounds_to_nearest_even_and_flushes_subnormals() {
        let mut seed = 3u64;
        for _ in 0..200_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let x = f32::from_bits((seed >> 32) as u32);
            let got = round_bits(x);
            if x.is_nan() {
                assert!(widen(got).is_nan(), "{x}");
            } else if x.abs() < f32::MIN_POSITIVE {
                assert_eq!(widen(got), 0.0, "{x:e}");
                assert_eq!(widen(got).is_sign_negative(), x.is_sign_negative());
            } else {
                let want = half::bf16::from_f32(x);
                // half keeps subnormal results; the instruction flushes them (none arise here:
                // the smallest normal f32 rounds to a normal bf16).
                assert_eq!(got, want.to_bits(), "{x:e}");
            }
        }
        // Ties: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 and goes to the even one.
        assert_eq!(widen(round_bits(1.0 + 2f32.powi(-8))), 1.0);
        assert_eq!(widen(round_bits(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2f32.powi(-6));
        assert_eq!(widen(round_bits(f32::MAX)), f32::INFINITY);
    }

    #[test]
    fn every_level_rounds_alike() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 * 0.37 - 150.0).collect();
        let want: Vec<u16> = x.iter().map(|&v| round_bits(v)).collect();
        for level in SimdLevel::available() {
            let mut bits = vec![0u16; x.len()];
            round_to_bits(level, &x, &mut bits);
            assert_eq!(bits, want, "{level}");
            let mut values = vec![f32::NAN; x.len()];
            round_to_values(level, &x, &mut values);
            assert!(values.iter().zip(&want).all(|(&v, &b)| v == widen(b)), "{level}");
        }
    }
}

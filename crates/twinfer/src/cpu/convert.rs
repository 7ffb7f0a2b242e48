//! Loading K/V rows into f32 tiles. f16 rows use the CPU's conversion instructions where the
//! running SIMD level guarantees them (AVX-512F's `vcvtph2ps`; F16C beside AVX2, checked once);
//! every other case uses the exact bit-manipulation widening of [`crate::dtype`].

use std::any::TypeId;

use half::f16;
use pulp::Simd;

use crate::dtype::{Element, TensorRef};

/// `dst = src[offset..offset + dst.len()]` as f32.
#[inline(always)]
pub(crate) fn load_f32<S: Simd>(src: TensorRef<'_>, offset: usize, dst: &mut [f32]) {
    match src {
        TensorRef::F16(s) => widen_f16::<S>(&s[offset..offset + dst.len()], dst),
        other => other.read_f32(offset, dst),
    }
}

/// Hints the cache to fetch `len` elements at `offset`, into L2: issued for the next key tile
/// while the current one is computed, so that reading memory overlaps the arithmetic.
#[inline(always)]
pub(crate) fn prefetch(src: TensorRef<'_>, offset: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (ptr, bytes) = match src {
            TensorRef::F32(s) => (s[offset..offset + len].as_ptr() as *const i8, len * 4),
            TensorRef::F16(s) => (s[offset..offset + len].as_ptr() as *const i8, len * 2),
            TensorRef::BF16(s) => (s[offset..offset + len].as_ptr() as *const i8, len * 2),
        };
        let mut at = 0;
        while at < bytes {
            // SAFETY: a prefetch never faults, and `at < bytes` keeps the address in the slice.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(ptr.add(at)) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, offset, len);
}

#[inline(always)]
fn widen_f16<S: Simd>(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if TypeId::of::<S>() == TypeId::of::<pulp::x86::V4>() {
            // SAFETY: a V4 token exists only where AVX-512F is available.
            unsafe { x86::widen_avx512(src, dst) };
            return;
        }
        if TypeId::of::<S>() == TypeId::of::<pulp::x86::V3>() && x86::has_f16c() {
            // SAFETY: V3 implies AVX; F16C was checked at run time.
            unsafe { x86::widen_f16c(src, dst) };
            return;
        }
    }
    let _ = TypeId::of::<S>;
    f16::slice_to_f32(src, dst);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;
    use half::f16;
    use std::sync::OnceLock;

    use crate::dtype::Element;

    pub(super) fn has_f16c() -> bool {
        static F16C: OnceLock<bool> = OnceLock::new();
        *F16C.get_or_init(|| std::arch::is_x86_feature_detected!("f16c"))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_avx512(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bounds both the 32-byte load and the 64-byte store.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
            i += 16;
        }
        f16::slice_to_f32(&src[i..n], &mut dst[i..n]);
    }

    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds both the 16-byte load and the 32-byte store.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        f16::slice_to_f32(&src[i..n], &mut dst[i..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::SimdLevel;

    struct Widen<'a>(&'a [f16], &'a mut [f32]);
    impl pulp::WithSimd for Widen<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _simd: S) {
            load_f32::<S>(TensorRef::F16(self.0), 0, self.1);
        }
    }

    #[test]
    fn every_level_widens_every_f16_exactly() {
        // Odd length: exercises the vector body and the tail.
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).chain([f16::ONE; 7]).collect();
        for level in SimdLevel::available() {
            let mut out = vec![0.0f32; all.len()];
            level.dispatch(Widen(&all, &mut out));
            for (h, f) in all.iter().zip(&out) {
                let want = h.to_f32();
                assert!(
                    want.to_bits() == f.to_bits() || (want.is_nan() && f.is_nan()),
                    "{level}: {:#06x}",
                    h.to_bits()
                );
            }
        }
    }
}

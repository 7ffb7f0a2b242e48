//! Reading K/V storage as f32: whole rows into tiles ([`load_f32`]) or one vector into registers
//! ([`LoadLanes`]). f16 uses the CPU's conversion instruction where the running SIMD level has
//! it (AVX-512F's `vcvtph2ps`; F16C, which the AVX2 level runs with), and on wasm simd128, which
//! has none, an exact widening in vector registers; every other case uses the exact
//! bit-manipulation widening of [`crate::dtype`]. Also the prefetch hint the kernels use.

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

/// Hints the cache to fetch `len` elements at `offset`, into L1: issued for the next key tile
/// while the current one is computed, so that reading memory overlaps the arithmetic.
#[inline(always)]
pub(crate) fn prefetch(src: TensorRef<'_>, offset: usize, len: usize) {
    match src {
        TensorRef::F32(s) => prefetch_slice(s, offset, len),
        TensorRef::F16(s) => prefetch_slice(s, offset, len),
        TensorRef::BF16(s) => prefetch_slice(s, offset, len),
        TensorRef::Q8(q) => prefetch_slice(q.codes, offset, len),
    }
}

/// [`prefetch`] of `data[offset..offset + len]`, whatever its element type.
#[inline(always)]
pub(crate) fn prefetch_slice<E>(data: &[E], offset: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (ptr, bytes) = (data[offset..offset + len].as_ptr() as *const i8, len * size_of::<E>());
        let mut at = 0;
        while at < bytes {
            // SAFETY: a prefetch never faults, and `at < bytes` keeps the address in the slice.
            // T0: on the Zen 5 VM (2026-12-08) paged decode read 1.2-1.6x faster than with T1,
            // and rows at random 1.3-2x; an Intel VM had measured T1 against T2, NTA and none only.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr.add(at)) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, offset, len);
}

/// Whether this SIMD level widens f16 in vector registers (AVX-512F, AVX2 run with F16C, or
/// wasm simd128's integer-and-multiply sequence).
#[inline(always)]
fn native_f16<S: Simd>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        TypeId::of::<S>() == TypeId::of::<pulp::x86::V4>() || TypeId::of::<S>() == TypeId::of::<pulp::x86::V3>()
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        TypeId::of::<S>() == TypeId::of::<crate::cpu::WasmSimd>()
    }
    #[cfg(not(any(target_arch = "x86_64", all(target_arch = "wasm32", target_feature = "simd128"))))]
    {
        let _ = TypeId::of::<S>;
        false
    }
}

/// Four f16 at `ptr` as f32, exactly, with simd128 integer ops: the exponent and mantissa move
/// into f32 position and a multiply by 2^112 rebiases the exponent (exact, subnormals included,
/// since scaling by a power of two is); infinities and NaNs get the all-ones exponent instead.
///
/// # Safety
/// `ptr` must be valid for reading 4 elements.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
unsafe fn widen4_simd128(ptr: *const f16) -> core::arch::wasm32::v128 {
    use core::arch::wasm32::*;
    // SAFETY: 4 readable f16 = 8 bytes, per the caller; wasm loads need no alignment.
    let bits = u32x4_extend_low_u16x8(unsafe { v128_load64_zero(ptr as *const u64) });
    let sign = u32x4_shl(v128_and(bits, u32x4_splat(0x8000)), 16);
    let magnitude = u32x4_shl(v128_and(bits, u32x4_splat(0x7fff)), 13);
    let rebiased = f32x4_mul(magnitude, f32x4_splat(f32::from_bits(0x7780_0000)));
    let inf_or_nan = u32x4_ge(magnitude, u32x4_splat(0x7c00 << 13));
    let special = v128_or(magnitude, u32x4_splat(0x7f80_0000));
    v128_or(v128_bitselect(special, rebiased, inf_or_nan), sign)
}

#[inline(always)]
fn widen_f16<S: Simd>(src: &[f16], dst: &mut [f32]) {
    if !native_f16::<S>() {
        // The whole-slice bit manipulation vectorises better than a vector at a time.
        f16::slice_to_f32(src, dst);
        return;
    }
    let (lanes, n) = (S::F32_LANES, src.len().min(dst.len()));
    let mut i = 0;
    while i + lanes <= n {
        // SAFETY: i + lanes <= n bounds both the read of `src` and the write of `dst`.
        unsafe { *(dst.as_mut_ptr().add(i) as *mut S::f32s) = f16::load_lanes::<S>(src.as_ptr().add(i)) };
        i += lanes;
    }
    f16::slice_to_f32(&src[i..n], &mut dst[i..n]);
}

/// One vector through a stack buffer, for element types or levels with no widening instruction.
///
/// # Safety
/// `ptr` must be valid for reading `S::F32_LANES` elements.
#[inline(always)]
unsafe fn load_through_buffer<S: Simd, E: Element>(ptr: *const E) -> S::f32s {
    let mut lanes = [0f32; 16];
    let n = S::F32_LANES;
    // SAFETY: the caller guarantees `n` readable elements.
    let src = unsafe { core::slice::from_raw_parts(ptr, n) };
    E::slice_to_f32(src, &mut lanes[..n]);
    // SAFETY: `lanes` holds at least F32_LANES (<= 16) f32 values.
    unsafe { *(lanes.as_ptr() as *const S::f32s) }
}

/// Loads one vector of lanes from storage, widening to f32 in registers: the decode kernel reads
/// the KV pool through this, so f16 pages (and int8 codes) never pass through an f32 copy in
/// memory.
pub(crate) trait LoadLanes: Copy + 'static {
    /// # Safety
    /// `ptr` must be valid for reading `S::F32_LANES` elements.
    unsafe fn load_lanes<S: Simd>(ptr: *const Self) -> S::f32s;
}

impl LoadLanes for f32 {
    #[inline(always)]
    unsafe fn load_lanes<S: Simd>(ptr: *const Self) -> S::f32s {
        // SAFETY: the caller guarantees F32_LANES readable elements; `f32s` has f32 alignment.
        unsafe { *(ptr as *const S::f32s) }
    }
}

impl LoadLanes for f16 {
    #[inline(always)]
    unsafe fn load_lanes<S: Simd>(ptr: *const Self) -> S::f32s {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::*;
            if TypeId::of::<S>() == TypeId::of::<pulp::x86::V4>() {
                // SAFETY: V4 guarantees AVX-512F; 16 readable f16 per the caller; same-size transmute.
                return unsafe {
                    let wide = _mm512_cvtph_ps(_mm256_loadu_si256(ptr as *const __m256i));
                    core::mem::transmute_copy::<__m512, S::f32s>(&wide)
                };
            }
            if TypeId::of::<S>() == TypeId::of::<pulp::x86::V3>() {
                // SAFETY: the engine runs V3 code only inside a context with F16C enabled
                // (`SimdLevel::dispatch`); 8 readable f16 per the caller; same-size transmute.
                return unsafe {
                    let wide = _mm256_cvtph_ps(_mm_loadu_si128(ptr as *const __m128i));
                    core::mem::transmute_copy::<__m256, S::f32s>(&wide)
                };
            }
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        if TypeId::of::<S>() == TypeId::of::<crate::cpu::WasmSimd>() {
            // SAFETY: Simd128 has 4 lanes, readable per the caller; same-size transmute.
            return unsafe { core::mem::transmute_copy::<core::arch::wasm32::v128, S::f32s>(&widen4_simd128(ptr)) };
        }
        // SAFETY: forwarded from the caller.
        unsafe { load_through_buffer::<S, f16>(ptr) }
    }
}

/// int8 codes as f32 (exact): sign-extend to 32 bits, then convert. The scales are applied by the
/// caller, to scores and probabilities rather than to every element.
impl LoadLanes for i8 {
    #[inline(always)]
    unsafe fn load_lanes<S: Simd>(ptr: *const Self) -> S::f32s {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::*;
            if TypeId::of::<S>() == TypeId::of::<pulp::x86::V4>() {
                // SAFETY: V4 guarantees AVX-512F; 16 readable bytes per the caller; same-size transmute.
                return unsafe {
                    let wide = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(ptr as *const __m128i)));
                    core::mem::transmute_copy::<__m512, S::f32s>(&wide)
                };
            }
            if TypeId::of::<S>() == TypeId::of::<pulp::x86::V3>() {
                // SAFETY: V3 guarantees AVX2; 8 readable bytes per the caller; same-size transmute.
                return unsafe {
                    let wide = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(ptr as *const __m128i)));
                    core::mem::transmute_copy::<__m256, S::f32s>(&wide)
                };
            }
        }
        #[cfg(target_arch = "aarch64")]
        if TypeId::of::<S>() == TypeId::of::<pulp::aarch64::Neon>() {
            use core::arch::aarch64::*;
            // SAFETY: NEON is baseline on aarch64; 4 readable bytes per the caller (read as one
            // u32, unaligned); same-size transmute.
            return unsafe {
                let word = core::ptr::read_unaligned(ptr as *const u32);
                let bytes = vreinterpret_s8_u32(vdup_n_u32(word));
                let wide = vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(bytes))));
                core::mem::transmute_copy::<float32x4_t, S::f32s>(&wide)
            };
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        if TypeId::of::<S>() == TypeId::of::<crate::cpu::WasmSimd>() {
            use core::arch::wasm32::*;
            // SAFETY: 4 readable bytes per the caller, read as one unaligned u32; same-size transmute.
            return unsafe {
                let word = core::ptr::read_unaligned(ptr as *const u32);
                let wide = f32x4_convert_i32x4(i32x4_extend_low_i16x8(i16x8_extend_low_i8x16(u32x4_splat(word))));
                core::mem::transmute_copy::<v128, S::f32s>(&wide)
            };
        }
        let mut lanes = [0f32; 16];
        let n = S::F32_LANES;
        // SAFETY: the caller guarantees `n` readable codes.
        let src = unsafe { core::slice::from_raw_parts(ptr, n) };
        for (l, &c) in lanes[..n].iter_mut().zip(src) {
            *l = c as f32;
        }
        // SAFETY: `lanes` holds at least F32_LANES (<= 16) f32 values.
        unsafe { *(lanes.as_ptr() as *const S::f32s) }
    }
}

impl LoadLanes for half::bf16 {
    #[inline(always)]
    unsafe fn load_lanes<S: Simd>(ptr: *const Self) -> S::f32s {
        // SAFETY: forwarded from the caller.
        unsafe { load_through_buffer::<S, half::bf16>(ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::SimdLevel;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

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

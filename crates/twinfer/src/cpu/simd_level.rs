//! The instruction set the CPU engine runs with: detected once, kept, and selectable in tests.

use std::fmt;

/// A SIMD instruction set that the CPU kernels can be instantiated for.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum SimdLevel {
    /// Portable scalar code (one lane), available everywhere.
    Scalar,
    /// x86-64-v3: AVX2 + FMA + F16C (8 f32 lanes).
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
    /// x86-64-v4: AVX-512 F/BW/CD/DQ/VL (16 f32 lanes).
    #[cfg(target_arch = "x86_64")]
    Avx512(pulp::x86::V4),
    /// aarch64 NEON (4 f32 lanes).
    #[cfg(target_arch = "aarch64")]
    Neon(pulp::aarch64::Neon),
    /// wasm32 simd128 (4 f32 lanes); chosen at compile time with `-C target-feature=+simd128`,
    /// with relaxed SIMD's fused multiply-add when also built with `+relaxed-simd` (see [`WasmSimd`]).
    #[cfg(target_arch = "wasm32")]
    Simd128(WasmSimd),
}

/// The wasm SIMD context: pulp's relaxed-SIMD one when the module is built with relaxed SIMD
/// (the `relaxed-simd` feature and `-C target-feature=+relaxed-simd`), whose multiply-add is
/// `f32x4.relaxed_madd` (fused where the hardware fuses, so results may differ between machines
/// in the last bit, never between runs on one), else plain simd128.
#[cfg(all(target_arch = "wasm32", feature = "relaxed-simd", target_feature = "relaxed-simd"))]
pub type WasmSimd = pulp::wasm::RelaxedSimd;
/// The wasm SIMD context: plain simd128 (see the relaxed-SIMD build's definition).
#[cfg(all(target_arch = "wasm32", not(all(feature = "relaxed-simd", target_feature = "relaxed-simd"))))]
pub type WasmSimd = pulp::wasm::Simd128;

/// Whether this build's wasm level uses relaxed SIMD.
#[cfg(target_arch = "wasm32")]
const RELAXED: bool = cfg!(all(target_arch = "wasm32", feature = "relaxed-simd", target_feature = "relaxed-simd"));

impl SimdLevel {
    /// The best level this machine supports.
    pub fn detect() -> Self {
        Self::available().into_iter().last().unwrap_or(SimdLevel::Scalar)
    }

    /// Every level this machine supports, from scalar to the widest.
    pub fn available() -> Vec<SimdLevel> {
        #[allow(unused_mut)]
        let mut levels = vec![SimdLevel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            // The kernels convert f16 with F16C under AVX2; every x86-64-v3 CPU has it.
            if let Some(v3) = pulp::x86::V3::try_new()
                && std::arch::is_x86_feature_detected!("f16c")
            {
                levels.push(SimdLevel::Avx2(v3));
            }
            if let Some(v4) = pulp::x86::V4::try_new() {
                levels.push(SimdLevel::Avx512(v4));
            }
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(neon) = pulp::aarch64::Neon::try_new() {
            levels.push(SimdLevel::Neon(neon));
        }
        #[cfg(target_arch = "wasm32")]
        if let Some(simd) = WasmSimd::try_new() {
            levels.push(SimdLevel::Simd128(simd));
        }
        levels
    }

    /// Looks a level up by name (`scalar`, `avx2`, `avx512`, `neon`, `simd128`), if present here.
    pub fn by_name(name: &str) -> Option<SimdLevel> {
        Self::available().into_iter().find(|l| l.name().eq_ignore_ascii_case(name))
    }

    /// Short, stable name (`simd128-relaxed` for the relaxed-SIMD wasm build).
    pub fn name(&self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512(_) => "avx512",
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon(_) => "neon",
            #[cfg(target_arch = "wasm32")]
            SimdLevel::Simd128(_) if RELAXED => "simd128-relaxed",
            #[cfg(target_arch = "wasm32")]
            SimdLevel::Simd128(_) => "simd128",
        }
    }

    /// Whether this level multiplies bf16 in dot-product instructions (AVX-512 with
    /// AVX512-BF16): bf16 weights and bf16 K/V then take bf16 activations, queries and
    /// probabilities (see `cpu::linear`'s bf16 notes); every other level multiplies the same
    /// weights' products in f32, and keeps queries and probabilities f32.
    pub fn bf16_dot(&self) -> bool {
        crate::cpu::linear::bf16::has_dot(*self)
    }

    /// f32 lanes per vector register.
    pub fn f32_lanes(&self) -> usize {
        match self {
            SimdLevel::Scalar => 1,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2(_) => 8,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512(_) => 16,
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon(_) => 4,
            #[cfg(target_arch = "wasm32")]
            SimdLevel::Simd128(_) => 4,
        }
    }

    /// Runs `op` compiled for this level.
    #[inline(always)]
    pub(crate) fn dispatch<Op: pulp::WithSimd>(self, op: Op) -> Op::Output {
        use pulp::Simd;
        match self {
            SimdLevel::Scalar => Simd::vectorize(pulp::Scalar::new(), op),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an `Avx2` level exists only where V3's features and F16C were detected.
            SimdLevel::Avx2(s) => unsafe { vectorize_v3_f16c(s, op) },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512(s) => Simd::vectorize(s, op),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon(s) => Simd::vectorize(s, op),
            #[cfg(target_arch = "wasm32")]
            SimdLevel::Simd128(s) => Simd::vectorize(s, op),
        }
    }
}

impl fmt::Debug for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// pulp's AVX2 context without F16C would leave every f16 conversion an out-of-line call; this
/// one compiles the kernel with V3's features plus F16C, so conversions inline.
///
/// # Safety
/// The CPU must have every x86-64-v3 feature and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse,sse2,fxsr,sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,bmi1,bmi2,fma,lzcnt,f16c")]
unsafe fn vectorize_v3_f16c<Op: pulp::WithSimd>(simd: pulp::x86::V3, op: Op) -> Op::Output {
    op.with_simd(simd)
}

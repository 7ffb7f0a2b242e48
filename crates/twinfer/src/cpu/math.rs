//! Vector math the kernels need and pulp does not provide: a fast `exp`, and the exact (erf)
//! GELU built on it.

use pulp::Simd;

/// `exp(x)` to a few ulp for x in [-87.3, 88.3] (clamped above; attention only needs x <= 0); 0 below (including -inf), so masked
/// scores vanish. Cody-Waite reduction `x = n ln2 + r` (ln2 split in two so `r` stays exact),
/// a degree-7 Taylor polynomial for `e^r` on |r| <= ln2/2, and `2^n` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp_f32s<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    const LN2_HI: f32 = 0.693_359_4; // few significant bits: n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let lo = simd.splat_f32s(-87.3);
    let underflow = simd.less_than_f32s(x, lo);
    let x = simd.min_f32s(simd.max_f32s(x, lo), simd.splat_f32s(88.3));
    let shifted = simd.mul_add_e_f32s(x, simd.splat_f32s(std::f32::consts::LOG2_E), simd.splat_f32s(MAGIC));
    let n = simd.sub_f32s(shifted, simd.splat_f32s(MAGIC));
    let r = simd.sub_f32s(x, simd.mul_f32s(n, simd.splat_f32s(LN2_HI)));
    let r = simd.sub_f32s(r, simd.mul_f32s(n, simd.splat_f32s(LN2_LO)));
    let mut p = simd.splat_f32s(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = simd.mul_add_e_f32s(p, r, simd.splat_f32s(c));
    }
    // 2^n from the integer sitting in the mantissa of `shifted`: ((n + 127) << 23) as bits.
    let bits = simd.transmute_u32s_f32s(shifted);
    let biased = simd.add_u32s(simd.sub_u32s(bits, simd.splat_u32s(0x4B40_0000)), simd.splat_u32s(127));
    let scale = simd.transmute_f32s_u32s(simd.mul_u32s(biased, simd.splat_u32s(1 << 23)));
    let y = simd.mul_f32s(p, scale);
    simd.select_f32s(underflow, simd.splat_f32s(0.0), y)
}

/// The exact GELU, `0.5 x erfc(-x / sqrt 2)`, with erfc from Numerical Recipes' Chebyshev fit
/// (`erfcc`, fractional error below 1.2e-7 for every argument): the formula the WGSL kernels use,
/// so the CPU and GPU encoders agree. For x < 0 it is `erfc(|z|)` directly; for x > 0, `2 -
/// erfc(|z|)`, so neither side subtracts nearly equal numbers.
// The fit's published coefficients, digit for digit (they round to the same f32s).
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(crate) fn gelu_f32s<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    let z = simd.abs_f32s(simd.mul_f32s(x, simd.splat_f32s(std::f32::consts::FRAC_1_SQRT_2)));
    let one = simd.splat_f32s(1.0);
    let t = simd.div_f32s(one, simd.mul_add_e_f32s(z, simd.splat_f32s(0.5), one));
    let mut p = simd.splat_f32s(0.170_872_77);
    for c in [
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_68,
        -1.265_512_23,
    ] {
        p = simd.mul_add_e_f32s(p, t, simd.splat_f32s(c));
    }
    let erfc = simd.mul_f32s(t, exp_f32s(simd, simd.sub_f32s(p, simd.mul_f32s(z, z))));
    let positive = simd.greater_than_f32s(x, simd.splat_f32s(0.0));
    let erfc_neg_z = simd.select_f32s(positive, simd.sub_f32s(simd.splat_f32s(2.0), erfc), erfc);
    simd.mul_f32s(simd.mul_f32s(x, simd.splat_f32s(0.5)), erfc_neg_z)
}

/// [`gelu_f32s`] over a slice, in place.
pub(crate) struct GeluInPlace<'a>(pub &'a mut [f32]);

impl pulp::WithSimd for GeluInPlace<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let (head, tail) = S::as_mut_simd_f32s(self.0);
        for x in head {
            *x = gelu_f32s(simd, *x);
        }
        if !tail.is_empty() {
            let y = gelu_f32s(simd, simd.partial_load_f32s(tail));
            simd.partial_store_f32s(tail, y);
        }
    }
}

/// SwiGLU's gating in place: `gate[i] = silu(gate[i]) * up[i]`, `silu(g) = g / (1 + exp(-g))`.
/// Very negative gates make `exp(-g)` large but finite (it clamps at e^88.3), so the result goes
/// to zero as it should; very positive ones make it vanish, leaving `g * up`.
pub(crate) struct SiluMul<'a>(pub &'a mut [f32], pub &'a [f32]);

impl pulp::WithSimd for SiluMul<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self(gate, up) = self;
        assert_eq!(gate.len(), up.len(), "silu_mul: gate and up differ in length");
        let (gh, gt) = S::as_mut_simd_f32s(gate);
        let (uh, ut) = S::as_simd_f32s(up);
        for (g, u) in gh.iter_mut().zip(uh) {
            *g = silu_mul_f32s(simd, *g, *u);
        }
        if !gt.is_empty() {
            let y = silu_mul_f32s(simd, simd.partial_load_f32s(gt), simd.partial_load_f32s(ut));
            simd.partial_store_f32s(gt, y);
        }
    }
}

// A function, not a closure: a closure here would be compiled without the level's features.
#[inline(always)]
fn silu_mul_f32s<S: Simd>(simd: S, g: S::f32s, u: S::f32s) -> S::f32s {
    let e = exp_f32s(simd, simd.neg_f32s(g));
    simd.mul_f32s(simd.div_f32s(g, simd.add_f32s(simd.splat_f32s(1.0), e)), u)
}

/// `xs[i] = exp(xs[i] - shift)` in place, returning the sum of the results.
#[inline(always)]
pub(crate) fn exp_sub_sum<S: Simd>(simd: S, xs: &mut [f32], shift: f32) -> f32 {
    let shift_v = simd.splat_f32s(shift);
    let (head, tail) = S::as_mut_simd_f32s(xs);
    let mut sum = simd.splat_f32s(0.0);
    for x in head {
        let e = exp_f32s(simd, simd.sub_f32s(*x, shift_v));
        *x = e;
        sum = simd.add_f32s(sum, e);
    }
    let mut total = simd.reduce_sum_f32s(sum);
    if !tail.is_empty() {
        let e = exp_f32s(simd, simd.sub_f32s(simd.partial_load_f32s(tail), shift_v));
        simd.partial_store_f32s(tail, e);
        total += tail.iter().sum::<f32>();
    }
    total
}

/// Maximum of a slice (-inf for an empty one).
#[inline(always)]
pub(crate) fn max_of<S: Simd>(simd: S, xs: &[f32]) -> f32 {
    let (head, tail) = S::as_simd_f32s(xs);
    let mut m = simd.splat_f32s(f32::NEG_INFINITY);
    for x in head {
        m = simd.max_f32s(m, *x);
    }
    tail.iter().fold(simd.reduce_max_f32s(m), |a, &b| a.max(b))
}

/// `xs *= a`.
#[inline(always)]
pub(crate) fn scale_in_place<S: Simd>(simd: S, xs: &mut [f32], a: f32) {
    let av = simd.splat_f32s(a);
    let (head, tail) = S::as_mut_simd_f32s(xs);
    for x in head {
        *x = simd.mul_f32s(*x, av);
    }
    for x in tail {
        *x *= a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::SimdLevel;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    struct ExpAll<'a>(&'a mut [f32]);
    impl pulp::WithSimd for ExpAll<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            exp_sub_sum(simd, self.0, 0.0);
        }
    }

    #[test]
    fn gelu_matches_the_f64_erf_gelu_on_every_level() {
        let inputs: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.004)
            .chain([-40.0, -14.0, -13.0, -9.5, -6.0, 6.0, 9.5, 40.0, 1e-30, -1e-30, 0.0])
            .collect();
        for level in SimdLevel::available() {
            let mut xs = inputs.clone();
            level.dispatch(GeluInPlace(&mut xs));
            for (x, y) in inputs.iter().zip(&xs) {
                let x64 = *x as f64;
                let want = 0.5 * x64 * libm::erfc(-x64 * std::f64::consts::FRAC_1_SQRT_2);
                // The fit's 1.2e-7 plus f32 rounding of the polynomial and of exp (4e-7); in the
                // negative tail exp's argument -z^2 carries an f32 rounding of about z^2 * 6e-8,
                // which becomes that relative error of a value below 1e-30 at |x| = 12.
                let ok = ((*y as f64) - want).abs() <= (1e-6 + 2e-7 * x64 * x64) * want.abs() + 1e-37;
                assert!(ok, "{level}: gelu({x}) = {y}, want {want}");
            }
        }
    }

    #[test]
    fn silu_mul_matches_f64_on_every_level() {
        let gate: Vec<f32> = (-3000..=3000).map(|i| i as f32 * 0.01).chain([-100.0, -88.0, 90.0, 1e-30]).collect();
        let up: Vec<f32> = (0..gate.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for level in SimdLevel::available() {
            let mut got = gate.clone();
            level.dispatch(SiluMul(&mut got, &up));
            for ((g, u), y) in gate.iter().zip(&up).zip(&got) {
                let (g64, u64) = (*g as f64, *u as f64);
                let want = g64 / (1.0 + (-g64).exp()) * u64;
                // exp to 4e-7 and three f32 roundings; below g = -88 exp's clamp at e^88.3 leaves
                // |result| under 1e-36 instead of its smaller true value.
                assert!(
                    ((*y as f64) - want).abs() <= 1e-6 * want.abs() + 1e-36,
                    "{level}: silu({g}) * {u} = {y}, want {want}"
                );
            }
        }
    }

    #[test]
    fn exp_matches_std_on_every_level() {
        let inputs: Vec<f32> =
            (-2000..=1960).map(|i| i as f32 * 0.045).chain([f32::NEG_INFINITY, -1e30, -87.0, 88.0, 0.0]).collect();
        for level in SimdLevel::available() {
            let mut xs = inputs.clone();
            level.dispatch(ExpAll(&mut xs));
            for (x, y) in inputs.iter().zip(&xs) {
                let want = (*x as f64).exp();
                let ok = if *x < -87.3 { *y == 0.0 } else { ((*y as f64) - want).abs() <= 4e-7 * want + 1e-37 };
                assert!(ok, "{level}: exp({x}) = {y}, want {want}");
            }
        }
    }
}

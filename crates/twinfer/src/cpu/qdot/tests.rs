//! The activation quantizer against its definition, and the f16 conversion the NEON and wasm
//! kernels do in vectors.

use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// The quantizer as its definition reads, one element at a time: (codes, scale, sum, sum of
/// the first half).
fn quantize_naive(x: &[f32], qmax: f32) -> (Vec<i16>, f32, i32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if !x.iter().all(|v| v.is_finite()) {
        return (vec![0; x.len()], f32::NAN, 0, 0);
    }
    if amax < SMALLEST_AMAX {
        return (vec![0; x.len()], 0.0, 0, 0);
    }
    let dx = amax / qmax;
    let q: Vec<i16> = x.iter().map(|&v| (v * (1.0 / dx)).round_ties_even().clamp(-qmax, qmax) as i16).collect();
    let low = q[..BLOCK / 2].iter().map(|&c| c as i32).sum();
    (q.clone(), dx, q.iter().map(|&c| c as i32).sum(), low)
}

/// Every level quantizes to the same bits as the definition, with either code width: ties at
/// half steps, blocks of zeros, blocks too small for a normal scale, infinities and NaNs, huge and tiny values; and
/// the digits put each code back together, within -127..=127.
#[test]
fn quantizer_equals_its_definition_on_every_level() {
    let k = 4 * BLOCK;
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / 16_777_216.0 - 0.5
    };
    for scale in [1.0f32, 1e-3, 3e4, 1e-36, 1e-40] {
        rows.push((0..k).map(|_| next() * scale).collect());
    }
    // Half steps: with amax 32385, the code of v is v itself, so n + 0.5 is a tie; and codes
    // whose coarse digit is a near tie (255 m + 127, 255 m + 128).
    rows.push((0..k).map(|j| if j % BLOCK == 0 { QMAX } else { (j % 9) as f32 * 3601.0 - 4.5 }).collect());
    rows.push(
        (0..k)
            .map(
                |j| {
                    if j % BLOCK == 0 { -QMAX } else { (255 * (j % 254) as i32 - 32385 + 127 + (j % 2) as i32) as f32 }
                },
            )
            .collect(),
    );
    // Half steps of 8-bit codes: with amax 127 the scale is 1.
    rows.push((0..k).map(|j| if j % BLOCK == 0 { 127.0 } else { (j % 9) as f32 * 15.0 - 60.5 }).collect());
    let mut specials: Vec<f32> = (0..k).map(|_| next()).collect();
    specials[3] = f32::INFINITY;
    specials[BLOCK + 5] = f32::NAN;
    specials[2 * BLOCK + 1] = f32::NEG_INFINITY;
    specials[3 * BLOCK..].fill(0.0);
    rows.push(specials);
    let x: Vec<f32> = rows.concat();
    let n = rows.len();
    let nb = k / BLOCK;
    for (level, codes) in
        SimdLevel::available().into_iter().flat_map(|l| [(l, ActivationCodes::Int16), (l, ActivationCodes::Int8)])
    {
        let mut a = QuantizedRows::default();
        a.quantize(level, codes, &x, n, k);
        for r in 0..n {
            for b in 0..nb {
                let (q, dx, sum, low) = quantize_naive(&x[r * k + b * BLOCK..][..BLOCK], codes.qmax());
                let at = r * nb + b;
                let what = format!("{level} {codes:?} row {r} block {b}");
                assert_eq!(&a.q[at * BLOCK..][..BLOCK], &q[..], "{what}");
                assert_eq!(a.dx[at].to_bits(), dx.to_bits(), "{what}");
                assert_eq!((a.qsum[at], a.qsum_low[at]), (sum, low), "{what}");
                assert_eq!(a.sx[at].to_bits(), (dx * sum as f32).to_bits(), "{what}");
                let coarse = &a.digits[a.digit_at(r, 0, b)..][..BLOCK];
                let fine = &a.digits[a.digit_at(r, 1, b)..][..BLOCK];
                for j in 0..BLOCK {
                    let (hi, lo) = (coarse[j] as i32, fine[j] as i32);
                    assert!(hi.abs() <= 127 && lo.abs() <= 127, "{what} [{j}]: digits {hi}, {lo}");
                    // The VNNI kernel skips the coarse digits of 8-bit codes.
                    assert!(codes == ActivationCodes::Int16 || hi == 0, "{what} [{j}]: coarse digit {hi}");
                    assert_eq!(DIGIT_BASE * hi + lo, q[j] as i32, "{what} [{j}]");
                }
            }
        }
    }
}

/// The conversion the NEON and wasm kernels do in vectors, on every finite f16.
#[test]
fn f16_rebase_is_exact_for_every_finite_value() {
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h);
        if !want.is_finite() {
            continue;
        }
        let magnitude = f32::from_bits(((h & 0x7fff) as u32) << 13) * F16_REBASE;
        let got = f32::from_bits(magnitude.to_bits() | ((h & 0x8000) as u32) << 16);
        assert_eq!(got.to_bits(), want.to_f32().to_bits(), "f16 bits {h:#06x}");
    }
}

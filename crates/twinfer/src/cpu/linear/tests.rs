use super::*;
use half::f16;

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
        .collect()
}

#[test]
fn matches_f64_and_is_batch_invariant_on_every_level() {
    for level in SimdLevel::available() {
        // Shapes from 32 rows on take the prompt-chunk path (a row alone does not); 600 inputs
        // make it cut the inputs into chunks; 1040 x 2000 gives each task all 40 rows, in two
        // passes (30 and 10).
        for &(rows, n, k) in &[
            (1, 3, 5),
            (7, 70, 33),
            (5, 130, 64),
            (9, 64, 100),
            (40, 37, 70),
            (33, 20, 129),
            (36, 21, 600),
            (40, 1040, 2000),
        ] {
            let x = data(rows * k, 1);
            let w32 = data(n * k, 2);
            let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let wb16: Vec<half::bf16> = w32.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let bias = data(n, 3);
            let all = [TensorRef::F32(&w32), TensorRef::F16(&w16), TensorRef::BF16(&wb16)];
            // The wide shape (its passes) in f16, and bf16 where it may take the bf16 dot
            // products: in qemu its three types took 15 s.
            let wide: &[TensorRef<'_>] = if cfg!(target_arch = "x86_64") { &all[1..] } else { &all[1..2] };
            for &w in if n > 256 { wide } else { &all[..] } {
                let mut y = vec![f32::NAN; rows * n];
                linear(level, &x, rows, w, n, k, Some(&bias), &mut y).unwrap();
                for r in 0..rows {
                    // The wide shape against the reference on every 13th feature (time); all
                    // of its features in the batch-invariance check below.
                    for c in (0..n).step_by(if n > 256 { 13 } else { 1 }) {
                        // bf16 weights take the activations rounded to bf16 (exactly that:
                        // the tolerance is the f32 sums').
                        let xj = |j: usize| match w {
                            TensorRef::BF16(_) => bf16::widen(bf16::round_bits(x[r * k + j])) as f64,
                            _ => x[r * k + j] as f64,
                        };
                        let want: f64 = (0..k).map(|j| xj(j) * w.get_f64(c * k + j)).sum::<f64>() + bias[c] as f64;
                        let got = y[r * n + c] as f64;
                        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{level} {r},{c}: {got} vs {want}");
                    }
                    // Row r alone gives the same bits as inside the batch.
                    let mut alone = vec![f32::NAN; n];
                    linear(level, &x[r * k..(r + 1) * k], 1, w, n, k, Some(&bias), &mut alone).unwrap();
                    assert_eq!(alone, y[r * n..(r + 1) * n], "{level}: row {r} of {rows}");
                }
            }
        }
    }
}

/// f32 weights on cache lines and off them give the bits of a row computed alone.
#[test]
fn f32_weights_on_and_off_cache_lines_give_the_same_bits() {
    let (rows, n, k) = (40, 70, 96);
    let x = data(rows * k, 7);
    let values = data(n * k + 1, 8);
    let mut buf = Vec::new();
    let on_lines = aligned(&mut buf, n * k);
    on_lines.copy_from_slice(&values[..n * k]);
    let on_lines: &[f32] = on_lines;
    assert!((on_lines.as_ptr() as usize).is_multiple_of(64));
    // The same values one element past a cache line.
    let mut shifted_buf = Vec::new();
    let shifted = &mut aligned(&mut shifted_buf, n * k + 1)[1..];
    shifted.copy_from_slice(&values[..n * k]);
    for level in SimdLevel::available() {
        let mut in_place = vec![f32::NAN; rows * n];
        linear(level, &x, rows, TensorRef::F32(on_lines), n, k, None, &mut in_place).unwrap();
        let mut off_lines = vec![f32::NAN; rows * n];
        linear(level, &x, rows, TensorRef::F32(shifted), n, k, None, &mut off_lines).unwrap();
        assert_eq!(in_place, off_lines, "{level}");
        let mut alone = vec![f32::NAN; n];
        linear(level, &x[3 * k..4 * k], 1, TensorRef::F32(on_lines), n, k, None, &mut alone).unwrap();
        assert_eq!(alone, in_place[3 * n..4 * n], "{level}");
    }
}

#[test]
fn stacked_parts_equal_the_concatenated_matrix_bit_for_bit() {
    let (rows, k) = (6, 72);
    let sizes = [70, 3, 65];
    let x = data(rows * k, 4);
    let parts32: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| data(n * k, 10 + i as u32)).collect();
    let whole: Vec<f32> = parts32.concat();
    let n: usize = sizes.iter().sum();
    let bias = data(n, 5);
    for level in SimdLevel::available() {
        let mut want = vec![f32::NAN; rows * n];
        linear(level, &x, rows, TensorRef::F32(&whole), n, k, Some(&bias), &mut want).unwrap();
        let parts: Vec<TensorRef<'_>> = parts32.iter().map(|p| TensorRef::F32(p)).collect();
        let mut got = vec![f32::NAN; rows * n];
        linear_parts(level, &x, rows, &parts, k, Some(&bias), &mut got).unwrap();
        assert_eq!(got, want, "{level}");
    }
    let ragged = [TensorRef::F32(&whole[..k + 1])];
    let e = linear_parts(SimdLevel::Scalar, &x, rows, &ragged, k, None, &mut [0.0; 6]).unwrap_err();
    assert!(matches!(e, TwinferError::InvalidParameter(_)), "{e}");
}

#[test]
fn shape_errors_are_typed() {
    let mut y = vec![0.0; 4];
    let e = linear(SimdLevel::Scalar, &[0.0; 3], 2, TensorRef::F32(&[0.0; 4]), 2, 2, None, &mut y).unwrap_err();
    assert!(matches!(e, TwinferError::ShapeMismatch { .. }));
}

/// What rounding the activations to bf16 costs against f32 ones: each product moves by at
/// most 2^-8 of itself (one rounding of x, half a unit in the 8th bit), so an output by at
/// most 2^-8 of Σ|x·w| plus the f32 sums' rounding.
#[test]
fn bf16_weights_stay_within_a_bf16_rounding_of_f32_activations() {
    let (rows, n, k) = (40, 96, 576);
    let x = data(rows * k, 21);
    let w: Vec<half::bf16> = data(n * k, 22).iter().map(|&v| half::bf16::from_f32(v)).collect();
    for level in SimdLevel::available() {
        let mut y = vec![f32::NAN; rows * n];
        linear(level, &x, rows, TensorRef::BF16(&w), n, k, None, &mut y).unwrap();
        let mut largest = 0f64;
        for r in 0..rows {
            for c in 0..n {
                let terms = (0..k).map(|j| x[r * k + j] as f64 * w[c * k + j].to_f64());
                let (want, magnitude) = terms.fold((0.0, 0.0), |(s, m): (f64, f64), t| (s + t, m + t.abs()));
                let err = (y[r * n + c] as f64 - want).abs();
                assert!(err <= 2f64.powi(-8) * magnitude + 1e-5, "{level} {r},{c}: {err:e} of {magnitude:e}");
                largest = largest.max(err / magnitude);
            }
        }
        // Not the f32 result either: the rounding shows (else the test would pass on a kernel
        // that ignored bf16 altogether).
        assert!(largest > 1e-5, "{level}: {largest:e}");
    }
}

/// bf16 parts packed once give the bits of the same parts packed per call, a row alone as in a
/// batch, stacked parts (a partial last task) included; panels of other weights are refused.
#[test]
fn packed_bf16_panels_give_the_bits_of_packing_per_call() {
    let (k, sizes) = (96, [70, 3, 128]);
    let n: usize = sizes.iter().sum();
    let parts16: Vec<Vec<half::bf16>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &m)| data(m * k, 30 + i as u32).iter().map(|&v| half::bf16::from_f32(v)).collect())
        .collect();
    let parts: Vec<TensorRef<'_>> = parts16.iter().map(|p| TensorRef::BF16(p)).collect();
    let bias = data(n, 33);
    for level in SimdLevel::available() {
        let Some(panels) = Bf16Panels::pack(level, &parts, k) else {
            assert!(!bf16::has_dot(level), "{level}: no panels where bf16 dot products run");
            continue;
        };
        for rows in [1, 5, 40] {
            let x = data(rows * k, 34);
            let mut per_call = vec![f32::NAN; rows * n];
            linear_parts(level, &x, rows, &parts, k, Some(&bias), &mut per_call).unwrap();
            let mut packed = vec![f32::NAN; rows * n];
            linear_parts_packed(level, &x, rows, &parts, Some(&panels), k, Some(&bias), &mut packed).unwrap();
            assert_eq!(packed, per_call, "{level}: {rows} rows");
        }
        let e =
            linear_parts_packed(level, &[0.0; 96], 1, &parts[..2], Some(&panels), k, None, &mut [0.0; 73]).unwrap_err();
        assert!(matches!(e, TwinferError::InvalidParameter(_)), "{e}");
    }
    // Odd widths and other dtypes have no panels.
    let odd: Vec<half::bf16> = vec![half::bf16::ONE; 3 * 5];
    for level in SimdLevel::available() {
        assert!(Bf16Panels::pack(level, &[TensorRef::BF16(&odd)], 5).is_none());
        assert!(Bf16Panels::pack(level, &[TensorRef::F32(&[0.0; 10])], 5).is_none());
    }
}

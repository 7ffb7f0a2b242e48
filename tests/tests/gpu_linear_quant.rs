//! The projections over block-quantized weights on the WGSL engine (the 4-bit and 8-bit
//! `load_w` of `gpu/shaders.rs`, in the GEMV and the tiled matmul) against an f64 product of the
//! reference-decoded weights, in every format, with the weights split over several buffers and
//! stacked from parts of different formats (llama.cpp's Q4_K_M mixes Q4_K and Q6_K in one
//! fused projection); outputs poisoned first.
//!
//! The device decodes each weight to the reference's value exactly (the scale products are exact
//! in f32), so the tolerance is that of an f32 sum of k terms: k · 2⁻²³ · Σ|x·w| + 1e-6.
//!
//! With no adapter the tests print a loud SKIPPED, and fail when `TWINFER_REQUIRE_GPU=1` (CI).

#![cfg(not(target_arch = "wasm32"))]

use std::sync::OnceLock;

use twinfer::TwinferError;
use twinfer::gpu::{GEMV_MAX_ROWS, GemvShape, GpuEngine, GpuLinear, GpuOptions, Variant};
use twinfer::quant::{PackedQuant, QuantFormat, QuantRows};

fn engine() -> Option<&'static GpuEngine> {
    static BASE: OnceLock<Result<GpuEngine, TwinferError>> = OnceLock::new();
    match BASE.get_or_init(GpuEngine::new) {
        Ok(e) => Some(e),
        Err(e) => {
            assert!(std::env::var("TWINFER_REQUIRE_GPU").as_deref() != Ok("1"), "TWINFER_REQUIRE_GPU=1: {e}");
            eprintln!("SKIPPED: no usable GPU ({e}); the quantized projection kernels are NOT tested here");
            None
        }
    }
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = twinfer_tests::rng::Rng::new(seed);
    (0..n).map(|_| rng.uniform()).collect()
}

/// `n` rows of `k` weights of `format`: quantized from random floats where twinfer can quantize
/// into the format, else random blocks (random codes and sub-block scales) under finite f16 block
/// scales of about 0.01.
fn weights(format: QuantFormat, n: usize, k: usize, seed: u64) -> QuantRows {
    if format.can_quantize() {
        return QuantRows::quantize(format, &values(n * k, seed), n, k).unwrap();
    }
    let mut rng = twinfer_tests::rng::Rng::new(seed);
    let mut bytes: Vec<u8> = (0..n * format.row_bytes(k)).map(|_| (rng.next_u64() >> 56) as u8).collect();
    let scales: &[usize] = match format {
        QuantFormat::Q6_K => &[208],
        QuantFormat::Q5_0 => &[0],
        _ => &[0, 2],
    };
    for (b, block) in bytes.chunks_exact_mut(format.block_bytes()).enumerate() {
        for &at in scales {
            let v = 0.004 + 0.001 * ((b + at) % 9) as f32;
            block[at..at + 2].copy_from_slice(&twinfer::f16::from_f32(v).to_le_bytes());
        }
    }
    QuantRows::new(format, n, k, bytes).unwrap()
}

/// Uploads the stacked `parts`, runs `rows` rows through them and compares with the f64 product.
fn check(gpu: &GpuEngine, parts: &[QuantRows], rows: usize, bias: bool, split: Option<usize>, shape: GemvShape) {
    let k = parts[0].k;
    let n: usize = parts.iter().map(|p| p.n).sum();
    let packed: Vec<PackedQuant> = parts.iter().map(|p| PackedQuant::from_rows(p).unwrap()).collect();
    let refs: Vec<&PackedQuant> = packed.iter().collect();
    let wref: Vec<f32> = parts.iter().flat_map(|p| p.to_f32()).collect();
    let x = values(rows * k, 7 + rows as u64);
    let bias = bias.then(|| values(n, 3));
    // A buffer of `r` rows of the widest part's GPU row, to force splits.
    let max_buffer = split.map_or(u64::MAX, |r| (r * k * 10 / 8) as u64);
    let mut lin = GpuLinear::upload_quant(gpu, &refs, bias.as_deref(), max_buffer).unwrap();
    lin.set_gemv_shape(shape);
    let formats: Vec<QuantFormat> = parts.iter().map(|p| p.format).collect();
    let bits = lin.device_bytes() as f64 * 8.0 / (n * k) as f64;
    // 4-bit codes and two f32 per 32; bytes and one f32 per 32 (Q8_0, Q5_0); bytes and two f32
    // per 32 (Q5_1, Q5_K) or one per 16 (Q6_K).
    let bits_of = |f: &QuantFormat| match f.code_bits() {
        4 => 6.0,
        _ if matches!(f, QuantFormat::Q8_0 | QuantFormat::Q5_0) => 9.0,
        _ => 10.0,
    };
    let widest = formats.iter().map(bits_of).fold(0.0, f64::max);
    assert!(bits <= widest, "{formats:?}: {bits} bits per weight on the device");
    if split.is_some() {
        assert!(lin.num_buffers() > parts.len(), "{formats:?}: the weights were not split");
    }
    gpu.poison_projection_output_for_test(rows * n).unwrap();
    let mut y = vec![f32::NAN; rows * n];
    gpu.linear(&lin, &x, rows, &mut y).unwrap();
    for r in 0..rows {
        for j in 0..n {
            let (mut dot, mut abs) = (0f64, 0f64);
            for i in 0..k {
                let t = x[r * k + i] as f64 * wref[j * k + i] as f64;
                dot += t;
                abs += t.abs();
            }
            let b = bias.as_ref().map_or(0.0, |b| b[j] as f64);
            let tol = k as f64 * f32::EPSILON as f64 * (abs + b.abs()) + 1e-6;
            let got = y[r * n + j] as f64;
            assert!(
                (got - (dot + b)).abs() <= tol,
                "{formats:?} rows {rows} {shape:?} split {split:?}: y[{r}, {j}] = {got}, reference {}, tolerance {tol:.1e}",
                dot + b
            );
        }
    }
}

/// The engine in each reduction variant the adapter has (subgroup shuffles, workgroup memory).
fn engines() -> Vec<&'static GpuEngine> {
    static BASELINE: OnceLock<GpuEngine> = OnceLock::new();
    let Some(gpu) = engine() else { return Vec::new() };
    if gpu.options().variant == Variant::Baseline {
        return vec![gpu];
    }
    let base =
        BASELINE.get_or_init(|| gpu.with_options(GpuOptions { variant: Variant::Baseline, ..gpu.options() }).unwrap());
    vec![gpu, base]
}

#[test]
fn quantized_projections_match_the_f64_reference_in_every_format() {
    let g = GEMV_MAX_ROWS;
    for (gpu, (i, format)) in
        engines().into_iter().flat_map(|e| QuantFormat::ALL.into_iter().enumerate().map(move |f| (e, f)))
    {
        let k = if format.can_quantize() { 96 } else { 512 };
        // Decode rows (the GEMV, both shapes) and a prompt chunk (the matmul); n off the tiles.
        for (rows, shape, split) in
            [(1, GemvShape::Hardware, None), (5, GemvShape::Software, Some(8)), (g + 3, GemvShape::Hardware, Some(16))]
        {
            check(gpu, &[weights(format, 37, k, i as u64)], rows, rows > 1, split, shape);
        }
        // Longer rows: the hardware GEMV gives a feature 16, 32 or 64 lanes (about 8 steps each).
        for k in [768, 1792] {
            check(gpu, &[weights(format, 21, k, i as u64)], 3, true, None, GemvShape::Hardware);
        }
    }
}

#[test]
fn stacked_parts_of_different_formats_keep_their_own() {
    let Some(gpu) = engine() else { return };
    let stacks = [
        [weights(QuantFormat::Q4_K, 20, 256, 1), weights(QuantFormat::Q6_K, 13, 256, 2)],
        [weights(QuantFormat::Q4_1, 9, 256, 3), weights(QuantFormat::Q8_0, 17, 256, 4)],
        [weights(QuantFormat::Q5_1, 11, 256, 5), weights(QuantFormat::Q5_K, 6, 256, 6)],
    ];
    for parts in &stacks {
        for rows in [2, GEMV_MAX_ROWS + 9] {
            check(gpu, parts, rows, true, None, GemvShape::Hardware);
        }
    }
}

#[test]
fn parts_of_different_widths_are_a_typed_error() {
    let Some(gpu) = engine() else { return };
    let a = PackedQuant::from_rows(&weights(QuantFormat::Q8_0, 4, 64, 1)).unwrap();
    let b = PackedQuant::from_rows(&weights(QuantFormat::Q8_0, 4, 96, 2)).unwrap();
    let e = GpuLinear::upload_quant(gpu, &[&a, &b], None, u64::MAX).unwrap_err();
    assert!(matches!(e, TwinferError::InvalidParameter(_)), "{e}");
}

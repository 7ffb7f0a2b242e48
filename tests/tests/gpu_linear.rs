//! The projections on the WGSL engine (`linear_gemv.wgsl` for decode rows, `linear_matmul.wgsl`
//! for prompt chunks) against an f64 reference: random shapes with n and k off the tiles, with
//! and without bias, f32 and f16 weights, weights split over several buffers; outputs poisoned
//! before every call. Then typed errors, and the tiny random decoder with f16 weights on the GPU
//! against the CPU. (`gpu_resources.rs` shows a warm projection loop creates no GPU object.)
//! Last, the greedy pick on the logits (`argmax_rows.wgsl`) against the host's `argmax`, exactly,
//! on rows full of ties, NaN and signed zeros.
//!
//! Tolerance: |y - ref| <= k · 2⁻²³ · Σ|x·w| + 1e-6, the bound of an f32 sum of k terms (in any
//! order); f16 weights are rounded to f16 before the reference sees them.
//!
//! With no adapter the tests print a loud SKIPPED, and fail when `TWINFER_REQUIRE_GPU=1` (CI).

#![cfg(not(target_arch = "wasm32"))]

use std::sync::OnceLock;

use proptest::prelude::*;
use twinfer::gpu::{GEMV_MAX_ROWS, GemvShape, GpuEngine, GpuLinear, GpuOptions, KvStorage, Variant};
use twinfer::quant::{PackedQuant, QuantFormat, QuantRows};
use twinfer::{TensorRef, TwinferError, f16};

/// Property cases: `TWINFER_GPU_TEST_CASES`, 12 by default (lavapipe is slow).
fn cases() -> u32 {
    option_env!("TWINFER_GPU_TEST_CASES").and_then(|s| s.parse().ok()).unwrap_or(12)
}

fn engine() -> Option<&'static GpuEngine> {
    static BASE: OnceLock<Result<GpuEngine, TwinferError>> = OnceLock::new();
    match BASE.get_or_init(GpuEngine::new) {
        Ok(e) => Some(e),
        Err(e) => {
            assert!(std::env::var("TWINFER_REQUIRE_GPU").as_deref() != Ok("1"), "TWINFER_REQUIRE_GPU=1: {e}");
            eprintln!("SKIPPED: no usable GPU ({e}); the projection kernels are NOT tested here");
            None
        }
    }
}

/// The engine in each reduction variant the adapter has: subgroup shuffles (the default where
/// there are subgroups) and workgroup memory; where the device has tensor cores the default runs
/// prompt chunks on them and the workgroup-memory engine on the FMA matmul.
fn engines() -> Vec<&'static GpuEngine> {
    static BASELINE: OnceLock<GpuEngine> = OnceLock::new();
    let Some(gpu) = engine() else { return Vec::new() };
    if !gpu.options().tensor_cores {
        eprintln!(
            "NOTE: {} has no tensor-core matmul; linear_matmul_coop.wgsl is NOT run here (only validated by naga)",
            gpu.context().summary.name
        );
    }
    if gpu.options().variant == Variant::Baseline && !gpu.options().tensor_cores {
        return vec![gpu];
    }
    let base = BASELINE.get_or_init(|| {
        gpu.with_options(GpuOptions { variant: Variant::Baseline, tensor_cores: false, ..gpu.options() }).unwrap()
    });
    vec![gpu, base]
}

#[derive(Debug, Clone)]
struct Problem {
    rows: usize,
    n: usize,
    k: usize,
    bias: bool,
    f16: bool,
    /// Rows of W per buffer, to force a split; None for one buffer.
    split: Option<usize>,
    /// The GEMV shape, whichever the adapter would pick: both run everywhere.
    shape: GemvShape,
    seed: u64,
}

fn problem() -> impl Strategy<Value = Problem> {
    // Decode batches (the GEMV, in groups of 4 rows) half of the time, so that the GEMV path is hit
    // as often as the matmul; each side of GEMV_MAX_ROWS.
    let rows = prop_oneof![1usize..=GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1..=GEMV_MAX_ROWS + 70];
    let shape = prop_oneof![Just(GemvShape::Hardware), Just(GemvShape::Software)];
    (rows, 1usize..=150, 1usize..=150, any::<bool>(), any::<bool>(), prop::option::of(1usize..=40), shape, any::<u64>())
        .prop_map(|(rows, n, k, bias, f16, split, shape, seed)| Problem { rows, n, k, bias, f16, split, shape, seed })
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = twinfer_tests::rng::Rng::new(seed);
    (0..n).map(|_| rng.uniform()).collect()
}

/// Runs one problem and compares with the f64 reference; `Err` names the first bad element.
fn check(gpu: &GpuEngine, p: &Problem) -> Result<(), String> {
    let storage = if p.f16 && gpu.context().summary.shader_f16 { KvStorage::F16 } else { KvStorage::F32 };
    let x = values(p.rows * p.k, p.seed);
    let w32 = values(p.n * p.k, p.seed ^ 1);
    let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
    let (w, wref): (TensorRef<'_>, Vec<f32>) = if storage == KvStorage::F16 {
        (TensorRef::F16(&w16), w16.iter().map(|v| v.to_f32()).collect())
    } else {
        (TensorRef::F32(&w32), w32.clone())
    };
    let bias = p.bias.then(|| values(p.n, p.seed ^ 2));
    let bytes = storage.bytes() as u64;
    let max_buffer = p.split.map_or(u64::MAX, |r| r as u64 * p.k.div_ceil(4) as u64 * 4 * bytes);
    let mut lin =
        GpuLinear::upload(gpu, w, p.n, p.k, bias.as_deref(), storage, max_buffer).map_err(|e| e.to_string())?;
    lin.set_gemv_shape(p.shape);
    if let Some(r) = p.split {
        assert_eq!(lin.num_buffers(), p.n.div_ceil(r));
    }
    gpu.poison_projection_output_for_test(p.rows * p.n).map_err(|e| e.to_string())?;
    let mut y = vec![f32::NAN; p.rows * p.n];
    gpu.linear(&lin, &x, p.rows, &mut y).map_err(|e| e.to_string())?;
    for r in 0..p.rows {
        for j in 0..p.n {
            let (mut dot, mut abs) = (0f64, 0f64);
            for i in 0..p.k {
                let t = x[r * p.k + i] as f64 * wref[j * p.k + i] as f64;
                dot += t;
                abs += t.abs();
            }
            let b = bias.as_ref().map_or(0.0, |b| b[j] as f64);
            let want = dot + b;
            let tol = p.k as f64 * f32::EPSILON as f64 * (abs + b.abs()) + 1e-6;
            let got = y[r * p.n + j] as f64;
            if got.is_nan() || (got - want).abs() > tol {
                return Err(format!("{p:?} ({storage}): y[{r}, {j}] = {got}, reference {want}, tolerance {tol:.1e}"));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn gpu_linear_matches_the_f64_reference(p in problem()) {
        let Some(gpu) = engine() else { return Ok(()) };
        check(gpu, &p).map_err(TestCaseError::fail)?;
    }
}

/// The edges the generator may miss: a single row and feature, k of 1, the GEMV/matmul border,
/// full tiles exactly, and one row past them.
#[test]
fn gpu_linear_pinned_shapes() {
    for gpu in engines() {
        pinned_shapes(gpu);
    }
}

fn pinned_shapes(gpu: &GpuEngine) {
    let g = GEMV_MAX_ROWS;
    // Then rows long enough for 16, 32 and 64 lanes per feature in the hardware GEMV, and chunks
    // over several tiles and k stages of each matmul.
    let shapes = [
        (1, 1, 1),
        (4, 9, 3),
        (5, 9, 3),
        (g, 64, 16),
        (g + 1, 65, 17),
        (g + 16, 64, 64),
        (g + 17, 130, 33),
        (1, 40, 300),
        (g, 33, 600),
        (3, 70, 1100),
        (2 * g + 3, 129, 600),
        // Widths of a multiple of 16 (the tensor cores' path where the device has them): past a
        // row pad, over several feature tiles, and split over buffers.
        (2 * g + 3, 129, 592),
        (g + 9, 300, 64),
        (g + 17, 200, 96),
    ];
    for (i, &(rows, n, k)) in shapes.iter().enumerate() {
        for (f16, shape) in [(false, GemvShape::Hardware), (true, GemvShape::Hardware), (false, GemvShape::Software)] {
            let split = (i == 6 || i == 13).then_some(7);
            let p = Problem { rows, n, k, bias: i % 2 == 0, f16, split, shape, seed: i as u64 };
            check(gpu, &p).unwrap();
        }
    }
}

/// A decode row's output is bit-identical alone and anywhere in a batch of any size up to
/// GEMV_MAX_ROWS (the engine's greedy tokens must not depend on the batch), in either GEMV shape
/// and reduction variant, over float weights and 4-bit codes (whose lanes step a word at a time).
#[test]
fn a_decode_row_is_the_same_alone_and_in_any_batch() {
    let Some(gpu) = engine() else { return };
    // Rows long enough for each width of the hardware GEMV's feature slots (8 to 64 lanes).
    let n = 72;
    let mut cases = Vec::new();
    for k in [130, 300, 600, 1100] {
        let w = values(n * k, 11);
        cases.push(("f32", GpuLinear::upload(gpu, TensorRef::F32(&w), n, k, None, KvStorage::F32, u64::MAX).unwrap()));
    }
    for k in [128, 544, 1056, 2080] {
        let q = QuantRows::quantize(QuantFormat::Q4_1, &values(n * k, 13), n, k).unwrap();
        cases.push((
            "q4_1",
            GpuLinear::upload_quant(gpu, &[&PackedQuant::from_rows(&q).unwrap()], None, u64::MAX).unwrap(),
        ));
    }
    for (what, mut lin) in cases {
        let k = lin.k;
        let x = values(GEMV_MAX_ROWS * k, 12);
        for (gpu, shape) in
            engines().into_iter().flat_map(|g| [GemvShape::Hardware, GemvShape::Software].map(|s| (g, s)))
        {
            let variant = gpu.options().variant.name();
            lin.set_gemv_shape(shape);
            let mut alone = vec![f32::NAN; GEMV_MAX_ROWS * n];
            for r in 0..GEMV_MAX_ROWS {
                gpu.linear(&lin, &x[r * k..][..k], 1, &mut alone[r * n..][..n]).unwrap();
            }
            for rows in [2, 5, 17, GEMV_MAX_ROWS] {
                let mut y = vec![f32::NAN; rows * n];
                gpu.linear(&lin, &x[..rows * k], rows, &mut y).unwrap();
                for (i, (a, b)) in y.iter().zip(&alone).enumerate() {
                    let (row, feature) = (i / n, i % n);
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{what} k={k} {shape:?} {variant}: row {row} of a batch of {rows}, feature {feature}"
                    );
                }
            }
        }
    }
}

/// Typed errors: wrong lengths, a row wider than the buffer cap, f16 weights on another device's
/// weights are refused, never a panic.
#[test]
fn gpu_linear_errors_are_typed() {
    let Some(gpu) = engine() else { return };
    let w = values(8 * 5, 1);
    let err = GpuLinear::upload(gpu, TensorRef::F32(&w), 8, 6, None, KvStorage::F32, u64::MAX).unwrap_err();
    assert!(matches!(err, TwinferError::ShapeMismatch { .. }), "{err:?}");
    let err = GpuLinear::upload(gpu, TensorRef::F32(&w), 8, 5, None, KvStorage::F32, 16).unwrap_err();
    assert!(matches!(err, TwinferError::OverLimit { .. }), "{err:?}");
    let lin = GpuLinear::upload(gpu, TensorRef::F32(&w), 8, 5, None, KvStorage::F32, u64::MAX).unwrap();
    let mut y = vec![0f32; 8];
    let err = gpu.linear(&lin, &[0.0; 4], 1, &mut y).unwrap_err();
    assert!(matches!(err, TwinferError::ShapeMismatch { .. }), "{err:?}");
}

/// The tiny random decoder with f16 weights: a 90-token prompt, then decode steps, with the projections on
/// the GPU (f16 weights resident) and attention on the GPU, against the CPU engine throughout.
#[test]
fn f16_decoder_on_gpu_projections_matches_the_cpu() {
    use twinfer::kv::{KvCacheConfig, KvLayout, PagedKvCache};
    use twinfer::model::{Engines, Logits, StepSeq, preset, random_decoder};
    use twinfer::{Attention, Backend, DType, cpu::SimdLevel};
    if engine().is_none() {
        return;
    }
    let gpu = Attention::new(Backend::Gpu).unwrap();
    let cpu = Attention::cpu(SimdLevel::detect());
    let model = random_decoder(preset("tiny").unwrap(), DType::F16, 3).unwrap();
    let c = &model.config;
    let run = |attention: &Attention| {
        let e = Engines { level: SimdLevel::detect(), prefill: attention, decode: attention };
        let layout = KvLayout::new(16, c.num_kv_heads, c.head_dim).unwrap();
        let config = KvCacheConfig { num_layers: c.num_layers, num_pages: 32, layout, dtype: DType::F32 };
        let mut cache = PagedKvCache::new(config).unwrap();
        let seq = cache.add_sequence();
        // Past GEMV_MAX_ROWS, so that the prompt runs through the matmul (on tensor cores where
        // the device has them) and the steps through the GEMV.
        let prompt: Vec<u32> = (0..GEMV_MAX_ROWS as u32 + 26).map(|i| (i * 53 + 7) % c.vocab_size as u32).collect();
        cache.reserve(&[seq], &[prompt.len()]).unwrap();
        let mut all =
            model.forward(e, &mut cache, &[StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::All }]).unwrap();
        for s in 0..3u32 {
            let start = cache.seq_len(seq).unwrap();
            cache.reserve(&[seq], &[1]).unwrap();
            let step = StepSeq { seq, tokens: &[s + 11], start, logits: Logits::Last };
            all.extend(model.forward(e, &mut cache, &[step]).unwrap());
        }
        all
    };
    let before = gpu.gpu_engine().unwrap().counts();
    let (g, want) = (run(&gpu), run(&cpu));
    // Each projection (4 per layer and the LM head) left its parameters, weights and bias there.
    let made = gpu.gpu_engine().unwrap().counts().buffers - before.buffers;
    assert!(made >= 3 * (4 * c.num_layers as u64 + 1), "the projections did not run on the GPU ({made} buffers)");
    let err = twinfer_tests::models::rel_err(&g, &want);
    assert!(err <= 1e-4, "f16 decoder, GPU projections vs CPU: relative error {err:.2e}");
}

/// The tiny random decoder with f16 weights through the resident forward pass (the whole step on
/// the device, norms and activations fused into the projections' loads or, on devices with
/// tensor cores, into their input split): a 90-token prompt and decode steps against the CPU.
#[test]
fn f16_decoder_resident_matches_the_cpu() {
    use twinfer::kv::{KvCacheConfig, KvLayout, PagedKvCache};
    use twinfer::model::{Engines, Logits, ResidentDecoder, StepSeq, preset, random_decoder};
    use twinfer::{Attention, DType, cpu::SimdLevel};
    for gpu in engines() {
        let model = random_decoder(preset("tiny").unwrap(), DType::F16, 3).unwrap();
        let c = &model.config;
        let layout = KvLayout::new(16, c.num_kv_heads, c.head_dim).unwrap();
        let config = KvCacheConfig { num_layers: c.num_layers, num_pages: 32, layout, dtype: DType::F32 };
        let prompt: Vec<u32> = (0..GEMV_MAX_ROWS as u32 + 26).map(|i| (i * 53 + 7) % c.vocab_size as u32).collect();
        let steps = |forward: &mut dyn FnMut(&mut PagedKvCache, StepSeq<'_>) -> Vec<f32>| {
            let mut cache = PagedKvCache::new(config).unwrap();
            let seq = cache.add_sequence();
            cache.reserve(&[seq], &[prompt.len()]).unwrap();
            let mut all = forward(&mut cache, StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::All });
            for s in 0..3u32 {
                let start = cache.seq_len(seq).unwrap();
                cache.reserve(&[seq], &[1]).unwrap();
                all.extend(forward(&mut cache, StepSeq { seq, tokens: &[s + 11], start, logits: Logits::Last }));
            }
            all
        };
        let resident = ResidentDecoder::new(&model, gpu, &config).unwrap().poison_for_test();
        let got = steps(&mut |cache, step| model.forward_resident(&resident, cache, &[step]).unwrap());
        let cpu = Attention::cpu(SimdLevel::detect());
        let e = Engines { level: SimdLevel::detect(), prefill: &cpu, decode: &cpu };
        let want = steps(&mut |cache, step| model.forward(e, cache, &[step]).unwrap());
        let err = twinfer_tests::models::rel_err(&got, &want);
        let what = gpu.variant_name();
        assert!(err <= 1e-4, "f16 decoder, resident on the GPU ({what}) vs CPU: relative error {err:.2e}");
    }
}

/// Logits rows that stress the greedy pick: values from a few levels (ties everywhere), NaN,
/// signed zeros and infinities sprinkled in, some rows all NaN.
fn tricky_logits(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut rng = twinfer_tests::rng::Rng::new(seed);
    let levels = [-1.5f32, 0.0, -0.0, 2.25, 2.25, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 7.0];
    let mut out = Vec::with_capacity(rows * width);
    for r in 0..rows {
        let all_nan = r % 7 == 3;
        for _ in 0..width {
            let u = rng.uniform().abs();
            out.push(match () {
                _ if all_nan => f32::NAN,
                // Mostly plain values, so the maximum is not always a sprinkled extreme.
                _ if u < 0.7 => (u * 8.0).floor() / 4.0,
                _ => levels[((u * 1000.0) as usize) % levels.len()],
            });
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// The device's greedy pick equals the host's `argmax` row by row (the ids are poisoned first).
    #[test]
    fn device_argmax_equals_the_host_argmax(rows in 1usize..=40, width in 1usize..=3000, seed in any::<u64>()) {
        let Some(gpu) = engine() else { return Ok(()) };
        let logits = tricky_logits(rows, width, seed);
        let ids = gpu.argmax_rows(&logits, rows, width).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (r, &id) in ids.iter().enumerate() {
            let want = twinfer::engine::argmax(&logits[r * width..][..width]);
            prop_assert_eq!(id, want, "row {} of {} x {}", r, rows, width);
        }
    }
}

/// The device's top-k candidates of a row, in the host reference's order (larger logit first, the
/// lower id on ties, NaN last): the kernel writes them in its own slot order.
fn device_top_k(gpu: &GpuEngine, logits: &[f32], rows: usize, width: usize, k: usize) -> Vec<Vec<(u32, u32)>> {
    let got = gpu.topk_rows(logits, rows, width, k).unwrap();
    assert_eq!(got.len(), rows * k);
    got.chunks(k)
        .enumerate()
        .map(|(r, c)| {
            // Reordered by the reference's own order, found by looking each id up in it.
            let want = twinfer::engine::top_k(&logits[r * width..][..width], width);
            let rank: std::collections::HashMap<u32, usize> = want.iter().enumerate().map(|(i, w)| (w.0, i)).collect();
            let mut c: Vec<(u32, f32)> = c.to_vec();
            c.sort_by_key(|x| rank.get(&x.0).copied().unwrap_or(usize::MAX));
            c.iter().map(|x| (x.0, x.1.to_bits())).collect()
        })
        .collect()
}

fn host_top_k(logits: &[f32], rows: usize, width: usize, k: usize) -> Vec<Vec<(u32, u32)>> {
    (0..rows)
        .map(|r| {
            twinfer::engine::top_k(&logits[r * width..][..width], k).iter().map(|x| (x.0, x.1.to_bits())).collect()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// The device's top-k candidates are the host reference's, ids and logit bits, row by row
    /// (ties, signed zeros, infinities, NaN and all-NaN rows included; the output is poisoned).
    #[test]
    fn device_top_k_equals_the_host_top_k(rows in 1usize..=12, width in 1usize..=3000, k in 1usize..=130, seed in any::<u64>()) {
        let Some(gpu) = engine() else { return Ok(()) };
        let k = k.min(width);
        let logits = tricky_logits(rows, width, seed);
        let got = device_top_k(gpu, &logits, rows, width, k);
        let want = host_top_k(&logits, rows, width, k);
        for r in 0..rows {
            prop_assert_eq!(&got[r], &want[r], "row {} of {} x {}, k {}", r, rows, width, k);
        }
    }
}

/// Top-k shapes the generator may miss (a vocabulary, k = width, one column), and k out of range
/// is a typed error.
#[test]
fn device_top_k_edges() {
    let Some(gpu) = engine() else { return };
    for (rows, width, k) in [(1, 49152, 40), (2, 49152, 128), (3, 256, 256), (2, 257, 1), (65, 5, 5), (1, 1, 1)] {
        let logits = tricky_logits(rows, width, (rows * width + k) as u64);
        assert_eq!(
            device_top_k(gpu, &logits, rows, width, k),
            host_top_k(&logits, rows, width, k),
            "{rows} x {width}, k {k}"
        );
    }
    // Distinct random values (no ties): the order comes from the values alone.
    let mut rng = twinfer_tests::rng::Rng::new(7);
    let logits: Vec<f32> = (0..4 * 32000).map(|_| rng.uniform() * 30.0).collect();
    assert_eq!(device_top_k(gpu, &logits, 4, 32000, 50), host_top_k(&logits, 4, 32000, 50));
    for k in [0, 11] {
        let err = gpu.topk_rows(&[1.0; 10], 1, 10, k).unwrap_err();
        assert!(matches!(err, TwinferError::InvalidParameter(_)), "k {k}: {err:?}");
    }
}

/// Shapes the generator may miss, and a wrong shape is a typed error.
#[test]
fn device_argmax_edges() {
    let Some(gpu) = engine() else { return };
    for (rows, width) in [(1, 1), (3, 256), (2, 257), (1, 49152), (65, 5)] {
        let logits = tricky_logits(rows, width, (rows * width) as u64);
        let ids = gpu.argmax_rows(&logits, rows, width).unwrap();
        for r in 0..rows {
            assert_eq!(ids[r], twinfer::engine::argmax(&logits[r * width..][..width]), "row {r} of {rows} x {width}");
        }
    }
    let all_nan = vec![f32::NAN; 300];
    assert_eq!(gpu.argmax_rows(&all_nan, 1, 300).unwrap(), [twinfer::engine::argmax(&all_nan)]);
    let err = gpu.argmax_rows(&[1.0; 10], 3, 4).unwrap_err();
    assert!(matches!(err, TwinferError::ShapeMismatch { .. }), "{err:?}");
}

/// erf(z) in f64: the Maclaurin series up to |z| = 4 (where erf is 1 to 1.5e-8), its sign beyond.
fn erf(z: f64) -> f64 {
    if z.abs() > 4.0 {
        return z.signum();
    }
    let (mut term, mut sum) = (z, z);
    for n in 1..200 {
        term *= -z * z / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// Input `i` of row `r` as a projection takes it, in f64: SwiGLU of `[gate | up]` rows, GELU, or
/// x RMS-normed with `norm`.
fn split_input_ref(x: &[f32], r: usize, i: usize, k: usize, act: u32, norm: Option<(&[f32], f32)>) -> f64 {
    use twinfer::gpu::params::{ACT_GELU, ACT_SWIGLU};
    if act == ACT_SWIGLU {
        let (g, u) = (x[r * 2 * k + i] as f64, x[r * 2 * k + k + i] as f64);
        return g / (1.0 + (-g).exp()) * u;
    }
    let v = x[r * k + i] as f64;
    if act == ACT_GELU {
        return 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2));
    }
    match norm {
        Some((g, eps)) => {
            let ms = x[r * k..][..k].iter().map(|&a| a as f64 * a as f64).sum::<f64>() / k as f64;
            v * g[i] as f64 / (ms + eps as f64).sqrt()
        }
        None => v,
    }
}

/// The tensor cores' input split (`linear_split_f16.wgsl`, which runs on any device with
/// shader-f16, unlike the matmul it feeds): every input, with the fused RMSNorm, SwiGLU or GELU,
/// comes back as `(hi + lo / 2^11) * 2^e` within 2^-21 of its row's largest magnitude (one f16
/// alone is 2^-12 off) plus the device's f32 arithmetic (4e-6 of the value), across rows of
/// magnitudes 2^-15 to 2^14, an outlier and a row of zeros; pad rows are zeros.
#[test]
fn tensor_core_input_split_reconstructs_its_input() {
    use twinfer::gpu::params::{ACT_GELU, ACT_NONE, ACT_SWIGLU};
    let Some(gpu) = engine() else { return };
    if !gpu.context().summary.shader_f16 {
        eprintln!("SKIPPED: {} has no shader-f16; the input split is NOT tested here", gpu.context().summary.name);
        return;
    }
    let (rows, k) = (70, 96);
    for (case, act, normed) in [
        ("RMSNorm", ACT_NONE, true),
        ("plain", ACT_NONE, false),
        ("SwiGLU", ACT_SWIGLU, false),
        ("GELU", ACT_GELU, false),
    ] {
        let width = if act == ACT_SWIGLU { 2 * k } else { k };
        let mut x = values(rows * width, 11 + act as u64);
        for r in 0..rows {
            let scale = 2f32.powi(r as i32 % 30 - 15);
            x[r * width..][..width].iter_mut().for_each(|v| *v *= scale);
        }
        x[5 * width + 3] *= 3000.0;
        x[7 * width..][..width].iter_mut().for_each(|v| *v = 0.0);
        let g: Vec<f32> = values(k, 99).iter().map(|v| 0.5 + v.abs()).collect();
        let norm = normed.then_some((&g[..], 1e-5f32));
        let out = gpu.split_input_for_test(&x, rows, k, norm, act).unwrap();
        let rows_p = rows.next_multiple_of(128);
        assert_eq!(out.len(), (2 * rows_p * k + rows_p).next_multiple_of(8), "{case}: output size");
        let (hi, rest) = out.split_at(rows_p * k);
        let (lo, exps) = rest.split_at(rows_p * k);
        for r in 0..rows_p {
            let want: Vec<f64> =
                (0..k).map(|i| if r < rows { split_input_ref(&x, r, i, k, act, norm) } else { 0.0 }).collect();
            let amax = want.iter().fold(0f64, |a, v| a.max(v.abs()));
            let e = f16::from_bits(exps[r]).to_f64();
            assert_eq!(e, e.round(), "{case}: row {r}'s exponent {e} is not an integer");
            for i in 0..k {
                let parts = f16::from_bits(hi[r * k + i]).to_f64() + f16::from_bits(lo[r * k + i]).to_f64() / 2048.0;
                let got = parts * 2f64.powf(e);
                let tol = amax * 2f64.powi(-21) + want[i].abs() * 4e-6;
                assert!(
                    (got - want[i]).abs() <= tol,
                    "{case}: row {r} input {i}: split gives {got}, reference {}, tolerance {tol:.2e}",
                    want[i]
                );
            }
        }
    }
}

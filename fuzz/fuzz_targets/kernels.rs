//! The SIMD kernels' unsafe code under AddressSanitizer: prefill and decode attention on random
//! shapes, page sizes, dtypes and variants, and the float and block-quantized projections, at
//! every SIMD level this CPU has. Each result is checked against the f64 reference with the
//! tolerances of the conformance suite, so a kernel that reads a wrong (but mapped) element fails
//! too, not only one that reads outside its buffers.
#![no_main]

use arbitrary::Arbitrary;
use twinfer::cpu::{ActivationCodes, CpuEngine, SimdLevel, SplitK, linear, linear_quant};
use twinfer::quant::{PackedQuant, QuantFormat, QuantRows};
use twinfer::{DType, TensorRef, bf16, f16};
use twinfer_tests::{Case, CaseData, KvKind, Mode};

#[derive(Debug, Arbitrary)]
enum Op {
    Attention(AttentionInput),
    Linear(LinearInput),
}

#[derive(Debug, Arbitrary)]
struct AttentionInput {
    decode: bool,
    paged: bool,
    lens: Vec<(u8, u8)>,
    page_size: u8,
    kv_heads: bool,
    group: u8,
    head_dim: u8,
    causal: bool,
    window_left: Option<u8>,
    soft_cap: bool,
    alibi: bool,
    dtypes: u8,
    want_lse: bool,
    split_chunk: Option<u16>,
    seed: u64,
}

#[derive(Debug, Arbitrary)]
struct LinearInput {
    rows: u8,
    n: u8,
    k: u16,
    weights: u8,
    bias: bool,
    seed: u64,
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
/// K/V storage also takes the int8 cache.
const KV_DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::Q8];

fn attention(input: &AttentionInput) {
    let batch = input.lens.len().clamp(1, 4);
    let page_size = [1, 3, 16, 64][input.page_size as usize % 4];
    let mut kv_lens = Vec::new();
    let mut qo_lens = Vec::new();
    for i in 0..batch {
        let (kv, qo) = input.lens.get(i).copied().unwrap_or((1, 1));
        // A sequence with no keys is allowed: its output is defined (zeros, lse -inf).
        let kv = kv as usize % 200;
        kv_lens.push(kv);
        // Decode has one query per sequence; a prefill chunk may also be longer than its keys. At
        // most 64 queries: the f64 oracle of 4 x 207 queries x 200 keys x 8 heads x 128 took 19 s
        // under AddressSanitizer, near the 20 s timeout, and taught the fuzzer nothing new.
        qo_lens.push(if input.decode { 1 } else { 1 + qo as usize % (kv + 8).min(64) });
    }
    let case = Case {
        mode: if input.decode { Mode::Decode } else { Mode::Prefill },
        kv_kind: if input.decode || input.paged { KvKind::Paged } else { KvKind::Ragged },
        qo_lens,
        kv_lens,
        page_size,
        num_kv_heads: 1 + input.kv_heads as usize,
        group: [1, 2, 4, 8][input.group as usize % 4],
        head_dim: [8, 24, 64, 72, 128][input.head_dim as usize % 5],
        causal: input.causal && !input.decode,
        window_left: input.window_left.map(|w| w as usize % 80),
        soft_cap: input.soft_cap.then_some(30.0),
        alibi: input.alibi,
        sm_scale: None,
        q_dtype: DTYPES[input.dtypes as usize % 2],
        kv_dtype: KV_DTYPES[(input.dtypes / 2) as usize % 4],
        o_dtype: DTYPES[(input.dtypes / 8) as usize % 2],
        want_lse: input.want_lse,
        q_gain: 4.0,
        seed: input.seed,
    };
    let data = CaseData::new(&case);
    let want = data.reference();
    for level in SimdLevel::available() {
        let mut engine = CpuEngine::with_level(level);
        if let Some(chunk) = input.split_chunk {
            engine = engine.with_split_k(SplitK::ChunkSize(1 + chunk as usize % 300));
        }
        let run = data.run(|p, d, out| match case.mode {
            Mode::Prefill => engine.prefill(p, &d.prefill_input(case.kv_kind), out),
            Mode::Decode => engine.decode(p, &d.decode_input(), out),
        });
        let (o, lse) = run.unwrap_or_else(|e| panic!("{level}: a valid case was refused: {e}: {case:?}"));
        // Prompt blocks over bf16 K/V take bf16 dot products where the level has them, as in the
        // conformance suite (`tests/tests/cpu_attention.rs`).
        let checked = if case.mode == Mode::Prefill && level.bf16_dot() {
            data.check_bf16_products(&o, lse.as_deref(), &want)
        } else {
            data.check(&o, lse.as_deref(), &want)
        };
        if let Err(e) = checked {
            panic!("{level}: {e}: {case:?}");
        }
    }
}

/// A deterministic value in [-1, 1) from a seed and an index.
fn value(seed: u64, i: usize) -> f32 {
    let mut x = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// `y` against the f64 product of the same (decoded) weights: each element within the rounding
/// of an f32 dot product of `k` terms, `2 k eps Σ|x w|`, plus the bias' rounding.
fn check_linear(what: &str, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &[f32], rows: usize, n: usize, k: usize) {
    for r in 0..rows {
        for c in 0..n {
            let xs = &x[r * k..(r + 1) * k];
            let ws = &w[c * k..(c + 1) * k];
            let exact: f64 =
                xs.iter().zip(ws).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() + bias.map_or(0.0, |b| b[c] as f64);
            let magnitude: f64 = xs.iter().zip(ws).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>()
                + bias.map_or(0.0, |b| b[c].abs() as f64);
            let bound = 2.0 * (k + 1) as f64 * f32::EPSILON as f64 * magnitude + 1e-30;
            let got = y[r * n + c] as f64;
            assert!(
                (got - exact).abs() <= bound,
                "{what}: y[{r}, {c}] = {got}, exact {exact} (bound {bound:.3e}), rows {rows} n {n} k {k}"
            );
        }
    }
}

/// The quantized product quantizes each block of 32 activations to codes up to `qmax` (32385, or
/// 127 for 8-bit codes): per element at most half a step, `amax / (2 * qmax)`, and a little
/// rounding, plus f32 rounding of the sums (per block the integer sum's conversion, `d * dx`, two
/// FMAs).
#[allow(clippy::too_many_arguments)]
fn check_linear_quant(
    what: &str,
    qmax: f64,
    x: &[f32],
    rows_q: &QuantRows,
    w: &[f32],
    bias: Option<&[f32]>,
    y: &[f32],
    rows: usize,
    n: usize,
    k: usize,
) {
    let blocks = k / 32;
    let minimum = |c: usize, blk: usize| -> f64 {
        let block = &rows_q.row(c)[blk * rows_q.format.block_bytes()..];
        if rows_q.format == QuantFormat::Q4_1 { f16::from_le_bytes([block[2], block[3]]).to_f64().abs() } else { 0.0 }
    };
    for r in 0..rows {
        for c in 0..n {
            let xs = &x[r * k..(r + 1) * k];
            let ws = &w[c * k..(c + 1) * k];
            let exact: f64 =
                xs.iter().zip(ws).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() + bias.map_or(0.0, |b| b[c] as f64);
            let (mut activations, mut magnitude) = (0.0, bias.map_or(0.0, |b| b[c].abs() as f64));
            for blk in 0..blocks {
                let (xb, wb) = (&xs[blk * 32..][..32], &ws[blk * 32..][..32]);
                let amax = xb.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
                let step = amax * (1.001 / (2.0 * qmax) + 2.0 * f32::EPSILON as f64);
                let wsum: f64 = wb.iter().map(|&v| (v as f64).abs()).sum();
                activations += step * wsum;
                magnitude += (wsum + 32.0 * minimum(c, blk)) * (amax + step) * 2.0;
            }
            let bound = activations + (4 * blocks + 2) as f64 * f32::EPSILON as f64 * magnitude + 1e-30;
            let got = y[r * n + c] as f64;
            assert!(
                (got - exact).abs() <= bound,
                "{what}: y[{r}, {c}] = {got}, exact {exact} (bound {bound:.3e}), rows {rows} n {n} k {k}"
            );
        }
    }
}

fn projection(input: &LinearInput) {
    let rows = 1 + input.rows as usize % 9;
    let n = 1 + input.n as usize % 80;
    let x_of = |k: usize| (0..rows * k).map(|i| value(input.seed, i)).collect::<Vec<f32>>();
    let w_of = |k: usize| (0..n * k).map(|i| value(input.seed.rotate_left(7), i)).collect::<Vec<f32>>();
    let bias: Option<Vec<f32>> = input.bias.then(|| (0..n).map(|i| value(input.seed.rotate_left(13), i)).collect());
    let quant = [None, Some(QuantFormat::Q8_0), Some(QuantFormat::Q4_0), Some(QuantFormat::Q4_1)];
    let dtype = input.weights as usize % 3;
    match quant[(input.weights / 3) as usize % 4] {
        None => {
            let k = 1 + input.k as usize % 300;
            let (x, w) = (x_of(k), w_of(k));
            let (f16s, bf16s): (Vec<f16>, Vec<bf16>) =
                (w.iter().map(|&v| f16::from_f32(v)).collect(), w.iter().map(|&v| bf16::from_f32(v)).collect());
            let (view, widened): (TensorRef<'_>, Vec<f32>) = match dtype {
                0 => (w.as_slice().into(), w.clone()),
                1 => (f16s.as_slice().into(), f16s.iter().map(|v| v.to_f32()).collect()),
                _ => (bf16s.as_slice().into(), bf16s.iter().map(|v| v.to_f32()).collect()),
            };
            // bf16 weights take the activations rounded to bf16, on every level: the reference
            // multiplies those (the values here are normal, so half's rounding is the kernels').
            let x_taken: Vec<f32> = match dtype {
                2 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                _ => x.clone(),
            };
            for level in SimdLevel::available() {
                let mut y = vec![f32::NAN; rows * n];
                linear(level, &x, rows, view, n, k, bias.as_deref(), &mut y).expect("valid shapes");
                check_linear(
                    &format!("linear {level} {:?}", DTYPES[dtype]),
                    &x_taken,
                    &widened,
                    bias.as_deref(),
                    &y,
                    rows,
                    n,
                    k,
                );
            }
        }
        Some(format) => {
            let k = 32 * (1 + input.k as usize % 12);
            let (x, w) = (x_of(k), w_of(k));
            let rows_q = QuantRows::quantize(format, &w, n, k).expect("valid shapes");
            let decoded = rows_q.to_f32();
            let packed = PackedQuant::from_rows(&rows_q).expect("finite scales");
            assert_eq!(packed.to_f32(), decoded, "{}: packing changed the weights", format.name());
            let (codes, qmax) =
                if input.seed & 1 == 0 { (ActivationCodes::Int16, 32385.0) } else { (ActivationCodes::Int8, 127.0) };
            for level in SimdLevel::available() {
                let mut y = vec![f32::NAN; rows * n];
                linear_quant(level, codes, &x, rows, &packed, bias.as_deref(), &mut y).expect("valid shapes");
                check_linear_quant(
                    &format!("linear_quant {level} {} {codes:?}", format.name()),
                    qmax,
                    &x,
                    &rows_q,
                    &decoded,
                    bias.as_deref(),
                    &y,
                    rows,
                    n,
                    k,
                );
            }
        }
    }
}

libfuzzer_sys::fuzz_target!(|op: Op| match op {
    Op::Attention(input) => attention(&input),
    Op::Linear(input) => projection(&input),
});

//! The GPU kernel benchmarks: the same shapes as the CPU table, timed on device-resident inputs
//! (inputs go up once, then the recorded dispatches are re-run), against ceilings measured by the
//! same binary on the same device. With TIMESTAMP_QUERY a case's time is the median of many
//! single runs timed by GPU timestamps, and the submit-to-completion wall time (back-to-back runs
//! of about 0.2 s) is kept beside it as a cross-check; without, the wall time is the time.

use half::f16;

use super::cases::{Bound, CaseResult, HEAD_DIM, KV_HEADS, LinearWeights, PAGE_SIZE, QO_HEADS, pseudo_random};
use super::timing::Stats;
use super::{Case, KernelReport, Scope};
use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, KvInput, PrefillInput};
use crate::dtype::{DType, TensorRef};
use crate::error::{Result, TwinferError};
use crate::gpu::{DEFAULT_MAX_WEIGHT_BUFFER, GpuEngine, GpuKvCache, GpuLinear, KvStorage};
use crate::kv::{KvLayout, PageTable, PagedKv};

/// Measures the ceilings, then every case of `scope` on `engine`, or only `only` when given
/// (the scope's own projection shapes then do not run; `only`'s linear cases do).
pub fn run_gpu_kernels(engine: &GpuEngine, scope: Scope, only: Option<&[Case]>) -> Result<KernelReport> {
    check_gpu_cases(only.unwrap_or_default())?;
    let ctx = engine.context();
    let runs = match scope {
        Scope::Quick => 3,
        Scope::Full => 5,
    };
    let limit = ctx.limits.max_storage_buffer_binding_size;
    let read_bytes = match scope {
        Scope::Quick => 32u64 << 20,
        Scope::Full => (1u64 << 30).min(1 << (63 - limit.leading_zeros())),
    };
    let read = engine.measure_read(read_bytes, runs)?;
    let read_gbps = Stats::from_samples(read).map(|t| read_bytes as f64 / t / 1e9);
    let (wgs, iters) = match scope {
        Scope::Quick => (16, 256),
        Scope::Full => (4096, 4096),
    };
    let (flops, fma) = engine.measure_fma(wgs, iters, runs)?;
    let fma_gflops = Stats::from_samples(fma).map(|t| flops / t / 1e9);
    let stamps = match scope {
        Scope::Quick => 20,
        Scope::Full => 100,
    };
    let mut cases = Vec::new();
    let f16 = |cases: &[(usize, usize)]| cases.iter().map(|&(b, c)| (b, c, DType::F16)).collect::<Vec<_>>();
    let (prefill, decode): (Vec<usize>, Vec<(usize, usize, DType)>) = match (only, scope) {
        (Some(only), _) => (
            only.iter().filter_map(|c| if let Case::Prefill(len) = c { Some(*len) } else { None }).collect(),
            only.iter()
                .filter_map(|c| match c {
                    Case::Decode { batch, ctx, dtype, .. } => Some((*batch, *ctx, *dtype)),
                    _ => None,
                })
                .collect(),
        ),
        (None, Scope::Quick) => (vec![256], f16(&[(1, 1024), (4, 1024)])),
        (None, Scope::Full) => (vec![1024, 4096], f16(&[(1, 8192), (1, 32768), (8, 8192), (64, 8192)])),
    };
    for len in prefill {
        cases.push(prefill_causal(engine, len, runs, stamps)?);
    }
    for (batch, ctx_len, dtype) in decode {
        cases.push(decode_paged(engine, batch, ctx_len, dtype, runs, stamps)?);
    }
    // Projections (rows, n, k): GEMVs over an MLP-sized weight (GB/s of weights), then
    // prompt-chunk matmuls (FLOP/s).
    let projections: Vec<(usize, usize, usize, LinearWeights)> = match (only, scope) {
        (Some(only), _) => only
            .iter()
            .filter_map(|c| match *c {
                Case::Linear { rows, n, k, weights } => Some((rows, n, k, weights)),
                _ => None,
            })
            .collect(),
        (None, Scope::Quick) => vec![(1, 2048, 1024, LinearWeights::F16), (128, 1024, 1024, LinearWeights::F16)],
        (None, Scope::Full) => [(1, 14336, 4096), (4, 14336, 4096), (512, 14336, 4096), (2048, 4096, 4096)]
            .iter()
            .map(|&(rows, n, k)| (rows, n, k, LinearWeights::F16))
            .collect(),
    };
    for (rows, n, k, weights) in projections {
        cases.push(linear(engine, rows, n, k, weights, runs, stamps)?);
    }
    Ok(KernelReport {
        cpu: ctx.summary.to_string(),
        simd: format!("gpu {}", engine.variant_name()),
        threads: 1,
        read_gbps,
        row_read_gbps: None,
        fma_gflops,
        bf16_dot_gflops: None,
        int8_dot_gops: None,
        cases,
    })
}

/// Refuses the cases the GPU benchmark cannot run (it stores decode KV as f16 or int8).
pub fn check_gpu_cases(cases: &[Case]) -> Result<()> {
    if let Some(bad) = cases.iter().find(|c| matches!(c, Case::Decode { dtype: DType::F32 | DType::BF16, .. })) {
        return Err(TwinferError::InvalidParameter(format!(
            "{bad:?}: the GPU decode benchmark stores its KV as f16 or int8; use decode:BATCH:CTX or decode-q8:BATCH:CTX"
        )));
    }
    match cases.iter().find(|c| matches!(c, Case::Decode { page, .. } if *page != PAGE_SIZE)) {
        Some(bad) => Err(TwinferError::InvalidParameter(format!(
            "{bad:?}: the GPU decode benchmark uses pages of {PAGE_SIZE}; other page sizes are timed on the CPU"
        ))),
        None => Ok(()),
    }
}

/// (time, wall cross-check) of the last recorded passes: GPU timestamps of `stamps` single runs
/// when the adapter has them, else the wall time of `runs` samples.
fn time_case(engine: &GpuEngine, runs: usize, stamps: usize) -> Result<(Stats, Option<Stats>)> {
    let wall = Stats::from_samples(engine.samples(runs)?);
    Ok(match engine.timestamp_samples(stamps)? {
        Some(t) => (Stats::from_samples(t), Some(wall)),
        None => (wall, None),
    })
}

/// Causal prefill of one sequence of `len` tokens, f16 Q/K/V, f32 output.
fn prefill_causal(engine: &GpuEngine, len: usize, runs: usize, stamps: usize) -> Result<CaseResult> {
    prepare_prefill_causal(engine, len)?;
    let (seconds, wall) = time_case(engine, runs, stamps)?;
    Ok(CaseResult {
        name: format!("prefill causal L={len}"),
        seconds,
        wall,
        bound: Bound::Compute,
        work: super::cases::prefill_causal_flops(len),
    })
}

/// Uploads the inputs of a causal prefill of `len` tokens and runs it once, so that
/// [`GpuEngine::time_last`] re-runs it on device-resident inputs.
pub fn prepare_prefill_causal(engine: &GpuEngine, len: usize) -> Result<()> {
    let params = AttentionParams::new(QO_HEADS, KV_HEADS, HEAD_DIM).causal(true);
    let q = pseudo_random(len * QO_HEADS * HEAD_DIM, 1);
    let k = pseudo_random(len * KV_HEADS * HEAD_DIM, 2);
    let v = pseudo_random(len * KV_HEADS * HEAD_DIM, 3);
    let indptr = [0u32, len as u32];
    let input = PrefillInput {
        q: q.as_slice().into(),
        qo_indptr: &indptr,
        kv: KvInput::Ragged { k: k.as_slice().into(), v: v.as_slice().into(), kv_indptr: &indptr },
    };
    let mut o = vec![0f32; len * QO_HEADS * HEAD_DIM];
    engine.prefill(&params, &input, &mut AttentionOutput::new(o.as_mut_slice()))
}

/// Paged decode: f16 or int8 KV, page 16, pages scattered over the pool by a fixed permutation.
fn decode_paged(
    engine: &GpuEngine,
    batch: usize,
    ctx: usize,
    dtype: DType,
    runs: usize,
    stamps: usize,
) -> Result<CaseResult> {
    let layout = KvLayout::new(PAGE_SIZE, KV_HEADS, HEAD_DIM)?;
    // The int8 pool lives in a device-resident cache, which must outlive the timing.
    let _pool = match dtype {
        DType::Q8 => Some(prepare_decode_resident(engine, batch, ctx, KvStorage::Q8)?),
        _ => {
            prepare_decode_paged(engine, batch, ctx)?;
            None
        }
    };
    let (seconds, wall) = time_case(engine, runs, stamps)?;
    let bytes_per_row = layout.page_bytes(dtype) as f64 / PAGE_SIZE as f64;
    Ok(CaseResult {
        name: format!("decode {dtype} page{PAGE_SIZE} batch={batch} ctx={}", super::cases::context_name(ctx)),
        seconds,
        wall,
        bound: Bound::Memory,
        work: 2.0 * (batch * ctx) as f64 * bytes_per_row,
    })
}

/// The pages, page table and queries of a decode case: `(k, v, indptr, indices, last, q)`.
#[allow(clippy::type_complexity)]
fn decode_inputs(batch: usize, ctx: usize) -> (Vec<f16>, Vec<f16>, Vec<u32>, Vec<u32>, Vec<u32>, Vec<f16>) {
    let pages_per_seq = ctx.div_ceil(PAGE_SIZE);
    let num_pages = batch * pages_per_seq;
    let page_elems = PAGE_SIZE * KV_HEADS * HEAD_DIM;
    let k = pseudo_random(num_pages * page_elems, 4);
    let v = pseudo_random(num_pages * page_elems, 5);
    // An odd stride is a bijection on a power-of-two pool and on most others; fall back to identity.
    let stride = if num_pages.is_power_of_two() { 7919 } else { 1 };
    let indices: Vec<u32> = (0..num_pages).map(|i| ((i * stride) % num_pages) as u32).collect();
    let indptr: Vec<u32> = (0..=batch).map(|b| (b * pages_per_seq) as u32).collect();
    let last = vec![(ctx - (pages_per_seq - 1) * PAGE_SIZE) as u32; batch];
    let q = pseudo_random(batch * QO_HEADS * HEAD_DIM, 6);
    (k, v, indptr, indices, last, q)
}

/// Uploads the inputs of a paged decode step (f16 KV) and runs it once, so that
/// [`GpuEngine::time_last`] re-runs it on device-resident inputs.
pub fn prepare_decode_paged(engine: &GpuEngine, batch: usize, ctx: usize) -> Result<()> {
    let params = AttentionParams::new(QO_HEADS, KV_HEADS, HEAD_DIM);
    let layout = KvLayout::new(PAGE_SIZE, KV_HEADS, HEAD_DIM)?;
    let (k, v, indptr, indices, last, q) = decode_inputs(batch, ctx);
    let input = DecodeInput {
        q: q.as_slice().into(),
        kv: PagedKv::new(k.as_slice().into(), v.as_slice().into(), layout)?,
        table: PageTable::new(&indptr, &indices, &last),
    };
    let mut o = vec![0f32; batch * QO_HEADS * HEAD_DIM];
    engine.decode(&params, &input, &mut AttentionOutput::new(o.as_mut_slice()))
}

/// The same step over a device-resident pool in `storage` (written once from the host), run once
/// so that [`GpuEngine::time_last`] re-runs it; the pool must outlive the timing.
pub fn prepare_decode_resident(engine: &GpuEngine, batch: usize, ctx: usize, storage: KvStorage) -> Result<GpuKvCache> {
    let params = AttentionParams::new(QO_HEADS, KV_HEADS, HEAD_DIM);
    let layout = KvLayout::new(PAGE_SIZE, KV_HEADS, HEAD_DIM)?;
    let (k, v, indptr, indices, last, q) = decode_inputs(batch, ctx);
    let num_pages = k.len() / layout.page_elems();
    let pool = GpuKvCache::new(engine, layout, num_pages, storage, u64::MAX)?;
    pool.write_pages(engine, 0, k.as_slice().into(), v.as_slice().into())?;
    let table = PageTable::new(&indptr, &indices, &last);
    let mut o = vec![0f32; batch * QO_HEADS * HEAD_DIM];
    engine.decode_resident(
        &params,
        q.as_slice().into(),
        &pool,
        table,
        Some(&mut AttentionOutput::new(o.as_mut_slice())),
    )?;
    Ok(pool)
}

/// A projection `[rows, k] x [n, k]^T` with weights in `weights`' format (f16 and bf16 weights
/// as f16 where the adapter has shader-f16, else f32; block formats packed). Up to [`crate::gpu::GEMV_MAX_ROWS`] rows it
/// is a GEMV, rated in GB/s of the weights as stored; above, a matmul rated in FLOP/s.
fn linear(
    engine: &GpuEngine,
    rows: usize,
    n: usize,
    k: usize,
    weights: LinearWeights,
    runs: usize,
    stamps: usize,
) -> Result<CaseResult> {
    let stored = prepare_linear(engine, rows, n, k, weights)?;
    let (seconds, wall) = time_case(engine, runs, stamps)?;
    let format = match weights {
        LinearWeights::Quant(format, _) => format.name().to_string(),
        _ => stored.storage.to_string(),
    };
    let gemv = rows <= crate::gpu::GEMV_MAX_ROWS;
    Ok(CaseResult {
        name: format!("{} {format} rows={rows} [{n}, {k}]", if gemv { "gemv" } else { "matmul" }),
        seconds,
        wall,
        bound: if gemv { Bound::Memory } else { Bound::Compute },
        // A GEMV reads its weights as stored: codes and scales for the block formats.
        work: if gemv { stored.device_bytes() as f64 } else { linear_flops(rows, n, k) },
    })
}

/// FLOPs of one projection.
pub fn linear_flops(rows: usize, n: usize, k: usize) -> f64 {
    2.0 * rows as f64 * n as f64 * k as f64
}

/// Uploads a projection's weights (random, in `weights`' format: float weights as the engine
/// stores them, block formats quantized and kept packed), runs it once, and returns the weights
/// (keep them while [`GpuEngine::time_last`] re-runs the call on device-resident inputs).
pub fn prepare_linear(
    engine: &GpuEngine,
    rows: usize,
    n: usize,
    k: usize,
    weights: LinearWeights,
) -> Result<GpuLinear> {
    let w: Vec<f16> = pseudo_random(n * k, 7);
    let weights = match weights {
        LinearWeights::Quant(format, crate::cpu::ActivationCodes::Int8) => {
            return Err(TwinferError::InvalidParameter(format!(
                "linear-{}-i8: GPU kernels take the activations in f32; 8-bit activation codes are a CPU case",
                format.name()
            )));
        }
        LinearWeights::Quant(format, crate::cpu::ActivationCodes::Int16) => {
            use crate::quant::{PackedQuant, QuantRows};
            let w32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let packed = PackedQuant::from_rows(&QuantRows::quantize(format, &w32, n, k)?)?;
            GpuLinear::upload_quant(engine, &[&packed], None, DEFAULT_MAX_WEIGHT_BUFFER)?
        }
        LinearWeights::F32 => {
            let w32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            GpuLinear::upload(engine, TensorRef::F32(&w32), n, k, None, KvStorage::F32, DEFAULT_MAX_WEIGHT_BUFFER)?
        }
        LinearWeights::F16 => {
            let w = TensorRef::F16(&w);
            let storage = GpuLinear::storage_for(engine, w);
            GpuLinear::upload(engine, w, n, k, None, storage, DEFAULT_MAX_WEIGHT_BUFFER)?
        }
        LinearWeights::BF16 => {
            let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(v.to_f32())).collect();
            let w = TensorRef::BF16(&wb);
            let storage = GpuLinear::storage_for(engine, w);
            GpuLinear::upload(engine, w, n, k, None, storage, DEFAULT_MAX_WEIGHT_BUFFER)?
        }
    };
    let x: Vec<f32> = pseudo_random(rows * k, 8).iter().map(|v| v.to_f32()).collect();
    let mut y = vec![0f32; rows * n];
    engine.linear(&weights, &x, rows, &mut y)?;
    Ok(weights)
}

//! Criterion benchmarks of the GPU attention and projection kernels on the shapes of `benches/attention.rs` and
//! `twinfer bench kernels --backend gpu` (`twinfer::bench::gpu`).
//!
//! Each case uploads its inputs once; criterion then times `GpuEngine::time_last(iters)`, which
//! re-submits the recorded dispatches `iters` times and waits: device time on device-resident
//! inputs, including submission, excluding uploads and readback. Throughput is FLOPs (prefill,
//! read as "elem/s") or K/V bytes (decode).
//!
//! On a software adapter (lavapipe, SwiftShader) the attention cases print SKIPPED: those are for
//! correctness, and the long prefills would take minutes there; the projection cases run on toy
//! shapes. With no adapter at all every case is skipped.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use twinfer::bench::{cases, gpu};
use twinfer::gpu::GpuEngine;

/// The device's engine, or why not (a software adapter counts as "not").
fn engine() -> Option<GpuEngine> {
    match GpuEngine::new() {
        Ok(e) if e.context().summary.device_type != "Cpu" => Some(e),
        Ok(e) => {
            eprintln!("SKIPPED: {} is a software adapter; GPU benches need a GPU", e.context().summary.name);
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: no GPU ({e})");
            None
        }
    }
}

fn time(engine: &GpuEngine, iters: u64) -> Duration {
    let per_iter = engine.time_last(iters as usize).expect("the recorded case runs");
    Duration::from_secs_f64(per_iter * iters as f64)
}

fn prefill_causal(c: &mut Criterion) {
    let Some(engine) = engine() else { return };
    let mut group = c.benchmark_group("gpu_prefill_causal");
    group.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(5));
    for len in [512, 2048, 8192] {
        group.throughput(Throughput::Elements(cases::prefill_causal_flops(len) as u64));
        let mut ready = false;
        group.bench_function(BenchmarkId::new(engine.variant_name(), len), |b| {
            if !ready {
                gpu::prepare_prefill_causal(&engine, len).expect("the benchmark case is valid");
                ready = true;
            }
            b.iter_custom(|iters| time(&engine, iters));
        });
    }
    group.finish();
}

fn decode_paged(c: &mut Criterion) {
    let Some(engine) = engine() else { return };
    let mut group = c.benchmark_group("gpu_decode_paged");
    group.sample_size(20).measurement_time(Duration::from_secs(3));
    for batch in [1, 8, 64] {
        for ctx in [1024, 8192, 32768] {
            if batch == 64 && ctx != 8192 {
                continue;
            }
            group.throughput(Throughput::Bytes(cases::decode_paged_bytes(batch, ctx) as u64));
            let mut ready = false;
            let id = BenchmarkId::new(engine.variant_name(), format!("b{batch}_ctx{}K", ctx / 1024));
            group.bench_function(id, |b| {
                if !ready {
                    gpu::prepare_decode_paged(&engine, batch, ctx).expect("the benchmark case is valid");
                    ready = true;
                }
                b.iter_custom(|iters| time(&engine, iters));
            });
        }
    }
    group.finish();
}

/// Projections with f16 weights (f32 without shader-f16): GEMV for decode rows, rated in weight
/// bytes; the tiled matmul for prompt chunks, rated in FLOPs ("elem/s").
/// Unlike the attention cases these also run on a software adapter, on toy shapes, so that
/// `cargo test --benches` exercises them in CI (the numbers mean nothing there).
fn linear(c: &mut Criterion) {
    let engine = match GpuEngine::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("SKIPPED: no GPU ({e})");
            return;
        }
    };
    let software = engine.context().summary.device_type == "Cpu";
    let shapes: &[(usize, usize, usize)] = if software {
        &[(1, 512, 256), (64, 256, 256)]
    } else {
        &[(1, 14336, 4096), (4, 14336, 4096), (512, 14336, 4096), (2048, 4096, 4096)]
    };
    let mut group = c.benchmark_group("gpu_linear");
    group.sample_size(20).measurement_time(Duration::from_secs(3));
    for &(rows, n, k) in shapes {
        let gemv = rows <= twinfer::gpu::GEMV_MAX_ROWS;
        let id = BenchmarkId::new(engine.variant_name(), format!("rows{rows}_{n}x{k}"));
        let weights =
            gpu::prepare_linear(&engine, rows, n, k, cases::LinearWeights::F16).expect("the benchmark case is valid");
        group.throughput(if gemv {
            Throughput::Bytes((n * k * weights.storage.bytes()) as u64)
        } else {
            Throughput::Elements(gpu::linear_flops(rows, n, k) as u64)
        });
        group.bench_function(id, |b| b.iter_custom(|iters| time(&engine, iters)));
        drop(weights);
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).without_plots()
}

criterion_group! {
    name = gpu_attention;
    config = config();
    targets = prefill_causal, decode_paged, linear
}
criterion_main!(gpu_attention);

//! Criterion benchmarks of the CPU attention kernels on Llama-3-8B-like heads (32 query heads,
//! 8 KV heads, head_dim 128), on the very inputs `twinfer bench kernels` times
//! (`twinfer::bench::cases`).
//!
//! - `prefill_causal/<simd>/<L>`: one causal prefill of L = 512, 2048, 8192 tokens, f16 Q/K/V,
//!   f32 output. Throughput is `Elements` set to the **FLOPs** of one run (QK^T and PV over the
//!   visible lower triangle, 2 FLOPs per multiply-add), so criterion's "elem/s" reads as FLOP/s.
//! - `decode_paged/<simd>/b<batch>_ctx<ctx>K`: one decode step, f16 KV in pages of 16 tokens on
//!   shuffled pages, batch 1 and 8, contexts 1K, 8K and 32K. Throughput is `Bytes` set to the K
//!   and V bytes one step reads, so "B/s" is the achieved KV bandwidth.
//!
//! `<simd>` is the instruction set that ran: the widest this CPU has, or `TWINFER_SIMD`.
//!
//! The long cases (L = 8192 takes seconds per run) use 10 samples of one run each, flat
//! sampling and a measurement time sized to that. `cargo test -p twinfer-benches --benches` (CI) runs
//! every case once; `-- --quick` stops once the estimate settles; a filter such as
//! `-- prefill_causal/.*/512` picks cases. Inputs are built only for the cases that run, one case
//! at a time (decode batch 8 at 32K holds 1 GiB of KV).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use twinfer::bench::cases::{self, DecodePaged, PrefillCausal};
use twinfer::cpu::{CpuEngine, SimdLevel};

/// The engine on the widest instruction set, or the one `TWINFER_SIMD` names.
fn engine() -> CpuEngine {
    let level = match std::env::var("TWINFER_SIMD") {
        Ok(name) if !name.is_empty() => SimdLevel::by_name(&name).unwrap_or_else(|| {
            let available: Vec<_> = SimdLevel::available().iter().map(|l| l.name()).collect();
            panic!("TWINFER_SIMD={name} is not available here (available: {})", available.join(", "))
        }),
        _ => SimdLevel::detect(),
    };
    CpuEngine::with_level(level)
}

/// Prefill lengths with their sample count and measurement time (a run of L = 8192 takes
/// about 10 s on a 2-core machine).
const PREFILL: [(usize, usize, u64); 3] = [(512, 20, 5), (2048, 10, 15), (8192, 10, 100)];

fn prefill_causal(c: &mut Criterion) {
    let engine = engine();
    let level = engine.level().name();
    let mut group = c.benchmark_group("prefill_causal");
    group.sampling_mode(SamplingMode::Flat);
    for (len, samples, seconds) in PREFILL {
        group.sample_size(samples).measurement_time(Duration::from_secs(seconds));
        group.throughput(Throughput::Elements(cases::prefill_causal_flops(len) as u64));
        let mut case: Option<PrefillCausal> = None;
        group.bench_function(BenchmarkId::new(level, len), |b| {
            let case = case.get_or_insert_with(|| PrefillCausal::new(len));
            b.iter(|| {
                case.run(&engine).expect("the benchmark case is valid");
                black_box(case.output());
            });
        });
    }
    group.finish();
}

fn decode_paged(c: &mut Criterion) {
    let engine = engine();
    let level = engine.level().name();
    let mut group = c.benchmark_group("decode_paged");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for batch in [1, 8] {
        for ctx in [1024, 8192, 32768] {
            group.throughput(Throughput::Bytes(cases::decode_paged_bytes(batch, ctx) as u64));
            let mut case: Option<DecodePaged> = None;
            let id = BenchmarkId::new(level, format!("b{batch}_ctx{}K", ctx / 1024));
            group.bench_function(id, |b| {
                let case =
                    case.get_or_insert_with(|| DecodePaged::new(batch, ctx).expect("the benchmark case is valid"));
                b.iter(|| {
                    case.run(&engine).expect("the benchmark case is valid");
                    black_box(case.output());
                });
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).without_plots()
}

criterion_group! {
    name = attention;
    config = config();
    targets = prefill_causal, decode_paged
}
criterion_main!(attention);

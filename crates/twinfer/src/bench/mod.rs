//! Kernel benchmarks that report against this machine's own ceilings, measured in the same run.

pub mod cases;
pub mod ceilings;
pub mod gpu;
pub mod plan;
pub mod serve;
pub mod timing;

use crate::cpu::CpuEngine;
use crate::error::Result;
use cases::{Bound, CaseResult};
use timing::Stats;

/// Which cases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Small shapes, a few runs: seconds (used under emulation and in CI smoke tests).
    Quick,
    /// The full table: prefill L = 512, 2048, 8192; decode batch 1 and 8, ctx 1K, 8K, 32K.
    Full,
}

/// Everything one `bench kernels` run measured.
#[derive(Debug, Clone)]
pub struct KernelReport {
    pub cpu: String,
    pub simd: String,
    pub threads: usize,
    pub read_gbps: Stats,
    pub fma_gflops: Stats,
    pub cases: Vec<CaseResult>,
}

impl KernelReport {
    /// The ceiling a case is compared with.
    pub fn ceiling(&self, case: &CaseResult) -> f64 {
        match case.bound {
            Bound::Compute => self.fma_gflops.median,
            Bound::Memory => self.read_gbps.median,
        }
    }
}

/// Measures the ceilings, then every case, on `engine`.
pub fn run_kernels(engine: &CpuEngine, scope: Scope) -> Result<KernelReport> {
    let level = engine.level();
    let (runs, ceiling_bytes) = match scope {
        Scope::Quick => (3, 256 << 20),
        Scope::Full => (7, ceilings::READ_BYTES),
    };
    let read_gbps = ceilings::read_bandwidth(level, ceiling_bytes, runs);
    let fma_gflops = ceilings::fma_peak(level, runs);
    let mut cases = Vec::new();
    let (prefill_lens, decode_ctx): (&[usize], &[usize]) = match scope {
        Scope::Quick => (&[256], &[1024]),
        Scope::Full => (&[512, 2048, 8192], &[1024, 8192, 32768]),
    };
    for &len in prefill_lens {
        let r = if len >= 8192 { runs.min(3) } else { runs };
        cases.push(cases::prefill_causal(engine, len, r)?);
    }
    for &batch in &[1, 8] {
        for &ctx in decode_ctx {
            cases.push(cases::decode_paged(engine, batch, ctx, runs)?);
        }
    }
    Ok(KernelReport {
        cpu: crate::cpu_model_name(),
        simd: level.name().to_string(),
        threads: engine.threads(),
        read_gbps,
        fma_gflops,
        cases,
    })
}

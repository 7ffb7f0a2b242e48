//! `bench kernels`: the ceilings, then each case, into one report.

use std::str::FromStr;

use serde_json::{Value, json};

use super::cases::{self, Bound, CaseResult};
use super::ceilings;
use super::timing::Stats;
use crate::cpu::CpuEngine;
use crate::dtype::DType;
use crate::error::{Result, TwinferError};
use crate::quant::QuantFormat;

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
    /// The device: the CPU's model name, or the GPU adapter's summary.
    pub cpu: String,
    /// The kernel variant: the SIMD level, or `gpu <variant>`.
    pub simd: String,
    /// Worker threads (1 on the GPU).
    pub threads: usize,
    /// Read bandwidth ceiling, in GB/s.
    pub read_gbps: Stats,
    /// Read bandwidth over one-token K rows of the decode cases at random (CPU only), in GB/s:
    /// the ceiling of decode with pages of one token.
    pub row_read_gbps: Option<Stats>,
    /// f32 FMA ceiling, in GFLOP/s.
    pub fma_gflops: Stats,
    /// bf16 dot products' ceiling in GFLOP/s, where the CPU has them (`bench::dot_peaks`); the
    /// bf16 cases are compared with the f32 FMA peak all the same, so that every row shares one
    /// scale.
    pub bf16_dot_gflops: Option<Stats>,
    /// int8 dot products' ceiling in GOP/s (a multiply-add counts 2), where the CPU has them.
    pub int8_dot_gops: Option<Stats>,
    /// Every case measured.
    pub cases: Vec<CaseResult>,
}

impl KernelReport {
    /// The report as JSON, each case with its rate and the fraction of its ceiling.
    pub fn to_json(&self) -> Value {
        let stats = |s: &Stats| json!({"median": s.median, "min": s.min, "max": s.max, "runs": s.runs});
        let cases: Vec<Value> = self
            .cases
            .iter()
            .map(|c| {
                json!({"name": c.name, "bound": match c.bound { Bound::Compute => "compute", Bound::Memory => "memory" },
                       "work": c.work, "seconds": stats(&c.seconds), "rate": stats(&c.rate()),
                       "ceiling_fraction": c.rate().median / self.ceiling(c)})
            })
            .collect();
        json!({"cpu": self.cpu, "simd": self.simd, "threads": self.threads, "read_gbps": stats(&self.read_gbps),
               "row_read_gbps": self.row_read_gbps.as_ref().map(stats), "row_bytes": cases::ROW_BYTES,
               "fma_gflops": stats(&self.fma_gflops), "bf16_dot_gflops": self.bf16_dot_gflops.as_ref().map(stats),
               "int8_dot_gops": self.int8_dot_gops.as_ref().map(stats), "cases": cases})
    }

    /// The ceiling a case is compared with.
    pub fn ceiling(&self, case: &CaseResult) -> f64 {
        match case.bound {
            Bound::Compute => self.fma_gflops.median,
            Bound::Memory => self.read_gbps.median,
        }
    }
}

/// One shape to measure: `prefill:LEN` (f16 K/V), `prefill-bf16:LEN` (CPU), `decode:BATCH:CTX` (f16 KV), `decode-f32:BATCH:CTX`, `decode-bf16:BATCH:CTX`,
/// `decode-q8:BATCH:CTX` (each with an optional `:PAGE`, tokens per page), `linear:ROWS:N:K` (f16 weights) or `linear-FORMAT:ROWS:N:K` (`f32`,
/// `bf16`, or a block format such as `q4_1`) on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// Causal single-sequence prefill of this many tokens.
    Prefill(usize),
    /// The same over bf16 K/V (CPU only: bf16 dot products where the CPU has them).
    PrefillBf16(usize),
    /// Paged decode: `batch` sequences of `ctx` tokens, KV stored as `dtype`.
    Decode {
        /// Sequences in the step.
        batch: usize,
        /// Tokens of context per sequence.
        ctx: usize,
        /// Storage type of the KV pool.
        dtype: DType,
        /// Tokens per page (CPU only; the GPU cases take pages of 16).
        page: usize,
    },
    /// A projection `y = x · Wᵀ`: `rows` activation rows, `n` outputs, `k` inputs.
    Linear {
        /// Activation rows (tokens).
        rows: usize,
        /// Output features.
        n: usize,
        /// Input features.
        k: usize,
        /// How the weights are stored.
        weights: cases::LinearWeights,
    },
}

impl FromStr for Case {
    type Err = TwinferError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            TwinferError::InvalidParameter(format!(
                "case {s:?}: prefill:LEN, prefill-bf16:LEN, decode:BATCH:CTX[:PAGE], decode-f32:BATCH:CTX[:PAGE], \
                 decode-bf16:BATCH:CTX[:PAGE], decode-q8:BATCH:CTX[:PAGE] (PAGE: tokens per page, 1..=256, default 16), linear:ROWS:N:K or linear-FORMAT:ROWS:N:K (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1)"
            ))
        };
        let num = |x: &str| x.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(bad);
        match s.split(':').collect::<Vec<_>>().as_slice() {
            ["prefill", len] => Ok(Case::Prefill(num(len)?)),
            ["prefill-bf16", len] => Ok(Case::PrefillBf16(num(len)?)),
            [kind, batch, ctx, page @ ..] if kind.starts_with("decode") && page.len() <= 1 => {
                let dtype = match *kind {
                    "decode" => DType::F16,
                    "decode-f32" => DType::F32,
                    "decode-bf16" => DType::BF16,
                    "decode-q8" => DType::Q8,
                    _ => return Err(bad()),
                };
                let page = match page {
                    [p] => num(p).ok().filter(|&p| p <= crate::kv::MAX_PAGE_SIZE).ok_or_else(bad)?,
                    _ => cases::PAGE_SIZE,
                };
                Ok(Case::Decode { batch: num(batch)?, ctx: num(ctx)?, dtype, page })
            }
            [kind, rows, n, k] if kind.starts_with("linear") => {
                let weights = match kind.strip_prefix("linear") {
                    Some("") => cases::LinearWeights::F16,
                    Some(format) => cases::LinearWeights::parse(format.strip_prefix('-').ok_or_else(bad)?)?,
                    None => return Err(bad()),
                };
                Ok(Case::Linear { rows: num(rows)?, n: num(n)?, k: num(k)?, weights })
            }
            _ => Err(bad()),
        }
    }
}

impl Scope {
    /// The cases of this scope.
    pub fn cases(self) -> Vec<Case> {
        let (prefill_lens, decode_ctx): (&[usize], &[usize]) = match self {
            Scope::Quick => (&[256], &[1024]),
            Scope::Full => (&[512, 2048, 8192], &[1024, 8192, 32768]),
        };
        let mut cases: Vec<Case> = prefill_lens.iter().map(|&len| Case::Prefill(len)).collect();
        for batch in [1, 8] {
            cases.extend(decode_ctx.iter().map(|&ctx| Case::Decode {
                batch,
                ctx,
                dtype: DType::F16,
                page: cases::PAGE_SIZE,
            }));
        }
        // A prompt chunk through smollm-135m's projections: the fused gate/up (3072 x 576) and
        // the down projection (576 x 1536), in its f16 weights and two of its GGUF formats (q8_0
        // with 8-bit activation codes too).
        use crate::cpu::ActivationCodes::{Int8, Int16};
        use cases::LinearWeights::{F16, Quant};
        let linear: &[(usize, usize, usize, cases::LinearWeights)] = match self {
            Scope::Quick => &[(128, 1536, 576, F16)],
            Scope::Full => &[
                (512, 3072, 576, F16),
                (512, 576, 1536, F16),
                (512, 3072, 576, Quant(QuantFormat::Q8_0, Int16)),
                (512, 3072, 576, Quant(QuantFormat::Q8_0, Int8)),
                (512, 3072, 576, Quant(QuantFormat::Q4_1, Int16)),
            ],
        };
        cases.extend(linear.iter().map(|&(rows, n, k, weights)| Case::Linear { rows, n, k, weights }));
        cases
    }
    /// Timed runs per case and the bytes of the read-bandwidth ceiling.
    pub fn runs_and_ceiling_bytes(self) -> (usize, usize) {
        match self {
            Scope::Quick => (3, 256 << 20),
            Scope::Full => (7, ceilings::READ_BYTES),
        }
    }
}

/// Measures the ceilings, then every case of `scope`, on `engine`.
pub fn run_kernels(engine: &CpuEngine, scope: Scope) -> Result<KernelReport> {
    let (runs, ceiling_bytes) = scope.runs_and_ceiling_bytes();
    run_kernel_cases(engine, &scope.cases(), runs, ceiling_bytes)
}

/// Measures the ceilings, then `cases`, each `runs` times (long prefills at most 3).
pub fn run_kernel_cases(engine: &CpuEngine, cases: &[Case], runs: usize, ceiling_bytes: usize) -> Result<KernelReport> {
    let level = engine.level();
    let read_gbps = ceilings::read_bandwidth(level, ceiling_bytes, runs);
    let row_read_gbps = ceilings::random_row_bandwidth(level, ceiling_bytes, cases::ROW_BYTES, runs);
    let fma_gflops = ceilings::fma_peak(level, runs);
    let (bf16_dot_gflops, int8_dot_gops) =
        (super::dot_peaks::bf16_dot_peak(runs), super::dot_peaks::int8_dot_peak(runs));
    let mut results = Vec::new();
    for &case in cases {
        results.push(match case {
            Case::Prefill(len) => {
                cases::prefill_causal(engine, len, false, if len >= 8192 { runs.min(3) } else { runs })?
            }
            Case::PrefillBf16(len) => {
                cases::prefill_causal(engine, len, true, if len >= 8192 { runs.min(3) } else { runs })?
            }
            Case::Decode { batch, ctx, dtype, page } => cases::decode_paged(engine, batch, ctx, dtype, page, runs)?,
            Case::Linear { rows, n, k, weights } => cases::linear(engine, rows, n, k, weights, runs)?,
        });
    }
    let cases = results;
    Ok(KernelReport {
        cpu: crate::cpu_model_name(),
        simd: level.name().to_string(),
        threads: engine.threads(),
        read_gbps,
        row_read_gbps: Some(row_read_gbps),
        fma_gflops,
        bf16_dot_gflops,
        int8_dot_gops,
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_cases_take_an_optional_page_size() {
        let parse = |s: &str| s.parse::<Case>();
        let decode = |dtype, page| Case::Decode { batch: 8, ctx: 4096, dtype, page };
        assert_eq!(parse("decode:8:4096").unwrap(), decode(DType::F16, 16));
        assert_eq!(parse("decode:8:4096:1").unwrap(), decode(DType::F16, 1));
        assert_eq!(parse("decode-f32:8:4096:64").unwrap(), decode(DType::F32, 64));
        assert_eq!(parse("decode-q8:8:4096:256").unwrap(), decode(DType::Q8, 256));
        assert_eq!(parse("decode-bf16:8:4096").unwrap(), decode(DType::BF16, 16));
        for bad in ["decode:8:4096:0", "decode:8:4096:257", "decode:8:4096:1:1", "decode-f64:8:4096", "decode:8"] {
            assert!(matches!(parse(bad), Err(TwinferError::InvalidParameter(_))), "{bad}");
        }
    }

    #[test]
    fn the_gpu_benchmark_refuses_what_it_cannot_time() {
        let case = |s: &str| s.parse::<Case>().unwrap();
        assert!(super::super::gpu::check_gpu_cases(&[case("decode:1:1024"), case("decode-q8:8:4096:16")]).is_ok());
        for bad in ["decode:1:1024:1", "decode-f32:1:1024", "decode-bf16:1:1024"] {
            assert!(super::super::gpu::check_gpu_cases(&[case(bad)]).is_err(), "{bad}");
        }
    }
}

//! The kernel benchmark cases of the native `twinfer bench kernels`, built here so that a page can
//! time them with `performance.now()` and compare the wasm engine with the native one on the very
//! same shapes and data.

use twinfer::bench::cases::{DecodePaged, LinearCase, LinearWeights, PrefillCausal};
use twinfer::cpu::CpuEngine;
use twinfer::{DType, TwinferError};
use wasm_bindgen::prelude::*;

use crate::errors::to_js_error;
use crate::install_panic_hook;

enum Shape {
    Prefill(Box<PrefillCausal>),
    Decode(Box<DecodePaged>),
    Linear(Box<LinearCase>),
}

/// One case: `"prefill:LEN"` (causal, f16, 32/8 heads x 128), `"decode:BATCH:CTX"` (paged f16
/// KV, page 16, GQA 32/8, head_dim 128), `"decode-f32:BATCH:CTX"` (the same, f32 KV), or a
/// projection `"linear:ROWS:N:K"` (f16 weights) / `"linear-FORMAT:ROWS:N:K"` (f32, bf16, q8_0,
/// q4_0, q4_1, ...), on the wasm SIMD engine.
#[wasm_bindgen]
pub struct BenchCase {
    shape: Shape,
    engine: CpuEngine,
}

impl std::fmt::Debug for BenchCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[wasm_bindgen]
impl BenchCase {
    /// The case `spec` names (see the type's documentation), its inputs built once.
    #[wasm_bindgen(constructor)]
    pub fn new(spec: &str) -> Result<BenchCase, js_sys::Error> {
        install_panic_hook();
        let bad = || {
            to_js_error(TwinferError::InvalidParameter(format!(
                "case {spec:?}: prefill:LEN, decode:BATCH:CTX or linear[-FORMAT]:ROWS:N:K"
            )))
        };
        let nums: Vec<usize> = spec
            .split(':')
            .skip(1)
            .map(|x| x.parse().ok().filter(|&n| n > 0))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let shape = match (spec.split(':').next(), nums.as_slice()) {
            (Some("prefill"), &[len]) => Shape::Prefill(Box::new(PrefillCausal::new(len))),
            (Some(kind @ ("decode" | "decode-f32")), &[batch, ctx]) => {
                let dtype = if kind == "decode" { DType::F16 } else { DType::F32 };
                Shape::Decode(Box::new(DecodePaged::with_kv_dtype(batch, ctx, dtype).map_err(to_js_error)?))
            }
            (Some(kind), &[rows, n, k]) if kind == "linear" || kind.starts_with("linear-") => {
                let weights =
                    LinearWeights::parse(kind.strip_prefix("linear-").unwrap_or("f16")).map_err(to_js_error)?;
                Shape::Linear(Box::new(LinearCase::new(rows, n, k, weights).map_err(to_js_error)?))
            }
            _ => return Err(bad()),
        };
        Ok(Self { shape, engine: CpuEngine::new() })
    }

    /// The native report's name for this case.
    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        match &self.shape {
            Shape::Prefill(c) => c.name(),
            Shape::Decode(c) => c.name(),
            Shape::Linear(c) => c.name(),
        }
    }

    /// FLOPs (prefill) or bytes of K and V read (decode) per run.
    #[wasm_bindgen(getter)]
    pub fn work(&self) -> f64 {
        match &self.shape {
            Shape::Prefill(c) => c.flops(),
            Shape::Decode(c) => c.bytes(),
            Shape::Linear(c) => c.flops(),
        }
    }

    /// `"compute"` or `"memory"`.
    #[wasm_bindgen(getter)]
    pub fn bound(&self) -> String {
        match &self.shape {
            Shape::Prefill(_) | Shape::Linear(_) => "compute".into(),
            Shape::Decode(_) => "memory".into(),
        }
    }

    /// The SIMD level that runs.
    #[wasm_bindgen(getter)]
    pub fn simd(&self) -> String {
        self.engine.level().name().into()
    }

    /// One run of the kernel.
    pub fn run(&mut self) -> Result<(), js_sys::Error> {
        match &mut self.shape {
            Shape::Prefill(c) => c.run(&self.engine),
            Shape::Decode(c) => c.run(&self.engine),
            Shape::Linear(c) => c.run(&self.engine),
        }
        .map_err(to_js_error)
    }
}

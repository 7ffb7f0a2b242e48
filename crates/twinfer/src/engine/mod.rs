//! The inference runtime: continuous batching over the paged KV cache, sampling, streaming and
//! the serving metrics.

mod config;
mod metrics;
mod request;
mod sampling;
mod scheduler;
#[cfg(not(target_arch = "wasm32"))]
mod serve;

pub use config::EngineConfig;
pub use metrics::{Distribution, RequestMetrics, RunMetrics};
pub use request::{Event, FinishReason, GenerateRequest, Prompt, RequestId};
pub use sampling::{Sampler, SamplingParams, argmax, top_k};
pub use scheduler::{Scheduler, StepCost};
#[cfg(not(target_arch = "wasm32"))]
pub use serve::{Engine, EngineStats, EventSink, TokenStream};

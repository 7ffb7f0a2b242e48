//! How an engine is set up.

use crate::backend::Backend;
use crate::cpu::SimdLevel;
use crate::dtype::DType;

/// Engine settings. The defaults suit a laptop or an edge board.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Attention engine for prompt chunks; `Auto` takes the startup choice.
    pub prefill_backend: Backend,
    /// Attention engine for single decode tokens; may differ from `prefill_backend` (hybrid).
    pub decode_backend: Backend,
    /// CPU instruction set for the projections and CPU attention; `None` takes the widest.
    pub simd: Option<SimdLevel>,
    /// Tokens per KV page.
    pub page_size: usize,
    /// KV pages per layer; `None` sizes the pool from `kv_memory_bytes`.
    pub kv_pool_pages: Option<usize>,
    /// Bytes for the KV pool across all layers (keys and values), used when `kv_pool_pages` is `None`.
    pub kv_memory_bytes: usize,
    /// Element type of the KV cache.
    pub kv_dtype: DType,
    /// Tokens per step: every running sequence's decode token plus prompt chunks up to this.
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// A time-per-output-token objective in seconds. When set, a step that carries decode tokens
    /// takes prompt tokens only as far as the measured step cost keeps it within the objective
    /// (Sarathi-Serve's stall-free batching), and at least one aligned chunk so that prompts still
    /// move; a step with nobody decoding takes `max_batch_tokens` (the first token is what its
    /// requests wait for). `None`: every step takes up to `max_batch_tokens`.
    pub tpot_target: Option<f64>,
    /// New requests reuse the KV pages of a running request's identical prompt prefix.
    pub prefix_sharing: bool,
    /// Finished requests leave their KV pages behind for later prompts that start the same way
    /// (a chat's next turn re-sends the conversation): up to this many sequences, least recently
    /// used first out, and evicted before any running request is preempted. 0 turns it off.
    /// Needs `prefix_sharing`.
    pub prefix_cache_sequences: usize,
    /// Quantize a float model's projections at load, or round them to bf16 (`None` keeps the
    /// stored weights).
    pub quantize: Option<crate::model::WeightFormat>,
    /// How block-quantized projections quantize their activations on the CPU: `Int8` multiplies
    /// prompts about twice as fast on CPUs with int8 dot products (VNNI), at a visible cost in
    /// accuracy, as llama.cpp does.
    pub activations: crate::cpu::ActivationCodes,
    /// Seconds since some fixed point; the default is the process's monotonic clock. Browsers pass
    /// `performance.now() / 1000`.
    pub clock: Option<fn() -> f64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            prefill_backend: Backend::Auto,
            decode_backend: Backend::Auto,
            simd: None,
            page_size: 16,
            kv_pool_pages: None,
            kv_memory_bytes: 512 << 20,
            kv_dtype: DType::F16,
            max_batch_tokens: 512,
            max_running: 256,
            tpot_target: None,
            prefix_sharing: true,
            prefix_cache_sequences: 0,
            quantize: None,
            activations: crate::cpu::ActivationCodes::Int16,
            clock: None,
        }
    }
}

/// The default clock: a monotonic one natively; wasm32 has none without the browser's help.
pub(crate) fn default_clock() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_secs_f64()
    }
    #[cfg(target_arch = "wasm32")]
    {
        0.0
    }
}

//! The one error type every public call returns. Bad input is reported, never panicked on.

use crate::dtype::DType;

/// Everything that can go wrong in a twinfer call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TwinferError {
    #[error("{what}: expected {expected} elements, got {got}")]
    ShapeMismatch { what: &'static str, expected: usize, got: usize },

    #[error("{what}: expected dtype {expected}, got {got}")]
    DtypeMismatch { what: &'static str, expected: DType, got: DType },

    #[error("{what}: dtype {dtype} is not supported here")]
    DtypeUnsupported { what: &'static str, dtype: DType },

    #[error("{what}: must start at 0, never decrease and end at {end}; it breaks at position {position}")]
    IndptrInvalid { what: &'static str, position: usize, end: usize },

    #[error("page table entry {position} names page {page}, but the pool has {num_pages} pages")]
    PageIndexOutOfRange { position: usize, page: u32, num_pages: usize },

    #[error("sequence {seq}: last_page_len {value} is outside 1..={page_size} (or the sequence has no pages)")]
    LastPageLenOutOfRange { seq: usize, value: u32, page_size: usize },

    #[error("num_qo_heads {num_qo_heads} is not a positive multiple of num_kv_heads {num_kv_heads}")]
    HeadRatio { num_qo_heads: usize, num_kv_heads: usize },

    #[error("head_dim {head_dim} is not supported: it must be a multiple of 8 in 8..=256")]
    HeadDimUnsupported { head_dim: usize },

    #[error("page_size {page_size} is not supported: it must be in 1..=256")]
    PageSizeUnsupported { page_size: usize },

    #[error("KV page pool exhausted: {needed} pages needed, {free} free; nothing was changed")]
    KvPoolExhausted { needed: usize, free: usize },

    #[error("unknown sequence id {seq}")]
    UnknownSequence { seq: u64 },

    #[error("layer {layer} is out of range: the cache has {num_layers} layers")]
    LayerOutOfRange { layer: usize, num_layers: usize },

    #[error("{path}: {reason}")]
    Io { path: String, reason: String },

    #[error("model file {file}: {reason}")]
    ModelFile { file: String, reason: String },

    #[error("model file {file}, tensor {tensor}: {reason}")]
    ModelTensor { file: String, tensor: String, reason: String },

    #[error("model architecture {model_type:?} is not supported (supported: {supported})")]
    UnsupportedArchitecture { model_type: String, supported: &'static str },

    #[error("tokenizer {file}: {reason}")]
    Tokenizer { file: String, reason: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("request of {tokens} tokens cannot run: {reason}")]
    RequestTooLarge { tokens: usize, reason: String },

    #[error("invalid parameter: {0}")]
    InvalidParameter(String),

    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable { backend: &'static str, reason: String },

    #[error("no usable GPU: {0}")]
    GpuUnavailable(String),

    #[error("{call} would have to wait for the GPU, which a browser's main thread cannot do: use its async twin")]
    WouldBlock { call: &'static str },

    #[error("the GPU device was lost ({0}); the CPU engine can take over")]
    DeviceLost(String),

    #[error("{what}: {requested} exceeds the adapter's limit of {limit}")]
    OverLimit { what: &'static str, requested: u64, limit: u64 },

    #[error("GPU out of memory: {0}")]
    GpuOutOfMemory(String),

    #[error("GPU validation error: {0}")]
    GpuValidation(String),
}

/// Result alias used across the crate.
pub type Result<T, E = TwinferError> = std::result::Result<T, E>;

/// Checks that `len` equals `expected`, naming the tensor in the error.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got { Ok(()) } else { Err(TwinferError::ShapeMismatch { what, expected, got }) }
}

//! The one error type every public call returns. Bad input is reported, never panicked on.

use crate::dtype::DType;

/// Everything that can go wrong in a twinfer call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TwinferError {
    /// A tensor or slice has the wrong number of elements.
    #[error("{what}: expected {expected} elements, got {got}")]
    ShapeMismatch {
        /// Which tensor or argument.
        what: &'static str,
        /// Elements the shapes call for.
        expected: usize,
        /// Elements passed.
        got: usize,
    },

    /// A tensor has a different element type than the call requires.
    #[error("{what}: expected dtype {expected}, got {got}")]
    DtypeMismatch {
        /// Which tensor or argument.
        what: &'static str,
        /// The dtype required.
        expected: DType,
        /// The dtype passed.
        got: DType,
    },

    /// The element type is not supported by this operation or backend.
    #[error("{what}: dtype {dtype} is not supported here")]
    DtypeUnsupported {
        /// The operation or tensor.
        what: &'static str,
        /// The rejected dtype.
        dtype: DType,
    },

    /// An index-pointer (CSR offsets) array does not start at 0, decreases, or ends at the wrong value.
    #[error("{what}: must start at 0, never decrease and end at {end}; it breaks at position {position}")]
    IndptrInvalid {
        /// Which indptr array.
        what: &'static str,
        /// First index where the array breaks the rule.
        position: usize,
        /// The value the last entry must equal.
        end: usize,
    },

    /// A page table names a page beyond the end of the KV page pool.
    #[error("page table entry {position} names page {page}, but the pool has {num_pages} pages")]
    PageIndexOutOfRange {
        /// Index of the offending entry in the page table.
        position: usize,
        /// The page it names.
        page: u32,
        /// Pages in the pool.
        num_pages: usize,
    },

    /// A sequence's `last_page_len` is outside `1..=page_size` (or not 0 for a sequence with no pages).
    #[error("sequence {seq}: last_page_len {value} is outside 1..={page_size} (or the sequence has no pages)")]
    LastPageLenOutOfRange {
        /// Index of the sequence in the batch.
        seq: usize,
        /// The `last_page_len` given.
        value: u32,
        /// Tokens per page.
        page_size: usize,
    },

    /// The query/output head count is not a positive multiple of the KV head count (grouped-query attention).
    #[error("num_qo_heads {num_qo_heads} is not a positive multiple of num_kv_heads {num_kv_heads}")]
    HeadRatio {
        /// Query/output heads.
        num_qo_heads: usize,
        /// Key/value heads.
        num_kv_heads: usize,
    },

    /// The head dimension is not a multiple of 8 in `8..=256`.
    #[error("head_dim {head_dim} is not supported: it must be a multiple of 8 in 8..=256")]
    HeadDimUnsupported {
        /// The rejected head dimension.
        head_dim: usize,
    },

    /// The KV page size is outside `1..=256` tokens.
    #[error("page_size {page_size} is not supported: it must be in 1..=256")]
    PageSizeUnsupported {
        /// The rejected page size.
        page_size: usize,
    },

    /// The KV page pool has too few free pages; the cache is left unchanged.
    #[error("KV page pool exhausted: {needed} pages needed, {free} free; nothing was changed")]
    KvPoolExhausted {
        /// Pages the operation needs.
        needed: usize,
        /// Pages free in the pool.
        free: usize,
    },

    /// No sequence with this id is held by the KV cache.
    #[error("unknown sequence id {seq}")]
    UnknownSequence {
        /// The sequence id.
        seq: u64,
    },

    /// A layer index is not below the cache's layer count.
    #[error("layer {layer} is out of range: the cache has {num_layers} layers")]
    LayerOutOfRange {
        /// The layer asked for.
        layer: usize,
        /// Layers in the cache.
        num_layers: usize,
    },

    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file or folder.
        path: String,
        /// The underlying error.
        reason: String,
    },

    /// A model file (config, weights) is malformed or inconsistent.
    #[error("model file {file}: {reason}")]
    ModelFile {
        /// The model file.
        file: String,
        /// What is wrong with it.
        reason: String,
    },

    /// One tensor of a model file is missing or has the wrong dtype or shape.
    #[error("model file {file}, tensor {tensor}: {reason}")]
    ModelTensor {
        /// The model file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The model's architecture (`model_type`) has no implementation here.
    #[error("model architecture {model_type:?} is not supported (supported: {supported})")]
    UnsupportedArchitecture {
        /// The architecture named by the model config.
        model_type: String,
        /// The architectures that are supported, for the message.
        supported: &'static str,
    },

    /// The tokenizer file could not be loaded, or encoding/decoding failed.
    #[error("tokenizer {file}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        file: String,
        /// What went wrong.
        reason: String,
    },

    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A request or input is empty or can never fit (context length, KV pool), however long it waits.
    #[error("request of {tokens} tokens cannot run: {reason}")]
    RequestTooLarge {
        /// Tokens the request needs.
        tokens: usize,
        /// The limit it exceeds.
        reason: String,
    },

    /// An argument or configuration value is out of its valid range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),

    /// The requested backend cannot be used on this machine or build.
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend name.
        backend: &'static str,
        /// Why it is unavailable.
        reason: String,
    },

    /// No GPU adapter or device could be obtained.
    #[error("no usable GPU: {0}")]
    GpuUnavailable(String),

    /// A blocking call was made where waiting is impossible (a browser's main thread); call the
    /// `_async` variant instead.
    #[error("{call} would have to wait for the GPU, which a browser's main thread cannot do: use its async twin")]
    WouldBlock {
        /// The blocking call that was made.
        call: &'static str,
    },

    /// The GPU device was lost; the CPU engine can take over.
    #[error("the GPU device was lost ({0}); the CPU engine can take over")]
    DeviceLost(String),

    /// A buffer or dispatch exceeds a limit of the GPU adapter.
    #[error("{what}: {requested} exceeds the adapter's limit of {limit}")]
    OverLimit {
        /// What is too large.
        what: &'static str,
        /// The size or count requested.
        requested: u64,
        /// The adapter's limit.
        limit: u64,
    },

    /// A GPU allocation failed for lack of memory.
    #[error("GPU out of memory: {0}")]
    GpuOutOfMemory(String),

    /// wgpu reported a validation error.
    #[error("GPU validation error: {0}")]
    GpuValidation(String),
}

/// Result alias used across the crate.
pub type Result<T, E = TwinferError> = std::result::Result<T, E>;

/// Checks that `len` equals `expected`, naming the tensor in the error.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got { Ok(()) } else { Err(TwinferError::ShapeMismatch { what, expected, got }) }
}

//! Uniform structs shared with the WGSL kernels: one `#[repr(C)]` definition per WGSL struct.
//! A test parses the shaders with naga and checks that every member has the same offset.

use bytemuck::{Pod, Zeroable};

/// WGSL `AttnParams` (online_softmax.wgsl): the prefill and decode call.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct AttnParams {
    /// Query/output heads.
    pub num_qo_heads: u32,
    /// Key/value heads.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Query heads per KV head (`num_qo_heads / num_kv_heads`).
    pub group: u32,
    /// Tokens per KV page (paged KV).
    pub page_size: u32,
    /// Sequences in the batch.
    pub batch: u32,
    /// 1 for the causal mask, 0 for none.
    pub causal: u32,
    /// `NO_WINDOW` (u32::MAX) for none.
    pub window_left: u32,
    /// Softmax scale applied to `q . k`.
    pub sm_scale: f32,
    /// 0 for none.
    pub soft_cap: f32,
    /// 1 when ALiBi slopes are at `off_alibi`.
    pub has_alibi: u32,
    /// 1: K/V are the page pool; 0: ragged contiguous rows.
    pub paged: u32,
    /// Decode: split-K chunks per sequence.
    pub num_chunks: u32,
    /// Decode: keys per split-K chunk.
    pub chunk_len: u32,
    /// Word offset of the page ids in the index buffer.
    pub off_indices: u32,
    /// Word offset of `last_page_len` in the index buffer.
    pub off_last_len: u32,
    /// Word offset of `qo_indptr` in the index buffer (prefill).
    pub off_qo_indptr: u32,
    /// Word offset of the ALiBi slopes (as f32 bits) in the index buffer.
    pub off_alibi: u32,
    /// Word offset of the prefill work list, `(sequence, first row)` pairs, in the index buffer.
    pub off_work: u32,
    /// Prefill: work items in the list at `off_work`.
    pub num_work: u32,
    /// Decode: the pool buffer this pass reads.
    pub kv_buffer: u32,
    /// Pages per pool buffer (`u32::MAX` for an unsplit pool).
    pub pages_per_buffer: u32,
    /// An int8 pool: the word of each buffer where the codes start (the scales come first); 0
    /// for float pools.
    pub kv_codes_at: u32,
    /// Padding to the WGSL struct's size.
    pub _pad1: u32,
}

/// WGSL `MergeParams` (merge_state.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct MergeParams {
    /// Output rows: `batch * num_heads`.
    pub rows: u32,
    /// Heads per sequence.
    pub num_heads: u32,
    /// Partial states per row to merge.
    pub num_chunks: u32,
    /// Elements per head.
    pub head_dim: u32,
}

/// WGSL `AppendParams` (append_kv.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct AppendParams {
    /// New token rows to write.
    pub rows: u32,
    /// Key/value heads per row.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Tokens per KV page.
    pub page_size: u32,
    /// As [`AttnParams::kv_codes_at`].
    pub kv_codes_at: u32,
    /// Padding to the WGSL struct's size.
    pub _pad0: u32,
    /// Padding to the WGSL struct's size.
    pub _pad1: u32,
    /// Padding to the WGSL struct's size.
    pub _pad2: u32,
}

/// [`LinearParams::act`]: the input as it is.
pub const ACT_NONE: u32 = 0;
/// [`LinearParams::act`]: SwiGLU of `[gate | up]` rows.
pub const ACT_SWIGLU: u32 = 1;
/// [`LinearParams::act`]: the exact GELU.
pub const ACT_GELU: u32 = 2;

/// WGSL `LinearParams` (linear_gemv.wgsl, linear_matmul.wgsl): one weight buffer of a projection.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct LinearParams {
    /// Input rows (tokens).
    pub rows: u32,
    /// Features in this weight buffer.
    pub n: u32,
    /// vec4s per row of x and W (k padded with zeros).
    pub k4: u32,
    /// First feature of this buffer among the layer's.
    pub n0: u32,
    /// Row stride of y: all of the layer's features.
    pub ldy: u32,
    /// 1: add the product to y (a residual add in the epilogue); 0: overwrite y.
    pub accumulate: u32,
    /// 1: RMSNorm the x rows on load with the weights of binding 5 and `eps`.
    pub norm: u32,
    /// RMSNorm epsilon (with `norm`).
    pub eps: f32,
    /// What the input is: [`ACT_NONE`] x; [`ACT_SWIGLU`] x rows are `[gate | up]` (2 k4
    /// vec4s) and the input is silu(gate) * up; [`ACT_GELU`] the exact GELU of x.
    pub act: u32,
    /// Block-quantized weights: log2 of the vec4s of a row that share one scale.
    pub group_shift: u32,
    /// Block-quantized weights: the word where the scales start in the weight buffer.
    pub scales_at: u32,
    /// Padding to the WGSL struct's size.
    pub _pad0: u32,
}

/// WGSL `RowParams` (rms_norm.wgsl): a per-row operation.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct RowParams {
    /// Rows to process.
    pub rows: u32,
    /// Elements per row.
    pub width: u32,
    /// Norm epsilon.
    pub eps: f32,
    /// rms_norm: 1 when output row `r` reads input row `rows_map[r]`.
    pub gather: u32,
}

/// WGSL `TopkParams` (topk_rows.wgsl): top-k of `rows` rows of `width` logits.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct TopkParams {
    /// Rows of logits.
    pub rows: u32,
    /// Logits per row (the vocabulary).
    pub width: u32,
    /// Candidates per row, at most `width`.
    pub k: u32,
    /// Padding to 16 bytes.
    pub _pad0: u32,
}

/// WGSL `RopeParams` (rope_append.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct RopeParams {
    /// Token rows of the fused q/k/v projection.
    pub rows: u32,
    /// Query heads.
    pub num_qo_heads: u32,
    /// Key/value heads.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Tokens per KV page.
    pub page_size: u32,
    /// vec4s per row of the fused q/k/v projection.
    pub q_width: u32,
    /// 1: q and k are copied unrotated (an encoder with learned positions, such as BERT).
    pub no_rotation: u32,
    /// As [`AttnParams::kv_codes_at`].
    pub kv_codes_at: u32,
}

/// The window value that means "no sliding window".
pub const NO_WINDOW: u32 = u32::MAX;

/// A struct's WGSL name, Rust size and Rust member offsets by name.
pub type Layout = (&'static str, usize, Vec<(&'static str, usize)>);

/// Every mirrored struct, for the layout test.
pub fn layouts() -> Vec<Layout> {
    macro_rules! offsets {
        ($t:ty, $name:literal, [$($f:ident),*]) => {
            ($name, std::mem::size_of::<$t>(), vec![$((stringify!($f), std::mem::offset_of!($t, $f))),*])
        };
    }
    vec![
        offsets!(
            AttnParams,
            "AttnParams",
            [
                num_qo_heads,
                num_kv_heads,
                head_dim,
                group,
                page_size,
                batch,
                causal,
                window_left,
                sm_scale,
                soft_cap,
                has_alibi,
                paged,
                num_chunks,
                chunk_len,
                off_indices,
                off_last_len,
                off_qo_indptr,
                off_alibi,
                off_work,
                num_work,
                kv_buffer,
                pages_per_buffer,
                kv_codes_at,
                _pad1
            ]
        ),
        offsets!(MergeParams, "MergeParams", [rows, num_heads, num_chunks, head_dim]),
        offsets!(
            AppendParams,
            "AppendParams",
            [rows, num_kv_heads, head_dim, page_size, kv_codes_at, _pad0, _pad1, _pad2]
        ),
        offsets!(
            LinearParams,
            "LinearParams",
            [rows, n, k4, n0, ldy, accumulate, norm, eps, act, group_shift, scales_at, _pad0]
        ),
        offsets!(RowParams, "RowParams", [rows, width, eps, gather]),
        offsets!(TopkParams, "TopkParams", [rows, width, k, _pad0]),
        offsets!(
            RopeParams,
            "RopeParams",
            [rows, num_qo_heads, num_kv_heads, head_dim, page_size, q_width, no_rotation, kv_codes_at]
        ),
    ]
}

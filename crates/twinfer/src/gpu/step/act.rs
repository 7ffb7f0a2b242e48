//! The pooled buffers a resident step records into.

/// The pooled buffers of a resident step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Act {
    /// The residual stream `[tokens, hidden]`.
    X,
    /// The fused q/k/v projection `[tokens, q_dim + 2 kv_dim]`.
    Qkv,
    /// Rotated queries `[tokens, heads, head_dim]`.
    Q,
    /// Attention output `[tokens, heads, head_dim]`.
    Attn,
    /// The fused gate/up projection `[tokens, 2 intermediate]`.
    GateUp,
    /// A projection's input rows split in two f16 parts for the tensor cores
    /// (`linear_split_f16.wgsl`); reused by every projection of the step.
    XSplit,
    /// The final norm of the rows that get logits `[rows, hidden]`.
    Sel,
    /// Logits `[rows, vocab]`: read back when a row is sampled on the host.
    Logits,
    /// Greedy token ids `[rows]` (u32): read back instead when every row is greedy.
    Tokens,
    /// A mixed step's prompt rows: their queries, outputs and LSE, from row 0.
    QPre,
    /// A mixed step's prompt rows: their attention outputs.
    OPre,
    /// A mixed step's prompt rows: their LSEs.
    LsePre,
    /// Per token: position, page, slot in page.
    Rows,
    /// The token rows that get logits.
    SelRows,
    /// One KV page, for copy-on-write copies inside a pool.
    PageScratch,
    /// Uniform: the decode attention's [`AttnParams`](crate::gpu::params::AttnParams).
    DecParams,
    /// Uniform: the split-K merge's [`MergeParams`](crate::gpu::params::MergeParams).
    MergeParams,
    /// Uniform: the prefill attention's [`AttnParams`](crate::gpu::params::AttnParams).
    PreParams,
    /// Uniform: the [`RowParams`](crate::gpu::params::RowParams) of the un-gathered RMSNorm and of LayerNorm.
    NormParams,
    /// Uniform: the [`RowParams`](crate::gpu::params::RowParams) of the gathered RMSNorm (the rows that get logits).
    FinalNormParams,
    /// Uniform: the greedy argmax's [`RowParams`](crate::gpu::params::RowParams).
    ArgmaxParams,
    /// Uniform: the RoPE/append pass's [`RopeParams`](crate::gpu::params::RopeParams).
    RopeParams,
    /// The decode page table and index words (`u32`).
    DecMeta,
    /// The prefill page table, `qo_indptr` and work list (`u32`).
    PreMeta,
    /// Top-k candidates `[rows, k]` of (token id, logit bits): read back when the sampled rows
    /// sample with top-k.
    TopK,
    /// Uniform: the top-k pass's [`TopkParams`](crate::gpu::params::TopkParams).
    TopkParams,
}

impl Act {
    pub(in crate::gpu) fn is_uniform(self) -> bool {
        matches!(
            self,
            Act::DecParams
                | Act::MergeParams
                | Act::PreParams
                | Act::NormParams
                | Act::FinalNormParams
                | Act::ArgmaxParams
                | Act::RopeParams
                | Act::TopkParams
        )
    }

    pub(in crate::gpu) fn name(self) -> &'static str {
        match self {
            Act::X => "residual stream",
            Act::Qkv => "q/k/v projection",
            Act::Q => "rotated queries",
            Act::Attn => "attention output",
            Act::GateUp => "gate/up projection",
            Act::XSplit => "split projection input",
            Act::Sel => "rows for logits",
            Act::Logits => "logits",
            Act::Tokens => "greedy token ids",
            Act::QPre => "prompt queries",
            Act::OPre => "prompt attention output",
            Act::LsePre => "prompt lse",
            Act::Rows => "row positions and slots",
            Act::SelRows => "rows that get logits",
            Act::PageScratch => "page copy scratch",
            Act::DecParams => "decode params",
            Act::MergeParams => "merge params",
            Act::PreParams => "prefill params",
            Act::NormParams => "norm params",
            Act::FinalNormParams => "final norm params",
            Act::ArgmaxParams => "argmax params",
            Act::RopeParams => "rope params",
            Act::DecMeta => "decode page table",
            Act::PreMeta => "prefill page table",
            Act::TopK => "top-k candidates",
            Act::TopkParams => "top-k params",
        }
    }
}

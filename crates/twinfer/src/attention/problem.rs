//! Call inputs, and their validation into a [`Problem`] that every backend and the oracle share.

use crate::attention::AttentionParams;
use crate::dtype::{TensorMut, TensorRef};
use crate::error::{Result, TwinferError, check_len};
use crate::kv::{PageTable, PagedKv, check_indptr};

/// Where the keys and values of a prefill come from.
#[derive(Debug, Clone, Copy)]
pub enum KvInput<'a> {
    /// Ragged contiguous KV: `k`, `v` are `[kv_indptr[batch], num_kv_heads, head_dim]`.
    Ragged {
        /// Keys, `[kv_indptr[batch], num_kv_heads, head_dim]`.
        k: TensorRef<'a>,
        /// Values, same shape and dtype as `k`.
        v: TensorRef<'a>,
        /// CSR offsets of each sequence's KV rows, `[batch + 1]`.
        kv_indptr: &'a [u32],
    },
    /// The paged cache (append / chunked prefill). The table covers the new tokens too.
    Paged {
        /// The paged KV pool.
        kv: PagedKv<'a>,
        /// Each sequence's pages in the pool.
        table: PageTable<'a>,
    },
}

/// A ragged batch of queries: `q` is `[qo_indptr[batch], num_qo_heads, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct PrefillInput<'a> {
    /// Queries, `[qo_indptr[batch], num_qo_heads, head_dim]`.
    pub q: TensorRef<'a>,
    /// CSR offsets of each sequence's query rows, `[batch + 1]`.
    pub qo_indptr: &'a [u32],
    /// The keys and values the queries attend to.
    pub kv: KvInput<'a>,
}

/// One query token per sequence: `q` is `[batch, num_qo_heads, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct DecodeInput<'a> {
    /// Queries, one row per sequence: `[batch, num_qo_heads, head_dim]`.
    pub q: TensorRef<'a>,
    /// The paged KV pool.
    pub kv: PagedKv<'a>,
    /// Each sequence's pages in the pool.
    pub table: PageTable<'a>,
}

/// Where results go: `o` is `[rows, num_qo_heads, head_dim]`, `lse` (natural log) `[rows, num_qo_heads]`.
#[derive(Debug)]
pub struct AttentionOutput<'a> {
    /// Outputs, `[rows, num_qo_heads, head_dim]`.
    pub o: TensorMut<'a>,
    /// Optional log-sum-exp per row and head, `[rows, num_qo_heads]`; needed to merge partial states.
    pub lse: Option<&'a mut [f32]>,
}

impl<'a> AttentionOutput<'a> {
    /// An output that writes `o` only.
    pub fn new(o: impl Into<TensorMut<'a>>) -> Self {
        Self { o: o.into(), lse: None }
    }
    /// An output that writes `o` and the log-sum-exp of each row and head into `lse`.
    pub fn with_lse(o: impl Into<TensorMut<'a>>, lse: &'a mut [f32]) -> Self {
        Self { o: o.into(), lse: Some(lse) }
    }
}

/// Query rows of each sequence.
#[derive(Debug, Clone, Copy)]
pub(crate) enum QoRows<'a> {
    Ragged(&'a [u32]),
    /// Decode: row `b` belongs to sequence `b`.
    OnePerSeq,
}

impl QoRows<'_> {
    #[inline(always)]
    pub fn range(&self, b: usize) -> (usize, usize) {
        match self {
            QoRows::Ragged(p) => (p[b] as usize, p[b + 1] as usize),
            QoRows::OnePerSeq => (b, b + 1),
        }
    }
}

/// Validated KV source with per-row addressing.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KvSource<'a> {
    Ragged { k: TensorRef<'a>, v: TensorRef<'a>, indptr: &'a [u32], row_stride: usize, head_dim: usize },
    Paged { kv: PagedKv<'a>, table: PageTable<'a> },
}

impl<'a> KvSource<'a> {
    pub fn k(&self) -> TensorRef<'a> {
        match self {
            KvSource::Ragged { k, .. } => *k,
            KvSource::Paged { kv, .. } => kv.k,
        }
    }
    pub fn v(&self) -> TensorRef<'a> {
        match self {
            KvSource::Ragged { v, .. } => *v,
            KvSource::Paged { kv, .. } => kv.v,
        }
    }
    #[inline(always)]
    pub fn kv_len(&self, b: usize) -> usize {
        match self {
            KvSource::Ragged { indptr, .. } => (indptr[b + 1] - indptr[b]) as usize,
            KvSource::Paged { kv, table } => table.kv_len(b, kv.layout.page_size),
        }
    }
    /// Flat offset of key/value row `j` of sequence `b`, KV head `h`.
    #[inline(always)]
    pub fn row_offset(&self, b: usize, j: usize, h: usize) -> usize {
        match self {
            KvSource::Ragged { indptr, row_stride, head_dim, .. } => {
                (indptr[b] as usize + j) * row_stride + h * head_dim
            }
            KvSource::Paged { kv, table } => {
                let ps = kv.layout.page_size;
                let page = table.pages(b)[j / ps] as usize;
                kv.layout.offset(page, j % ps, h)
            }
        }
    }
}

/// A validated attention problem: every index the kernels compute is in bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Problem<'a> {
    pub params: &'a AttentionParams,
    pub q: TensorRef<'a>,
    pub qo: QoRows<'a>,
    pub kv: KvSource<'a>,
    pub batch: usize,
    pub total_q: usize,
}

impl<'a> Problem<'a> {
    pub fn qo_len(&self, b: usize) -> usize {
        let (s, e) = self.qo.range(b);
        e - s
    }

    pub fn prefill(params: &'a AttentionParams, input: &PrefillInput<'a>) -> Result<Self> {
        params.validate()?;
        let row = params.num_qo_heads * params.head_dim;
        if !input.q.len().is_multiple_of(row) {
            return Err(TwinferError::ShapeMismatch {
                what: "q ([tokens, num_qo_heads, head_dim])",
                expected: (input.q.len() / row + 1) * row,
                got: input.q.len(),
            });
        }
        let total_q = input.q.len() / row;
        check_indptr("qo_indptr", input.qo_indptr, total_q)?;
        let batch = input.qo_indptr.len() - 1;
        let kv = match input.kv {
            KvInput::Ragged { k, v, kv_indptr } => {
                if k.dtype() != v.dtype() {
                    return Err(TwinferError::DtypeMismatch { what: "v", expected: k.dtype(), got: v.dtype() });
                }
                check_len("kv_indptr (batch + 1)", batch + 1, kv_indptr.len())?;
                let kv_row = params.num_kv_heads * params.head_dim;
                let total_kv = *kv_indptr.last().unwrap_or(&0) as usize;
                check_indptr("kv_indptr", kv_indptr, total_kv)?;
                // Saturating: an indptr that promises more rows than memory holds is a mismatch.
                let kv_elems = total_kv.saturating_mul(kv_row);
                check_len("k ([kv_tokens, num_kv_heads, head_dim])", kv_elems, k.len())?;
                check_len("v ([kv_tokens, num_kv_heads, head_dim])", kv_elems, v.len())?;
                KvSource::Ragged { k, v, indptr: kv_indptr, row_stride: kv_row, head_dim: params.head_dim }
            }
            KvInput::Paged { kv, table } => {
                check_paged(params, &kv, &table)?;
                check_len("kv_indptr (batch + 1)", batch + 1, table.indptr.len())?;
                KvSource::Paged { kv, table }
            }
        };
        Ok(Self { params, q: input.q, qo: QoRows::Ragged(input.qo_indptr), kv, batch, total_q })
    }

    pub fn decode(params: &'a AttentionParams, input: &DecodeInput<'a>) -> Result<Self> {
        params.validate()?;
        check_paged(params, &input.kv, &input.table)?;
        let batch = input.table.batch_size();
        let q_elems = batch.saturating_mul(params.num_qo_heads * params.head_dim);
        check_len("q ([batch, num_qo_heads, head_dim])", q_elems, input.q.len())?;
        Ok(Self {
            params,
            q: input.q,
            qo: QoRows::OnePerSeq,
            kv: KvSource::Paged { kv: input.kv, table: input.table },
            batch,
            total_q: batch,
        })
    }

    /// Checks the output buffers against the problem.
    pub fn check_output(&self, out: &AttentionOutput<'_>) -> Result<()> {
        let rows = self.total_q * self.params.num_qo_heads;
        check_len("o ([tokens, num_qo_heads, head_dim])", rows * self.params.head_dim, out.o.len())?;
        if let Some(lse) = &out.lse {
            check_len("lse ([tokens, num_qo_heads])", rows, lse.len())?;
        }
        Ok(())
    }
}

fn check_paged(params: &AttentionParams, kv: &PagedKv<'_>, table: &PageTable<'_>) -> Result<()> {
    if kv.layout.num_kv_heads != params.num_kv_heads {
        return Err(TwinferError::ShapeMismatch {
            what: "paged KV num_kv_heads",
            expected: params.num_kv_heads,
            got: kv.layout.num_kv_heads,
        });
    }
    check_len("paged KV head_dim", params.head_dim, kv.layout.head_dim)?;
    // The view's fields are public: a hand-built one (page_size 0, K and V of different lengths)
    // gets the checks of `PagedKv::new` here, before the kernels index it.
    let kv = PagedKv::new(kv.k, kv.v, kv.layout)?;
    table.validate(kv.layout.page_size, kv.num_pages())
}

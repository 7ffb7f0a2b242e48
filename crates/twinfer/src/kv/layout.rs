//! Page layout, CSR page tables and the read-only paged-KV view the kernels consume.
//!
//! Layout is NHD, as in FlashInfer: K and V are each `[num_pages, page_size, num_kv_heads, head_dim]`.
//! A sequence of length `L` owns `ceil(L / page_size)` pages; all but the last are full and the
//! last holds `last_page_len` rows (1..=page_size).

use crate::dtype::{DType, TensorRef};
use crate::error::{Result, TwinferError};

/// Largest supported page size.
pub const MAX_PAGE_SIZE: usize = 256;
/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 256;

/// Shape of one page: `[page_size, num_kv_heads, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// Tokens per page, in `1..=MAX_PAGE_SIZE`.
    pub page_size: usize,
    /// Key/value heads stored per token.
    pub num_kv_heads: usize,
    /// Elements per head: a multiple of 8 in `8..=MAX_HEAD_DIM`.
    pub head_dim: usize,
}

impl KvLayout {
    /// Validates the page size and head dimension.
    pub fn new(page_size: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self> {
        if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(TwinferError::PageSizeUnsupported { page_size });
        }
        check_head_dim(head_dim)?;
        if num_kv_heads == 0 {
            return Err(TwinferError::InvalidParameter("num_kv_heads must be at least 1".into()));
        }
        if page_size.checked_mul(num_kv_heads).and_then(|n| n.checked_mul(head_dim)).is_none() {
            return Err(TwinferError::InvalidParameter(format!(
                "a page of {page_size} x {num_kv_heads} heads x {head_dim} overflows the address space"
            )));
        }
        Ok(Self { page_size, num_kv_heads, head_dim })
    }
    /// Elements in one token row of one page: `num_kv_heads * head_dim`.
    pub fn row_elems(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Elements in one page (of K, or of V).
    pub fn page_elems(&self) -> usize {
        self.page_size * self.row_elems()
    }
    /// Bytes of one page (of K, or of V) stored as `dtype`: Q8 adds an f32 scale per row of a head.
    pub fn page_bytes(&self, dtype: DType) -> usize {
        let scales = if dtype == DType::Q8 { self.page_size * self.num_kv_heads * 4 } else { 0 };
        self.page_elems() * dtype.size() + scales
    }
    /// Flat offset of `(page, slot, head, 0)`.
    #[inline(always)]
    pub fn offset(&self, page: usize, slot: usize, head: usize) -> usize {
        ((page * self.page_size + slot) * self.num_kv_heads + head) * self.head_dim
    }
}

/// Head dims must be a multiple of 8 up to 256 (the GPU kernels vectorise by 4 and 8).
pub fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
        return Err(TwinferError::HeadDimUnsupported { head_dim });
    }
    Ok(())
}

/// Checks a CSR offsets array: starts at 0, never decreases, ends at `end`.
pub fn check_indptr(what: &'static str, indptr: &[u32], end: usize) -> Result<()> {
    if indptr.is_empty() {
        return Err(TwinferError::IndptrInvalid { what, position: 0, end });
    }
    if indptr[0] != 0 {
        return Err(TwinferError::IndptrInvalid { what, position: 0, end });
    }
    for i in 1..indptr.len() {
        if indptr[i] < indptr[i - 1] {
            return Err(TwinferError::IndptrInvalid { what, position: i, end });
        }
    }
    if *indptr.last().unwrap() as usize != end {
        return Err(TwinferError::IndptrInvalid { what, position: indptr.len() - 1, end });
    }
    Ok(())
}

/// A borrowed CSR page table for a batch of sequences (FlashInfer's `kv_indptr`, `kv_indices`,
/// `kv_last_page_len`).
#[derive(Debug, Clone, Copy)]
pub struct PageTable<'a> {
    /// `[batch + 1]`: sequence `b` owns `indices[indptr[b]..indptr[b + 1]]`.
    pub indptr: &'a [u32],
    /// Page ids, in token order per sequence.
    pub indices: &'a [u32],
    /// `[batch]`: rows used in each sequence's last page, 1..=page_size (0 only for a sequence with no pages).
    pub last_page_len: &'a [u32],
}

impl<'a> PageTable<'a> {
    /// Wraps the three arrays without checking them; see [`validate`](Self::validate).
    pub fn new(indptr: &'a [u32], indices: &'a [u32], last_page_len: &'a [u32]) -> Self {
        Self { indptr, indices, last_page_len }
    }
    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    /// Pages of sequence `b`.
    #[inline(always)]
    pub fn pages(&self, b: usize) -> &'a [u32] {
        &self.indices[self.indptr[b] as usize..self.indptr[b + 1] as usize]
    }
    /// Tokens held by sequence `b` (the table must be validated).
    #[inline(always)]
    pub fn kv_len(&self, b: usize, page_size: usize) -> usize {
        let n = self.pages(b).len();
        if n == 0 { 0 } else { (n - 1) * page_size + self.last_page_len[b] as usize }
    }
    /// Checks every invariant the kernels rely on, so that they can index without checks failing.
    pub fn validate(&self, page_size: usize, num_pages: usize) -> Result<()> {
        if self.indptr.is_empty() {
            return Err(TwinferError::IndptrInvalid { what: "kv_indptr", position: 0, end: self.indices.len() });
        }
        check_indptr("kv_indptr", self.indptr, self.indices.len())?;
        let batch = self.batch_size();
        if self.last_page_len.len() != batch {
            return Err(TwinferError::ShapeMismatch {
                what: "kv_last_page_len",
                expected: batch,
                got: self.last_page_len.len(),
            });
        }
        for (position, &page) in self.indices.iter().enumerate() {
            if page as usize >= num_pages {
                return Err(TwinferError::PageIndexOutOfRange { position, page, num_pages });
            }
        }
        for b in 0..batch {
            let value = self.last_page_len[b];
            let has_pages = !self.pages(b).is_empty();
            let ok = if has_pages { (1..=page_size as u32).contains(&value) } else { value == 0 };
            if !ok {
                return Err(TwinferError::LastPageLenOutOfRange { seq: b, value, page_size });
            }
        }
        Ok(())
    }
}

/// An owned page table, as built by [`crate::kv::PagedKvCache::page_table`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageTableBuf {
    /// `[batch + 1]`: sequence `b` owns `indices[indptr[b]..indptr[b + 1]]`.
    pub indptr: Vec<u32>,
    /// Page ids, in token order per sequence.
    pub indices: Vec<u32>,
    /// `[batch]`: rows used in each sequence's last page.
    pub last_page_len: Vec<u32>,
}

impl PageTableBuf {
    /// Borrows the arrays as a [`PageTable`].
    pub fn as_table(&self) -> PageTable<'_> {
        PageTable { indptr: &self.indptr, indices: &self.indices, last_page_len: &self.last_page_len }
    }
}

/// Q8 K/V keep one scale per row of a head: the view's group must be `head_dim` (other dtypes
/// pass).
pub(crate) fn check_q8_rows(what: &'static str, t: TensorRef<'_>, head_dim: usize) -> Result<()> {
    if let TensorRef::Q8(q) = t {
        if q.group != head_dim {
            return Err(TwinferError::ShapeMismatch {
                what: "Q8 K/V scale group (head_dim)",
                expected: head_dim,
                got: q.group,
            });
        }
        crate::error::check_len(what, q.codes.len() / head_dim, q.scales.len())?;
    }
    Ok(())
}

/// A read-only view of one layer's page pool.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    /// `[num_pages, page_size, num_kv_heads, head_dim]`
    pub k: TensorRef<'a>,
    /// `[num_pages, page_size, num_kv_heads, head_dim]`
    pub v: TensorRef<'a>,
    /// Shape of one page; K and V hold a whole number of pages.
    pub layout: KvLayout,
}

impl<'a> PagedKv<'a> {
    /// Wraps caller-owned pools; the layout must be valid, their length a whole number of pages
    /// and K and V must agree.
    pub fn new(k: TensorRef<'a>, v: TensorRef<'a>, layout: KvLayout) -> Result<Self> {
        // The layout's fields are public, so a hand-built one (page_size 0, say) is re-checked.
        let layout = KvLayout::new(layout.page_size, layout.num_kv_heads, layout.head_dim)?;
        if k.dtype() != v.dtype() {
            return Err(TwinferError::DtypeMismatch { what: "paged V", expected: k.dtype(), got: v.dtype() });
        }
        let page = layout.page_elems();
        if !k.len().is_multiple_of(page) {
            return Err(TwinferError::ShapeMismatch {
                what: "paged K (a whole number of pages)",
                expected: (k.len() / page + 1) * page,
                got: k.len(),
            });
        }
        crate::error::check_len("paged V", k.len(), v.len())?;
        check_q8_rows("paged K", k, layout.head_dim)?;
        check_q8_rows("paged V", v, layout.head_dim)?;
        Ok(Self { k, v, layout })
    }
    /// Pages in the pool.
    pub fn num_pages(&self) -> usize {
        self.k.len() / self.layout.page_elems()
    }
    /// Element type of K and V.
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }
}

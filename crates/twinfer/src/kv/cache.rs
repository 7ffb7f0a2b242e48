//! `PagedKvCache`: owned per-layer page pools, one page allocator and the sequences' page lists.
//!
//! The protocol per step is vLLM's: `reserve` the new tokens of a batch (allocating pages and
//! un-sharing a forked sequence's partly filled last page), `append` their K/V rows layer by
//! layer, and hand `page_table` plus `layer` to the attention kernels.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use crate::dtype::{DType, TensorRef};
use crate::error::{Result, TwinferError, check_len};
use crate::kv::append::{check_append, write_append};
use crate::kv::layout::{KvLayout, PageTable, PageTableBuf, PagedKv};
use crate::kv::pool::PageAllocator;
use crate::kv::storage::Storage;

/// Shape and size of a [`PagedKvCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvCacheConfig {
    /// Transformer layers, each with its own K and V pools.
    pub num_layers: usize,
    /// Pages per layer; a page id names the same page in every layer.
    pub num_pages: usize,
    /// Shape of one page.
    pub layout: KvLayout,
    /// Element type of the pools.
    pub dtype: DType,
}

/// A sequence handle. Ids are never reused, so a stale handle is reported as unknown rather than
/// silently naming a newer sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A sequence's pages in token order and its length in tokens (reserved, not necessarily written).
#[derive(Debug, Clone, Default)]
struct Sequence {
    pages: Vec<u32>,
    len: usize,
}

#[derive(Debug)]
struct LayerPool {
    k: Storage,
    v: Storage,
}

/// A paged KV cache that owns its storage: `num_layers` K and V pools of
/// `[num_pages, page_size, num_kv_heads, head_dim]` each, NHD.
#[derive(Debug)]
pub struct PagedKvCache {
    config: KvCacheConfig,
    allocator: PageAllocator,
    layers: Vec<LayerPool>,
    /// Ordered so that `sequences()` and everything derived from it are deterministic.
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: u64,
    /// Copy-on-write copies made since the last [`PagedKvCache::take_page_copies`], kept only
    /// while a device mirror of the pool asks for them.
    copies: Option<Vec<PageCopy>>,
}

/// A copy-on-write copy: the first `rows` rows of page `src` went to page `dst`, in every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCopy {
    /// Page copied from.
    pub src: u32,
    /// Page copied to.
    pub dst: u32,
    /// Leading token rows copied.
    pub rows: usize,
}

impl PagedKvCache {
    /// Allocates zeroed pools for every layer.
    pub fn new(config: KvCacheConfig) -> Result<Self> {
        let l = config.layout;
        let layout = KvLayout::new(l.page_size, l.num_kv_heads, l.head_dim)?;
        if config.num_layers == 0 {
            return Err(TwinferError::InvalidParameter("KV cache: num_layers must be at least 1".into()));
        }
        if config.num_pages == 0 {
            return Err(TwinferError::InvalidParameter("KV cache: num_pages must be at least 1".into()));
        }
        let num_pages = u32::try_from(config.num_pages).map_err(|_| {
            TwinferError::InvalidParameter(format!("KV cache: {} pages do not fit u32 page ids", config.num_pages))
        })?;
        let elems = config.num_pages.checked_mul(layout.page_elems()).ok_or_else(|| {
            TwinferError::InvalidParameter(format!("KV cache: {} pages overflow the address space", config.num_pages))
        })?;
        let layers = (0..config.num_layers)
            .map(|_| {
                Ok(LayerPool {
                    k: Storage::zeros(config.dtype, elems, layout.head_dim)?,
                    v: Storage::zeros(config.dtype, elems, layout.head_dim)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: KvCacheConfig { layout, ..config },
            allocator: PageAllocator::new(num_pages),
            layers,
            seqs: BTreeMap::new(),
            next_id: 0,
            copies: None,
        })
    }

    /// The configuration, with its layout validated.
    pub fn config(&self) -> KvCacheConfig {
        self.config
    }
    /// Layers in the cache.
    pub fn num_layers(&self) -> usize {
        self.config.num_layers
    }
    /// Pages per layer.
    pub fn num_pages(&self) -> usize {
        self.config.num_pages
    }
    /// Shape of one page.
    pub fn layout(&self) -> KvLayout {
        self.config.layout
    }
    /// Element type of the pools.
    pub fn dtype(&self) -> DType {
        self.config.dtype
    }
    /// Pages no sequence holds.
    pub fn free_pages(&self) -> usize {
        self.allocator.free_pages()
    }
    /// The page allocator, read-only (reference counts, for schedulers and tests).
    pub fn allocator(&self) -> &PageAllocator {
        &self.allocator
    }

    /// Checks the bookkeeping: each sequence holds exactly the pages its length needs, none twice,
    /// and the allocator's counts and free list agree with the page tables
    /// ([`PageAllocator::audit`]). For stress tests and debugging; one pass over every table.
    pub fn audit(&self) -> std::result::Result<(), String> {
        let page_size = self.config.layout.page_size;
        let mut holders = vec![0u32; self.config.num_pages];
        for (id, s) in &self.seqs {
            if s.pages.len() != s.len.div_ceil(page_size) {
                return Err(format!("sequence {id}: {} tokens in {} pages of {page_size}", s.len, s.pages.len()));
            }
            let mut seen = HashSet::with_capacity(s.pages.len());
            for &page in &s.pages {
                if !seen.insert(page) {
                    return Err(format!("sequence {id} names page {page} twice"));
                }
                *holders
                    .get_mut(page as usize)
                    .ok_or_else(|| format!("sequence {id} names page {page}, outside the pool"))? += 1;
            }
        }
        self.allocator.audit(&holders)
    }

    /// Live sequences, in id order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    /// Tokens reserved for `seq`.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.seq(seq)?.len)
    }

    /// Starts an empty sequence (no pages).
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, Sequence::default());
        id
    }

    /// Starts a sequence that shares all of `parent`'s pages and has its length. Nothing is copied
    /// now; a shared, partly filled last page is copied when either side grows into it.
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        let len = self.seq(parent)?.len;
        self.fork_prefix(parent, len)
    }

    /// Starts a sequence that shares the first `len` tokens of `parent` (a common prompt prefix):
    /// the pages holding them are shared, and a partly covered last page is copied on first write.
    pub fn fork_prefix(&mut self, parent: SeqId, len: usize) -> Result<SeqId> {
        let page_size = self.config.layout.page_size;
        let p = self.seq(parent)?;
        if len > p.len {
            return Err(TwinferError::InvalidParameter(format!(
                "fork_prefix: {len} tokens asked of sequence {parent}, which has {}",
                p.len
            )));
        }
        let child = Sequence { pages: p.pages[..len.div_ceil(page_size)].to_vec(), len };
        for &page in &child.pages {
            self.allocator.retain(page)?;
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, child);
        Ok(id)
    }

    /// Ends `seq`; its pages return to the pool once no fork holds them.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        let s = self.seqs.remove(&seq).ok_or(TwinferError::UnknownSequence { seq: seq.0 })?;
        for page in s.pages {
            self.allocator.release(page)?;
        }
        Ok(())
    }

    /// Grows `seqs[i]` by `new_tokens[i]` tokens, allocating pages, for the whole batch or not at
    /// all: when the pool is short, `KvPoolExhausted` comes back and nothing has changed.
    ///
    /// A sequence about to write into a partly filled page it shares with a fork gets a private
    /// copy of that page first (every layer, K and V), so no write ever reaches another sequence.
    pub fn reserve(&mut self, seqs: &[SeqId], new_tokens: &[usize]) -> Result<()> {
        check_len("new_tokens ([seqs])", seqs.len(), new_tokens.len())?;
        self.check_known_distinct(seqs)?;
        let needed = self.pages_needed(seqs, new_tokens)?;
        let mut fresh = self.allocator.alloc_many(needed)?.into_iter();
        for (&id, &n) in seqs.iter().zip(new_tokens) {
            if n > 0 {
                self.grow(id, n, &mut fresh)?;
            }
        }
        debug_assert_eq!(fresh.len(), 0, "reserve counted more pages than it used");
        for page in fresh {
            self.allocator.release(page)?;
        }
        Ok(())
    }

    /// The CSR page table of `seqs`, in that order, for the kernels and [`crate::kv::append_paged_kv`].
    pub fn page_table(&self, seqs: &[SeqId]) -> Result<PageTableBuf> {
        let page_size = self.config.layout.page_size;
        let mut table = PageTableBuf { indptr: Vec::with_capacity(seqs.len() + 1), ..Default::default() };
        table.indptr.push(0);
        for &id in seqs {
            let s = self.seq(id)?;
            table.indices.extend_from_slice(&s.pages);
            let end = u32::try_from(table.indices.len())
                .map_err(|_| TwinferError::InvalidParameter("page table: more than u32::MAX entries".into()))?;
            table.indptr.push(end);
            table.last_page_len.push(last_page_len(s.len, page_size));
        }
        Ok(table)
    }

    /// Writes `k` and `v` (`[append_indptr[batch], num_kv_heads, head_dim]`, the cache's dtype) of
    /// `layer`: sequence `seqs[b]`'s rows become its last positions, which must have been reserved.
    /// Rows that would land in a page shared with a fork are refused: append before forking.
    pub fn append(
        &mut self,
        layer: usize,
        seqs: &[SeqId],
        append_indptr: &[u32],
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let buf = self.page_table(seqs)?;
        let table = buf.as_table();
        let layout = self.config.layout;
        let pool = &self.layers[layer];
        check_append(pool.k.as_ref(), pool.v.as_ref(), layout, &table, append_indptr, k, v)?;
        self.check_unshared(seqs, &table, append_indptr)?;
        let pool = &mut self.layers[layer];
        write_append(pool.k.as_mut(), pool.v.as_mut(), layout, &table, append_indptr, k, v)
    }

    /// A read-only view of one layer's pools, for the attention kernels.
    pub fn layer(&self, layer: usize) -> Result<PagedKv<'_>> {
        self.check_layer(layer)?;
        let pool = &self.layers[layer];
        PagedKv::new(pool.k.as_ref(), pool.v.as_ref(), self.config.layout)
    }

    /// K and V rows `start..start + len` of `seq` in `layer`, each `[len, num_kv_heads, head_dim]`, as f32.
    /// Rows reserved but never appended hold whatever their page held before.
    pub fn read_rows(&self, layer: usize, seq: SeqId, start: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_layer(layer)?;
        let s = self.seq(seq)?;
        let end = start.checked_add(len).filter(|&end| end <= s.len).ok_or_else(|| {
            TwinferError::InvalidParameter(format!(
                "read_rows: rows {start}..{start}+{len} are outside sequence {seq} of length {}",
                s.len
            ))
        })?;
        let pool = &self.layers[layer];
        let row = self.config.layout.row_elems();
        let (mut k, mut v) = (vec![0.0; len * row], vec![0.0; len * row]);
        gather(pool.k.as_ref(), self.config.layout, &s.pages, start..end, &mut k);
        gather(pool.v.as_ref(), self.config.layout, &s.pages, start..end, &mut v);
        Ok((k, v))
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or(TwinferError::UnknownSequence { seq: id.0 })
    }

    fn seq_mut(&mut self, id: SeqId) -> Result<&mut Sequence> {
        self.seqs.get_mut(&id).ok_or(TwinferError::UnknownSequence { seq: id.0 })
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        let num_layers = self.config.num_layers;
        if layer < num_layers { Ok(()) } else { Err(TwinferError::LayerOutOfRange { layer, num_layers }) }
    }

    /// Unknown ids first, then duplicates, so the error does not depend on where in the batch they sit.
    fn check_known_distinct(&self, seqs: &[SeqId]) -> Result<()> {
        for &id in seqs {
            self.seq(id)?;
        }
        let mut seen = HashSet::with_capacity(seqs.len());
        for &id in seqs {
            if !seen.insert(id) {
                return Err(TwinferError::InvalidParameter(format!("reserve: sequence {id} appears twice")));
            }
        }
        Ok(())
    }

    /// Exactly the pages `reserve` will take: new tail pages plus copy-on-write copies. When every
    /// holder of a shared partial page grows in this batch, the last one to grow finds itself the
    /// only holder and keeps the page, so the count replays the batch in order.
    fn pages_needed(&self, seqs: &[SeqId], new_tokens: &[usize]) -> Result<usize> {
        let page_size = self.config.layout.page_size;
        let mut holders_left: HashMap<u32, u32> = HashMap::new();
        let mut needed = 0usize;
        for (&id, &n) in seqs.iter().zip(new_tokens) {
            if n == 0 {
                continue;
            }
            let s = self.seq(id)?;
            let new_len = s.len.checked_add(n).ok_or_else(|| {
                TwinferError::InvalidParameter(format!("reserve: sequence {id} would exceed usize::MAX tokens"))
            })?;
            needed = needed.saturating_add(new_len.div_ceil(page_size) - s.pages.len());
            if let Some(page) = partial_tail(s, page_size) {
                let left = holders_left.entry(page).or_insert_with(|| self.allocator.refcount(page));
                if *left > 1 {
                    *left -= 1;
                    needed += 1;
                }
            }
        }
        Ok(needed)
    }

    /// Grows one sequence by `n > 0` tokens with pages from `fresh`.
    fn grow(&mut self, id: SeqId, n: usize, fresh: &mut impl Iterator<Item = u32>) -> Result<()> {
        let page_size = self.config.layout.page_size;
        let s = self.seq(id)?;
        let (len, tail) = (s.len, partial_tail(s, page_size));
        if let Some(old) = tail
            && self.allocator.refcount(old) > 1
        {
            let new = next_page(fresh)?;
            self.copy_page_rows(old, new, len % page_size);
            self.allocator.release(old)?;
            if let Some(last) = self.seq_mut(id)?.pages.last_mut() {
                *last = new;
            }
        }
        let new_len = len + n;
        let s = self.seq_mut(id)?;
        while s.pages.len() < new_len.div_ceil(page_size) {
            s.pages.push(next_page(fresh)?);
        }
        s.len = new_len;
        Ok(())
    }

    /// Starts (or stops) keeping the copy-on-write copies, for a copy of the pool that lives
    /// elsewhere (a GPU device) and must make the same copies.
    pub fn record_page_copies(&mut self, on: bool) {
        self.copies = on.then(Vec::new);
    }

    /// The copy-on-write copies made since the last call, in order.
    pub fn take_page_copies(&mut self) -> Vec<PageCopy> {
        self.copies.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Copies the first `rows` rows of page `src` to page `dst` in every layer, K and V.
    fn copy_page_rows(&mut self, src: u32, dst: u32, rows: usize) {
        if let Some(copies) = &mut self.copies {
            copies.push(PageCopy { src, dst, rows });
        }
        let layout = self.config.layout;
        let (src, dst) = (layout.offset(src as usize, 0, 0), layout.offset(dst as usize, 0, 0));
        let range = src..src + rows * layout.row_elems();
        for pool in &mut self.layers {
            pool.k.copy_within(range.clone(), dst);
            pool.v.copy_within(range.clone(), dst);
        }
    }

    /// Refuses an append whose rows would land in a page another sequence also holds.
    fn check_unshared(&self, seqs: &[SeqId], table: &PageTable<'_>, append_indptr: &[u32]) -> Result<()> {
        let page_size = self.config.layout.page_size;
        for b in 0..table.batch_size() {
            let n = (append_indptr[b + 1] - append_indptr[b]) as usize;
            if n == 0 {
                continue;
            }
            let kv_len = table.kv_len(b, page_size);
            let touched = &table.pages(b)[(kv_len - n) / page_size..kv_len.div_ceil(page_size)];
            if let Some(&page) = touched.iter().find(|&&p| self.allocator.refcount(p) > 1) {
                return Err(TwinferError::InvalidParameter(format!(
                    "append: sequence {} would write into page {page}, which a fork shares; append before forking",
                    seqs[b]
                )));
            }
        }
        Ok(())
    }
}

/// Rows in the last page: 1..=page_size, or 0 for a sequence with no pages.
fn last_page_len(len: usize, page_size: usize) -> u32 {
    if len == 0 { 0 } else { ((len - 1) % page_size + 1) as u32 }
}

/// The last page when it is only partly filled (the only page a fork may have to copy).
fn partial_tail(s: &Sequence, page_size: usize) -> Option<u32> {
    if s.len.is_multiple_of(page_size) { None } else { s.pages.last().copied() }
}

fn next_page(fresh: &mut impl Iterator<Item = u32>) -> Result<u32> {
    // Unreachable while pages_needed is exact; an error keeps a counting bug from panicking.
    fresh.next().ok_or_else(|| TwinferError::InvalidParameter("reserve: page count mismatch (internal)".into()))
}

/// Reads rows `range` of a sequence with `pages` into `dst` as f32, one page-contiguous run at a time.
fn gather(pool: TensorRef<'_>, layout: KvLayout, pages: &[u32], range: std::ops::Range<usize>, dst: &mut [f32]) {
    let (row, page_size) = (layout.row_elems(), layout.page_size);
    let mut pos = range.start;
    while pos < range.end {
        let (page, slot) = (pages[pos / page_size] as usize, pos % page_size);
        let run = (page_size - slot).min(range.end - pos);
        let out = (pos - range.start) * row;
        pool.read_f32(layout.offset(page, slot, 0), &mut dst[out..out + run * row]);
        pos += run;
    }
}

//! The paged KV cache: page layout, CSR page tables, the page pool and appends.
//! No backend code lives here; kernels read the pool through [`PagedKv`] and [`PageTable`].

mod append;
mod cache;
mod layout;
mod pool;
pub(crate) mod storage;

pub use append::append_paged_kv;
pub use cache::{KvCacheConfig, PageCopy, PagedKvCache, SeqId};
pub use layout::{
    KvLayout, MAX_HEAD_DIM, MAX_PAGE_SIZE, PageTable, PageTableBuf, PagedKv, check_head_dim, check_indptr,
};
pub use pool::PageAllocator;

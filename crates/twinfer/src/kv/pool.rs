//! The page allocator: a free list plus per-page reference counts.
//!
//! One allocator serves every layer: a page id names the same slot in each layer's K and V pools
//! (as in vLLM), so a sequence needs one page list, not one per layer. Reference counts let forked
//! sequences share pages; a page goes back to the free list when its last holder lets go.

use crate::error::{Result, TwinferError};

/// Hands out page ids `0..num_pages` and counts who holds each.
#[derive(Debug, Clone)]
pub struct PageAllocator {
    /// LIFO, so that allocation order is deterministic and recently freed (cache-warm) pages come first.
    free: Vec<u32>,
    /// 0 for a free page.
    refcount: Vec<u32>,
}

impl PageAllocator {
    /// A pool of `num_pages` free pages. Page ids are u32 (as in the page tables), hence the type.
    pub fn new(num_pages: u32) -> Self {
        // Reversed so that the first allocations return 0, 1, 2, ...
        Self { free: (0..num_pages).rev().collect(), refcount: vec![0; num_pages as usize] }
    }

    /// Total pages, free or not.
    pub fn num_pages(&self) -> usize {
        self.refcount.len()
    }

    /// Pages on the free list.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Holders of `page`; 0 for a free page or an id outside the pool.
    pub fn refcount(&self, page: u32) -> u32 {
        self.refcount.get(page as usize).copied().unwrap_or(0)
    }

    /// Takes one page with a reference count of 1, or `None` when the pool is empty.
    pub fn alloc(&mut self) -> Option<u32> {
        let page = self.free.pop()?;
        self.refcount[page as usize] = 1;
        Some(page)
    }

    /// Takes `n` pages, or none at all: on failure the pool is unchanged.
    pub fn alloc_many(&mut self, n: usize) -> Result<Vec<u32>> {
        let free = self.free.len();
        if n > free {
            return Err(TwinferError::KvPoolExhausted { needed: n, free });
        }
        let pages = self.free.split_off(free - n);
        for &page in &pages {
            self.refcount[page as usize] = 1;
        }
        // split_off keeps the LIFO tail in stack order; hand it out in pop order.
        Ok(pages.into_iter().rev().collect())
    }

    /// Adds a holder to an allocated page.
    pub fn retain(&mut self, page: u32) -> Result<()> {
        let count = self.allocated_mut(page)?;
        *count = count
            .checked_add(1)
            .ok_or_else(|| TwinferError::InvalidParameter(format!("page {page}: reference count overflow")))?;
        Ok(())
    }

    /// Drops a holder; returns `true` when that was the last one and the page went back to the pool.
    pub fn release(&mut self, page: u32) -> Result<bool> {
        let count = self.allocated_mut(page)?;
        *count -= 1;
        if *count == 0 {
            self.free.push(page);
            return Ok(true);
        }
        Ok(false)
    }

    /// Checks the allocator against `holders[page]`, the number of page-table entries naming each
    /// page: every count agrees, and the free list holds each unheld page once and nothing else.
    /// For stress tests and debugging; one pass over the pool.
    pub fn audit(&self, holders: &[u32]) -> std::result::Result<(), String> {
        if holders.len() != self.refcount.len() {
            return Err(format!("{} holder counts for a pool of {} pages", holders.len(), self.refcount.len()));
        }
        let mut on_free_list = vec![false; self.refcount.len()];
        for &page in &self.free {
            let slot = on_free_list
                .get_mut(page as usize)
                .ok_or_else(|| format!("the free list names page {page}, outside the pool"))?;
            if std::mem::replace(slot, true) {
                return Err(format!("page {page} is on the free list twice"));
            }
        }
        for (page, (&count, &held)) in self.refcount.iter().zip(holders).enumerate() {
            if count != held {
                return Err(format!("page {page}: reference count {count}, but {held} page tables name it"));
            }
            if (count == 0) != on_free_list[page] {
                let where_ = if on_free_list[page] { "on" } else { "missing from" };
                return Err(format!("page {page}: reference count {count}, {where_} the free list"));
            }
        }
        Ok(())
    }

    /// The count of a page that somebody holds; a free or unknown page is a caller bug reported as such.
    fn allocated_mut(&mut self, page: u32) -> Result<&mut u32> {
        let num_pages = self.refcount.len();
        match self.refcount.get_mut(page as usize) {
            None => {
                Err(TwinferError::InvalidParameter(format!("page {page} is outside the pool of {num_pages} pages")))
            }
            Some(0) => Err(TwinferError::InvalidParameter(format!("page {page} is not allocated"))),
            Some(count) => Ok(count),
        }
    }
}

//! The scheduler's self-check, for stress tests and debugging.

use super::Scheduler;
use crate::kv::SeqId;

impl Scheduler {
    /// Checks the bookkeeping between steps: every running request owns one live cache sequence
    /// holding exactly the tokens it computed, a waiting one holds nothing, no cache sequence is
    /// orphaned, and the pool's counts agree with the page tables ([`crate::kv::PagedKvCache::audit`]). For
    /// stress tests and debugging; one pass over every page table.
    pub fn audit(&self) -> std::result::Result<(), String> {
        let mut owned = std::collections::BTreeSet::new();
        for (id, s) in &self.seqs {
            let id = id.0;
            match s.cache_seq {
                Some(seq) => {
                    if !owned.insert(seq) {
                        return Err(format!("request {id}: cache sequence {seq} has two owners"));
                    }
                    let len = self.cache.seq_len(seq).map_err(|e| format!("request {id}: {e}"))?;
                    if len != s.computed {
                        return Err(format!("request {id}: {} tokens computed, {len} in the cache", s.computed));
                    }
                }
                None if s.computed != 0 => {
                    return Err(format!("request {id} waits with {} tokens computed", s.computed));
                }
                None => {}
            }
            if s.generated.len() >= s.request.max_tokens {
                return Err(format!("request {id} has all its {} tokens and still runs", s.generated.len()));
            }
        }
        for r in &self.retained {
            if !owned.insert(r.seq) {
                return Err(format!("kept prefix: cache sequence {} has two owners", r.seq));
            }
            let len = self.cache.seq_len(r.seq).map_err(|e| format!("kept prefix: {e}"))?;
            if len != r.tokens.len() {
                return Err(format!("kept prefix {}: {} tokens kept, {len} in the cache", r.seq, r.tokens.len()));
            }
        }
        if self.retained.len() > self.config.prefix_cache_sequences {
            return Err(format!(
                "{} prefixes kept, at most {}",
                self.retained.len(),
                self.config.prefix_cache_sequences
            ));
        }
        let live: std::collections::BTreeSet<SeqId> = self.cache.sequences().collect();
        if live != owned {
            return Err(format!("cache sequences {live:?}, owned by requests {owned:?}"));
        }
        self.cache.audit()
    }
}

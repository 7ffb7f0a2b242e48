//! Prefix sharing: a new request takes the pages of the longest identical prefix that a running
//! request has computed or a finished one left behind (the prefix cache, least recently used
//! evicted first).

use super::Scheduler;
use super::chunks::gcd;
use crate::engine::request::RequestId;
use crate::error::Result;
use crate::kv::SeqId;

/// A finished request's computed tokens, whose K/V its cache sequence still holds.
#[derive(Debug)]
pub(super) struct Retained {
    pub(super) seq: SeqId,
    pub(super) tokens: Vec<u32>,
}

impl Scheduler {
    /// Gives a waiting request a cache sequence, sharing pages with the running request that has
    /// the longest identical prefix already computed (at least one page of it). The shared length
    /// is a multiple of [`crate::cpu::PREFILL_ALIGN`] and of the page, so the rest of the prompt is chunked as
    /// it would be alone.
    pub(super) fn admit(&mut self, id: RequestId) -> Result<()> {
        let me = &self.seqs[&id];
        let best = self.best_prefix(me.len(), &|i| me.token(i), Some(id));
        let (seq, computed) = match best {
            Some((parent, n)) => {
                // A kept sequence that served moves to the back of the eviction order.
                if let Some(at) = self.retained.iter().position(|r| r.seq == parent) {
                    let r = self.retained.remove(at).expect("found");
                    self.retained.push_back(r);
                }
                (self.cache.fork_prefix(parent, n)?, n)
            }
            None => (self.cache.add_sequence(), 0),
        };
        let s = self.seqs.get_mut(&id).expect("waiting");
        s.cache_seq = Some(seq);
        s.computed = computed;
        s.metrics.cached_tokens = computed;
        Ok(())
    }

    /// The cache sequence (running, or kept by the prefix cache) with the longest prefix in common
    /// with a sequence of `len` tokens, and that length: at least a page, a multiple of the page
    /// and of the prefill alignment, and at most `len - 1` (the last token must run to produce
    /// logits). `exclude`: the request itself.
    fn best_prefix(
        &self,
        len: usize,
        token: &dyn Fn(usize) -> u32,
        exclude: Option<RequestId>,
    ) -> Option<(SeqId, usize)> {
        if !self.config.prefix_sharing || len == 0 {
            return None;
        }
        let page = self.config.page_size;
        let align = self.chunk_align();
        let granule = page * align / gcd(page, align);
        let shared = |computed: usize, other: &dyn Fn(usize) -> u32| {
            let limit = computed.min(len - 1);
            (0..limit).take_while(|&i| other(i) == token(i)).count() / granule * granule
        };
        let mut best: Option<(SeqId, usize)> = None;
        for (&other, s) in &self.seqs {
            let Some(seq) = s.cache_seq.filter(|_| Some(other) != exclude) else { continue };
            let common = shared(s.computed, &|i| s.token(i));
            if common >= page && best.is_none_or(|(_, n)| common > n) {
                best = Some((seq, common));
            }
        }
        for r in &self.retained {
            let common = shared(r.tokens.len(), &|i| r.tokens[i]);
            if common >= page && best.is_none_or(|(_, n)| common > n) {
                best = Some((r.seq, common));
            }
        }
        best
    }

    /// Seconds until `prompt` would get its first token if it were added now: the pending prompt
    /// tokens plus its own, less what it would take from shared pages, by the measured step-time
    /// model; `None` before that model has a prompt step.
    pub fn predicted_ttft(&self, prompt: &[u32]) -> Option<f64> {
        let shared = self.best_prefix(prompt.len(), &|i| prompt[i], None).map_or(0, |(_, n)| n);
        let tokens = self.pending_prompt_tokens() + prompt.len() - shared;
        self.step_cost.prefill_seconds(tokens, self.num_decoding(), self.config.max_batch_tokens)
    }

    /// Finished requests whose pages the prefix cache keeps.
    pub fn kept_prefixes(&self) -> usize {
        self.retained.len()
    }

    /// Frees every page the prefix cache keeps.
    pub fn clear_prefix_cache(&mut self) -> Result<()> {
        while self.evict_retained()? {}
        Ok(())
    }

    /// Frees the least recently used kept sequence; false when none is kept.
    pub(super) fn evict_retained(&mut self) -> Result<bool> {
        match self.retained.pop_front() {
            Some(r) => {
                self.cache.free(r.seq)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

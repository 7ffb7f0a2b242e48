//! Continuous batching on the paged KV cache, one `step` at a time (browsers drive `step_async`
//! from their event loop; natively [`crate::engine::Engine`] drives `step` from a thread).
//!
//! Each step takes every running sequence's decode token first, then prompt chunks, oldest request
//! first, up to `max_batch_tokens`; new requests join as soon as there is budget. When the page
//! pool is short, the newest sequences are preempted: their pages are freed and their tokens
//! (prompt and output so far) are recomputed when they run again, so no other sequence is touched.
//! A finished or cancelled sequence frees its pages at once.
//!
//! When the GPU device is lost during a step, the phases that ran on it switch to the CPU engine
//! (same SIMD level) and the step's sequences are preempted the same way, so their K/V, some of it
//! appended before the loss, is recomputed: no token is lost or changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::Attention;
use crate::cpu::{PREFILL_ALIGN, SimdLevel};
use crate::engine::config::{EngineConfig, default_clock};
use crate::engine::metrics::{RequestMetrics, RunMetrics};
use crate::engine::request::{Event, FinishReason, GenerateRequest, Prompt, RequestId};
use crate::engine::sampling::Sampler;
use crate::error::{Result, TwinferError};
use crate::kv::{KvCacheConfig, KvLayout, PagedKvCache, SeqId};
use crate::model::{Engines, LlamaModel, Logits, ResidentDecoder, StepSeq, TextStream, Tokenizer};

mod audit;
mod chunks;
mod forward;
mod output;
mod prefix_cache;
mod step_cost;

pub use step_cost::StepCost;

use chunks::aligned_chunk;
use prefix_cache::Retained;

#[derive(Debug)]
struct Active {
    request: GenerateRequest,
    submitted: f64,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// The cache sequence while it holds pages; `None` while waiting (or preempted).
    cache_seq: Option<SeqId>,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    sampler: Sampler,
    stream: TextStream,
    text: String,
    /// Bytes of `text` already handed out in events.
    shown: usize,
    metrics: RequestMetrics,
    cancelled: bool,
}

impl Active {
    fn len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }
    fn token(&self, i: usize) -> u32 {
        if i < self.prompt.len() { self.prompt[i] } else { self.generated[i - self.prompt.len()] }
    }
}

/// The continuous-batching scheduler over one decoder.
#[derive(Debug)]
pub struct Scheduler {
    model: Arc<LlamaModel>,
    /// Without one (a model timed on token ids), no text is produced.
    tokenizer: Option<Arc<Tokenizer>>,
    level: SimdLevel,
    prefill: Attention,
    decode: Attention,
    cache: PagedKvCache,
    config: EngineConfig,
    clock: fn() -> f64,
    eos: Vec<u32>,
    /// Every unfinished request, in arrival order (ids grow).
    seqs: BTreeMap<RequestId, Active>,
    next_id: u64,
    finished: Vec<RequestMetrics>,
    occupancy: Vec<f64>,
    first_submit: Option<f64>,
    last_finish: f64,
    /// Why the GPU engines were replaced by the CPU one, once they were.
    fallback: Option<String>,
    /// The whole model on the GPU, when both phases run there (see [`Scheduler::residency`]).
    resident: Option<ResidentDecoder>,
    residency: String,
    /// On the resident path, steps whose rows all sample greedily or with top-k (and no
    /// repetition penalty) pick on the device (see [`Scheduler::sample_on_device`]).
    sample_on_device: bool,
    /// Finished requests' cache sequences kept for their prefixes, least recently used first
    /// (see [`EngineConfig::prefix_cache_sequences`]).
    retained: std::collections::VecDeque<Retained>,
    /// The step-time model that predicts a queued prompt's TTFT: see [`StepCost`].
    step_cost: StepCost,
}

impl Scheduler {
    /// A scheduler for `model` with the two attention engines and a KV pool sized by `config`.
    /// Errors when `max_batch_tokens` or `max_running` is 0 or the KV budget holds no page.
    pub fn new(
        model: Arc<LlamaModel>,
        tokenizer: Option<Arc<Tokenizer>>,
        level: SimdLevel,
        prefill: Attention,
        decode: Attention,
        config: EngineConfig,
    ) -> Result<Self> {
        let c = &model.config;
        if config.max_batch_tokens == 0 || config.max_running == 0 {
            return Err(TwinferError::InvalidParameter("max_batch_tokens and max_running must be at least 1".into()));
        }
        let layout = KvLayout::new(config.page_size, c.num_kv_heads, c.head_dim)?;
        let page_bytes = 2 * c.num_layers * layout.page_bytes(config.kv_dtype);
        let num_pages = config.kv_pool_pages.unwrap_or(config.kv_memory_bytes / page_bytes);
        if num_pages == 0 {
            return Err(TwinferError::InvalidParameter(format!(
                "a KV budget of {} bytes holds no page of {page_bytes} bytes",
                config.kv_memory_bytes
            )));
        }
        let mut cache =
            PagedKvCache::new(KvCacheConfig { num_layers: c.num_layers, num_pages, layout, dtype: config.kv_dtype })?;
        let (resident, residency) = ResidentDecoder::for_engines(&model, &prefill, &decode, &cache.config());
        // The device pools make the host cache's copy-on-write copies too.
        cache.record_page_copies(resident.is_some());
        let mut eos = c.eos_token_ids.clone();
        if eos.is_empty() {
            for name in ["</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"] {
                eos.extend(tokenizer.as_ref().and_then(|t| t.token_to_id(name)));
            }
        }
        Ok(Self {
            clock: config.clock.unwrap_or(default_clock),
            model,
            tokenizer,
            level,
            prefill,
            decode,
            cache,
            config,
            eos,
            seqs: BTreeMap::new(),
            next_id: 0,
            finished: Vec::new(),
            occupancy: Vec::new(),
            first_submit: None,
            last_finish: 0.0,
            fallback: None,
            resident,
            sample_on_device: true,
            residency,
            retained: std::collections::VecDeque::new(),
            step_cost: StepCost::default(),
        })
    }

    /// Where the model's forward pass runs: resident on the GPU (every op of a step in one
    /// submission), or op by op on the CPU with attention on the phases' engines, and why.
    pub fn residency(&self) -> &str {
        &self.residency
    }

    /// The device-resident state, when the forward pass runs on the GPU.
    pub fn resident(&self) -> Option<&ResidentDecoder> {
        self.resident.as_ref()
    }

    /// Whether the resident path picks tokens on the device (greedy ids, or top-k candidates that
    /// the host samples from) instead of reading logits back; on by default. The tokens are the
    /// same either way: off is for comparisons.
    pub fn sample_on_device(&mut self, on: bool) {
        self.sample_on_device = on;
    }

    /// The model being served.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }
    /// The tokenizer, when the scheduler has one (needed for text prompts and streamed text).
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }
    /// The paged KV cache of the running sequences.
    pub fn cache(&self) -> &PagedKvCache {
        &self.cache
    }
    /// The attention engine of prompt chunks.
    pub fn prefill_attention(&self) -> &Attention {
        &self.prefill
    }
    /// The attention engine of decode tokens.
    pub fn decode_attention(&self) -> &Attention {
        &self.decode
    }
    /// Why the GPU engines were switched to the CPU (a lost device), if they were; the engines'
    /// own [`Attention::info`] then says `fallback: ...`.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }
    /// Seconds on the scheduler's clock ([`EngineConfig::clock`]).
    pub fn now(&self) -> f64 {
        (self.clock)()
    }

    /// Queues a request; it starts at the next step with room.
    pub fn add(&mut self, request: GenerateRequest) -> Result<RequestId> {
        let now = self.now();
        self.add_arrived(request, now)
    }

    /// [`Scheduler::add`] for a request that arrived at `arrived` (this scheduler's clock), before
    /// the caller could hand it over: a running step or a queue delayed it. Its TTFT, ITL and
    /// end-to-end times count from `arrived`, so that wait is measured rather than hidden.
    pub fn add_arrived(&mut self, request: GenerateRequest, arrived: f64) -> Result<RequestId> {
        let submitted = arrived.min(self.now());
        request.sampling.validate()?;
        if request.max_tokens == 0 {
            return Err(TwinferError::InvalidParameter("max_tokens must be at least 1".into()));
        }
        let prompt = match &request.prompt {
            Prompt::Text(t) => match &self.tokenizer {
                Some(tok) => tok.encode(t, true)?,
                None => {
                    return Err(TwinferError::InvalidParameter("this model has no tokenizer: pass token ids".into()));
                }
            },
            Prompt::Tokens(ids) => ids.clone(),
        };
        let c = &self.model.config;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(TwinferError::InvalidParameter(format!("prompt token {bad} is outside the vocabulary")));
        }
        let pool_tokens = self.cache.num_pages() * self.config.page_size;
        let longest = prompt.len().saturating_add(request.max_tokens).min(c.max_position_embeddings);
        if prompt.is_empty() || prompt.len() >= c.max_position_embeddings || longest > pool_tokens {
            return Err(TwinferError::RequestTooLarge {
                tokens: prompt.len(),
                reason: format!(
                    "the prompt must have 1..{} tokens and, with max_tokens {}, fit the KV pool of {pool_tokens} tokens",
                    c.max_position_embeddings, request.max_tokens
                ),
            });
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.first_submit = Some(self.first_submit.map_or(submitted, |t| t.min(submitted)));
        let metrics = RequestMetrics { prompt_tokens: prompt.len(), ..Default::default() };
        let sampler = Sampler::new(request.sampling.seed);
        self.seqs.insert(
            id,
            Active {
                request,
                submitted,
                prompt,
                generated: Vec::new(),
                cache_seq: None,
                computed: 0,
                sampler,
                stream: TextStream::default(),
                text: String::new(),
                shown: 0,
                metrics,
                cancelled: false,
            },
        );
        Ok(id)
    }

    /// Asks a request to stop; it ends (with its pages freed) at the next step.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        self.seqs.get_mut(&id).map(|s| s.cancelled = true).is_some()
    }

    /// Whether any request is running or waiting.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }
    /// Requests holding KV pages.
    pub fn num_running(&self) -> usize {
        self.seqs.values().filter(|s| s.cache_seq.is_some()).count()
    }
    /// Requests queued for KV pages (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.seqs.values().filter(|s| s.cache_seq.is_none()).count()
    }
    /// Tokens that must be computed before the unfinished requests reach decode: prompts not yet
    /// run, and what preempted requests must recompute.
    pub fn pending_prompt_tokens(&self) -> usize {
        self.seqs.values().map(|s| s.len() - s.computed).filter(|&n| n > 1).sum()
    }
    /// Sequences past their prompt: each adds a token to every step.
    pub fn num_decoding(&self) -> usize {
        self.seqs.values().filter(|s| s.len() - s.computed <= 1).count()
    }
    /// The measured step-time model. With [`Scheduler::pending_prompt_tokens`] it predicts how
    /// long a new prompt would wait for its first token.
    pub fn step_cost(&self) -> StepCost {
        self.step_cost
    }

    /// Metrics over every request finished since the start (or the last reset).
    pub fn run_metrics(&self) -> RunMetrics {
        let wall = self.first_submit.map_or(0.0, |t| self.last_finish - t);
        RunMetrics::from_requests(&self.finished, wall, &self.occupancy)
    }
    /// Clears the finished requests' metrics and KV occupancy samples, so that
    /// [`run_metrics`](Self::run_metrics) starts afresh.
    pub fn reset_metrics(&mut self) {
        self.finished.clear();
        self.occupancy.clear();
        self.first_submit = None;
    }

    /// Runs one batch and returns what it produced. Blocks on a GPU engine; in a browser that is
    /// `WouldBlock`: use [`Scheduler::step_async`].
    pub fn step(&mut self) -> Result<Vec<Event>> {
        self.prefill.check_blocking("Scheduler::step")?;
        self.decode.check_blocking("Scheduler::step")?;
        crate::wait::block_on("Scheduler::step", self.step_async())?
    }

    /// [`Scheduler::step`] without blocking. A lost GPU device does not fail the step: see the
    /// module documentation and [`Scheduler::fallback`].
    pub async fn step_async(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let cancelled: Vec<RequestId> = self.seqs.iter().filter(|(_, s)| s.cancelled).map(|(&id, _)| id).collect();
        for id in cancelled {
            self.finish(id, FinishReason::Cancelled, &mut events)?;
        }
        loop {
            let plan = self.schedule(&mut events)?;
            if plan.is_empty() {
                return Ok(events);
            }
            let occupied = self.cache.num_pages() - self.cache.free_pages();
            let started = self.now();
            match self.run(&plan).await {
                Ok(output) => {
                    self.occupancy.push(occupied as f64 / self.cache.num_pages() as f64);
                    self.measure_prefill(&plan, self.now() - started);
                    self.accept_step(&plan, &output, &mut events)?;
                    return Ok(events);
                }
                Err(TwinferError::DeviceLost(why)) if self.fall_back_to_cpu(&why) => {
                    for &(id, _) in &plan {
                        self.preempt(id)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Replaces every GPU engine whose device is gone (every GPU engine when none says so) with
    /// the CPU engine at the projections' SIMD level; false when there was none to replace.
    fn fall_back_to_cpu(&mut self, why: &str) -> bool {
        let level = self.level;
        let any_flagged = self.prefill.device_lost().is_some() || self.decode.device_lost().is_some();
        let mut switched = false;
        for a in [&mut self.prefill, &mut self.decode] {
            let lost = a.device_lost();
            if a.is_gpu() && (lost.is_some() || !any_flagged) {
                *a = a.cpu_fallback(level, lost.as_deref().unwrap_or(why));
                switched = true;
            }
        }
        if switched {
            self.fallback = Some(format!("the GPU device was lost ({why}); attention runs on the CPU with {level}"));
            // The device pools are gone; the preempted sequences recompute their K/V on the CPU,
            // and the kept prefixes, whose K/V were on the device, go.
            while self.evict_retained().unwrap_or(false) {}
            self.resident = None;
            self.cache.record_page_copies(false);
            self.residency = format!("CPU projections after the GPU was lost ({why})");
        }
        switched
    }

    /// Picks this step's (request, tokens) and reserves their pages, preempting when short.
    fn schedule(&mut self, events: &mut Vec<Event>) -> Result<Vec<(RequestId, usize)>> {
        // After a preemption nobody new joins this step, so the running set only shrinks.
        let mut admit_new = true;
        let align = self.chunk_align();
        loop {
            let mut budget = self.step_budget(align);
            let mut plan = Vec::new();
            let running: Vec<RequestId> =
                self.seqs.iter().filter(|(_, s)| s.cache_seq.is_some()).map(|(&id, _)| id).collect();
            for &id in &running {
                let s = &self.seqs[&id];
                if s.len() - s.computed == 1 {
                    plan.push((id, 1));
                    budget = budget.saturating_sub(1);
                }
            }
            for &id in &running {
                let s = &self.seqs[&id];
                let pending = s.len() - s.computed;
                let n = aligned_chunk(s.computed, pending, budget, align);
                if pending > 1 && n > 0 {
                    plan.push((id, n));
                    budget -= n;
                }
            }
            let waiting: Vec<RequestId> =
                self.seqs.iter().filter(|(_, s)| s.cache_seq.is_none()).map(|(&id, _)| id).collect();
            for (admitted, id) in (running.len()..).zip(waiting) {
                if !admit_new || budget == 0 || admitted >= self.config.max_running {
                    break;
                }
                let s = &self.seqs[&id];
                if aligned_chunk(0, s.len(), budget, align) == 0 {
                    break;
                }
                self.admit(id)?;
                let s = &self.seqs[&id];
                let n = aligned_chunk(s.computed, s.len() - s.computed, budget, align);
                plan.push((id, n));
                budget -= n;
            }
            if plan.is_empty() {
                return Ok(plan);
            }
            let ids: Vec<SeqId> = plan.iter().map(|(id, _)| self.seqs[id].cache_seq.expect("admitted")).collect();
            let counts: Vec<usize> = plan.iter().map(|&(_, n)| n).collect();
            match self.cache.reserve(&ids, &counts) {
                Ok(()) => return Ok(plan),
                Err(TwinferError::KvPoolExhausted { .. }) => {
                    // Kept prefixes go before any running request does.
                    if self.evict_retained()? {
                        continue;
                    }
                    admit_new = false;
                    let holders: Vec<RequestId> =
                        self.seqs.iter().filter(|(_, s)| s.cache_seq.is_some()).map(|(&id, _)| id).collect();
                    match holders.as_slice() {
                        [.., newest] if holders.len() > 1 => self.preempt(*newest)?,
                        // Alone and still short: cannot happen for a request `add` accepted, but
                        // if it does, that request fails and the others go on.
                        [only] => {
                            let reason = FinishReason::Failed("the KV page pool cannot hold this sequence".into());
                            self.finish(*only, reason, events)?;
                        }
                        _ => return Ok(Vec::new()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Tokens this step may carry: `max_batch_tokens`, or with a TPOT objective and sequences
    /// decoding, what the fitted step cost allows within it (the decode tokens and at least one
    /// aligned prompt chunk whatever it says).
    fn step_budget(&self, align: usize) -> usize {
        let max = self.config.max_batch_tokens;
        let decoding = self.num_decoding();
        match (self.config.tpot_target, decoding) {
            (Some(target), 1..) => {
                self.step_cost.tokens_within(target).map_or(max, |t| t.clamp((decoding + align).min(max), max))
            }
            _ => max,
        }
    }

    /// Where prompt chunks may end: [`PREFILL_ALIGN`], unless a step's budget is smaller (then
    /// anywhere, and a request's output may depend on how its prompt was split).
    fn chunk_align(&self) -> usize {
        if self.config.max_batch_tokens >= PREFILL_ALIGN { PREFILL_ALIGN } else { 1 }
    }

    fn preempt(&mut self, id: RequestId) -> Result<()> {
        let s = self.seqs.get_mut(&id).expect("running");
        if let Some(seq) = s.cache_seq.take() {
            self.cache.free(seq)?;
        }
        if s.computed > 0 {
            s.metrics.preemptions += 1;
        }
        s.computed = 0;
        Ok(())
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason, events: &mut Vec<Event>) -> Result<()> {
        let Some(mut s) = self.seqs.remove(&id) else { return Ok(()) };
        if let Some(seq) = s.cache_seq.take() {
            let keep = self.config.prefix_sharing
                && self.config.prefix_cache_sequences > 0
                && !matches!(reason, FinishReason::Failed(_))
                && s.computed >= self.config.page_size;
            if keep {
                let tokens = (0..s.computed).map(|i| s.token(i)).collect();
                self.retained.push_back(Retained { seq, tokens });
                while self.retained.len() > self.config.prefix_cache_sequences {
                    self.evict_retained()?;
                }
            } else {
                self.cache.free(seq)?;
            }
        }
        // The final text is exactly what was streamed. A cancelled or failed request drops what
        // it held back (a partial character, a possible stop-string prefix): it was never shown.
        s.text.truncate(s.shown);
        let now = self.now();
        s.metrics.e2e = now - s.submitted;
        self.last_finish = now;
        self.finished.push(s.metrics.clone());
        events.push(Event::Finished { request: id, reason, text: s.text, tokens: s.generated, metrics: s.metrics });
        Ok(())
    }
}

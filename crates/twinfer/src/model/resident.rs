//! The Llama-family decoder resident on a GPU: weights uploaded once, each layer's KV pages in a
//! device pool that mirrors the host cache's page allocation, activations in pooled device
//! buffers. A step records every layer of every sequence in it (decode tokens and prompt chunks
//! together), submitted in parts as it is recorded so the device starts early, and reads back
//! only the logits rows it was asked for, once, at the end.
//!
//! The host [`PagedKvCache`] still owns the pages: it allocates, frees and forks them and builds the
//! page tables; its own K/V storage is not written (the device pool holds the values), so a
//! sequence whose K/V lives on the device is recomputed if the step moves to the CPU.

use std::sync::{Arc, Mutex};

use crate::backend::Attention;
use crate::error::{Result, TwinferError};
use crate::gpu::{Act, DeviceVec, GpuEngine, GpuKvCache, GpuLinear, KvStorage, OnLoad, StepPending};
use crate::kv::{KvCacheConfig, PagedKvCache};
use crate::model::llama::{Arranged, LlamaModel, StepSeq};

#[derive(Debug)]
struct ResidentLayer {
    attn_norm: DeviceVec,
    ffn_norm: DeviceVec,
    qkv: Arc<GpuLinear>,
    o: Arc<GpuLinear>,
    gate_up: Arc<GpuLinear>,
    down: Arc<GpuLinear>,
    kv: GpuKvCache,
}

/// A decoder's device-resident state on one GPU engine.
#[derive(Debug)]
pub struct ResidentDecoder {
    gpu: GpuEngine,
    layers: Vec<ResidentLayer>,
    norm: DeviceVec,
    lm_head: Arc<GpuLinear>,
    /// RoPE (cos, sin) for positions `0..n`, grown by doubling.
    rope: Mutex<Option<(usize, DeviceVec)>>,
    /// Fill every step buffer with NaN before recording (tests).
    poison: bool,
}

impl Drop for ResidentDecoder {
    /// The engine's bind-group cache would otherwise keep the pools and norms alive.
    fn drop(&mut self) {
        let mut ids: Vec<u64> =
            self.layers.iter().flat_map(|l| [l.attn_norm.cache_id(), l.ffn_norm.cache_id()]).collect();
        ids.push(self.norm.cache_id());
        if let Ok(Some((_, t))) = self.rope.get_mut().map(|r| r.as_ref()) {
            ids.push(t.cache_id());
        }
        let pools: Vec<&GpuKvCache> = self.layers.iter().map(|l| &l.kv).collect();
        self.gpu.forget_bind_groups(|id| ids.contains(&id) || pools.iter().any(|p| p.owns_cache_id(id)));
    }
}

impl ResidentDecoder {
    /// Uploads `model`'s weights to `gpu` (reusing copies already there) and allocates a device
    /// pool of `cache.num_pages` pages per layer. Errors when the model's shapes are outside what
    /// the resident kernels take (head_dim a multiple of 8, widths multiples of 4) or a layer's
    /// pool does not fit one buffer binding.
    pub fn new(model: &LlamaModel, gpu: &GpuEngine, cache: &KvCacheConfig) -> Result<Self> {
        let c = &model.config;
        if !c.head_dim.is_multiple_of(8) || !c.hidden_size.is_multiple_of(4) || !c.intermediate_size.is_multiple_of(4) {
            return Err(TwinferError::InvalidParameter(format!(
                "the resident GPU path needs head_dim % 8 == 0 and hidden, intermediate % 4 == 0 (got {}, {}, {})",
                c.head_dim, c.hidden_size, c.intermediate_size
            )));
        }
        if cache.layout.num_kv_heads != c.num_kv_heads || cache.layout.head_dim != c.head_dim {
            return Err(TwinferError::ShapeMismatch {
                what: "KV cache heads x head_dim",
                expected: c.kv_dim(),
                got: cache.layout.row_elems(),
            });
        }
        let ctx = gpu.context();
        let storage = match cache.dtype {
            crate::DType::Q8 => KvStorage::Q8,
            crate::DType::F16 if ctx.summary.shader_f16 => KvStorage::F16,
            _ => KvStorage::F32,
        };
        let binding = ctx.limits.max_storage_buffer_binding_size;
        let pool_bytes = crate::gpu::pool_buffer_bytes(cache.layout, storage, cache.num_pages, cache.num_pages);
        // The resident step binds each layer's pool whole: it must fit one buffer.
        if crate::gpu::max_pages_per_buffer(cache.layout, storage, binding) < cache.num_pages {
            return Err(TwinferError::OverLimit {
                what: "one layer's device KV pool (K or V)",
                requested: pool_bytes,
                limit: binding,
            });
        }
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(ResidentLayer {
                    attn_norm: DeviceVec::upload(gpu, &l.attn_norm)?,
                    ffn_norm: DeviceVec::upload(gpu, &l.ffn_norm)?,
                    qkv: l.qkv.on_device(gpu)?,
                    o: l.o.on_device(gpu)?,
                    gate_up: l.gate_up.on_device(gpu)?,
                    down: l.down.on_device(gpu)?,
                    kv: GpuKvCache::new(gpu, cache.layout, cache.num_pages, storage, u64::MAX)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gpu: gpu.clone(),
            layers,
            norm: DeviceVec::upload(gpu, &model.norm)?,
            lm_head: model.lm_head.on_device(gpu)?,
            rope: Mutex::new(None),
            poison: false,
        })
    }

    /// The resident state when both phases run on a GPU (on the decode engine's device), else
    /// `None`; with the reason either way. `TWINFER_RESIDENT=0` keeps the op-by-op path (for
    /// comparisons). A caller whose cache forks sequences turns on its page-copy log.
    pub fn for_engines(
        model: &LlamaModel,
        prefill: &Attention,
        decode: &Attention,
        cache: &KvCacheConfig,
    ) -> (Option<Self>, String) {
        let (Some(_), Some(gpu)) = (prefill.gpu_engine(), decode.gpu_engine()) else {
            return (None, "op by op: projections on the CPU, attention on each phase's engine".into());
        };
        #[cfg(not(target_arch = "wasm32"))]
        if std::env::var("TWINFER_RESIDENT").is_ok_and(|v| v == "0") {
            return (None, "op by op on the GPU (TWINFER_RESIDENT=0)".into());
        }
        match Self::new(model, gpu, cache) {
            Ok(r) => (Some(r), format!("resident on {}: one readback per step", gpu.context().summary.name)),
            Err(e) => (None, format!("op by op on the GPU: the resident path is unavailable ({e})")),
        }
    }

    /// Fills every step buffer with NaN before each step, so a value no kernel wrote shows up.
    #[doc(hidden)]
    pub fn poison_for_test(mut self) -> Self {
        self.poison = true;
        self
    }

    /// The engine the steps run on.
    pub fn engine(&self) -> &GpuEngine {
        &self.gpu
    }

    /// The RoPE table covering positions `0..positions` (regrown by doubling).
    fn rope_table(
        &self,
        model: &LlamaModel,
        positions: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<(usize, DeviceVec)>>> {
        let mut rope = self.rope.lock().map_err(|_| TwinferError::DeviceLost("a previous call panicked".into()))?;
        if rope.as_ref().is_none_or(|(n, _)| *n < positions) {
            let n = positions.next_power_of_two().max(256);
            let table = DeviceVec::upload(&self.gpu, &model.rope.cos_sin_table(n))?;
            if let Some((_, old)) = rope.take() {
                let id = old.cache_id();
                self.gpu.forget_bind_groups(|x| x == id);
            }
            *rope = Some((n, table));
        }
        Ok(rope)
    }
}

impl LlamaModel {
    /// [`LlamaModel::forward_resident_async`], blocking (natively; `WouldBlock` in a browser).
    pub fn forward_resident(
        &self,
        r: &ResidentDecoder,
        cache: &mut PagedKvCache,
        seqs: &[StepSeq<'_>],
    ) -> Result<Vec<f32>> {
        crate::wait::blocking("LlamaModel::forward_resident", self.forward_resident_async(r, cache, seqs))?
    }

    /// [`LlamaModel::forward`] on the device-resident state: the same rows, in the same order.
    /// One readback (the logits rows) per call.
    pub async fn forward_resident_async(
        &self,
        r: &ResidentDecoder,
        cache: &mut PagedKvCache,
        seqs: &[StepSeq<'_>],
    ) -> Result<Vec<f32>> {
        let (pending, has_logits) = self.record_resident(r, cache, seqs, Readout::Logits)?;
        let values = pending.wait_async().await?;
        Ok(if has_logits { values } else { Vec::new() })
    }

    /// [`LlamaModel::forward_resident_greedy_async`], blocking (natively; `WouldBlock` in a browser).
    pub fn forward_resident_greedy(
        &self,
        r: &ResidentDecoder,
        cache: &mut PagedKvCache,
        seqs: &[StepSeq<'_>],
    ) -> Result<Vec<u32>> {
        crate::wait::blocking(
            "LlamaModel::forward_resident_greedy",
            self.forward_resident_greedy_async(r, cache, seqs),
        )?
    }

    /// [`LlamaModel::forward_resident_async`] with greedy sampling on the device: the token id
    /// (the host `argmax` of its logits) of each row that gets logits, and 4 bytes read back per
    /// row instead of the vocabulary's logits.
    pub async fn forward_resident_greedy_async(
        &self,
        r: &ResidentDecoder,
        cache: &mut PagedKvCache,
        seqs: &[StepSeq<'_>],
    ) -> Result<Vec<u32>> {
        let (pending, has_rows) = self.record_resident(r, cache, seqs, Readout::Greedy)?;
        let ids = pending.wait_u32_async().await?;
        Ok(if has_rows { ids } else { Vec::new() })
    }

    /// [`LlamaModel::forward_resident_async`] with top-k candidates picked on the device: per row
    /// that gets logits, its `k` largest logits with their ids (`[rows, k]`, see
    /// [`crate::engine::top_k`]) and its greedy token id; `8 k + 4` bytes read back per row
    /// instead of the vocabulary's logits. `k` is at most the vocabulary.
    pub async fn forward_resident_top_k_async(
        &self,
        r: &ResidentDecoder,
        cache: &mut PagedKvCache,
        seqs: &[StepSeq<'_>],
        k: usize,
    ) -> Result<(Vec<(u32, f32)>, Vec<u32>)> {
        if k == 0 || k > self.config.vocab_size {
            return Err(TwinferError::InvalidParameter(format!(
                "top-k of {k} among a vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let (pending, has_rows) = self.record_resident(r, cache, seqs, Readout::TopK(k))?;
        let words = pending.wait_u32_async().await?;
        if !has_rows {
            return Ok((Vec::new(), Vec::new()));
        }
        let split = words.len() - words.len() / (2 * k + 1);
        Ok((crate::gpu::candidates(&words[..split]), words[split..].to_vec()))
    }

    /// Records and submits a resident step; whether it reads rows back (else one value of the
    /// stream, so that the step's errors still surface in its wait).
    fn record_resident(
        &self,
        r: &ResidentDecoder,
        cache: &mut PagedKvCache,
        seqs: &[StepSeq<'_>],
        readout: Readout,
    ) -> Result<(StepPending, bool)> {
        let c = &self.config;
        if r.layers.len() != c.num_layers {
            return Err(TwinferError::InvalidParameter("the resident state belongs to another model".into()));
        }
        let Arranged { n_decode, ids, indptr, positions, tokens, logit_rows } = self.arrange(cache, seqs)?;
        let copies = cache.take_page_copies();
        let (t, n) = (tokens.len(), logit_rows.len());
        let (h, qd, kvd, inter, vocab) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.vocab_size);
        let x = self.embed_rows(&tokens)?;
        let decode_table = cache.page_table(&ids[..n_decode])?;
        let prefill_table = cache.page_table(&ids[n_decode..])?;
        let prefill_indptr: Vec<u32> = indptr[n_decode..].iter().map(|&p| p - indptr[n_decode]).collect();
        let page_size = cache.layout().page_size;
        // Each token's position and where its K/V row goes.
        let mut rows_info = Vec::with_capacity(3 * t);
        for b in 0..ids.len() {
            let (table, tb) =
                if b < n_decode { (decode_table.as_table(), b) } else { (prefill_table.as_table(), b - n_decode) };
            for &pos in &positions[indptr[b] as usize..indptr[b + 1] as usize] {
                rows_info.extend([pos as u32, table.pages(tb)[pos / page_size], (pos % page_size) as u32]);
            }
        }
        let max_pos = positions.iter().copied().max().unwrap_or(0);
        let rope = r.rope_table(self, max_pos + 1)?;
        let (_, rope_table) = rope.as_ref().expect("made above");

        let f = 4;
        let mut rec = r.gpu.record_step(r.poison)?;
        rec.reserve(&[
            (Act::X, t * h * f),
            (Act::Qkv, t * (qd + 2 * kvd) * f),
            (Act::Q, t * qd * f),
            (Act::Attn, t * qd * f),
            (Act::GateUp, t * 2 * inter * f),
            (Act::Sel, n * h * f),
            (Act::Logits, n * vocab * f),
            (Act::Tokens, n * f),
            (Act::TopK, if let Readout::TopK(k) = readout { n * (2 * k + 1) * f } else { 0 }),
            (Act::Rows, rows_info.len() * f),
            (Act::SelRows, n * f),
            (Act::PageScratch, if copies.is_empty() { 0 } else { r.layers[0].kv.page_bytes() }),
            // Every layer has the first one's shapes.
            (Act::XSplit, {
                let mut uses = vec![(&*r.lm_head, n)];
                if let Some(l) = r.layers.first() {
                    uses.extend([(&*l.qkv, t), (&*l.o, t), (&*l.gate_up, t), (&*l.down, t)]);
                }
                rec.split_input_bytes(&uses)
            }),
        ])?;
        rec.write(Act::X, bytemuck::cast_slice(&x))?;
        rec.write(Act::Rows, bytemuck::cast_slice(&rows_info))?;
        rec.write(Act::SelRows, bytemuck::cast_slice(&logit_rows))?;
        rec.plan_rope(crate::gpu::params::RopeParams {
            rows: t as u32,
            num_qo_heads: c.num_heads as u32,
            num_kv_heads: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
            page_size: page_size as u32,
            q_width: ((qd + 2 * kvd) / 4) as u32,
            kv_codes_at: r.layers[0].kv.codes_at(),
            ..Default::default()
        })?;
        let params = self.attention_params();
        let pool = &r.layers[0].kv;
        let decode = match n_decode {
            0 => None,
            _ => Some(rec.plan_decode(&params, decode_table.as_table(), pool)?),
        };
        let prefill = match ids.len() - n_decode {
            0 => None,
            _ => rec.plan_prefill(&params, &prefill_indptr, prefill_table.as_table(), pool, n_decode)?,
        };

        let eps = c.rms_norm_eps;
        for l in &r.layers {
            rec.copy_pages(&l.kv, &copies)?;
            rec.linear(&l.qkv, Act::X, t, Act::Qkv, false, OnLoad::RmsNorm(&l.attn_norm, eps))?;
            rec.rope_append(t, &l.kv, rope_table)?;
            if let Some(d) = &decode {
                rec.decode(d, Act::Q, &l.kv, Act::Attn)?;
            }
            if let Some(p) = &prefill {
                rec.prefill(p, Act::Q, &l.kv, Act::Attn)?;
            }
            rec.linear(&l.o, Act::Attn, t, Act::X, true, OnLoad::Plain)?;
            rec.linear(&l.gate_up, Act::X, t, Act::GateUp, false, OnLoad::RmsNorm(&l.ffn_norm, eps))?;
            rec.linear(&l.down, Act::GateUp, t, Act::X, true, OnLoad::SwiGlu)?;
        }
        if n == 0 {
            return Ok((rec.submit(Act::X, 1)?, false));
        }
        rec.rms_norm(Act::X, &r.norm, n, eps, Act::Sel, true)?;
        rec.linear(&r.lm_head, Act::Sel, n, Act::Logits, false, OnLoad::Plain)?;
        match readout {
            Readout::Logits => Ok((rec.submit(Act::Logits, n * vocab)?, true)),
            Readout::Greedy => {
                rec.argmax_rows(Act::Logits, n, vocab, Act::Tokens)?;
                Ok((rec.submit(Act::Tokens, n)?, true))
            }
            Readout::TopK(k) => {
                // The candidates, then every row's greedy id (for the rows that sample greedily),
                // read back together.
                rec.topk_rows(Act::Logits, n, vocab, k, Act::TopK)?;
                rec.argmax_rows(Act::Logits, n, vocab, Act::Tokens)?;
                rec.copy(Act::Tokens, 0, Act::TopK, n * k * 2 * f, n * f)?;
                Ok((rec.submit(Act::TopK, n * (2 * k + 1))?, true))
            }
        }
    }
}

/// What a resident step reads back for the rows that get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readout {
    /// Their logits, for sampling on the host.
    Logits,
    /// Their greedy token ids.
    Greedy,
    /// Their `k` largest logits with ids, then their greedy token ids.
    TopK(usize),
}

//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA attention on
//! the paged KV cache, SwiGLU. One [`LlamaModel::forward`] runs a continuous-batching step: any mix
//! of prompt chunks and single decode tokens. Single tokens go to the decode engine, chunks to the
//! prefill engine, both against the same pages. When either engine of a step is the GPU engine,
//! the step's projections run there too (weights resident on the device); norms, RoPE and
//! activations stay on the CPU.

use std::sync::Arc;

use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, KvInput, PrefillInput};
use crate::backend::Attention;
use crate::cpu::SimdLevel;
use crate::dtype::{DType, TensorRef};
use crate::error::{Result, TwinferError};
use crate::kv::{PagedKvCache, SeqId};
use crate::model::config::DecoderConfig;
use crate::model::linear::Linear;
use crate::model::ops::{Rope, add_assign, rms_norm, rms_norm_into, silu_mul_rows};
use crate::model::weights::{WeightData, Weights};

#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub attn_norm: Vec<f32>,
    /// q, k and v stacked: `[q_dim + 2 * kv_dim, hidden]`.
    pub qkv: Linear,
    pub o: Linear,
    pub ffn_norm: Vec<f32>,
    /// gate and up stacked: `[2 * intermediate, hidden]`.
    pub gate_up: Linear,
    pub down: Linear,
}

/// A loaded decoder.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    /// Architecture and sizes.
    pub config: DecoderConfig,
    /// `[vocab, hidden]`, shared with `lm_head` when the embeddings are tied.
    pub(super) embed: Arc<WeightData>,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Vec<f32>,
    pub(super) lm_head: Linear,
    pub(super) rope: Rope,
}

/// A step's rows: decode tokens first (one contiguous block per engine), then prompt chunks.
#[derive(Debug)]
pub(super) struct Arranged {
    pub n_decode: usize,
    /// Cache sequences, in row order.
    pub ids: Vec<SeqId>,
    /// Row ranges per sequence, in row order.
    pub indptr: Vec<u32>,
    pub positions: Vec<usize>,
    pub tokens: Vec<u32>,
    /// The rows that get logits, in the caller's order.
    pub logit_rows: Vec<u32>,
}

/// One sequence's share of a step: `tokens` go to positions `start..start + tokens.len()`, which
/// the caller has reserved in the cache.
#[derive(Debug, Clone, Copy)]
pub struct StepSeq<'a> {
    /// The cache sequence.
    pub seq: SeqId,
    /// The new tokens.
    pub tokens: &'a [u32],
    /// Position of the first new token (the tokens the sequence already holds).
    pub start: usize,
    /// Which of the new tokens get logits.
    pub logits: Logits,
}

/// Which of a sequence's new tokens get logits back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// No logits (a prompt chunk that is not the last).
    None,
    /// After the last token: what sampling needs.
    Last,
    /// After every token (scoring a prompt).
    All,
}

/// The two engines a step uses; they may be different backends.
#[derive(Debug, Clone, Copy)]
pub struct Engines<'a> {
    /// CPU instruction set of the projections run on the CPU.
    pub level: SimdLevel,
    /// Attention engine of prompt chunks.
    pub prefill: &'a Attention,
    /// Attention engine of decode tokens.
    pub decode: &'a Attention,
}

impl<'a> Engines<'a> {
    /// Where a step's projections run: on the GPU engine of a phase the step has (the prefill
    /// engine's first, since prompt chunks are where the GPU pays most), else on the CPU at
    /// `level`. One device runs the whole step, so decode and prompt rows share each product.
    pub fn projections(&self, has_decode: bool, has_prefill: bool) -> Option<&'a crate::gpu::GpuEngine> {
        [(has_prefill, self.prefill), (has_decode, self.decode)]
            .into_iter()
            .filter(|(used, _)| *used)
            .find_map(|(_, a)| a.gpu_engine())
    }
}

impl LlamaModel {
    /// Builds the model from Hugging Face tensor names (`model.layers.{i}...`), each checked
    /// against the shape `config` implies.
    /// Errors with `ModelTensor` on a missing or misshapen tensor.
    pub fn load(config: DecoderConfig, w: &Weights) -> Result<Self> {
        let (h, q, kv, inter) = (config.hidden_size, config.q_dim(), config.kv_dim(), config.intermediate_size);
        let embed = Arc::new(w.get("model.embed_tokens.weight", &[config.vocab_size, h])?);
        let layers = (0..config.num_layers)
            .map(|i| {
                let l = format!("model.layers.{i}");
                let b = config.qkv_bias;
                Ok(Layer {
                    attn_norm: w.f32(&format!("{l}.input_layernorm.weight"), &[h])?,
                    qkv: Linear::stack(vec![
                        Linear::load(w, &format!("{l}.self_attn.q_proj"), q, h, b)?,
                        Linear::load(w, &format!("{l}.self_attn.k_proj"), kv, h, b)?,
                        Linear::load(w, &format!("{l}.self_attn.v_proj"), kv, h, b)?,
                    ])?,
                    o: Linear::load(w, &format!("{l}.self_attn.o_proj"), h, q, false)?,
                    ffn_norm: w.f32(&format!("{l}.post_attention_layernorm.weight"), &[h])?,
                    gate_up: Linear::stack(vec![
                        Linear::load(w, &format!("{l}.mlp.gate_proj"), inter, h, false)?,
                        Linear::load(w, &format!("{l}.mlp.up_proj"), inter, h, false)?,
                    ])?,
                    down: Linear::load(w, &format!("{l}.mlp.down_proj"), h, inter, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if config.tie_word_embeddings || !w.contains("lm_head.weight") {
            Linear::new(embed.clone(), None, config.vocab_size, h)
        } else {
            Linear::load(w, "lm_head", config.vocab_size, h, false)?
        };
        Ok(Self {
            embed,
            layers,
            norm: w.f32("model.norm.weight", &[h])?,
            lm_head,
            rope: Rope::new(config.head_dim, config.rope_theta, config.rope_scaling),
            config,
        })
    }

    /// Uploads every projection's weights to `gpu` now rather than at the first step (where the
    /// first token would pay for it); `progress(done, total)` counts weight bytes.
    pub fn upload_weights(&self, gpu: &crate::gpu::GpuEngine, mut progress: impl FnMut(usize, usize)) -> Result<()> {
        let linears: Vec<&Linear> =
            self.layers.iter().flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down]).chain([&self.lm_head]).collect();
        super::linear::upload_all(&linears, gpu, &mut progress)
    }

    /// Each projection's name and the format its weights are held in (`f16`, `q4_k`, ...), layer
    /// by layer, then the LM head: what a loaded file runs on.
    pub fn projection_formats(&self) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(4 * self.layers.len() + 1);
        for (i, l) in self.layers.iter().enumerate() {
            for (name, linear) in [("qkv", &l.qkv), ("o", &l.o), ("gate_up", &l.gate_up), ("down", &l.down)] {
                out.push((format!("layer {i} {name}"), linear.format_name()));
            }
        }
        out.push(("lm_head".into(), self.lm_head.format_name()));
        out
    }

    /// Attention parameters of every layer.
    pub fn attention_params(&self) -> AttentionParams {
        let c = &self.config;
        AttentionParams::new(c.num_heads, c.num_kv_heads, c.head_dim)
            .causal(true)
            .window_left(c.sliding_window.map(|w| w.saturating_sub(1)))
    }

    /// Bytes of weights a forward pass reads (every projection and the LM head once).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.weight_bytes() + l.o.weight_bytes() + l.gate_up.weight_bytes() + l.down.weight_bytes())
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// Runs one step and returns `[n, vocab]` logits: the rows each entry of `seqs` asked for, in
    /// that order. Appends every token's K/V to the cache. Blocks on a GPU engine; in a browser
    /// that is `WouldBlock` before anything is touched: use [`LlamaModel::forward_async`].
    pub fn forward(&self, e: Engines<'_>, cache: &mut PagedKvCache, seqs: &[StepSeq<'_>]) -> Result<Vec<f32>> {
        e.prefill.check_blocking("LlamaModel::forward")?;
        e.decode.check_blocking("LlamaModel::forward")?;
        crate::wait::block_on("LlamaModel::forward", self.forward_async(e, cache, seqs))?
    }

    /// [`LlamaModel::forward`] without blocking: each layer's attention is awaited. On an error
    /// (a lost GPU device included) the cache may hold some layers' K/V of this step's tokens:
    /// the caller recomputes those sequences ([`crate::engine::Scheduler`] does).
    pub async fn forward_async(
        &self,
        e: Engines<'_>,
        cache: &mut PagedKvCache,
        seqs: &[StepSeq<'_>],
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (h, qd, kvd) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let Arranged { n_decode, ids, indptr, positions, tokens, logit_rows } = self.arrange(cache, seqs)?;
        let t = tokens.len();
        let rows_decode = n_decode;
        let gpu = e.projections(n_decode > 0, n_decode < ids.len());
        let mut x = self.embed_rows(&tokens)?;

        let params = self.attention_params();
        let decode_table = cache.page_table(&ids[..n_decode])?;
        let prefill_table = cache.page_table(&ids[n_decode..])?;
        let prefill_indptr: Vec<u32> = indptr[n_decode..].iter().map(|&p| p - indptr[n_decode]).collect();
        let (mut hbuf, mut qkv, mut tmp, mut gate_up) = (vec![0f32; t * h], Vec::new(), Vec::new(), Vec::new());
        let (mut q, mut k, mut v, mut o) =
            (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd], vec![0f32; t * qd]);
        let mut act = vec![0f32; t * c.intermediate_size];
        let angles = self.rope.angles(&positions);
        let kv_dtype = cache.dtype();
        let (mut k_store, mut v_store) = (KvRows::default(), KvRows::default());
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm_into(&x, &layer.attn_norm, c.rms_norm_eps, &mut hbuf);
            layer.qkv.forward_async(e.level, gpu, &hbuf, t, &mut qkv).await?;
            for r in 0..t {
                let row = &qkv[r * (qd + 2 * kvd)..][..qd + 2 * kvd];
                q[r * qd..][..qd].copy_from_slice(&row[..qd]);
                k[r * kvd..][..kvd].copy_from_slice(&row[qd..qd + kvd]);
                v[r * kvd..][..kvd].copy_from_slice(&row[qd + kvd..]);
            }
            self.rope.apply(&mut q, c.num_heads, &angles);
            self.rope.apply(&mut k, c.num_kv_heads, &angles);
            cache.append(
                li,
                &ids,
                &indptr,
                k_store.view(&k, kv_dtype, c.head_dim),
                v_store.view(&v, kv_dtype, c.head_dim),
            )?;

            o.fill(f32::NAN);
            let kv = cache.layer(li)?;
            let (o_dec, o_pre) = o.split_at_mut(rows_decode * qd);
            if n_decode > 0 {
                let input = DecodeInput { q: (&q[..rows_decode * qd]).into(), kv, table: decode_table.as_table() };
                e.decode.decode_async(&params, &input, &mut AttentionOutput::new(o_dec)).await?;
            }
            if n_decode < ids.len() {
                let input = PrefillInput {
                    q: (&q[rows_decode * qd..]).into(),
                    qo_indptr: &prefill_indptr,
                    kv: KvInput::Paged { kv, table: prefill_table.as_table() },
                };
                e.prefill.prefill_async(&params, &input, &mut AttentionOutput::new(o_pre)).await?;
            }
            layer.o.forward_async(e.level, gpu, &o, t, &mut tmp).await?;
            add_assign(&mut x, &tmp);

            rms_norm_into(&x, &layer.ffn_norm, c.rms_norm_eps, &mut hbuf);
            layer.gate_up.forward_async(e.level, gpu, &hbuf, t, &mut gate_up).await?;
            silu_mul_rows(&gate_up, c.intermediate_size, &mut act);
            layer.down.forward_async(e.level, gpu, &act, t, &mut tmp).await?;
            add_assign(&mut x, &tmp);
        }

        // Logits only for the rows that asked, in the caller's order.
        let mut last_rows = Vec::with_capacity(logit_rows.len() * h);
        for &r in &logit_rows {
            last_rows.extend_from_slice(&x[r as usize * h..][..h]);
        }
        let n = last_rows.len() / h;
        rms_norm(&mut last_rows, &self.norm, c.rms_norm_eps);
        let mut logits = Vec::new();
        self.lm_head.forward_async(e.level, gpu, &last_rows, n, &mut logits).await?;
        Ok(logits)
    }

    /// Checks the step against the cache and lays out its rows.
    pub(super) fn arrange(&self, cache: &PagedKvCache, seqs: &[StepSeq<'_>]) -> Result<Arranged> {
        for s in seqs {
            if s.tokens.is_empty() || cache.seq_len(s.seq)? != s.start + s.tokens.len() {
                return Err(TwinferError::InvalidParameter(format!(
                    "sequence {}: {} new tokens at position {} do not end where its reserved length does",
                    s.seq,
                    s.tokens.len(),
                    s.start
                )));
            }
        }
        let is_decode = |s: &StepSeq<'_>| s.tokens.len() == 1 && s.start > 0;
        let order: Vec<usize> = (0..seqs.len())
            .filter(|&i| is_decode(&seqs[i]))
            .chain((0..seqs.len()).filter(|&i| !is_decode(&seqs[i])))
            .collect();
        let n_decode = seqs.iter().filter(|s| is_decode(s)).count();
        let ids: Vec<SeqId> = order.iter().map(|&i| seqs[i].seq).collect();
        let mut indptr = vec![0u32];
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        let mut first_row = vec![0usize; seqs.len()];
        for &i in &order {
            let s = &seqs[i];
            first_row[i] = tokens.len();
            tokens.extend_from_slice(s.tokens);
            positions.extend(s.start..s.start + s.tokens.len());
            indptr.push(tokens.len() as u32);
        }
        let mut logit_rows = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let rows = match s.logits {
                Logits::None => 0..0,
                Logits::Last => first_row[i] + s.tokens.len() - 1..first_row[i] + s.tokens.len(),
                Logits::All => first_row[i]..first_row[i] + s.tokens.len(),
            };
            logit_rows.extend(rows.map(|r| r as u32));
        }
        Ok(Arranged { n_decode, ids, indptr, positions, tokens, logit_rows })
    }

    pub(super) fn embed_rows(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut x = vec![0f32; tokens.len() * h];
        for (r, &id) in tokens.iter().enumerate() {
            let id = id as usize;
            if id >= vocab {
                return Err(TwinferError::InvalidParameter(format!(
                    "token id {id} is outside the vocabulary of {vocab}"
                )));
            }
            self.embed.row_f32(id, h, &mut x[r * h..][..h]);
        }
        Ok(x)
    }
}

/// K or V rows converted to the cache's dtype (a no-op view for f32).
#[derive(Debug, Default)]
struct KvRows {
    f16: Vec<half::f16>,
    bf16: Vec<half::bf16>,
    codes: Vec<i8>,
    scales: Vec<f32>,
}

impl KvRows {
    /// Q8 quantizes each head's row of `head_dim` values with its own scale.
    fn view<'a>(&'a mut self, rows: &'a [f32], dtype: DType, head_dim: usize) -> TensorRef<'a> {
        match dtype {
            DType::Q8 => {
                self.codes.resize(rows.len(), 0);
                self.scales.resize(rows.len() / head_dim, 0.0);
                crate::dtype::quantize_q8(rows, head_dim, &mut self.codes, &mut self.scales);
                TensorRef::Q8(crate::dtype::Q8Ref { codes: &self.codes, scales: &self.scales, group: head_dim })
            }
            DType::F32 => TensorRef::F32(rows),
            DType::F16 => {
                self.f16.clear();
                self.f16.extend(rows.iter().map(|&x| half::f16::from_f32(x)));
                TensorRef::F16(&self.f16)
            }
            DType::BF16 => {
                self.bf16.clear();
                self.bf16.extend(rows.iter().map(|&x| half::bf16::from_f32(x)));
                TensorRef::BF16(&self.bf16)
            }
        }
    }
}

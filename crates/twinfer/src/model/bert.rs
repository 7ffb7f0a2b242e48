//! The BERT encoder for sentence embeddings (all-MiniLM-L6-v2 and its family): learned absolute
//! positions, post-LayerNorm blocks, exact GELU, bidirectional attention through the prefill
//! engine over the ragged batch (no padding), then mean pooling and L2 normalisation.

use crate::attention::{AttentionOutput, AttentionParams, KvInput, PrefillInput};
use crate::backend::Attention;
use crate::cpu::SimdLevel;
use crate::error::{Result, TwinferError};
use crate::gpu::{GpuContext, GpuEngine};
use crate::model::bert_resident::{MAX_STEP_TOKENS, ResidentEncoder};
use crate::model::config::EncoderConfig;
use crate::model::linear::Linear;
use crate::model::ops::{add_assign, gelu, layer_norm};
use crate::model::weights::Weights;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub(super) struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub qkv: Linear,
    pub out: Linear,
    pub attn_norm: Norm,
    pub up: Linear,
    pub down: Linear,
    pub ffn_norm: Norm,
}

/// The device-resident state, made on the first GPU call and shared by clones of the model.
#[derive(Debug, Default)]
struct ResidentSlot {
    state: Option<Arc<ResidentEncoder>>,
    /// The device where making it failed, and why (not retried there).
    failed: Option<(Arc<GpuContext>, String)>,
    poison: bool,
}

/// A loaded BERT encoder.
#[derive(Debug, Clone)]
pub struct BertModel {
    /// Architecture and sizes.
    pub config: EncoderConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    resident: Arc<Mutex<ResidentSlot>>,
}

impl BertModel {
    /// Builds the encoder from Hugging Face tensor names, with or without the `bert.` prefix, each
    /// checked against the shape `config` implies.
    /// Errors with `ModelTensor` on a missing or misshapen tensor.
    pub fn load(config: EncoderConfig, w: &Weights) -> Result<Self> {
        // sentence-transformers exports drop the `bert.` prefix; full BertModel checkpoints keep it.
        let p = if w.contains("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let h = config.hidden_size;
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm { gamma: w.f32(&format!("{name}.weight"), &[h])?, beta: w.f32(&format!("{name}.bias"), &[h])? })
        };
        let layers = (0..config.num_layers)
            .map(|i| {
                let l = format!("{p}encoder.layer.{i}");
                Ok(Layer {
                    qkv: Linear::stack(vec![
                        Linear::load(w, &format!("{l}.attention.self.query"), h, h, true)?,
                        Linear::load(w, &format!("{l}.attention.self.key"), h, h, true)?,
                        Linear::load(w, &format!("{l}.attention.self.value"), h, h, true)?,
                    ])?,
                    out: Linear::load(w, &format!("{l}.attention.output.dense"), h, h, true)?,
                    attn_norm: norm(&format!("{l}.attention.output.LayerNorm"))?,
                    up: Linear::load(w, &format!("{l}.intermediate.dense"), config.intermediate_size, h, true)?,
                    down: Linear::load(w, &format!("{l}.output.dense"), h, config.intermediate_size, true)?,
                    ffn_norm: norm(&format!("{l}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: w.f32(&format!("{p}embeddings.word_embeddings.weight"), &[config.vocab_size, h])?,
            position: w
                .f32(&format!("{p}embeddings.position_embeddings.weight"), &[config.max_position_embeddings, h])?,
            token_type: w.f32(&format!("{p}embeddings.token_type_embeddings.weight"), &[config.type_vocab_size, h])?,
            embed_norm: norm(&format!("{p}embeddings.LayerNorm"))?,
            layers,
            config,
            resident: Arc::default(),
        })
    }

    pub(super) fn layers(&self) -> impl Iterator<Item = &Layer> {
        self.layers.iter()
    }

    /// Uploads every projection's weights to `gpu` now rather than at the first call;
    /// `progress(done, total)` counts weight bytes.
    pub fn upload_weights(&self, gpu: &crate::gpu::GpuEngine, mut progress: impl FnMut(usize, usize)) -> Result<()> {
        let linears: Vec<&Linear> = self.layers.iter().flat_map(|l| [&l.qkv, &l.out, &l.up, &l.down]).collect();
        super::linear::upload_all(&linears, gpu, &mut progress)
    }

    /// One L2-normalised, mean-pooled embedding per token sequence. Blocks on a GPU engine; in a
    /// browser that is `WouldBlock`: use [`BertModel::embed_async`].
    pub fn embed(&self, level: SimdLevel, attention: &Attention, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        attention.check_blocking("BertModel::embed")?;
        crate::wait::block_on("BertModel::embed", self.embed_async(level, attention, batch))?
    }

    /// [`BertModel::embed`] without blocking. On a GPU engine the whole encoder runs there in one
    /// step per batch (at most 8192 tokens; larger batches take several) and the
    /// last hidden states are read back once; where the resident path is unavailable (shapes it
    /// does not take, or `TWINFER_RESIDENT=0`), projections and attention run op by op.
    pub async fn embed_async(
        &self,
        level: SimdLevel,
        attention: &Attention,
        batch: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        let (indptr, x) = self.embed_rows(batch)?;
        // A GPU where the resident state cannot be made (its reason is in `residency`) runs op by op.
        let resident = attention.gpu_engine().and_then(|gpu| self.resident_on(gpu).ok().flatten());
        let Some(resident) = resident else {
            let hidden = self.hidden_op_by_op(level, attention, &indptr, x).await?;
            return Ok(pool_rows(&hidden, &indptr, self.config.hidden_size));
        };
        let h = self.config.hidden_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut first = 0;
        while first < batch.len() {
            // The texts of one step: as many as fit MAX_STEP_TOKENS (at least one).
            let mut last = first + 1;
            while last < batch.len() && indptr[last + 1] - indptr[first] <= MAX_STEP_TOKENS as u32 {
                last += 1;
            }
            let step_indptr: Vec<u32> = indptr[first..=last].iter().map(|&p| p - indptr[first]).collect();
            let rows = &x[indptr[first] as usize * h..indptr[last] as usize * h];
            let hidden = resident.hidden_states(self, &step_indptr, rows).await?;
            out.extend(pool_rows(&hidden, &step_indptr, h));
            first = last;
        }
        Ok(out)
    }

    /// Where [`BertModel::embed`] runs on `attention`'s engine, and why; on a GPU this makes
    /// the resident state now (uploading the weights) rather than on the first call.
    pub fn residency(&self, attention: &Attention) -> String {
        let Some(gpu) = attention.gpu_engine() else {
            return "op by op on the CPU engine".into();
        };
        match self.resident_on(gpu) {
            Ok(Some(_)) => format!("resident on {}: one readback per batch", gpu.context().summary.name),
            Ok(None) => "op by op on the GPU (TWINFER_RESIDENT=0)".into(),
            Err(e) => format!("op by op on the GPU: the resident path is unavailable ({e})"),
        }
    }

    /// The resident state on `gpu`, made (weights uploaded) on first use; `None` where it is
    /// turned off; the error that kept it from being made (once made, for every later call).
    fn resident_on(&self, gpu: &GpuEngine) -> Result<Option<Arc<ResidentEncoder>>> {
        #[cfg(not(target_arch = "wasm32"))]
        if std::env::var("TWINFER_RESIDENT").is_ok_and(|v| v == "0") {
            return Ok(None);
        }
        let mut slot = self.resident.lock().map_err(|_| TwinferError::DeviceLost("a previous call panicked".into()))?;
        if let Some(r) = slot.state.as_ref().filter(|r| r.is_on(gpu)) {
            return Ok(Some(r.clone()));
        }
        if let Some((ctx, why)) = &slot.failed
            && Arc::ptr_eq(ctx, gpu.context())
        {
            return Err(TwinferError::InvalidParameter(why.clone()));
        }
        match ResidentEncoder::new(self, gpu) {
            Ok(mut r) => {
                r.poison = slot.poison;
                let r = Arc::new(r);
                slot.state = Some(r.clone());
                Ok(Some(r))
            }
            Err(e) => {
                slot.failed = Some((gpu.context().clone(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Fills the resident path's step buffers with NaN before each step, so a value no kernel
    /// wrote shows up.
    #[doc(hidden)]
    pub fn poison_gpu_steps_for_test(&self) {
        if let Ok(mut slot) = self.resident.lock() {
            slot.poison = true;
            slot.state = None;
        }
    }

    /// [`BertModel::embed`] with the projections and attention run one by one, each awaited
    /// (the CPU engine's path; on a GPU, for comparisons).
    #[doc(hidden)]
    pub fn embed_op_by_op(&self, level: SimdLevel, attention: &Attention, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        attention.check_blocking("BertModel::embed_op_by_op")?;
        let (indptr, x) = self.embed_rows(batch)?;
        let hidden =
            crate::wait::block_on("BertModel::embed_op_by_op", self.hidden_op_by_op(level, attention, &indptr, x))??;
        Ok(pool_rows(&hidden, &indptr, self.config.hidden_size))
    }

    /// The texts' rows as CSR offsets and their embeddings after the embedding norm.
    fn embed_rows(&self, batch: &[Vec<u32>]) -> Result<(Vec<u32>, Vec<f32>)> {
        let c = &self.config;
        let h = c.hidden_size;
        let mut indptr = vec![0u32];
        for ids in batch {
            if ids.is_empty() || ids.len() > c.max_position_embeddings {
                return Err(TwinferError::RequestTooLarge {
                    tokens: ids.len(),
                    reason: format!("the encoder takes 1..={} tokens per text", c.max_position_embeddings),
                });
            }
            indptr.push(indptr.last().unwrap() + ids.len() as u32);
        }
        let tokens = *indptr.last().unwrap() as usize;
        let mut x = vec![0f32; tokens * h];
        for (b, ids) in batch.iter().enumerate() {
            for (pos, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if id >= c.vocab_size {
                    return Err(TwinferError::InvalidParameter(format!("token id {id} is outside the vocabulary")));
                }
                let row = &mut x[(indptr[b] as usize + pos) * h..][..h];
                for (j, v) in row.iter_mut().enumerate() {
                    *v = self.word[id * h + j] + self.position[pos * h + j] + self.token_type[j];
                }
            }
        }
        layer_norm(&mut x, &self.embed_norm.gamma, &self.embed_norm.beta, c.layer_norm_eps);
        Ok((indptr, x))
    }

    /// The last hidden states, op by op.
    async fn hidden_op_by_op(
        &self,
        level: SimdLevel,
        attention: &Attention,
        indptr: &[u32],
        mut x: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden_size;
        let tokens = *indptr.last().unwrap_or(&0) as usize;
        let params = AttentionParams::new(c.num_heads, c.num_heads, c.head_dim());
        // On the GPU engine the projections run there too; LayerNorm and GELU stay on the CPU.
        let gpu = attention.gpu_engine();
        let (mut qkv, mut q, mut k, mut v) =
            (Vec::new(), vec![0f32; tokens * h], vec![0f32; tokens * h], vec![0f32; tokens * h]);
        let (mut o, mut tmp, mut ffn) = (vec![0f32; tokens * h], Vec::new(), Vec::new());
        for layer in &self.layers {
            layer.qkv.forward_async(level, gpu, &x, tokens, &mut qkv).await?;
            for t in 0..tokens {
                let row = &qkv[t * 3 * h..][..3 * h];
                q[t * h..][..h].copy_from_slice(&row[..h]);
                k[t * h..][..h].copy_from_slice(&row[h..2 * h]);
                v[t * h..][..h].copy_from_slice(&row[2 * h..]);
            }
            o.fill(f32::NAN);
            let input = PrefillInput {
                q: (&q[..]).into(),
                qo_indptr: indptr,
                kv: KvInput::Ragged { k: (&k[..]).into(), v: (&v[..]).into(), kv_indptr: indptr },
            };
            attention.prefill_async(&params, &input, &mut AttentionOutput::new(&mut o[..])).await?;
            layer.out.forward_async(level, gpu, &o, tokens, &mut tmp).await?;
            add_assign(&mut x, &tmp);
            layer_norm(&mut x, &layer.attn_norm.gamma, &layer.attn_norm.beta, c.layer_norm_eps);
            layer.up.forward_async(level, gpu, &x, tokens, &mut ffn).await?;
            gelu(&mut ffn);
            layer.down.forward_async(level, gpu, &ffn, tokens, &mut tmp).await?;
            add_assign(&mut x, &tmp);
            layer_norm(&mut x, &layer.ffn_norm.gamma, &layer.ffn_norm.beta, c.layer_norm_eps);
        }

        Ok(x)
    }
}

/// Mean pooling of each text's rows, L2-normalised (in f64).
fn pool_rows(x: &[f32], indptr: &[u32], h: usize) -> Vec<Vec<f32>> {
    (0..indptr.len() - 1)
        .map(|b| {
            let (start, end) = (indptr[b] as usize, indptr[b + 1] as usize);
            let mut mean = vec![0f64; h];
            for t in start..end {
                for (m, &v) in mean.iter_mut().zip(&x[t * h..][..h]) {
                    *m += v as f64;
                }
            }
            let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12);
            mean.iter().map(|m| (m / norm) as f32).collect()
        })
        .collect()
}

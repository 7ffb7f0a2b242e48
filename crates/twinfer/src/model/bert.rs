//! The BERT encoder for sentence embeddings (all-MiniLM-L6-v2 and its family): learned absolute
//! positions, post-LayerNorm blocks, exact GELU, bidirectional attention through the prefill
//! engine over the ragged batch (no padding), then mean pooling and L2 normalisation.

use crate::attention::{AttentionOutput, AttentionParams, KvInput, PrefillInput};
use crate::backend::Attention;
use crate::cpu::SimdLevel;
use crate::error::{Result, TwinferError};
use crate::model::config::EncoderConfig;
use crate::model::linear::Linear;
use crate::model::ops::{add_assign, gelu, layer_norm};
use crate::model::weights::Weights;

#[derive(Debug, Clone)]
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Layer {
    qkv: Linear,
    out: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    ffn_norm: Norm,
}

/// A loaded BERT encoder.
#[derive(Debug, Clone)]
pub struct BertModel {
    pub config: EncoderConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

impl BertModel {
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
        })
    }

    /// One L2-normalised, mean-pooled embedding per token sequence. Blocks on a GPU engine; in a
    /// browser that is `WouldBlock`: use [`BertModel::embed_async`].
    pub fn embed(&self, level: SimdLevel, attention: &Attention, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        attention.check_blocking("BertModel::embed")?;
        crate::wait::block_on("BertModel::embed", self.embed_async(level, attention, batch))?
    }

    /// [`BertModel::embed`] without blocking: each layer's attention is awaited.
    pub async fn embed_async(
        &self,
        level: SimdLevel,
        attention: &Attention,
        batch: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
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
                qo_indptr: &indptr,
                kv: KvInput::Ragged { k: (&k[..]).into(), v: (&v[..]).into(), kv_indptr: &indptr },
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

        Ok((0..batch.len())
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
            .collect())
    }
}

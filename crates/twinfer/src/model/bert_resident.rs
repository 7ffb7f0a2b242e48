//! The BERT encoder resident on a GPU: the projections' weights and the norms uploaded once, a
//! batch of texts recorded as one step (every layer's projections, attention and norms) and read
//! back once, as the last hidden states that the host pools. The op-by-op path read each layer's
//! projections and attention back, which in a browser is a `mapAsync` round trip each.
//!
//! Attention runs through the prefill kernel without a mask over a temporary paged pool: each
//! layer's fused q/k/v rows are split into it (unrotated: positions are learned embeddings) and
//! the next layer overwrites them, which the step's order makes safe.

use std::sync::{Arc, Mutex};

use crate::attention::AttentionParams;
use crate::error::{Result, TwinferError};
use crate::gpu::params::RopeParams;
use crate::gpu::{Act, DeviceVec, GpuEngine, GpuKvCache, GpuLinear, KvStorage, OnLoad};
use crate::kv::{KvLayout, PageTable};
use crate::model::bert::BertModel;

/// Tokens of the temporary pool's pages.
const PAGE: usize = 16;
/// Texts are recorded in steps of at most this many tokens (bounds the step's buffers:
/// 8192 tokens of MiniLM's feed-forward are 48 MiB).
pub(super) const MAX_STEP_TOKENS: usize = 8192;

#[derive(Debug)]
struct ResidentLayer {
    qkv: Arc<GpuLinear>,
    out: Arc<GpuLinear>,
    up: Arc<GpuLinear>,
    down: Arc<GpuLinear>,
    attn_norm: (DeviceVec, DeviceVec),
    ffn_norm: (DeviceVec, DeviceVec),
}

/// An encoder's device-resident state on one GPU engine.
#[derive(Debug)]
pub struct ResidentEncoder {
    gpu: GpuEngine,
    layers: Vec<ResidentLayer>,
    /// The attention's K/V pool, regrown by doubling.
    pool: Mutex<Option<GpuKvCache>>,
    /// Fill every step buffer with NaN before recording (tests).
    pub(super) poison: bool,
}

impl Drop for ResidentEncoder {
    /// The engine's bind-group cache would otherwise keep the norms and the pool alive.
    fn drop(&mut self) {
        let ids: Vec<u64> = self
            .layers
            .iter()
            .flat_map(|l| [&l.attn_norm.0, &l.attn_norm.1, &l.ffn_norm.0, &l.ffn_norm.1])
            .map(DeviceVec::cache_id)
            .collect();
        let pool = self.pool.get_mut().ok().and_then(|p| p.take());
        self.gpu.forget_bind_groups(|id| ids.contains(&id) || pool.as_ref().is_some_and(|p| p.owns_cache_id(id)));
    }
}

impl ResidentEncoder {
    /// Uploads `model`'s projections (reusing copies already on `gpu`) and norms. Errors when
    /// the shapes are outside what the resident kernels take.
    pub fn new(model: &BertModel, gpu: &GpuEngine) -> Result<Self> {
        let c = &model.config;
        let head_dim = c.head_dim();
        if !head_dim.is_multiple_of(8) || !c.hidden_size.is_multiple_of(4) || !c.intermediate_size.is_multiple_of(4) {
            return Err(TwinferError::InvalidParameter(format!(
                "the resident GPU encoder needs head_dim % 8 == 0 and hidden, intermediate % 4 == 0 (got {head_dim}, {}, {})",
                c.hidden_size, c.intermediate_size
            )));
        }
        let vec = |v: &[f32]| DeviceVec::upload(gpu, v);
        let layers = model
            .layers()
            .map(|l| {
                Ok(ResidentLayer {
                    qkv: l.qkv.on_device(gpu)?,
                    out: l.out.on_device(gpu)?,
                    up: l.up.on_device(gpu)?,
                    down: l.down.on_device(gpu)?,
                    attn_norm: (vec(&l.attn_norm.gamma)?, vec(&l.attn_norm.beta)?),
                    ffn_norm: (vec(&l.ffn_norm.gamma)?, vec(&l.ffn_norm.beta)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { gpu: gpu.clone(), layers, pool: Mutex::new(None), poison: false })
    }

    /// Whether this state lives on `gpu`'s device.
    pub fn is_on(&self, gpu: &GpuEngine) -> bool {
        Arc::ptr_eq(self.gpu.context(), gpu.context())
    }

    /// The last hidden states `[tokens, hidden]` of texts `indptr` (CSR over `x`'s rows) from
    /// their embeddings `x` (after the embedding norm), in one step and one readback.
    pub async fn hidden_states(&self, model: &BertModel, indptr: &[u32], x: &[f32]) -> Result<Vec<f32>> {
        let c = &model.config;
        let (h, inter, heads, d) = (c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim());
        let t = *indptr.last().unwrap_or(&0) as usize;
        if t == 0 || x.len() != t * h {
            return Err(TwinferError::ShapeMismatch { what: "encoder rows", expected: t * h, got: x.len() });
        }
        // Each text's pages are consecutive in the pool; a token's K/V row is (page, slot).
        let texts = indptr.len() - 1;
        let (mut page_indptr, mut last_page_len, mut rows_info) = (vec![0u32], Vec::new(), Vec::with_capacity(3 * t));
        for b in 0..texts {
            let len = (indptr[b + 1] - indptr[b]) as usize;
            let first = *page_indptr.last().unwrap();
            for pos in 0..len {
                rows_info.extend([pos as u32, first + (pos / PAGE) as u32, (pos % PAGE) as u32]);
            }
            page_indptr.push(first + len.div_ceil(PAGE) as u32);
            last_page_len.push(((len - 1) % PAGE + 1) as u32);
        }
        let pages = *page_indptr.last().unwrap() as usize;
        let indices: Vec<u32> = (0..pages as u32).collect();
        // Recorded and submitted under the pool's lock, awaited without it (a browser may start
        // another call meanwhile; the queue runs the steps in order).
        let pending = {
            let mut pool = self.pool.lock().map_err(|_| TwinferError::DeviceLost("a previous call panicked".into()))?;
            if pool.as_ref().is_none_or(|p| p.num_pages < pages) {
                if let Some(old) = pool.take() {
                    self.gpu.forget_bind_groups(|id| old.owns_cache_id(id));
                }
                let layout = KvLayout::new(PAGE, heads, d)?;
                *pool = Some(GpuKvCache::new(&self.gpu, layout, pages.next_power_of_two(), KvStorage::F32, u64::MAX)?);
            }
            let pool = pool.as_ref().expect("made above");

            let f = 4;
            let mut rec = self.gpu.record_step(self.poison)?;
            rec.reserve(&[
                (Act::X, t * h * f),
                (Act::Qkv, t * 3 * h * f),
                (Act::Q, t * h * f),
                (Act::Attn, t * h * f),
                (Act::GateUp, t * inter * f),
                (Act::Rows, rows_info.len() * f),
                // Every layer has the first one's shapes.
                (Act::XSplit, {
                    let uses: Vec<(&GpuLinear, usize)> = self
                        .layers
                        .first()
                        .map_or(Vec::new(), |l| vec![(&*l.qkv, t), (&*l.out, t), (&*l.up, t), (&*l.down, t)]);
                    rec.split_input_bytes(&uses)
                }),
            ])?;
            rec.write(Act::X, bytemuck::cast_slice(x))?;
            rec.write(Act::Rows, bytemuck::cast_slice(&rows_info))?;
            rec.plan_rope(RopeParams {
                rows: t as u32,
                num_qo_heads: heads as u32,
                num_kv_heads: heads as u32,
                head_dim: d as u32,
                page_size: PAGE as u32,
                q_width: (3 * h / 4) as u32,
                no_rotation: 1,
                ..Default::default()
            })?;
            let params = AttentionParams::new(heads, heads, d);
            let table = PageTable::new(&page_indptr, &indices, &last_page_len);
            let attention = rec
                .plan_prefill(&params, indptr, table, pool, 0)?
                .ok_or_else(|| TwinferError::InvalidParameter("the encoder's attention planned no work".into()))?;
            let eps = c.layer_norm_eps;
            for l in &self.layers {
                rec.linear(&l.qkv, Act::X, t, Act::Qkv, false, OnLoad::Plain)?;
                // The table is not read without rotation; any vector binds.
                rec.rope_append(t, pool, &l.attn_norm.0)?;
                rec.prefill(&attention, Act::Q, pool, Act::Attn)?;
                rec.linear(&l.out, Act::Attn, t, Act::X, true, OnLoad::Plain)?;
                rec.layer_norm(Act::X, &l.attn_norm.0, &l.attn_norm.1, t, eps)?;
                rec.linear(&l.up, Act::X, t, Act::GateUp, false, OnLoad::Plain)?;
                rec.linear(&l.down, Act::GateUp, t, Act::X, true, OnLoad::Gelu)?;
                rec.layer_norm(Act::X, &l.ffn_norm.0, &l.ffn_norm.1, t, eps)?;
            }
            rec.submit(Act::X, t * h)?
        };
        pending.wait_async().await
    }
}

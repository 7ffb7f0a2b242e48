//! The attention calls over host slices (decode and prefill), with the same semantics as the CPU
//! engine's: each stages its inputs into pooled buffers, records one submission and reads the
//! results back.

use super::engine::{
    DECODE_MIN_CHUNK, DECODE_TARGET_WORKGROUPS, DecodePlan, DecodeStep, GpuEngine, MergePlan, PrefillPlan,
    decode_shape, portable_prefill_tile, prefill_tile, prefill_work, q_f32, unreachable_qo,
};
use super::params::{AttnParams, MergeParams, NO_WINDOW};
use super::pending::{Pending, Readback, Scopes};
use super::resources::{Bind, PipelineKey, Resources, Slot, Tile};
use super::shaders::{Kernel, KvStorage, Variant};
use super::upload::{self, Meta};
use crate::attention::problem::{KvSource, Problem};
use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, PrefillInput};
use crate::cpu::SplitK;
use crate::error::{Result, TwinferError};
use crate::wait::blocking;

impl GpuEngine {
    /// Batch decode over the paged cache. Blocks; in a browser use [`GpuEngine::decode_async`].
    pub fn decode(
        &self,
        params: &AttentionParams,
        input: &DecodeInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        blocking("GpuEngine::decode", self.decode_async(params, input, out))?
    }

    /// [`GpuEngine::decode`] without blocking.
    pub async fn decode_async(
        &self,
        params: &AttentionParams,
        input: &DecodeInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        if let Some(pending) = self.decode_submit(params, input, out)? {
            pending.wait_async().await?.write(out);
        }
        Ok(())
    }

    fn decode_submit(
        &self,
        params: &AttentionParams,
        input: &DecodeInput<'_>,
        out: &AttentionOutput<'_>,
    ) -> Result<Option<Pending>> {
        let p = Problem::decode(params, input)?;
        p.check_output(out)?;
        self.context().check_alive()?;
        if p.batch == 0 {
            return Ok(None);
        }
        let storage = self.kv_storage(input.kv.dtype());
        let limit = self.context().limits.max_storage_buffer_binding_size;
        let kv = upload::paged_kv(
            input.kv.k,
            input.kv.v,
            input.kv.layout.page_elems(),
            input.table.indices,
            storage,
            limit,
        )?;
        let mut res = self.lock()?;
        let scope = Scopes::push(self.context());
        self.write(&mut res, Slot::K, &kv.k)?;
        self.write(&mut res, Slot::V, &kv.v)?;
        let step =
            DecodeStep { p: &p, page_size: input.kv.layout.page_size, indices: &kv.indices, storage, kv_codes_at: 0 };
        self.decode_on_device(&mut res, &step, &[(Bind::Slot(Slot::K), Bind::Slot(Slot::V))], u32::MAX)?;
        let rows = p.batch * params.num_qo_heads;
        let readback = Readback::queue(self.context(), &mut res, rows, params.head_dim, out.lse.is_some())?;
        Ok(Some(self.submitted(scope, Some(readback))))
    }

    pub(super) fn submitted(&self, scope: Scopes, readback: Option<Readback>) -> Pending {
        scope.submitted(self.context(), self.resources(), readback)
    }

    /// Writes Q and the page table, then records and submits decode (and merge): the result is in
    /// the O and Lse slots. K and V are bound as given (pool slots or a device-resident cache),
    /// one (K, V) pair per buffer of a split pool, page p living in buffer p / pages_per_buffer.
    pub(super) fn decode_on_device(
        &self,
        res: &mut Resources,
        step: &DecodeStep<'_>,
        kv_buffers: &[(Bind<'_>, Bind<'_>)],
        pages_per_buffer: u32,
    ) -> Result<()> {
        let plan = self.decode_plan(step, kv_buffers.len(), pages_per_buffer)?;
        let (o_slot, lse_slot) = if plan.merge.is_some() { (Slot::OPart, Slot::LsePart) } else { (Slot::O, Slot::Lse) };
        let ctx = &**self.context();
        match step.p.q {
            crate::dtype::TensorRef::F32(q) => self.write(res, Slot::Q, bytemuck::cast_slice(q))?,
            _ => self.write(res, Slot::Q, bytemuck::cast_slice(&q_f32(step.p)))?,
        }
        self.write(res, Slot::Meta, bytemuck::cast_slice(&plan.meta))?;
        res.buffer(ctx, o_slot, plan.o_bytes)?;
        res.buffer(ctx, lse_slot, plan.lse_bytes)?;
        let binds = |k, v| {
            vec![
                Bind::Slot(Slot::AttnParams),
                Bind::Slot(Slot::Q),
                k,
                v,
                Bind::Slot(Slot::Meta),
                Bind::Slot(o_slot),
                Bind::Slot(lse_slot),
            ]
        };
        // One submission per buffer but the last: each pass needs its own `kv_buffer` parameter,
        // and writes between submissions are ordered with them.
        let (last, first) =
            kv_buffers.split_last().ok_or_else(|| TwinferError::InvalidParameter("no KV buffer".into()))?;
        for (i, (k, v)) in first.iter().enumerate() {
            self.write(res, Slot::AttnParams, bytemuck::bytes_of(&AttnParams { kv_buffer: i as u32, ..plan.prm }))?;
            self.run_passes(res, &[(plan.key, binds(*k, *v), plan.grid)])?;
        }
        let last_prm = AttnParams { kv_buffer: first.len() as u32, ..plan.prm };
        self.write(res, Slot::AttnParams, bytemuck::bytes_of(&last_prm))?;
        let mut passes = vec![(plan.key, binds(last.0, last.1), plan.grid)];
        if let Some(m) = &plan.merge {
            self.write(res, Slot::MergeParams, bytemuck::bytes_of(&m.params))?;
            res.buffer(ctx, Slot::O, m.o_bytes)?;
            res.buffer(ctx, Slot::Lse, m.lse_bytes)?;
            let mbinds = [Slot::MergeParams, Slot::OPart, Slot::LsePart, Slot::O, Slot::Lse].map(Bind::Slot);
            passes.push((m.key, mbinds.to_vec(), m.grid));
        }
        self.run_passes(res, &passes)
    }

    /// The decode kernel's configuration for a validated call: parameters (for buffer 0 of the
    /// pool), the page table words, the split-K partition and the merge that follows a split.
    /// Computed once per step and reused by every layer.
    pub(super) fn decode_plan(
        &self,
        step: &DecodeStep<'_>,
        num_kv_buffers: usize,
        pages_per_buffer: u32,
    ) -> Result<DecodePlan> {
        let (p, params) = (step.p, step.p.params);
        let (hq, hk, d) = (params.num_qo_heads, params.num_kv_heads, params.head_dim);
        let table = match p.kv {
            KvSource::Paged { table, .. } => table,
            KvSource::Ragged { .. } => return Err(TwinferError::InvalidParameter("decode needs a page table".into())),
        };
        let mut meta = Meta::default();
        meta.push(table.indptr);
        let off_indices = meta.push(step.indices);
        let off_last_len = meta.push(table.last_page_len);
        let off_alibi = meta.push_f32(params.alibi_slopes.as_deref().unwrap_or(&[]));

        let (gq, u, step_keys) = decode_shape(params.group_size(), d, self.options().decode_wg as usize);
        let n_gblk = params.group_size().div_ceil(gq);
        let longest = (0..p.batch).map(|b| p.kv.kv_len(b)).max().unwrap_or(0).max(1);
        let chunk_len = match self.options().split_k {
            SplitK::Off => longest,
            SplitK::ChunkSize(n) => n.max(1),
            SplitK::Auto => {
                let base = p.batch * hk * n_gblk;
                let chunks = (DECODE_TARGET_WORKGROUPS / base.max(1))
                    .min(longest.div_ceil(DECODE_MIN_CHUNK.max(step_keys)))
                    .max(1);
                longest.div_ceil(chunks).next_multiple_of(step_keys)
            }
        };
        let chunks_per_pass = longest.div_ceil(chunk_len);
        let num_chunks = chunks_per_pass * num_kv_buffers;
        let prm = AttnParams {
            num_chunks: num_chunks as u32,
            pages_per_buffer,
            chunk_len: chunk_len as u32,
            off_indices,
            off_last_len,
            off_alibi,
            paged: 1,
            kv_codes_at: step.kv_codes_at,
            ..self.base_params(params, p.batch, step.page_size)
        };
        let rows = p.batch * hq;
        let key = PipelineKey {
            kernel: Kernel::Decode,
            variant: self.decode_variant(d),
            kv: step.storage,
            tile: Tile { wg: self.options().decode_wg, br: gq as u32, bc: u as u32, chunk: 0 },
        };
        let merge = (num_chunks > 1).then(|| MergePlan {
            params: MergeParams {
                rows: rows as u32,
                num_heads: hq as u32,
                num_chunks: num_chunks as u32,
                head_dim: d as u32,
            },
            key: PipelineKey {
                kernel: Kernel::Merge,
                variant: Variant::Baseline,
                kv: KvStorage::F32,
                tile: Tile { wg: 64, br: 0, bc: 0, chunk: 0 },
            },
            grid: [rows.min(32768), rows.div_ceil(32768), 1],
            o_bytes: (rows * d * 4) as u64,
            lse_bytes: (rows * 4) as u64,
        });
        Ok(DecodePlan {
            prm,
            meta: meta.data,
            key,
            grid: [hk * n_gblk, chunks_per_pass, p.batch],
            o_bytes: (rows * num_chunks * d * 4) as u64,
            lse_bytes: (rows * num_chunks * 4) as u64,
            merge,
        })
    }

    /// Decode's subgroup path makes teams of `head_dim / 8` lanes inside one subgroup: only where
    /// that divides every subgroup size of the adapter and the workgroup is whole subgroups; else
    /// the baseline, which assumes no subgroup size.
    fn decode_variant(&self, head_dim: usize) -> Variant {
        let lpk = (head_dim / 8) as u32;
        let (lo, hi) = self.context().summary.subgroup_sizes;
        let fits = lpk.is_power_of_two() && lo >= lpk && hi > 0 && self.options().decode_wg.is_multiple_of(hi);
        if self.options().variant == Variant::Subgroup && fits { Variant::Subgroup } else { Variant::Baseline }
    }

    /// Batch prefill over ragged or paged KV. Blocks; in a browser use
    /// [`GpuEngine::prefill_async`].
    pub fn prefill(
        &self,
        params: &AttentionParams,
        input: &PrefillInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        blocking("GpuEngine::prefill", self.prefill_async(params, input, out))?
    }

    /// [`GpuEngine::prefill`] without blocking.
    pub async fn prefill_async(
        &self,
        params: &AttentionParams,
        input: &PrefillInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        if let Some(pending) = self.prefill_submit(params, input, out)? {
            pending.wait_async().await?.write(out);
        }
        Ok(())
    }

    fn prefill_submit(
        &self,
        params: &AttentionParams,
        input: &PrefillInput<'_>,
        out: &AttentionOutput<'_>,
    ) -> Result<Option<Pending>> {
        let p = Problem::prefill(params, input)?;
        p.check_output(out)?;
        self.context().check_alive()?;
        let storage = self.kv_storage(p.kv.k().dtype());
        let limit = self.context().limits.max_storage_buffer_binding_size;
        let (kv, page_size) = match p.kv {
            KvSource::Ragged { k, v, .. } => {
                let kv = upload::KvBytes {
                    k: upload::tensor_bytes(k, 0, k.len(), storage)?,
                    v: upload::tensor_bytes(v, 0, v.len(), storage)?,
                    indices: Vec::new(),
                };
                (kv, 1)
            }
            KvSource::Paged { kv, table } => {
                let l = kv.layout;
                (upload::paged_kv(kv.k, kv.v, l.page_elems(), table.indices, storage, limit)?, l.page_size)
            }
        };
        let Some(plan) = self.prefill_plan(&p, &kv.indices, page_size, storage, 0)? else { return Ok(None) };
        let q = q_f32(&p);
        let (hq, d) = (params.num_qo_heads, params.head_dim);
        let rows = p.total_q * hq;
        let mut res = self.lock()?;
        let ctx = &**self.context();
        let scope = Scopes::push(ctx);
        self.write(&mut res, Slot::AttnParams, bytemuck::bytes_of(&plan.prm))?;
        self.write(&mut res, Slot::Q, bytemuck::cast_slice(&q))?;
        self.write(&mut res, Slot::K, &kv.k)?;
        self.write(&mut res, Slot::V, &kv.v)?;
        self.write(&mut res, Slot::Meta, bytemuck::cast_slice(&plan.meta))?;
        res.buffer(ctx, Slot::O, (rows * d * 4) as u64)?;
        res.buffer(ctx, Slot::Lse, (rows * 4) as u64)?;
        let slots = [Slot::AttnParams, Slot::Q, Slot::K, Slot::V, Slot::Meta, Slot::O, Slot::Lse].map(Bind::Slot);
        self.run_passes(&mut res, &[(plan.key, slots.to_vec(), plan.grid)])?;
        let readback = Readback::queue(ctx, &mut res, rows, d, out.lse.is_some())?;
        Ok(Some(self.submitted(scope, Some(readback))))
    }

    /// The prefill kernel's configuration for a validated call: parameters, the page table (with
    /// `indices`, the page ids as the kernel sees them) and the work list, longest tiles first.
    /// `None` when there is nothing to compute. Computed once per step, reused by every layer.
    pub(super) fn prefill_plan(
        &self,
        p: &Problem<'_>,
        indices: &[u32],
        page_size: usize,
        storage: KvStorage,
        kv_codes_at: u32,
    ) -> Result<Option<PrefillPlan>> {
        let params = p.params;
        let hk = params.num_kv_heads;
        let d = params.head_dim;
        let kernel = self.prefill_kernel_for(d, storage);
        let tile = match kernel {
            Kernel::PrefillPortable => portable_prefill_tile(d),
            // Fixed 128 threads and 64 x 64 tiles; the head dim is the kernel's one knob.
            Kernel::PrefillCoop => Tile { wg: 128, br: 64, bc: 64, chunk: d as u32 },
            _ => prefill_tile(d, self.context().limits.max_compute_workgroup_storage_size),
        };
        let work = prefill_work(p, params, tile.br as usize);
        if work.is_empty() {
            return Ok(None);
        }
        let mut meta = Meta::default();
        let (off_indices, off_last_len, paged) = match p.kv {
            KvSource::Ragged { indptr, .. } => {
                meta.push(indptr);
                let off = meta.push(indices);
                (off, off, 0)
            }
            KvSource::Paged { table, .. } => {
                meta.push(table.indptr);
                let off = meta.push(indices);
                (off, meta.push(table.last_page_len), 1)
            }
        };
        let off_qo_indptr = match p.qo {
            crate::attention::problem::QoRows::Ragged(ptr) => meta.push(ptr),
            crate::attention::problem::QoRows::OnePerSeq => unreachable_qo()?,
        };
        let off_alibi = meta.push_f32(params.alibi_slopes.as_deref().unwrap_or(&[]));
        let num_work = (work.len() / 2) as u32;
        let off_work = meta.push(&work);
        let prm = AttnParams {
            off_indices,
            off_last_len,
            off_qo_indptr,
            off_alibi,
            off_work,
            num_work,
            paged,
            num_chunks: 1,
            kv_codes_at,
            ..self.base_params(params, p.batch, page_size)
        };
        // The tensor-core kernel uses subgroups whatever the variant.
        let variant = if kernel == Kernel::Prefill { self.options().variant } else { Variant::Baseline };
        let key = PipelineKey { kernel, variant, kv: storage, tile };
        Ok(Some(PrefillPlan { prm, meta: meta.data, key, grid: [hk, num_work as usize, 1] }))
    }

    fn base_params(&self, params: &AttentionParams, batch: usize, page_size: usize) -> AttnParams {
        AttnParams {
            num_qo_heads: params.num_qo_heads as u32,
            num_kv_heads: params.num_kv_heads as u32,
            head_dim: params.head_dim as u32,
            group: params.group_size() as u32,
            page_size: page_size as u32,
            batch: batch as u32,
            causal: params.causal as u32,
            // Widths beyond any position are the same as no window (and stay clear of i32 overflow).
            window_left: params.window_left.filter(|&w| w < 1 << 30).map_or(NO_WINDOW, |w| w as u32),
            sm_scale: params.resolved_sm_scale(),
            soft_cap: params.logits_soft_cap.unwrap_or(0.0),
            has_alibi: params.alibi_slopes.is_some() as u32,
            pages_per_buffer: u32::MAX,
            ..Default::default()
        }
    }
}

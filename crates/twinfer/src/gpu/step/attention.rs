//! The step's attention: the page copies of forked sequences, RoPE with the KV append, and
//! decode and prefill planned once per step and run per layer against each layer's pool.

use super::*;

impl<'e> StepRecorder<'e> {
    /// Makes the host cache's copy-on-write copies in a layer's device pool, K and V: the first
    /// `rows` rows of page `src` into page `dst`, before anything this step appends.
    pub fn copy_pages(&mut self, pool: &GpuKvCache, copies: &[crate::kv::PageCopy]) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        // A buffer cannot be copied onto itself: through a scratch slot, sized before any dispatch
        // by `reserve` (Act::PageScratch, one page).
        let scratch = Slot::Act(Act::PageScratch);
        if self.res.size(scratch).is_none_or(|s| s < pool.page_bytes() as u64) {
            return Err(TwinferError::InvalidParameter(
                "resident step: no scratch page reserved for page copies".into(),
            ));
        }
        let l = pool.layout;
        // (where page 0 starts, bytes per page, bytes per row) of each part of a page: the
        // elements, or an int8 page's scales and codes.
        let parts: Vec<(u64, u64, u64)> = if pool.storage == KvStorage::Q8 {
            let scale_row = (l.num_kv_heads * 4) as u64;
            let codes_at = pool.codes_at() as u64 * 4;
            vec![
                (0, l.page_size as u64 * scale_row, scale_row),
                (codes_at, l.page_elems() as u64, l.row_elems() as u64),
            ]
        } else {
            let row = (l.row_elems() * pool.storage.bytes()) as u64;
            vec![(0, l.page_size as u64 * row, row)]
        };
        for c in copies {
            if c.src as usize >= pool.num_pages || c.dst as usize >= pool.num_pages || c.rows > l.page_size {
                return Err(TwinferError::InvalidParameter(format!("page copy {c:?} outside the device pool")));
            }
            for buffer in pool.buffers_of(0)? {
                for &(base, page_bytes, row_bytes) in &parts {
                    let bytes = c.rows as u64 * row_bytes;
                    let (src_offset, dst_offset) = (base + c.src as u64 * page_bytes, base + c.dst as u64 * page_bytes);
                    self.cmds.push(Cmd::Copy {
                        src: Loc::Buffer(buffer.clone()),
                        src_offset,
                        dst: Loc::Slot(scratch),
                        dst_offset: 0,
                        bytes,
                    });
                    self.cmds.push(Cmd::Copy {
                        src: Loc::Slot(scratch),
                        src_offset: 0,
                        dst: Loc::Buffer(buffer.clone()),
                        dst_offset,
                        bytes,
                    });
                }
            }
        }
        Ok(())
    }

    /// Sets the step's RoPE/append shape: `rows` tokens whose (position, page, slot) are in
    /// [`Act::Rows`] and whose positions the cos/sin table of [`rope_append`](Self::rope_append) covers.
    pub fn plan_rope(&mut self, prm: RopeParams) -> Result<()> {
        if !prm.head_dim.is_multiple_of(8) {
            return Err(TwinferError::InvalidParameter(format!(
                "resident step: head_dim {} is not a multiple of 8",
                prm.head_dim
            )));
        }
        self.slot_params(Act::RopeParams, bytemuck::bytes_of(&prm))
    }

    /// Rotates q and k of [`Act::Qkv`] into [`Act::Q`] and the pool, and appends v; `table` holds
    /// (cos, sin) per position and frequency.
    pub fn rope_append(&mut self, rows: usize, kv: &GpuKvCache, table: &DeviceVec) -> Result<()> {
        let (k, v) = single_buffer(kv)?;
        let key = PipelineKey {
            kernel: Kernel::RopeAppend,
            variant: Variant::Baseline,
            kv: kv.storage,
            tile: Tile { wg: 64, br: 0, bc: 0, chunk: 0 },
        };
        let binds = [
            Bind::Slot(Slot::Act(Act::RopeParams)),
            Bind::Slot(Slot::Act(Act::Qkv)),
            table.bind(),
            Bind::Slot(Slot::Act(Act::Rows)),
            Bind::Slot(Slot::Act(Act::Q)),
            k,
            v,
        ];
        self.dispatch(key, &binds, [rows.min(32768), rows.div_ceil(32768), 1])
    }

    /// Plans decode for the step's single-token rows (the first `table.batch_size()` rows):
    /// validates the table against the pool, writes its parameters and page table once.
    pub fn plan_decode(
        &mut self,
        params: &AttentionParams,
        table: PageTable<'_>,
        pool: &GpuKvCache,
    ) -> Result<PlannedDecode> {
        params.validate()?;
        check_pool(params, pool)?;
        table.validate(pool.layout.page_size, pool.num_pages)?;
        let batch = table.batch_size();
        let empty: &[half::f16] = &[];
        let kv = PagedKv { k: empty.into(), v: empty.into(), layout: pool.layout };
        let p = Problem {
            params,
            q: empty.into(),
            qo: QoRows::OnePerSeq,
            kv: KvSource::Paged { kv, table },
            batch,
            total_q: batch,
        };
        let step = DecodeStep {
            p: &p,
            page_size: pool.layout.page_size,
            indices: table.indices,
            storage: pool.storage,
            kv_codes_at: pool.codes_at(),
        };
        let plan = self.engine.decode_plan(&step, 1, pool.pages_per_buffer as u32)?;
        self.slot_params(Act::DecParams, bytemuck::bytes_of(&AttnParams { kv_buffer: 0, ..plan.prm }))?;
        let meta: Vec<u8> = bytemuck::cast_slice(&plan.meta).to_vec();
        self.write(Act::DecMeta, &meta)?;
        let rows = batch * params.num_qo_heads;
        if let Some(m) = &plan.merge {
            self.ensure(Slot::OPart, plan.o_bytes)?;
            self.ensure(Slot::LsePart, plan.lse_bytes)?;
            self.slot_params(Act::MergeParams, bytemuck::bytes_of(&m.params))?;
            self.ensure(Slot::Lse, m.lse_bytes)?;
        } else {
            self.ensure(Slot::Lse, plan.lse_bytes)?;
        }
        Ok(PlannedDecode { plan, rows })
    }

    /// Decode of the planned rows: queries from `q` (row 0 on), output into `out` (row 0 on).
    pub fn decode(&mut self, planned: &PlannedDecode, q: Act, pool: &GpuKvCache, out: Act) -> Result<()> {
        let (k, v) = single_buffer(pool)?;
        let plan = &planned.plan;
        let d = plan.prm.head_dim as usize;
        self.ensure(Slot::Act(out), (planned.rows * d * 4) as u64)?;
        let (o, lse) = if plan.merge.is_some() { (Slot::OPart, Slot::LsePart) } else { (Slot::Act(out), Slot::Lse) };
        let binds = [
            Bind::Slot(Slot::Act(Act::DecParams)),
            Bind::Slot(Slot::Act(q)),
            k,
            v,
            Bind::Slot(Slot::Act(Act::DecMeta)),
            Bind::Slot(o),
            Bind::Slot(lse),
        ];
        self.dispatch(plan.key, &binds, plan.grid)?;
        if let Some(m) = &plan.merge {
            let binds = [
                Bind::Slot(Slot::Act(Act::MergeParams)),
                Bind::Slot(Slot::OPart),
                Bind::Slot(Slot::LsePart),
                Bind::Slot(Slot::Act(out)),
                Bind::Slot(Slot::Lse),
            ];
            self.dispatch(m.key, &binds, m.grid)?;
        }
        Ok(())
    }

    /// Plans prefill for the step's prompt chunks, which start at token row `first_token`:
    /// `qo_indptr` is relative to that row; the table's sequences are the chunks' sequences.
    pub fn plan_prefill(
        &mut self,
        params: &AttentionParams,
        qo_indptr: &[u32],
        table: PageTable<'_>,
        pool: &GpuKvCache,
        first_token: usize,
    ) -> Result<Option<PlannedPrefill>> {
        params.validate()?;
        check_pool(params, pool)?;
        table.validate(pool.layout.page_size, pool.num_pages)?;
        let batch = table.batch_size();
        crate::error::check_len("qo_indptr (batch + 1)", batch + 1, qo_indptr.len())?;
        let total_q = *qo_indptr.last().unwrap_or(&0) as usize;
        check_indptr("qo_indptr", qo_indptr, total_q)?;
        for b in 0..batch {
            let qo_len = (qo_indptr[b + 1] - qo_indptr[b]) as usize;
            if qo_len > table.kv_len(b, pool.layout.page_size) {
                return Err(TwinferError::InvalidParameter(format!(
                    "sequence {b}: {qo_len} new tokens but only {} in the cache",
                    table.kv_len(b, pool.layout.page_size)
                )));
            }
        }
        let empty: &[half::f16] = &[];
        let kv = PagedKv { k: empty.into(), v: empty.into(), layout: pool.layout };
        let p = Problem {
            params,
            q: empty.into(),
            qo: QoRows::Ragged(qo_indptr),
            kv: KvSource::Paged { kv, table },
            batch,
            total_q,
        };
        let Some(plan) =
            self.engine.prefill_plan(&p, table.indices, pool.layout.page_size, pool.storage, pool.codes_at())?
        else {
            return Ok(None);
        };
        self.slot_params(Act::PreParams, bytemuck::bytes_of(&plan.prm))?;
        let meta: Vec<u8> = bytemuck::cast_slice(&plan.meta).to_vec();
        self.write(Act::PreMeta, &meta)?;
        let rows = total_q * params.num_qo_heads;
        let d = params.head_dim;
        self.ensure(Slot::Act(Act::LsePre), (rows * 4) as u64)?;
        if first_token > 0 {
            self.ensure(Slot::Act(Act::QPre), (rows * d * 4) as u64)?;
            self.ensure(Slot::Act(Act::OPre), (rows * d * 4) as u64)?;
        }
        Ok(Some(PlannedPrefill { plan, rows, first_token }))
    }

    /// Prefill of the planned chunks: queries from `q`, output into `out`, both at the chunks'
    /// first token row (through [`Act::QPre`] and [`Act::OPre`] when that is not row 0).
    pub fn prefill(&mut self, planned: &PlannedPrefill, q: Act, pool: &GpuKvCache, out: Act) -> Result<()> {
        let (k, v) = single_buffer(pool)?;
        let d = planned.plan.prm.head_dim as usize;
        let hq = planned.plan.prm.num_qo_heads as usize;
        let (offset, bytes) = (planned.first_token * hq * d * 4, planned.rows * d * 4);
        let (q_in, o_out) = if offset == 0 { (q, out) } else { (Act::QPre, Act::OPre) };
        if offset > 0 {
            self.copy(q, offset, Act::QPre, 0, bytes)?;
        }
        let binds = [
            Bind::Slot(Slot::Act(Act::PreParams)),
            Bind::Slot(Slot::Act(q_in)),
            k,
            v,
            Bind::Slot(Slot::Act(Act::PreMeta)),
            Bind::Slot(Slot::Act(o_out)),
            Bind::Slot(Slot::Act(Act::LsePre)),
        ];
        self.dispatch(planned.plan.key, &binds, planned.plan.grid)?;
        if offset > 0 {
            self.copy(Act::OPre, 0, out, offset, bytes)?;
        }
        Ok(())
    }
}

/// A resident step binds each layer's pool whole: it must be one buffer.
fn single_buffer(pool: &GpuKvCache) -> Result<(Bind<'_>, Bind<'_>)> {
    if pool.num_buffers() != 1 {
        return Err(TwinferError::InvalidParameter(format!(
            "resident step: the KV pool is split into {} buffers; the resident path binds one",
            pool.num_buffers()
        )));
    }
    Ok(pool.binds(0))
}

fn check_pool(params: &AttentionParams, pool: &GpuKvCache) -> Result<()> {
    if pool.layout.num_kv_heads != params.num_kv_heads || pool.layout.head_dim != params.head_dim {
        return Err(TwinferError::ShapeMismatch {
            what: "device KV pool heads x head_dim",
            expected: params.num_kv_heads * params.head_dim,
            got: pool.layout.row_elems(),
        });
    }
    Ok(())
}

//! The step's row operations: norms, the projections with what they fuse on load, and the
//! sampling passes over the logits (greedy and top-k); also those passes over host data.

use super::*;

impl GpuEngine {
    /// The `k` largest logits of each of `rows` rows of `width` with their ids, through
    /// `topk_rows.wgsl` (one step of its own): what a resident step does after its logits when
    /// its rows sample with top-k, here for any host data (tests). Per row, `k` pairs in the
    /// kernel's slot order (the larger logits, then the ties at the k-th).
    pub fn topk_rows(&self, logits: &[f32], rows: usize, width: usize, k: usize) -> Result<Vec<(u32, f32)>> {
        check_logits("top-k logits ([rows, width], width > 0)", logits, rows, width)?;
        let mut rec = self.record_step(true)?;
        rec.reserve(&[(Act::Logits, logits.len() * 4), (Act::TopK, rows * k * 8)])?;
        rec.write(Act::Logits, bytemuck::cast_slice(logits))?;
        rec.topk_rows(Act::Logits, rows, width, k, Act::TopK)?;
        let words =
            crate::wait::blocking("GpuEngine::topk_rows", rec.submit(Act::TopK, 2 * rows * k)?.wait_u32_async())??;
        Ok(candidates(&words))
    }

    /// Greedy picks of `rows` rows of `width` logits through `argmax_rows.wgsl` (one step of its
    /// own): what a resident step does after its logits, here for any host data (tests).
    pub fn argmax_rows(&self, logits: &[f32], rows: usize, width: usize) -> Result<Vec<u32>> {
        check_logits("argmax logits ([rows, width], width > 0)", logits, rows, width)?;
        let mut rec = self.record_step(true)?;
        rec.reserve(&[(Act::Logits, logits.len() * 4), (Act::Tokens, rows * 4)])?;
        rec.write(Act::Logits, bytemuck::cast_slice(logits))?;
        rec.argmax_rows(Act::Logits, rows, width, Act::Tokens)?;
        crate::wait::blocking("GpuEngine::argmax_rows", rec.submit(Act::Tokens, rows)?.wait_u32_async())?
    }
}

/// `logits` holds `rows` rows of `width > 0`.
fn check_logits(what: &'static str, logits: &[f32], rows: usize, width: usize) -> Result<()> {
    if rows.checked_mul(width) != Some(logits.len()) || width == 0 {
        return Err(TwinferError::ShapeMismatch {
            what,
            expected: rows.saturating_mul(width.max(1)),
            got: logits.len(),
        });
    }
    Ok(())
}

impl<'e> StepRecorder<'e> {
    /// `out[r] = rms_norm(input[r]) * weight` for `rows` rows of `weight.len` elements; with
    /// `gather`, output row r reads input row `SelRows[r]` (the rows that get logits).
    pub fn rms_norm(
        &mut self,
        input: Act,
        weight: &DeviceVec,
        rows: usize,
        eps: f32,
        out: Act,
        gather: bool,
    ) -> Result<()> {
        let prm = RowParams { rows: rows as u32, width: weight.len as u32, eps, gather: gather as u32 };
        let params = if gather { Act::FinalNormParams } else { Act::NormParams };
        self.slot_params(params, bytemuck::bytes_of(&prm))?;
        // Without gather the map is never read; any bound buffer will do.
        let map = if gather { Act::SelRows } else { Act::Rows };
        let key = row_key(Kernel::RmsNorm, 256);
        let binds = [
            Bind::Slot(Slot::Act(params)),
            Bind::Slot(Slot::Act(input)),
            weight.bind(),
            Bind::Slot(Slot::Act(map)),
            Bind::Slot(Slot::Act(out)),
        ];
        self.dispatch(key, &binds, [rows.min(32768), rows.div_ceil(32768), 1])
    }

    /// `x[r] = LayerNorm(x[r]) * gamma + beta` in place, for `rows` rows of `gamma.len` elements.
    pub fn layer_norm(&mut self, x: Act, gamma: &DeviceVec, beta: &DeviceVec, rows: usize, eps: f32) -> Result<()> {
        if beta.len != gamma.len {
            return Err(TwinferError::ShapeMismatch { what: "LayerNorm bias", expected: gamma.len, got: beta.len });
        }
        let prm = RowParams { rows: rows as u32, width: gamma.len as u32, eps, gather: 0 };
        self.slot_params(Act::NormParams, bytemuck::bytes_of(&prm))?;
        let key = row_key(Kernel::LayerNorm, 256);
        let binds = [Bind::Slot(Slot::Act(Act::NormParams)), Bind::Slot(Slot::Act(x)), gamma.bind(), beta.bind()];
        self.dispatch(key, &binds, [rows.min(32768), rows.div_ceil(32768), 1])
    }

    /// Greedy sampling on the device: `out[r]` (u32) is the host `argmax` of row r of
    /// `input[rows, width]`.
    pub fn argmax_rows(&mut self, input: Act, rows: usize, width: usize, out: Act) -> Result<()> {
        let prm = RowParams { rows: rows as u32, width: width as u32, eps: 0.0, gather: 0 };
        self.slot_params(Act::ArgmaxParams, bytemuck::bytes_of(&prm))?;
        // One row is a whole vocabulary: as many threads on it as the adapter allows.
        let limits = &self.ctx().limits;
        let wide = limits.max_compute_invocations_per_workgroup >= 1024 && limits.max_compute_workgroup_size_x >= 1024;
        let key = row_key(Kernel::ArgmaxRows, if wide { 1024 } else { 256 });
        let binds =
            [Bind::Slot(Slot::Act(Act::ArgmaxParams)), Bind::Slot(Slot::Act(input)), Bind::Slot(Slot::Act(out))];
        self.dispatch(key, &binds, [rows.min(32768), rows.div_ceil(32768), 1])
    }

    /// Top-k sampling's candidates on the device: `out[r]` holds the `k` largest logits of row r of
    /// `input[rows, width]` with their ids (`topk_rows.wgsl`; NaN below every number).
    pub fn topk_rows(&mut self, input: Act, rows: usize, width: usize, k: usize, out: Act) -> Result<()> {
        if k == 0 || k > width {
            return Err(TwinferError::InvalidParameter(format!("top-k of {k} among {width} logits")));
        }
        let prm = crate::gpu::params::TopkParams { rows: rows as u32, width: width as u32, k: k as u32, _pad0: 0 };
        self.slot_params(Act::TopkParams, bytemuck::bytes_of(&prm))?;
        let key = row_key(Kernel::TopkRows, 256);
        let binds = [Bind::Slot(Slot::Act(Act::TopkParams)), Bind::Slot(Slot::Act(input)), Bind::Slot(Slot::Act(out))];
        self.dispatch(key, &binds, [rows.min(32768), rows.div_ceil(32768), 1])
    }

    /// `out[rows, n] (+)= f(input)[rows, k] · Wᵀ + b` with the weights resident; `accumulate` adds
    /// the product to `out` (the residual add in the projection's epilogue). `f` is what
    /// `on_load` says: nothing, the RMSNorm of each row, or SwiGLU of `[gate | up]` rows.
    pub fn linear(
        &mut self,
        w: &'e GpuLinear,
        input: Act,
        rows: usize,
        out: Act,
        accumulate: bool,
        on_load: OnLoad<'_>,
    ) -> Result<()> {
        if !w.is_on(self.engine.context()) {
            return Err(TwinferError::InvalidParameter("projection weights live on another device".into()));
        }
        if !w.k.is_multiple_of(4) {
            return Err(TwinferError::InvalidParameter(format!(
                "resident step: projection width {} is not a multiple of 4",
                w.k
            )));
        }
        if !self.weights.iter().any(|(id, _)| *id == w.id()) {
            let guard = w.lock_for_submit(self.engine)?;
            self.weights.push((w.id(), guard));
        }
        let fused = match on_load {
            OnLoad::Plain => Fused::None,
            OnLoad::RmsNorm(g, eps) => {
                if g.len != w.k {
                    return Err(TwinferError::ShapeMismatch { what: "norm weights", expected: w.k, got: g.len });
                }
                Fused::RmsNorm(eps)
            }
            OnLoad::SwiGlu => Fused::SwiGlu,
            OnLoad::Gelu => Fused::Gelu,
        };
        let passes = w.passes(self.engine, rows, accumulate, fused);
        let split = w.split_pass(self.engine, rows);
        if split.is_some() && self.res.size(Slot::Act(Act::XSplit)).is_none_or(|s| s < split_bytes(rows, w.k) as u64) {
            return Err(TwinferError::InvalidParameter(format!(
                "resident step: {} bytes of split input not reserved for {rows} rows of {}",
                split_bytes(rows, w.k),
                w.k
            )));
        }
        for (i, (prm, key, grid)) in passes.into_iter().enumerate() {
            let [params, weights, bias] = w.binds(i);
            let Bind::External(pid, pbuf) = params else { unreachable!("weights bind as external buffers") };
            self.write_weight_params(pid, pbuf, bytemuck::bytes_of(&prm))?;
            let norm = if let OnLoad::RmsNorm(g, _) = on_load { g.bind() } else { bias };
            if let (0, Some((skey, sgrid))) = (i, split) {
                let binds = [params, Bind::Slot(Slot::Act(input)), Bind::Slot(Slot::Act(Act::XSplit)), norm];
                self.dispatch(skey, &binds, sgrid)?;
            }
            if key.kernel == Kernel::LinearMatmulCoop {
                let binds = [params, Bind::Slot(Slot::Act(Act::XSplit)), weights, bias, Bind::Slot(Slot::Act(out))];
                self.dispatch(key, &binds, grid)?;
            } else {
                let binds = [params, Bind::Slot(Slot::Act(input)), weights, bias, Bind::Slot(Slot::Act(out)), norm];
                self.dispatch(key, &binds, grid)?;
            }
        }
        Ok(())
    }

    fn write_weight_params(&mut self, id: u64, buffer: &wgpu::Buffer, data: &[u8]) -> Result<()> {
        match self.written.get(&id) {
            Some(prev) if prev == data => return Ok(()),
            Some(_) => {
                return Err(TwinferError::InvalidParameter(
                    "resident step: one projection called twice with different row counts".into(),
                ));
            }
            None => {}
        }
        if !self.res.params_hold((id, 0), data) {
            self.ctx().queue.write_buffer(buffer, 0, data);
            self.res.set_params((id, 0), Some(data));
        }
        self.written.insert(id, data.to_vec());
        Ok(())
    }
}

fn row_key(kernel: Kernel, wg: u32) -> PipelineKey {
    PipelineKey { kernel, variant: Variant::Baseline, kv: KvStorage::F32, tile: Tile { wg, br: 0, bc: 0, chunk: 0 } }
}

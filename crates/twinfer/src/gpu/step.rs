//! The resident forward pass's recorder: a whole model step (every layer of every sequence in it)
//! recorded into one command encoder and submitted once, with one readback at the end. Weights
//! ([`GpuLinear`], [`DeviceVec`]), KV pages ([`GpuKvCache`]) and activations (pooled [`Act`]
//! slots) stay on the device; per step only the rows' embeddings, positions and page slots, the
//! page tables and a few parameter words travel to it.
//!
//! A step goes in two phases. First `reserve`, `write` and the `plan_*` calls size every buffer
//! and write the step's inputs and parameters (plan once per step, as FlashInfer does); then the
//! ops record dispatches that every layer reuses. No buffer may grow once a dispatch is recorded:
//! the dispatches already recorded bind the buffer they saw.

use std::collections::HashMap;
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicU64, Ordering};

use super::engine::{DecodePlan, DecodeStep, GpuEngine, PrefillPlan};
use super::linear::{Fused, GpuLinear};
use super::params::{AttnParams, RopeParams, RowParams};
use super::pending::{Pending, Readback, Scopes};
use super::resident::GpuKvCache;
use super::resources::{Bind, PipelineKey, RecordedPass, Resources, Slot, Tile};
use super::shaders::{Kernel, KvStorage, Variant};
use crate::attention::AttentionParams;
use crate::attention::problem::{KvSource, Problem, QoRows};
use crate::error::{Result, TwinferError};
use crate::kv::{PageTable, PagedKv, check_indptr};

/// The pooled buffers of a resident step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Act {
    /// The residual stream `[tokens, hidden]`.
    X,
    /// The fused q/k/v projection `[tokens, q_dim + 2 kv_dim]`.
    Qkv,
    /// Rotated queries `[tokens, heads, head_dim]`.
    Q,
    /// Attention output `[tokens, heads, head_dim]`.
    Attn,
    /// The fused gate/up projection `[tokens, 2 intermediate]`.
    GateUp,
    /// The final norm of the rows that get logits `[rows, hidden]`.
    Sel,
    /// Logits `[rows, vocab]`: read back when a row is sampled on the host.
    Logits,
    /// Greedy token ids `[rows]` (u32): read back instead when every row is greedy.
    Tokens,
    /// A mixed step's prompt rows: their queries, outputs and LSE, from row 0.
    QPre,
    /// A mixed step's prompt rows: their attention outputs.
    OPre,
    /// A mixed step's prompt rows: their LSEs.
    LsePre,
    /// Per token: position, page, slot in page.
    Rows,
    /// The token rows that get logits.
    SelRows,
    /// One KV page, for copy-on-write copies inside a pool.
    PageScratch,
    /// Uniform: the decode attention's [`AttnParams`].
    DecParams,
    /// Uniform: the split-K merge's [`MergeParams`](super::params::MergeParams).
    MergeParams,
    /// Uniform: the prefill attention's [`AttnParams`].
    PreParams,
    /// Uniform: the [`RowParams`] of the un-gathered RMSNorm and of LayerNorm.
    NormParams,
    /// Uniform: the [`RowParams`] of the gathered RMSNorm (the rows that get logits).
    FinalNormParams,
    /// Uniform: the greedy argmax's [`RowParams`].
    ArgmaxParams,
    /// Uniform: the RoPE/append pass's [`RopeParams`].
    RopeParams,
    /// The decode page table and index words (`u32`).
    DecMeta,
    /// The prefill page table, `qo_indptr` and work list (`u32`).
    PreMeta,
    /// Top-k candidates `[rows, k]` of (token id, logit bits): read back when the sampled rows
    /// sample with top-k.
    TopK,
    /// Uniform: the top-k pass's [`TopkParams`](super::params::TopkParams).
    TopkParams,
}

impl Act {
    pub(super) fn is_uniform(self) -> bool {
        matches!(
            self,
            Act::DecParams
                | Act::MergeParams
                | Act::PreParams
                | Act::NormParams
                | Act::FinalNormParams
                | Act::ArgmaxParams
                | Act::RopeParams
                | Act::TopkParams
        )
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Act::X => "residual stream",
            Act::Qkv => "q/k/v projection",
            Act::Q => "rotated queries",
            Act::Attn => "attention output",
            Act::GateUp => "gate/up projection",
            Act::Sel => "rows for logits",
            Act::Logits => "logits",
            Act::Tokens => "greedy token ids",
            Act::QPre => "prompt queries",
            Act::OPre => "prompt attention output",
            Act::LsePre => "prompt lse",
            Act::Rows => "row positions and slots",
            Act::SelRows => "rows that get logits",
            Act::PageScratch => "page copy scratch",
            Act::DecParams => "decode params",
            Act::MergeParams => "merge params",
            Act::PreParams => "prefill params",
            Act::NormParams => "norm params",
            Act::FinalNormParams => "final norm params",
            Act::ArgmaxParams => "argmax params",
            Act::RopeParams => "rope params",
            Act::DecMeta => "decode page table",
            Act::PreMeta => "prefill page table",
            Act::TopK => "top-k candidates",
            Act::TopkParams => "top-k params",
        }
    }
}

static NEXT_VEC_ID: AtomicU64 = AtomicU64::new(1);
/// Ids of [`DeviceVec`]s in the bind-group cache, apart from the KV pools' and the weights'.
const VEC_TAG: u64 = 1 << 59;

/// A small f32 vector resident on a device (a norm's weights).
#[derive(Debug)]
pub struct DeviceVec {
    id: u64,
    buffer: wgpu::Buffer,
    /// Elements in the vector.
    pub len: usize,
}

impl DeviceVec {
    /// Uploads `data` into a new storage buffer. Errors with `GpuOutOfMemory` or `DeviceLost`.
    pub fn upload(engine: &GpuEngine, data: &[f32]) -> Result<Self> {
        let ctx = engine.context();
        ctx.check_alive()?;
        let bytes = (data.len().max(4) * 4) as u64;
        let (buffer, error) = ctx.scoped(wgpu::ErrorFilter::OutOfMemory, || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("resident vector"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        if let Some(e) = error {
            return Err(TwinferError::GpuOutOfMemory(format!("a vector of {} f32: {e}", data.len())));
        }
        ctx.counters.buffers.fetch_add(1, Ordering::Relaxed);
        let mut padded = data.to_vec();
        padded.resize(data.len().max(4), 0.0);
        ctx.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(&padded));
        Ok(Self { id: VEC_TAG | NEXT_VEC_ID.fetch_add(1, Ordering::Relaxed), buffer, len: data.len() })
    }

    fn bind(&self) -> Bind<'_> {
        Bind::External(self.id, &self.buffer)
    }

    /// The bind-group cache id, to forget the groups naming this vector when it is dropped.
    pub fn cache_id(&self) -> u64 {
        self.id
    }
}

/// What a projection does to its input rows as it loads them.
#[derive(Debug, Clone, Copy)]
pub enum OnLoad<'a> {
    /// The rows as they are.
    Plain,
    /// RMSNorm with these weights and epsilon.
    RmsNorm(&'a DeviceVec, f32),
    /// The input rows are `[gate | up]`; the product takes silu(gate) * up.
    SwiGlu,
    /// The product takes the exact GELU of the input.
    Gelu,
}

/// One recorded command.
enum Cmd {
    Dispatch(RecordedPass),
    Copy { src: Loc, src_offset: u64, dst: Loc, dst_offset: u64, bytes: u64 },
}

/// A copy's end: a pool slot or a buffer owned elsewhere (a KV pool).
enum Loc {
    Slot(Slot),
    Buffer(wgpu::Buffer),
}

/// A planned attention call of a step: reused by every layer.
#[derive(Debug)]
pub struct PlannedDecode {
    plan: DecodePlan,
    rows: usize,
}

/// A planned prefill call of a step: reused by every layer.
#[derive(Debug)]
pub struct PlannedPrefill {
    plan: PrefillPlan,
    /// Query rows (tokens x heads) and the first token row in the step.
    rows: usize,
    first_token: usize,
}

/// A projection's lock, held from its parameter writes to the submission.
type WeightsGuard<'e> = MutexGuard<'e, Vec<std::sync::Weak<std::sync::Mutex<Resources>>>>;

/// A step being recorded on one engine; holds the engine's pools until [`StepRecorder::submit`].
pub struct StepRecorder<'e> {
    engine: &'e GpuEngine,
    res: MutexGuard<'e, Resources>,
    scope: Option<Scopes>,
    cmds: Vec<Cmd>,
    /// Parameter bytes written this step: a slot or weight buffer read by several dispatches
    /// must hold the same values for all of them (writes land before the submission).
    written: HashMap<u64, Vec<u8>>,
    /// Weights whose parameters this step wrote, locked until the submission (see `GpuLinear`).
    weights: Vec<(u64, WeightsGuard<'e>)>,
    poison: bool,
    /// Dispatches already encoded (and submitted, see `flush`), kept for replays.
    recorded: Vec<RecordedPass>,
    /// Dispatches recorded since the last submission, and the count that triggers the next.
    pending: usize,
    flush_at: usize,
    #[cfg(not(target_arch = "wasm32"))]
    started: std::time::Instant,
}

/// The first early submission goes after this many dispatches (about two layers), each later one
/// after twice as many as the one before, up to `FLUSH_MAX`: the device starts on the first
/// layers while the host records the rest, so recording hides behind the kernels. No readback
/// happens until the end, so the extra submissions add no round trip.
const FLUSH_FIRST: usize = 16;
const FLUSH_MAX: usize = 64;

/// The submissions of a resident step of `dispatches` dispatches: the early ones, then the last
/// (with the readback).
pub fn step_submissions(dispatches: u64) -> u64 {
    let (mut done, mut next, mut submissions) = (0, FLUSH_FIRST as u64, 1);
    while done + next <= dispatches {
        done += next;
        submissions += 1;
        next = (2 * next).min(FLUSH_MAX as u64);
    }
    submissions
}

impl std::fmt::Debug for StepRecorder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepRecorder").field("commands", &self.cmds.len()).finish()
    }
}

/// A submitted step: its readback on the way.
pub struct StepPending(Pending);

impl std::fmt::Debug for StepPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepPending")
    }
}

/// (id, logit) pairs from the words of [`Act::TopK`].
pub fn candidates(words: &[u32]) -> Vec<(u32, f32)> {
    words.chunks_exact(2).map(|w| (w[0], f32::from_bits(w[1]))).collect()
}

impl StepPending {
    /// The values read back. Natively this blocks until the device is done; in a browser it
    /// awaits the map from the event loop.
    pub async fn wait_async(self) -> Result<Vec<f32>> {
        Ok(self.0.wait_async().await?.into_values())
    }

    /// [`StepPending::wait_async`] for a u32 slot ([`Act::Tokens`]): the same bytes as u32.
    pub async fn wait_u32_async(self) -> Result<Vec<u32>> {
        Ok(self.wait_async().await?.into_iter().map(f32::to_bits).collect())
    }
}

impl GpuEngine {
    /// The `k` largest logits of each of `rows` rows of `width` with their ids, through
    /// `topk_rows.wgsl` (one step of its own): what a resident step does after its logits when
    /// its rows sample with top-k, here for any host data (tests). Per row, `k` pairs in the
    /// kernel's slot order (the larger logits, then the ties at the k-th).
    pub fn topk_rows(&self, logits: &[f32], rows: usize, width: usize, k: usize) -> Result<Vec<(u32, f32)>> {
        if rows.checked_mul(width) != Some(logits.len()) || width == 0 {
            return Err(TwinferError::ShapeMismatch {
                what: "top-k logits ([rows, width], width > 0)",
                expected: rows.saturating_mul(width.max(1)),
                got: logits.len(),
            });
        }
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
        if rows.checked_mul(width) != Some(logits.len()) || width == 0 {
            return Err(TwinferError::ShapeMismatch {
                what: "argmax logits ([rows, width], width > 0)",
                expected: rows.saturating_mul(width.max(1)),
                got: logits.len(),
            });
        }
        let mut rec = self.record_step(true)?;
        rec.reserve(&[(Act::Logits, logits.len() * 4), (Act::Tokens, rows * 4)])?;
        rec.write(Act::Logits, bytemuck::cast_slice(logits))?;
        rec.argmax_rows(Act::Logits, rows, width, Act::Tokens)?;
        crate::wait::blocking("GpuEngine::argmax_rows", rec.submit(Act::Tokens, rows)?.wait_u32_async())?
    }
}

impl GpuEngine {
    /// Starts recording a step. With `poison`, every buffer the step reserves is filled with NaN
    /// first, so a value no kernel wrote shows in the results (tests).
    pub fn record_step(&self, poison: bool) -> Result<StepRecorder<'_>> {
        self.context().check_alive()?;
        let res = self.lock()?;
        let scope = Scopes::push(self.context());
        Ok(StepRecorder {
            engine: self,
            res,
            scope: Some(scope),
            cmds: Vec::new(),
            written: HashMap::new(),
            weights: Vec::new(),
            poison,
            recorded: Vec::new(),
            pending: 0,
            flush_at: FLUSH_FIRST,
            #[cfg(not(target_arch = "wasm32"))]
            started: std::time::Instant::now(),
        })
    }
}

impl<'e> StepRecorder<'e> {
    fn ctx(&self) -> &'e super::GpuContext {
        self.engine.context()
    }

    /// Sizes the step's buffers (bytes each). Only before the first dispatch.
    pub fn reserve(&mut self, sizes: &[(Act, usize)]) -> Result<()> {
        for &(act, bytes) in sizes {
            self.ensure(Slot::Act(act), bytes as u64)?;
            if self.poison && !act.is_uniform() {
                let nan = vec![f32::NAN; bytes / 4];
                let buf = self.res.get(Slot::Act(act));
                self.ctx().queue.write_buffer(buf, 0, bytemuck::cast_slice(&nan));
            }
        }
        Ok(())
    }

    /// A slot of at least `bytes`; growing one after a dispatch is recorded would split the
    /// step between two buffers, so that is an error (a bug in the caller's reservations).
    /// (The pool never shrinks a buffer, so a size that fits is a no-op.)
    fn ensure(&mut self, slot: Slot, bytes: u64) -> Result<()> {
        let ctx = self.ctx();
        // A slot that has no buffer yet cannot be bound by a recorded dispatch.
        if !(self.cmds.is_empty() && self.recorded.is_empty())
            && let Some(size) = self.res.size(slot)
            && size < bytes.max(16).next_multiple_of(16)
        {
            return Err(TwinferError::InvalidParameter(format!(
                "resident step: buffer {slot:?} grows after recording began (needs {bytes} bytes)"
            )));
        }
        self.res.buffer(ctx, slot, bytes).map(drop)
    }

    /// Writes a step input (the rows' embeddings, positions and slots).
    pub fn write(&mut self, act: Act, data: &[u8]) -> Result<()> {
        self.ensure(Slot::Act(act), data.len() as u64)?;
        if !data.is_empty() {
            self.ctx().queue.write_buffer(self.res.get(Slot::Act(act)), 0, data);
        }
        Ok(())
    }

    /// Writes parameters once per step; the same slot with other values is an error.
    fn write_params(&mut self, slot: Slot, key: u64, data: &[u8]) -> Result<()> {
        match self.written.get(&key) {
            Some(prev) if prev == data => return Ok(()),
            Some(_) => {
                return Err(TwinferError::InvalidParameter(format!(
                    "resident step: {slot:?} written twice with different values"
                )));
            }
            None => {}
        }
        self.ensure(slot, data.len() as u64)?;
        let held = (key, self.res.generation(slot));
        if !self.res.params_hold(held, data) {
            self.ctx().queue.write_buffer(self.res.get(slot), 0, data);
            self.res.set_params(held, Some(data));
        }
        self.written.insert(key, data.to_vec());
        Ok(())
    }

    fn slot_params(&mut self, act: Act, data: &[u8]) -> Result<()> {
        self.write_params(Slot::Act(act), 2000 + act as u64, data)
    }

    fn dispatch(&mut self, key: PipelineKey, binds: &[Bind<'_>], grid: [usize; 3]) -> Result<()> {
        let ctx = self.ctx();
        let max = ctx.limits.max_compute_workgroups_per_dimension as u64;
        if let Some(&g) = grid.iter().find(|&&g| g as u64 > max) {
            return Err(TwinferError::OverLimit {
                what: "workgroups in one dimension",
                requested: g as u64,
                limit: max,
            });
        }
        if grid.contains(&0) {
            return Ok(());
        }
        let pipeline = self.res.pipeline(ctx, key)?;
        let bg = self.res.bind_group(ctx, key, binds)?;
        let grid = grid.map(|g| g as u32);
        self.cmds.push(Cmd::Dispatch(RecordedPass { kernel: key.kernel, pipeline, bind_group: bg, grid }));
        self.pending += 1;
        if self.pending >= self.flush_at {
            self.flush()?;
            self.flush_at = (2 * self.flush_at).min(FLUSH_MAX);
        }
        Ok(())
    }

    /// Submits what is recorded so far (no readback). Queue order keeps it ahead of the rest of
    /// the step, and parameter writes made after it land before the next submission, which is
    /// the first that can read them.
    fn flush(&mut self) -> Result<()> {
        if self.cmds.is_empty() {
            return Ok(());
        }
        let ctx = self.ctx();
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step part") });
        self.encode(&mut enc);
        ctx.queue.submit([enc.finish()]);
        ctx.counters.submits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Encodes the commands recorded since the last submission into `enc`.
    fn encode(&mut self, enc: &mut wgpu::CommandEncoder) {
        let cmds = std::mem::take(&mut self.cmds);
        let mut dispatches = 0u64;
        let mut i = 0;
        while i < cmds.len() {
            if let Cmd::Copy { src, src_offset, dst, dst_offset, bytes } = &cmds[i] {
                let buffer = |loc: &'_ Loc| match loc {
                    Loc::Slot(s) => self.res.get(*s).clone(),
                    Loc::Buffer(b) => b.clone(),
                };
                enc.copy_buffer_to_buffer(&buffer(src), *src_offset, &buffer(dst), *dst_offset, *bytes);
                i += 1;
                continue;
            }
            // Consecutive dispatches share a compute pass; wgpu orders their storage accesses.
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            while let Some(Cmd::Dispatch(recorded_pass)) = cmds.get(i) {
                recorded_pass.record(&mut pass);
                self.recorded.push(recorded_pass.clone());
                dispatches += 1;
                i += 1;
            }
        }
        self.pending = 0;
        self.ctx().counters.dispatches.fetch_add(dispatches, Ordering::Relaxed);
    }

    /// Copies `bytes` between two step buffers (outside any compute pass).
    pub fn copy(&mut self, src: Act, src_offset: usize, dst: Act, dst_offset: usize, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let (src, dst) = (Slot::Act(src), Slot::Act(dst));
        for (slot, end) in [(src, src_offset + bytes), (dst, dst_offset + bytes)] {
            if self.res.size(slot).is_none_or(|s| s < end as u64) {
                return Err(TwinferError::InvalidParameter(format!("resident step: copy past the end of {slot:?}")));
            }
        }
        self.cmds.push(Cmd::Copy {
            src: Loc::Slot(src),
            src_offset: src_offset as u64,
            dst: Loc::Slot(dst),
            dst_offset: dst_offset as u64,
            bytes: bytes as u64,
        });
        Ok(())
    }

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
        let passes = w.passes(rows, accumulate, fused);
        for (i, (prm, key, grid)) in passes.into_iter().enumerate() {
            let [params, weights, bias] = w.binds(i);
            let Bind::External(pid, pbuf) = params else { unreachable!("weights bind as external buffers") };
            self.write_weight_params(pid, pbuf, bytemuck::bytes_of(&prm))?;
            let norm = if let OnLoad::RmsNorm(g, _) = on_load { g.bind() } else { bias };
            let binds = [params, Bind::Slot(Slot::Act(input)), weights, bias, Bind::Slot(Slot::Act(out)), norm];
            self.dispatch(key, &binds, grid)?;
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

    /// Encodes the rest of the step, copies the first `len` f32s of `read` to a mappable buffer,
    /// and submits: the step's last submission and its one readback.
    pub fn submit(mut self, read: Act, len: usize) -> Result<StepPending> {
        let ctx = self.ctx();
        let bytes = (len * 4) as u64;
        if self.res.size(Slot::Act(read)).is_none_or(|s| s < bytes) {
            return Err(TwinferError::InvalidParameter(format!("resident step: reading past the end of {read:?}")));
        }
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        self.encode(&mut enc);
        // The step's dispatches stay recorded, so its device time can be measured by replaying them.
        let recorded = std::mem::take(&mut self.recorded);
        self.res.set_last_passes(recorded);
        let readback = Readback::record_slot(ctx, &mut self.res, &mut enc, Slot::Act(read), len)?;
        ctx.queue.submit([enc.finish()]);
        let readback = readback.map();
        let c = &ctx.counters;
        c.submits.fetch_add(1, Ordering::Relaxed);
        c.readbacks.fetch_add(1, Ordering::Relaxed);
        c.readback_bytes.fetch_add(bytes, Ordering::Relaxed);
        c.steps.fetch_add(1, Ordering::Relaxed);
        #[cfg(not(target_arch = "wasm32"))]
        c.record_ns.fetch_add(self.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let scope = self.scope.take().expect("one submission per recorder");
        drop(self.weights);
        drop(self.res);
        Ok(StepPending(self.engine.submitted(scope, Some(readback))))
    }
}

fn row_key(kernel: Kernel, wg: u32) -> PipelineKey {
    PipelineKey { kernel, variant: Variant::Baseline, kv: KvStorage::F32, tile: Tile { wg, br: 0, bc: 0, chunk: 0 } }
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

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
use super::linear_split::split_bytes;
use super::params::{AttnParams, RopeParams, RowParams};
use super::pending::{Pending, Readback, Scopes};
use super::resident::GpuKvCache;
use super::resources::{Bind, PipelineKey, RecordedPass, Resources, Slot, Tile};
use super::shaders::{Kernel, KvStorage, Variant};
use crate::attention::AttentionParams;
use crate::attention::problem::{KvSource, Problem, QoRows};
use crate::error::{Result, TwinferError};
use crate::kv::{PageTable, PagedKv, check_indptr};

mod act;
mod attention;
mod rows;

pub use act::Act;

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

    /// Bytes to reserve for [`Act::XSplit`] when the step calls each of `uses` (weights, input
    /// rows): the largest split input among those that run on the tensor cores, else none.
    pub fn split_input_bytes(&self, uses: &[(&GpuLinear, usize)]) -> usize {
        uses.iter()
            .filter(|(w, rows)| w.on_tensor_cores(self.engine, *rows))
            .map(|(w, rows)| split_bytes(*rows, w.k))
            .max()
            .unwrap_or(0)
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

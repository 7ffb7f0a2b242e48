//! The second half of every GPU call: a submitted call waits for its error scopes and its
//! readback, then hands the results over. Encoding and submitting are shared by the blocking and
//! the async calls; only [`Pending::wait`] (native: poll the device) and [`Pending::wait_async`]
//! (browser: await the map and the scopes from the event loop) differ.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use super::device::{GpuContext, map_error};
use super::resources::{Resources, Slot};
use crate::attention::AttentionOutput;
use crate::error::{Result, TwinferError};
use crate::wait::Oneshot;

/// What one error scope caught, once its result has arrived.
type ScopeResult = Pin<Box<dyn Future<Output = Option<wgpu::Error>>>>;

/// The validation and out-of-memory scopes around one call.
/// Fields drop in declaration order, which must be the reverse of the pushes.
pub(super) struct Scopes {
    validation: wgpu::ErrorScopeGuard,
    oom: wgpu::ErrorScopeGuard,
}

impl Scopes {
    pub(super) fn push(ctx: &GpuContext) -> Self {
        let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        Self { validation, oom }
    }

    /// Pops both scopes right after the submission. A pop takes effect at once; only its result
    /// comes later, so another call may push its own scopes while this one waits.
    pub(super) fn submitted(
        self,
        ctx: &Arc<GpuContext>,
        res: &Arc<Mutex<Resources>>,
        readback: Option<Readback>,
    ) -> Pending {
        let validation: ScopeResult = Box::pin(self.validation.pop());
        let oom: ScopeResult = Box::pin(self.oom.pop());
        Pending { ctx: ctx.clone(), res: res.clone(), errors: [validation, oom], readback }
    }
}

/// O (and LSE) on their way to a mappable buffer of the call's own: concurrent calls never share
/// one, and it goes back to the engine's pool once read.
pub(super) struct Readback {
    buffer: wgpu::Buffer,
    bytes: u64,
    o_len: usize,
    lse_len: usize,
    mapped: Oneshot<std::result::Result<(), wgpu::BufferAsyncError>>,
}

impl Readback {
    /// Copies O (and LSE) into a pooled mappable buffer, submits the copy and requests the map.
    pub(super) fn queue(ctx: &GpuContext, res: &mut Resources, rows: usize, d: usize, lse: bool) -> Result<Self> {
        let o_bytes = (rows * d * 4) as u64;
        let lse_bytes = if lse { (rows * 4) as u64 } else { 0 };
        let buffer = res.take_readback(ctx, o_bytes + lse_bytes)?;
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
        enc.copy_buffer_to_buffer(res.get(Slot::O), 0, &buffer, 0, o_bytes);
        if lse {
            enc.copy_buffer_to_buffer(res.get(Slot::Lse), 0, &buffer, o_bytes, lse_bytes);
        }
        ctx.queue.submit([enc.finish()]);
        count_readback(ctx, o_bytes + lse_bytes);
        let mapped = Oneshot::new();
        buffer.map_async(wgpu::MapMode::Read, 0..o_bytes + lse_bytes, mapped.sender());
        Ok(Self { buffer, bytes: o_bytes + lse_bytes, o_len: rows * d, lse_len: if lse { rows } else { 0 }, mapped })
    }

    /// Copies the first `len` f32s of `slot` into a pooled mappable buffer (a projection's
    /// output), submits the copy and requests the map; they arrive as [`Results::into_values`].
    pub(super) fn queue_slot(ctx: &GpuContext, res: &mut Resources, slot: Slot, len: usize) -> Result<Self> {
        let bytes = (len * 4) as u64;
        let buffer = res.take_readback(ctx, bytes)?;
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
        enc.copy_buffer_to_buffer(res.get(slot), 0, &buffer, 0, bytes);
        ctx.queue.submit([enc.finish()]);
        count_readback(ctx, bytes);
        Ok(RecordedReadback { buffer, bytes, len }.map())
    }

    /// Records the copy of the first `len` f32s of `slot` into `enc`, for a caller that submits
    /// it with its own work; [`RecordedReadback::map`] after that submission.
    pub(super) fn record_slot(
        ctx: &GpuContext,
        res: &mut Resources,
        enc: &mut wgpu::CommandEncoder,
        slot: Slot,
        len: usize,
    ) -> Result<RecordedReadback> {
        let bytes = (len * 4) as u64;
        let buffer = res.take_readback(ctx, bytes)?;
        enc.copy_buffer_to_buffer(res.get(slot), 0, &buffer, 0, bytes);
        Ok(RecordedReadback { buffer, bytes, len })
    }
}

/// A readback copy recorded, not yet mapped.
pub(super) struct RecordedReadback {
    buffer: wgpu::Buffer,
    bytes: u64,
    len: usize,
}

impl RecordedReadback {
    /// Requests the map; call after the submission that holds the copy.
    pub(super) fn map(self) -> Readback {
        let mapped = Oneshot::new();
        self.buffer.map_async(wgpu::MapMode::Read, 0..self.bytes, mapped.sender());
        Readback { buffer: self.buffer, bytes: self.bytes, o_len: self.len, lse_len: 0, mapped }
    }
}

/// Host readbacks are counted (with their submissions): a resident step must do one.
fn count_readback(ctx: &GpuContext, bytes: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    ctx.counters.submits.fetch_add(1, Relaxed);
    ctx.counters.readbacks.fetch_add(1, Relaxed);
    ctx.counters.readback_bytes.fetch_add(bytes, Relaxed);
}

/// A submitted call.
pub(super) struct Pending {
    ctx: Arc<GpuContext>,
    res: Arc<Mutex<Resources>>,
    /// Validation, then out of memory.
    errors: [ScopeResult; 2],
    readback: Option<Readback>,
}

/// A call's results, read back from the device.
#[derive(Debug, Default)]
pub(super) struct Results {
    o: Vec<f32>,
    lse: Vec<f32>,
}

impl Results {
    /// The values read back (O, or the slot of [`Readback::queue_slot`]).
    pub(super) fn into_values(self) -> Vec<f32> {
        self.o
    }

    /// Writes O (and LSE when asked for) into the caller's output.
    pub(super) fn write(&self, out: &mut AttentionOutput<'_>) {
        out.o.write_f32(0, &self.o);
        if let Some(l) = out.lse.as_deref_mut() {
            l.copy_from_slice(&self.lse);
        }
    }
}

impl Pending {
    /// Blocks until the device has finished the call.
    #[cfg(not(target_arch = "wasm32"))]
    pub(super) fn wait(self) -> Result<Results> {
        let mapped = match &self.readback {
            Some(rb) => Some(self.wait_for_map(rb)?),
            None => None,
        };
        let [validation, oom] = self.errors;
        let errors = [pollster::block_on(validation), pollster::block_on(oom)];
        finish(&self.ctx, &self.res, self.readback, mapped, errors)
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn wait_for_map(&self, rb: &Readback) -> Result<std::result::Result<(), wgpu::BufferAsyncError>> {
        self.ctx.wait()?;
        // Callbacks run on whichever thread polls: when engines on other threads share the
        // device, ours may still be on its way after our wait returned.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(r) = rb.mapped.try_take() {
                return Ok(r);
            }
            if std::time::Instant::now() > deadline {
                return Err(self.ctx.mark_lost("readback never completed"));
            }
            self.ctx.check_alive()?;
            std::thread::yield_now();
            let _ = self.ctx.device.poll(wgpu::PollType::Poll);
        }
    }

    /// Waits without blocking a browser: the map and the scopes resolve from the event loop.
    /// Natively the device has no event loop to do it, so this waits as [`Pending::wait`] does.
    pub(super) async fn wait_async(self) -> Result<Results> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.wait()
        }
        #[cfg(target_arch = "wasm32")]
        {
            let Pending { ctx, res, errors: [validation, oom], mut readback } = self;
            let mapped = match readback.as_mut() {
                Some(rb) => Some((&mut rb.mapped).await?),
                None => None,
            };
            let errors = [validation.await, oom.await];
            finish(&ctx, &res, readback, mapped, errors)
        }
    }
}

/// The end shared by both waits. A lost device comes first (a destroyed device also fails
/// validation), then what the scopes caught, then a failed map (the device is gone); otherwise
/// the mapped results are copied out. The buffer returns to the pool only after a clean map.
fn finish(
    ctx: &GpuContext,
    res: &Mutex<Resources>,
    readback: Option<Readback>,
    mapped: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
    [validation, oom]: [Option<wgpu::Error>; 2],
) -> Result<Results> {
    let results = match (&readback, &mapped) {
        (Some(rb), Some(Ok(()))) => {
            let view = rb.buffer.get_mapped_range(0..rb.bytes);
            let results = view
                .map(|view| {
                    let all: &[f32] = bytemuck::cast_slice(&view);
                    Results { o: all[..rb.o_len].to_vec(), lse: all[rb.o_len..rb.o_len + rb.lse_len].to_vec() }
                })
                .map_err(|e| TwinferError::GpuValidation(format!("readback mapping: {e}")));
            rb.buffer.unmap();
            if let Ok(mut res) = res.lock() {
                res.put_readback(rb.buffer.clone());
            }
            Some(results)
        }
        _ => None,
    };
    ctx.check_alive()?;
    if let Some(e) = validation.or(oom) {
        return Err(map_error(e));
    }
    match (results, mapped) {
        (Some(r), _) => r,
        (None, Some(Err(e))) => Err(ctx.mark_lost(&format!("readback failed: {e}"))),
        (None, _) => Ok(Results::default()),
    }
}

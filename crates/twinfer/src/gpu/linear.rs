//! Projections on the device: `y[rows, n] = x[rows, k] · W[n, k]ᵀ + b` with W uploaded once
//! ([`GpuLinear`]) and kept on the device, in buffers of at most one binding each. Decode rows
//! (at most [`GEMV_MAX_ROWS`]) go through `linear_gemv.wgsl`, prompt chunks through
//! `linear_matmul.wgsl`, or over f16 weights on a device with tensor cores through
//! `linear_split_f16.wgsl` and `linear_matmul_coop.wgsl`. A call uploads only x and reads y back; after the pools have grown to a
//! call's size it creates no buffer or bind group. Block-quantized weights stay quantized on the
//! device ([`GpuLinear::upload_quant`]) and the kernels decode them in registers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::device::GpuContext;
use super::engine::GpuEngine;
use super::linear_split::{SPLIT_ROW_PAD, split_bytes, split_key};
use super::params::{ACT_GELU, ACT_NONE, ACT_SWIGLU, LinearParams};
use super::pending::{Pending, Readback, Scopes};
use super::resources::{Bind, PipelineKey, Resources, Slot, Tile};
use super::shaders::{Kernel, KvStorage, Variant};
use crate::dtype::TensorRef;
use crate::error::{Result, TwinferError, check_len};
use crate::wait::blocking;

/// Default cap on one weight buffer, below any adapter limit: phones bind at most 128 MiB.
pub const DEFAULT_MAX_WEIGHT_BUFFER: u64 = 128 << 20;
/// Rows up to which a call is a GEMV: a decode batch. Past it (prompt chunks) the tiled matmul
/// reuses each weight tile across its rows from workgroup memory, which pays off.
pub const GEMV_MAX_ROWS: usize = 64;
/// Rows per GEMV workgroup (`MAXR` in linear_gemv.wgsl): larger batches take several groups.
const GEMV_ROW_GROUP: usize = 4;
/// How the GEMV spreads over a workgroup. Either shape sums a row's products in one order for
/// every batch size (the lanes per feature depend on the weights' shape, never on the rows), so a
/// sequence's logits are the same bits alone or batched on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvShape {
    /// 256 threads; per output feature, the power of two from 8 to 64 lanes nearest above k4 / 8,
    /// so a lane takes about 8 vec4s of the row (more past 512 vec4s, fewer under 64). Timed on an
    /// H100 with fixed widths, one row: the 151936 x 896 logits took 0.204 ms (f16) and 0.299
    /// (Q8_0) with 64 lanes, 0.172 and 0.186 with 32; 49152 x 576 f16 0.056 -> 0.046 with 32;
    /// 896 x 4864 still wants 64 (0.016 against 0.024 ms with 32); the small matrices stay at the
    /// 8-11 us launch floor whatever the width. A batch of 64 through 3072 x 576: f16 0.074 ms
    /// with 64 lanes, 0.058 with 32; Q4_1 0.060 and 0.046. Sizing 4-bit rows by their words (a
    /// lane's step) instead of their vec4s halved their lanes: it won at batch 64 but lost 0.2 ms
    /// per token at one row of smollm-135m (benches/NOTES.md).
    Hardware,
    /// 64 threads, 4 per feature, for software adapters (lavapipe, SwiftShader), which run a
    /// workgroup's threads as loops over SIMD groups: on lavapipe the hardware shape takes twice
    /// as long (tiny-qwen2, a decode batch of 4: 400 against 230 ms of GEMV per step). Their
    /// matmuls also keep whole tiles (16 workgroups suffice on a CPU).
    Software,
}

impl GemvShape {
    /// (threads per workgroup, threads per output feature) for rows of `k4` vec4s.
    fn threads(self, k4: usize) -> (u32, u32) {
        match self {
            GemvShape::Hardware => (256, k4.div_ceil(8).next_power_of_two().clamp(8, 64) as u32),
            GemvShape::Software => (64, 4),
        }
    }
}

/// The tensor-core matmul's tile of y (fixed in `linear_matmul_coop.wgsl`): 64 rows by 128
/// features, 128 threads.
const COOP_TILE_ROWS: usize = 64;
const COOP_TILE_FEATURES: usize = 128;
const COOP_TILE: Tile = Tile { wg: 128, br: 0, bc: 0, chunk: 0 };

/// Workgroups below which the matmul shrinks its tile: two per SM of a 132-SM card.
const MATMUL_MIN_WORKGROUPS: usize = 264;
/// The same for software adapters, which run a workgroup per CPU thread at a time: smaller
/// tiles there only add staging and barriers per FMA.
const MATMUL_MIN_WORKGROUPS_SOFTWARE: usize = 16;

/// Ids of the weight buffers in the bind-group cache, kept apart from the KV pools' ids.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
const ID_TAG: u64 = 1 << 60;

/// How one weight buffer holds its features (see `gpu/shaders.rs` for the quantized layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    /// `[n, k4]` vec4s of the storage type, k padded with zeros.
    Float,
    /// 4-bit codes, then an f32 scale and offset per group.
    Nibbles,
    /// 8-bit signed codes, then an f32 scale per group.
    Bytes,
    /// 8-bit signed codes, then an f32 scale and offset per group.
    BytesOffset,
}

/// One buffer of a split weight matrix, before it exists: features `n0 .. n0 + n`.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChunkPlan {
    pub n0: usize,
    pub n: usize,
    /// Bytes of this buffer's weights, and of the buffer itself (more where zero rows pad it).
    pub bytes: u64,
    pub alloc: u64,
    pub stored: Stored,
    /// log2 of the vec4s sharing a scale, and the word where the scales start (quantized only).
    pub group_shift: u32,
    pub scales_at: u32,
}

/// One buffer of a split weight matrix: features `n0 .. n0 + n`.
#[derive(Debug)]
struct Chunk {
    plan: ChunkPlan,
    /// This buffer's `LinearParams`, rewritten (rows) by each call.
    params: wgpu::Buffer,
    w: wgpu::Buffer,
}

/// A projection's weights (and bias) resident on one device.
#[derive(Debug)]
pub struct GpuLinear {
    id: u64,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// The storage of float weights (f32 for block-quantized ones, which keep their codes).
    pub storage: KvStorage,
    chunks: Vec<Chunk>,
    /// `[n]` f32, zeros when the layer has no bias (one kernel either way).
    bias: wgpu::Buffer,
    /// The GEMV's shape on this device (hardware or software adapter).
    gemv: GemvShape,
    ctx: Weak<GpuContext>,
    /// Held from the parameter writes through the submission: engines sharing a device may call
    /// the same weights at once, and each call rewrites the per-buffer parameters. It also lists
    /// the engines whose bind-group caches name these buffers, to clear them on drop.
    submit: Mutex<Vec<Weak<Mutex<Resources>>>>,
}

impl Drop for GpuLinear {
    /// Cached bind groups would otherwise keep the weights on the device for the engine's life.
    fn drop(&mut self) {
        let engines = self.submit.get_mut().map(std::mem::take).unwrap_or_default();
        let me = self.id;
        for res in engines.iter().filter_map(Weak::upgrade) {
            if let Ok(mut res) = res.lock() {
                res.forget_external(|id| id & ID_TAG != 0 && (id & !ID_TAG) >> 24 == me);
            }
        }
    }
}

impl GpuLinear {
    /// The storage the engine keeps `w` in: f32 weights stay f32 (the model checks hold f32 to
    /// 1e-4), f16 weights stay f16 where the adapter has shader-f16; bf16 weights become f16 there
    /// when every value fits f16's range, else f32 (as f16 weights do without shader-f16).
    pub fn storage_for(engine: &GpuEngine, w: TensorRef<'_>) -> KvStorage {
        let f16 = engine.context().summary.shader_f16;
        match w {
            TensorRef::F32(_) => KvStorage::F32,
            TensorRef::F16(_) if f16 => KvStorage::F16,
            TensorRef::BF16(v) if f16 && v.iter().all(|x| x.to_f32().abs() <= 65504.0) => KvStorage::F16,
            _ => KvStorage::F32,
        }
    }

    /// Uploads `w` (`[n, k]`) and `bias` (`[n]`) in `storage`, in buffers of at most `max_buffer`
    /// bytes (see [`DEFAULT_MAX_WEIGHT_BUFFER`]) and never above the adapter's binding limit.
    /// `OverLimit` only when one row of W does not fit a buffer.
    pub fn upload(
        engine: &GpuEngine,
        w: TensorRef<'_>,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
        storage: KvStorage,
        max_buffer: u64,
    ) -> Result<Self> {
        check_len("projection weights ([n, k])", n * k, w.len())?;
        let ctx = engine.context();
        if storage == KvStorage::F16 && !ctx.summary.shader_f16 {
            return Err(TwinferError::GpuUnavailable(format!("{} has no shader-f16", ctx.summary.name)));
        }
        if !storage.is_float() {
            return Err(TwinferError::InvalidParameter(format!(
                "projection weights are stored f32 or f16 on the device (or as their file's blocks), not {storage}"
            )));
        }
        let k4 = k.div_ceil(4).max(1);
        let row_bytes = (k4 * 4 * storage.bytes()) as u64;
        // The tensor-core matmul loads whole 16-row fragments of its 128-feature tiles, past a
        // buffer's last row: such buffers get zero rows up to a whole tile (cooperative loads
        // out of a binding are not covered by robust buffer access), and hold a whole number of
        // tiles where a buffer holds more than one.
        let binding = ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size);
        let pad = ctx.summary.tensor_cores
            && storage == KvStorage::F16
            && k.is_multiple_of(16)
            && COOP_TILE_FEATURES as u64 * row_bytes <= binding;
        let max_buffer = if pad {
            let per = max_buffer.min(binding) / row_bytes;
            if per >= COOP_TILE_FEATURES as u64 {
                per / COOP_TILE_FEATURES as u64 * COOP_TILE_FEATURES as u64 * row_bytes
            } else {
                max_buffer
            }
        } else {
            max_buffer
        };
        let plans = split_rows(ctx, 0, n, row_bytes, max_buffer, |n0, rows| ChunkPlan {
            n0,
            n: rows,
            bytes: rows as u64 * row_bytes,
            alloc: if pad { rows.next_multiple_of(COOP_TILE_FEATURES) } else { rows } as u64 * row_bytes,
            stored: Stored::Float,
            group_shift: 0,
            scales_at: 0,
        })?;
        let what = format!("projection weights [{n}, {k}] in {storage}");
        Self::create(engine, (n, k), bias, storage, plans, &what, |p| padded_rows(w, p.n0, p.n, k, k4, storage))
    }

    /// Creates the buffers that `plans` describe, fills each with `fill(plan)`, and uploads the
    /// bias (`[n]`, zeros when `None`).
    pub(super) fn create(
        engine: &GpuEngine,
        (n, k): (usize, usize),
        bias: Option<&[f32]>,
        storage: KvStorage,
        plans: Vec<ChunkPlan>,
        what: &str,
        fill: impl Fn(&ChunkPlan) -> Vec<u8>,
    ) -> Result<Self> {
        if let Some(b) = bias {
            check_len("projection bias ([n])", n, b.len())?;
        }
        let ctx = engine.context();
        ctx.check_alive()?;
        let binding = ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size);
        let bias_bytes = (n.max(4) * 4) as u64;
        if bias_bytes > binding {
            return Err(TwinferError::OverLimit { what: "projection bias", requested: bias_bytes, limit: binding });
        }
        let make = |label, size: u64, usage| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        let (made, error) = ctx.scoped(wgpu::ErrorFilter::OutOfMemory, || {
            let chunks: Vec<Chunk> = plans
                .iter()
                .map(|&plan| Chunk {
                    plan,
                    params: make("projection params", size_of::<LinearParams>() as u64, U::UNIFORM | U::COPY_DST),
                    w: make("projection weights", plan.alloc, U::STORAGE | U::COPY_DST),
                })
                .collect();
            (chunks, make("projection bias", bias_bytes, U::STORAGE | U::COPY_DST))
        });
        if let Some(e) = error {
            return Err(TwinferError::GpuOutOfMemory(format!("{what}: {e}")));
        }
        let (chunks, bias_buf) = made;
        ctx.counters.buffers.fetch_add(2 * chunks.len() as u64 + 1, Ordering::Relaxed);
        for c in &chunks {
            ctx.queue.write_buffer(&c.w, 0, &fill(&c.plan));
        }
        let mut b = bias.map_or_else(|| vec![0f32; n], <[f32]>::to_vec);
        b.resize(n.max(4), 0.0);
        ctx.queue.write_buffer(&bias_buf, 0, bytemuck::cast_slice(&b));
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            n,
            k,
            storage,
            chunks,
            bias: bias_buf,
            gemv: if ctx.summary.device_type == "Cpu" { GemvShape::Software } else { GemvShape::Hardware },
            ctx: Arc::downgrade(ctx),
            submit: Mutex::new(Vec::new()),
        })
    }

    /// The GEMV shape these weights run with (chosen by the adapter's type at upload).
    pub fn gemv_shape(&self) -> GemvShape {
        self.gemv
    }

    /// Runs the GEMV with `shape` instead: the tests check both shapes on any adapter.
    pub fn set_gemv_shape(&mut self, shape: GemvShape) {
        self.gemv = shape;
    }

    /// Bytes of weights held on the device (codes and scales, or float rows), without the bias
    /// or the zero rows that pad buffers for the tensor cores.
    pub fn device_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.plan.bytes).sum()
    }

    /// Number of buffers W is split into.
    pub fn num_buffers(&self) -> usize {
        self.chunks.len()
    }

    /// Whether these weights live on `ctx`'s device.
    pub fn is_on(&self, ctx: &Arc<GpuContext>) -> bool {
        self.ctx.upgrade().is_some_and(|c| Arc::ptr_eq(&c, ctx))
    }

    /// Whether the device these weights live on is still there.
    pub fn device_alive(&self) -> bool {
        self.ctx.upgrade().is_some_and(|c| c.check_alive().is_ok())
    }

    /// The id of these weights among the device's resident objects.
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// Locks the per-buffer parameters until the caller submits (engines sharing a device may
    /// call the same weights at once), and registers `engine` to forget its bind groups on drop.
    pub(super) fn lock_for_submit(
        &self,
        engine: &GpuEngine,
    ) -> Result<std::sync::MutexGuard<'_, Vec<Weak<Mutex<Resources>>>>> {
        let mut engines =
            self.submit.lock().map_err(|_| TwinferError::DeviceLost("a previous call panicked".into()))?;
        if !engines.iter().any(|e| std::ptr::eq(e.as_ptr(), Arc::as_ptr(engine.resources()))) {
            engines.push(Arc::downgrade(engine.resources()));
        }
        Ok(engines)
    }

    /// One pass per weight buffer for `rows` input rows: its parameters, pipeline and grid.
    /// Decode rows (at most [`GEMV_MAX_ROWS`]) take the GEMV, more rows the tiled matmul.
    /// `fused` adds the resident path's on-load RMSNorm (its epsilon) or SwiGLU.
    pub(super) fn passes(
        &self,
        engine: &GpuEngine,
        rows: usize,
        accumulate: bool,
        fused: Fused,
    ) -> Vec<(LinearParams, PipelineKey, [usize; 3])> {
        let k4 = self.k.div_ceil(4).max(1);
        let gemv = rows <= GEMV_MAX_ROWS;
        self.chunks
            .iter()
            .map(|Chunk { plan: c, .. }| {
                let tensor_cores = self.on_tensor_cores(engine, rows);
                let (kernel, kv) = match (c.stored, gemv) {
                    (Stored::Float, true) => (Kernel::LinearGemv, self.storage),
                    (Stored::Float, false) if tensor_cores => (Kernel::LinearMatmulCoop, self.storage),
                    (Stored::Float, false) => (Kernel::LinearMatmul, self.storage),
                    (Stored::Nibbles, true) => (Kernel::LinearGemvQ4, KvStorage::F32),
                    (Stored::Nibbles, false) => (Kernel::LinearMatmulQ4, KvStorage::F32),
                    (Stored::Bytes, true) => (Kernel::LinearGemvQ8, KvStorage::F32),
                    (Stored::Bytes, false) => (Kernel::LinearMatmulQ8, KvStorage::F32),
                    (Stored::BytesOffset, true) => (Kernel::LinearGemvQ8Offset, KvStorage::F32),
                    (Stored::BytesOffset, false) => (Kernel::LinearMatmulQ8Offset, KvStorage::F32),
                };
                let (wg, lanes) = self.gemv.threads(k4);
                let variant = if gemv { engine.gemv_variant(wg) } else { Variant::Baseline };
                let tile = if gemv {
                    Tile { wg, br: 0, bc: lanes, chunk: gemv_features_per_thread(rows) }
                } else if kernel == Kernel::LinearMatmulCoop {
                    COOP_TILE
                } else {
                    matmul_tile(rows, self.n, self.gemv)
                };
                let key = PipelineKey { kernel, variant, kv, tile };
                let prm = LinearParams {
                    rows: rows as u32,
                    n: c.n as u32,
                    k4: k4 as u32,
                    n0: c.n0 as u32,
                    ldy: self.n as u32,
                    accumulate: accumulate as u32,
                    norm: matches!(fused, Fused::RmsNorm(_)) as u32,
                    eps: if let Fused::RmsNorm(eps) = fused { eps } else { 0.0 },
                    act: match fused {
                        Fused::SwiGlu => ACT_SWIGLU,
                        Fused::Gelu => ACT_GELU,
                        Fused::None | Fused::RmsNorm(_) => ACT_NONE,
                    },
                    group_shift: c.group_shift,
                    scales_at: c.scales_at,
                    ..Default::default()
                };
                let grid = if gemv {
                    let per_group = (key.tile.wg / key.tile.bc * key.tile.chunk) as usize;
                    let groups = c.n.div_ceil(per_group);
                    [groups.min(32768), groups.div_ceil(32768), rows.div_ceil(GEMV_ROW_GROUP)]
                } else if kernel == Kernel::LinearMatmulCoop {
                    [c.n.div_ceil(COOP_TILE_FEATURES), rows.div_ceil(COOP_TILE_ROWS), 1]
                } else {
                    let (bm, bn) = (16 * key.tile.br as usize, 16 * key.tile.bc as usize);
                    [c.n.div_ceil(bn), rows.div_ceil(bm), 1]
                };
                (prm, key, grid)
            })
            .collect()
    }

    /// Whether `rows` input rows run on the tensor cores: f16 weights, a prompt chunk, rows of a
    /// multiple of 16 inputs, on a device that has them.
    pub(super) fn on_tensor_cores(&self, engine: &GpuEngine, rows: usize) -> bool {
        engine.options().tensor_cores
            && self.storage == KvStorage::F16
            && rows > GEMV_MAX_ROWS
            && self.k.is_multiple_of(16)
            && self.chunks.iter().all(|c| c.plan.stored == Stored::Float)
    }

    /// The pass that splits the input rows for the tensor cores (before [`Self::passes`]), if
    /// they run there: its pipeline and grid. It binds the first chunk's parameters, the input,
    /// the split rows ([`split_bytes`]) and the norm's weights.
    pub(super) fn split_pass(&self, engine: &GpuEngine, rows: usize) -> Option<(PipelineKey, [usize; 3])> {
        if !self.on_tensor_cores(engine, rows) {
            return None;
        }
        Some((split_key(), [rows.next_multiple_of(SPLIT_ROW_PAD), 1, 1]))
    }

    /// Bindings of chunk `i`: its parameters, its weights and the bias.
    pub(super) fn binds(&self, i: usize) -> [Bind<'_>; 3] {
        let id = ID_TAG | self.id << 24 | (i as u64) << 2;
        let c = &self.chunks[i];
        [Bind::External(id, &c.params), Bind::External(id | 1, &c.w), Bind::External(id | 2, &self.bias)]
    }
}

/// What a projection computes on its input as it loads it (the resident forward pass).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Fused {
    None,
    /// RMSNorm with this epsilon (the weights are bound separately).
    RmsNorm(f32),
    /// The input is `[gate | up]` rows and the product takes silu(gate) * up.
    SwiGlu,
    /// The product takes the exact GELU of the input.
    Gelu,
}

/// Features `first .. first + n` split into buffers of at most `max_buffer` bytes (and never above
/// the adapter's binding limit) at `row_bytes` a feature, as `plan(n0, rows)` describes each.
/// `OverLimit` only when one row does not fit a buffer.
pub(super) fn split_rows(
    ctx: &GpuContext,
    first: usize,
    n: usize,
    row_bytes: u64,
    max_buffer: u64,
    plan: impl Fn(usize, usize) -> ChunkPlan,
) -> Result<Vec<ChunkPlan>> {
    let binding = ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size);
    let limit = max_buffer.min(binding);
    if row_bytes > limit {
        return Err(TwinferError::OverLimit { what: "one row of projection weights", requested: row_bytes, limit });
    }
    let per_chunk = ((limit / row_bytes) as usize).min(n.max(1));
    Ok((0..n.div_ceil(per_chunk)).map(|i| plan(first + i * per_chunk, per_chunk.min(n - i * per_chunk))).collect())
}

/// Rows `first .. first + rows` of `w` (`[_, k]`) as device bytes, each padded to `k4` vec4s.
fn padded_rows(w: TensorRef<'_>, first: usize, rows: usize, k: usize, k4: usize, storage: KvStorage) -> Vec<u8> {
    let mut f = vec![0f32; rows * k4 * 4];
    for r in 0..rows {
        w.read_f32((first + r) * k, &mut f[r * k4 * 4..][..k]);
    }
    match storage {
        // `upload` refuses int8 storage before any row is converted.
        KvStorage::F32 | KvStorage::Q8 => bytemuck::cast_slice(&f).to_vec(),
        KvStorage::F16 => {
            let h: Vec<u16> = f.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
    }
}

/// Output features per GEMV thread: one up to 16 rows, where latency rules and more threads in
/// flight help, four for larger batches, where each x load then serves four features. On an H200
/// (smollm-135m, ctx 1K) four took a batch of 64's projections from 6.09 to 5.18 ms and a batch
/// of 8's from 1.36 to 2.01 ms. The sums are the same bits either way.
fn gemv_features_per_thread(rows: usize) -> u32 {
    if rows > 16 { 4 } else { 1 }
}

/// The matmul's outputs per thread for a call of `rows` rows: the row tile shrinks for short
/// chunks. Every choice sums each output in the same order, so results do not depend on it.
fn matmul_tile(rows: usize, n: usize, shape: GemvShape) -> Tile {
    let min_workgroups = match shape {
        GemvShape::Hardware => MATMUL_MIN_WORKGROUPS,
        GemvShape::Software => MATMUL_MIN_WORKGROUPS_SOFTWARE,
    };
    let mut tm = match rows {
        0..=16 => 1,
        17..=32 => 2,
        _ => 4,
    };
    let mut tn = 4;
    // Skinny products (a decode batch against a narrow layer) would run on a handful of
    // workgroups: smaller tiles until there are enough to fill a large GPU.
    let groups = |tm: usize, tn: usize| n.div_ceil(16 * tn) * rows.div_ceil(16 * tm);
    while groups(tm, tn) < min_workgroups && (tm > 1 || tn > 1) {
        if tn >= tm { tn /= 2 } else { tm /= 2 }
    }
    Tile { wg: 256, br: tm as u32, bc: tn as u32, chunk: 0 }
}

impl GpuEngine {
    /// The GEMV's reductions: subgroup shuffles where the engine takes the subgroup variant and
    /// the adapter has one power-of-two subgroup size dividing the workgroup (the kernel's slots
    /// are laid out by that size), else workgroup memory.
    pub(super) fn gemv_variant(&self, wg: u32) -> Variant {
        let (lo, hi) = self.context().summary.subgroup_sizes;
        let fits = lo == hi && lo.is_power_of_two() && wg.is_multiple_of(lo);
        if self.options().variant == Variant::Subgroup && fits { Variant::Subgroup } else { Variant::Baseline }
    }

    /// `y[rows, n] = x[rows, k] · Wᵀ + b` on the device. Blocks; in a browser use
    /// [`GpuEngine::linear_async`].
    pub fn linear(&self, w: &GpuLinear, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        blocking("GpuEngine::linear", self.linear_async(w, x, rows, y))?
    }

    /// [`GpuEngine::linear`] without blocking.
    pub async fn linear_async(&self, w: &GpuLinear, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        if let Some(pending) = self.linear_submit(w, x, rows, y.len())? {
            y.copy_from_slice(&pending.wait_async().await?.into_values());
        }
        Ok(())
    }

    /// Fills the device's projection output with NaN for the next `len` f32s, so that a test sees
    /// any element a kernel leaves unwritten.
    #[doc(hidden)]
    pub fn poison_projection_output_for_test(&self, len: usize) -> Result<()> {
        let mut res = self.lock()?;
        self.write(&mut res, Slot::LinY, bytemuck::cast_slice(&vec![f32::NAN; len]))
    }

    fn linear_submit(&self, w: &GpuLinear, x: &[f32], rows: usize, y_len: usize) -> Result<Option<Pending>> {
        check_len("projection input ([rows, k])", rows * w.k, x.len())?;
        check_len("projection output ([rows, n])", rows * w.n, y_len)?;
        let ctx = self.context();
        ctx.check_alive()?;
        if !w.is_on(ctx) {
            return Err(TwinferError::InvalidParameter("projection weights live on another device".into()));
        }
        if rows == 0 || w.n == 0 {
            return Ok(None);
        }
        let k4 = w.k.div_ceil(4).max(1);
        let mut padded = Vec::new();
        let x = if w.k == k4 * 4 {
            x
        } else {
            padded.resize(rows * k4 * 4, 0.0);
            for r in 0..rows {
                padded[r * k4 * 4..][..w.k].copy_from_slice(&x[r * w.k..][..w.k]);
            }
            &padded[..]
        };
        let _held = w.lock_for_submit(self)?;
        let mut res = self.lock()?;
        let scope = Scopes::push(ctx);
        self.write(&mut res, Slot::LinX, bytemuck::cast_slice(x))?;
        res.buffer(ctx, Slot::LinY, (rows * w.n * 4) as u64)?;
        let mut passes = Vec::with_capacity(w.chunks.len() + 1);
        if let Some((key, grid)) = w.split_pass(self, rows) {
            res.buffer(ctx, Slot::LinSplit, split_bytes(rows, w.k) as u64)?;
            let [params, _, bias] = w.binds(0);
            // No norm: binding 3 is never read, and the bias stands in for it.
            passes.push((key, vec![params, Bind::Slot(Slot::LinX), Bind::Slot(Slot::LinSplit), bias], grid));
        }
        for (i, (prm, key, grid)) in w.passes(self, rows, false, Fused::None).into_iter().enumerate() {
            ctx.queue.write_buffer(&w.chunks[i].params, 0, bytemuck::bytes_of(&prm));
            let [params, weights, bias] = w.binds(i);
            // A resident step's record of what this buffer holds is stale now.
            if let Bind::External(id, _) = params {
                res.set_params((id, 0), None);
            }
            let binds = if key.kernel == Kernel::LinearMatmulCoop {
                vec![params, Bind::Slot(Slot::LinSplit), weights, bias, Bind::Slot(Slot::LinY)]
            } else {
                // No norm: binding 5 is never read, and the bias stands in for it.
                vec![params, Bind::Slot(Slot::LinX), weights, bias, Bind::Slot(Slot::LinY), bias]
            };
            passes.push((key, binds, grid));
        }
        self.run_passes(&mut res, &passes)?;
        let readback = Readback::queue_slot(ctx, &mut res, Slot::LinY, rows * w.n)?;
        Ok(Some(self.submitted(scope, Some(readback))))
    }
}

//! The device-resident path: a KV page pool that lives on the device, appends through
//! `append_kv.wgsl`, and decode steps that upload only Q and the page table (no buffer or bind
//! group is created once the step's sizes have been seen). Also the timing of recorded passes.

use std::sync::atomic::{AtomicU64, Ordering};

use super::engine::{DecodeStep, GpuEngine};
use super::params::AppendParams;
use super::pending::{Readback, Scopes};
#[cfg(not(target_arch = "wasm32"))]
use super::resources::RecordedPass;
use super::resources::{Bind, PipelineKey, Slot, Tile};
use super::shaders::{Kernel, KvStorage, Variant};
use crate::attention::problem::{KvSource, Problem, QoRows};
use crate::attention::{AttentionOutput, AttentionParams};
use crate::dtype::TensorRef;
use crate::error::{Result, TwinferError};
use crate::kv::{KvLayout, PageTable, PagedKv};
use crate::wait::blocking;

/// Default cap on one KV buffer, below any adapter limit: phones bind at most 128 MiB.
pub const DEFAULT_MAX_KV_BUFFER: u64 = 128 << 20;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One layer's page pool on the device: K and V are each `[num_pages, page_size, Hk, D]`, split
/// into buffers of `pages_per_buffer` pages so that no buffer exceeds a binding; page `p` lives
/// in buffer `p / pages_per_buffer` at slot `p % pages_per_buffer`.
///
/// An int8 pool ([`KvStorage::Q8`]) keeps, in each buffer, first the f32 scales of the rows of
/// `pages_per_buffer` pages (`[pages, page_size, Hk]`, padded to 16 bytes), then the codes
/// (`[pages, page_size, Hk, D]` bytes) from word [`GpuKvCache::codes_at`]: a row's number in its
/// buffer locates both its scale and its codes.
#[derive(Debug)]
pub struct GpuKvCache {
    id: u64,
    /// Shape of one page.
    pub layout: KvLayout,
    /// How K and V are stored on the device.
    pub storage: KvStorage,
    /// Pages in the pool.
    pub num_pages: usize,
    /// Pages per device buffer.
    pub pages_per_buffer: usize,
    /// (K, V) per buffer.
    buffers: Vec<(wgpu::Buffer, wgpu::Buffer)>,
}

impl GpuKvCache {
    /// Allocates the pool in buffers of at most `max_buffer` bytes each for K and V (see
    /// [`DEFAULT_MAX_KV_BUFFER`]) and never above the adapter's binding limit. `OverLimit` only
    /// when a single page does not fit.
    pub fn new(
        engine: &GpuEngine,
        layout: KvLayout,
        num_pages: usize,
        storage: KvStorage,
        max_buffer: u64,
    ) -> Result<Self> {
        let layout = KvLayout::new(layout.page_size, layout.num_kv_heads, layout.head_dim)?;
        let ctx = engine.context();
        if storage == KvStorage::F16 && !ctx.summary.shader_f16 {
            return Err(TwinferError::GpuUnavailable(format!("{} has no shader-f16", ctx.summary.name)));
        }
        let page_bytes = pool_page_bytes(layout, storage) as u64;
        let limit = max_buffer.min(ctx.limits.max_storage_buffer_binding_size);
        let most = max_pages_per_buffer(layout, storage, limit);
        if most == 0 {
            return Err(TwinferError::OverLimit { what: "one KV page (K or V)", requested: page_bytes, limit });
        }
        let num_pages = num_pages.max(1);
        let pages_per_buffer = most.min(num_pages).min(u32::MAX as usize - 1);
        let make = |label, pages: usize| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: pool_buffer_bytes(layout, storage, pages, pages_per_buffer),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        let (buffers, error) = ctx.scoped(wgpu::ErrorFilter::OutOfMemory, || {
            (0..num_pages.div_ceil(pages_per_buffer))
                .map(|i| {
                    let pages = pages_per_buffer.min(num_pages - i * pages_per_buffer);
                    (make("kv pool k", pages), make("kv pool v", pages))
                })
                .collect::<Vec<_>>()
        });
        if let Some(e) = error {
            return Err(TwinferError::GpuOutOfMemory(format!("KV pool of 2 x {num_pages} x {page_bytes} bytes: {e}")));
        }
        ctx.counters.buffers.fetch_add(2 * buffers.len() as u64, Ordering::Relaxed);
        Ok(Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), layout, storage, num_pages, pages_per_buffer, buffers })
    }

    /// Number of buffers each of K and V is split into.
    pub fn num_buffers(&self) -> usize {
        self.buffers.len()
    }

    /// (K, V) bindings of buffer `i`, with ids unique to this pool and buffer.
    pub(super) fn binds(&self, i: usize) -> (Bind<'_>, Bind<'_>) {
        let (k, v) = &self.buffers[i];
        let id = self.id << 24 | (i as u64) << 1;
        (Bind::External(id, k), Bind::External(id | 1, v))
    }

    /// Bytes of one page of K (or V), an int8 page's scales included.
    pub fn page_bytes(&self) -> usize {
        pool_page_bytes(self.layout, self.storage)
    }

    /// The word of each buffer where an int8 pool's codes start (after the scales); 0 for float
    /// pools.
    pub fn codes_at(&self) -> u32 {
        match self.storage {
            KvStorage::Q8 => scale_words(self.layout, self.pages_per_buffer) as u32,
            _ => 0,
        }
    }

    /// Buffer `i`'s K and V (handles), or an error when there is no such buffer.
    pub(super) fn buffers_of(&self, i: usize) -> Result<[wgpu::Buffer; 2]> {
        let (k, v) = self.buffers.get(i).ok_or_else(|| TwinferError::InvalidParameter(format!("no KV buffer {i}")))?;
        Ok([k.clone(), v.clone()])
    }

    /// The bind-group cache ids of this pool's buffers, to forget the groups naming them.
    pub fn owns_cache_id(&self, id: u64) -> bool {
        id >> 24 == self.id && ((id >> 1) & 0x7f_ffff) < self.buffers.len() as u64
    }

    /// Uploads whole pages from the host, starting at page `first` (setup and benchmarks).
    pub fn write_pages(&self, engine: &GpuEngine, first: usize, k: TensorRef<'_>, v: TensorRef<'_>) -> Result<()> {
        let page = self.layout.page_elems();
        let pages = k.len() / page;
        if k.len() != v.len() || !k.len().is_multiple_of(page) || first + pages > self.num_pages {
            return Err(TwinferError::ShapeMismatch {
                what: "pages written to the device pool",
                expected: (self.num_pages - first.min(self.num_pages)) * page,
                got: k.len(),
            });
        }
        let q = &engine.context().queue;
        let rows_per_page = self.layout.page_size * self.layout.num_kv_heads;
        let mut p = first;
        while p < first + pages {
            let (buf, slot) = (p / self.pages_per_buffer, p % self.pages_per_buffer);
            let n = (self.pages_per_buffer - slot).min(first + pages - p);
            let (src, len) = ((p - first) * page, n * page);
            let (kb, vb) = &self.buffers[buf];
            for (t, b) in [(k, kb), (v, vb)] {
                if self.storage == KvStorage::Q8 {
                    let (codes, scales) = q8_rows(t, src, len, self.layout.head_dim);
                    let codes_offset = self.codes_at() as u64 * 4 + (slot * page) as u64;
                    q.write_buffer(b, (slot * rows_per_page * 4) as u64, bytemuck::cast_slice(&scales));
                    q.write_buffer(b, codes_offset, bytemuck::cast_slice(&codes));
                } else {
                    let offset = (slot * page * self.storage.bytes()) as u64;
                    q.write_buffer(b, offset, &super::upload::tensor_bytes(t, src, len, self.storage)?);
                }
            }
            p += n;
        }
        Ok(())
    }

    /// Appends one new row per entry of `slots` (page id, slot in page): `k_new`, `v_new` are
    /// `[rows, Hk, D]` f32. Runs `append_kv.wgsl` on the device.
    pub fn append(&self, engine: &GpuEngine, k_new: &[f32], v_new: &[f32], slots: &[(u32, u32)]) -> Result<()> {
        let l = self.layout;
        let rows = slots.len();
        crate::error::check_len("k_new ([rows, Hk, D])", rows * l.row_elems(), k_new.len())?;
        crate::error::check_len("v_new ([rows, Hk, D])", rows * l.row_elems(), v_new.len())?;
        for (position, &(page, slot)) in slots.iter().enumerate() {
            if page as usize >= self.num_pages {
                return Err(TwinferError::PageIndexOutOfRange { position, page, num_pages: self.num_pages });
            }
            if slot as usize >= l.page_size {
                return Err(TwinferError::InvalidParameter(format!("slot {slot} of a {}-row page", l.page_size)));
            }
        }
        if rows == 0 {
            return Ok(());
        }
        engine.context().check_alive()?;
        let mut res = engine.lock()?;
        let prm = AppendParams {
            rows: rows as u32,
            num_kv_heads: l.num_kv_heads as u32,
            head_dim: l.head_dim as u32,
            page_size: l.page_size as u32,
            kv_codes_at: self.codes_at(),
            ..Default::default()
        };
        // Every slot exists before any bind group names it.
        engine.write(&mut res, Slot::AppendParams, bytemuck::bytes_of(&prm))?;
        for slot in [Slot::NewK, Slot::NewV, Slot::AppendSlots] {
            res.buffer(engine.context(), slot, 16)?;
        }
        let key = PipelineKey {
            kernel: Kernel::AppendKv,
            variant: Variant::Baseline,
            kv: self.storage,
            tile: Tile { wg: 64, br: 0, bc: 0, chunk: 0 },
        };
        let row = l.row_elems();
        // One submission per buffer that receives rows (writes are ordered with submissions);
        // every buffer's bind group is made on the first call, so none is made in steady state.
        for buf in 0..self.buffers.len() {
            let mine: Vec<usize> = (0..rows).filter(|&r| slots[r].0 as usize / self.pages_per_buffer == buf).collect();
            let (k, v) = self.binds(buf);
            let binds = vec![
                Bind::Slot(Slot::AppendParams),
                Bind::Slot(Slot::NewK),
                Bind::Slot(Slot::NewV),
                Bind::Slot(Slot::AppendSlots),
                k,
                v,
            ];
            if mine.is_empty() {
                engine.prepare(&mut res, key, &binds)?;
                continue;
            }
            let flat: Vec<u32> =
                mine.iter().flat_map(|&r| [slots[r].0 % self.pages_per_buffer as u32, slots[r].1]).collect();
            let gather = |src: &[f32]| -> Vec<f32> {
                mine.iter().flat_map(|&r| src[r * row..(r + 1) * row].iter().copied()).collect()
            };
            let prm = AppendParams { rows: mine.len() as u32, ..prm };
            engine.write(&mut res, Slot::AppendParams, bytemuck::bytes_of(&prm))?;
            engine.write(&mut res, Slot::NewK, bytemuck::cast_slice(&gather(k_new)))?;
            engine.write(&mut res, Slot::NewV, bytemuck::cast_slice(&gather(v_new)))?;
            engine.write(&mut res, Slot::AppendSlots, bytemuck::cast_slice(&flat))?;
            let n = mine.len();
            engine.run_passes(&mut res, &[(key, binds, [n.min(32768), n.div_ceil(32768), 1])])?;
        }
        Ok(())
    }
}

/// Bytes of one page of K (or V) in `storage`, an int8 page's scales included.
pub fn pool_page_bytes(layout: KvLayout, storage: KvStorage) -> usize {
    let scales = if storage == KvStorage::Q8 { layout.page_size * layout.num_kv_heads * 4 } else { 0 };
    layout.page_elems() * storage.bytes() + scales
}

/// Words of an int8 buffer's scales: one per row of `pages` pages, padded to 16 bytes (the codes
/// after them are read as 8-byte words).
fn scale_words(layout: KvLayout, pages: usize) -> usize {
    (pages * layout.page_size * layout.num_kv_heads).next_multiple_of(4)
}

/// The most pages one pool buffer of at most `limit` bytes holds (an int8 buffer's scales and
/// their padding included).
pub fn max_pages_per_buffer(layout: KvLayout, storage: KvStorage, limit: u64) -> usize {
    let page_bytes = pool_page_bytes(layout, storage) as u64;
    let mut pages = (limit / page_bytes) as usize;
    // Only the padding of the int8 scales (at most 12 bytes) can push the estimate over.
    while pages > 0 && pool_buffer_bytes(layout, storage, pages, pages) > limit {
        pages -= 1;
    }
    pages
}

/// Bytes of a pool buffer holding `pages` pages, the scales sized for `pages_per_buffer` (so that
/// every buffer's codes start at the same word).
pub fn pool_buffer_bytes(layout: KvLayout, storage: KvStorage, pages: usize, pages_per_buffer: usize) -> u64 {
    match storage {
        KvStorage::Q8 => (scale_words(layout, pages_per_buffer) * 4 + pages * layout.page_elems()) as u64,
        _ => (pages * pool_page_bytes(layout, storage)) as u64,
    }
}

/// Elements `[start, start + len)` of `t` (whole rows of `head_dim`) as int8 codes and one scale
/// per row: copied from an int8 tensor with that grouping, quantized as the CPU cache does
/// otherwise.
fn q8_rows(t: TensorRef<'_>, start: usize, len: usize, head_dim: usize) -> (Vec<i8>, Vec<f32>) {
    if let TensorRef::Q8(q) = t
        && q.group == head_dim
    {
        let codes = q.codes[start..start + len].to_vec();
        let scales = q.scales[start / head_dim..(start + len) / head_dim].to_vec();
        return (codes, scales);
    }
    let mut f = vec![0f32; len];
    t.read_f32(start, &mut f);
    let (mut codes, mut scales) = (vec![0i8; len], vec![0f32; len / head_dim]);
    crate::dtype::quantize_q8(&f, head_dim, &mut codes, &mut scales);
    (codes, scales)
}

impl GpuEngine {
    /// Decode against a device-resident pool: uploads Q and the page table, runs decode (and
    /// merge), and reads O (and LSE) back into `out` when given. The table is validated against
    /// the pool exactly as the host API validates it. Blocks; in a browser use
    /// [`GpuEngine::decode_resident_async`].
    pub fn decode_resident(
        &self,
        params: &AttentionParams,
        q: TensorRef<'_>,
        cache: &GpuKvCache,
        table: PageTable<'_>,
        out: Option<&mut AttentionOutput<'_>>,
    ) -> Result<()> {
        blocking("GpuEngine::decode_resident", self.decode_resident_async(params, q, cache, table, out))?
    }

    /// [`GpuEngine::decode_resident`] without blocking.
    pub async fn decode_resident_async(
        &self,
        params: &AttentionParams,
        q: TensorRef<'_>,
        cache: &GpuKvCache,
        table: PageTable<'_>,
        out: Option<&mut AttentionOutput<'_>>,
    ) -> Result<()> {
        // The host API's validation, against the device pool's page count.
        params.validate()?;
        if cache.layout.num_kv_heads != params.num_kv_heads || cache.layout.head_dim != params.head_dim {
            return Err(TwinferError::ShapeMismatch {
                what: "device KV pool heads x head_dim",
                expected: params.num_kv_heads * params.head_dim,
                got: cache.layout.row_elems(),
            });
        }
        table.validate(cache.layout.page_size, cache.num_pages)?;
        let batch = table.batch_size();
        crate::error::check_len(
            "q ([batch, num_qo_heads, head_dim])",
            batch * params.num_qo_heads * params.head_dim,
            q.len(),
        )?;
        let empty: &[half::f16] = &[];
        let kv = PagedKv { k: empty.into(), v: empty.into(), layout: cache.layout };
        let p = Problem { params, q, qo: QoRows::OnePerSeq, kv: KvSource::Paged { kv, table }, batch, total_q: batch };
        if let Some(out) = &out {
            p.check_output(out)?;
        }
        self.context().check_alive()?;
        if p.batch == 0 {
            return Ok(());
        }
        let pending = {
            let mut res = self.lock()?;
            let scope = Scopes::push(self.context());
            let step = DecodeStep {
                p: &p,
                page_size: cache.layout.page_size,
                indices: table.indices,
                storage: cache.storage,
                kv_codes_at: cache.codes_at(),
            };
            let kv: Vec<_> = (0..cache.num_buffers()).map(|i| cache.binds(i)).collect();
            self.decode_on_device(&mut res, &step, &kv, cache.pages_per_buffer as u32)?;
            let rows = p.batch * params.num_qo_heads;
            let readback = match &out {
                Some(out) => Some(Readback::queue(self.context(), &mut res, rows, params.head_dim, out.lse.is_some())?),
                None => None,
            };
            self.submitted(scope, readback)
        };
        let results = pending.wait_async().await?;
        if let Some(out) = out {
            results.write(out);
        }
        Ok(())
    }
}

/// One kernel's share of a step's device time ([`GpuEngine::timestamp_by_kernel`]).
#[derive(Debug, Clone)]
pub struct KernelTime {
    /// The kernel's file under shaders/.
    pub kernel: &'static str,
    /// Its dispatches in the step.
    pub dispatches: usize,
    /// Seconds per replay of those dispatches, one sample per run.
    pub seconds: Vec<f64>,
}

// Timing blocks on the device and reads the host clock: native only (benchmarks, `twinfer plan`).
#[cfg(not(target_arch = "wasm32"))]
impl GpuEngine {
    /// Re-submits the last recorded passes `iters` times (inputs already on the device) and
    /// returns the seconds per iteration, from submit to completion.
    pub fn time_last(&self, iters: usize) -> Result<f64> {
        let res = self.lock()?;
        let passes = res.last_passes().to_vec();
        drop(res);
        if passes.is_empty() {
            return Err(TwinferError::InvalidParameter("nothing recorded to time".into()));
        }
        let ctx = self.context();
        ctx.wait()?;
        let start = std::time::Instant::now();
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("timing") });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            for _ in 0..iters {
                for recorded in &passes {
                    recorded.record(&mut pass);
                }
            }
        }
        ctx.queue.submit([enc.finish()]);
        ctx.wait()?;
        Ok(start.elapsed().as_secs_f64() / iters.max(1) as f64)
    }

    /// Kernel time of the last recorded passes from GPU timestamps: `runs` compute passes, each
    /// one repetition of the passes between a timestamp at its start and one at its end (after a
    /// warm-up repetition); returns the seconds of each, or `None` when the adapter has no
    /// TIMESTAMP_QUERY.
    pub fn timestamp_samples(&self, runs: usize) -> Result<Option<Vec<f64>>> {
        let passes = self.last_recorded()?;
        self.timestamp_passes(&passes, runs)
    }

    /// The last recorded passes' kernel time split by kernel: each kernel's dispatches replayed
    /// alone, in their order, as [`GpuEngine::timestamp_samples`] does for all of them (their sum
    /// comes out a little above the whole, which overlaps neighbouring dispatches). `None` without
    /// TIMESTAMP_QUERY.
    pub fn timestamp_by_kernel(&self, runs: usize) -> Result<Option<Vec<KernelTime>>> {
        let passes = self.last_recorded()?;
        let mut kernels: Vec<Kernel> = Vec::new();
        for p in &passes {
            if !kernels.contains(&p.kernel) {
                kernels.push(p.kernel);
            }
        }
        let mut out = Vec::new();
        for kernel in kernels {
            let mine: Vec<RecordedPass> = passes.iter().filter(|p| p.kernel == kernel).cloned().collect();
            let Some(seconds) = self.timestamp_passes(&mine, runs)? else { return Ok(None) };
            out.push(KernelTime { kernel: kernel.file(), dispatches: mine.len(), seconds });
        }
        Ok(Some(out))
    }

    fn last_recorded(&self) -> Result<Vec<RecordedPass>> {
        let passes = self.lock()?.last_passes().to_vec();
        if passes.is_empty() {
            return Err(TwinferError::InvalidParameter("nothing recorded to time".into()));
        }
        Ok(passes)
    }

    fn timestamp_passes(&self, passes: &[RecordedPass], runs: usize) -> Result<Option<Vec<f64>>> {
        let ctx = self.context();
        if !ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok(None);
        }
        // wgpu caps a query set at 4096 queries; one extra pass warms up.
        let runs = runs.clamp(1, 2047);
        let count = 2 * (runs as u32 + 1);
        let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timing"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let bytes = count as u64 * 8;
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timing resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timing read"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.wait()?;
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("timing") });
        for i in 0..count / 2 {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: Some(2 * i),
                    end_of_pass_write_index: Some(2 * i + 1),
                }),
            });
            for recorded in passes {
                recorded.record(&mut pass);
            }
        }
        enc.resolve_query_set(&set, 0..count, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
        ctx.queue.submit([enc.finish()]);
        read.map_async(wgpu::MapMode::Read, 0..bytes, |_| {});
        ctx.wait()?;
        let period_ns = ctx.queue.get_timestamp_period() as f64;
        let ticks: Vec<u64> = read
            .get_mapped_range(0..bytes)
            .map(|view| bytemuck::cast_slice(&view).to_vec())
            .map_err(|e| TwinferError::GpuValidation(format!("timestamp readback: {e}")))?;
        read.unmap();
        Ok(Some(ticks.chunks(2).skip(1).map(|t| t[1].saturating_sub(t[0]) as f64 * period_ns * 1e-9).collect()))
    }

    /// Read ceiling: a streaming read of `bytes` (a power of two) through `bench_read.wgsl`;
    /// returns seconds per read, `runs` samples of several iterations each.
    pub fn measure_read(&self, bytes: u64, runs: usize) -> Result<Vec<f64>> {
        let ctx = self.context();
        let wgs = 2048usize;
        let mut res = self.lock()?;
        res.buffer(ctx, Slot::K, bytes)?;
        res.buffer(ctx, Slot::O, (wgs * 256 * 16) as u64)?;
        let key = bench_key(Kernel::BenchRead, 0);
        self.run_passes(&mut res, &[(key, vec![Bind::Slot(Slot::K), Bind::Slot(Slot::O)], [wgs, 1, 1])])?;
        drop(res);
        self.samples(runs)
    }

    /// FMA ceiling through `bench_fma.wgsl`: returns (FLOPs per iteration, seconds samples).
    pub fn measure_fma(&self, workgroups: usize, iters: u32, runs: usize) -> Result<(f64, Vec<f64>)> {
        let ctx = self.context();
        let mut res = self.lock()?;
        self.write(&mut res, Slot::Q, bytemuck::cast_slice(&[0.999f32, 0.999, 0.999, 0.999, 1e-3, 1e-3, 1e-3, 1e-3]))?;
        res.buffer(ctx, Slot::O, (workgroups * 256 * 16) as u64)?;
        let key = bench_key(Kernel::BenchFma, iters);
        self.run_passes(&mut res, &[(key, vec![Bind::Slot(Slot::Q), Bind::Slot(Slot::O)], [workgroups, 1, 1])])?;
        drop(res);
        let flops = (workgroups * 256) as f64 * iters as f64 * 8.0 * 4.0 * 2.0;
        Ok((flops, self.samples(runs)?))
    }

    /// Seconds per run of the last recorded passes: `runs` samples, each of enough iterations to
    /// last about 0.2 s.
    pub fn samples(&self, runs: usize) -> Result<Vec<f64>> {
        let once = self.time_last(1)?;
        let iters = ((0.2 / once.max(1e-6)) as usize).clamp(1, 200);
        (0..runs.max(1)).map(|_| self.time_last(iters)).collect()
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn bench_key(kernel: Kernel, iters: u32) -> PipelineKey {
    PipelineKey {
        kernel,
        variant: Variant::Baseline,
        kv: KvStorage::F32,
        tile: Tile { wg: 256, br: 0, bc: iters, chunk: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most pages per buffer is exact: the buffer of that many fits the limit, one more does not.
    #[test]
    fn max_pages_per_buffer_is_exact() {
        for (ps, hk, d) in [(16, 3, 64), (1, 1, 8), (5, 3, 72), (16, 8, 128)] {
            let layout = KvLayout::new(ps, hk, d).unwrap();
            for storage in KvStorage::ALL {
                for limit in [0u64, 100, 4096, 65_536, 1 << 20, 3_333_333] {
                    let n = max_pages_per_buffer(layout, storage, limit);
                    if n > 0 {
                        assert!(pool_buffer_bytes(layout, storage, n, n) <= limit, "{storage} {limit}: {n} pages");
                    }
                    assert!(pool_buffer_bytes(layout, storage, n + 1, n + 1) > limit, "{storage} {limit}: {n} + 1 fit");
                }
            }
        }
    }
}

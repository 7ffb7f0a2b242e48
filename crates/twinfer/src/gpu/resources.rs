//! Allocate once: cached pipelines keyed by (kernel, variant, KV storage, tile), pooled buffers that
//! only grow, and bind groups cached until one of their buffers is replaced. Every creation is
//! counted in [`super::device::Counters`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::device::GpuContext;
use super::shaders::{Kernel, KvStorage, ShaderChecks, Target, Variant, source};
use crate::error::{Result, TwinferError};

/// The `override` values of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tile {
    pub wg: u32,
    /// Query rows per workgroup (prefill, fixed), query heads per workgroup (decode), else 0.
    pub br: u32,
    /// Column groups per thread (prefill), keys per tile (portable prefill), keys per team and
    /// step (decode, fixed), FMA rounds (bench_fma), threads per feature (linear_gemv), else 0.
    /// The matmul's outputs per thread are (br, bc) = (TM, TN).
    pub bc: u32,
    /// Head-dim columns per Q/K chunk (prefill), else 0.
    pub chunk: u32,
}

/// What identifies a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub kernel: Kernel,
    pub variant: Variant,
    pub kv: KvStorage,
    pub tile: Tile,
}

/// Named buffers of the pool; each is reused until a call needs more room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    AttnParams,
    MergeParams,
    Q,
    K,
    V,
    Meta,
    O,
    Lse,
    OPart,
    LsePart,
    AppendParams,
    NewK,
    NewV,
    AppendSlots,
    /// Projections: the input rows (k padded to vec4s) and the output.
    LinX,
    LinY,
    /// Projections on the tensor cores: the input rows split in two f16 parts.
    LinSplit,
    /// The resident forward pass (see [`super::step`]): activations, step inputs, per-step
    /// parameters and page tables.
    Act(super::step::Act),
}

impl Slot {
    /// A number unique to the slot, for the bind-group cache key.
    fn id(self) -> u64 {
        match self {
            Slot::Act(a) => 1000 + a as u64,
            s => s.plain_index(),
        }
    }

    fn plain_index(self) -> u64 {
        [
            Slot::AttnParams,
            Slot::MergeParams,
            Slot::Q,
            Slot::K,
            Slot::V,
            Slot::Meta,
            Slot::O,
            Slot::Lse,
            Slot::OPart,
            Slot::LsePart,
            Slot::AppendParams,
            Slot::NewK,
            Slot::NewV,
            Slot::AppendSlots,
            Slot::LinX,
            Slot::LinY,
            Slot::LinSplit,
        ]
        .iter()
        .position(|&s| s == self)
        .map_or(u64::MAX, |i| i as u64)
    }

    fn usage(self) -> wgpu::BufferUsages {
        use wgpu::BufferUsages as U;
        match self {
            Slot::AttnParams | Slot::MergeParams | Slot::AppendParams => U::UNIFORM | U::COPY_DST,
            Slot::Act(a) if a.is_uniform() => U::UNIFORM | U::COPY_DST,
            _ => U::STORAGE | U::COPY_DST | U::COPY_SRC,
        }
    }
}

/// One binding: a pool slot, or a buffer owned elsewhere (a device-resident KV cache) with an id
/// unique for the buffer's life.
#[derive(Debug, Clone, Copy)]
pub enum Bind<'a> {
    Slot(Slot),
    External(u64, &'a wgpu::Buffer),
}

/// Tags external ids apart from slot numbers in the bind-group cache key.
const EXTERNAL: u64 = 1 << 62;

#[derive(Debug)]
struct Pooled {
    buffer: wgpu::Buffer,
    size: u64,
    generation: u64,
}

/// Per-engine resources, behind the engine's mutex.
#[derive(Debug, Default)]
pub struct Resources {
    pipelines: HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>,
    buffers: HashMap<Slot, Pooled>,
    bind_groups: HashMap<(PipelineKey, Vec<(u64, u64)>), wgpu::BindGroup>,
    next_generation: u64,
    last: Vec<RecordedPass>,
    /// Idle mappable buffers: a call takes one for its results and returns it once read.
    readback: Vec<wgpu::Buffer>,
    checks: ShaderChecks,
    /// What small parameter buffers hold, by (key, buffer generation): a resident step skips
    /// writing what is already there (each queue write stages a buffer of its own).
    params: HashMap<(u64, u64), Vec<u8>>,
}

/// Idle readback buffers kept: one per call in flight at once, which is one or two in practice.
const READBACK_KEPT: usize = 2;

/// A dispatch as recorded (kernel, pipeline, bind group, grid): kept so that a step's device
/// time can be measured by replaying it (natively; the browser has no such timing).
#[derive(Debug, Clone)]
pub struct RecordedPass {
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub kernel: Kernel,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    pub grid: [u32; 3],
}

impl RecordedPass {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.grid;
        pass.dispatch_workgroups(x, y, z);
    }
}

impl Resources {
    pub fn new(checks: ShaderChecks) -> Self {
        Self { checks, ..Self::default() }
    }

    pub fn pipeline(&mut self, ctx: &GpuContext, key: PipelineKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.pipelines.get(&key) {
            return Ok(p.clone());
        }
        let src = source(key.kernel, key.variant, key.kv, Target::current());
        let (pipeline, error) = ctx.scoped(wgpu::ErrorFilter::Validation, || self.compile(ctx, key, src));
        if let Some(e) = error {
            return Err(TwinferError::GpuValidation(format!("{} ({key:?}): {e}", key.kernel.file())));
        }
        ctx.counters.pipelines.fetch_add(1, Ordering::Relaxed);
        let p = Arc::new(pipeline);
        self.pipelines.insert(key, p.clone());
        Ok(p)
    }

    fn compile(&self, ctx: &GpuContext, key: PipelineKey, src: String) -> wgpu::ComputePipeline {
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(key.kernel.file()),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        };
        // SAFETY: the kernels are this crate's own WGSL; every loop is bounded by parameters the
        // host validates, and with `ShaderChecks::Unchecked` every index they form is validated
        // on the host too (page tables, offsets and lengths; see `attention::problem`).
        let module = unsafe { ctx.device.create_shader_module_trusted(desc, self.checks.runtime_checks()) };
        let mut constants: Vec<(&str, f64)> = vec![("WG", key.tile.wg as f64)];
        if key.kernel == Kernel::BenchFma {
            constants.push(("ITERS", key.tile.bc as f64));
        }
        if key.kernel == Kernel::Decode {
            constants.push(("GQ", key.tile.br as f64));
        }
        if key.kernel.is_gemv() {
            constants.push(("TPF", key.tile.bc as f64));
            constants.push(("FPT", key.tile.chunk as f64));
            if key.variant == Variant::Subgroup {
                constants.push(("SG", ctx.summary.subgroup_sizes.0 as f64));
            }
        }
        if key.kernel == Kernel::Prefill {
            constants.push(("WIDE", (key.tile.bc > 2) as u32 as f64));
            constants.push(("DK", key.tile.chunk as f64));
        }
        if key.kernel == Kernel::PrefillPortable {
            constants.push(("BR", key.tile.br as f64));
            constants.push(("BC", key.tile.bc as f64));
        }
        if key.kernel.is_matmul() {
            // Its workgroup is fixed at 16 x 16; WG is not one of its knobs.
            constants = vec![("TM", key.tile.br as f64), ("TN", key.tile.bc as f64)];
        }
        if matches!(key.kernel, Kernel::LinearMatmulCoop | Kernel::LinearSplitF16) {
            // Fixed tile and workgroup: no knobs.
            constants.clear();
        }
        if key.kernel == Kernel::PrefillCoop {
            // Fixed tile and workgroup; the head dim sizes the fragment loops.
            constants = vec![("HD", key.tile.chunk as f64)];
        }
        ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key.kernel.file()),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every workgroup variable is written before it is read.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        })
    }

    /// A buffer of at least `bytes` (never above the binding limit for storage slots).
    pub fn buffer(&mut self, ctx: &GpuContext, slot: Slot, bytes: u64) -> Result<&wgpu::Buffer> {
        // Storage slots start at 64 KiB, so that page tables growing with the context do not
        // reallocate every few steps.
        let floor = if slot.usage().contains(wgpu::BufferUsages::STORAGE) { 64 << 10 } else { 16 };
        let bytes = bytes.max(16).next_multiple_of(16);
        let limit = if slot.usage().contains(wgpu::BufferUsages::STORAGE) {
            ctx.limits.max_storage_buffer_binding_size
        } else {
            ctx.limits.max_buffer_size
        };
        if bytes > limit {
            return Err(TwinferError::OverLimit { what: slot_name(slot), requested: bytes, limit });
        }
        let fits = self.buffers.get(&slot).is_some_and(|b| b.size >= bytes);
        if !fits {
            // Grow geometrically so that a growing context reallocates rarely.
            let size = bytes.next_power_of_two().max(floor).min(limit).max(bytes);
            let (buffer, error) = ctx.scoped(wgpu::ErrorFilter::OutOfMemory, || {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(slot_name(slot)),
                    size,
                    usage: slot.usage(),
                    mapped_at_creation: false,
                })
            });
            if let Some(e) = error {
                return Err(TwinferError::GpuOutOfMemory(format!("{} ({size} bytes): {e}", slot_name(slot))));
            }
            ctx.counters.buffers.fetch_add(1, Ordering::Relaxed);
            self.next_generation += 1;
            let generation = self.next_generation;
            self.buffers.insert(slot, Pooled { buffer, size, generation });
        }
        Ok(&self.buffers[&slot].buffer)
    }

    /// The bind group of `key`'s pipeline over `binds` (binding i = binds[i], whole buffers).
    pub fn bind_group(&mut self, ctx: &GpuContext, key: PipelineKey, binds: &[Bind<'_>]) -> Result<wgpu::BindGroup> {
        let ids: Vec<(u64, u64)> = binds
            .iter()
            .map(|b| match b {
                Bind::Slot(s) => (s.id(), self.buffers[s].generation),
                Bind::External(id, _) => (EXTERNAL | id, 0),
            })
            .collect();
        let cache_key = (key, ids);
        if let Some(bg) = self.bind_groups.get(&cache_key) {
            return Ok(bg.clone());
        }
        // Entries naming a replaced pool buffer can never be hit again.
        let buffers = &self.buffers;
        self.bind_groups.retain(|(_, ids), _| {
            ids.iter().all(|(tag, g)| *tag & EXTERNAL != 0 || buffers.values().any(|b| b.generation == *g))
        });
        let pipeline = self.pipeline(ctx, key)?;
        let entries: Vec<wgpu::BindGroupEntry<'_>> = binds
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: match b {
                    Bind::Slot(s) => self.buffers[s].buffer.as_entire_binding(),
                    Bind::External(_, buf) => buf.as_entire_binding(),
                },
            })
            .collect();
        let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(key.kernel.file()),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        ctx.counters.bind_groups.fetch_add(1, Ordering::Relaxed);
        self.bind_groups.insert(cache_key, bg.clone());
        Ok(bg)
    }

    /// Drops the cached bind groups that name an external buffer whose id `owned` accepts, so that
    /// buffers being freed (a dropped projection's weights) are not kept alive by the cache.
    pub fn forget_external(&mut self, owned: impl Fn(u64) -> bool) {
        self.bind_groups
            .retain(|(_, ids), _| !ids.iter().any(|(tag, _)| *tag & EXTERNAL != 0 && owned(*tag & !EXTERNAL)));
    }

    pub fn set_last_passes(&mut self, passes: Vec<RecordedPass>) {
        self.last = passes;
    }
    #[cfg(not(target_arch = "wasm32"))]
    pub fn last_passes(&self) -> &[RecordedPass] {
        &self.last
    }

    /// A mappable buffer of at least `bytes` for one call's results, reused when one is idle.
    pub fn take_readback(&mut self, ctx: &GpuContext, bytes: u64) -> Result<wgpu::Buffer> {
        let bytes = bytes.max(16).next_multiple_of(16);
        if let Some(i) = self.readback.iter().position(|b| b.size() >= bytes) {
            return Ok(self.readback.swap_remove(i));
        }
        let limit = ctx.limits.max_buffer_size;
        if bytes > limit {
            return Err(TwinferError::OverLimit { what: "readback", requested: bytes, limit });
        }
        // Grow geometrically, as the pooled slots do.
        let size = bytes.next_power_of_two().min(limit).max(bytes);
        let (buffer, error) = ctx.scoped(wgpu::ErrorFilter::OutOfMemory, || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        if let Some(e) = error {
            return Err(TwinferError::GpuOutOfMemory(format!("readback ({size} bytes): {e}")));
        }
        ctx.counters.buffers.fetch_add(1, Ordering::Relaxed);
        Ok(buffer)
    }

    /// Returns an unmapped readback buffer; only the largest few are kept.
    pub fn put_readback(&mut self, buffer: wgpu::Buffer) {
        self.readback.push(buffer);
        self.readback.sort_by_key(|b| std::cmp::Reverse(b.size()));
        self.readback.truncate(READBACK_KEPT);
    }

    /// The generation of a slot's buffer (a new one on every reallocation), 0 if it has none.
    pub fn generation(&self, slot: Slot) -> u64 {
        self.buffers.get(&slot).map_or(0, |b| b.generation)
    }

    /// Whether the parameter buffer `(key, generation)` holds `data` already.
    pub fn params_hold(&self, key: (u64, u64), data: &[u8]) -> bool {
        self.params.get(&key).is_some_and(|held| held == data)
    }

    /// Records what a parameter buffer holds after a write; `None` forgets it (written elsewhere).
    pub fn set_params(&mut self, key: (u64, u64), data: Option<&[u8]>) {
        match data {
            Some(d) => {
                self.params.insert(key, d.to_vec());
            }
            None => {
                self.params.remove(&key);
            }
        }
    }

    /// The size of a slot's buffer, if it has one yet.
    pub fn size(&self, slot: Slot) -> Option<u64> {
        self.buffers.get(&slot).map(|b| b.size)
    }

    pub fn get(&self, slot: Slot) -> &wgpu::Buffer {
        &self.buffers[&slot].buffer
    }
}

fn slot_name(slot: Slot) -> &'static str {
    match slot {
        Slot::AttnParams => "attention params",
        Slot::MergeParams => "merge params",
        Slot::Q => "q",
        Slot::K => "k (one binding)",
        Slot::V => "v (one binding)",
        Slot::Meta => "page table and indices",
        Slot::O => "o",
        Slot::Lse => "lse",
        Slot::OPart => "split-K partial o",
        Slot::LsePart => "split-K partial lse",
        Slot::AppendParams => "append params",
        Slot::NewK => "new k rows",
        Slot::NewV => "new v rows",
        Slot::AppendSlots => "append slots",
        Slot::LinX => "projection input",
        Slot::LinY => "projection output",
        Slot::LinSplit => "split projection input",
        Slot::Act(a) => a.name(),
    }
}

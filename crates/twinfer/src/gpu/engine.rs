//! The GPU engine: its options, device and resource pools, pass recording, tile choices and the
//! self-test. Its calls over host slices (attention in `attention_calls.rs`, projections in
//! `linear.rs`) have the CPU engine's semantics: each stages its inputs into pooled buffers,
//! records one submission and reads the results back; no buffer or bind group is created once
//! the pools have grown to the call's size. Every call is a `*_submit` that encodes and submits,
//! then a wait ([`super::pending`]): blocking natively, awaited in a browser.

use std::sync::{Arc, Mutex};

use super::device::{GpuContext, ResourceCounts};
use super::params::{AttnParams, MergeParams};
use super::resources::{Bind, PipelineKey, RecordedPass, Resources, Slot, Tile};
use super::shaders::{Kernel, KvStorage, ShaderChecks, Variant};
use crate::attention::problem::Problem;
use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, PrefillInput};
use crate::cpu::SplitK;
use crate::dtype::DType;
use crate::error::{Result, TwinferError};
use crate::wait::blocking;

/// Most query heads per decode workgroup (heads 0..3 of the shader's unrolled state).
const DECODE_GMAX: usize = 4;
/// Keys per team and step of decode (unrolled in the shader).
const DECODE_KEYS_PER_TEAM: usize = 4;
/// Workgroups a decode dispatch is split up to: a sequence's KV heads are split into
/// DECODE_TARGET_WORKGROUPS / (their workgroups in the batch) chunks, rounded down, so a batch
/// that already has that many workgroups is not split. Swept on an H100 (GQA 32/8, head_dim
/// 128, page 16; kernel times in ms for targets 4096 / 1024 / 512 / 256 / 128): batch 1 ctx 32K
/// 0.161 / 0.161 / 0.117 / 0.090 / 0.117, batch 8 ctx 32K 0.566 / 0.477 / 0.463 / 0.456 / 0.706,
/// batch 64 ctx 8K 0.956 / 0.891 / 0.878 / 0.876 / 0.883; smollm-135m's 30 layers at batch 64 ctx
/// 1K (192 workgroups unsplit) 1.43 with 4 chunks, 1.25 with 2, 1.09 unsplit. More, shorter
/// chunks cost more in their starts, partial states and merge than they gain in parallelism.
pub(super) const DECODE_TARGET_WORKGROUPS: usize = 256;
/// Keys a decode chunk has at least, so that a workgroup's start and final merge are amortised
/// (and a growing sequence changes its chunk count rarely).
pub(super) const DECODE_MIN_CHUNK: usize = 256;
/// Workgroup storage every kernel fits in (decode: 21 KiB, portable prefill: 16 KiB).
pub const WORKGROUP_STORAGE_NEEDED: u32 = 22 * 1024;
/// Workgroup storage and threads of the register-tiled prefill kernel; adapters with less run the
/// portable one.
pub const TILED_PREFILL_STORAGE: u32 = 32 * 1024;
const TILED_PREFILL_THREADS: u32 = 256;
/// Workgroup storage of the register-tiled prefill with 32-column chunks.
const WIDE_CHUNK_PREFILL_STORAGE: u32 = 48 * 1024;

/// How the engine runs; every field can be forced (tests cover each variant explicitly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuOptions {
    /// Reduction variant of the kernels (by default subgroup where the adapter has subgroups).
    pub variant: Variant,
    /// Keep f16 K/V as f16 on the device (needs SHADER_F16); otherwise K/V are widened to f32.
    pub f16_kv: bool,
    /// How decode splits long sequences into chunks; `Auto` splits a batch up to 256 workgroups.
    pub split_k: SplitK,
    /// Decode workgroup size in threads (teams of head_dim / 8 lanes): 64, 128 or 256.
    pub decode_wg: u32,
    /// Prefill with the portable kernel (one score per thread) instead of the register-tiled one:
    /// the default for software adapters in browsers (SwiftShader loses the device on the
    /// register-tiled kernel) and for adapters under 32 KiB of workgroup storage or 256 threads.
    pub portable_prefill: bool,
    /// The checks compiled into the kernels (see [`ShaderChecks`]).
    pub shader_checks: ShaderChecks,
    /// Prompt chunks' projections over f16 weights on the tensor cores
    /// (`linear_matmul_coop.wgsl`), by default where the device has them
    /// (`AdapterSummary::tensor_cores`).
    pub tensor_cores: bool,
    /// Prefill over f16 K/V with head dims that are multiples of 16 up to 128 on the tensor
    /// cores too (`prefill_attention_coop.wgsl`; needs `tensor_cores`). Experimental and off by
    /// default: its results were wrong on an H100 (2026-12-07), and the version with its
    /// workgroup memory aligned for cooperative loads has not yet run on a device (see the
    /// README).
    pub tensor_core_prefill: bool,
}

/// The WGSL engine on one device.
#[derive(Debug, Clone)]
pub struct GpuEngine {
    ctx: Arc<GpuContext>,
    res: Arc<Mutex<Resources>>,
    opts: GpuOptions,
}

// SAFETY: in the threaded wasm build `GpuContext::open_async` always fails and nothing else makes
// a context, so no engine (nor any wgpu handle it would hold) ever exists there. Elsewhere wgpu's
// types are Send + Sync and so is the engine, without these impls.
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
unsafe impl Send for GpuEngine {}
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
unsafe impl Sync for GpuEngine {}

impl GpuEngine {
    /// Opens the device (see [`GpuContext::open`]) and picks the best variant it supports.
    pub fn new() -> Result<Self> {
        Self::on(GpuContext::open()?)
    }

    /// [`GpuEngine::new`] without blocking (the way to open it in a browser).
    pub async fn new_async() -> Result<Self> {
        Self::on(GpuContext::open_async().await?)
    }

    /// An engine on an open device, best variant.
    pub fn on(ctx: Arc<GpuContext>) -> Result<Self> {
        if ctx.limits.max_compute_workgroup_storage_size < WORKGROUP_STORAGE_NEEDED {
            return Err(TwinferError::GpuUnavailable(format!(
                "{}: {} bytes of workgroup storage, the kernels need {WORKGROUP_STORAGE_NEEDED}",
                ctx.summary.name, ctx.limits.max_compute_workgroup_storage_size
            )));
        }
        let opts = GpuOptions {
            variant: if ctx.summary.subgroups { Variant::Subgroup } else { Variant::Baseline },
            f16_kv: ctx.summary.shader_f16,
            split_k: SplitK::Auto,
            // 128 threads (8 teams of 16 lanes at head_dim 128) beat 64 and 256 on an H100; a
            // software adapter gains nothing from wide workgroups.
            decode_wg: if ctx.summary.device_type != "Cpu" && ctx.summary.max_invocations >= 128 { 128 } else { 64 },
            portable_prefill: (cfg!(target_arch = "wasm32") && ctx.summary.device_type == "Cpu")
                || ctx.limits.max_compute_workgroup_storage_size < TILED_PREFILL_STORAGE
                || ctx.summary.max_invocations < TILED_PREFILL_THREADS,
            shader_checks: ShaderChecks::for_backend(&ctx.summary.backend),
            tensor_cores: ctx.summary.tensor_cores,
            tensor_core_prefill: false,
        };
        Ok(Self { ctx, res: Arc::new(Mutex::new(Resources::new(opts.shader_checks))), opts })
    }

    /// The same device with other options (own pools); errors if the adapter lacks a feature.
    pub fn with_options(&self, opts: GpuOptions) -> Result<Self> {
        if opts.variant == Variant::Subgroup && !self.ctx.summary.subgroups {
            return Err(TwinferError::GpuUnavailable(format!("{} has no subgroups", self.ctx.summary.name)));
        }
        if (opts.tensor_cores || opts.tensor_core_prefill) && !self.ctx.summary.tensor_cores {
            return Err(TwinferError::GpuUnavailable(format!(
                "{} cannot run the tensor-core kernels (16 x 16 f16 cooperative matrices, subgroups of 32)",
                self.ctx.summary.name
            )));
        }
        if opts.f16_kv && !self.ctx.summary.shader_f16 {
            return Err(TwinferError::GpuUnavailable(format!("{} has no shader-f16", self.ctx.summary.name)));
        }
        if !opts.portable_prefill
            && (self.ctx.limits.max_compute_workgroup_storage_size < TILED_PREFILL_STORAGE
                || self.ctx.summary.max_invocations < TILED_PREFILL_THREADS)
        {
            return Err(TwinferError::GpuUnavailable(format!(
                "{}: the register-tiled prefill needs {TILED_PREFILL_STORAGE} bytes of workgroup storage and {TILED_PREFILL_THREADS} threads",
                self.ctx.summary.name
            )));
        }
        if ![64, 128, 256].contains(&opts.decode_wg) || opts.decode_wg > self.ctx.summary.max_invocations {
            return Err(TwinferError::InvalidParameter(format!("decode_wg {} (64, 128 or 256)", opts.decode_wg)));
        }
        Ok(Self { ctx: self.ctx.clone(), res: Arc::new(Mutex::new(Resources::new(opts.shader_checks))), opts })
    }

    /// The options the engine runs with.
    pub fn options(&self) -> GpuOptions {
        self.opts
    }
    /// The shared device and queue.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }
    /// Buffers, bind groups and pipelines created on this device so far.
    pub fn counts(&self) -> ResourceCounts {
        self.ctx.counters.snapshot()
    }
    /// `"subgroup, f16 KV"` and the like.
    pub fn variant_name(&self) -> String {
        let checks = if self.opts.shader_checks == ShaderChecks::for_backend(&self.ctx.summary.backend) {
            String::new()
        } else {
            format!(", {} shader checks", self.opts.shader_checks.name())
        };
        let tensor = match (self.opts.tensor_cores, self.opts.tensor_core_prefill) {
            (true, true) => ", tensor cores, tensor-core prefill",
            (true, false) => ", tensor cores",
            (false, true) => ", tensor-core prefill",
            (false, false) => "",
        };
        format!("{}, {} KV{tensor}{checks}", self.opts.variant.name(), if self.opts.f16_kv { "f16" } else { "f32" })
    }

    /// Destroys the device, as a driver reset or a browser reclaiming the GPU would: every later
    /// call fails with `DeviceLost`. For tests of the CPU fallback.
    #[doc(hidden)]
    pub fn lose_device_for_test(&self) {
        self.ctx.destroy_for_test();
    }

    /// The prefill kernel for K/V stored as `storage` and `head_dim`: the portable one where the
    /// options ask for it; the tensor cores' where they ask for it, for f16 K/V and head dims
    /// that are multiples of 16 up to 128 (with its workgroup storage); else the register-tiled
    /// FMA kernel.
    pub(super) fn prefill_kernel_for(&self, head_dim: usize, storage: KvStorage) -> Kernel {
        if self.opts.portable_prefill {
            Kernel::PrefillPortable
        } else if self.opts.tensor_core_prefill
            && storage == KvStorage::F16
            && head_dim.is_multiple_of(16)
            && (16..=128).contains(&head_dim)
            && self.ctx.limits.max_compute_workgroup_storage_size >= super::device::PREFILL_COOP_STORAGE
        {
            Kernel::PrefillCoop
        } else {
            Kernel::Prefill
        }
    }

    /// The file of the prefill kernel that runs for `head_dim` and K/V of `dtype` (for tests and
    /// reports).
    #[doc(hidden)]
    pub fn prefill_kernel(&self, head_dim: usize, dtype: DType) -> &'static str {
        self.prefill_kernel_for(head_dim, self.kv_storage(dtype)).file()
    }

    pub(super) fn kv_storage(&self, dtype: DType) -> KvStorage {
        if self.opts.f16_kv && dtype == DType::F16 { KvStorage::F16 } else { KvStorage::F32 }
    }

    /// The pools and caches, for resident objects that must leave the cache when dropped.
    pub(super) fn resources(&self) -> &Arc<Mutex<Resources>> {
        &self.res
    }

    /// Drops the cached bind groups naming external buffers whose id `owned` accepts (resident
    /// objects being freed), so the cache does not keep them on the device.
    pub fn forget_bind_groups(&self, owned: impl Fn(u64) -> bool) {
        if let Ok(mut res) = self.res.lock() {
            res.forget_external(owned);
        }
    }

    pub(super) fn lock(&self) -> Result<std::sync::MutexGuard<'_, Resources>> {
        self.res.lock().map_err(|_| TwinferError::DeviceLost("a previous call panicked".into()))
    }

    pub(super) fn write(&self, res: &mut Resources, slot: Slot, bytes: &[u8]) -> Result<()> {
        let buf = res.buffer(&self.ctx, slot, bytes.len() as u64)?;
        if !bytes.is_empty() {
            self.ctx.queue.write_buffer(buf, 0, bytes);
        }
        Ok(())
    }

    /// Encodes the passes in order, in one submission.
    pub(super) fn run_passes(
        &self,
        res: &mut Resources,
        passes: &[(PipelineKey, Vec<Bind<'_>>, [usize; 3])],
    ) -> Result<()> {
        let ctx = &*self.ctx;
        let max = ctx.limits.max_compute_workgroups_per_dimension as u64;
        let mut prepared = Vec::new();
        for (key, slots, grid) in passes {
            if let Some(&g) = grid.iter().find(|&&g| g as u64 > max) {
                return Err(TwinferError::OverLimit {
                    what: "workgroups in one dimension",
                    requested: g as u64,
                    limit: max,
                });
            }
            prepared.push(RecordedPass {
                kernel: key.kernel,
                pipeline: res.pipeline(ctx, *key)?,
                bind_group: res.bind_group(ctx, *key, slots)?,
                grid: grid.map(|g| g as u32),
            });
        }
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("twinfer") });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            for recorded in &prepared {
                recorded.record(&mut pass);
            }
        }
        ctx.queue.submit([enc.finish()]);
        ctx.counters.dispatches.fetch_add(prepared.len() as u64, std::sync::atomic::Ordering::Relaxed);
        res.set_last_passes(prepared);
        ctx.counters.submits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Makes the pipeline and bind group of a pass without running it (warm-up).
    pub(super) fn prepare(&self, res: &mut Resources, key: PipelineKey, binds: &[Bind<'_>]) -> Result<()> {
        res.bind_group(&self.ctx, key, binds).map(drop)
    }
}

/// One validated decode call, with the page ids the kernels use.
#[derive(Debug)]
pub(super) struct DecodeStep<'a> {
    pub p: &'a Problem<'a>,
    pub page_size: usize,
    pub indices: &'a [u32],
    pub storage: KvStorage,
    /// An int8 pool's codes word ([`super::GpuKvCache::codes_at`]), else 0.
    pub kv_codes_at: u32,
}

/// A planned decode: the kernel's parameters and page table words, its pipeline and grid, the
/// bytes of its outputs (partials when split), and the merge of a split.
#[derive(Debug)]
pub(super) struct DecodePlan {
    pub prm: AttnParams,
    pub meta: Vec<u32>,
    pub key: PipelineKey,
    pub grid: [usize; 3],
    pub o_bytes: u64,
    pub lse_bytes: u64,
    pub merge: Option<MergePlan>,
}

/// The merge of split-K partials into O and LSE.
#[derive(Debug)]
pub(super) struct MergePlan {
    pub params: MergeParams,
    pub key: PipelineKey,
    pub grid: [usize; 3],
    pub o_bytes: u64,
    pub lse_bytes: u64,
}

/// A planned prefill: parameters, page table and work-list words, pipeline and grid.
#[derive(Debug)]
pub(super) struct PrefillPlan {
    pub prm: AttnParams,
    pub meta: Vec<u32>,
    pub key: PipelineKey,
    pub grid: [usize; 3],
}

pub(super) fn unreachable_qo() -> Result<u32> {
    Err(TwinferError::InvalidParameter("prefill needs a qo_indptr".into()))
}

/// Decode workgroup shape for a GQA group, head dim and workgroup size: (query heads per
/// workgroup, keys per team and step, keys per step). Heads are split evenly into blocks of at
/// most `DECODE_GMAX`; a team is `head_dim / 8` lanes, at most 32 teams.
pub fn decode_shape(group: usize, head_dim: usize, wg: usize) -> (usize, usize, usize) {
    let gq = group.div_ceil(group.div_ceil(DECODE_GMAX));
    let teams = (wg / (head_dim / 8)).clamp(1, 32);
    (gq, DECODE_KEYS_PER_TEAM, teams * DECODE_KEYS_PER_TEAM)
}

/// Prefill tile: 256 threads and 64 query rows (fixed by the kernel's thread mapping); `bc` is the
/// vec4 column groups per thread: 2, or 4 for head dims over 128 (`WIDE`); `chunk` the head-dim
/// columns per Q/K chunk (`DK`): 32 where the adapter gives 48 KiB of workgroup memory, else 16.
pub fn prefill_tile(head_dim: usize, workgroup_storage: u32) -> Tile {
    let chunk = if workgroup_storage >= WIDE_CHUNK_PREFILL_STORAGE { 32 } else { 16 };
    Tile { wg: 256, br: 64, bc: if head_dim > 128 { 4 } else { 2 }, chunk }
}

/// Portable prefill tile for a head dim: BC keys of K (or V), rows padded by one vec4, in 16 KiB
/// of workgroup memory.
pub fn portable_prefill_tile(head_dim: usize) -> Tile {
    let dv = (head_dim / 4) as u32;
    Tile { wg: 128, br: 32, bc: (1024 / (dv + 1)).min(64), chunk: 0 }
}

/// The prefill work list: `(sequence, first row)` per tile of `br` rows, the tiles that see the
/// most keys first. Launched in this order, the long causal tiles start in the first wave and the
/// short ones fill the tail, instead of a last wave of long tiles on a mostly idle device.
pub(super) fn prefill_work(p: &Problem<'_>, params: &AttentionParams, br: usize) -> Vec<u32> {
    let group = params.group_size();
    let mut items: Vec<(usize, u32, u32)> = Vec::new();
    for b in 0..p.batch {
        let (qo_len, kv_len) = (p.qo_len(b), p.kv.kv_len(b));
        for row0 in (0..qo_len * group).step_by(br) {
            let last = ((row0 + br).min(qo_len * group) - 1) / group;
            let first_pos = (row0 / group + kv_len) as i64 - qo_len as i64;
            let last_pos = (last + kv_len) as i64 - qo_len as i64;
            let hi = if params.causal { (last_pos + 1).clamp(0, kv_len as i64) } else { kv_len as i64 };
            let lo = params.window_left.map_or(0, |w| (first_pos - w.min(1 << 30) as i64).max(0));
            items.push(((hi - lo).max(0) as usize, b as u32, row0 as u32));
        }
    }
    items.sort_by_key(|item| std::cmp::Reverse(item.0));
    items.into_iter().flat_map(|(_, b, row0)| [b, row0]).collect()
}

pub(super) fn q_f32(p: &Problem<'_>) -> Vec<f32> {
    let mut q = vec![0f32; p.q.len()];
    p.q.read_f32(0, &mut q);
    q
}

impl GpuEngine {
    /// A tiny prefill (paged, causal, GQA 2) and a decode compared with the CPU engine: a driver
    /// that miscompiles the kernels is caught before any real call.
    pub fn self_test(&self, cpu: &crate::cpu::CpuEngine) -> Result<()> {
        blocking("GpuEngine::self_test", self.self_test_async(cpu))?
    }

    /// [`GpuEngine::self_test`] without blocking.
    pub async fn self_test_async(&self, cpu: &crate::cpu::CpuEngine) -> Result<()> {
        use crate::KvInput;
        use crate::kv::{KvLayout, PageTable, PagedKv};
        let (hq, hk, d, ps) = (4, 2, 16, 4);
        let layout = KvLayout::new(ps, hk, d)?;
        let pages = 5;
        let n = pages * layout.page_elems();
        let wave = |i: usize, f: f32| (i as f32 * f).sin() * 0.5;
        let k: Vec<f32> = (0..n).map(|i| wave(i, 0.37)).collect();
        let v: Vec<f32> = (0..n).map(|i| wave(i, 0.71)).collect();
        let kv = PagedKv::new(k.as_slice().into(), v.as_slice().into(), layout)?;
        let (indptr, indices, last) = ([0u32, 3, 5], [4u32, 0, 2, 1, 3], [2u32, 4]);
        let table = PageTable::new(&indptr, &indices, &last);
        let params = AttentionParams::new(hq, hk, d).causal(true);
        let qo_indptr = [0u32, 3, 5];
        let q: Vec<f32> = (0..5 * hq * d).map(|i| wave(i, 1.3)).collect();
        let prefill = PrefillInput { q: q.as_slice().into(), qo_indptr: &qo_indptr, kv: KvInput::Paged { kv, table } };
        let decode = DecodeInput { q: q[..2 * hq * d].into(), kv, table };
        for (name, rows) in [("prefill", 5), ("decode", 2)] {
            let (mut og, mut lg) = (vec![f32::NAN; rows * hq * d], vec![f32::NAN; rows * hq]);
            let (mut oc, mut lc) = (vec![0f32; rows * hq * d], vec![0f32; rows * hq]);
            let mut out_g = AttentionOutput::with_lse(og.as_mut_slice(), &mut lg);
            let mut out_c = AttentionOutput::with_lse(oc.as_mut_slice(), &mut lc);
            if name == "prefill" {
                self.prefill_async(&params, &prefill, &mut out_g).await?;
                cpu.prefill(&params, &prefill, &mut out_c)?;
            } else {
                self.decode_async(&params, &decode, &mut out_g).await?;
                cpu.decode(&params, &decode, &mut out_c)?;
            }
            let bad = og
                .iter()
                .zip(&oc)
                .chain(lg.iter().zip(&lc))
                .position(|(g, c)| g != c && (g - c).abs().partial_cmp(&1e-3) != Some(std::cmp::Ordering::Less));
            if let Some(i) = bad {
                return Err(TwinferError::GpuUnavailable(format!(
                    "{}: self-test {name} disagrees with the CPU engine at element {i}",
                    self.ctx.summary.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::KvInput;
    use crate::gpu::shaders::{Kernel, Target, source};

    /// The work list covers every tile of `BR` rows of every sequence exactly once (a tile height
    /// that disagreed with the kernel's would recompute rows, or skip them), longest first.
    #[test]
    fn prefill_work_covers_each_tile_once_longest_first() {
        let tile = prefill_tile(128, 48 * 1024);
        let src = source(Kernel::Prefill, Variant::Baseline, KvStorage::F32, Target::Naga);
        assert!(src.contains(&format!("const BR: u32 = {}u;", tile.br)), "the kernel's BR is not {}", tile.br);
        let params = AttentionParams::new(8, 2, 16).causal(true);
        let qo_indptr = [0u32, 100, 101, 357];
        let kv_indptr = [0u32, 100, 201, 457];
        let q = vec![0f32; 357 * 8 * 16];
        let kv = vec![0f32; 457 * 2 * 16];
        let input = PrefillInput {
            q: q.as_slice().into(),
            qo_indptr: &qo_indptr,
            kv: KvInput::Ragged { k: kv.as_slice().into(), v: kv.as_slice().into(), kv_indptr: &kv_indptr },
        };
        let p = Problem::prefill(&params, &input).unwrap();
        let work = prefill_work(&p, &params, tile.br as usize);
        let items: Vec<(u32, u32)> = work.chunks(2).map(|w| (w[0], w[1])).collect();
        let mut sorted = items.clone();
        sorted.sort();
        let mut want = Vec::new();
        for (b, len) in [(0u32, 100u32), (1, 1), (2, 256)] {
            want.extend((0..len * 4).step_by(tile.br as usize).map(|r| (b, r)));
        }
        assert_eq!(sorted, want);
        // Sequence 2's last tile sees all 256 of its keys, the most; sequence 1's only tile sees 101.
        assert_eq!(items[0], (2, 1024 - 64));
        assert!(items.iter().position(|&i| i == (1, 0)) > items.iter().position(|&i| i == (2, 512)));
    }
}

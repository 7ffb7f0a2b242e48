//! The SIMD CPU engine (pulp): blocked online-softmax prefill and paged, split-K decode.

/// Calls a register-blocked micro-kernel `f::<generics.., MR, N>(args..)` for a run-time block
/// shape: `mr` rows (1..=4) by `n` columns or vectors (1..=2, or 1..=4 with `wide`). Const
/// generics keep each shape's accumulators in registers; this turns the run-time shape into one.
macro_rules! block_shape {
    ($mr:expr, $n:expr, $f:ident::<$($g:ty),*>($($arg:expr),* $(,)?)) => {
        match ($mr, $n) {
            (4, 2) => $f::<$($g,)* 4, 2>($($arg),*),
            (4, _) => $f::<$($g,)* 4, 1>($($arg),*),
            (3, 2) => $f::<$($g,)* 3, 2>($($arg),*),
            (3, _) => $f::<$($g,)* 3, 1>($($arg),*),
            (2, 2) => $f::<$($g,)* 2, 2>($($arg),*),
            (2, _) => $f::<$($g,)* 2, 1>($($arg),*),
            (_, 2) => $f::<$($g,)* 1, 2>($($arg),*),
            _ => $f::<$($g,)* 1, 1>($($arg),*),
        }
    };
    (wide $mr:expr, $n:expr, $f:ident::<$($g:ty),*>($($arg:expr),* $(,)?)) => {
        match ($mr, $n) {
            (4, 4) => $f::<$($g,)* 4, 4>($($arg),*),
            (4, 3) => $f::<$($g,)* 4, 3>($($arg),*),
            (mr, n) => block_shape!(mr, n.min(2), $f::<$($g),*>($($arg),*)),
        }
    };
}

/// Whether register blocks may be sized for 32 vector registers (AVX-512, NEON). Not AVX2 (16),
/// and not wasm: pulp counts 32 for it, as on ARM, but engines on x86-64 hosts map its vectors to
/// the 16 XMM registers, where such blocks spill (measured in headless Chromium on an AMD EPYC).
#[inline(always)]
pub(crate) fn wide_registers<S: pulp::Simd>() -> bool {
    S::REGISTER_COUNT >= 32 && !cfg!(target_arch = "wasm32")
}

mod block;
pub(crate) mod convert;
mod decode;
mod linear;
mod linear_quant;
pub(crate) mod math;
mod microkernel;
#[cfg(target_arch = "x86_64")]
mod microkernel_bf16;
pub(crate) mod parallel;
#[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
mod pool;
mod qdot;
mod simd_level;
mod softmax;

pub use linear::{Bf16Panels, linear, linear_parts, linear_parts_packed};

/// The threaded wasm build's pool size (the calling thread included), set before the first model
/// call: that build cannot start threads itself, so JavaScript starts `threads - 1` Web Workers on
/// the module's shared memory and each calls [`serve_wasm_worker`]. Tasks that arrive before the
/// workers do run on the calling thread, which must itself be a worker (a page's main thread may
/// not block). Fails once the pool runs with another size.
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
pub fn set_wasm_threads(threads: usize) -> crate::Result<()> {
    pool::set_threads(threads)
}

/// Call from the threaded wasm build's panic hook: wasm aborts on panic, so a pool worker that
/// panics never finishes its task; after this the thread waiting for that task panics as well
/// (and so reaches JavaScript as an error) instead of waiting forever.
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
pub fn note_wasm_panic() {
    pool::note_panic()
}

/// For the npm package's tests only: a parallel region whose tasks panic on the pool's workers.
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
#[doc(hidden)]
pub fn panic_on_a_pool_worker_for_test() {
    pool::panic_on_a_worker_for_test()
}

/// Runs the calling Web Worker as one of the CPU pool's threads; never returns (see
/// [`set_wasm_threads`]).
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
pub fn serve_wasm_worker() -> ! {
    pool::serve_as_worker()
}
pub use linear_quant::{linear_quant, linear_quant_parts};
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use parallel::{map_indices, worker_count};
pub use qdot::ActivationCodes;
pub use simd_level::SimdLevel;
#[cfg(target_arch = "wasm32")]
pub use simd_level::WasmSimd;

use crate::attention::problem::Problem;
use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, PrefillInput, merge_row};
use crate::error::Result;
use block::{KV_TILE, Scratch, WorkItem, run_group, run_item};

/// Query rows (tokens x group heads) per prefill work item: a 64 x 128 f32 block is 32 KiB.
const PREFILL_ROWS: usize = 64;
/// Prompt blocks of one sequence and KV head that share each widened K/V tile, at most.
const PREFILL_GROUP: usize = 4;
/// Prompt chunks that start at a multiple of this many tokens are computed row for row as the
/// whole prompt would be (see [`CpuEngine::prefill`]); the scheduler cuts chunks there.
pub const PREFILL_ALIGN: usize = PREFILL_ROWS;
/// The shortest split-K chunk under [`SplitK::Auto`]: at 256 keys a single 1K-token sequence
/// still spreads over four items.
const MIN_SPLIT_CHUNK: usize = 4 * KV_TILE;
/// Items per sequence that [`SplitK::Auto`] aims for, per worker thread: enough for one long
/// sequence to keep every thread busy to the end, few enough that each item streams a long run
/// of keys (an item's first tile is read without prefetch, and each item adds a merge).
const SPLITS_PER_THREAD: usize = 4;

/// How decode splits long sequences across threads (flash-decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitK {
    /// Split each sequence into chunks sized from its own length and the number of worker
    /// threads (four items a thread, at least 256 keys each), never from the rest of the batch:
    /// a sequence's keys are reduced in the same order whatever its neighbours (vLLM's
    /// batch-invariant kernels fix the split for the same reason).
    Auto,
    /// Never split.
    Off,
    /// Split every sequence into chunks of this many keys (rounded up to a tile).
    ChunkSize(usize),
}

/// The CPU attention engine. Its instruction set is chosen once, at construction.
#[derive(Debug, Clone)]
pub struct CpuEngine {
    level: SimdLevel,
    split_k: SplitK,
}

impl Default for CpuEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuEngine {
    /// The engine on the best instruction set of this machine.
    pub fn new() -> Self {
        Self { level: SimdLevel::detect(), split_k: SplitK::Auto }
    }
    /// The engine on a given instruction set (see [`SimdLevel::available`]).
    pub fn with_level(level: SimdLevel) -> Self {
        Self { level, split_k: SplitK::Auto }
    }
    /// Overrides the split-K policy of decode.
    pub fn with_split_k(mut self, split_k: SplitK) -> Self {
        self.split_k = split_k;
        self
    }
    /// The instruction set the kernels run on.
    pub fn level(&self) -> SimdLevel {
        self.level
    }
    /// Worker threads the engine uses (the calling thread included); 1 in the single-threaded
    /// wasm build.
    pub fn threads(&self) -> usize {
        parallel::worker_count()
    }

    /// Batch prefill over ragged or paged KV.
    pub fn prefill(
        &self,
        params: &AttentionParams,
        input: &PrefillInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        let p = Problem::prefill(params, input)?;
        p.check_output(out)?;
        let group_size = params.group_size();
        // A power of two (64 / group rounded down), so that prompt chunks starting at multiples of
        // PREFILL_ALIGN put every row in the same item as a single whole-prompt call would: a row's
        // result depends on its item's rows, and the engine promises outputs that do not depend
        // on how a prompt was chunked.
        let block = 1usize << (PREFILL_ROWS / group_size).max(1).ilog2();
        let mut items = Vec::new();
        for b in 0..p.batch {
            let (qo_len, kv_len) = (p.qo_len(b), p.kv.kv_len(b));
            for kv_head in 0..params.num_kv_heads {
                for tok0 in (0..qo_len).step_by(block) {
                    let tok1 = (tok0 + block).min(qo_len);
                    items.push(WorkItem { b, head0: kv_head, head1: kv_head + 1, tok0, tok1, kv0: 0, kv1: kv_len });
                }
            }
        }
        // Neighbouring blocks of one sequence and head share their widened K/V tiles, in groups
        // as large as still leaves every thread several groups (results do not depend on it).
        let per_thread = items.len() / parallel::worker_count().max(1);
        let group = match per_thread {
            n if n >= 4 * PREFILL_GROUP => PREFILL_GROUP,
            n if n >= 8 => 2,
            _ => 1,
        };
        let groups: Vec<&[WorkItem]> =
            items.chunk_by(|a, b| (a.b, a.head0) == (b.b, b.head0)).flat_map(|run| run.chunks(group)).collect();
        let level = self.level;
        let d = params.head_dim;
        // Each item's rows and LSEs go to its own stretch of one staging buffer that outlives
        // the call: allocating them per item and call made the allocator hand 32 MiB back to the
        // kernel and fault it in again on every call of a 2K-token prompt (10% of its time).
        let item_rows = |item: &WorkItem| (item.head1 - item.head0) * (item.tok1 - item.tok0) * group_size;
        let lens: Vec<usize> = groups.iter().map(|g| g.iter().map(|item| item_rows(item) * (d + 1)).sum()).collect();
        parallel::with_staging(lens.iter().sum(), |staging| {
            let mut work = Vec::with_capacity(groups.len());
            let mut rest = staging;
            for (&group, &len) in groups.iter().zip(&lens) {
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(len);
                work.push((group, std::sync::Mutex::new(part)));
                rest = tail;
            }
            parallel::map_items(&work, |(group, part), sc: &mut Scratch| {
                level.dispatch(RunGroup { p: &p, items: group, sc: &mut *sc });
                let mut part = part.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut at = 0;
                for (i, item) in group.iter().enumerate() {
                    let block: &Scratch = if i == 0 { sc } else { &sc.others[i - 1] };
                    let rows = item_rows(item);
                    assert_eq!(block.m.len(), rows, "a block's rows are its tokens times its query heads");
                    for r in 0..rows {
                        part[at + r * d..at + (r + 1) * d].copy_from_slice(&block.acc[r * block.dp..r * block.dp + d]);
                    }
                    part[at + rows * d..at + rows * (d + 1)].copy_from_slice(&block.m[..rows]);
                    at += rows * (d + 1);
                }
            });
            for (group, part) in work {
                let part = part.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut at = 0;
                for item in group.iter() {
                    let rows = item_rows(item);
                    write_rows(&p, item, &part[at..at + rows * d], &part[at + rows * d..at + rows * (d + 1)], out);
                    at += rows * (d + 1);
                }
            }
        });
        Ok(())
    }

    /// Batch decode (one query token per sequence) over the paged cache.
    pub fn decode(
        &self,
        params: &AttentionParams,
        input: &DecodeInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        let p = Problem::decode(params, input)?;
        p.check_output(out)?;
        let mut items = Vec::new();
        for b in 0..p.batch {
            let kv_len = p.kv.kv_len(b);
            let chunk = self.split_chunk(&p, kv_len);
            // All KV heads in one item: pages are read whole and in order, each head's slice
            // once for its whole query group.
            let mut kv0 = 0;
            loop {
                let kv1 = (kv0 + chunk).min(kv_len);
                items.push(WorkItem { b, head0: 0, head1: params.num_kv_heads, tok0: 0, tok1: 1, kv0, kv1 });
                kv0 = kv1;
                if kv0 >= kv_len {
                    break;
                }
            }
        }
        let mut results = self.run_items(&p, &items);
        // Split-K partials of one (sequence, head) are adjacent: fold them into the first.
        let mut i = 0;
        while i < items.len() {
            let mut k = i + 1;
            while k < items.len() && items[k].b == items[i].b {
                let (head, tail) = results.split_at_mut(k);
                let (o_acc, lse_acc) = &mut head[i];
                let (o_part, lse_part) = &tail[0];
                let d = params.head_dim;
                for r in 0..lse_acc.len() {
                    merge_row(
                        &mut o_acc[r * d..(r + 1) * d],
                        &mut lse_acc[r],
                        &o_part[r * d..(r + 1) * d],
                        lse_part[r],
                    );
                }
                k += 1;
            }
            write_rows(&p, &items[i], &results[i].0, &results[i].1, out);
            i = k;
        }
        Ok(())
    }

    /// Keys per decode item for a sequence of `kv_len` keys. `Auto` depends on nothing but
    /// `kv_len` and the machine's thread count, which is what keeps decode batch-invariant.
    fn split_chunk(&self, p: &Problem<'_>, kv_len: usize) -> usize {
        match self.split_k {
            SplitK::Off => (0..p.batch).map(|b| p.kv.kv_len(b)).max().unwrap_or(0).max(1),
            SplitK::ChunkSize(n) => n.max(1).div_ceil(KV_TILE) * KV_TILE,
            SplitK::Auto => auto_split_chunk(kv_len, parallel::worker_count()),
        }
    }

    /// Runs every item and returns, per item, its output rows `[rows, head_dim]` and LSEs `[rows]`.
    fn run_items(&self, p: &Problem<'_>, items: &[WorkItem]) -> Vec<(Vec<f32>, Vec<f32>)> {
        let level = self.level;
        let d = p.params.head_dim;
        parallel::map_items(items, |item, sc: &mut Scratch| {
            level.dispatch(RunItem { p, item: *item, sc });
            let rows = sc.m.len();
            let mut o = Vec::with_capacity(rows * d);
            for r in 0..rows {
                o.extend_from_slice(&sc.acc[r * sc.dp..r * sc.dp + d]);
            }
            (o, sc.m.clone())
        })
    }
}

/// [`SplitK::Auto`]'s chunk: `kv_len` over `SPLITS_PER_THREAD` items a thread, rounded up to
/// whole tiles, and never below `MIN_SPLIT_CHUNK`. Measured on a 2-core AVX-512 machine at 32K
/// keys (f16, GQA 32/8): fixed chunks of 256 read 17.5-18.7 GB/s, chunks of 4096 22.1-27.4.
fn auto_split_chunk(kv_len: usize, threads: usize) -> usize {
    let items = SPLITS_PER_THREAD * threads.max(1);
    (kv_len.div_ceil(items).div_ceil(KV_TILE) * KV_TILE).max(MIN_SPLIT_CHUNK)
}

struct RunItem<'a, 'p> {
    p: &'a Problem<'p>,
    item: WorkItem,
    sc: &'a mut Scratch,
}

impl pulp::WithSimd for RunItem<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        if decode::fused_applies::<S>(self.p, &self.item) {
            decode::run_decode_item(simd, self.p, self.item, self.sc);
        } else {
            run_item(simd, self.p, self.item, self.sc);
        }
    }
}

/// A group of prompt blocks ([`run_group`]), or one alone. Never the fused decode kernel, not even
/// for a block of one token: a block's arithmetic must not depend on the group it lands in.
struct RunGroup<'a, 'p> {
    p: &'a Problem<'p>,
    items: &'a [WorkItem],
    sc: &'a mut Scratch,
}

impl pulp::WithSimd for RunGroup<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        if let [item] = self.items {
            run_item(simd, self.p, *item, self.sc);
        } else {
            run_group(simd, self.p, self.items, self.sc);
        }
    }
}

/// Writes an item's rows (head-major, then token, then group head) into the output tensors.
fn write_rows(p: &Problem<'_>, item: &WorkItem, o: &[f32], lse: &[f32], out: &mut AttentionOutput<'_>) {
    let prm = p.params;
    let (d, group, h_qo) = (prm.head_dim, prm.group_size(), prm.num_qo_heads);
    let (q_start, _) = p.qo.range(item.b);
    let tokens = item.tok1 - item.tok0;
    for hh in 0..item.head1 - item.head0 {
        for t in 0..tokens {
            let row0 = (q_start + item.tok0 + t) * h_qo + (item.head0 + hh) * group;
            let src = (hh * tokens + t) * group;
            out.o.write_f32(row0 * d, &o[src * d..(src + group) * d]);
            if let Some(l) = out.lse.as_deref_mut() {
                l[row0..row0 + group].copy_from_slice(&lse[src..src + group]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_split_spreads_one_sequence_over_every_thread_in_whole_tiles() {
        assert_eq!(auto_split_chunk(32768, 2), 4096);
        assert_eq!(auto_split_chunk(32768, 16), 512);
        assert_eq!(auto_split_chunk(1000, 2), MIN_SPLIT_CHUNK);
        assert_eq!(auto_split_chunk(0, 2), MIN_SPLIT_CHUNK);
        for (len, threads) in [(9000, 2), (40_001, 3), (123_457, 8)] {
            let chunk = auto_split_chunk(len, threads);
            assert!(chunk.is_multiple_of(KV_TILE), "{len} keys, {threads} threads: {chunk}");
            assert!(len.div_ceil(chunk) <= SPLITS_PER_THREAD * threads, "{len} keys, {threads} threads: {chunk}");
        }
    }
}

//! `y = x · Wᵀ + b` for the model's projections: `x` is `[rows, k]` f32, `W` is `[n, k]` as stored
//! in safetensors (f32, f16 or bf16, widened in registers), `y` is `[rows, n]`.
//!
//! Every output element is one dot product whose arithmetic does not depend on how many rows
//! are in the batch or which block it lands in: lane-wise FMAs over `k` in order, the same
//! horizontal sum, the same scalar tail (bf16 weights on AVX512-BF16: one lane over the pairs of
//! `k` in order, no horizontal sum, see `bf16_packed`). So a sequence's logits are bit-identical
//! whether it runs alone or among 64 others, which continuous batching relies on.
//!
//! Work: chunks of `COLS_PER_TASK` output features go to the worker threads; inside a chunk, a
//! block of 4 rows of `x` stays in L1 while the chunk's weight rows stream past it from L2, in
//! register blocks of 4 rows x 4 features (16 accumulators). A prompt chunk (many rows) reads
//! the task's weight rows widened to f32 once, in blocks of 6 rows, with the same arithmetic
//! per output.

use pulp::Simd;

use crate::cpu::SimdLevel;
use std::cell::Cell;

use crate::cpu::convert::{LoadLanes, load_f32, prefetch_slice};
use crate::dtype::{Element, TensorRef};
use crate::error::{Result, TwinferError, check_len};

/// Output features per parallel task: 64 rows of a 4096-wide f16 matrix are 512 KiB, an L2's worth.
const COLS_PER_TASK: usize = 64;
/// From this many rows on, the product takes the prompt-chunk path (see [`Chunk::run_widened`]).
const GEMM_FROM_ROWS: usize = 32;
/// Tasks per thread that a prompt chunk's product is cut into at least, so that the threads
/// finish together.
const TASKS_PER_THREAD: usize = 8;
const MR: usize = 4;
const NC: usize = 4;
/// Rows per register block where there are 16 vector registers (AVX2): 4 x 4 accumulators with
/// their loads need 21 and spill to the stack every step. On an AVX2-only AMD EPYC a 512 x 1536
/// x 576 prompt product ran at 25-28% of the FMA peak in blocks of 4 rows, 60-66% in blocks of 2
/// (3 x 4 and 2 x 6 spilled too; 3 x 3 and 2 x 5 measured like 2 x 4).
const NARROW_ROWS: usize = 2;
/// Rows per register block on the prompt-chunk path where there are 32 vector registers
/// (AVX-512, NEON): 6 x 4 accumulators, so each weight vector loaded serves six rows (four left
/// it load-bound).
const GEMM_ROWS: usize = 6;
/// Bytes of a prompt chunk's activation rows per pass over a task's features (see `Chunk::run`):
/// on the Zen 2 VM, passes of 24, 48, 96, 192 and 384 KiB measured 53-57%, 56-58%, 58-60%, 59-61%
/// and 60-61% of the FMA peak on smollm-135m's prompt products.
const L2_ROW_BYTES: usize = 256 << 10;

pub(crate) mod bf16;
#[cfg(target_arch = "x86_64")]
mod bf16_dot;
#[cfg(target_arch = "x86_64")]
mod bf16_packed;
mod panels;
pub use panels::Bf16Panels;
mod reduce;

/// Checks shapes and runs the product on `level`.
pub fn linear(
    level: SimdLevel,
    x: &[f32],
    rows: usize,
    w: TensorRef<'_>,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    check_len("linear W ([n, k])", n * k, w.len())?;
    linear_parts(level, x, rows, &[w], k, bias, y)
}

/// [`linear`] over a weight matrix stored as row blocks `parts` (each `[n_i, k]`, stacked in
/// order: `n = Σ n_i`), so projections of one input (q, k, v) fuse without being copied into one
/// matrix. Every output element's arithmetic is that of [`linear`].
pub fn linear_parts(
    level: SimdLevel,
    x: &[f32],
    rows: usize,
    parts: &[TensorRef<'_>],
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    linear_parts_packed(level, x, rows, parts, None, k, bias, y)
}

/// [`linear_parts`] with the bf16 parts' [`Bf16Panels`] where the caller keeps them (they must
/// be these parts' panels, made at this `k`).
#[allow(clippy::too_many_arguments)]
pub fn linear_parts_packed(
    level: SimdLevel,
    x: &[f32],
    rows: usize,
    parts: &[TensorRef<'_>],
    packed: Option<&Bf16Panels>,
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    if let Some(p) = packed
        && !p.fits(parts, k)
    {
        return Err(TwinferError::InvalidParameter(format!("linear: {p:?} are not the panels of these weights")));
    }
    if k == 0 {
        return Err(TwinferError::InvalidParameter("linear: k must be at least 1".into()));
    }
    if parts.iter().any(|p| p.dtype() == crate::DType::Q8) {
        return Err(TwinferError::InvalidParameter(
            "linear: Q8 is a KV cache type; quantized weights go through the block formats".into(),
        ));
    }
    if let Some(p) = parts.iter().find(|p| !p.len().is_multiple_of(k)) {
        return Err(TwinferError::InvalidParameter(format!(
            "linear: a weight part of {} elements is not whole rows of {k}",
            p.len()
        )));
    }
    let n: usize = parts.iter().map(|p| p.len() / k).sum();
    check_len("linear x ([rows, k])", rows * k, x.len())?;
    check_len("linear y ([rows, n])", rows * n, y.len())?;
    if let Some(b) = bias {
        check_len("linear bias ([n])", n, b.len())?;
    }
    // (part, its first output column, the part's columns of this task, the task's number)
    let mut col_tasks = Vec::new();
    let mut col0 = 0;
    for (p, part) in parts.iter().enumerate() {
        let part_n = part.len() / k;
        for t in 0..part_n.div_ceil(COLS_PER_TASK) {
            let number = col_tasks.len();
            col_tasks.push((p, col0, t * COLS_PER_TASK..((t + 1) * COLS_PER_TASK).min(part_n), number));
        }
        col0 += part_n;
    }
    // A prompt chunk's rows are split into ranges when its column tasks are too few to share
    // out evenly (576 outputs make 9, which two threads split 5:4).
    let row_ranges = if rows >= GEMM_FROM_ROWS {
        let wanted = TASKS_PER_THREAD * crate::cpu::parallel::worker_count();
        wanted.div_ceil(col_tasks.len()).min(rows.div_ceil(GEMM_ROWS))
    } else {
        1
    };
    let range_rows = rows.div_ceil(row_ranges).div_ceil(GEMM_ROWS) * GEMM_ROWS;
    let tasks: Vec<_> = (0..rows)
        .step_by(range_rows.max(1))
        .flat_map(|r0| col_tasks.iter().map(move |t| (r0..(r0 + range_rows).min(rows), t.clone())))
        .collect();
    // A prompt chunk's rows are read once per task: from a 64-byte boundary (see
    // `aligned`), copied there if they do not start on one.
    let mut x_buf = X_ROWS.take();
    let x = if rows >= GEMM_FROM_ROWS && !(x.as_ptr() as usize).is_multiple_of(64) {
        let copy = aligned(&mut x_buf, x.len());
        copy.copy_from_slice(x);
        &*copy
    } else {
        x
    };
    // bf16 parts take the rows rounded to bf16 (see `bf16`): as bits where the CPU has bf16
    // dot products, else as f32 values.
    let has_bf16 = parts.iter().any(|p| p.dtype() == crate::DType::BF16);
    let bf16_dot = has_bf16 && bf16::has_dot(level);
    let (mut bits_buf, mut values_buf) = (X_BF16.take(), X_ROUNDED.take());
    let x_bits: &[u16] = if bf16_dot {
        let bits = aligned(&mut bits_buf, x.len());
        bf16::round_to_bits(level, x, bits);
        bits
    } else {
        &[]
    };
    let x_rounded: &[f32] = if has_bf16 && !bf16_dot {
        let values = aligned(&mut values_buf, x.len());
        bf16::round_to_values(level, x, values);
        values
    } else {
        &[]
    };
    let out = OutPtr(y.as_mut_ptr());
    type ColTask = (usize, usize, std::ops::Range<usize>, usize);
    let task = |(row_range, (p, col0, cols, number)): &(std::ops::Range<usize>, ColTask)| {
        let elements = row_range.start * k..row_range.end * k;
        let is_bf16 = parts[*p].dtype() == crate::DType::BF16;
        let chunk = Chunk {
            x: if is_bf16 && !bf16_dot { &x_rounded[elements.clone()] } else { &x[elements.clone()] },
            x_bf16: (is_bf16 && bf16_dot).then(|| &x_bits[elements]),
            panel: packed.filter(|_| is_bf16 && bf16_dot).map(|p| p.task(*number)),
            rows: row_range.len(),
            w: parts[*p],
            k,
            n,
            col0: *col0,
            cols: cols.clone(),
            bias,
            out: out.row(row_range.start, n),
            gemm: rows >= GEMM_FROM_ROWS,
        };
        level.dispatch(chunk);
    };
    if rows * n * k >= 1 << 16 {
        crate::cpu::parallel::for_each(tasks.len(), |i| task(&tasks[i]));
    } else {
        tasks.iter().for_each(task);
    }
    X_ROWS.set(x_buf);
    X_BF16.set(bits_buf);
    X_ROUNDED.set(values_buf);
    Ok(())
}

/// The output's base pointer, shared by tasks that write disjoint column ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only the columns of its own chunk, so no two threads touch one element.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Row `r` of an output with rows of `n`.
    fn row(self, r: usize, n: usize) -> OutPtr {
        // Offsetting a pointer is safe; writes through it are checked where they happen.
        OutPtr(self.0.wrapping_add(r * n))
    }
}

struct Chunk<'a> {
    /// The activation rows as the part's arithmetic takes them: as given, or rounded to bf16
    /// values for a bf16 part on a level without bf16 dot products.
    x: &'a [f32],
    /// The activation rows as bf16 bits, for a bf16 part where the CPU has bf16 dot products
    /// (always `None` off x86-64, where no level has them).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    x_bf16: Option<&'a [u16]>,
    /// This task's packed bf16 weights, where the caller keeps them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    panel: Option<&'a [u32]>,
    rows: usize,
    /// One row block of the weights; its row `c` is output column `col0 + c`.
    w: TensorRef<'a>,
    k: usize,
    /// Output columns in all (the row stride of `out`).
    n: usize,
    col0: usize,
    cols: std::ops::Range<usize>,
    bias: Option<&'a [f32]>,
    /// Row 0 of this chunk in the output.
    out: OutPtr,
    /// Whether the call is a prompt chunk's (the path depends on the call's rows, not on this
    /// chunk's share of them, so that every row of a call gets the same arithmetic).
    gemm: bool,
}

impl pulp::WithSimd for Chunk<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        #[cfg(target_arch = "x86_64")]
        if let (TensorRef::BF16(w), Some(x)) = (self.w, self.x_bf16) {
            return self.run_bf16_dot(x, w);
        }
        match self.w {
            TensorRef::F32(_) | TensorRef::F16(_) | TensorRef::BF16(_) if self.gemm => self.run_widened(simd),
            TensorRef::F32(w) => self.run_direct(simd, w),
            TensorRef::F16(w) => self.run_direct(simd, w),
            TensorRef::BF16(w) => self.run_direct(simd, w),
            TensorRef::Q8(_) => unreachable!("linear refuses Q8 weights before dispatch"),
        }
    }
}

thread_local! {
    /// The calling thread's widened weight rows, reused between tasks (taken while in use, so
    /// a nested call finds it empty and allocates its own).
    static PANEL: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The calling thread's aligned copy of a prompt chunk's rows (taken while in use).
    static X_ROWS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The calling thread's activation rows rounded to bf16, as bits or as f32 values (taken
    /// while in use).
    static X_BF16: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    static X_ROUNDED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The calling thread's panel of packed bf16 weight pairs (taken while in use).
    #[cfg(target_arch = "x86_64")]
    static PACKED: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// `len` elements of `buf` that start on a 64-byte boundary: a vector load that straddles two
/// cache lines costs two, and large buffers from the allocator start 16 bytes past one
/// (aligning them sped the prompt-chunk product up by a fifth). The contents are whatever the
/// buffer held.
pub(super) fn aligned<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    let slack = 64 / size_of::<T>();
    if buf.len() < len + slack {
        buf.resize(len + slack, T::default());
    }
    let offset = buf.as_ptr().align_offset(64).min(slack);
    &mut buf[offset..offset + len]
}

/// The arithmetic of one register block: rows `r0..r0 + R` of the activations times weight
/// rows `c0`, `c0 + stride`, ... (`C` of them), each output's full dot product (no bias). Every
/// implementation gives an output the same bits whatever `R`, `C` and the block's neighbours,
/// which is what keeps a row's results independent of the batch.
trait Dot {
    fn block<const R: usize, const C: usize, const PREFETCH: bool>(&self, at: &Block) -> [[f32; C]; R];
}

/// Lane-wise FMAs of f32 activations and weights widened in registers (every level).
struct FmaDot<'a, S, E> {
    simd: S,
    x: &'a [f32],
    w: &'a [E],
    k: usize,
}

impl Chunk<'_> {
    /// A prompt chunk's product: the task's weight rows are widened to f32 once (f16 and bf16,
    /// into a panel on a 64-byte boundary; f32 rows are read where they are), then blocks of [`GEMM_ROWS`] rows read them
    /// from there, with no prefetching (the rows are in cache). The widening is exact and each
    /// output's arithmetic that of the row-at-a-time path, so the bits are the same; a row then
    /// costs FMAs only, where converting per use spent a conversion per four FMAs.
    /// (No closure here: one would be compiled without the level's features.)
    #[inline(always)]
    fn run_widened<S: Simd>(&self, simd: S) {
        let (cols, col0) = (0..self.cols.len(), self.col0 + self.cols.start);
        if let TensorRef::F32(w) = self.w {
            // f32 rows are read in place, on cache lines or not: copying them to an aligned
            // panel costs a pass over the weights, and measured slower than the split loads it
            // saves (all-MiniLM-L6-v2's unaligned f32 rows: 128 x 1536 x 384 at 235-240 GFLOP/s
            // in place against 194-200 copied; 512 x 3072 x 576 at 222-224 against 206-216).
            let rows = &w[self.cols.start * self.k..self.cols.end * self.k];
            return self.run_panel(simd, rows, cols, col0);
        }
        let mut buf = PANEL.take();
        let panel = aligned(&mut buf, self.cols.len() * self.k);
        load_f32::<S>(self.w, self.cols.start * self.k, panel);
        self.run_panel(simd, panel, cols, col0);
        PANEL.set(buf);
    }

    /// Every row times the f32 weight rows `panel`, in the prompt-chunk path's blocks.
    #[inline(always)]
    fn run_panel<S: Simd>(&self, simd: S, panel: &[f32], cols: std::ops::Range<usize>, col0: usize) {
        let dot = FmaDot { simd, x: self.x, w: panel, k: self.k };
        if !crate::cpu::wide_registers::<S>() {
            self.run::<_, NARROW_ROWS, false>(&dot, cols, col0);
        } else {
            self.run::<_, GEMM_ROWS, false>(&dot, cols, col0);
        }
    }

    /// Every row times this chunk's weight rows as stored (decode rows: each weight is read once,
    /// widened in registers, with the next block prefetched). wasm keeps 4 rows here even on x86
    /// hosts: its f16 widening takes about ten integer operations per four values, and with 2 rows a
    /// 16-row product took 4.8 ms against 3.0 in Chromium.
    #[inline(always)]
    fn run_direct<S: Simd, E: LoadLanes + Element>(&self, simd: S, w: &[E]) {
        let dot = FmaDot { simd, x: self.x, w, k: self.k };
        if S::REGISTER_COUNT < 32 {
            self.run::<_, NARROW_ROWS, true>(&dot, self.cols.clone(), self.col0);
        } else {
            self.run::<_, MR, true>(&dot, self.cols.clone(), self.col0);
        }
    }

    /// bf16 weights times bf16 activations in bf16 dot products: through a packed panel
    /// ([`bf16_packed`]) where rows are of even width, every row count alike; else with the
    /// weights read where they are, decode rows in the blocks of [`Chunk::run_direct`] and a
    /// prompt chunk's in those of [`Chunk::run_panel`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn run_bf16_dot(&self, x: &[u16], w: &[half::bf16]) {
        const { assert!(COLS_PER_TASK <= bf16_packed::VECTORS * 16) };
        if bf16_packed::applies(self.k) {
            assert!(bf16_dot::detected(), "bf16 dot products on a CPU without AVX512-BF16");
            let (first, last) = (self.col0 + self.cols.start, self.col0 + self.cols.end);
            let out = bf16_packed::Out { ptr: self.out.0, n: self.n, col: first };
            assert!(last <= self.n);
            let bias = self.bias.map(|b| &b[first..last]);
            let cols = self.cols.len();
            // SAFETY (both calls): AVX512-BF16 is present (above; AVX-512 F and BW with the
            // level that takes this path); the task's rows of the output, columns first..last,
            // are its own.
            if let Some(panel) = self.panel {
                unsafe { bf16_packed::product(x, self.rows, panel, self.k, cols, bias, &out) };
                return;
            }
            let mut buf = PACKED.take();
            buf.resize(bf16_packed::panel_words(self.k), 0);
            unsafe {
                bf16_packed::pack(&w[self.cols.start * self.k..self.cols.end * self.k], self.k, &mut buf);
                bf16_packed::product(x, self.rows, &buf, self.k, cols, bias, &out);
            }
            PACKED.set(buf);
            return;
        }
        let dot = bf16_dot::Bf16Dot::new(x, w, self.k);
        if self.gemm {
            self.run::<_, GEMM_ROWS, false>(&dot, self.cols.clone(), self.col0);
        } else {
            self.run::<_, MR, true>(&dot, self.cols.clone(), self.col0);
        }
    }

    /// Every row times weight rows `cols` of the dot's weights (its row `c` being output column
    /// `col0 + c`), in register blocks of up to `RB` rows x [`NC`] features.
    #[inline(always)]
    fn run<D: Dot, const RB: usize, const PREFETCH: bool>(&self, dot: &D, cols: std::ops::Range<usize>, col0: usize) {
        // Decode rows read each weight once, from memory: a block's features are then a quarter
        // of the task apart, so that its NC weight rows are NC long sequential streams through
        // the task instead of NC short ones side by side, which the hardware prefetcher picks up
        // anew at every block. Each feature's arithmetic is the same either way.
        // All rows meet a block's weights before the next block: they come from memory once
        // and then from L1.
        let spread = if PREFETCH { cols.len() / NC } else { 0 };
        for c in cols.start..cols.start + spread {
            let mut r = 0;
            while r < self.rows {
                let mr = (self.rows - r).min(RB);
                let at = Block { r0: r, c0: c, stride: spread, col0 };
                // Only the first rows fetch the next weights: the others find them in cache.
                match (mr, r == 0) {
                    (4, true) => self.block::<D, 4, NC, PREFETCH>(dot, &at),
                    (4, false) => self.block::<D, 4, NC, false>(dot, &at),
                    (3, true) => self.block::<D, 3, NC, PREFETCH>(dot, &at),
                    (3, false) => self.block::<D, 3, NC, false>(dot, &at),
                    (2, true) => self.block::<D, 2, NC, PREFETCH>(dot, &at),
                    (2, false) => self.block::<D, 2, NC, false>(dot, &at),
                    (_, first) => {
                        for rr in r..r + mr {
                            let at = Block { r0: rr, ..at };
                            if first && rr == r {
                                self.block::<D, 1, NC, PREFETCH>(dot, &at);
                            } else {
                                self.block::<D, 1, NC, false>(dot, &at);
                            }
                        }
                    }
                }
                r += mr;
            }
        }
        // A prompt chunk's rows go in passes of about 256 KiB (in L2 beside the task's panel), and
        // within a pass every row block meets a block's NC weight rows while they are in L1: row
        // blocks that each swept the whole task's panel read 4 weight vectors from L2 per 8 FMAs,
        // L2's whole bandwidth. (Decode rows, for the features left over above, one block a pass.)
        let pass = if PREFETCH { RB } else { (L2_ROW_BYTES / (4 * self.k) / GEMM_ROWS).max(1) * GEMM_ROWS };
        for p0 in (0..self.rows).step_by(pass) {
            let p1 = (p0 + pass).min(self.rows);
            let mut c = cols.start + spread * NC;
            while c < cols.end {
                let nc = (cols.end - c).min(NC);
                let mut r = p0;
                while r < p1 {
                    let mr = (p1 - r).min(RB);
                    self.block_of::<D, PREFETCH>(dot, Block { r0: r, c0: c, stride: 1, col0 }, mr, nc);
                    r += mr;
                }
                c += nc;
            }
        }
    }

    /// One register block of `mr` rows (at most 6) x `nc` features (at most [`NC`]).
    #[inline(always)]
    fn block_of<D: Dot, const PREFETCH: bool>(&self, dot: &D, at: Block, mr: usize, nc: usize) {
        let (r, c) = (at.r0, at.c0);
        match (mr, nc) {
            (6, 4) => self.block::<D, 6, 4, PREFETCH>(dot, &at),
            (5, 4) => self.block::<D, 5, 4, PREFETCH>(dot, &at),
            (4, 4) => self.block::<D, 4, 4, PREFETCH>(dot, &at),
            (3, 4) => self.block::<D, 3, 4, PREFETCH>(dot, &at),
            (2, 4) => self.block::<D, 2, 4, PREFETCH>(dot, &at),
            (1, 4) => self.block::<D, 1, 4, PREFETCH>(dot, &at),
            (m, _) => {
                for rr in r..r + m {
                    for cc in c..c + nc {
                        self.block::<D, 1, 1, PREFETCH>(dot, &Block { r0: rr, c0: cc, ..at });
                    }
                }
            }
        }
    }

    /// Rows `r0..r0 + R` x weight rows `c0..c0 + C` (a stride apart): the dot products, plus the
    /// bias, written to the output.
    #[inline(always)]
    fn block<D: Dot, const R: usize, const C: usize, const PREFETCH: bool>(&self, dot: &D, at: &Block) {
        assert!(at.r0 + R <= self.rows);
        let sums = dot.block::<R, C, PREFETCH>(at);
        for (r, row) in sums.iter().enumerate() {
            for (c, &sum) in row.iter().enumerate() {
                let col = at.col0 + at.feature(c);
                let sum = match self.bias {
                    Some(b) => sum + b[col],
                    None => sum,
                };
                assert!(col < self.n);
                // SAFETY: (r0 + r, col) is inside [rows, n] (rows checked above, col just now),
                // and column col belongs to this task's chunk alone.
                unsafe { *self.out.0.add((at.r0 + r) * self.n + col) = sum };
            }
        }
    }
}

impl<S: Simd, E: LoadLanes + Element> Dot for FmaDot<'_, S, E> {
    #[inline(always)]
    fn block<const R: usize, const C: usize, const PREFETCH: bool>(&self, at: &Block) -> [[f32; C]; R] {
        let (simd, k, lanes, w, r0) = (self.simd, self.k, S::F32_LANES, self.w, at.r0);
        let body = k - k % lanes;
        // The pointer reads below stay inside these bounds, checked once per block.
        assert!((r0 + R) * k <= self.x.len() && (at.feature(C - 1) + 1) * k <= w.len());
        let (xp, wp) = (self.x.as_ptr(), w.as_ptr());
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; C]; R];
        // The next weight row of each of the block's streams, fetched a cache line at a time
        // while this block computes: decode reads each weight once, so keeping more lines in
        // flight is what speeds it up. (Contiguous blocks: the next block's rows.)
        let line = 64 / core::mem::size_of::<E>();
        let mut i = 0;
        while i < body {
            if PREFETCH && i % line < lanes {
                for c in 0..C {
                    let next = at.next::<C>(c) * k + i;
                    if next < w.len() {
                        prefetch_slice(w, next, 1);
                    }
                }
            }
            // SAFETY: i + lanes <= body <= k, inside rows r0..r0+R of x and the block's C weight rows.
            unsafe {
                let wv: [S::f32s; C] = core::array::from_fn(|c| E::load_lanes::<S>(wp.add(at.feature(c) * k + i)));
                for r in 0..R {
                    let xv = *(xp.add((r0 + r) * k + i) as *const S::f32s);
                    for c in 0..C {
                        acc[r][c] = simd.mul_add_e_f32s(xv, wv[c], acc[r][c]);
                    }
                }
            }
            i += lanes;
        }
        // (Loops, not closures: a closure is compiled without the level's features.)
        let mut out = [[0f32; C]; R];
        for (r, sums) in out.iter_mut().enumerate() {
            let xr = &self.x[(r0 + r) * k..(r0 + r + 1) * k];
            *sums = reduce::sums(simd, &acc[r]);
            for (c, sum) in sums.iter_mut().enumerate() {
                let wr = &w[at.feature(c) * k..(at.feature(c) + 1) * k];
                for j in body..k {
                    *sum = xr[j].mul_add(wr[j].to_f32(), *sum);
                }
            }
        }
        out
    }
}

/// Where a register block reads: weight rows `c0`, `c0 + stride`, ... (row `c` being output
/// column `col0 + c`), activation rows from `r0`.
#[derive(Clone, Copy)]
struct Block {
    r0: usize,
    c0: usize,
    stride: usize,
    col0: usize,
}

impl Block {
    /// The weight row (and output column, less `col0`) of the block's feature `c`.
    #[inline(always)]
    fn feature(&self, c: usize) -> usize {
        self.c0 + c * self.stride
    }

    /// The weight row to prefetch for feature `c` of a block of `C`: the next one of its
    /// stream, or for contiguous blocks the next block's.
    #[inline(always)]
    fn next<const C: usize>(&self, c: usize) -> usize {
        if self.stride == 1 { self.c0 + C + c } else { self.feature(c) + 1 }
    }
}

#[cfg(test)]
mod tests;

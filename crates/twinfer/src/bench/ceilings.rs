//! This machine's own limits, measured in the same run as the kernels: streaming read bandwidth
//! and FMA throughput. Kernel results are reported as a fraction of these.

use pulp::Simd;

use super::timing::{Stats, time_runs};
use crate::cpu::SimdLevel;

/// Bytes read per bandwidth pass: far larger than any last-level cache.
pub const READ_BYTES: usize = 1 << 30;

/// Sums `data` with several independent accumulators so the loads, not the adds, limit speed.
struct SumAll<'a>(&'a [f32]);
impl pulp::WithSimd for SumAll<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let (head, tail) = S::as_simd_f32s(self.0);
        let zero = simd.splat_f32s(0.0);
        let mut acc = [zero; 8];
        let mut chunks = head.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                acc[i] = simd.add_f32s(acc[i], c[i]);
            }
        }
        for (i, x) in chunks.remainder().iter().enumerate() {
            acc[i] = simd.add_f32s(acc[i], *x);
        }
        let total = acc.iter().fold(zero, |a, b| simd.add_f32s(a, *b));
        simd.reduce_sum_f32s(total) + tail.iter().sum::<f32>()
    }
}

/// Streaming read bandwidth in GB/s over `bytes`, split across all worker threads.
pub fn read_bandwidth(level: SimdLevel, bytes: usize, runs: usize) -> Stats {
    let n = bytes / 4;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let parts = crate::cpu::worker_count().max(1);
    let chunk = n.div_ceil(parts);
    let secs = time_runs(runs, || {
        let chunks: Vec<&[f32]> = data.chunks(chunk).collect();
        let s: f32 = crate::cpu::map_indices(chunks.len(), |i| level.dispatch(SumAll(chunks[i]))).iter().sum();
        std::hint::black_box(s);
    });
    secs.map(|t| bytes as f64 / t / 1e9)
}

/// Independent FMA chains: enough of them to cover the FMA latency on every core.
struct FmaLoop {
    iters: usize,
}
impl pulp::WithSimd for FmaLoop {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let mut acc: [S::f32s; 12] = core::array::from_fn(|i| simd.splat_f32s(i as f32 * 1e-3));
        let (a, b) = (simd.splat_f32s(0.999_99), simd.splat_f32s(1e-6));
        for _ in 0..self.iters {
            for x in acc.iter_mut() {
                *x = simd.mul_add_e_f32s(*x, a, b);
            }
        }
        let total = acc.iter().fold(simd.splat_f32s(0.0), |s, x| simd.add_f32s(s, *x));
        simd.reduce_sum_f32s(total)
    }
}

/// Peak f32 FMA throughput in GFLOP/s (an FMA counts 2), all worker threads busy.
pub fn fma_peak(level: SimdLevel, runs: usize) -> Stats {
    let iters = 4_000_000;
    let threads = crate::cpu::worker_count().max(1);
    let flops = (2 * 12 * level.f32_lanes() * iters * threads) as f64;
    let secs = time_runs(runs, || {
        let s: f32 = crate::cpu::map_indices(threads, |_| level.dispatch(FmaLoop { iters })).iter().sum();
        std::hint::black_box(s);
    });
    secs.map(|t| flops / t / 1e9)
}

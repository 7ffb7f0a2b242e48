//! This machine's own limits, measured in the same run as the kernels: streaming read bandwidth,
//! read bandwidth over rows at random (one-token pages) and FMA throughput. Kernel results are
//! reported as a fraction of these.

use pulp::Simd;

use super::timing::{Stats, time_runs};
use crate::cpu::SimdLevel;
use crate::cpu::convert::prefetch_slice;

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
    // In memory advised as the KV pool is, so that decode's percentages compare like with like.
    let data: Vec<f32> = crate::huge_pages::vec_from(n, |i| (i % 7) as f32);
    let parts = crate::cpu::worker_count().max(1);
    let chunk = n.div_ceil(parts);
    let secs = time_runs(runs, || {
        let chunks: Vec<&[f32]> = data.chunks(chunk).collect();
        let s: f32 = crate::cpu::map_indices(chunks.len(), |i| level.dispatch(SumAll(chunks[i]))).iter().sum();
        std::hint::black_box(s);
    });
    secs.map(|t| bytes as f64 / t / 1e9)
}

/// Rows of `row` floats in the order `order` names them, each summed as [`SumAll`] sums, the
/// row `ahead` places later prefetched as the decode kernels prefetch their next tile.
struct SumRows<'a> {
    data: &'a [f32],
    order: &'a [u32],
    row: usize,
    ahead: usize,
}
impl pulp::WithSimd for SumRows<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let mut total = 0.0;
        for (i, &r) in self.order.iter().enumerate() {
            if let Some(&ahead) = self.order.get(i + self.ahead) {
                prefetch_slice(self.data, ahead as usize * self.row, self.row);
            }
            total += SumAll(&self.data[r as usize * self.row..][..self.row]).with_simd(simd);
        }
        total
    }
}

/// Rows in flight ahead of the one being summed: a decode tile's keys. On the AVX-512 EPYC VM
/// (2026-12-07, T1 prefetches) 4, 16, 32 and 128 rows ahead read 17-22 GB/s alike; without
/// prefetches, 12-14.
const ROWS_AHEAD: usize = 16;

/// Read bandwidth in GB/s over `bytes` taken as rows of `row_bytes` in a fixed random order,
/// the threads splitting the order: what a paged pool with one-token pages can deliver, since
/// its rows sit wherever the allocator put them and no hardware prefetcher can stream them.
pub fn random_row_bandwidth(level: SimdLevel, bytes: usize, row_bytes: usize, runs: usize) -> Stats {
    let row = (row_bytes / 4).max(1);
    let rows = (bytes / 4 / row).max(1);
    let data: Vec<f32> = crate::huge_pages::vec_from(rows * row, |i| (i % 7) as f32);
    let order = shuffled_rows(rows);
    let parts = crate::cpu::worker_count().max(1);
    let per = rows.div_ceil(parts);
    let secs = time_runs(runs, || {
        let sums = crate::cpu::map_indices(parts, |t| {
            let mine = &order[(t * per).min(rows)..((t + 1) * per).min(rows)];
            level.dispatch(SumRows { data: &data, order: mine, row, ahead: ROWS_AHEAD })
        });
        std::hint::black_box(sums.iter().sum::<f32>());
    });
    secs.map(|t| (rows * row * 4) as f64 / t / 1e9)
}

/// `0..rows` in an order fixed by a seed (Fisher-Yates on xorshift64), the same every run.
fn shuffled_rows(rows: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..rows as u32).collect();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..rows).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(i, (state % (i as u64 + 1)) as usize);
    }
    order
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_random_order_is_a_fixed_permutation() {
        let order = shuffled_rows(1000);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>(), "every row once");
        assert_eq!(order, shuffled_rows(1000), "the same order every run");
        let in_place = order.iter().enumerate().filter(|&(i, &r)| i as u32 == r).count();
        assert!(in_place < 20, "{in_place} of 1000 rows left in place: not shuffled");
    }

    #[test]
    fn the_row_sums_read_every_row() {
        let level = SimdLevel::detect();
        let (row, rows) = (64, 37);
        let data: Vec<f32> = (0..row * rows).map(|i| (i % 5) as f32).collect();
        let order = shuffled_rows(rows);
        let total = level.dispatch(SumRows { data: &data, order: &order, row, ahead: ROWS_AHEAD });
        assert_eq!(total, data.iter().sum::<f32>());
    }
}

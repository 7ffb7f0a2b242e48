//! The peaks of the CPU's dot-product instructions, measured beside the f32 FMA peak
//! (`ceilings::fma_peak`) so that the bf16 and int8 kernels can be held to them: bf16 pairs
//! (`vdpbf16ps`, AVX512-BF16) and int8 quads (`vpdpbusd`, AVX512-VNNI). `None` where the CPU has
//! no such instruction (every CPU but x86-64 with those extensions, so far).

use super::timing::{Stats, time_runs};

/// Independent accumulators per thread: enough to cover the instructions' latency.
const CHAINS: usize = 12;
/// Instructions per chain and run.
const ITERS: usize = 4_000_000;

/// Peak bf16 dot-product throughput in GFLOP/s (a product and its addition count 2, as an FMA
/// does), all worker threads busy.
pub fn bf16_dot_peak(runs: usize) -> Option<Stats> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX512-BF16 and BW were detected (F comes with them).
        return Some(peak(runs, 32, || unsafe { x86::bf16_chains(ITERS) as f64 }));
    }
    let _ = runs;
    None
}

/// Peak int8 dot-product throughput in GOP/s (a multiply-add counts 2), all worker threads busy.
pub fn int8_dot_peak(runs: usize) -> Option<Stats> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX512-VNNI and BW were detected (F comes with them).
        return Some(peak(runs, 64, || unsafe { x86::int8_chains(ITERS) as f64 }));
    }
    let _ = runs;
    None
}

/// Times `chains` on every worker thread: `products` multiply-adds per instruction.
#[allow(dead_code)] // unused where no dot-product instruction exists
fn peak(runs: usize, products: usize, chains: impl Fn() -> f64 + Sync) -> Stats {
    let threads = crate::cpu::worker_count().max(1);
    let ops = (2 * CHAINS * products * ITERS * threads) as f64;
    let secs = time_runs(runs, || {
        let s: f64 = crate::cpu::map_indices(threads, |_| chains()).iter().sum();
        std::hint::black_box(s);
    });
    secs.map(|t| ops / t / 1e9)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    /// `CHAINS` accumulators, each `iters` `vdpbf16ps` of 1.0 x 1.0 pairs (2 a lane each time);
    /// returns the sum of every lane, `CHAINS * 16 * 2 * iters` while that is exact in f32.
    ///
    /// # Safety
    /// AVX-512 F, BW and BF16 must be present.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn bf16_chains(iters: usize) -> f32 {
        let one: __m512bh = unsafe { core::mem::transmute(_mm512_set1_epi16(0x3f80)) };
        let zero = _mm512_castsi512_ps(_mm512_set1_epi32(core::hint::black_box(0)));
        let mut acc = [zero; super::CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, one, one);
            }
            // Keeps the loop a loop of dot products (no hoisting or folding across iterations).
            // SAFETY: an empty instruction stream.
            unsafe { core::arch::asm!("", options(nomem, nostack, preserves_flags)) };
        }
        let total = acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
        _mm512_reduce_add_ps(total)
    }

    /// As [`bf16_chains`] with `vpdpbusd` of 1 x 1 bytes (4 a lane each time): `CHAINS * 16 * 4 *
    /// iters` while that fits in i32 lanes' sum.
    ///
    /// # Safety
    /// AVX-512 F, BW and VNNI must be present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn int8_chains(iters: usize) -> i64 {
        let one = _mm512_set1_epi8(1);
        let zero = _mm512_set1_epi32(core::hint::black_box(0));
        let mut acc = [zero; super::CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbusd_epi32(*a, one, one);
            }
            // SAFETY: as in `bf16_chains`.
            unsafe { core::arch::asm!("", options(nomem, nostack, preserves_flags)) };
        }
        acc.iter().map(|&a| _mm512_reduce_add_epi32(a) as i64).sum()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The loops do the work they are timed for: every instruction's products land.
        #[test]
        fn the_chains_compute_what_they_count() {
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                // SAFETY: detected (BW and F come with BF16 on every CPU that has it).
                let got = unsafe { bf16_chains(1000) };
                assert_eq!(got, (super::super::CHAINS * 16 * 2 * 1000) as f32);
            } else {
                eprintln!("skipped the bf16 half: no AVX512-BF16 on this CPU");
            }
            if std::arch::is_x86_feature_detected!("avx512vnni") {
                // SAFETY: detected.
                let got = unsafe { int8_chains(1000) };
                assert_eq!(got, (super::super::CHAINS * 16 * 4 * 1000) as i64);
            } else {
                eprintln!("skipped the int8 half: no AVX512-VNNI on this CPU");
            }
        }
    }
}

//! `y = x · Wᵀ + b` with `W` block-quantized ([`PackedQuant`]): `x` is `[rows, k]` f32, `y` is
//! `[rows, n]`. The activations are quantized per block of 32 first, to 16-bit codes or, when the
//! caller trades accuracy for speed, 8-bit ones (see [`QuantizedRows`], [`ActivationCodes`]),
//! then each tile of 16 features meets them in integer dot products ([`crate::cpu::qdot`]): 4-bit
//! codes never become floats, and a block's sum is scaled once (once per half for Q6_K).
//!
//! Every output element's arithmetic is the same whatever the batch (each row is quantized and
//! summed alone, in a fixed order), so a sequence's logits are bit-identical alone or batched.
//! Work: runs of tiles of one part go to the worker threads; a tile's codes (16 features x 576
//! inputs x 4 bits = 4.5 KiB) stay in L1 while the rows of `x` pass by, 4 at a time.

use std::cell::RefCell;

use crate::cpu::SimdLevel;
use crate::cpu::qdot::{ActivationCodes, MAX_ROWS, QuantizedRows, TileRef, tile_pair_rows, tile_rows};
use crate::error::{Result, TwinferError, check_len};
use crate::quant::{BLOCK, PackedQuant, TILE};

/// Tiles per task below [`LONG_TASKS_FROM_ROWS`] rows (decode-sized batches), where a call
/// streams its weights once. Each thread walks its own contiguous share of the tasks and then
/// takes tasks from the back of the others' ([`crate::cpu::parallel::for_each_in_shares`]), so
/// each reads one stream. Claimed in turn, the tasks interleaved the threads' reads: decoding
/// SmolLM2 Q4_1 on a 2-core Zen 3 VM, one run per thread took each projection 4-24% less time
/// (median 13%; steps alternated within one process).
const TILES_PER_TASK: usize = 4;
/// From this many rows on, a task is [`TILES_PER_LONG_TASK`] tiles: each takes long enough that
/// the tiles of a small projection (36 for a 576-wide one) still split evenly between the threads,
/// where 9 tasks of 4 left one thread idle for a ninth of the call.
const LONG_TASKS_FROM_ROWS: usize = 32;
/// Two tiles, which the VNNI kernel takes at once for the legacy formats (each broadcast
/// activation feeds both).
const TILES_PER_LONG_TASK: usize = 2;

thread_local! {
    /// The calling thread's quantized activations, reused between calls.
    static ACTIVATIONS: RefCell<QuantizedRows> = RefCell::new(QuantizedRows::default());
}

/// Checks shapes and runs the product on `level`, with the activations quantized to `codes`.
pub fn linear_quant(
    level: SimdLevel,
    codes: ActivationCodes,
    x: &[f32],
    rows: usize,
    w: &PackedQuant,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    linear_quant_parts(level, codes, x, rows, &[w], bias, y)
}

/// [`linear_quant`] over a weight matrix stored as row blocks `parts` (each `[n_i, k]`, stacked in
/// order: `n = Σ n_i`), so projections of one input (q, k, v; gate, up) share one quantization of
/// the input without being repacked into one matrix. Every output element's arithmetic is that of
/// [`linear_quant`].
pub fn linear_quant_parts(
    level: SimdLevel,
    codes: ActivationCodes,
    x: &[f32],
    rows: usize,
    parts: &[&PackedQuant],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let k = parts.first().map_or(0, |p| p.k);
    if let Some(p) = parts.iter().find(|p| p.k != k) {
        return Err(TwinferError::InvalidParameter(format!("quantized linear: parts of {k} and {} inputs", p.k)));
    }
    let n: usize = parts.iter().map(|p| p.n).sum();
    check_len("quantized linear x ([rows, k])", rows * k, x.len())?;
    check_len("quantized linear y ([rows, n])", rows * n, y.len())?;
    if let Some(b) = bias {
        check_len("quantized linear bias ([n])", n, b.len())?;
    }
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return Err(TwinferError::InvalidParameter(format!("quantized linear: k = {k} is not a multiple of {BLOCK}")));
    }
    ACTIVATIONS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut acts) => run(level, codes, x, rows, parts, bias, y, &mut acts),
        // Re-entered on this thread (a nested pool call): use private buffers.
        Err(_) => run(level, codes, x, rows, parts, bias, y, &mut QuantizedRows::default()),
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    level: SimdLevel,
    codes: ActivationCodes,
    x: &[f32],
    rows: usize,
    parts: &[&PackedQuant],
    bias: Option<&[f32]>,
    y: &mut [f32],
    acts: &mut QuantizedRows,
) {
    let k = parts[0].k;
    acts.quantize(level, codes, x, rows, k);
    let acts = &*acts;
    let n: usize = parts.iter().map(|p| p.n).sum();
    // (part, its first output feature, the part's tiles of this task)
    let mut tasks = Vec::new();
    let mut col0 = 0;
    let per_task = if rows >= LONG_TASKS_FROM_ROWS { TILES_PER_LONG_TASK } else { TILES_PER_TASK };
    for (p, part) in parts.iter().enumerate() {
        for t in (0..part.tiles()).step_by(per_task) {
            tasks.push((p, col0, t..(t + per_task).min(part.tiles())));
        }
        col0 += part.n;
    }
    let out = OutPtr { ptr: y.as_mut_ptr(), len: y.len() };
    let task = |i: usize| {
        let (w, col0, tiles) = (parts[tasks[i].0], tasks[i].1, tasks[i].2.clone());
        let mut blocks = [[[0f32; TILE]; MAX_ROWS]; 2];
        let mut t = tiles.start;
        while t < tiles.end {
            // Two tiles at once where the task has them (the same bits as one at a time).
            let pair = t + 1 < tiles.end;
            let tile = TileRef::new(w, t);
            let next = pair.then(|| TileRef::new(w, t + 1));
            let mut r0 = 0;
            while r0 < rows {
                let r_len = (rows - r0).min(MAX_ROWS);
                let [first, second] = &mut blocks;
                match &next {
                    Some(next) => tile_pair_rows(level, [&tile, next], acts, r0, r_len, [first, second]),
                    None => tile_rows(level, &tile, acts, r0, r_len, first),
                }
                for (block, tt) in blocks.iter().zip(t..t + 1 + usize::from(pair)) {
                    // The part's features of this tile, and where they go in the output.
                    let features = tt * TILE..((tt + 1) * TILE).min(w.n);
                    let (first, len) = (col0 + features.start, features.len());
                    let bias = bias.map(|b| &b[first..first + len]);
                    for (r, sums) in block.iter().enumerate().take(r_len) {
                        // SAFETY: these features belong to this task alone, so no other thread
                        // touches the slice.
                        let dst = unsafe { out.slice((r0 + r) * n + first, len) };
                        match bias {
                            Some(b) => dst.iter_mut().zip(sums).zip(b).for_each(|((d, &s), &b)| *d = s + b),
                            None => dst.copy_from_slice(&sums[..len]),
                        }
                    }
                }
                r0 += r_len;
            }
            t += 1 + usize::from(pair);
        }
    };
    if rows * n * k >= 1 << 16 && rows < LONG_TASKS_FROM_ROWS {
        crate::cpu::parallel::for_each_in_shares(tasks.len(), task);
    } else if rows * n * k >= 1 << 16 {
        crate::cpu::parallel::for_each(tasks.len(), task);
    } else {
        (0..tasks.len()).for_each(task);
    }
}

/// The output, shared by tasks that write disjoint feature ranges.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: each task writes only the features of its own tiles, so no two threads touch one
// element.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Elements `at..at + len`, checked to be inside the output.
    ///
    /// # Safety
    /// No other thread may touch these elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        assert!(at + len <= self.len, "output elements {at}..{} of {}", at + len, self.len);
        // SAFETY: inside the output (just checked), and unshared (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QuantFormat, QuantRows};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Uniform in [-0.5, 0.5), independent between seeds (a hash, not a linear sequence, so
    /// that x and W are uncorrelated and a dot product has terms of both signs).
    fn data(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                let mut z = i.wrapping_add(seed << 32).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z ^= z >> 31;
                (z >> 40) as f32 / 16_777_216.0 - 0.5
            })
            .collect()
    }

    /// Per output element, with `xd = dx * q` the activations as quantized:
    /// - against an f64 product of the reference-decoded weights and `xd`, the error is only f32
    ///   rounding: the integer sums are exact, and each block converts its sum and adds two
    ///   products (one rounding for `d * dx`, one per FMA) to a running sum, then the bias is
    ///   added, so `(4 blocks + 2) eps` of the magnitudes bounds it;
    /// - against the f32 activations themselves, the quantization adds at most half a step of the
    ///   codes per element: `Σ_blocks dx/2 Σ|w|`;
    /// - each row alone gives the bits it gets inside the batch;
    /// - every level but wasm's (no FMA there) gives the scalar level's bits.
    #[test]
    fn matches_f64_within_the_activation_rounding_on_every_level_and_is_batch_invariant() {
        let legacy = [(1, 3, 32), (7, 70, 96), (5, 130, 64), (2, 64, 576), (9, 16, 128), (33, 20, 64)];
        let k_quant = [(1, 3, 256), (7, 70, 512), (2, 64, 768), (33, 20, 256)];
        let codes_of_each = [ActivationCodes::Int16, ActivationCodes::Int8];
        for (format, codes) in QuantFormat::ALL.into_iter().flat_map(|f| codes_of_each.map(|c| (f, c))) {
            let shapes: &[(usize, usize, usize)] = if format.can_quantize() { &legacy } else { &k_quant };
            for &(rows, n, k) in shapes {
                // Scale the rows apart so blocks differ in dx.
                let x: Vec<f32> = data(rows * k, 1).iter().enumerate().map(|(i, v)| v * (1 + i % 7) as f32).collect();
                let rows_q = if format.can_quantize() {
                    QuantRows::quantize(format, &data(n * k, 2), n, k).unwrap()
                } else {
                    crate::quant::random_rows(format, n, k, 2)
                };
                let reference = rows_q.to_f32();
                let packed = PackedQuant::from_rows(&rows_q).unwrap();
                let bias = data(n, 3);
                let minimum = |c: usize, blk: usize| packed.block_minimum(c, blk) as f64;
                let mut acts = QuantizedRows::default();
                acts.quantize(SimdLevel::Scalar, codes, &x, rows, k);
                let nb = k / BLOCK;
                let mut scalar_bits: Option<Vec<u32>> = None;
                for level in SimdLevel::available() {
                    let mut y = vec![f32::NAN; rows * n];
                    linear_quant(level, codes, &x, rows, &packed, Some(&bias), &mut y).unwrap();
                    for r in 0..rows {
                        for c in 0..n {
                            let w = |j: usize| reference[c * k + j] as f64;
                            // The activations as quantized.
                            let xd = |j: usize| acts.dx[r * nb + j / BLOCK] as f64 * acts.q[r * k + j] as f64;
                            let exact: f64 = (0..k).map(|j| w(j) * xd(j)).sum::<f64>() + bias[c] as f64;
                            let magnitude: f64 =
                                (0..k).map(|j| (w(j).abs() + minimum(c, j / BLOCK).abs()) * xd(j).abs()).sum::<f64>()
                                    + (0..nb)
                                        .map(|b| minimum(c, b).abs() * (acts.sx[r * nb + b] as f64).abs())
                                        .sum::<f64>()
                                    + (bias[c] as f64).abs();
                            let got = y[r * n + c] as f64;
                            // Per block and half three roundings (the integer sum's conversion,
                            // which 8-bit codes can take past 2^24, `d * dx`, the FMA; the
                            // K-quants' scale products are exact), one for the minimum's FMA, then
                            // the bias.
                            let rounding =
                                ((3 * format.halves() + 1) * nb + 2) as f64 * f32::EPSILON as f64 * magnitude;
                            assert!(
                                (got - exact).abs() <= rounding,
                                "{level} {format:?} {codes:?} {rows}x{n}x{k} [{r},{c}]: {got} vs {exact} (bound {rounding:e})"
                            );
                            let true_dot: f64 =
                                (0..k).map(|j| w(j) * x[r * k + j] as f64).sum::<f64>() + bias[c] as f64;
                            // Per element, half a step of the codes, plus the rounding of the
                            // scaled value before it is rounded to a code (of the block's magnitude).
                            let step: f64 = (0..nb)
                                .map(|b| {
                                    let amax =
                                        (0..BLOCK).fold(0f64, |m, j| m.max((x[r * k + b * BLOCK + j] as f64).abs()));
                                    let per = acts.dx[r * nb + b] as f64 / 2.0 * (1.0 + 1e-4)
                                        + 2.0 * f32::EPSILON as f64 * amax;
                                    per * (0..BLOCK).map(|j| w(b * BLOCK + j).abs()).sum::<f64>()
                                })
                                .sum();
                            assert!(
                                (got - true_dot).abs() <= step + rounding,
                                "{level} {format:?} {codes:?} [{r},{c}]: {got} vs {true_dot}: more than the activations' rounding {step:e}"
                            );
                        }
                        let mut alone = vec![f32::NAN; n];
                        linear_quant(level, codes, &x[r * k..(r + 1) * k], 1, &packed, Some(&bias), &mut alone)
                            .unwrap();
                        assert_eq!(alone, y[r * n..(r + 1) * n], "{level} {format:?} {codes:?}: row {r} of {rows}");
                    }
                    #[cfg(not(target_arch = "wasm32"))]
                    {
                        let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                        match &scalar_bits {
                            None => scalar_bits = Some(bits),
                            Some(s) => {
                                assert!(
                                    s == &bits,
                                    "{level} {format:?} {codes:?} {rows}x{n}x{k}: differs from the scalar level"
                                )
                            }
                        }
                    }
                }
                let _ = &mut scalar_bits;
            }
        }
    }

    /// Row blocks of different formats, one with a partial tile, give each block's own product.
    #[test]
    fn parts_equal_their_products_one_by_one() {
        let (k, rows) = (64, 3);
        let a =
            PackedQuant::from_rows(&QuantRows::quantize(QuantFormat::Q4_1, &data(13 * k, 2), 13, k).unwrap()).unwrap();
        let b =
            PackedQuant::from_rows(&QuantRows::quantize(QuantFormat::Q8_0, &data(40 * k, 4), 40, k).unwrap()).unwrap();
        let x = data(rows * k, 1);
        let bias = data(53, 3);
        for level in SimdLevel::available() {
            let mut both = vec![f32::NAN; rows * 53];
            let codes = ActivationCodes::Int16;
            linear_quant_parts(level, codes, &x, rows, &[&a, &b], Some(&bias), &mut both).unwrap();
            let (mut ya, mut yb) = (vec![f32::NAN; rows * 13], vec![f32::NAN; rows * 40]);
            linear_quant(level, codes, &x, rows, &a, Some(&bias[..13]), &mut ya).unwrap();
            linear_quant(level, codes, &x, rows, &b, Some(&bias[13..]), &mut yb).unwrap();
            for r in 0..rows {
                assert_eq!(&both[r * 53..r * 53 + 13], &ya[r * 13..(r + 1) * 13], "{level}: row {r}, first part");
                assert_eq!(
                    &both[r * 53 + 13..(r + 1) * 53],
                    &yb[r * 40..(r + 1) * 40],
                    "{level}: row {r}, second part"
                );
            }
        }
    }

    #[test]
    fn a_non_finite_activation_reaches_its_outputs() {
        let rows_q = QuantRows::quantize(QuantFormat::Q4_1, &data(16 * 64, 2), 16, 64).unwrap();
        let packed = PackedQuant::from_rows(&rows_q).unwrap();
        for level in SimdLevel::available() {
            let codes_of_each = [ActivationCodes::Int16, ActivationCodes::Int8];
            for (bad, codes) in [f32::NAN, f32::INFINITY].into_iter().flat_map(|b| codes_of_each.map(|c| (b, c))) {
                let mut x = data(2 * 64, 1);
                x[64 + 40] = bad;
                let mut y = vec![0.0; 2 * 16];
                linear_quant(level, codes, &x, 2, &packed, None, &mut y).unwrap();
                assert!(y[..16].iter().all(|v| v.is_finite()), "{level} {codes:?}: row 0 is clean");
                assert!(y[16..].iter().all(|v| v.is_nan()), "{level} {codes:?}: row 1 has {bad}: {:?}", &y[16..]);
            }
        }
    }

    /// The kernels' narrowest sums at their widest: every 4-bit code 15 but the one that sets
    /// each block's minimum or scale, every activation code the largest of either sign (AVX2 sums
    /// a block's byte products of 8-bit codes in 16 bits, up to 30480 of 32767). Each level gives
    /// the scalar level's bits and the f64 product within f32 rounding.
    #[test]
    fn the_largest_codes_sum_exactly_on_every_level() {
        let (n, k) = (32, 256);
        // Q4_1: the block's minimum 0 is code 0 and 1.0 code 15. Q4_0: the first element, +1.0,
        // sets the scale -1/8, so -0.99 lands on code 16, clamped to 15.
        type Weight = fn(usize) -> f32;
        let weights: [(QuantFormat, Weight); 2] = [
            (QuantFormat::Q4_1, |j| if j % BLOCK == 0 { 0.0 } else { 1.0 }),
            (QuantFormat::Q4_0, |j| if j % BLOCK == 0 { 1.0 } else { -0.99 }),
        ];
        for (format, weight) in weights {
            let w: Vec<f32> = (0..n * k).map(|i| weight(i % k)).collect();
            let rows_q = QuantRows::quantize(format, &w, n, k).unwrap();
            let reference = rows_q.to_f32();
            let packed = PackedQuant::from_rows(&rows_q).unwrap();
            for (sign, codes, rows) in [1.0f32, -1.0]
                .into_iter()
                .flat_map(|s| [ActivationCodes::Int16, ActivationCodes::Int8].map(|c| (s, c)))
                .flat_map(|(s, c)| (1..=4).map(move |r| (s, c, r)))
            {
                let x = vec![sign; rows * k];
                let mut scalar_bits: Option<Vec<u32>> = None;
                for level in SimdLevel::available() {
                    let mut y = vec![f32::NAN; rows * n];
                    linear_quant(level, codes, &x, rows, &packed, None, &mut y).unwrap();
                    for (i, &got) in y.iter().enumerate() {
                        let c = i % n;
                        let exact: f64 = (0..k).map(|j| reference[c * k + j] as f64 * sign as f64).sum();
                        let bound = 16.0 * f32::EPSILON as f64 * exact.abs().max(1.0);
                        assert!(
                            (got as f64 - exact).abs() <= bound,
                            "{level} {format:?} {codes:?} x = {sign}, {rows} rows: {got} vs {exact}"
                        );
                    }
                    // wasm has no fused multiply-add: its bits may differ.
                    #[cfg(not(target_arch = "wasm32"))]
                    {
                        let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                        match &scalar_bits {
                            Some(want) => assert_eq!(&bits, want, "{level} {format:?} {codes:?}: differs"),
                            None => scalar_bits = Some(bits),
                        }
                    }
                }
                let _ = &mut scalar_bits;
            }
        }
    }

    #[test]
    fn shape_errors_are_typed() {
        let rows = QuantRows::quantize(QuantFormat::Q8_0, &[0.0; 64], 2, 32).unwrap();
        let packed = PackedQuant::from_rows(&rows).unwrap();
        let mut y = vec![0.0; 2];
        let e =
            linear_quant(SimdLevel::Scalar, ActivationCodes::Int8, &[0.0; 31], 1, &packed, None, &mut y).unwrap_err();
        assert!(matches!(e, TwinferError::ShapeMismatch { .. }));
    }
}

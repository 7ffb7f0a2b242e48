//! Integer dot products between a tile of block-quantized weights ([`PackedQuant`]'s layout) and
//! activation rows quantized to 16-bit integers per block of 32 ([`QuantizedRows`]), as
//! llama.cpp's `vec_dot_q4_1_q8_1` and friends do with 8-bit ones.
//!
//! For a weight block (codes `c`, scale `d`, minimum `m`, zero code `z`) and an activation block
//! (codes `q`, `|q| <= 32385`, scale `dx`, `sx = dx * Σq`), the block's contribution is
//! `(d * dx) * Σ(c - z)·q + m * sx`. For the K-quants, `d` and `m` are the f16 scales of the
//! K-quant block times the sub-block's integer multipliers (exact in f32), and Q6_K's blocks sum
//! in two halves of 16 inputs with a scale each. The integer sum is exact on every instruction
//! set, however each one forms it: AVX2 multiplies 16-bit pairs (`vpmaddwd`); the int8 dot
//! products (`vpdpbusd` with a +128 bias, `sdot`, widening multiplies) take the codes as two int8
//! digits, `q = 255 * coarse + fine`, and join the two sums in integers. The float part is the same
//! two FMAs per block everywhere except wasm (no fused multiply-add there: a multiply and an add).
//! So on x86, ARM and the scalar level a product is bit-identical across levels, and on every
//! level it is independent of the batch: each row's quantization and sums depend on that row
//! alone.
//!
//! The cost against f32 activations is the activations' rounding: half a step, `1/64770` of the
//! block's largest magnitude per element (8-bit codes alone: `1/254`); the tests bound it.
//! [`ActivationCodes::Int8`] takes that cost for speed, as llama.cpp's Q8 activations do: its
//! codes are one int8 digit (the coarse one is zero): the VNNI kernel skips the other, and AVX2
//! multiplies them with 4-bit weights as bytes.

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod quantize_x86;
mod scalar;
#[cfg(target_arch = "wasm32")]
mod wasm;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;

use crate::cpu::SimdLevel;
use crate::quant::{BLOCK, PackedQuant, QuantFormat, TILE};

/// Activation rows a kernel call accumulates at once (each decoded weight vector serves them
/// all): four rows' accumulators (about 5 registers a row on AVX2 with one half tile a pass, 3
/// zmm on AVX-512) fit the register files.
pub(crate) const MAX_ROWS: usize = 4;
/// Activation rows per pass of the quarter-tile kernels (NEON, wasm), whose byte dot products
/// keep two digit sums per row.
const NARROW_ROWS: usize = 2;
/// The largest activation code: `255 * 127`, so that a code splits into two int8 digits
/// `255 * coarse + fine`, both in -127..=127.
const QMAX: f32 = 32385.0;

/// How finely a block-quantized projection quantizes its activations (per block of 32, to the
/// block's largest magnitude).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ActivationCodes {
    /// Codes up to 32385 (two int8 digits): half a step is `1/64770` of the block's largest
    /// magnitude, near f32 activations.
    #[default]
    Int16,
    /// Codes up to 127 (llama.cpp's Q8 activations): half a step is `1/254` of the block's
    /// largest magnitude, and int8 dot products take one digit, so prompts multiply about twice
    /// as fast (VNNI with every format; AVX2 with 4-bit weights). The rounding moves logits
    /// visibly (see the README's measurements).
    Int8,
}

impl ActivationCodes {
    /// The name the command line and the bindings take: `int16` or `int8`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Int16 => "int16",
            Self::Int8 => "int8",
        }
    }

    /// Looks a precision up by [`ActivationCodes::name`].
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "int16" => Ok(Self::Int16),
            "int8" => Ok(Self::Int8),
            other => Err(crate::TwinferError::InvalidParameter(format!(
                "activation codes `{other}`: expected int16 or int8"
            ))),
        }
    }

    /// The largest code.
    fn qmax(self) -> f32 {
        match self {
            Self::Int16 => QMAX,
            Self::Int8 => 127.0,
        }
    }
}
/// The weight of the coarse digit.
pub(crate) const DIGIT_BASE: i32 = 255;

/// One tile of weights as a kernel reads it.
pub(crate) struct TileRef<'a> {
    /// `[blocks][tile block bytes]`, see [`PackedQuant`].
    pub codes: &'a [u8],
    /// `[groups][TILE]` f16 bits: a group is `1 << group_shift` blocks.
    pub d: &'a [u16],
    /// The minima (Q4_1, Q4_K) as `d`, or empty.
    pub m: &'a [u16],
    /// The K-quants' multipliers of `d`, `[blocks][halves][TILE]`, or empty.
    pub ds: &'a [i8],
    /// Q4_K's multipliers of `m`, `[blocks][TILE]`, or empty.
    pub ms: &'a [i8],
    pub bits: u32,
    pub zero: i32,
    pub blocks: usize,
    pub group_shift: u32,
    /// Scales per block: 2 when each half of 16 inputs has its own (Q6_K), else 1.
    pub halves: usize,
}

impl<'a> TileRef<'a> {
    pub fn new(w: &'a PackedQuant, t: usize) -> Self {
        Self {
            codes: w.tile_codes(t),
            d: w.tile_scales(t),
            m: w.tile_minima(t),
            ds: w.tile_scale_multipliers(t),
            ms: w.tile_minimum_multipliers(t),
            bits: w.format.code_bits(),
            zero: w.zero(),
            blocks: w.blocks(),
            group_shift: w.format.group_shift(),
            halves: w.format.halves(),
        }
    }

    /// Where block `blk`'s 16 f16 scales (and minima) start in `d` (and `m`).
    #[inline(always)]
    pub fn group(&self, blk: usize) -> usize {
        (blk >> self.group_shift) * TILE
    }

    /// Where the 16 multipliers of half `h` of block `blk` start in `ds`.
    #[inline(always)]
    pub fn sub(&self, blk: usize, h: usize) -> usize {
        (blk * self.halves + h) * TILE
    }

    /// Feature `f`'s scale for half `h` of block `blk`, as every kernel forms it.
    pub fn scale(&self, blk: usize, h: usize, f: usize) -> f32 {
        let d = half::f16::from_bits(self.d[self.group(blk) + f]).to_f32();
        if self.ds.is_empty() { d } else { d * self.ds[self.sub(blk, h) + f] as f32 }
    }

    /// Feature `f`'s minimum in block `blk`, as every kernel forms it.
    pub fn minimum(&self, blk: usize, f: usize) -> Option<f32> {
        let m = half::f16::from_bits(*self.m.get(self.group(blk) + f)?).to_f32();
        Some(if self.ms.is_empty() { m } else { m * self.ms[blk * TILE + f] as f32 })
    }

    /// The code rows (of 64 bytes) that hold half `h` of a block: all of them for 4-bit codes
    /// (whose halves are never apart), else rows `8h / halves ..` (halves is 1 or 2: no
    /// division in the block loop).
    #[inline(always)]
    pub fn rows_of_half(&self, h: usize) -> core::ops::Range<usize> {
        match (self.bits, self.halves) {
            (4, _) => 0..4,
            (_, 1) => 0..8,
            _ => 4 * h..4 * h + 4,
        }
    }

    pub fn block_bytes(&self) -> usize {
        PackedQuant::tile_block_bytes(if self.bits == 8 { QuantFormat::Q8_0 } else { QuantFormat::Q4_0 })
    }

    /// Checks what every kernel's unchecked reads rely on.
    fn check(&self, a: &QuantizedRows, r0: usize, rows: usize) {
        assert!((1..=MAX_ROWS).contains(&rows) && r0 + rows <= a.rows);
        // 4- or 8-bit codes, and a zero code only with 4-bit ones (the VNNI kernel's bias of
        // 8-bit codes takes their zero's place).
        assert!(matches!(self.bits, 4 | 8) && (self.bits == 4 || self.zero == 0));
        assert!(a.k == self.blocks * BLOCK);
        assert!(self.codes.len() == self.blocks * self.block_bytes());
        let groups = self.blocks >> self.group_shift;
        assert!(groups << self.group_shift == self.blocks);
        assert!(self.d.len() == groups * TILE && (self.m.is_empty() || self.m.len() == self.d.len()));
        assert!(self.ds.is_empty() || self.ds.len() == self.blocks * self.halves * TILE);
        assert!(self.ms.is_empty() || (self.ms.len() == self.blocks * TILE && !self.m.is_empty()));
        // Halves: 8-bit codes (4-bit ones mix both halves in a byte), a scale each, no zero code
        // and no minimum (the block sums of the activations are not split).
        assert!(
            self.halves == 1
                || (self.halves == 2 && self.bits == 8 && self.zero == 0 && !self.ds.is_empty() && self.m.is_empty())
        );
        assert!(a.q.len() >= a.rows * a.k && a.digits.len() >= 2 * a.rows * a.k);
        assert!(a.dx.len() >= a.rows * self.blocks);
        assert!(a.sx.len() >= a.rows * self.blocks && a.qsum.len() >= a.rows * self.blocks);
        assert!(a.qsum_low.len() >= a.rows * self.blocks);
    }
}

/// Activation rows quantized per block of 32: `x ≈ dx * q` with `dx` = the block's largest
/// magnitude over 32385 and `q` its 16-bit codes, each also split into two int8 digits
/// (`q = 255 * coarse + fine`) for the kernels whose dot products take bytes. The error per
/// element is `dx / 2`: 8-bit codes alone (llama.cpp's Q8 activations, `amax / 127`) moved
/// SmolLM2's logits by up to 1.0 and flipped its first answer token. A block with a NaN or an
/// infinity gets `dx = NaN`, so the outputs it reaches are NaN rather than silently finite.
#[derive(Default)]
pub(crate) struct QuantizedRows {
    /// How finely: with `Int8` every coarse digit is zero.
    pub codes: ActivationCodes,
    /// Activation rows.
    pub rows: usize,
    pub k: usize,
    /// `[rows, k]` codes, `|q| <= 32385`.
    pub q: Vec<i16>,
    /// `[rows, 2, k]`: row `r`'s coarse digits are row `2r`, its fine digits row `2r + 1`.
    pub digits: Vec<i8>,
    /// `[rows, k / 32]` scales.
    pub dx: Vec<f32>,
    /// `[rows, k / 32]`: `dx * Σq` (for Q4_1's minima).
    pub sx: Vec<f32>,
    /// `[rows, k / 32]`: `Σq` (for the zero code).
    pub qsum: Vec<i32>,
    /// `[rows, k / 32]`: `Σq` over the block's first 16 inputs (for the halves of Q6_K).
    pub qsum_low: Vec<i32>,
}

impl QuantizedRows {
    /// `Σq` over half `h` of block `at`, for a weight block in `halves` halves.
    ///
    /// # Safety
    /// `at` must be inside the quantized rows.
    #[inline(always)]
    pub unsafe fn half_sum(&self, at: usize, h: usize, halves: usize) -> i32 {
        // SAFETY: as the caller promises.
        unsafe {
            let all = *self.qsum.get_unchecked(at);
            match (halves, h) {
                (1, _) => all,
                (_, 0) => *self.qsum_low.get_unchecked(at),
                _ => all - *self.qsum_low.get_unchecked(at),
            }
        }
    }

    /// Where digit `d` (0 coarse, 1 fine) of row `row`'s block `blk` starts in `digits`.
    #[inline(always)]
    pub fn digit_at(&self, row: usize, d: usize, blk: usize) -> usize {
        (2 * row + d) * self.k + blk * BLOCK
    }
}

/// Activation rows quantized per parallel task.
const ROWS_PER_TASK: usize = 8;

impl QuantizedRows {
    /// Quantizes `x` (`[rows, k]`, `k` a multiple of 32) into these buffers to `codes`, rows in
    /// parallel, with the quantizer compiled for `level` (the result is the same bits on every
    /// level: the same operations, lane by lane, with no fused multiply-add).
    pub fn quantize(&mut self, level: SimdLevel, codes: ActivationCodes, x: &[f32], rows: usize, k: usize) {
        let nb = k / BLOCK;
        let qmax = codes.qmax();
        self.codes = codes;
        self.rows = rows;
        self.k = k;
        self.q.resize(rows * k, 0);
        self.digits.resize(2 * rows * k, 0);
        for v in [&mut self.dx, &mut self.sx] {
            v.resize(rows * nb, 0.0);
        }
        self.qsum.resize(rows * nb, 0);
        self.qsum_low.resize(rows * nb, 0);
        let per = ROWS_PER_TASK;
        let parts: Vec<std::sync::Mutex<Codes<'_>>> = self
            .q
            .chunks_mut(per * k)
            .zip(self.digits.chunks_mut(2 * per * k))
            .zip(self.dx.chunks_mut(per * nb).zip(self.sx.chunks_mut(per * nb)))
            .zip(self.qsum.chunks_mut(per * nb).zip(self.qsum_low.chunks_mut(per * nb)))
            .map(|(((q, digits), (dx, sx)), (qsum, qsum_low))| {
                std::sync::Mutex::new(Codes { qmax, q, digits, dx, sx, qsum, qsum_low })
            })
            .collect();
        let task = |i: usize| {
            let mut part = parts[i].lock().unwrap_or_else(|e| e.into_inner());
            let r0 = i * ROWS_PER_TASK;
            let n = (rows - r0).min(ROWS_PER_TASK);
            let x = &x[r0 * k..(r0 + n) * k];
            #[cfg(target_arch = "x86_64")]
            if let SimdLevel::Avx2(_) | SimdLevel::Avx512(_) = level {
                // SAFETY: these levels exist only where AVX2 and FMA were detected; the buffers
                // were sized for these rows above.
                unsafe { quantize_x86::quantize_rows(&mut part, x, k) };
                return;
            }
            level.dispatch(QuantizeRows { codes: &mut part, x, k });
        };
        if rows >= 2 * ROWS_PER_TASK {
            crate::cpu::parallel::for_each(parts.len(), task);
        } else {
            (0..parts.len()).for_each(task);
        }
    }
}

/// The quantized codes of some activation rows.
struct Codes<'a> {
    /// The largest code.
    qmax: f32,
    q: &'a mut [i16],
    digits: &'a mut [i8],
    dx: &'a mut [f32],
    sx: &'a mut [f32],
    qsum: &'a mut [i32],
    qsum_low: &'a mut [i32],
}

/// [`Codes::quantize`] compiled with a SIMD level's features, so that the block loops (written
/// branch-free over fixed 32-element arrays) become vector code.
struct QuantizeRows<'a, 'b> {
    codes: &'a mut Codes<'b>,
    x: &'a [f32],
    k: usize,
}

impl pulp::WithSimd for QuantizeRows<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        self.codes.quantize(self.x, self.k);
    }
}

/// Blocks whose largest magnitude is below this quantize to zero: their scale `amax / 32385`
/// would be subnormal and its reciprocal could overflow (the same bound serves 8-bit codes).
const SMALLEST_AMAX: f32 = QMAX * f32::MIN_POSITIVE;

/// A block's scale and its reciprocal for codes up to `qmax`: `(NaN, 0)` for a block with an
/// infinity or a NaN, zeros for one too small for a normal scale.
#[inline(always)]
fn block_scale(amax: f32, finite: bool, qmax: f32) -> (f32, f32) {
    match (finite, amax >= SMALLEST_AMAX) {
        (false, _) => (f32::NAN, 0.0),
        (true, false) => (0.0, 0.0),
        (true, true) => {
            let dx = amax / qmax;
            (dx, 1.0 / dx)
        }
    }
}

impl Codes<'_> {
    /// Quantizes `x` (`[rows, k]`: the rows these buffers hold).
    #[inline(always)]
    fn quantize(&mut self, x: &[f32], k: usize) {
        let nb = k / BLOCK;
        for (r, row) in x.chunks_exact(k).enumerate() {
            for (blk, xs) in row.chunks_exact(BLOCK).enumerate() {
                let xs: &[f32; BLOCK] = xs.try_into().expect("chunks of BLOCK");
                // Largest magnitude by bits: for non-negative floats the integer order is the
                // float order, and any infinity or NaN lands at or above the infinity's bits.
                let amax_bits = xs.iter().fold(0u32, |a, v| a.max(v.to_bits() & 0x7fff_ffff));
                let finite = amax_bits < f32::INFINITY.to_bits();
                let qmax = self.qmax;
                let (dx, inv) = block_scale(f32::from_bits(amax_bits), finite, qmax);
                // |v * inv| <= qmax * (1 + 2 eps) here and is finite, so the rounded value
                // clamps to -qmax..=qmax and converts exactly (inv = 0 gives 0 for a
                // non-finite block's finite elements; its NaN and infinite ones would give NaN,
                // masked off to 0). The codes stay floats until the store: integer-valued below
                // 2^24, so their sums are exact in any order.
                let mut codes = [0f32; BLOCK];
                let (mut coarse, mut fine) = ([0f32; BLOCK], [0f32; BLOCK]);
                if finite {
                    for (c, &v) in codes.iter_mut().zip(xs) {
                        *c = round_half_even(v * inv).clamp(-qmax, qmax);
                    }
                }
                for ((c, hi), lo) in codes.iter().zip(&mut coarse).zip(&mut fine) {
                    // c / 255 is never within 1/510 of a half integer (255 is odd), far more
                    // than the product's rounding, so this is the exact quotient rounded.
                    *hi = round_half_even(c * (1.0 / DIGIT_BASE as f32));
                    *lo = c - *hi * DIGIT_BASE as f32;
                }
                let at = r * nb + blk;
                let q: &mut [i16; BLOCK] = (&mut self.q[at * BLOCK..][..BLOCK]).try_into().expect("a block");
                for (q, &c) in q.iter_mut().zip(&codes) {
                    *q = c as i16;
                }
                for (d, digit) in [coarse, fine].iter().enumerate() {
                    let out: &mut [i8; BLOCK] =
                        (&mut self.digits[(2 * r + d) * k + blk * BLOCK..][..BLOCK]).try_into().expect("a block");
                    for (o, &c) in out.iter_mut().zip(digit) {
                        *o = c as i8;
                    }
                }
                let low = sum_codes(&codes[..BLOCK / 2]);
                let sum = low + sum_codes(&codes[BLOCK / 2..]);
                self.qsum_low[at] = low;
                self.dx[at] = dx;
                self.sx[at] = dx * sum as f32;
                self.qsum[at] = sum;
            }
        }
    }
}

/// The sum of 16 integer-valued codes, exact (|sum| <= 518160 < 2^24) whatever the order of the
/// adds.
#[inline(always)]
fn sum_codes(codes: &[f32]) -> i32 {
    codes.iter().fold(0.0f32, |a, &c| a + c) as i32
}

/// Rounds to the nearest integer, ties to even, for `|v| < 2^22` (larger values stay large, and
/// are clamped by the caller): adding and removing 1.5 * 2^23 leaves no fraction bits. Unlike
/// `round_ties_even`, it needs no SSE4.1 and compiles to two adds.
#[inline(always)]
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if v.abs() < 4_194_304.0 { (v + MAGIC) - MAGIC } else { v }
}

/// `out[r][f]` = the dot product of activation row `r0 + r` (`r < rows`) with feature `f` of the
/// tile, without the bias.
pub(crate) fn tile_rows(
    level: SimdLevel,
    t: &TileRef<'_>,
    a: &QuantizedRows,
    r0: usize,
    rows: usize,
    out: &mut [[f32; TILE]; MAX_ROWS],
) {
    t.check(a, r0, rows);
    #[cfg(target_arch = "x86_64")]
    match level {
        SimdLevel::Avx512(_) if x86::has_vnni() => {
            // SAFETY: this level exists only where AVX-512 F/BW was detected, and VNNI was just
            // detected; `check` bounds every read.
            return unsafe { x86::tile_rows_vnni(t, a, r0, rows, out) };
        }
        // SAFETY: AVX-512 machines and the Avx2 level have AVX2, FMA and F16C (detected).
        SimdLevel::Avx512(_) | SimdLevel::Avx2(_) => return unsafe { x86_avx2::tile_rows_avx2(t, a, r0, rows, out) },
        _ => {}
    }
    for c in (0..rows).step_by(NARROW_ROWS) {
        let (r, n, out) = (r0 + c, (rows - c).min(NARROW_ROWS), &mut out[c..]);
        match level {
            #[cfg(target_arch = "aarch64")]
            // SAFETY: the Neon level exists only where NEON was detected; `check` bounds reads.
            SimdLevel::Neon(_) => unsafe {
                // SAFETY (dotprod): detected just now.
                if neon::has_dotprod() {
                    neon::tile_rows_dotprod(t, a, r, n, out)
                } else {
                    neon::tile_rows(t, a, r, n, out)
                }
            },
            #[cfg(target_arch = "wasm32")]
            // SAFETY: the Simd128 level exists only when the module was built with simd128.
            SimdLevel::Simd128(_) => unsafe { wasm::tile_rows(t, a, r, n, out) },
            _ => scalar::tile_rows(t, a, r, n, out),
        }
    }
}

/// [`tile_rows`] for two tiles of one matrix at once: on AVX-512 VNNI, tiles with one scale a
/// block (the legacy formats) share each broadcast activation (the same bits as two calls);
/// elsewhere two calls.
pub(crate) fn tile_pair_rows(
    level: SimdLevel,
    t: [&TileRef<'_>; 2],
    a: &QuantizedRows,
    r0: usize,
    rows: usize,
    out: [&mut [[f32; TILE]; MAX_ROWS]; 2],
) {
    let [out0, out1] = out;
    #[cfg(target_arch = "x86_64")]
    if matches!(level, SimdLevel::Avx512(_)) && x86::has_vnni() && x86::pairs_apply(t[0]) && x86::pairs_apply(t[1]) {
        t[0].check(a, r0, rows);
        t[1].check(a, r0, rows);
        // The kernel reads the format from the first tile: both must be tiles of one matrix.
        assert!(t[0].blocks == t[1].blocks && t[0].bits == t[1].bits && t[0].zero == t[1].zero);
        // SAFETY: this level exists only where AVX-512 F/BW was detected, VNNI was just detected,
        // and `check` bounds every read of both tiles.
        return unsafe { x86::tile_pair_rows_vnni(t, a, r0, rows, [&mut out0[..], &mut out1[..]]) };
    }
    tile_rows(level, t[0], a, r0, rows, out0);
    tile_rows(level, t[1], a, r0, rows, out1);
}

/// Runs `f::<R>(args)` for a run-time row count 1..=4 (1..=2 with `narrow`).
macro_rules! for_rows {
    ($rows:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            _ => $f::<4>($($arg),*),
        }
    };
    (narrow $rows:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            _ => $f::<2>($($arg),*),
        }
    };
}
pub(crate) use for_rows;

/// f16 bits to f32 without a conversion instruction, exact for every finite value (normal and
/// subnormal): the exponent and mantissa bits move up to the f32 positions and one multiply by
/// 2^112 rebases the exponent. (Scales are checked finite when packed.)
#[cfg(any(target_arch = "aarch64", target_arch = "wasm32", test))]
pub(crate) const F16_REBASE: f32 = f32::from_bits((127 + 112) << 23);

#[cfg(test)]
mod tests;

//! Block-quantized weights: the GGUF block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) as stored in
//! files, their reference decoding, quantization of float weights into the first three, and
//! [`PackedQuant`], the layout the CPU kernel reads.
//!
//! A block of the legacy formats holds 32 consecutive weights of one row and its own scale:
//! - Q8_0: `d: f16, q: [i8; 32]`, value `d * q` (34 bytes);
//! - Q4_0: `d: f16, qs: [u8; 16]`, value `d * (q - 8)` (18 bytes);
//! - Q4_1: `d: f16, m: f16, qs: [u8; 16]`, value `d * q + m` (20 bytes);
//! - Q5_0: `d: f16, qh: [u8; 4], qs: [u8; 16]`, value `d * (q - 16)` (22 bytes);
//! - Q5_1: `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`, value `d * q + m` (24 bytes).
//!
//! In the 4- and 5-bit formats, weight `j < 16` is the low nibble of `qs[j]` and weight `j + 16`
//! its high nibble (llama.cpp's `ggml-common.h`); the 5-bit formats add bit `j` of the
//! little-endian `qh` as the code's fifth bit. The K-quants hold 256 weights a block with a
//! second level of scales ([`kquant`]).

pub mod kquant;
mod packed;

pub use packed::{PackedQuant, TILE};

use half::f16;

use crate::error::{Result, TwinferError};

/// Weights per block of the legacy formats, and per sub-block of the K-quants: the granularity
/// of the packed layout and of the activations' quantization.
pub const BLOCK: usize = 32;

/// A block-quantized format of GGUF, named as GGUF names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantFormat {
    /// 32 weights, 8-bit codes and an f16 scale (8.5 bits/weight).
    Q8_0,
    /// 32 weights, 4-bit codes centred on 8 and an f16 scale (4.5 bits/weight).
    Q4_0,
    /// 32 weights, 4-bit codes, an f16 scale and an f16 minimum (5 bits/weight).
    Q4_1,
    /// 32 weights, 5-bit codes centred on 16 and an f16 scale (5.5 bits/weight).
    Q5_0,
    /// 32 weights, 5-bit codes, an f16 scale and an f16 minimum (6 bits/weight).
    Q5_1,
    /// 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and minimum (4.5 bits/weight).
    Q4_K,
    /// As Q4_K with 5-bit codes (5.5 bits/weight).
    Q5_K,
    /// 256 weights in 16 sub-blocks of 16, each with an 8-bit scale (6.5625 bits/weight).
    Q6_K,
}

impl QuantFormat {
    /// Every format, in GGUF's type order.
    pub const ALL: [Self; 8] =
        [Self::Q4_0, Self::Q4_1, Self::Q5_0, Self::Q5_1, Self::Q8_0, Self::Q4_K, Self::Q5_K, Self::Q6_K];

    /// Weights per block of the file format: [`BLOCK`], or [`kquant::QK_K`] for the K-quants.
    pub const fn block_weights(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 => BLOCK,
            Self::Q4_K | Self::Q5_K | Self::Q6_K => kquant::QK_K,
        }
    }

    /// Bytes of one block of [`QuantFormat::block_weights`] weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q4_K => kquant::Q4_K_BYTES,
            Self::Q5_K => kquant::Q5_K_BYTES,
            Self::Q6_K => kquant::Q6_K_BYTES,
        }
    }

    /// Bits of one weight's code once packed (the scales are kept beside it). 5- and 6-bit
    /// codes are packed as bytes, so the kernels' 8-bit path reads them.
    pub const fn code_bits(self) -> u32 {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q4_K => 4,
            _ => 8,
        }
    }

    /// Whether float weights can be quantized into this format here (the K-quants are read from
    /// files only).
    pub const fn can_quantize(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1)
    }

    /// The format's name in lower case, as `--quantize` and the model description spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q4_K => "q4_k",
            Self::Q5_K => "q5_k",
            Self::Q6_K => "q6_k",
        }
    }

    /// The format of this name (`q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0`, `q4_k`, `q5_k` or
    /// `q6_k`, any case).
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(name)).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
            TwinferError::InvalidParameter(format!("unknown quantization {name:?} ({})", names.join(", ")))
        })
    }

    /// Bytes of a row of `k` weights (`k` a multiple of [`QuantFormat::block_weights`]).
    pub const fn row_bytes(self, k: usize) -> usize {
        k / self.block_weights() * self.block_bytes()
    }

    /// A 4- or 5-bit legacy block's unsigned codes: the nibble, and for Q5_0 and Q5_1 the fifth
    /// bit from `qh`.
    pub(crate) fn small_codes(self, block: &[u8]) -> [u8; BLOCK] {
        let qs = &block[block.len() - BLOCK / 2..];
        let qh = match self {
            Self::Q5_0 => u32::from_le_bytes([block[2], block[3], block[4], block[5]]),
            Self::Q5_1 => u32::from_le_bytes([block[4], block[5], block[6], block[7]]),
            _ => 0,
        };
        let mut codes = [0u8; BLOCK];
        for j in 0..BLOCK / 2 {
            codes[j] = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4) as u8;
            codes[j + BLOCK / 2] = (qs[j] >> 4) | (((qh >> (j + BLOCK / 2)) & 1) << 4) as u8;
        }
        codes
    }

    /// Whether blocks carry an added minimum `m` (`value = d * q + m`): Q4_1, Q5_1 and the
    /// K-quants with minima.
    pub(crate) const fn has_minima(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1 | Self::Q4_K | Self::Q5_K)
    }

    /// One block of a legacy format: its unsigned codes (`q + 128` for Q8_0, the 4- or 5-bit
    /// code otherwise) and the affine map `value = scale * code + offset` that decodes them.
    fn split_block(self, block: &[u8]) -> ([u8; BLOCK], f32, f32) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let mut codes = [0u8; BLOCK];
        match self {
            Self::Q8_0 => {
                for (c, &q) in codes.iter_mut().zip(&block[2..2 + BLOCK]) {
                    *c = (q as i8 as i16 + 128) as u8;
                }
                (codes, d, -128.0 * d)
            }
            _ => {
                let m = match self {
                    Self::Q4_1 | Self::Q5_1 => f16::from_le_bytes([block[2], block[3]]).to_f32(),
                    Self::Q5_0 => -16.0 * d,
                    _ => -8.0 * d,
                };
                (self.small_codes(block), d, m)
            }
        }
    }

    /// Decodes a row of blocks into `out` (`out.len()` weights): the reference the kernels are
    /// checked against.
    pub fn dequantize_row(self, row: &[u8], out: &mut [f32]) {
        match self {
            Self::Q4_K | Self::Q5_K => return kquant::dequantize_q45_k(self, row, out),
            Self::Q6_K => return kquant::dequantize_q6_k(row, out),
            _ => {}
        }
        for (block, chunk) in row.chunks_exact(self.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
            let (codes, scale, offset) = self.split_block(block);
            for (o, &c) in chunk.iter_mut().zip(&codes) {
                *o = if self.has_minima() { scale.mul_add(c as f32, offset) } else { scale * self.centred(c) };
            }
        }
    }

    /// The signed quantized value of an unsigned code (Q8_0, Q4_0 and Q5_0, whose offset is
    /// `-bias * d`).
    fn centred(self, code: u8) -> f32 {
        match self {
            Self::Q8_0 => code as f32 - 128.0,
            Self::Q5_0 => code as f32 - 16.0,
            _ => code as f32 - 8.0,
        }
    }

    /// Quantizes a row of `k` floats (a multiple of [`BLOCK`]) into blocks appended to `out`, as
    /// llama.cpp's reference quantizers do: Q8_0, Q4_0 and Q5_0 scale by the largest magnitude
    /// (Q4_0 and Q5_0 keep its sign, so that value maps to -8 or -16), Q4_1 and Q5_1 span
    /// [min, max] in 15 or 31 steps. Appends
    /// nothing for a format that cannot be quantized here ([`QuantFormat::can_quantize`]).
    pub(crate) fn quantize_row(self, row: &[f32], out: &mut Vec<u8>) {
        for block in row.chunks_exact(BLOCK) {
            match self {
                Self::Q8_0 => {
                    let amax = block.iter().fold(0f32, |a, &x| a.max(x.abs()));
                    let d = amax / 127.0;
                    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|&x| (x * inv).round() as i8 as u8));
                }
                Self::Q4_0 => {
                    let max = block.iter().fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
                    let d = max / -8.0;
                    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    let code = |x: f32| ((x * inv + 8.5) as i32).clamp(0, 15) as u8;
                    out.extend((0..BLOCK / 2).map(|j| code(block[j]) | code(block[j + BLOCK / 2]) << 4));
                }
                Self::Q4_1 => {
                    let (min, max) = block.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                    let d = (max - min) / 15.0;
                    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    let code = |x: f32| (((x - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                    out.extend((0..BLOCK / 2).map(|j| code(block[j]) | code(block[j + BLOCK / 2]) << 4));
                }
                // As Q4_0 and Q4_1 with 32 levels, the fifth bits gathered in `qh`.
                Self::Q5_0 | Self::Q5_1 => {
                    let codes: [u8; BLOCK] = if self == Self::Q5_0 {
                        let max = block.iter().fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
                        let d = max / -16.0;
                        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                        core::array::from_fn(|j| ((block[j] * inv + 16.5) as i32).clamp(0, 31) as u8)
                    } else {
                        let (min, max) = block.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                        let d = (max - min) / 31.0;
                        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                        core::array::from_fn(|j| (((block[j] - min) * inv + 0.5) as i32).clamp(0, 31) as u8)
                    };
                    let qh = codes.iter().enumerate().fold(0u32, |qh, (j, &c)| qh | ((c as u32 >> 4) << j));
                    out.extend_from_slice(&qh.to_le_bytes());
                    out.extend((0..BLOCK / 2).map(|j| (codes[j] & 0x0f) | (codes[j + BLOCK / 2] & 0x0f) << 4));
                }
                _ => return,
            }
        }
    }
}

/// Rows of GGUF blocks as a file stores them: `n` rows of `k` weights, row after row.
#[derive(Debug, Clone)]
pub struct QuantRows {
    /// The block format of every row.
    pub format: QuantFormat,
    /// Rows (output features).
    pub n: usize,
    /// Weights per row (input features), a multiple of the block size.
    pub k: usize,
    /// The blocks, `n * format.row_bytes(k)` bytes.
    pub bytes: Vec<u8>,
}

impl QuantRows {
    /// Checks that `bytes` holds exactly `n` rows of `k` weights of `format`.
    pub fn new(format: QuantFormat, n: usize, k: usize, bytes: Vec<u8>) -> Result<Self> {
        let per = format.block_weights();
        if !k.is_multiple_of(per) || k == 0 {
            return Err(TwinferError::InvalidParameter(format!(
                "{} rows must hold a positive multiple of {per} weights, not {k}",
                format.name()
            )));
        }
        crate::error::check_len("quantized rows", n * format.row_bytes(k), bytes.len())?;
        Ok(Self { format, n, k, bytes })
    }

    /// Quantizes `[n, k]` floats.
    pub fn quantize(format: QuantFormat, values: &[f32], n: usize, k: usize) -> Result<Self> {
        if !format.can_quantize() {
            return Err(TwinferError::InvalidParameter(format!(
                "quantizing into {} is not supported (q8_0, q4_0, q4_1, q5_0 or q5_1); {0} weights are read from GGUF files",
                format.name()
            )));
        }
        crate::error::check_len("weights to quantize", n * k, values.len())?;
        if let Some(at) = values.iter().position(|x| !x.is_finite()) {
            return Err(TwinferError::InvalidParameter(format!(
                "weight {} of row {} is {}: only finite weights can be quantized",
                at % k.max(1),
                at / k.max(1),
                values[at]
            )));
        }
        let mut bytes = Vec::with_capacity(n * format.row_bytes(k));
        if k.is_multiple_of(BLOCK) {
            values.chunks_exact(k.max(1)).for_each(|row| format.quantize_row(row, &mut bytes));
        }
        Self::new(format, n, k, bytes)
    }

    /// The blocks of row `r`. Panics when `r >= n`.
    pub fn row(&self, r: usize) -> &[u8] {
        let len = self.format.row_bytes(self.k);
        &self.bytes[r * len..(r + 1) * len]
    }

    /// Every weight as f32, `[n, k]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n * self.k];
        for (r, chunk) in out.chunks_exact_mut(self.k).enumerate() {
            self.format.dequantize_row(self.row(r), chunk);
        }
        out
    }
}

/// `n` rows of `k` weights of random blocks of `format`, seeded: random codes and sub-scales
/// under block scales of about 0.01, as a test's weights (K-quants cannot be quantized here).
#[cfg(test)]
pub(crate) fn random_rows(format: QuantFormat, n: usize, k: usize, seed: u64) -> QuantRows {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes: Vec<u8> = (0..n * format.row_bytes(k))
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            (z >> 32) as u8
        })
        .collect();
    // The f16 scales: positive, finite, and different from block to block.
    let scale_at: &[usize] = match format {
        QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q5_0 => &[0],
        QuantFormat::Q4_1 | QuantFormat::Q5_1 | QuantFormat::Q4_K | QuantFormat::Q5_K => &[0, 2],
        QuantFormat::Q6_K => &[208],
    };
    for (b, block) in bytes.chunks_exact_mut(format.block_bytes()).enumerate() {
        for &at in scale_at {
            let v = 0.004 + 0.008 * ((b * 7 + at) % 11) as f32 / 11.0;
            block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    QuantRows::new(format, n, k, bytes).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
            .collect()
    }

    #[test]
    fn quantization_error_is_within_half_a_step() {
        for format in QuantFormat::ALL.into_iter().filter(|f| f.can_quantize()) {
            let x = data(4 * 96, 7);
            let q = QuantRows::quantize(format, &x, 4, 96).unwrap();
            assert_eq!(q.bytes.len(), 4 * 3 * format.block_bytes());
            let back = q.to_f32();
            for (b, (xs, ys)) in x.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let (lo, hi) = xs.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let amax = lo.abs().max(hi.abs());
                // Half a step of the format's grid (the f16 scale adds a relative 2^-11 of it).
                // Q4_0's grid is -8..7 steps: the side opposite the largest magnitude clips at
                // 7 steps, a whole step short of it.
                let half_step = match format {
                    QuantFormat::Q8_0 => amax / 127.0 / 2.0,
                    QuantFormat::Q4_0 => amax / 8.0,
                    QuantFormat::Q4_1 => (hi - lo) / 15.0 / 2.0,
                    // Q5_0's grid is -16..15 steps of amax / 16, as Q4_0's.
                    QuantFormat::Q5_0 => amax / 16.0,
                    QuantFormat::Q5_1 => (hi - lo) / 31.0 / 2.0,
                    _ => unreachable!("not quantized here"),
                };
                for (&a, &b2) in xs.iter().zip(ys) {
                    assert!((a - b2).abs() <= half_step + amax * 2e-3, "{format:?} block {b}: {a} -> {b2}");
                }
            }
        }
    }

    /// llama.cpp's `dequantize_row_q5_0` and `_q5_1` loops, transcribed (their bit arithmetic,
    /// not `small_codes`'), against the reference decoding of random blocks.
    #[test]
    fn five_bit_blocks_decode_as_llama_cpp_does() {
        for format in [QuantFormat::Q5_0, QuantFormat::Q5_1] {
            let rows = random_rows(format, 3, 64, 9);
            let got = rows.to_f32();
            let mut want = Vec::new();
            for block in rows.bytes.chunks_exact(format.block_bytes()) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let (m, at) = if format == QuantFormat::Q5_1 {
                    (f16::from_le_bytes([block[2], block[3]]).to_f32(), 4)
                } else {
                    (0.0, 2)
                };
                let qh = u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
                let qs = &block[at + 4..];
                let (mut lo, mut hi) = (Vec::new(), Vec::new());
                for j in 0..16 {
                    let xh_0 = ((qh >> j) << 4) & 0x10;
                    let xh_1 = (qh >> (j + 12)) & 0x10;
                    let (x0, x1) = ((qs[j] as u32 & 0x0f) | xh_0, (qs[j] as u32 >> 4) | xh_1);
                    if format == QuantFormat::Q5_0 {
                        lo.push((x0 as i32 - 16) as f32 * d);
                        hi.push((x1 as i32 - 16) as f32 * d);
                    } else {
                        lo.push(x0 as f32 * d + m);
                        hi.push(x1 as f32 * d + m);
                    }
                }
                want.extend(lo);
                want.extend(hi);
            }
            assert_eq!(got, want, "{format:?}");
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        assert!(QuantRows::new(QuantFormat::Q4_1, 2, 33, vec![0; 40]).is_err());
        assert!(QuantRows::new(QuantFormat::Q4_1, 2, 32, vec![0; 39]).is_err());
        assert!(QuantFormat::parse("q3_k").is_err());
        assert_eq!(QuantFormat::parse("Q5_K").unwrap(), QuantFormat::Q5_K);
        assert_eq!(QuantFormat::parse("Q4_0").unwrap(), QuantFormat::Q4_0);
        assert_eq!(QuantFormat::parse("Q6_K").unwrap(), QuantFormat::Q6_K);
        let e = QuantRows::quantize(QuantFormat::Q4_K, &[0.0; 256], 1, 256).unwrap_err().to_string();
        assert!(e.contains("q4_k") && e.contains("not supported"), "{e}");
        assert!(QuantRows::new(QuantFormat::Q6_K, 1, 128, vec![0; 105]).is_err());
        assert!(QuantRows::new(QuantFormat::Q6_K, 1, 256, vec![0; 210]).is_ok());
    }
}

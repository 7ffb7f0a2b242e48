//! The layout the CPU kernel reads quantized weights in: output features interleaved in 32-bit
//! words, so one vector load brings the codes of `32 / bits` features at consecutive `k`.
//!
//! - `words[g * k + j]` holds, for the features `g * C .. g * C + C` (`C` = 8 for 4-bit codes, 4
//!   for 8-bit), their codes at input index `j`: feature `g * C + s` in bits `s * B .. s * B + B`.
//!   A vector of words at `j .. j + lanes` thus pairs lane for lane with `x[j .. j + lanes]`, on
//!   every SIMD width, with no shuffle.
//! - Each (feature, block of 32) keeps the block's f16 scale `d` and (Q4_1) minimum `m` as the
//!   file has them, so the packed matrix takes the file's memory: 4.5 bits per weight for Q4_0,
//!   5 for Q4_1, 8.5 for Q8_0. The maps of a group's features for one block sit together:
//!   `maps[((g * nb + blk) * C + s) * len ..]`, `len` = 2 for Q4_1, else 1.
//! - Decoding uses the affine map `value = a * f + b` ([`PackedQuant::affine`]), where
//!   `f = 1 + code / 2^B` is made by placing the code under the exponent of 1.0
//!   (`0x3F80_0000 | code << (23 - B)`): a shift, an and, an or and one FMA per weight. For Q8_0
//!   and Q4_0, `a * f + b` is exactly `d * q` before its one rounding, so decoding equals the
//!   reference bit for bit; Q4_1's `b = m - 16 d` may round once more (1 ulp).
//!
//! Features past `n` in the last group have code 0 and the map (0, 0).

use half::f16;

use crate::quant::{BLOCK, QuantFormat, QuantRows};

/// Quantized `[n, k]` weights in the interleaved layout.
#[derive(Debug, Clone)]
pub struct PackedQuant {
    pub format: QuantFormat,
    pub n: usize,
    pub k: usize,
    words: Vec<u32>,
    /// `d` (and `m` for Q4_1) per feature and block, grouped as above.
    maps: Vec<f16>,
}

impl PackedQuant {
    /// Features per word.
    pub fn cols_per_word(&self) -> usize {
        32 / self.format.code_bits() as usize
    }

    pub fn groups(&self) -> usize {
        self.n.div_ceil(self.cols_per_word())
    }

    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// Stored f16 values per (feature, block): `d`, and `m` for Q4_1.
    fn map_len(format: QuantFormat) -> usize {
        if format == QuantFormat::Q4_1 { 2 } else { 1 }
    }

    /// The affine maps of feature group `g`, block by block: `out[blk * C + s]` for feature
    /// `g * C + s` (see [`PackedQuant::affine`]).
    pub fn group_affine(&self, g: usize, out: &mut [[f32; 2]]) {
        let per = self.cols_per_word();
        let len = Self::map_len(self.format);
        let count = (self.k / BLOCK) * per;
        let maps = &self.maps[g * count * len..(g + 1) * count * len];
        for (dst, dm) in out[..count].iter_mut().zip(maps.chunks_exact(len)) {
            *dst = Self::affine(self.format, [dm[0], if len == 2 { dm[1] } else { f16::ZERO }]);
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.words.len() * 4 + self.maps.len() * 2
    }

    /// The map `(a, b)` with `value = a * f + b` for a block's stored `(d, m)`, `f = 1 + code/2^B`:
    /// `a = d 2^B` and `b = offset - a`, where the offset of code 0 is `m` (Q4_1), `-8 d` (Q4_0)
    /// or `-128 d` (Q8_0, whose codes are `q + 128`).
    #[inline(always)]
    pub fn affine(format: QuantFormat, dm: [f16; 2]) -> [f32; 2] {
        let d = dm[0].to_f32();
        let (a, offset) = match format {
            QuantFormat::Q8_0 => (d * 256.0, d * -128.0),
            QuantFormat::Q4_0 => (d * 16.0, d * -8.0),
            QuantFormat::Q4_1 => (d * 16.0, dm[1].to_f32()),
        };
        [a, offset - a]
    }

    fn empty(format: QuantFormat, n: usize, k: usize) -> Self {
        let c = 32 / format.code_bits() as usize;
        let groups = n.div_ceil(c);
        let maps = vec![f16::ZERO; groups * (k / BLOCK) * c * Self::map_len(format)];
        Self { format, n, k, words: vec![0; groups * k], maps }
    }

    /// Repacks rows of GGUF blocks.
    pub fn from_rows(rows: &QuantRows) -> Self {
        Self::from_row_bytes(rows.format, rows.n, rows.k, &rows.bytes).expect("QuantRows checked its shape")
    }

    /// Repacks `n` rows of `k` weights of GGUF blocks straight from `bytes` (a memory-mapped
    /// file's tensor: no copy of the file's blocks is made).
    pub fn from_row_bytes(format: QuantFormat, n: usize, k: usize, bytes: &[u8]) -> crate::error::Result<Self> {
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(crate::TwinferError::InvalidParameter(format!(
                "{} rows must hold a positive multiple of {BLOCK} weights, not {k}",
                format.name()
            )));
        }
        let row_bytes = format.row_bytes(k);
        crate::error::check_len("quantized rows", n * row_bytes, bytes.len())?;
        let mut p = Self::empty(format, n, k);
        for c in 0..n {
            let row = &bytes[c * row_bytes..(c + 1) * row_bytes];
            for (blk, block) in row.chunks_exact(format.block_bytes()).enumerate() {
                let (codes, _, _) = format.split_block(block);
                for (i, &code) in codes.iter().enumerate() {
                    p.set_code(c, blk * BLOCK + i, code as u32);
                }
                let d = f16::from_le_bytes([block[0], block[1]]);
                let m = if format == QuantFormat::Q4_1 { f16::from_le_bytes([block[2], block[3]]) } else { f16::ZERO };
                p.set_map(c, blk, [d, m]);
            }
        }
        Ok(p)
    }

    /// Several matrices of the same format and width, one after the other as features (q, k and
    /// v; gate and up), so one product reads the input once.
    pub fn stack(parts: &[&PackedQuant]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.format != first.format || p.k != first.k) {
            return None;
        }
        let mut out = Self::empty(first.format, parts.iter().map(|p| p.n).sum(), first.k);
        let mut at = 0;
        for p in parts {
            for c in 0..p.n {
                for j in 0..p.k {
                    out.set_code(at + c, j, p.code(c, j));
                }
                for blk in 0..p.k / BLOCK {
                    out.set_map(at + c, blk, p.map(c, blk));
                }
            }
            at += p.n;
        }
        Some(out)
    }

    fn word_bit(&self, c: usize, j: usize) -> (usize, u32) {
        let per = self.cols_per_word();
        ((c / per) * self.k + j, (c % per) as u32 * self.format.code_bits())
    }

    fn code(&self, c: usize, j: usize) -> u32 {
        let (w, bit) = self.word_bit(c, j);
        (self.words[w] >> bit) & ((1 << self.format.code_bits()) - 1)
    }

    fn set_code(&mut self, c: usize, j: usize, code: u32) {
        let (w, bit) = self.word_bit(c, j);
        let mask = ((1u32 << self.format.code_bits()) - 1) << bit;
        self.words[w] = (self.words[w] & !mask) | (code << bit);
    }

    fn map_index(&self, c: usize, blk: usize) -> usize {
        let per = self.cols_per_word();
        ((c / per) * (self.k / BLOCK) + blk) * per + c % per
    }

    fn map(&self, c: usize, blk: usize) -> [f16; 2] {
        let len = Self::map_len(self.format);
        let i = self.map_index(c, blk) * len;
        [self.maps[i], if len == 2 { self.maps[i + 1] } else { f16::ZERO }]
    }

    fn set_map(&mut self, c: usize, blk: usize, dm: [f16; 2]) {
        let len = Self::map_len(self.format);
        let i = self.map_index(c, blk) * len;
        self.maps[i..i + len].copy_from_slice(&dm[..len]);
    }

    /// Feature `c`'s weights, decoded as the kernel decodes them (an embedding row).
    pub fn row_f32(&self, c: usize, out: &mut [f32]) {
        let shift = 23 - self.format.code_bits();
        for (j, o) in out.iter_mut().enumerate().take(self.k) {
            let [a, b] = Self::affine(self.format, self.map(c, j / BLOCK));
            let f = f32::from_bits(0x3F80_0000 | self.code(c, j) << shift);
            *o = f.mul_add(a, b);
        }
    }

    /// Every weight, `[n, k]` f32 (for engines that do not read the packed layout).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n * self.k];
        for (c, row) in out.chunks_exact_mut(self.k).enumerate() {
            self.row_f32(c, row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_decodes_like_the_reference_and_stacks() {
        let value = |i: usize| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / 16_777_216.0 - 0.5;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1] {
            // n = 13 leaves a partial group of features.
            let (n, k) = (13, 64);
            let x: Vec<f32> = (0..n * k).map(value).collect();
            let rows = QuantRows::quantize(format, &x, n, k).unwrap();
            let want = rows.to_f32();
            let packed = PackedQuant::from_rows(&rows);
            let got = packed.to_f32();
            for (i, (&w, &g)) in want.iter().zip(&got).enumerate() {
                let ulp = if format == QuantFormat::Q4_1 { f32::EPSILON * 2.0 * w.abs().max(0.5) } else { 0.0 };
                assert!((w - g).abs() <= ulp, "{format:?} [{}, {}]: {w} vs {g}", i / k, i % k);
            }
            let stacked = PackedQuant::stack(&[&packed, &packed]).unwrap();
            assert_eq!(stacked.n, 2 * n);
            let both = stacked.to_f32();
            assert_eq!(&both[..n * k], &got[..]);
            assert_eq!(&both[n * k..], &got[..]);
        }
    }
}

//! The layout the CPU kernels read quantized weights in: tiles of [`TILE`] output features whose
//! codes are interleaved so that one vector load brings 4 consecutive codes of every feature of
//! the tile, ready for an integer dot product with 4 activation bytes broadcast to every lane
//! (`vpdpbusd` on AVX-512 VNNI, `pmaddubsw` on AVX2, `smull` on NEON, `extmul` in wasm).
//!
//! - `codes[tile][block]` is one block of 32 inputs for the tile's 16 features:
//!   - 8-bit codes (Q8_0, the file's signed `q`): 8 rows of 64 bytes, row `g` holding inputs
//!     `4g .. 4g + 4` of feature `f` at bytes `4f .. 4f + 4`;
//!   - 4-bit codes (Q4_0, Q4_1, the nibble `0..=15`): 4 rows of 64 bytes, row `g` holding inputs
//!     `4g .. 4g + 4` in the low nibbles and inputs `16 + 4g .. 16 + 4g + 4` in the high ones.
//! - `d[tile][block][f]` (and `m` for Q4_1) are the block scales as the file stores them (f16), so
//!   the packed matrix takes the file's memory: 4.5 bits per weight for Q4_0, 5 for Q4_1, 8.5 for
//!   Q8_0.
//! - A weight's value is `d * (c - zero) + m`: `zero` is 8 for Q4_0 and 0 otherwise, `m` is 0
//!   except for Q4_1, exactly as the reference decodes the file's blocks.
//!
//! Features past `n` in the last tile have code 0 and scale 0. Scales must be finite (checked
//! when packing, as llama.cpp validates row data): the kernels convert them without a NaN path.

use half::f16;

use crate::error::{Result, TwinferError};
use crate::quant::{BLOCK, QuantFormat, QuantRows};

/// Output features per tile: one 512-bit vector of i32 lanes.
pub const TILE: usize = 16;

/// Quantized `[n, k]` weights in the tiled layout.
#[derive(Debug, Clone)]
pub struct PackedQuant {
    pub format: QuantFormat,
    pub n: usize,
    pub k: usize,
    codes: Vec<u8>,
    /// `[tiles][blocks][TILE]` f16 scales.
    d: Vec<f16>,
    /// Q4_1's minima, laid out as `d`; empty otherwise.
    m: Vec<f16>,
}

impl PackedQuant {
    pub fn tiles(&self) -> usize {
        self.n.div_ceil(TILE)
    }

    pub fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Bytes of one tile's codes for one block.
    pub const fn tile_block_bytes(format: QuantFormat) -> usize {
        TILE * BLOCK * format.code_bits() as usize / 8
    }

    /// The code bytes of tile `t`, block after block.
    pub fn tile_codes(&self, t: usize) -> &[u8] {
        let len = self.blocks() * Self::tile_block_bytes(self.format);
        &self.codes[t * len..(t + 1) * len]
    }

    /// Tile `t`'s scales, `[blocks][TILE]` f16 bits.
    pub fn tile_scales(&self, t: usize) -> &[u16] {
        let len = self.blocks() * TILE;
        bytemuck::cast_slice(&self.d[t * len..(t + 1) * len])
    }

    /// Tile `t`'s Q4_1 minima, laid out as its scales (empty for the other formats).
    pub fn tile_minima(&self, t: usize) -> &[u16] {
        let len = self.blocks() * TILE;
        if self.m.is_empty() { &[] } else { bytemuck::cast_slice(&self.m[t * len..(t + 1) * len]) }
    }

    /// The code that decodes to 0 before the minimum is added: 8 for Q4_0, else 0.
    pub fn zero(&self) -> i32 {
        if self.format == QuantFormat::Q4_0 { 8 } else { 0 }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.codes.len() + (self.d.len() + self.m.len()) * 2
    }

    fn empty(format: QuantFormat, n: usize, k: usize) -> Self {
        let tiles = n.div_ceil(TILE);
        let scales = tiles * (k / BLOCK) * TILE;
        Self {
            format,
            n,
            k,
            codes: vec![0; tiles * (k / BLOCK) * Self::tile_block_bytes(format)],
            d: vec![f16::ZERO; scales],
            m: if format == QuantFormat::Q4_1 { vec![f16::ZERO; scales] } else { Vec::new() },
        }
    }

    /// Repacks rows of GGUF blocks.
    pub fn from_rows(rows: &QuantRows) -> Result<Self> {
        Self::from_row_bytes(rows.format, rows.n, rows.k, &rows.bytes)
    }

    /// Repacks `n` rows of `k` weights of GGUF blocks straight from `bytes` (a memory-mapped
    /// file's tensor: no copy of the file's blocks is made). A non-finite scale is an error.
    pub fn from_row_bytes(format: QuantFormat, n: usize, k: usize, bytes: &[u8]) -> Result<Self> {
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(TwinferError::InvalidParameter(format!(
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
                let d = f16::from_le_bytes([block[0], block[1]]);
                let m = if format == QuantFormat::Q4_1 { f16::from_le_bytes([block[2], block[3]]) } else { f16::ZERO };
                if !d.is_finite() || !m.is_finite() {
                    return Err(TwinferError::InvalidParameter(format!(
                        "{} row {c}, block {blk}: the scale is not finite ({d}, {m})",
                        format.name()
                    )));
                }
                let mut codes = [0u8; BLOCK];
                match format {
                    QuantFormat::Q8_0 => codes.copy_from_slice(&block[2..2 + BLOCK]),
                    QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                        let qs = &block[block.len() - BLOCK / 2..];
                        for j in 0..BLOCK / 2 {
                            codes[j] = qs[j] & 0x0f;
                            codes[j + BLOCK / 2] = qs[j] >> 4;
                        }
                    }
                }
                p.set_block(c, blk, &codes, [d, m]);
            }
        }
        Ok(p)
    }

    /// Where input `j` (`0..32`) of feature `f` (`0..TILE`) sits in a tile's block: the byte and,
    /// for 4-bit codes, the nibble's shift.
    fn code_at(format: QuantFormat, f: usize, j: usize) -> (usize, u32) {
        match format.code_bits() {
            8 => ((j / 4) * 64 + f * 4 + j % 4, 0),
            _ => (((j % 16) / 4) * 64 + f * 4 + j % 4, if j < 16 { 0 } else { 4 }),
        }
    }

    fn scale_index(&self, c: usize, blk: usize) -> usize {
        ((c / TILE) * self.blocks() + blk) * TILE + c % TILE
    }

    fn block_codes_mut(&mut self, c: usize, blk: usize) -> &mut [u8] {
        let bb = Self::tile_block_bytes(self.format);
        let at = ((c / TILE) * self.blocks() + blk) * bb;
        &mut self.codes[at..at + bb]
    }

    fn set_block(&mut self, c: usize, blk: usize, codes: &[u8; BLOCK], dm: [f16; 2]) {
        let format = self.format;
        let f = c % TILE;
        let dst = self.block_codes_mut(c, blk);
        for (j, &code) in codes.iter().enumerate() {
            let (byte, shift) = Self::code_at(format, f, j);
            dst[byte] = if format.code_bits() == 8 { code } else { (dst[byte] & !(0x0f << shift)) | code << shift };
        }
        let i = self.scale_index(c, blk);
        self.d[i] = dm[0];
        if !self.m.is_empty() {
            self.m[i] = dm[1];
        }
    }

    /// Feature `c`'s codes and `(d, m)` in block `blk`.
    fn block(&self, c: usize, blk: usize) -> ([u8; BLOCK], [f16; 2]) {
        let bb = Self::tile_block_bytes(self.format);
        let at = ((c / TILE) * self.blocks() + blk) * bb;
        let src = &self.codes[at..at + bb];
        let codes = core::array::from_fn(|j| {
            let (byte, shift) = Self::code_at(self.format, c % TILE, j);
            if self.format.code_bits() == 8 { src[byte] } else { (src[byte] >> shift) & 0x0f }
        });
        let i = self.scale_index(c, blk);
        (codes, [self.d[i], if self.m.is_empty() { f16::ZERO } else { self.m[i] }])
    }

    /// Feature `c`'s weights, decoded as the reference decodes the file (an embedding row).
    pub fn row_f32(&self, c: usize, out: &mut [f32]) {
        for (blk, chunk) in out[..self.k].chunks_exact_mut(BLOCK).enumerate() {
            let (codes, [d, m]) = self.block(c, blk);
            let (d, m) = (d.to_f32(), m.to_f32());
            for (o, &code) in chunk.iter_mut().zip(&codes) {
                *o = match self.format {
                    QuantFormat::Q8_0 => d * (code as i8) as f32,
                    QuantFormat::Q4_0 => d * (code as f32 - 8.0),
                    QuantFormat::Q4_1 => d.mul_add(code as f32, m),
                };
            }
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
    fn packing_decodes_like_the_reference() {
        let value = |i: usize| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / 16_777_216.0 - 0.5;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1] {
            // n = 13 leaves a partial tile.
            for n in [13, 32] {
                let k = 64;
                let x: Vec<f32> = (0..n * k).map(value).collect();
                let rows = QuantRows::quantize(format, &x, n, k).unwrap();
                let want = rows.to_f32();
                let packed = PackedQuant::from_rows(&rows).unwrap();
                let got = packed.to_f32();
                assert_eq!(got, want, "{format:?} n={n}: decoding differs from the reference");
            }
        }
    }

    #[test]
    fn a_non_finite_scale_is_refused() {
        let mut rows = QuantRows::quantize(QuantFormat::Q4_1, &[0.25; 64], 2, 32).unwrap();
        rows.bytes[20..22].copy_from_slice(&f16::NAN.to_le_bytes());
        let e = PackedQuant::from_rows(&rows).unwrap_err().to_string();
        assert!(e.contains("row 1, block 0") && e.contains("not finite"), "{e}");
    }
}

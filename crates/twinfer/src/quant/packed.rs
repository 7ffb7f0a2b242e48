//! The layout the CPU kernels read quantized weights in: tiles of [`TILE`] output features whose
//! codes are interleaved so that one vector load brings 4 consecutive codes of every feature of
//! the tile, ready for an integer dot product with 4 activation bytes broadcast to every lane
//! (`vpdpbusd` on AVX-512 VNNI, `pmaddubsw` on AVX2, `smull` on NEON, `extmul` in wasm).
//!
//! - `codes[tile][block]` is one block of 32 inputs for the tile's 16 features:
//!   - 8-bit codes (Q8_0's `q`; Q5_0, Q5_1, Q5_K and Q6_K's 5- and 6-bit codes): 8 rows of 64 bytes, row `g` holding inputs
//!     `4g .. 4g + 4` of feature `f` at bytes `4f .. 4f + 4`;
//!   - 4-bit codes (Q4_0, Q4_1, Q4_K: the nibble `0..=15`): 4 rows of 64 bytes, row `g` holding inputs
//!     `4g .. 4g + 4` in the low nibbles and inputs `16 + 4g .. 16 + 4g + 4` in the high ones.
//! - `d[tile][group][f]` (and `m` for Q4_1 and Q4_K) are f16 scales as the file stores them. A
//!   group is one block for the legacy formats and the 8 blocks of a K-quant block, whose `d`
//!   (and `-dmin` as `m`) it holds.
//! - For the K-quants, `ds[tile][block][half][f]` are i8 multipliers of `d`: one per block for
//!   Q4_K (`half` has one value), one per 16 inputs for Q6_K (two halves); `ms[tile][block][f]`
//!   are Q4_K's and Q5_K's multipliers of `m`. Their products with the f16 scales are exact in f32.
//! - A weight's value is `d * ds * (c - zero) + m * ms`: `zero` is 8 for Q4_0 and 0 otherwise,
//!   `ds` and `ms` are 1 for the legacy formats, `m` is 0 except for Q4_1, Q5_1, Q4_K and Q5_K,
//!   exactly as the reference decodes the file's blocks. Q5_0's codes are its `q - 16` and Q6_K's
//!   its `q - 32`, as signed bytes; Q5_1's and Q5_K's are the unsigned 5-bit codes.
//!
//! The packed matrix takes about the file's memory: 4.5 bits per weight for Q4_0, 5 for Q4_1,
//! 8.5 for Q8_0, 4.6 for Q4_K; 5- and 6-bit codes take a byte each, so that the kernels' 8-bit
//! path reads them (Q5_0 8.5 bits, Q5_1 9, Q5_K 8.6, Q6_K 8.6). Features past `n` in the last tile have code 0 and scale 0.
//! Scales must be finite (checked when packing, as llama.cpp validates row data): the kernels
//! convert them without a NaN path.

use half::f16;

use crate::error::{Result, TwinferError};
use crate::quant::kquant::{self, KBlock, SUB_BLOCKS};
use crate::quant::{BLOCK, QuantFormat, QuantRows};
use crate::weight_slab::Slab;

/// Output features per tile: one 512-bit vector of i32 lanes.
pub const TILE: usize = 16;

/// Quantized `[n, k]` weights in the tiled layout.
#[derive(Debug, Clone)]
pub struct PackedQuant {
    /// The block format the weights came from.
    pub format: QuantFormat,
    /// Output features (rows).
    pub n: usize,
    /// Input features per row, a multiple of 32.
    pub k: usize,
    codes: Slab<u8>,
    /// `[tiles][groups][TILE]` f16 scales.
    d: Slab<f16>,
    /// The minima (Q4_1, Q4_K), laid out as `d`; empty otherwise.
    m: Slab<f16>,
    /// The K-quants' multipliers of `d`, `[tiles][blocks][halves][TILE]`; empty otherwise.
    ds: Slab<i8>,
    /// Q4_K's and Q5_K's multipliers of `m`, `[tiles][blocks][TILE]`; empty otherwise.
    ms: Slab<i8>,
}

impl QuantFormat {
    /// log2 of the blocks of 32 that share one f16 scale: 3 for the K-quants.
    pub(crate) const fn group_shift(self) -> u32 {
        match self {
            Self::Q4_K | Self::Q5_K | Self::Q6_K => 3,
            _ => 0,
        }
    }

    /// Scales per block of 32 inputs: 2 for Q6_K (one per 16), else 1.
    pub(crate) const fn halves(self) -> usize {
        if matches!(self, Self::Q6_K) { 2 } else { 1 }
    }

    const fn is_k_quant(self) -> bool {
        matches!(self, Self::Q4_K | Self::Q5_K | Self::Q6_K)
    }
}

impl PackedQuant {
    /// Tiles of [`TILE`] output features: `ceil(n / TILE)`.
    pub fn tiles(&self) -> usize {
        self.n.div_ceil(TILE)
    }

    /// Blocks of 32 inputs per row: `k / 32`.
    pub fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Scale groups per tile row: blocks sharing one f16 scale count once.
    fn groups(&self) -> usize {
        self.blocks() >> self.format.group_shift()
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

    /// Tile `t`'s scales, `[groups][TILE]` f16 bits.
    pub fn tile_scales(&self, t: usize) -> &[u16] {
        let len = self.groups() * TILE;
        bytemuck::cast_slice(&self.d[t * len..(t + 1) * len])
    }

    /// Tile `t`'s minima, laid out as its scales (empty for formats without minima).
    pub fn tile_minima(&self, t: usize) -> &[u16] {
        let len = self.groups() * TILE;
        if self.m.is_empty() { &[] } else { bytemuck::cast_slice(&self.m[t * len..(t + 1) * len]) }
    }

    /// Tile `t`'s multipliers of its scales, `[blocks][halves][TILE]` (empty but for K-quants).
    pub fn tile_scale_multipliers(&self, t: usize) -> &[i8] {
        let len = self.blocks() * self.format.halves() * TILE;
        if self.ds.is_empty() { &[] } else { &self.ds[t * len..(t + 1) * len] }
    }

    /// Tile `t`'s multipliers of its minima, `[blocks][TILE]` (empty but for Q4_K and Q5_K).
    pub fn tile_minimum_multipliers(&self, t: usize) -> &[i8] {
        let len = self.blocks() * TILE;
        if self.ms.is_empty() { &[] } else { &self.ms[t * len..(t + 1) * len] }
    }

    /// The code that decodes to 0 before the minimum is added: 8 for Q4_0, else 0.
    pub fn zero(&self) -> i32 {
        if self.format == QuantFormat::Q4_0 { 8 } else { 0 }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.codes.len() + (self.d.len() + self.m.len()) * 2 + self.ds.len() + self.ms.len()
    }

    fn empty(format: QuantFormat, n: usize, k: usize) -> Self {
        let tiles = n.div_ceil(TILE);
        let blocks = k / BLOCK;
        let scales = tiles * (blocks >> format.group_shift()) * TILE;
        Self {
            format,
            n,
            k,
            // In huge-page chunks: decode streams these every token (`weight_slab`).
            codes: Slab::zeroed(tiles * blocks * Self::tile_block_bytes(format)),
            d: Slab::zeroed(scales),
            m: if format.has_minima() { Slab::zeroed(scales) } else { Slab::default() },
            ds: if format.is_k_quant() {
                Slab::zeroed(tiles * blocks * format.halves() * TILE)
            } else {
                Slab::default()
            },
            ms: if matches!(format, QuantFormat::Q4_K | QuantFormat::Q5_K) {
                Slab::zeroed(tiles * blocks * TILE)
            } else {
                Slab::default()
            },
        }
    }

    /// Repacks rows of GGUF blocks.
    pub fn from_rows(rows: &QuantRows) -> Result<Self> {
        Self::from_row_bytes(rows.format, rows.n, rows.k, &rows.bytes)
    }

    /// Repacks `n` rows of `k` weights of GGUF blocks straight from `bytes` (a memory-mapped
    /// file's tensor: no copy of the file's blocks is made). A non-finite scale is an error.
    pub fn from_row_bytes(format: QuantFormat, n: usize, k: usize, bytes: &[u8]) -> Result<Self> {
        let per = format.block_weights();
        if k == 0 || !k.is_multiple_of(per) {
            return Err(TwinferError::InvalidParameter(format!(
                "{} rows must hold a positive multiple of {per} weights, not {k}",
                format.name()
            )));
        }
        let row_bytes = format.row_bytes(k);
        crate::error::check_len("quantized rows", n * row_bytes, bytes.len())?;
        let mut p = Self::empty(format, n, k);
        for c in 0..n {
            let row = &bytes[c * row_bytes..(c + 1) * row_bytes];
            for (blk, block) in row.chunks_exact(format.block_bytes()).enumerate() {
                let not_finite = |d: f16, m: f16| {
                    TwinferError::InvalidParameter(format!(
                        "{} row {c}, block {blk}: the scale is not finite ({d}, {m})",
                        format.name()
                    ))
                };
                if format.is_k_quant() {
                    let kb = if format == QuantFormat::Q6_K {
                        kquant::split_q6_k(block)
                    } else {
                        kquant::split_q45_k(block)
                    };
                    if !kb.d.is_finite() || !kb.dmin.is_finite() {
                        return Err(not_finite(kb.d, kb.dmin));
                    }
                    p.set_k_block(c, blk, &kb);
                    continue;
                }
                let d = f16::from_le_bytes([block[0], block[1]]);
                let m = if format.has_minima() { f16::from_le_bytes([block[2], block[3]]) } else { f16::ZERO };
                if !d.is_finite() || !m.is_finite() {
                    return Err(not_finite(d, m));
                }
                let codes: [u8; BLOCK] = match format {
                    QuantFormat::Q8_0 => core::array::from_fn(|j| block[2 + j]),
                    // Signed bytes `q - 16`, so that the 8-bit kernels need no zero code.
                    QuantFormat::Q5_0 => format.small_codes(block).map(|c| (c as i8 - 16) as u8),
                    _ => format.small_codes(block),
                };
                p.set_codes(c, blk, &codes);
                p.set_scales(c, blk, d, m);
            }
        }
        Ok(p)
    }

    /// Stores K-quant block `kblk` of feature `c`: its 8 blocks of codes, its scales as group
    /// `kblk`, and the multipliers.
    fn set_k_block(&mut self, c: usize, kblk: usize, kb: &KBlock) {
        // The minimum is subtracted: stored negated, it adds like Q4_1's (negation is exact).
        self.set_scales(c, kblk, kb.d, -kb.dmin);
        let (halves, tile0, f) = (self.format.halves(), (c / TILE) * self.blocks(), c % TILE);
        for j in 0..SUB_BLOCKS {
            let blk = kblk * SUB_BLOCKS + j;
            self.set_codes(c, blk, &kb.codes[j]);
            for h in 0..halves {
                self.ds[((tile0 + blk) * halves + h) * TILE + f] = kb.scales[j][h];
            }
            if !self.ms.is_empty() {
                self.ms[(tile0 + blk) * TILE + f] = kb.mins[j];
            }
        }
    }

    /// Where input `j` (`0..32`) of feature `f` (`0..TILE`) sits in a tile's block: the byte and,
    /// for 4-bit codes, the nibble's shift.
    fn code_at(format: QuantFormat, f: usize, j: usize) -> (usize, u32) {
        match format.code_bits() {
            8 => ((j / 4) * 64 + f * 4 + j % 4, 0),
            _ => (((j % 16) / 4) * 64 + f * 4 + j % 4, if j < 16 { 0 } else { 4 }),
        }
    }

    /// Index of feature `c`'s scale of group `g` in `d` and `m`.
    fn scale_index(&self, c: usize, g: usize) -> usize {
        ((c / TILE) * self.groups() + g) * TILE + c % TILE
    }

    fn block_codes_mut(&mut self, c: usize, blk: usize) -> &mut [u8] {
        let bb = Self::tile_block_bytes(self.format);
        let at = ((c / TILE) * self.blocks() + blk) * bb;
        &mut self.codes[at..at + bb]
    }

    fn set_codes(&mut self, c: usize, blk: usize, codes: &[u8; BLOCK]) {
        let format = self.format;
        let f = c % TILE;
        let dst = self.block_codes_mut(c, blk);
        for (j, &code) in codes.iter().enumerate() {
            let (byte, shift) = Self::code_at(format, f, j);
            dst[byte] = if format.code_bits() == 8 { code } else { (dst[byte] & !(0x0f << shift)) | code << shift };
        }
    }

    fn set_scales(&mut self, c: usize, g: usize, d: f16, m: f16) {
        let i = self.scale_index(c, g);
        self.d[i] = d;
        if !self.m.is_empty() {
            self.m[i] = m;
        }
    }

    /// Feature `c`'s codes in block `blk`.
    fn block_codes(&self, c: usize, blk: usize) -> [u8; BLOCK] {
        let bb = Self::tile_block_bytes(self.format);
        let at = ((c / TILE) * self.blocks() + blk) * bb;
        let src = &self.codes[at..at + bb];
        core::array::from_fn(|j| {
            let (byte, shift) = Self::code_at(self.format, c % TILE, j);
            if self.format.code_bits() == 8 { src[byte] } else { (src[byte] >> shift) & 0x0f }
        })
    }

    /// Feature `c`'s scale for half `h` of block `blk` and its minimum, as f32: the products
    /// the kernels form (exact, see [`kquant`]).
    fn block_scales(&self, c: usize, blk: usize, h: usize) -> (f32, f32) {
        let i = self.scale_index(c, blk >> self.format.group_shift());
        let (mut d, mut m) = (self.d[i].to_f32(), if self.m.is_empty() { 0.0 } else { self.m[i].to_f32() });
        let at = (c / TILE) * self.blocks() + blk;
        if !self.ds.is_empty() {
            d *= self.ds[(at * self.format.halves() + h) * TILE + c % TILE] as f32;
        }
        if !self.ms.is_empty() {
            m *= self.ms[at * TILE + c % TILE] as f32;
        }
        (d, m)
    }

    /// Feature `c`'s minimum in block `blk` (zero for formats without minima): what the
    /// kernels add times the activations' block sum.
    pub fn block_minimum(&self, c: usize, blk: usize) -> f32 {
        self.block_scales(c, blk, 0).1
    }

    /// Inputs per scale in the GPU layout ([`PackedQuant::gpu_row`]): 16 for Q6_K, else 32.
    pub fn gpu_group(&self) -> usize {
        BLOCK / self.format.halves()
    }

    /// Whether the GPU layout has an offset after each scale: the 4-bit formats, Q5_1 and Q5_K.
    pub fn gpu_offsets(&self) -> bool {
        self.format.code_bits() == 4 || self.format.has_minima()
    }

    /// Feature `c` as the GPU kernels read it: its codes appended to `codes` (4-bit codes 8 a
    /// word, 8-bit codes 4 a word, in input order, least significant first) and per group of
    /// [`PackedQuant::gpu_group`] inputs its f32 scale (and offset, [`PackedQuant::gpu_offsets`])
    /// appended to `scales`, so that `scale * code + offset` is the reference's value: the products are exact
    /// in f32 and the one rounding is the reference's own.
    pub fn gpu_row(&self, c: usize, codes: &mut Vec<u32>, scales: &mut Vec<f32>) {
        for blk in 0..self.blocks() {
            let b = self.block_codes(c, blk);
            if self.format.code_bits() == 4 {
                codes.extend(b.chunks_exact(8).map(|w| w.iter().rev().fold(0u32, |acc, &q| acc << 4 | q as u32)));
            } else {
                codes.extend(b.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])));
            }
            for h in 0..self.format.halves() {
                let (d, m) = self.block_scales(c, blk, h);
                match self.format {
                    // d * (q - 8) = d * q - 8 * d, both products exact.
                    QuantFormat::Q4_0 => scales.extend([d, -8.0 * d]),
                    QuantFormat::Q4_1 | QuantFormat::Q5_1 | QuantFormat::Q4_K | QuantFormat::Q5_K => {
                        scales.extend([d, m])
                    }
                    QuantFormat::Q8_0 | QuantFormat::Q5_0 | QuantFormat::Q6_K => scales.push(d),
                }
            }
        }
    }

    /// Feature `c`'s weights, decoded as the reference decodes the file (an embedding row).
    pub fn row_f32(&self, c: usize, out: &mut [f32]) {
        for (blk, chunk) in out[..self.k].chunks_exact_mut(BLOCK).enumerate() {
            let codes = self.block_codes(c, blk);
            for (j, (o, &code)) in chunk.iter_mut().zip(&codes).enumerate() {
                let (d, m) = self.block_scales(c, blk, j * self.format.halves() / BLOCK);
                *o = match self.format {
                    QuantFormat::Q8_0 | QuantFormat::Q5_0 | QuantFormat::Q6_K => d * (code as i8) as f32,
                    QuantFormat::Q4_0 => d * (code as f32 - 8.0),
                    QuantFormat::Q4_1 | QuantFormat::Q5_1 => d.mul_add(code as f32, m),
                    // The reference's `(d * sc) * q - dmin * m`, with m = -dmin * m exactly.
                    QuantFormat::Q4_K | QuantFormat::Q5_K => d * code as f32 + m,
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
        for format in [QuantFormat::Q5_0, QuantFormat::Q5_1, QuantFormat::Q4_K, QuantFormat::Q5_K, QuantFormat::Q6_K] {
            for n in [13, 32] {
                let rows = crate::quant::random_rows(format, n, 512, 5);
                let packed = PackedQuant::from_rows(&rows).unwrap();
                assert_eq!(packed.to_f32(), rows.to_f32(), "{format:?} n={n}: decoding differs from the reference");
                // About the file's bits per weight: the K-quants' 6-bit sub-scales take a byte
                // each (0.125 bits more), 5- and 6-bit codes too (2-3 bits more).
                let file = rows.bytes.len() as f64 / (n * 512) as f64 * 8.0;
                let ours = packed.bytes() as f64 / (n.next_multiple_of(TILE) * 512) as f64 * 8.0;
                let extra = match format {
                    QuantFormat::Q4_K => 0.125,
                    QuantFormat::Q5_K | QuantFormat::Q6_K => 3.125,
                    _ => 3.0,
                };
                assert!(ours <= file + extra, "{format:?}: {ours} bits per weight, the file {file}");
            }
        }
    }

    #[test]
    fn a_non_finite_scale_is_refused() {
        let mut rows = QuantRows::quantize(QuantFormat::Q4_1, &[0.25; 64], 2, 32).unwrap();
        rows.bytes[20..22].copy_from_slice(&f16::NAN.to_le_bytes());
        let e = PackedQuant::from_rows(&rows).unwrap_err().to_string();
        assert!(e.contains("row 1, block 0") && e.contains("not finite"), "{e}");
        let mut rows = crate::quant::random_rows(QuantFormat::Q4_K, 2, 512, 1);
        rows.bytes[144 * 3 + 2..144 * 3 + 4].copy_from_slice(&f16::INFINITY.to_le_bytes());
        let e = PackedQuant::from_rows(&rows).unwrap_err().to_string();
        assert!(e.contains("q4_k row 1, block 1") && e.contains("not finite"), "{e}");
    }
}

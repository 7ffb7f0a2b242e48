//! The K-quants of GGUF (llama.cpp's `ggml-common.h` and `ggml-quants.c`): blocks of [`QK_K`]
//! weights whose sub-blocks carry small integer scales relative to the block's f16 scale.
//!
//! - Q4_K, 144 bytes: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Sub-block `j` (32
//!   weights) has a 6-bit scale `sc_j` and a 6-bit minimum `m_j`, packed in `scales`; a weight's
//!   value is `(d * sc_j) * q - dmin * m_j` with `q` its nibble. Weights `64c .. 64c + 32` are the
//!   low nibbles of `qs[32c .. 32c + 32]`, weights `64c + 32 .. 64c + 64` their high nibbles.
//! - Q5_K, 176 bytes: `d, dmin, scales` as Q4_K, then `qh: [u8; 32], qs: [u8; 128]`: Q4_K's
//!   nibbles plus a fifth bit, bit `j` of `qh[l]` for weight `l` of sub-block `j`.
//! - Q6_K, 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. Weight `i` has a
//!   6-bit code `q` (4 low bits in `ql`, 2 high bits in `qh`) and the value
//!   `(d * scales[i / 16]) * (q - 32)`.
//!
//! The products `d * sc` are exact in f32 (an 11-bit significand times an integer of at most 8
//! bits), which is what lets the kernels keep the file's numbers: they multiply the f16 scale by
//! the integer multiplier in registers instead of storing a rounded product.

use half::f16;

use crate::quant::BLOCK;

/// Weights per K-quant block.
pub const QK_K: usize = 256;
/// Bytes of a Q4_K block.
pub const Q4_K_BYTES: usize = 144;
/// Bytes of a Q5_K block.
pub const Q5_K_BYTES: usize = 176;
/// Bytes of a Q6_K block.
pub const Q6_K_BYTES: usize = 210;
/// Sub-blocks of 32 weights per K-quant block (the packed layout's blocks).
pub const SUB_BLOCKS: usize = QK_K / BLOCK;

/// One K-quant block taken apart into the packed layout's pieces.
pub(crate) struct KBlock {
    /// The block's scale.
    pub d: f16,
    /// Q4_K's scale of the minima (zero for Q6_K).
    pub dmin: f16,
    /// Per sub-block of 32: Q4_K's nibbles (`0..=15`), Q5_K's 5-bit codes, or Q6_K's `q - 32`
    /// as i8 bits.
    pub codes: [[u8; BLOCK]; SUB_BLOCKS],
    /// Per sub-block of 32, the multipliers of `d` for its two halves of 16 (Q4_K's two are the
    /// sub-block's one scale).
    pub scales: [[i8; 2]; SUB_BLOCKS],
    /// Per sub-block, the multiplier of `dmin` (Q4_K; zero for Q6_K).
    pub mins: [i8; SUB_BLOCKS],
}

/// Q4_K sub-block `j`'s 6-bit (scale, minimum), as `get_scale_min_k4` unpacks them.
fn q4_k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// Takes a Q4_K block (`Q4_K_BYTES` bytes) or a Q5_K block (`Q5_K_BYTES`, with `qh` before the
/// nibbles) apart.
pub(crate) fn split_q45_k(block: &[u8]) -> KBlock {
    let five = block.len() == Q5_K_BYTES;
    let scales = &block[4..16];
    let (qh, qs) = if five { (&block[16..48], &block[48..]) } else { (&[][..], &block[16..]) };
    let mut kb = KBlock {
        d: f16::from_le_bytes([block[0], block[1]]),
        dmin: f16::from_le_bytes([block[2], block[3]]),
        codes: [[0; BLOCK]; SUB_BLOCKS],
        scales: [[0; 2]; SUB_BLOCKS],
        mins: [0; SUB_BLOCKS],
    };
    for j in 0..SUB_BLOCKS {
        let (sc, m) = q4_k_scale_min(scales, j);
        // 6-bit values: they fit an i8.
        kb.scales[j] = [sc as i8; 2];
        kb.mins[j] = m as i8;
        let (chunk, shift) = (j / 2, 4 * (j % 2));
        for (l, code) in kb.codes[j].iter_mut().enumerate() {
            let high = if five { ((qh[l] >> j) & 1) << 4 } else { 0 };
            *code = ((qs[32 * chunk + l] >> shift) & 0x0f) | high;
        }
    }
    kb
}

/// Takes a Q6_K block (`Q6_K_BYTES` bytes) apart.
pub(crate) fn split_q6_k(block: &[u8]) -> KBlock {
    let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
    let mut kb = KBlock {
        d: f16::from_le_bytes([block[208], block[209]]),
        dmin: f16::ZERO,
        codes: [[0; BLOCK]; SUB_BLOCKS],
        scales: [[0; 2]; SUB_BLOCKS],
        mins: [0; SUB_BLOCKS],
    };
    for i in 0..QK_K {
        // Each half of 128 weights: four quadrants of 32, from the low and high nibbles of two
        // runs of 32 `ql` bytes and the four 2-bit fields of 32 `qh` bytes.
        let (half, quadrant, l) = (i / 128, (i % 128) / 32, i % 32);
        let low = ql[64 * half + l + 32 * (quadrant % 2)] >> (4 * (quadrant / 2)) & 0x0f;
        let high = (qh[32 * half + l] >> (2 * quadrant)) & 3;
        kb.codes[i / BLOCK][i % BLOCK] = ((low | high << 4) as i8 - 32) as u8;
    }
    for (j, pair) in kb.scales.iter_mut().enumerate() {
        *pair = [scales[2 * j] as i8, scales[2 * j + 1] as i8];
    }
    kb
}

/// Decodes a row of Q4_K or Q5_K blocks (`format`) into `out`, in the reference's order of
/// operations: `(d * sc) * q - dmin * m`, each step rounded to f32.
pub fn dequantize_q45_k(format: crate::quant::QuantFormat, row: &[u8], out: &mut [f32]) {
    for (block, chunk) in row.chunks_exact(format.block_bytes()).zip(out.chunks_exact_mut(QK_K)) {
        let kb = split_q45_k(block);
        let (d, dmin) = (kb.d.to_f32(), kb.dmin.to_f32());
        for (j, sub) in chunk.chunks_exact_mut(BLOCK).enumerate() {
            let (scale, min) = (d * kb.scales[j][0] as f32, dmin * kb.mins[j] as f32);
            for (o, &q) in sub.iter_mut().zip(&kb.codes[j]) {
                *o = scale * q as f32 - min;
            }
        }
    }
}

/// Decodes a row of Q6_K blocks into `out`: `(d * scale) * (q - 32)`, each step rounded to f32.
pub fn dequantize_q6_k(row: &[u8], out: &mut [f32]) {
    for (block, chunk) in row.chunks_exact(Q6_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let kb = split_q6_k(block);
        let d = kb.d.to_f32();
        for (i, o) in chunk.iter_mut().enumerate() {
            let scale = d * kb.scales[i / BLOCK][(i % BLOCK) / (BLOCK / 2)] as f32;
            *o = scale * kb.codes[i / BLOCK][i % BLOCK] as i8 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantFormat;

    /// A straight transcription of llama.cpp's `dequantize_row_q6_K` loop (its index arithmetic,
    /// not the per-weight formula above), to check the unpacking two ways.
    fn q6_k_as_llama_cpp(block: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([block[208], block[209]]).to_f32();
        let mut y = vec![0f32; QK_K];
        for n in 0..2 {
            let (ql, qh, sc) = (&block[64 * n..], &block[128 + 32 * n..], &block[192 + 8 * n..]);
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                let s = |i: usize| d * sc[i] as i8 as f32;
                y[128 * n + l] = s(is) * q1 as f32;
                y[128 * n + l + 32] = s(is + 2) * q2 as f32;
                y[128 * n + l + 64] = s(is + 4) * q3 as f32;
                y[128 * n + l + 96] = s(is + 6) * q4 as f32;
            }
        }
        y
    }

    /// `dequantize_row_q4_K` and `dequantize_row_q5_K` (with `qh`), transcribed the same way.
    fn q45_k_as_llama_cpp(block: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
        let five = block.len() == Q5_K_BYTES;
        let (qh, ql) = if five { (&block[16..48], &block[48..]) } else { (&[0u8; 32][..], &block[16..]) };
        let (mut u1, mut u2) = (1u8, 2u8);
        let mut y = Vec::with_capacity(QK_K);
        for (c, q) in ql.chunks_exact(32).enumerate() {
            let (sc1, m1) = q4_k_scale_min(&block[4..16], 2 * c);
            let (sc2, m2) = q4_k_scale_min(&block[4..16], 2 * c + 1);
            let (d1, d2, m1, m2) = (d * sc1 as f32, d * sc2 as f32, dmin * m1 as f32, dmin * m2 as f32);
            let bit = |l: usize, u: u8| if qh[l] & u != 0 { 16.0 } else { 0.0 };
            y.extend(q.iter().enumerate().map(|(l, &b)| d1 * ((b & 0xf) as f32 + bit(l, u1)) - m1));
            y.extend(q.iter().enumerate().map(|(l, &b)| d2 * ((b >> 4) as f32 + bit(l, u2)) - m2));
            (u1, u2) = (u1 << 2, u2 << 2);
        }
        y
    }

    fn random_block(len: usize, seed: u64, scale_at: &[usize]) -> Vec<u8> {
        let mut z = seed;
        let mut b: Vec<u8> = (0..len)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (z >> 56) as u8
            })
            .collect();
        for (i, &at) in scale_at.iter().enumerate() {
            b[at..at + 2].copy_from_slice(&f16::from_f32(0.01 * (i + 1) as f32).to_le_bytes());
        }
        b
    }

    #[test]
    fn unpacking_matches_llama_cpps_loops() {
        for seed in 0..20 {
            let block = random_block(Q6_K_BYTES, seed, &[208]);
            let mut got = vec![0f32; QK_K];
            dequantize_q6_k(&block, &mut got);
            assert_eq!(got, q6_k_as_llama_cpp(&block), "Q6_K, seed {seed}");
            for (format, bytes) in [(QuantFormat::Q4_K, Q4_K_BYTES), (QuantFormat::Q5_K, Q5_K_BYTES)] {
                let block = random_block(bytes, seed, &[0, 2]);
                dequantize_q45_k(format, &block, &mut got);
                assert_eq!(got, q45_k_as_llama_cpp(&block), "{format:?}, seed {seed}");
            }
        }
    }
}

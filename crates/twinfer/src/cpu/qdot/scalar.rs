//! The portable kernel: the definition the vector kernels reproduce (same integer sums, same
//! two FMAs per block).

use half::f16;

use super::{QuantizedRows, TileRef};
use crate::quant::{BLOCK, TILE};

pub(super) fn tile_rows(t: &TileRef<'_>, a: &QuantizedRows, r0: usize, rows: usize, out: &mut [[f32; TILE]]) {
    let bb = t.block_bytes();
    for (r, out) in out.iter_mut().enumerate().take(rows) {
        let row = r0 + r;
        out.fill(0.0);
        for blk in 0..t.blocks {
            let codes = &t.codes[blk * bb..(blk + 1) * bb];
            let xq = &a.q[row * a.k + blk * BLOCK..][..BLOCK];
            let at = row * t.blocks + blk;
            for (f, acc) in out.iter_mut().enumerate() {
                let mut sum = 0i32;
                for (j, &q) in xq.iter().enumerate() {
                    let c = if t.bits == 8 {
                        codes[(j / 4) * 64 + f * 4 + j % 4] as i8 as i32
                    } else {
                        let byte = codes[((j % 16) / 4) * 64 + f * 4 + j % 4];
                        (if j < 16 { byte & 0x0f } else { byte >> 4 }) as i32
                    };
                    sum += c * q as i32;
                }
                sum -= t.zero * a.qsum[at];
                let d = f16::from_bits(t.d[blk * TILE + f]).to_f32();
                *acc = (sum as f32).mul_add(d * a.dx[at], *acc);
                if !t.m.is_empty() {
                    *acc = f16::from_bits(t.m[blk * TILE + f]).to_f32().mul_add(a.sx[at], *acc);
                }
            }
        }
    }
}

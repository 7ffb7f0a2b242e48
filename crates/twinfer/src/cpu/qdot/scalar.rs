//! The portable kernel: the definition the vector kernels reproduce (same integer sums, same
//! float operations per block and half, in the same order).

use super::{QuantizedRows, TileRef};
use crate::quant::BLOCK;

pub(super) fn tile_rows(
    t: &TileRef<'_>,
    a: &QuantizedRows,
    r0: usize,
    rows: usize,
    out: &mut [[f32; crate::quant::TILE]],
) {
    let bb = t.block_bytes();
    for (r, out) in out.iter_mut().enumerate().take(rows) {
        let row = r0 + r;
        out.fill(0.0);
        for blk in 0..t.blocks {
            let codes = &t.codes[blk * bb..(blk + 1) * bb];
            let xq = &a.q[row * a.k + blk * BLOCK..][..BLOCK];
            let at = row * t.blocks + blk;
            for (f, acc) in out.iter_mut().enumerate() {
                for h in 0..t.halves {
                    let span = BLOCK / t.halves;
                    let mut sum = 0i32;
                    for (j, &q) in xq.iter().enumerate().skip(h * span).take(span) {
                        let c = if t.bits == 8 {
                            codes[(j / 4) * 64 + f * 4 + j % 4] as i8 as i32
                        } else {
                            let byte = codes[((j % 16) / 4) * 64 + f * 4 + j % 4];
                            (if j < 16 { byte & 0x0f } else { byte >> 4 }) as i32
                        };
                        sum += c * q as i32;
                    }
                    // SAFETY: `at` is inside the rows (`check`).
                    sum -= t.zero * unsafe { a.half_sum(at, h, t.halves) };
                    *acc = (sum as f32).mul_add(t.scale(blk, h, f) * a.dx[at], *acc);
                }
                if let Some(m) = t.minimum(blk, f) {
                    *acc = m.mul_add(a.sx[at], *acc);
                }
            }
        }
    }
}

//! The element-wise and per-row operations around the matrix products: norms, RoPE, activations.
//! They are plain loops the compiler vectorises; row statistics accumulate in f64 so that long
//! rows lose nothing. Over a prompt chunk's rows they run on the engine's threads: done on one,
//! they left the other threads waiting for a tenth of a prompt's time. Each row's arithmetic is
//! the same however the rows are split.

use crate::cpu::parallel::for_each_chunk_mut;

use crate::model::config::RopeScaling;

/// Below this many elements an operation runs on the calling thread: a parallel region costs a
/// few microseconds.
const PARALLEL_FROM: usize = 1 << 15;

/// Runs the row operation `f(first_row, rows)` over `x` (rows of `width`), in parallel chunks of
/// rows when `x` is large.
fn by_rows(x: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if x.len() < PARALLEL_FROM || width == 0 {
        return f(0, x);
    }
    let rows_per_chunk = (PARALLEL_FROM / 4 / width).max(1);
    for_each_chunk_mut(x, rows_per_chunk * width, |i, rows| f(i * rows_per_chunk, rows));
}

/// `x[r] = x[r] / rms(x[r]) * weight`, for every row of width `weight.len()`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    by_rows(x, weight.len(), |_, rows| rms_norm_rows(rows, weight, eps));
}

fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / row.len() as f64;
        let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for (v, &g) in row.iter_mut().zip(weight) {
            *v = *v * inv * g;
        }
    }
}

/// `out[r] = rms_norm(x[r])`, leaving `x` (the residual stream) as it is.
pub fn rms_norm_into(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "rms_norm_into: input and output sizes");
    let w = weight.len();
    by_rows(out, w, |r0, rows| {
        rows.copy_from_slice(&x[r0 * w..][..rows.len()]);
        rms_norm_rows(rows, weight, eps);
    });
}

/// `x[r] = (x[r] - mean) / sqrt(var + eps) * gamma + beta`.
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    by_rows(x, gamma.len(), |_, rows| layer_norm_rows(rows, gamma, beta, eps));
}

fn layer_norm_rows(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(gamma.len()) {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = ((*v as f64 - mean) * inv) as f32 * g + b;
        }
    }
}

/// `gate = silu(gate) * up`, SwiGLU's gating, in vector code (`cpu::math::SiluMul`).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    crate::cpu::SimdLevel::detect().dispatch(crate::cpu::math::SiluMul(gate, up));
}

/// SwiGLU over fused projection rows: `out[r] = silu(gate_up[r][..inter]) * gate_up[r][inter..]`,
/// `gate_up` being `[rows, 2 * inter]` and `out` `[rows, inter]`.
pub fn silu_mul_rows(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    assert_eq!(gate_up.len(), 2 * out.len(), "silu_mul_rows: [rows, 2 * inter] into [rows, inter]");
    by_rows(out, inter, |r0, rows| {
        for (r, a) in rows.chunks_exact_mut(inter).enumerate() {
            let row = &gate_up[(r0 + r) * 2 * inter..][..2 * inter];
            a.copy_from_slice(&row[..inter]);
            silu_mul(a, &row[inter..]);
        }
    });
}

/// The exact (erf) GELU that BERT uses, in vector code (`cpu::math::gelu_f32s`: libm's scalar
/// erff was a seventh of an embedding's time).
pub fn gelu(x: &mut [f32]) {
    let level = crate::cpu::SimdLevel::detect();
    by_rows(x, 1024, |_, part| level.dispatch(crate::cpu::math::GeluInPlace(part)));
}

/// `x += y`, element by element.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_assign: operand sizes");
    // Any width splits an element-wise sum; 1024 keeps the chunks' starts simple to find.
    by_rows(x, 1024, |r0, part| {
        for (a, &b) in part.iter_mut().zip(&y[r0 * 1024..]) {
            *a += b;
        }
    });
}

/// Rotary position embeddings in the Hugging Face layout (`rotate_half`: dimension `i` pairs with
/// `i + head_dim / 2`), with the frequency scaling of the model's config.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let f = theta.powf(-((2 * i) as f64) / head_dim as f64);
                match scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let low_wavelen = original_max_position_embeddings / low_freq_factor;
                        let high_wavelen = original_max_position_embeddings / high_freq_factor;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .collect();
        Self { inv_freq }
    }

    /// (cos, sin) of every frequency at positions `0..positions`, `[positions, head_dim / 2, 2]`,
    /// computed in f64 as [`Rope::apply`] does (a GPU uploads it once and grows it).
    pub fn cos_sin_table(&self, positions: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(positions * self.inv_freq.len() * 2);
        for pos in 0..positions {
            for &f in &self.inv_freq {
                let (s, c) = (pos as f64 * f).sin_cos();
                out.extend([c as f32, s as f32]);
            }
        }
        out
    }

    /// (cos, sin) of every frequency at each of `positions`, `[tokens, head_dim / 2]`, in f64 as
    /// [`Rope::cos_sin_table`]: computed once per step and shared by every layer's q and k.
    pub fn angles(&self, positions: &[usize]) -> Vec<(f32, f32)> {
        let mut out = Vec::with_capacity(positions.len() * self.inv_freq.len());
        for &pos in positions {
            out.extend(self.inv_freq.iter().map(|&f| {
                let (s, c) = (pos as f64 * f).sin_cos();
                (c as f32, s as f32)
            }));
        }
        out
    }

    /// Rotates every head of `x` (`[tokens, heads, head_dim]`) by its token's row of `angles`
    /// (from [`Rope::angles`]).
    pub fn apply(&self, x: &mut [f32], heads: usize, angles: &[(f32, f32)]) {
        let half = self.inv_freq.len();
        let head_dim = 2 * half;
        for (t, cos_sin) in angles.chunks_exact(half).enumerate() {
            for h in 0..heads {
                let v = &mut x[(t * heads + h) * head_dim..][..head_dim];
                let (lo, hi) = v.split_at_mut(half);
                for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos_sin) {
                    let (x0, x1) = (*a, *b);
                    *a = x0 * c - x1 * s;
                    *b = x1 * c + x0 * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norms() {
        let rope = Rope::new(8, 10_000.0, RopeScaling::None);
        let orig: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let mut x = orig.clone();
        rope.apply(&mut x, 2, &rope.angles(&[0]));
        assert_eq!(x, orig);
        rope.apply(&mut x, 1, &rope.angles(&[5, 9]));
        for t in 0..2 {
            let n0: f32 = orig[t * 8..][..8].iter().map(|v| v * v).sum();
            let n1: f32 = x[t * 8..][..8].iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3 * n0, "{n0} {n1}");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = Rope::new(64, 500_000.0, RopeScaling::None);
        let scaled = Rope::new(
            64,
            500_000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        );
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        assert!((plain.inv_freq[31] / 8.0 - scaled.inv_freq[31]).abs() < 1e-18);
    }

    #[test]
    fn norms_and_gelu_known_values() {
        let mut x = vec![3.0, 4.0];
        rms_norm(&mut x, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
        let mut y = vec![1.0, 3.0];
        layer_norm(&mut y, &[1.0, 1.0], &[0.5, 0.5], 0.0);
        assert!((y[0] + 0.5).abs() < 1e-6 && (y[1] - 1.5).abs() < 1e-6);
        let mut g = vec![1.0f32];
        gelu(&mut g);
        assert!((g[0] - 0.841_344_7).abs() < 1e-6);
    }
}

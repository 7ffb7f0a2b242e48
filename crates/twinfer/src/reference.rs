//! The oracle: a deliberately naive f64 implementation of every attention operation.
//!
//! It materialises each score row, takes the max, exponentiates and normalises, with no tiling and
//! no online softmax, so that it shares no algorithmic idea with the kernels it checks. It shares
//! only the validation and the variant definitions in [`crate::attention::AttentionParams`].

use crate::attention::problem::Problem;
use crate::attention::{AttentionParams, DecodeInput, PrefillInput};
use crate::error::{Result, check_len};

/// f64 attention results: `o` is `[rows, num_qo_heads, head_dim]`, `lse` (natural log) `[rows, num_qo_heads]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefOutput {
    /// Outputs `[rows, num_qo_heads, head_dim]`.
    pub o: Vec<f64>,
    /// Log-sum-exp of each row's scores (natural log), `[rows, num_qo_heads]`.
    pub lse: Vec<f64>,
    /// Per row `[rows, num_qo_heads]`: the largest `scale * sum_c |q_c k_c| + |alibi bias|` over
    /// visible keys. An f32 kernel's score error is proportional to it (cancellation in the dot
    /// product), so tolerances on large logits scale with it. Zero where no scores are formed.
    pub score_abs: Vec<f64>,
    /// Per row: the largest `|v|` over visible keys, which turns a score error into an output error.
    pub v_abs: Vec<f64>,
}

/// Reference batch prefill (ragged or paged KV).
pub fn prefill(params: &AttentionParams, input: &PrefillInput<'_>) -> Result<RefOutput> {
    Ok(attend(&Problem::prefill(params, input)?))
}

/// Reference batch decode over a paged KV cache.
pub fn decode(params: &AttentionParams, input: &DecodeInput<'_>) -> Result<RefOutput> {
    Ok(attend(&Problem::decode(params, input)?))
}

fn attend(p: &Problem<'_>) -> RefOutput {
    let prm = p.params;
    let (h_qo, d) = (prm.num_qo_heads, prm.head_dim);
    let group = prm.group_size();
    let scale = prm.resolved_sm_scale() as f64;
    let mut o = vec![0.0f64; p.total_q * h_qo * d];
    let mut lse = vec![f64::NEG_INFINITY; p.total_q * h_qo];
    let mut score_abs = vec![0.0f64; p.total_q * h_qo];
    let mut v_abs = vec![0.0f64; p.total_q * h_qo];
    let (k, v) = (p.kv.k(), p.kv.v());
    for b in 0..p.batch {
        let (q0, q1) = p.qo.range(b);
        let qo_len = q1 - q0;
        let kv_len = p.kv.kv_len(b);
        for i in 0..qo_len {
            let pos = AttentionParams::query_position(i, qo_len, kv_len);
            for h in 0..h_qo {
                let kvh = h / group;
                let q_off = ((q0 + i) * h_qo + h) * d;
                // The full score row; masked keys stay None.
                let row = (q0 + i) * h_qo + h;
                let scores: Vec<Option<f64>> = (0..kv_len)
                    .map(|j| {
                        let jj = j as i64;
                        let causal_ok = !prm.causal || jj <= pos;
                        let window_ok =
                            prm.window_left.is_none_or(|w| jj.saturating_add(AttentionParams::window_i64(w)) >= pos);
                        if !(causal_ok && window_ok) {
                            return None;
                        }
                        let k_off = p.kv.row_offset(b, j, kvh);
                        let dot: f64 = (0..d).map(|c| p.q.get_f64(q_off + c) * k.get_f64(k_off + c)).sum();
                        let dot_abs: f64 = (0..d).map(|c| (p.q.get_f64(q_off + c) * k.get_f64(k_off + c)).abs()).sum();
                        let bias = prm.alibi_slope(h) as f64 * (jj - pos) as f64;
                        score_abs[row] = score_abs[row].max(dot_abs * scale.abs() + bias.abs());
                        let mut s = dot * scale;
                        if let Some(cap) = prm.logits_soft_cap {
                            let cap = cap as f64;
                            s = cap * (s / cap).tanh();
                        }
                        s += bias;
                        Some(s)
                    })
                    .collect();
                let max = scores.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue; // no visible key: o = 0, lse = -inf
                }
                let weights: Vec<f64> = scores.iter().map(|s| s.map_or(0.0, |s| (s - max).exp())).collect();
                let denom: f64 = weights.iter().sum();
                let out = &mut o[q_off..q_off + d];
                for (j, w) in weights.iter().enumerate() {
                    if *w == 0.0 {
                        continue;
                    }
                    let v_off = p.kv.row_offset(b, j, kvh);
                    for c in 0..d {
                        let x = v.get_f64(v_off + c);
                        out[c] += w * x;
                        v_abs[row] = v_abs[row].max(x.abs());
                    }
                }
                out.iter_mut().for_each(|x| *x /= denom);
                lse[row] = max + denom.ln();
            }
        }
    }
    RefOutput { o, lse, score_abs, v_abs }
}

/// Reference `merge_state`: combines two partial attention states over disjoint key sets.
/// `o_*` are `[rows, heads, head_dim]`, `lse_*` `[rows, heads]` (natural log).
pub fn merge_state(o_a: &[f64], lse_a: &[f64], o_b: &[f64], lse_b: &[f64]) -> Result<RefOutput> {
    check_len("lse_b", lse_a.len(), lse_b.len())?;
    check_len("o_b", o_a.len(), o_b.len())?;
    let d = if lse_a.is_empty() { 0 } else { o_a.len() / lse_a.len() };
    check_len("o_a", lse_a.len() * d, o_a.len())?;
    let mut o = vec![0.0; o_a.len()];
    let mut lse = vec![f64::NEG_INFINITY; lse_a.len()];
    for r in 0..lse_a.len() {
        let (la, lb) = (lse_a[r], lse_b[r]);
        let m = la.max(lb);
        if m == f64::NEG_INFINITY {
            continue;
        }
        let (wa, wb) = ((la - m).exp(), (lb - m).exp());
        let sum = wa + wb;
        for c in 0..d {
            o[r * d + c] = (wa * o_a[r * d + c] + wb * o_b[r * d + c]) / sum;
        }
        lse[r] = m + sum.ln();
    }
    let rows = lse.len();
    Ok(RefOutput { o, lse, score_abs: vec![0.0; rows], v_abs: vec![0.0; rows] })
}

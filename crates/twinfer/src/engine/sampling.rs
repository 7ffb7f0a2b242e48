//! Turning logits into the next token: repetition penalty, temperature, top-k, top-p, with a
//! seeded generator per request so that a request's output does not depend on its neighbours.

/// How the next token is chosen. The defaults are greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 turns it off.
    pub top_p: f32,
    /// Divides positive logits (multiplies negative ones) of tokens already seen; 1 turns it off.
    pub repetition_penalty: f32,
    /// Seed of the request's generator: the same seed and inputs give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Checks the ranges: `temperature` finite and `>= 0`, `top_p` in `(0, 1]`, `repetition_penalty` finite and `> 0`.
    /// Errors with [`InvalidParameter`](crate::TwinferError::InvalidParameter) otherwise.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: &str| Err(crate::TwinferError::InvalidParameter(m.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be a finite number > 0");
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast and plenty for sampling; one per request.
#[derive(Debug, Clone)]
pub struct Sampler {
    state: u64,
}

impl Sampler {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks a token from `logits` (changed in place by the penalty); `seen` are the tokens the
    /// penalty applies to (the prompt and what was generated).
    pub fn sample(&mut self, logits: &mut [f32], p: &SamplingParams, seen: &[u32]) -> u32 {
        if p.repetition_penalty != 1.0 {
            let mut done = vec![false; logits.len()];
            for &t in seen {
                let t = t as usize;
                if t < logits.len() && !done[t] {
                    done[t] = true;
                    let l = &mut logits[t];
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        self.draw(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect(), p)
    }

    /// [`Sampler::sample`] from a row's `k` most likely tokens ([`top_k`], or the device's top-k):
    /// the same token as from the whole row when `k >= p.top_k > 0` and no repetition penalty
    /// applies (the draw only ever sees the `top_k` most likely), or for greedy rows. Unlike the
    /// whole row, a NaN logit is never a candidate (as `argmax` never picks it).
    pub fn sample_candidates(&mut self, candidates: &[(u32, f32)], p: &SamplingParams) -> u32 {
        if p.temperature == 0.0 {
            // The candidates' argmax: the largest logit, the lowest id on ties, NaN never wins.
            let best = candidates.iter().copied().reduce(|b, c| {
                let wins = c.1 > b.1 || (c.1 == b.1 && c.0 < b.0) || (b.1.is_nan() && !c.1.is_nan());
                if wins { c } else { b }
            });
            return best.map_or(0, |(id, _)| id);
        }
        self.draw(candidates.to_vec(), p)
    }

    /// Temperature, top-k, top-p and the draw over (token, logit) candidates.
    fn draw(&mut self, candidates: Vec<(u32, f32)>, p: &SamplingParams) -> u32 {
        let scaled: Vec<(u32, f32)> = candidates.into_iter().map(|(i, l)| (i, l / p.temperature)).collect();
        let cand = match (p.top_k, p.top_p < 1.0) {
            (1.., _) => most_likely(scaled, p.top_k),
            (0, true) => nucleus_first(scaled, p.top_p),
            // Every token stays a candidate: the draw needs no order (it walks them by id).
            (0, false) => scaled,
        };
        // The largest by total order: the first candidate when sorted (a NaN, if any, as before).
        let max = cand.iter().map(|c| c.1).max_by(|a, b| a.total_cmp(b)).unwrap_or(0.0);
        let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|&q| {
                acc += q;
                acc >= p.top_p as f64
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let u = self.next_f64();
        let mut acc = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// The candidates in order, most likely first and ties by token id (a total order, so the result
/// is deterministic), cut to the `top_k` first when `top_k > 0`. Those are picked in linear time
/// before only they are sorted: sorting a whole vocabulary (49K-152K tokens) per sampled token
/// took milliseconds, about a decode step's time.
fn most_likely(mut cand: Vec<(u32, f32)>, top_k: usize) -> Vec<(u32, f32)> {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if top_k > 0 && top_k < cand.len() {
        cand.select_nth_unstable_by(top_k - 1, order);
        cand.truncate(top_k);
    }
    cand.sort_unstable_by(order);
    cand
}

/// The candidates reordered so that a prefix, sorted as [`most_likely`] sorts, holds at least
/// `top_p` of the probability (with a margin for the rounding of the draw's own sums), the rest
/// after it in any order: the top-p cut then falls inside the sorted prefix, as it would after
/// sorting everything. Prefixes of 64, 512, 4096, ... are tried; a flat distribution ends in a
/// whole sort.
fn nucleus_first(mut cand: Vec<(u32, f32)>, top_p: f32) -> Vec<(u32, f32)> {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let max = cand.iter().map(|c| c.1).max_by(|a, b| a.total_cmp(b)).unwrap_or(0.0);
    let weight = |l: f32| ((l - max) as f64).exp();
    let total: f64 = cand.iter().map(|&(_, l)| weight(l)).sum();
    let enough = (top_p as f64 + 1e-9) * total;
    let mut m = 64;
    while m < cand.len() {
        cand.select_nth_unstable_by(m - 1, order);
        cand[..m].sort_unstable_by(order);
        // NaN weights never compare as enough: they end in the whole sort, as before.
        if cand[..m].iter().map(|&(_, l)| weight(l)).sum::<f64>() >= enough {
            return cand;
        }
        m *= 8;
    }
    cand.sort_unstable_by(order);
    cand
}

/// The `k` largest logits of a row with their ids (the host's reference for the device's
/// `topk_rows`): larger first, the lower id on ties, NaN below every number.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    all.sort_unstable_by(|a, b| order_key(b.1).cmp(&order_key(a.1)).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// A u32 that orders like the f32 (total order) with every NaN at the bottom.
fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    match () {
        _ if v.is_nan() => 0,
        _ if b & 0x8000_0000 != 0 => !b,
        _ => b | 0x8000_0000,
    }
}

/// The index of the largest logit, the lowest index on ties; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_penalty_applies() {
        let mut s = Sampler::new(1);
        let p = SamplingParams::default();
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], &p, &[]), 1);
        let rep = SamplingParams { repetition_penalty: 2.0, ..p };
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], &rep, &[1]), 2);
    }

    /// The draw as it was before top-p stopped sorting the whole row: sort, cut, normalise.
    fn sorted_draw(u: f64, cand: &[(u32, f32)], p: &SamplingParams) -> u32 {
        let mut cand: Vec<(u32, f32)> = cand.iter().map(|&(i, l)| (i, l / p.temperature)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut acc = 0.0;
        let keep = probs.iter().position(|&q| {
            acc += q;
            acc >= p.top_p as f64
        });
        probs.truncate(keep.map_or(probs.len(), |i| i + 1));
        let total: f64 = probs.iter().sum();
        let mut acc = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            acc += q / total;
            if u < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }

    /// Top-p without top-k draws the tokens that sorting the whole row drew, on peaked rows (the
    /// nucleus inside the first 64) and flat ones (a whole sort), ties everywhere.
    #[test]
    fn top_p_draws_as_sorting_the_whole_row_did() {
        for (case, peak) in [40.0f32, 8.0, 0.5, 0.0].into_iter().enumerate() {
            let n = 3000u32;
            let row: Vec<(u32, f32)> = (0..n)
                .map(|i| (i, ((i * 7919 % 97) as f32 * 0.05).round() - if i % 613 == 5 { -peak } else { 0.0 }))
                .collect();
            for top_p in [0.5f32, 0.9, 0.99] {
                let p = SamplingParams { temperature: 0.8, top_p, seed: 0, ..Default::default() };
                for seed in 0..50 {
                    let (mut a, mut b) = (Sampler::new(seed), Sampler::new(seed));
                    let logits: Vec<f32> = row.iter().map(|c| c.1).collect();
                    let got = a.sample(&mut logits.clone(), &p, &[]);
                    let want = sorted_draw(b.next_f64(), &row, &p);
                    assert_eq!(got, want, "case {case}, top_p {top_p}, seed {seed}");
                }
            }
        }
    }

    /// With every token a candidate (no top-k, no top-p) the draw walks them by id: each token
    /// comes up at its softmax probability (20000 draws, within 5 standard deviations).
    #[test]
    fn temperature_alone_draws_at_the_softmax_probabilities() {
        let logits = [0.3f32, -1.0, 2.0, 0.0, 1.1];
        let p = SamplingParams { temperature: 0.7, ..Default::default() };
        let weights: Vec<f64> = logits.iter().map(|&l| ((l / 0.7) as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut counts = [0usize; 5];
        let mut s = Sampler::new(11);
        let draws = 20_000;
        for _ in 0..draws {
            counts[s.sample(&mut logits.clone(), &p, &[]) as usize] += 1;
        }
        for (t, &c) in counts.iter().enumerate() {
            let q = weights[t] / total;
            let sd = (draws as f64 * q * (1.0 - q)).sqrt();
            assert!(
                (c as f64 - draws as f64 * q).abs() < 5.0 * sd,
                "token {t}: {c} draws, expected {:.0}",
                draws as f64 * q
            );
        }
    }

    #[test]
    fn most_likely_equals_sorting_everything_then_cutting() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..200 {
            let n = 1 + (next() % 300) as usize;
            // Few distinct values, so ties (broken by id) are everywhere; some NaN and infinities.
            let cand: Vec<(u32, f32)> = (0..n as u32)
                .map(|i| {
                    let l = match next() % 20 {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => f32::NEG_INFINITY,
                        r => (r % 5) as f32 * 0.5 - 1.0,
                    };
                    (i, l)
                })
                .collect();
            let top_k = (next() % (n as u64 + 3)) as usize;
            let mut want = cand.clone();
            want.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if top_k > 0 {
                want.truncate(top_k);
            }
            let got = most_likely(cand, top_k);
            let bits = |v: &[(u32, f32)]| v.iter().map(|&(i, l)| (i, l.to_bits())).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "case {case}: n {n}, top_k {top_k}");
        }
    }

    #[test]
    fn top_k_1_is_greedy_and_seeds_repeat() {
        let p = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        assert_eq!(Sampler::new(7).sample(&mut [0.0, 3.0, 1.0], &p, &[]), 1);
        let p = SamplingParams { temperature: 1.0, seed: 3, ..Default::default() };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(seed);
            (0..20).map(|_| s.sample(&mut logits.clone(), &p, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn frequencies_follow_the_distribution_within_top_p() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1; top_p 0.75 keeps the first two.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let p = SamplingParams { temperature: 1.0, top_p: 0.75, ..Default::default() };
        let mut s = Sampler::new(11);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[s.sample(&mut logits.clone(), &p, &[]) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let share = counts[0] as f64 / 20_000.0;
        assert!((share - 0.625).abs() < 0.02, "{counts:?}");
    }

    /// Sampling from a row's top-k candidates picks the token sampling from the whole row picks,
    /// for every temperature, top-k (up to the candidates' k), top-p and seed; greedy rows too.
    #[test]
    fn candidates_sample_as_the_whole_row() {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for case in 0..3000 {
            let width = 1 + (next() % 700) as usize;
            // Quarter steps from a small range: ties everywhere, as in real logits' top ranks.
            let row: Vec<f32> = (0..width).map(|_| (next() % 64) as f32 * 0.25 - 8.0).collect();
            let k = 1 + (next() as usize % width.min(130));
            let p = SamplingParams {
                temperature: [0.0, 0.7, 1.0, 1.3][case % 4],
                top_k: 1 + next() as usize % k,
                top_p: [1.0, 0.9, 0.5][case % 3],
                seed: case as u64,
                ..Default::default()
            };
            let whole = Sampler::new(p.seed).sample(&mut row.clone(), &p, &[]);
            let cand = top_k(&row, k);
            assert_eq!(cand.len(), k);
            let picked = Sampler::new(p.seed).sample_candidates(&cand, &p);
            assert_eq!(picked, whole, "case {case}: width {width}, k {k}, {p:?}");
        }
    }

    #[test]
    fn top_k_orders_by_value_then_id_with_nan_last() {
        let row = [1.0, f32::NAN, 3.0, -0.0, 3.0, 0.0, f32::NEG_INFINITY, f32::INFINITY];
        let ids: Vec<u32> = top_k(&row, 8).iter().map(|c| c.0).collect();
        assert_eq!(ids, [7, 2, 4, 0, 5, 3, 6, 1]);
        assert_eq!(top_k(&row, 2).iter().map(|c| c.0).collect::<Vec<_>>(), [7, 2]);
    }
}

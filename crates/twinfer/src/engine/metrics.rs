//! The serving metrics people deploy by. Per request: TTFT from submission, TPOT over tokens
//! 2..n, every token's timestamp and the inter-token latency distribution. Per run: TPS,
//! requests per second and KV pool occupancy. All times in seconds.

use serde_json::{Value, json};

/// Summary of a set of samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Distribution {
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len() as f64;
        let mean = s.iter().sum::<f64>() / n;
        let var = s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Self {
            count: s.len(),
            mean,
            std: var.sqrt(),
            min: s[0],
            p50: percentile(&s, 0.50),
            p90: percentile(&s, 0.90),
            p99: percentile(&s, 0.99),
            max: s[s.len() - 1],
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"count": self.count, "mean": self.mean, "std": self.std, "min": self.min,
               "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max})
    }
}

/// Linear interpolation between the closest ranks of sorted samples.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// One request's timeline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestMetrics {
    pub prompt_tokens: usize,
    /// Seconds after submission at which each generated token was ready.
    pub token_times: Vec<f64>,
    /// Seconds from submission to the end (last token, stop or cancellation).
    pub e2e: f64,
    /// Times this request was preempted (its KV freed and recomputed) to make room for others.
    pub preemptions: usize,
    /// Prompt tokens whose K/V came from another request's pages (a running one's, or a finished
    /// one's kept by the prefix cache) instead of being computed.
    pub cached_tokens: usize,
}

impl RequestMetrics {
    /// Time to first token, from submission.
    pub fn ttft(&self) -> Option<f64> {
        self.token_times.first().copied()
    }
    /// Time per output token: the mean gap over tokens 2..n.
    pub fn tpot(&self) -> Option<f64> {
        let n = self.token_times.len();
        (n >= 2).then(|| (self.token_times[n - 1] - self.token_times[0]) / (n - 1) as f64)
    }
    /// Inter-token latencies: the gaps between consecutive tokens.
    pub fn itl(&self) -> Vec<f64> {
        self.token_times.windows(2).map(|w| w[1] - w[0]).collect()
    }
    pub fn to_json(&self) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "generated_tokens": self.token_times.len(),
               "ttft": self.ttft(), "tpot": self.tpot(), "e2e": self.e2e,
               "itl": Distribution::of(&self.itl()).to_json(), "preemptions": self.preemptions,
               "cached_tokens": self.cached_tokens, "token_times": self.token_times})
    }
}

/// A whole run: many requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunMetrics {
    pub requests: usize,
    pub generated_tokens: usize,
    pub prompt_tokens: usize,
    pub wall: f64,
    /// Generated tokens per second of wall time.
    pub tps: f64,
    pub requests_per_s: f64,
    pub ttft: Distribution,
    pub tpot: Distribution,
    /// Inter-token latencies of all requests together.
    pub itl: Distribution,
    /// Fraction of KV pages in use, sampled each step.
    pub kv_occupancy: Distribution,
    pub preemptions: usize,
}

impl RunMetrics {
    /// Aggregates finished requests over `wall` seconds.
    pub fn from_requests(requests: &[RequestMetrics], wall: f64, kv_occupancy: &[f64]) -> Self {
        let ttft: Vec<f64> = requests.iter().filter_map(RequestMetrics::ttft).collect();
        let tpot: Vec<f64> = requests.iter().filter_map(RequestMetrics::tpot).collect();
        let itl: Vec<f64> = requests.iter().flat_map(RequestMetrics::itl).collect();
        let generated: usize = requests.iter().map(|r| r.token_times.len()).sum();
        let per_s = |x: f64| if wall > 0.0 { x / wall } else { 0.0 };
        Self {
            requests: requests.len(),
            generated_tokens: generated,
            prompt_tokens: requests.iter().map(|r| r.prompt_tokens).sum(),
            wall,
            tps: per_s(generated as f64),
            requests_per_s: per_s(requests.len() as f64),
            ttft: Distribution::of(&ttft),
            tpot: Distribution::of(&tpot),
            itl: Distribution::of(&itl),
            kv_occupancy: Distribution::of(kv_occupancy),
            preemptions: requests.iter().map(|r| r.preemptions).sum(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"requests": self.requests, "generated_tokens": self.generated_tokens,
               "prompt_tokens": self.prompt_tokens, "wall_s": self.wall, "tps": self.tps,
               "requests_per_s": self.requests_per_s, "ttft": self.ttft.to_json(),
               "tpot": self.tpot.to_json(), "itl": self.itl.to_json(),
               "kv_occupancy": self.kv_occupancy.to_json(), "preemptions": self.preemptions})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metrics_from_a_timeline() {
        let m =
            RequestMetrics { prompt_tokens: 3, token_times: vec![0.5, 0.6, 0.8, 0.9], e2e: 0.9, ..Default::default() };
        assert_eq!(m.ttft(), Some(0.5));
        assert!((m.tpot().unwrap() - 0.4 / 3.0).abs() < 1e-12);
        let itl = Distribution::of(&m.itl());
        assert!((itl.p50 - 0.1).abs() < 1e-12 && (itl.max - 0.2).abs() < 1e-12);
        let run = RunMetrics::from_requests(&[m.clone(), m], 2.0, &[0.5]);
        assert_eq!((run.generated_tokens, run.tps), (8, 4.0));
    }

    #[test]
    fn percentiles_interpolate() {
        let d = Distribution::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((d.min, d.max, d.p50, d.mean), (1.0, 4.0, 2.5, 2.5));
        assert!((d.p90 - 3.7).abs() < 1e-12);
    }
}

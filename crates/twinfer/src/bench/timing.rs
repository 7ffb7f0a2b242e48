//! Repeated timing with medians and spread: single runs on a shared machine mean little.

use std::time::Instant;

/// Median and spread of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median sample (NaN when there are none).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub runs: usize,
}

impl Stats {
    /// Summarizes `xs`; the statistics are NaN when it is empty.
    pub fn from_samples(mut xs: Vec<f64>) -> Self {
        xs.sort_by(|a, b| a.total_cmp(b));
        let n = xs.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Stats {
            median,
            min: xs.first().copied().unwrap_or(f64::NAN),
            max: xs.last().copied().unwrap_or(f64::NAN),
            runs: n,
        }
    }
    /// Applies a monotone decreasing map (seconds -> rate): min and max swap.
    pub fn map(&self, f: impl Fn(f64) -> f64) -> Stats {
        Stats { median: f(self.median), min: f(self.max), max: f(self.min), runs: self.runs }
    }
    /// Half the min-max range relative to the median, in percent.
    pub fn spread_pct(&self) -> f64 {
        (self.max - self.min) / 2.0 / self.median * 100.0
    }
}

/// Runs `f` once to warm up, then `runs` times; returns seconds per run.
pub fn time_runs(runs: usize, mut f: impl FnMut()) -> Stats {
    f();
    let samples = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    Stats::from_samples(samples)
}

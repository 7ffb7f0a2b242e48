//! The step-time model behind TTFT predictions (`twinfer serve`'s overflow decision).

/// A step's time as `fixed + per_token * tokens`, fitted online: `fixed` from decode-only steps
/// (reading the weights dominates them), `per_token` from steps with prompt chunks, after taking
/// `fixed` off. Exponential averages; the first step (cold caches, weight pages faulting in) is
/// left out.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepCost {
    /// Steps observed, the first (not fitted) included.
    pub steps: usize,
    /// Seconds; 0 before the first decode-only step.
    pub fixed: f64,
    /// Seconds per prompt token; 0 before the first step with a prompt chunk.
    pub per_token: f64,
}

impl StepCost {
    pub(super) fn observe(&mut self, tokens: usize, prompt_chunk: bool, seconds: f64) {
        self.steps += 1;
        if self.steps == 1 || seconds <= 0.0 || seconds.is_nan() {
            return;
        }
        let mix = |old: f64, new: f64| if old == 0.0 { new } else { 0.7 * old + 0.3 * new };
        if prompt_chunk {
            let per_token = (seconds - self.fixed).max(0.0) / tokens as f64;
            self.per_token = mix(self.per_token, per_token);
        } else {
            self.fixed = mix(self.fixed, seconds);
        }
    }

    /// Tokens a step can carry within `seconds`, by the fitted model; `None` before both a
    /// decode-only step and a step with a prompt chunk were measured.
    pub fn tokens_within(&self, seconds: f64) -> Option<usize> {
        (self.per_token > 0.0 && self.fixed > 0.0).then(|| ((seconds - self.fixed).max(0.0) / self.per_token) as usize)
    }

    /// Seconds until `tokens` prompt tokens are computed in steps of at most `budget` tokens,
    /// while `decoding` sequences add a token to every step (they go first, so the prompt gets
    /// what is left of the budget); `None` before a step with a prompt chunk was measured.
    pub fn prefill_seconds(&self, tokens: usize, decoding: usize, budget: usize) -> Option<f64> {
        let room = budget.saturating_sub(decoding).max(1);
        let steps = tokens.div_ceil(room);
        (self.per_token > 0.0).then(|| steps as f64 * self.fixed + (tokens + steps * decoding) as f64 * self.per_token)
    }
}

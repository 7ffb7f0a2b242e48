//! A step's forward pass and what becomes of its output: logits sampled on the host, or the
//! tokens (greedy) or candidates (top-k) picked on the device by the resident path.

use super::*;

impl Scheduler {
    /// The forward pass of a plan: the logits of the sequences that finish their pending tokens,
    /// or, on the resident GPU path when every one of them samples greedily, their tokens.
    pub(super) async fn run(&mut self, plan: &[(RequestId, usize)]) -> Result<StepOutput> {
        let chunks: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(id, n)| {
                let s = &self.seqs[&id];
                (s.computed..s.computed + n).map(|i| s.token(i)).collect()
            })
            .collect();
        let step: Vec<StepSeq<'_>> = plan
            .iter()
            .zip(&chunks)
            .map(|(&(id, n), tokens)| {
                let s = &self.seqs[&id];
                let logits = if s.computed + n == s.len() { Logits::Last } else { Logits::None };
                StepSeq { seq: s.cache_seq.expect("planned"), tokens, start: s.computed, logits }
            })
            .collect();
        if let Some(resident) = &self.resident {
            let sampled: Vec<&crate::engine::SamplingParams> = plan
                .iter()
                .zip(&step)
                .filter(|(_, st)| st.logits != Logits::None)
                .map(|(&(id, _), _)| &self.seqs[&id].request.sampling)
                .collect();
            let on_device = self.sample_on_device && sampled.iter().all(|p| p.repetition_penalty == 1.0);
            let greedy = sampled.iter().all(|p| p.temperature == 0.0);
            let top_k = sampled.iter().filter(|p| p.temperature > 0.0).map(|p| p.top_k).max().unwrap_or(0);
            let vocab = self.model.config.vocab_size;
            let top_k_fits = sampled.iter().all(|p| p.temperature == 0.0 || (1..=DEVICE_TOP_K_MAX).contains(&p.top_k));
            let model = &self.model;
            return Ok(match () {
                _ if on_device && greedy => {
                    StepOutput::Tokens(model.forward_resident_greedy_async(resident, &mut self.cache, &step).await?)
                }
                _ if on_device && top_k_fits && top_k <= vocab => {
                    let (candidates, greedy_ids) =
                        model.forward_resident_top_k_async(resident, &mut self.cache, &step, top_k).await?;
                    StepOutput::Candidates { k: top_k, candidates, greedy_ids }
                }
                _ => StepOutput::Logits(model.forward_resident_async(resident, &mut self.cache, &step).await?),
            });
        }
        let engines = Engines { level: self.level, prefill: &self.prefill, decode: &self.decode };
        Ok(StepOutput::Logits(self.model.forward_async(engines, &mut self.cache, &step).await?))
    }

    pub(super) fn measure_prefill(&mut self, plan: &[(RequestId, usize)], seconds: f64) {
        let tokens: usize = plan.iter().map(|&(_, n)| n).sum();
        self.step_cost.observe(tokens, plan.iter().any(|&(_, n)| n > 1), seconds);
    }

    /// Advances every planned sequence and samples those that got logits (or takes the token
    /// the device picked).
    pub(super) fn accept_step(
        &mut self,
        plan: &[(RequestId, usize)],
        output: &StepOutput,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let now = self.now();
        let vocab = self.model.config.vocab_size;
        let mut row = 0;
        for &(id, n) in plan {
            let s = self.seqs.get_mut(&id).expect("planned");
            let want = s.computed + n == s.len();
            s.computed += n;
            if want {
                let token = match output {
                    StepOutput::Logits(logits) => {
                        let mut l = logits[row * vocab..(row + 1) * vocab].to_vec();
                        self.sample(id, &mut l)
                    }
                    StepOutput::Tokens(ids) => ids[row],
                    StepOutput::Candidates { k, candidates, greedy_ids } => {
                        let s = self.seqs.get_mut(&id).expect("planned");
                        if s.request.sampling.temperature == 0.0 {
                            greedy_ids[row]
                        } else {
                            s.sampler.sample_candidates(&candidates[row * k..(row + 1) * k], &s.request.sampling)
                        }
                    }
                };
                row += 1;
                if let Some(reason) = self.accept(id, token, now, events)? {
                    self.finish(id, reason, events)?;
                }
            }
        }
        Ok(())
    }

    /// The next token of `id` from its logits (changed in place by a repetition penalty).
    fn sample(&mut self, id: RequestId, logits: &mut [f32]) -> u32 {
        let s = self.seqs.get_mut(&id).expect("planned");
        let seen: Vec<u32> = if s.request.sampling.repetition_penalty != 1.0 {
            s.prompt.iter().chain(&s.generated).copied().collect()
        } else {
            Vec::new()
        };
        s.sampler.sample(logits, &s.request.sampling, &seen)
    }
}

/// What a step's forward pass hands to sampling, one row per sequence that got logits.
#[derive(Debug)]
pub(super) enum StepOutput {
    Logits(Vec<f32>),
    /// Greedy tokens picked on the device.
    Tokens(Vec<u32>),
    /// Per row, the device's `k` most likely (token, logit) pairs and its greedy token.
    Candidates {
        k: usize,
        candidates: Vec<(u32, f32)>,
        greedy_ids: Vec<u32>,
    },
}

/// The largest `top_k` sampled from device candidates; a larger one reads the logits back.
/// 128 covers the common defaults (40 in llama.cpp and ollama, 50 in transformers) at 1 KiB read
/// back per row.
const DEVICE_TOP_K_MAX: usize = 128;

//! A sampled token's way out: stop conditions, detokenized text, and the tail held back while
//! it may still grow into a stop string.

use super::Scheduler;
use crate::engine::request::{Event, FinishReason, RequestId};
use crate::error::Result;

impl Scheduler {
    /// Appends `token` to `id`; returns why it finished, if it did.
    pub(super) fn accept(
        &mut self,
        id: RequestId,
        token: u32,
        now: f64,
        events: &mut Vec<Event>,
    ) -> Result<Option<FinishReason>> {
        let max_pos = self.model.config.max_position_embeddings;
        let tokenizer = self.tokenizer.clone();
        let s = self.seqs.get_mut(&id).expect("planned");
        s.generated.push(token);
        let t = now - s.submitted;
        s.metrics.token_times.push(t);
        let end = if !s.request.ignore_eos && self.eos.contains(&token) {
            Some(FinishReason::Eos)
        } else if s.request.stop_token_ids.contains(&token) {
            Some(FinishReason::StopToken(token))
        } else {
            None
        };
        if let Some(reason) = end {
            // The end token adds no text, but its event carries what was held back: a partial
            // character, or a tail that could have grown into a stop string.
            if let Some(tokenizer) = &tokenizer
                && let Some(rest) = s.stream.flush(tokenizer)?
            {
                s.text.push_str(&rest);
            }
            let text = s.text[s.shown..].to_string();
            s.shown = s.text.len();
            events.push(Event::Token { request: id, token, text, t });
            return Ok(Some(reason));
        }
        if let Some(tokenizer) = &tokenizer
            && let Some(piece) = s.stream.push(tokenizer, token)?
        {
            s.text.push_str(&piece);
        }
        let mut reason = None;
        for stop in &s.request.stop {
            if let Some(at) = s.text.find(stop.as_str()) {
                s.text.truncate(at);
                reason = Some(FinishReason::StopString(stop.clone()));
                break;
            }
        }
        if reason.is_none() && (s.generated.len() >= s.request.max_tokens || s.len() >= max_pos) {
            reason = Some(FinishReason::Length);
            // The last event carries whatever is left, a dangling partial character included.
            if let Some(tokenizer) = &tokenizer
                && let Some(rest) = s.stream.flush(tokenizer)?
            {
                s.text.push_str(&rest);
            }
        }
        // Hold back a tail that may still grow into a stop string.
        let safe = if reason.is_some() { s.text.len() } else { s.text.len() - held_back(&s.text, &s.request.stop) };
        let text = s.text[s.shown.min(safe)..safe].to_string();
        s.shown = s.shown.max(safe);
        events.push(Event::Token { request: id, token, text, t });
        Ok(reason)
    }
}

/// Bytes at the end of `text` that are a proper prefix of some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for n in (1..stop.len()).rev() {
            if n <= text.len()
                && text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
            {
                hold = hold.max(n);
                break;
            }
        }
    }
    hold
}

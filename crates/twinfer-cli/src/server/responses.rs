//! The OpenAI response bodies: whole answers, stream chunks and usage. Besides OpenAI's fields,
//! each answer carries `metrics`: the server's own TTFT, TPOT and end-to-end time for it (as
//! llama-server's `timings` do), so a client can compare them with what it measured.

use serde_json::{Value, json};

use super::generation::Finished;
use super::metrics::Served;

/// Chat (`chat.completion`) or text (`text_completion`) answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// What every body of one answer repeats.
#[derive(Debug, Clone)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
}

impl Header {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn body(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model,
               "system_fingerprint": null, "choices": choices})
    }

    /// The whole answer.
    pub fn complete(&self, f: &Finished, reason: &str, served: &Served) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": f.text},
                                 "finish_reason": reason, "logprobs": null}),
            Kind::Text => json!({"index": 0, "text": f.text, "finish_reason": reason, "logprobs": null}),
        };
        let mut body = self.body(false, json!([choice]));
        body["usage"] = usage(served);
        body["metrics"] = timings(served);
        body
    }

    /// The chat stream's first chunk: the role, before any token.
    pub fn role_chunk(&self) -> Value {
        self.body(
            true,
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null,
                                "logprobs": null}]),
        )
    }

    pub fn text_chunk(&self, text: &str) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": {"content": text}, "finish_reason": null, "logprobs": null}),
            Kind::Text => json!({"index": 0, "text": text, "finish_reason": null, "logprobs": null}),
        };
        self.body(true, json!([choice]))
    }

    /// The chunk that says why the answer ended.
    pub fn finish_chunk(&self, reason: &str, served: &Served) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": {}, "finish_reason": reason, "logprobs": null}),
            Kind::Text => json!({"index": 0, "text": "", "finish_reason": reason, "logprobs": null}),
        };
        let mut body = self.body(true, json!([choice]));
        body["metrics"] = timings(served);
        body
    }

    /// `stream_options.include_usage`: a last chunk with no choices and the usage.
    pub fn usage_chunk(&self, served: &Served) -> Value {
        let mut body = self.body(true, json!([]));
        body["usage"] = usage(served);
        body
    }
}

fn usage(s: &Served) -> Value {
    json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
           "total_tokens": s.prompt_tokens + s.generated_tokens,
           "prompt_tokens_details": {"cached_tokens": s.cached_tokens}})
}

fn timings(s: &Served) -> Value {
    json!({"ttft_s": s.ttft, "tpot_s": s.tpot, "e2e_s": s.e2e, "preemptions": s.preemptions})
}

//! What a caller asks for and what comes back.

use crate::engine::metrics::RequestMetrics;
use crate::engine::sampling::SamplingParams;

/// A request's handle; ids grow in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// The prompt: text for the tokenizer, or token ids as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// At least 1; generation also ends when the model's context is full.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; it is cut before it.
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-sequence token.
    pub ignore_eos: bool,
}

impl GenerateRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self::with_prompt(Prompt::Text(prompt.into()))
    }
    pub fn tokens(ids: Vec<u32>) -> Self {
        Self::with_prompt(Prompt::Tokens(ids))
    }
    pub fn with_prompt(prompt: Prompt) -> Self {
        Self {
            prompt,
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }
    pub fn sampling(mut self, s: SamplingParams) -> Self {
        self.sampling = s;
        self
    }
}

/// Why a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` generated, or the model's context is full.
    Length,
    /// The model's end-of-sequence token.
    Eos,
    StopToken(u32),
    StopString(String),
    Cancelled,
    /// The request could not run (the message says why); other requests are unaffected.
    Failed(String),
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Eos => "eos",
            Self::StopToken(_) => "stop_token",
            Self::StopString(_) => "stop",
            Self::Cancelled => "cancelled",
            Self::Failed(_) => "failed",
        }
    }
}

/// What a step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completed (possibly empty: half a character, or text
    /// held back because it may be the start of a stop string). `t`: seconds since submission.
    Token { request: RequestId, token: u32, text: String, t: f64 },
    /// The request is over; `text` is everything it generated, stop string removed, and always
    /// equals the concatenation of the request's `Token` texts.
    Finished { request: RequestId, reason: FinishReason, text: String, tokens: Vec<u32>, metrics: RequestMetrics },
}

impl Event {
    pub fn request(&self) -> RequestId {
        match self {
            Event::Token { request, .. } | Event::Finished { request, .. } => *request,
        }
    }
}

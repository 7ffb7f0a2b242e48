//! What a caller asks for and what comes back.

use crate::engine::metrics::RequestMetrics;
use crate::engine::sampling::SamplingParams;

/// A request's handle; ids grow in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// The prompt: text for the tokenizer, or token ids as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text, encoded by the model's tokenizer.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// At least 1; generation also ends when the model's context is full.
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; it is cut before it.
    pub stop: Vec<String>,
    /// Generation ends when one of these tokens is generated.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-sequence token.
    pub ignore_eos: bool,
}

impl GenerateRequest {
    /// A request for a text prompt with the defaults: at most 128 tokens, greedy, no stop strings or tokens.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self::with_prompt(Prompt::Text(prompt.into()))
    }
    /// A request for a prompt of token ids, with the defaults of [`new`](Self::new).
    pub fn tokens(ids: Vec<u32>) -> Self {
        Self::with_prompt(Prompt::Tokens(ids))
    }
    /// A request for `prompt`, with the defaults of [`new`](Self::new).
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
    /// Sets `max_tokens` (builder).
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }
    /// Sets the sampling parameters (builder).
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
    /// One of the request's `stop_token_ids` was generated.
    StopToken(u32),
    /// The text reached this stop string.
    StopString(String),
    /// The caller cancelled the request.
    Cancelled,
    /// The request could not run (the message says why); other requests are unaffected.
    Failed(String),
}

impl FinishReason {
    /// A short lowercase name: `length`, `eos`, `stop_token`, `stop`, `cancelled` or `failed`.
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
    Token {
        /// The request.
        request: RequestId,
        /// The token id.
        token: u32,
        /// Text released with this token.
        text: String,
        /// Seconds since submission.
        t: f64,
    },
    /// The request is over; `text` is everything it generated, stop string removed, and always
    /// equals the concatenation of the request's `Token` texts.
    Finished {
        /// The request.
        request: RequestId,
        /// Why it ended.
        reason: FinishReason,
        /// Everything it generated, stop string removed.
        text: String,
        /// The generated token ids.
        tokens: Vec<u32>,
        /// Its timeline.
        metrics: RequestMetrics,
    },
}

impl Event {
    /// The request the event belongs to.
    pub fn request(&self) -> RequestId {
        match self {
            Event::Token { request, .. } | Event::Finished { request, .. } => *request,
        }
    }
}

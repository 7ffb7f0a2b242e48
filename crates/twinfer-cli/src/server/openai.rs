//! The OpenAI request bodies this server reads, and their translation into engine requests.
//! Fields that would change the answer but are not implemented (`n > 1`, `logprobs`, tools,
//! penalties other than the repetition penalty) are refused with a 400 naming the field, never
//! ignored; fields that change nothing here (`user`, `service_tier`) are accepted.

use serde::Deserialize;
use serde_json::Value;
use twinfer::engine::{GenerateRequest, Prompt, SamplingParams};
use twinfer::model::ChatMessage;

use super::errors::{ApiError, ApiResult};

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What chat and text completions share.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u64>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extensions that vLLM and llama-server accept too.
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub logit_bias: Option<Value>,
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub tools: Option<Value>,
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// A message's content: a string, or parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
}

/// `prompt`: text or token ids, one prompt per request (a list of one is accepted).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    /// Token ids, or anything else: refused (the encoders here embed text).
    Other(serde::de::IgnoredAny),
}

/// The server's limits that requests are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest `max_tokens` a request may ask for, and the value when it asks for none.
    pub max_tokens: usize,
    pub max_stop_strings: usize,
    pub max_embedding_inputs: usize,
}

/// Parses a JSON body, answering a malformed one with OpenAI's 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

impl Sampling {
    /// Checks the fields and builds the engine request around `prompt`.
    pub fn request(&self, prompt: Prompt, limits: &Limits, default_seed: u64) -> ApiResult<GenerateRequest> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported("n", "n must be 1: send one request per completion"));
        }
        if self.logprobs.as_ref().is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false))) {
            return Err(ApiError::unsupported("logprobs", "logprobs are not supported"));
        }
        if self.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported("top_logprobs", "logprobs are not supported"));
        }
        if self.logit_bias.as_ref().is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(ApiError::unsupported("logit_bias", "logit_bias is not supported"));
        }
        for (name, value) in
            [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)]
        {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::unsupported(name, format!("{name} is not supported: use repetition_penalty")));
            }
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => limits.max_tokens,
            Some(0) => return Err(ApiError::bad_param("max_tokens", "max_tokens must be at least 1")),
            Some(n) if n > limits.max_tokens as u64 => {
                return Err(ApiError::bad_param(
                    "max_tokens",
                    format!("max_tokens {n} is over this server's limit of {}", limits.max_tokens),
                ));
            }
            Some(n) => n as usize,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > limits.max_stop_strings {
            return Err(ApiError::bad_param("stop", format!("at most {} stop strings", limits.max_stop_strings)));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_param("stop", "a stop string is empty"));
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k) if k >= 0 => k as usize,
            Some(k) => return Err(ApiError::bad_param("top_k", format!("top_k {k} must be -1 (off) or >= 0"))),
        };
        let sampling = SamplingParams {
            // OpenAI's default: sampling at temperature 1.
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed: self.seed.map_or(default_seed, |s| s as u64),
        };
        sampling.validate().map_err(|e| ApiError::bad_request(e.to_string()))?;
        let mut request = GenerateRequest::with_prompt(prompt).max_tokens(max_tokens).sampling(sampling);
        request.stop = stop;
        request.ignore_eos = self.ignore_eos;
        Ok(request)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    /// The conversation as the chat template reads it.
    pub fn messages(&self) -> ApiResult<Vec<ChatMessage>> {
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::unsupported("tools", "tool calling is not supported"));
        }
        if let Some(format) = &self.response_format {
            let kind = format.get("type").and_then(Value::as_str);
            if kind != Some("text") {
                return Err(ApiError::unsupported("response_format", "only response_format {\"type\": \"text\"}"));
            }
        }
        if self.messages.is_empty() {
            return Err(ApiError::bad_param("messages", "messages is empty"));
        }
        self.messages
            .iter()
            .map(|m| {
                if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant") {
                    return Err(ApiError::bad_param("messages", format!("role {:?} is not supported", m.role)));
                }
                // OpenAI's newer name for the system role; chat templates know `system`.
                let role = if m.role == "developer" { "system" } else { m.role.as_str() };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::unsupported(
                                        "messages",
                                        format!("content parts of type {kind:?} are not supported (text only)"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(ChatMessage::new(role, content))
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> ApiResult<Prompt> {
        if self.echo {
            return Err(ApiError::unsupported("echo", "echo is not supported"));
        }
        if self.suffix.is_some() {
            return Err(ApiError::unsupported("suffix", "suffix is not supported"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported("best_of", "best_of must be 1"));
        }
        let one = || ApiError::unsupported("prompt", "one prompt per request: send a string or a list of one");
        Ok(match &self.prompt {
            PromptInput::Text(t) => Prompt::Text(t.clone()),
            PromptInput::Texts(v) if v.len() == 1 => Prompt::Text(v[0].clone()),
            PromptInput::Tokens(ids) => Prompt::Tokens(ids.clone()),
            PromptInput::TokenLists(v) if v.len() == 1 => Prompt::Tokens(v[0].clone()),
            _ => return Err(one()),
        })
    }
}

impl EmbeddingRequest {
    pub fn texts(&self, limits: &Limits) -> ApiResult<Vec<String>> {
        if self.dimensions.is_some() {
            return Err(ApiError::unsupported(
                "dimensions",
                "dimensions is not supported: the model's own are returned",
            ));
        }
        let texts = match &self.input {
            EmbeddingInput::One(t) => vec![t.clone()],
            EmbeddingInput::Many(v) => v.clone(),
            EmbeddingInput::Other(_) => {
                return Err(ApiError::unsupported("input", "input must be a string or a list of strings"));
            }
        };
        if texts.is_empty() || texts.len() > limits.max_embedding_inputs {
            return Err(ApiError::bad_param(
                "input",
                format!("input must hold 1..={} texts", limits.max_embedding_inputs),
            ));
        }
        Ok(texts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_tokens: 256, max_stop_strings: 4, max_embedding_inputs: 8 };

    fn sampling(body: &str) -> ApiResult<GenerateRequest> {
        let chat: ChatRequest = parse(body.as_bytes())?;
        chat.sampling.request(Prompt::Text("hi".into()), &LIMITS, 7)
    }

    #[test]
    fn defaults_follow_openai() {
        let r = sampling(r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
        assert_eq!((r.max_tokens, r.sampling.temperature, r.sampling.top_p, r.sampling.seed), (256, 1.0, 1.0, 7));
        let r = sampling(
            r#"{"model": "m", "messages": [], "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0,
                "stop": "\n", "seed": 3, "top_k": -1}"#,
        )
        .unwrap();
        assert_eq!(
            (r.max_tokens, r.sampling.temperature, r.stop.clone(), r.sampling.seed),
            (5, 0.0, vec!["\n".into()], 3)
        );
    }

    #[test]
    fn what_is_not_implemented_is_refused_by_name() {
        for (body, param) in [
            (r#""n": 2"#, "n"),
            (r#""logprobs": true"#, "logprobs"),
            (r#""frequency_penalty": 0.5"#, "frequency_penalty"),
            (r#""max_tokens": 0"#, "max_tokens"),
            (r#""max_tokens": 257"#, "max_tokens"),
            (r#""stop": ["a", "b", "c", "d", "e"]"#, "stop"),
            (r#""stop": [""]"#, "stop"),
            (r#""logit_bias": {"5": 1}"#, "logit_bias"),
        ] {
            let e = sampling(&format!(r#"{{"model": "m", "messages": [], {body}}}"#)).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param), (400, Some(param)), "{body}");
        }
        let e = sampling(r#"{"model": "m", "messages": [], "temperature": -1}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        // Zero penalties and an empty logit_bias change nothing: accepted.
        sampling(r#"{"model": "m", "messages": [], "presence_penalty": 0, "logit_bias": {}, "n": 1}"#).unwrap();
    }

    #[test]
    fn chat_content_parts_and_roles() {
        let chat: ChatRequest = parse(
            br#"{"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        let m = chat.messages().unwrap();
        assert_eq!((m[0].role.as_str(), m[1].content.as_str()), ("system", "ab"));
        for body in [
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            r#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#,
            r#"{"model": "m", "messages": []}"#,
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}"#,
        ] {
            let chat: ChatRequest = parse(body.as_bytes()).unwrap();
            assert_eq!(chat.messages().unwrap_err().status.as_u16(), 400, "{body}");
        }
        assert!(parse::<ChatRequest>(br#"{"messages": []}"#).is_err());
        assert!(parse::<ChatRequest>(b"{").is_err());
    }

    #[test]
    fn completion_prompts_and_embedding_inputs() {
        let c: CompletionRequest = parse(br#"{"model": "m", "prompt": [[1, 2, 3]]}"#).unwrap();
        assert_eq!(c.prompt().unwrap(), Prompt::Tokens(vec![1, 2, 3]));
        let c: CompletionRequest = parse(br#"{"model": "m", "prompt": ["a", "b"]}"#).unwrap();
        assert_eq!(c.prompt().unwrap_err().param, Some("prompt"));
        let e: EmbeddingRequest = parse(br#"{"model": "m", "input": ["a", "b"]}"#).unwrap();
        assert_eq!(e.texts(&LIMITS).unwrap().len(), 2);
        let e: EmbeddingRequest = parse(br#"{"model": "m", "input": []}"#).unwrap();
        assert!(e.texts(&LIMITS).is_err());
    }
}

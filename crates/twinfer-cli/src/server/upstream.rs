//! Edge-to-cloud overflow: with `--upstream URL`, a request that the local engine would serve
//! too late goes to an OpenAI-compatible server (vLLM or SGLang in production, another `twinfer
//! serve` in the tests) and its answer streams back unchanged. "Too late" is read off the engine
//! before the request is submitted: its KV pool cannot hold the prompt, or the prompt tokens
//! already pending plus this one, by the step-time model the engine fitted to its own steps,
//! would give a TTFT over `--upstream-ttft-ms`. Until the engine has measured a warm step with a
//! prompt chunk, requests run here. An
//! upstream that cannot be reached sends the request back here: a slow answer beats none. Both
//! routes are recorded in the same metrics, labelled `route="upstream"` or `"local"`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::Value;
use twinfer::engine::EngineStats;

use super::errors::{ApiError, ApiResult};
use super::metrics::{Route, Served, ServerMetrics};

#[derive(Debug)]
pub struct Upstream {
    client: reqwest::Client,
    /// The base URL, `/v1` included, without a trailing slash.
    base: String,
    key: Option<String>,
    /// The name the upstream serves the model under, when it differs.
    model: Option<String>,
    ttft_slo: f64,
}

/// Where a request runs.
#[derive(Debug)]
pub enum Decision {
    Local,
    /// Forward, and why.
    Upstream(String),
}

impl Upstream {
    pub fn new(url: &str, key: Option<String>, model: Option<String>, ttft_slo_ms: u64) -> Result<Self, String> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("--upstream {url}: give an http:// or https:// URL, such as http://host:8000/v1"));
        }
        // One process-wide TLS provider; a second install (another server in the process) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("cannot build the upstream client: {e}"))?;
        Ok(Self { client, base: url.trim_end_matches('/').to_string(), key, model, ttft_slo: ttft_slo_ms as f64 / 1e3 })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Forward when the pool cannot hold the prompt or the predicted TTFT (`predicted`, from the
    /// engine) misses the objective.
    pub fn decide(&self, stats: &EngineStats, prompt_tokens: usize, predicted: Option<f64>) -> Decision {
        if stats.kv_full_for(prompt_tokens + 1) {
            return Decision::Upstream(format!(
                "the KV pool has {} free pages, fewer than the prompt's {prompt_tokens} tokens need",
                stats.kv_pages_free
            ));
        }
        match predicted {
            Some(t) if t > self.ttft_slo => Decision::Upstream(format!(
                "predicted TTFT {:.0} ms ({} prompt tokens pending before it; steps of {:.1} ms + {:.0} us per token) is over {:.0} ms",
                t * 1e3,
                stats.pending_prompt_tokens,
                stats.step_cost.fixed * 1e3,
                stats.step_cost.per_token * 1e6,
                self.ttft_slo * 1e3
            )),
            _ => Decision::Local,
        }
    }

    /// Sends the client's body to `{base}/{path}`. `Ok(None)`: the upstream could not be reached
    /// (run the request here instead).
    pub async fn forward(
        &self,
        path: &str,
        body: &Bytes,
        model_id: &str,
        received: Instant,
        metrics: &Arc<ServerMetrics>,
    ) -> ApiResult<Option<Response>> {
        let body = match &self.model {
            Some(name) => {
                let mut v: Value =
                    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
                v["model"] = Value::String(name.clone());
                Bytes::from(v.to_string())
            }
            None => body.clone(),
        };
        let mut request = self
            .client
            .post(format!("{}/{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let upstream = match request.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() || e.is_timeout() => {
                eprintln!("twinfer serve: upstream {} unreachable ({e}); running the request here", self.base);
                metrics.upstream_failed(model_id);
                return Ok(None);
            }
            Err(e) => return Err(ApiError::unavailable(format!("the upstream failed: {e}"))),
        };
        let status = upstream.status();
        let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
        let watch = Watch::new(metrics.clone(), model_id, received, status.is_success());
        let body = if content_type.as_ref().is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream")) {
            let mut watch = watch;
            Body::from_stream(upstream.bytes_stream().map(move |chunk| {
                if let Ok(bytes) = &chunk {
                    watch.sse(bytes);
                }
                chunk
            }))
        } else {
            let bytes =
                upstream.bytes().await.map_err(|e| ApiError::unavailable(format!("the upstream failed: {e}")))?;
            let mut watch = watch;
            watch.whole(&bytes);
            Body::from(bytes)
        };
        let mut response = (status, body).into_response();
        if let Some(c) = content_type {
            response.headers_mut().insert(header::CONTENT_TYPE, c);
        }
        response.headers_mut().insert("x-twinfer-route", HeaderValue::from_static("upstream"));
        Ok(Some(response))
    }
}

/// Reads the upstream's answer as it passes, for the same metrics as a local request: the time
/// of every chunk that carries text, the usage and the finish reason. Records when dropped (the
/// end of the body, or a client that left: then its finish reason is `cancelled`).
struct Watch {
    metrics: Arc<ServerMetrics>,
    model: String,
    received: Instant,
    ok: bool,
    line: Vec<u8>,
    token_times: Vec<f64>,
    usage: Option<(usize, usize, usize)>,
    finish: Option<String>,
}

impl Watch {
    fn new(metrics: Arc<ServerMetrics>, model: &str, received: Instant, ok: bool) -> Self {
        Self {
            metrics,
            model: model.to_string(),
            received,
            ok,
            line: Vec::new(),
            token_times: Vec::new(),
            usage: None,
            finish: None,
        }
    }

    fn sse(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                if let Some(data) = line.strip_prefix(b"data:")
                    && let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii())
                {
                    self.chunk(&v, true);
                }
            } else {
                self.line.push(b);
            }
        }
    }

    fn whole(&mut self, bytes: &[u8]) {
        if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
            self.chunk(&v, false);
        }
    }

    fn chunk(&mut self, v: &Value, streamed: bool) {
        let now = self.received.elapsed().as_secs_f64();
        for c in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
            let text = c.pointer("/delta/content").or_else(|| c.get("text")).and_then(Value::as_str);
            if streamed && text.is_some_and(|t| !t.is_empty()) {
                self.token_times.push(now);
            }
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                self.finish = Some(f.to_string());
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
            let cached = u.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64).unwrap_or(0);
            self.usage = Some((n("prompt_tokens"), n("completion_tokens"), cached as usize));
        }
        if !streamed && self.finish.is_some() {
            // A whole answer: its only token time is its arrival.
            self.token_times.push(now);
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let t = &self.token_times;
        let (prompt_tokens, completion, cached_tokens) = self.usage.unwrap_or((0, t.len(), 0));
        let streamed_gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
        let served = Served {
            prompt_tokens,
            cached_tokens,
            generated_tokens: completion,
            ttft: t.first().copied(),
            tpot: (t.len() >= 2).then(|| (t[t.len() - 1] - t[0]) / (t.len() - 1) as f64),
            itl: streamed_gaps,
            e2e: self.received.elapsed().as_secs_f64(),
            preemptions: 0,
        };
        let reason = match (&self.finish, self.ok) {
            (_, false) => "failed",
            (Some(f), true) => f.as_str(),
            (None, true) => "cancelled",
        };
        self.metrics.finished(&self.model, Route::Upstream, reason, &served);
    }
}

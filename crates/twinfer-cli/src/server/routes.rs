//! The HTTP surface: OpenAI's `/v1` routes behind an optional bearer key, `/metrics` (also
//! behind the key), and `/health`. Every failure answers with OpenAI's error body.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use twinfer::engine::{Engine, GenerateRequest, Prompt};

use super::errors::{ApiError, ApiResult};
use super::generation::submit;
use super::metrics::ServerMetrics;
use super::openai::{ChatRequest, CompletionRequest, EmbeddingRequest, Limits, Sampling, parse};
use super::responses::{Header, Kind};
use super::stream::sse;
use super::upstream::{Decision, Upstream};

/// A model this server answers for, under its `id`.
#[derive(Debug)]
pub struct ServedModel {
    pub id: String,
    pub engine: Arc<Engine>,
    pub created: u64,
    /// Embedding batches run one at a time: each one already uses every core.
    embed_lock: tokio::sync::Mutex<()>,
    /// With an upstream, a request's route is decided and the request admitted in one step:
    /// otherwise requests arriving together all see the same empty queue and all stay here.
    admission: tokio::sync::Mutex<()>,
}

impl ServedModel {
    pub fn new(id: String, engine: Engine) -> Self {
        Self {
            id,
            engine: Arc::new(engine),
            created: unix_now(),
            embed_lock: tokio::sync::Mutex::new(()),
            admission: tokio::sync::Mutex::new(()),
        }
    }
}

#[derive(Debug)]
pub struct AppState {
    pub models: Vec<ServedModel>,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub metrics: Arc<ServerMetrics>,
    pub requests: AtomicU64,
    pub upstream: Option<Upstream>,
}

impl AppState {
    fn model(&self, id: &str) -> ApiResult<&ServedModel> {
        self.models.iter().find(|m| m.id == id).ok_or_else(|| {
            self.metrics.rejected(id);
            ApiError::model_not_found(id, &self.models.iter().map(|m| m.id.clone()).collect::<Vec<_>>())
        })
    }

    /// An answer's id, and a seed for requests that give none (different for each request).
    fn next_request(&self, prefix: &str) -> (String, u64) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        (format!("{prefix}-{nanos:x}{n:x}"), splitmix(nanos ^ n.rotate_left(32)))
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let keyed = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(keyed)
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn authorize(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"status": "ok", "models": s.models.iter().map(|m| &m.id).collect::<Vec<_>>()})).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = s
        .models
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": m.created, "owned_by": "twinfer"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> ApiResult<Response> {
    let mut stats = Vec::new();
    for m in s.models.iter().filter(|m| m.engine.is_decoder()) {
        let engine = m.engine.clone();
        let st = tokio::task::spawn_blocking(move || engine.stats())
            .await
            .map_err(|e| ApiError::server(e.to_string()))??;
        stats.push((m.id.clone(), st));
    }
    let text = s.metrics.render(&stats);
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

/// The body, or OpenAI's error for one that is too large or unreadable.
fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|r| {
        let status = r.status();
        let mut e = ApiError::bad_request(r.body_text());
        e.status = status;
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            e.code = Some("request_too_large");
        }
        e
    })
}

fn decoder(m: &ServedModel) -> ApiResult<&Arc<Engine>> {
    if m.engine.is_decoder() {
        Ok(&m.engine)
    } else {
        Err(ApiError::bad_param("model", format!("{} is an embedding model: use /v1/embeddings", m.id)))
    }
}

async fn chat(State(s): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> Response {
    let received = Instant::now();
    let result = async {
        let raw = body(b)?;
        let req: ChatRequest = parse(&raw)?;
        let m = s.model(&req.model)?;
        let engine = decoder(m)?.clone();
        let messages = req.messages()?;
        let prompt = tokio::task::spawn_blocking(move || engine.chat_request(&messages))
            .await
            .map_err(|e| ApiError::server(e.to_string()))??
            .prompt;
        let (id, seed) = s.next_request("chatcmpl");
        let request = req.sampling.request(prompt, &s.limits, seed)?;
        let header = Header { id, created: unix_now(), model: m.id.clone(), kind: Kind::Chat };
        generate(&s, m, request, &req.sampling, header, received, (&raw, "chat/completions")).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> Response {
    let received = Instant::now();
    let result = async {
        let raw = body(b)?;
        let req: CompletionRequest = parse(&raw)?;
        let m = s.model(&req.model)?;
        decoder(m)?;
        let (id, seed) = s.next_request("cmpl");
        let request = req.sampling.request(req.prompt()?, &s.limits, seed)?;
        let header = Header { id, created: unix_now(), model: m.id.clone(), kind: Kind::Text };
        generate(&s, m, request, &req.sampling, header, received, (&raw, "completions")).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Runs a checked request on the model's engine, streamed as SSE or answered whole, or forwards
/// its body (`raw`, to the upstream's `path`) when the engine would answer too late.
async fn generate(
    s: &Arc<AppState>,
    m: &ServedModel,
    request: GenerateRequest,
    sampling: &Sampling,
    header: Header,
    received: Instant,
    (raw, path): (&Bytes, &str),
) -> ApiResult<Response> {
    let mut admission = None;
    if let Some(upstream) = &s.upstream {
        admission = Some(m.admission.lock().await);
        let engine = m.engine.clone();
        let prompt = request.prompt.clone();
        let (stats, prompt_tokens, predicted) = tokio::task::spawn_blocking(move || {
            let tokens = match prompt {
                Prompt::Tokens(t) => t,
                Prompt::Text(t) => engine.tokenizer().encode(&t, true)?,
            };
            Ok::<_, twinfer::TwinferError>((engine.stats()?, tokens.len(), engine.predicted_ttft(&tokens)?))
        })
        .await
        .map_err(|e| ApiError::server(e.to_string()))??;
        if let Decision::Upstream(why) = upstream.decide(&stats, prompt_tokens, predicted) {
            eprintln!("twinfer serve: {} to {}: {why}", header.id, upstream.base());
            // Forwarded requests take nothing here: the next one may be decided now.
            drop(admission.take());
            if let Some(response) = upstream.forward(path, raw, &m.id, received, &s.metrics).await? {
                return Ok(response);
            }
        }
    }
    let running =
        submit(&m.engine, &m.id, request, received, &s.metrics).await.inspect_err(|_| s.metrics.rejected(&m.id))?;
    // Admitted: the engine's queue now counts this prompt for the next prediction.
    drop(admission);
    let mut response = if sampling.stream {
        sse(running, header, sampling.include_usage()).into_response()
    } else {
        let queued = running.queued;
        let finished = running.finish().await?;
        let reason = finished.openai_reason()?;
        axum::Json(header.complete(&finished, reason, &finished.served(queued))).into_response()
    };
    response.headers_mut().insert("x-twinfer-route", header::HeaderValue::from_static("local"));
    Ok(response)
}

async fn embeddings(State(s): State<Arc<AppState>>, b: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let req: EmbeddingRequest = parse(&body(b)?)?;
        let m = s.model(&req.model)?;
        if m.engine.is_decoder() {
            return Err(ApiError::bad_param("model", format!("{} is a generative model: it has no embeddings", m.id)));
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::bad_param("encoding_format", format!("{other:?}: use \"float\" or \"base64\"")));
            }
        };
        let texts = req.texts(&s.limits)?;
        let _one_batch_at_a_time = m.embed_lock.lock().await;
        let engine = m.engine.clone();
        let (vectors, tokens) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let vectors = engine.embed(&refs)?;
            let tokens = texts.iter().map(|t| engine.tokenizer().encode(t, true).map(|ids| ids.len())).sum::<Result<
                usize,
                _,
            >>(
            )?;
            Ok::<_, twinfer::TwinferError>((vectors, tokens))
        })
        .await
        .map_err(|e| ApiError::server(e.to_string()))??;
        let data: Vec<Value> = vectors
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Ok(axum::Json(json!({"object": "list", "data": data, "model": m.id,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
        .into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

//! `twinfer serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the
//! continuous-batching engines, so that concurrent clients share steps. Routes: chat and text
//! completions (streamed as SSE or whole), embeddings, models, `/metrics` (Prometheus) and
//! `/health`. Binds to 127.0.0.1 unless told otherwise; an optional bearer key guards the `/v1`
//! routes and the metrics. A client that disconnects cancels its request.

mod errors;
mod generation;
mod metrics;
mod openai;
mod responses;
mod routes;
mod stream;
mod upstream;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use clap::Args;
use twinfer::engine::Engine;

use crate::options::EngineArgs;
use metrics::ServerMetrics;
use openai::Limits;
use routes::{AppState, ServedModel, router};

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve: a GGUF file, a Hugging Face folder or a Hub name (org/name[@revision]),
    /// decoder or encoder; repeatable. Requests name it by its file stem, folder name or Hub
    /// name, or by NAME when given as NAME=PATH.
    #[arg(long = "model", value_name = "[NAME=]PATH", required = true)]
    pub models: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests must send `Authorization: Bearer KEY` [default: $TWINFER_API_KEY, else none].
    #[arg(long)]
    pub api_key: Option<String>,
    /// Largest request body, in KiB.
    #[arg(long, default_value_t = 1024)]
    pub max_body_kib: usize,
    /// Largest `max_tokens` a request may ask for; also what a request that gives none gets.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// An OpenAI-compatible server (its base URL, `/v1` included) that takes the requests this
    /// one would answer too late: KV pool full, or predicted TTFT over --upstream-ttft-ms.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// Bearer key for the upstream [default: $TWINFER_UPSTREAM_KEY, else none].
    #[arg(long)]
    pub upstream_key: Option<String>,
    /// The model name the upstream serves, when it differs from the requested one.
    #[arg(long)]
    pub upstream_model: Option<String>,
    /// The TTFT objective: a request predicted to wait longer for its first token goes upstream.
    #[arg(long, default_value_t = 1000)]
    pub upstream_ttft_ms: u64,
    /// Most texts in one embeddings request.
    #[arg(long, default_value_t = 256)]
    pub max_embedding_inputs: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `NAME=PATH` or `PATH`; a path that exists is never split.
fn model_spec(spec: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = match spec.split_once('=') {
        Some((name, path)) if !Path::new(spec).exists() => (Some(name.to_string()), PathBuf::from(path)),
        _ => (None, PathBuf::from(spec)),
    };
    // A Hub model is served under its Hub name, as other OpenAI-compatible servers do.
    let hub = !path.exists() && crate::hub::is_hub_name(&path.to_string_lossy());
    let name = match name {
        Some(n) if !n.is_empty() => n,
        Some(_) => return Err(format!("--model {spec}: the name before '=' is empty")),
        None if hub => path.to_string_lossy().into_owned(),
        None => {
            let stem = if path.is_dir() { path.file_name() } else { path.file_stem() };
            stem.and_then(|s| s.to_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("--model {spec}: cannot name this model from its path; give NAME={spec}"))?
        }
    };
    Ok((name, crate::hub::resolve(&path)?))
}

pub fn run(args: ServeArgs) -> Result<(), String> {
    let mut config = args.engine.config()?;
    if args.engine.prefix_cache.is_none() {
        // Chat clients send the whole conversation each turn: keep recent turns' KV.
        config.prefix_cache_sequences = 8;
    }
    if args.max_tokens == 0 || args.max_body_kib == 0 || args.max_embedding_inputs == 0 {
        return Err("--max-tokens, --max-body-kib and --max-embedding-inputs must be at least 1".into());
    }
    let api_key = args.api_key.clone().or_else(|| std::env::var("TWINFER_API_KEY").ok()).filter(|k| !k.is_empty());
    let mut models: Vec<ServedModel> = Vec::new();
    for spec in &args.models {
        let (id, path) = model_spec(spec)?;
        if models.iter().any(|m| m.id == id) {
            return Err(format!("two models are named {id}: name one with --model NAME=PATH"));
        }
        let engine = Engine::new(&path, config.clone()).map_err(|e| format!("{}: {e}", path.display()))?;
        let role = if engine.is_decoder() { "generates" } else { "embeds" };
        eprintln!("model {id} ({role}): {} | forward: {}", engine.description(), engine.residency());
        models.push(ServedModel::new(id, engine));
    }
    let upstream = match &args.upstream {
        Some(url) => {
            let key = args
                .upstream_key
                .clone()
                .or_else(|| std::env::var("TWINFER_UPSTREAM_KEY").ok())
                .filter(|k| !k.is_empty());
            let u = upstream::Upstream::new(url, key, args.upstream_model.clone(), args.upstream_ttft_ms)?;
            eprintln!(
                "overflow: to {} when the predicted TTFT is over {} ms or the KV pool is full",
                u.base(),
                args.upstream_ttft_ms
            );
            Some(u)
        }
        None => None,
    };
    let state = Arc::new(AppState {
        models,
        api_key,
        limits: Limits {
            max_tokens: args.max_tokens,
            max_stop_strings: 16,
            max_embedding_inputs: args.max_embedding_inputs,
        },
        metrics: Arc::new(ServerMetrics::new()),
        requests: AtomicU64::new(0),
        upstream,
    });
    // The engines own the cores; the HTTP side only parses, routes and copies.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("twinfer-http")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the server runtime: {e}"))?;
    let max_body = args.max_body_kib << 10;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("twinfer serve: listening on http://{addr}");
        let _ = std::io::stdout().flush();
        axum::serve(listener, router(state, max_body))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| format!("the server failed: {e}"))
    })
}

/// Ctrl-C, or SIGTERM (a service manager's stop).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("twinfer serve: stopping (requests in flight finish first)");
}

//! `twinfer run` and `twinfer embed`: a model folder, streamed tokens, embeddings.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use twinfer::engine::{Engine, EngineConfig, Event, GenerateRequest, SamplingParams};
use twinfer::model::ChatMessage;

use crate::options::EngineArgs;

#[derive(Args)]
pub struct RunArgs {
    /// A Hugging Face model folder (config.json, model.safetensors, tokenizer.json), a GGUF file, or
    /// a Hub name: org/name[@revision] or org/name[@revision]/FILE.gguf, fetched into the Hugging
    /// Face cache once and loaded offline from then on (HF_HUB_OFFLINE=1 forbids the network).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt as a user message through the model's chat template; the answer ends at
    /// the end-of-turn token.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object with the text and the metrics instead of streaming.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args)]
pub struct EmbedArgs {
    /// A sentence-embedding model folder (BERT family, e.g. all-MiniLM-L6-v2) or its Hub name
    /// (sentence-transformers/all-MiniLM-L6-v2).
    #[arg(long)]
    pub model: PathBuf,
    /// Texts to embed. With several, a cosine-similarity table follows (semantic search).
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Print the embeddings as JSON.
    #[arg(long)]
    pub json: bool,
    /// Embed the texts this many more times after the first (cold) call and report the warm
    /// median with its range; every repeat must give the same embeddings.
    #[arg(long, default_value_t = 0)]
    pub repeat: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

fn load(model: &PathBuf, config: EngineConfig, quiet: bool) -> Result<Engine, String> {
    let bar = (!quiet).then(|| crate::progress::spinner(&format!("loading {}", model.display())));
    let engine = Engine::new(model, config).map_err(|e| e.to_string());
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    engine
}

fn sampling(args: &RunArgs) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    }
}

pub fn run(args: RunArgs) -> Result<(), String> {
    let engine = load(&crate::hub::resolve(&args.model)?, args.engine.config()?, args.json)?;
    let request = if args.chat {
        let mut messages: Vec<ChatMessage> = args.system.iter().map(ChatMessage::system).collect();
        messages.push(ChatMessage::user(args.prompt.clone()));
        engine.chat_request(&messages).map_err(|e| e.to_string())?
    } else {
        GenerateRequest::new(args.prompt.clone())
    };
    let mut request = request.max_tokens(args.max_tokens).sampling(sampling(&args));
    request.stop = args.stop;
    let stream = engine.generate(request).map_err(|e| e.to_string())?;
    crate::interrupt::on_ctrl_c(stream.canceller());
    let (prefill, decode) = engine.backends();
    if !args.json {
        eprintln!("model: {}", engine.description());
        eprintln!(
            "prefill: {} ({}) | decode: {} ({})",
            prefill.backend, prefill.variant, decode.backend, decode.variant
        );
        eprintln!("forward: {}", engine.residency());
    }
    let mut out = std::io::stdout().lock();
    for event in stream {
        match event {
            Event::Token { text, .. } => {
                if !args.json {
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                }
            }
            Event::Finished { reason, text, tokens, metrics, .. } => {
                if args.json {
                    let doc = json!({"text": text, "tokens": tokens, "finish_reason": reason.as_str(),
                        "metrics": metrics.to_json(), "prefill_backend": prefill.backend, "decode_backend": decode.backend});
                    println!("{doc}");
                } else {
                    println!();
                    let itl = twinfer::engine::Distribution::of(&metrics.itl());
                    eprintln!(
                        "finished ({}): {} prompt + {} generated tokens | TTFT {} | TPOT {} | {:.1} tok/s | ITL p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms std {:.1} ms",
                        reason.as_str(),
                        metrics.prompt_tokens,
                        metrics.token_times.len(),
                        ms(metrics.ttft()),
                        ms(metrics.tpot()),
                        metrics.token_times.len() as f64 / metrics.e2e.max(1e-9),
                        itl.p50 * 1e3,
                        itl.p90 * 1e3,
                        itl.p99 * 1e3,
                        itl.std * 1e3
                    );
                }
            }
        }
    }
    Ok(())
}

fn ms(x: Option<f64>) -> String {
    x.map_or("-".into(), |s| format!("{:.1} ms", s * 1e3))
}

pub fn embed(args: EmbedArgs) -> Result<(), String> {
    let engine = load(&crate::hub::resolve(&args.model)?, args.engine.config()?, args.json)?;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let start = std::time::Instant::now();
    let embeddings = engine.embed(&texts).map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let mut warm = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        let start = std::time::Instant::now();
        let again = engine.embed(&texts).map_err(|e| e.to_string())?;
        warm.push(start.elapsed().as_secs_f64());
        if again != embeddings {
            return Err("a repeated call gave different embeddings".into());
        }
    }
    let warm = (!warm.is_empty()).then(|| twinfer::bench::timing::Stats::from_samples(warm));
    if args.json {
        let warm = warm.map(|w| json!({"median": w.median, "min": w.min, "max": w.max, "runs": w.runs}));
        let doc = json!({"model": engine.description(), "dim": embeddings[0].len(), "seconds": secs,
            "warm_seconds": warm, "embeddings": embeddings});
        println!("{doc}");
        return Ok(());
    }
    println!(
        "{}: {} texts -> {} dimensions in {:.1} ms",
        engine.description(),
        texts.len(),
        embeddings[0].len(),
        secs * 1e3
    );
    if let Some(w) = warm {
        println!(
            "warm: median {:.2} ms [{:.2}..{:.2}] over {} repeats (the first call above is cold)",
            w.median * 1e3,
            w.min * 1e3,
            w.max * 1e3,
            w.runs
        );
    }
    if texts.len() > 1 {
        // Semantic search: the first text is the query, the others are ranked by cosine similarity.
        let mut ranked: Vec<(f32, &str)> = embeddings[1..]
            .iter()
            .zip(&texts[1..])
            .map(|(e, t)| (e.iter().zip(&embeddings[0]).map(|(a, b)| a * b).sum(), *t))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!("query: {}", texts[0]);
        for (score, text) in ranked {
            println!("  {score:>7.4}  {text}");
        }
    } else {
        let head: Vec<String> = embeddings[0].iter().take(8).map(|x| format!("{x:.4}")).collect();
        println!("[{}, ...]", head.join(", "));
    }
    Ok(())
}

//! `twinfer bench model`: llama-bench's two numbers for one model file on this machine, prompt
//! processing (pp: a prompt of `--prompt-tokens` from an empty cache) and token generation (tg:
//! `--gen-tokens` tokens after a one-token prompt), with the read ceiling measured in the same
//! run, so decode reads as a fraction of what memory allows. When llama.cpp's `llama-bench` is
//! given (or on PATH) and the model is a GGUF file, it runs on the same file with the same thread
//! count, and its numbers print beside ours.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use serde_json::{Value, json};
use twinfer::bench::ceilings::{READ_BYTES, read_bandwidth};
use twinfer::bench::timing::Stats;
use twinfer::engine::{Engine, Event, GenerateRequest};
use twinfer::model::{Model, ModelSource, Network};

use crate::options::EngineArgs;

#[derive(Args)]
pub struct BenchModelArgs {
    /// A decoder: a GGUF file, a Hugging Face folder, or a Hub name (org/name[@revision][/FILE.gguf]).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt length timed for prompt processing (llama-bench's -p).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated for token generation (llama-bench's -n).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Repetitions of each; the median and the range are reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// llama.cpp's llama-bench, run on the same GGUF file [default: `llama-bench` on PATH, if any].
    #[arg(long)]
    pub llama_bench: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: BenchModelArgs) -> Result<(), String> {
    if args.prompt_tokens == 0 || args.gen_tokens < 2 || args.reps == 0 {
        return Err("--prompt-tokens must be at least 1, --gen-tokens at least 2, --reps at least 1".into());
    }
    let mut config = args.engine.config()?;
    let args = BenchModelArgs { model: crate::hub::resolve(&args.model)?, ..args };
    let mut model = Model::load(ModelSource::dir(&args.model)).map_err(|e| e.to_string())?;
    // Quantized here, so the bytes a step reads are those of the weights that run.
    let (weight_bytes, vocab) = match &mut model.network {
        Network::Decoder(m) => {
            if let Some(format) = config.quantize.take() {
                m.quantize(format).map_err(|e| e.to_string())?;
            }
            (m.weight_bytes(), m.config.vocab_size)
        }
        Network::Encoder(_) => {
            return Err(format!("{} is an encoder: bench model times decoders", args.model.display()));
        }
    };
    let engine = Engine::from_model(model, config).map_err(|e| e.to_string())?;
    let level = engine.simd_level();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("TWINFER_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(threads);

    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for rep in 0..args.reps {
        // Different prompts each time, so no prefix is shared with an earlier repetition.
        let prompt: Vec<u32> = (0..args.prompt_tokens).map(|i| token(i + rep * 7919, vocab)).collect();
        let m = finished_metrics(&engine, prompt, 1)?;
        pp.push(args.prompt_tokens as f64 / m.ttft().ok_or("no first token")?);
        let m = finished_metrics(&engine, vec![token(rep + 1, vocab)], args.gen_tokens + 1)?;
        tg.push(1.0 / m.tpot().ok_or("no second token")?);
    }
    let (pp, tg) = (Stats::from_samples(pp), Stats::from_samples(tg));
    let read = read_bandwidth(level, READ_BYTES / 4, 5);
    // A generated token reads every weight once (the KV of a short context adds under 1%).
    let floor_s = weight_bytes as f64 / (read.median * 1e9);
    let peer = llama_bench(&args, threads);

    let (prefill, decode) = engine.backends();
    let engines = [prefill, decode].map(|b| format!("{} ({})", b.backend, b.variant));
    let report = json!({
        "model": args.model.display().to_string(), "description": engine.description(),
        "engines": {"prefill": engines[0], "decode": engines[1]},
        "simd": level.name(), "threads": threads, "weight_bytes": weight_bytes,
        "pp": {"tokens": args.prompt_tokens, "tokens_per_s": stats_json(&pp)},
        "tg": {"tokens": args.gen_tokens, "tokens_per_s": stats_json(&tg)},
        "read_gbps": stats_json(&read), "tg_floor_tokens_per_s": 1.0 / floor_s,
        "llama_bench": peer,
    });
    if args.json {
        println!("{report:#}");
        return Ok(());
    }
    println!("model:   {} ({})", args.model.display(), engine.description());
    println!("engines: prefill {} | decode {} | {threads} threads | {}", engines[0], engines[1], engine.residency());
    println!("pp{:<5} {:>9.1} tokens/s [{:.1}..{:.1}]", args.prompt_tokens, pp.median, pp.min, pp.max);
    println!("tg{:<5} {:>9.1} tokens/s [{:.1}..{:.1}]", args.gen_tokens, tg.median, tg.min, tg.max);
    println!(
        "decode reads {:.1} MB of weights per token; read ceiling {:.1} GB/s [{:.1}..{:.1}] in this run: floor {:.1} tokens/s, tg at {:.0}% of it",
        weight_bytes as f64 / 1e6,
        read.median,
        read.min,
        read.max,
        1.0 / floor_s,
        100.0 * tg.median * floor_s
    );
    match &peer {
        Value::Object(p) if p.contains_key("pp_tokens_per_s") => println!(
            "llama-bench (same file, {threads} threads): pp{} {:.1} tokens/s, tg{} {:.1} tokens/s: twinfer is {:.2}x on pp, {:.2}x on tg",
            args.prompt_tokens,
            p["pp_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            args.gen_tokens,
            p["tg_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            pp.median / p["pp_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            tg.median / p["tg_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
        ),
        other => println!("llama-bench: {}", other.get("skipped").and_then(Value::as_str).unwrap_or("not run")),
    }
    Ok(())
}

/// A token id spread over the vocabulary, away from the first ids (often special tokens).
fn token(i: usize, vocab: usize) -> u32 {
    (100 + (i * 2_654_435_761) % (vocab.max(201) - 100)) as u32
}

fn finished_metrics(
    engine: &Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> Result<twinfer::engine::RequestMetrics, String> {
    let mut request = GenerateRequest::tokens(prompt).max_tokens(max_tokens);
    request.ignore_eos = true;
    match engine.generate_blocking(request).map_err(|e| e.to_string())? {
        Event::Finished { metrics, .. } => Ok(metrics),
        _ => Err("the request did not finish".into()),
    }
}

fn stats_json(s: &Stats) -> Value {
    json!({"median": s.median, "min": s.min, "max": s.max})
}

/// llama-bench's pp and tg rates on the same file, or why it did not run.
fn llama_bench(args: &BenchModelArgs, threads: usize) -> Value {
    let is_gguf = args.model.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !is_gguf {
        return json!({"skipped": "the model is not a GGUF file"});
    }
    let program: &Path = args.llama_bench.as_deref().unwrap_or(Path::new("llama-bench"));
    let output = Command::new(program)
        .args(["-m", &args.model.display().to_string()])
        .args(["-p", &args.prompt_tokens.to_string(), "-n", &args.gen_tokens.to_string()])
        .args(["-t", &threads.to_string(), "-r", &args.reps.to_string(), "-o", "json"])
        .output();
    let output = match output {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return json!({"skipped": format!("{} failed: {}", program.display(), String::from_utf8_lossy(&o.stderr).trim())});
        }
        Err(e) => return json!({"skipped": format!("{} is not available ({e})", program.display())}),
    };
    let Ok(rows) = serde_json::from_slice::<Vec<Value>>(&output.stdout) else {
        return json!({"skipped": "llama-bench printed no JSON array"});
    };
    let rate = |prompt: bool| {
        rows.iter()
            .find(|r| {
                (r["n_prompt"].as_u64().unwrap_or(0) > 0) == prompt && (r["n_gen"].as_u64().unwrap_or(0) > 0) != prompt
            })
            .and_then(|r| r["avg_ts"].as_f64())
    };
    json!({"pp_tokens_per_s": rate(true), "tg_tokens_per_s": rate(false), "threads": threads})
}

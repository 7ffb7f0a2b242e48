//! `twinfer chat`: an interactive conversation through the model's chat template. Each line on
//! stdin is a user turn; the answer streams back and joins the history that the next turn's
//! prompt is rendered from. The engine keeps finished turns' KV pages (its prefix cache), so the
//! next turn computes only what follows the shared start of the conversation. An empty line or
//! end of input ends the session; Ctrl-C stops the current answer only.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Args;
use twinfer::engine::{Engine, Event, SamplingParams};
use twinfer::model::ChatMessage;

use crate::options::EngineArgs;

#[derive(Args)]
pub struct ChatArgs {
    /// A model with a chat template: a GGUF file, a Hugging Face folder, or a Hub name
    /// (org/name[@revision][/FILE.gguf], fetched into the Hugging Face cache once).
    #[arg(long)]
    pub model: PathBuf,
    /// A system message for the whole conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: ChatArgs) -> Result<(), String> {
    let mut config = args.engine.config()?;
    if args.engine.prefix_cache.is_none() {
        config.prefix_cache_sequences = 4;
    }
    let engine = Engine::new(&crate::hub::resolve(&args.model)?, config).map_err(|e| e.to_string())?;
    if engine.chat_template().is_none() {
        return Err(format!("{} has no chat template: use `twinfer run`", args.model.display()));
    }
    eprintln!("model: {}\nforward: {}\n(an empty line ends the chat)", engine.description(), engine.residency());
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    let mut history: Vec<ChatMessage> = args.system.iter().map(ChatMessage::system).collect();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        if line.trim().is_empty() {
            break;
        }
        history.push(ChatMessage::user(line));
        let request = engine.chat_request(&history).map_err(|e| e.to_string())?;
        let stream = engine
            .generate(request.max_tokens(args.max_tokens).sampling(sampling.clone()))
            .map_err(|e| e.to_string())?;
        crate::interrupt::on_ctrl_c(stream.canceller());
        let mut out = std::io::stdout().lock();
        let mut answer = String::new();
        for event in stream {
            match event {
                Event::Token { text, .. } => {
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                }
                Event::Finished { text, metrics, reason, .. } => {
                    let _ = writeln!(out);
                    let ttft = metrics.ttft().map_or("-".into(), |s| format!("{:.0} ms", s * 1e3));
                    let tpot = metrics.tpot().map_or("-".into(), |s| format!("{:.1} ms", s * 1e3));
                    eprintln!(
                        "[{}: {} tokens, TTFT {ttft}, TPOT {tpot}, {} of {} prompt tokens from the cache]",
                        reason.as_str(),
                        metrics.token_times.len(),
                        metrics.cached_tokens,
                        metrics.prompt_tokens
                    );
                    answer = text;
                }
            }
        }
        history.push(ChatMessage::assistant(answer));
    }
    Ok(())
}

//! What the model targets share: the micro model's files (scripts/fuzz.sh writes them with
//! tests/reference/fuzz_seeds.py) and the checks a loaded model goes through.
// Each target uses part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use twinfer::cpu::SimdLevel;
use twinfer::engine::{EngineConfig, GenerateRequest, Scheduler};
use twinfer::model::{ChatMessage, ChatTemplate, Model, ModelSource, Network, SafetensorsStream};
use twinfer::quant::QuantFormat;
use twinfer::{Attention, Backend, DType};

/// The micro model's files by name: config.json, tokenizer.json, model.safetensors, micro.gguf.
pub fn base() -> &'static HashMap<String, Vec<u8>> {
    static BASE: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::var("TWINFER_FUZZ_BASE")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/base").to_string());
        ["config.json", "tokenizer.json", "model.safetensors", "micro.gguf"]
            .iter()
            .map(|name| {
                let path = format!("{dir}/{name}");
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run scripts/fuzz.sh)"));
                (name.to_string(), bytes)
            })
            .collect()
    })
}

/// The Hugging Face folder of the micro model with `name` replaced by `data`.
pub fn folder_with(name: &str, data: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut files: HashMap<String, Vec<u8>> =
        base().iter().filter(|(n, _)| n.as_str() != "micro.gguf").map(|(n, b)| (n.clone(), b.clone())).collect();
    files.insert(name.to_string(), data.to_vec());
    files
}

/// Loads `files`. Any error is fine; a model that loads must also tokenize, render its chat
/// template and generate two tokens on the CPU, with a typed error at worst and never a panic.
pub fn exercise(files: HashMap<String, Vec<u8>>) {
    if let Ok(model) = Model::load(ModelSource::Files(files)) {
        exercise_model(model);
    }
}

/// As [`exercise`], with `name` (a safetensors file) streamed in chunks of 1 to 13 bytes into
/// the loader that quantizes as it goes (the browser's), instead of handed over whole.
pub fn exercise_streamed(mut files: HashMap<String, Vec<u8>>, name: &str) {
    let Some(data) = files.remove(name) else { return };
    // Every other input as a download of unknown length, whose buffers grow with the data.
    let total = (data.len() % 2 == 0).then_some(data.len() as u64);
    let Ok(mut stream) = SafetensorsStream::new(name, QuantFormat::Q4_0, total) else { return };
    let mut at = 0;
    for len in (1..=13).cycle() {
        if at >= data.len() {
            break;
        }
        let end = (at + len).min(data.len());
        if stream.push(&data[at..end]).is_err() {
            return;
        }
        at = end;
    }
    let Ok(tensors) = stream.finish() else { return };
    if let Ok(model) = Model::load_streamed(ModelSource::Files(files), tensors) {
        exercise_model(model);
    }
}

fn exercise_model(model: Model) {
    let Ok(ids) = model.tokenizer.encode("Hi there, 42 apples!\n\tcafé 日本", true) else { return };
    if let Some(source) = model.chat_template.clone()
        && let Ok(template) = ChatTemplate::new(source, "<s>".into(), "</s>".into())
    {
        let _ = template.render(&[ChatMessage::system("Be brief."), ChatMessage::user("Hi")], true);
    }
    let Network::Decoder(decoder) = model.network else { return };
    let config = EngineConfig {
        prefill_backend: Backend::Cpu,
        decode_backend: Backend::Cpu,
        kv_pool_pages: Some(8),
        kv_dtype: DType::F32,
        ..Default::default()
    };
    let Ok(cpu) = Attention::new(Backend::Cpu) else { return };
    let tokenizer = Some(Arc::new(model.tokenizer));
    let Ok(mut s) = Scheduler::new(Arc::new(decoder), tokenizer, SimdLevel::detect(), cpu.clone(), cpu, config) else {
        return;
    };
    if s.add(GenerateRequest::tokens(ids).max_tokens(2)).is_err() {
        return;
    }
    for _ in 0..64 {
        if !s.has_work() || s.step().is_err() {
            break;
        }
    }
    if let Err(e) = s.audit() {
        panic!("bookkeeping broken after a step: {e}");
    }
}

//! Models from Hugging Face folders: `config.json`, safetensors weights (single or sharded) and
//! `tokenizer.json`. A Llama-family decoder for generation, a BERT encoder for embeddings.

mod bert;
mod config;
mod linear;
mod llama;
mod ops;
mod random;
mod resident;
mod source;
mod tokenizer;
mod weights;

pub use bert::BertModel;
pub use config::{DecoderConfig, EncoderConfig, ModelConfig, RopeScaling};
pub use linear::Linear;
pub use llama::{Engines, LlamaModel, Logits, StepSeq};
pub use random::{PRESETS, preset, random_decoder};
pub use resident::ResidentDecoder;
pub use source::{FileBytes, ModelSource};
pub use tokenizer::{TextStream, Tokenizer};
pub use weights::{WeightData, Weights};

use crate::error::Result;

/// The network of a model folder.
#[derive(Debug, Clone)]
pub enum Network {
    Decoder(LlamaModel),
    Encoder(BertModel),
}

/// A model folder, loaded: its network and its tokenizer.
#[derive(Debug, Clone)]
pub struct Model {
    pub network: Network,
    pub tokenizer: Tokenizer,
}

impl Model {
    /// Loads `config.json`, the weights and `tokenizer.json` from `source`.
    pub fn load(mut source: ModelSource) -> Result<Self> {
        let config = ModelConfig::parse(&source.read_text("config.json")?, &source.display("config.json"))?;
        let shown = source.display("tokenizer.json");
        let mut tokenizer = Tokenizer::from_bytes(&source.read("tokenizer.json")?, &shown)?;
        if let ModelConfig::Encoder(c) = &config {
            // sentence-transformers states the window it was trained with; else the model's limit.
            let window = encoder_window(&mut source)?.unwrap_or(c.max_position_embeddings);
            tokenizer.truncate_to(window.min(c.max_position_embeddings))?;
        }
        let weights = Weights::load(&mut source)?;
        let network = match config {
            ModelConfig::Decoder(c) => Network::Decoder(LlamaModel::load(c, &weights)?),
            ModelConfig::Encoder(c) => Network::Encoder(BertModel::load(c, &weights)?),
        };
        Ok(Self { network, tokenizer })
    }

    /// A short description: architecture and sizes.
    pub fn describe(&self) -> String {
        match &self.network {
            Network::Decoder(m) => {
                let c = &m.config;
                format!(
                    "{} decoder: {} layers, hidden {}, {} heads / {} KV heads x {}, vocab {}",
                    c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
                )
            }
            Network::Encoder(m) => {
                let c = &m.config;
                format!(
                    "bert encoder: {} layers, hidden {}, {} heads, vocab {}",
                    c.num_layers, c.hidden_size, c.num_heads, c.vocab_size
                )
            }
        }
    }
}

/// `max_seq_length` from a sentence-transformers `sentence_bert_config.json`, if there is one.
fn encoder_window(source: &mut ModelSource) -> Result<Option<usize>> {
    const FILE: &str = "sentence_bert_config.json";
    if !source.has(FILE) {
        return Ok(None);
    }
    let shown = source.display(FILE);
    let json: serde_json::Value = serde_json::from_str(&source.read_text(FILE)?)
        .map_err(|e| crate::TwinferError::ModelFile { file: shown, reason: format!("not valid JSON: {e}") })?;
    Ok(json.get("max_seq_length").and_then(|v| v.as_u64()).map(|n| n as usize).filter(|&n| n > 0))
}

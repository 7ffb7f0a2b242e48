//! Models from Hugging Face folders: `config.json`, safetensors weights (single or sharded) and
//! `tokenizer.json`. A Llama-family decoder for generation, a BERT encoder for embeddings.

mod bert;
mod bert_resident;
mod chat;
mod config;
mod elems;
pub mod gguf;
mod gguf_cursor;
mod gguf_model;
mod linear;
mod llama;
mod ops;
mod quantize;
mod random;
mod resident;
mod source;
mod stream;
mod tokenizer;
mod weights;

pub use bert::BertModel;
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{DecoderConfig, EncoderConfig, ModelConfig, RopeScaling};
pub use elems::Elems;
pub use linear::Linear;
pub use llama::{Engines, LlamaModel, Logits, StepSeq};
pub use quantize::WeightFormat;
pub use random::{PRESETS, preset, random_decoder, random_safetensors};
pub use resident::ResidentDecoder;
pub use source::{FileBytes, ModelSource};
pub use stream::{PreparedTensors, SafetensorsStream};
pub use tokenizer::{TextStream, Tokenizer};
pub use weights::{WeightData, Weights};

use crate::error::Result;

/// The network of a model folder.
#[derive(Debug, Clone)]
pub enum Network {
    /// A causal language model (Llama family) that generates text.
    Decoder(LlamaModel),
    /// A BERT-style encoder that embeds text.
    Encoder(BertModel),
}

/// A model folder, loaded: its network and its tokenizer.
#[derive(Debug, Clone)]
pub struct Model {
    /// The decoder or encoder network with its weights.
    pub network: Network,
    /// The tokenizer from `tokenizer.json` or the GGUF file.
    pub tokenizer: Tokenizer,
    /// The Jinja chat template (GGUF `tokenizer.chat_template`, or `chat_template` in
    /// `tokenizer_config.json`), when the model has one.
    pub chat_template: Option<String>,
}

impl Model {
    /// Loads `config.json`, the weights and `tokenizer.json` from `source`, or everything from
    /// its GGUF file when it is one.
    pub fn load(source: ModelSource) -> Result<Self> {
        Self::load_with(source, None)
    }

    /// Loads a decoder whose safetensors weights were converted as they streamed in
    /// ([`SafetensorsStream`]); `config.json` and `tokenizer.json` come from `source`.
    pub fn load_streamed(source: ModelSource, tensors: PreparedTensors) -> Result<Self> {
        Self::load_with(source, Some(tensors))
    }

    fn load_with(mut source: ModelSource, prepared: Option<PreparedTensors>) -> Result<Self> {
        if prepared.is_none()
            && let Some(name) = source.gguf_name()
        {
            return Self::load_gguf(&mut source, &name);
        }
        let config = ModelConfig::parse(&source.read_text("config.json")?, &source.display("config.json"))?;
        let shown = source.display("tokenizer.json");
        let mut tokenizer = Tokenizer::from_bytes(&source.read("tokenizer.json")?, &shown)?;
        if let ModelConfig::Encoder(c) = &config {
            // sentence-transformers states the window it was trained with; else the model's limit.
            let window = encoder_window(&mut source)?.unwrap_or(c.max_position_embeddings);
            tokenizer.truncate_to(window.min(c.max_position_embeddings))?;
        }
        let weights = match prepared {
            Some(tensors) if matches!(config, ModelConfig::Encoder(_)) => {
                return Err(crate::TwinferError::InvalidParameter(format!(
                    "{}: quantizing weights as they load applies to decoders, not to encoders",
                    tensors.file
                )));
            }
            Some(tensors) => Weights::from_prepared(tensors),
            None => Weights::load(&mut source)?,
        };
        let network = match config {
            ModelConfig::Decoder(c) => Network::Decoder(LlamaModel::load(c, &weights)?),
            ModelConfig::Encoder(c) => Network::Encoder(BertModel::load(c, &weights)?),
        };
        let chat_template = hf_chat_template(&mut source)?;
        Ok(Self { network, tokenizer, chat_template })
    }

    /// A GGUF file: metadata as the config, tokenizer metadata as the tokenizer, tensors under
    /// Hugging Face's names (quantized matrices stay quantized).
    fn load_gguf(source: &mut ModelSource, name: &str) -> Result<Self> {
        let shown = source.display(name);
        let mut file = gguf::GgufFile::parse(source.read(name)?, &shown)?;
        let config = gguf_model::config(&file)?;
        let tokenizer = gguf_model::tokenizer(&file)?;
        file.drop_tokenizer_metadata();
        let chat_template = gguf_model::chat_template(&file);
        let ModelConfig::Decoder(config) = config else {
            return Err(crate::TwinferError::ModelFile {
                file: shown,
                reason: "GGUF encoders are not supported".into(),
            });
        };
        let weights = Weights::from_gguf(file)?;
        Ok(Self { network: Network::Decoder(LlamaModel::load(config, &weights)?), tokenizer, chat_template })
    }

    /// The compiled chat template, with the model's BOS and EOS tokens in its scope; `None` when
    /// the model has no template.
    pub fn chat(&self) -> Result<Option<ChatTemplate>> {
        let Some(source) = &self.chat_template else { return Ok(None) };
        let (bos, eos) = match &self.network {
            Network::Decoder(m) => (m.config.bos_token_id, m.config.eos_token_ids.first().copied()),
            Network::Encoder(_) => (None, None),
        };
        let token = |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i)).unwrap_or_default();
        ChatTemplate::new(source.clone(), token(bos), token(eos)).map(Some)
    }

    /// A short description: architecture, sizes and, for decoders, the formats the projections
    /// are held in.
    pub fn describe(&self) -> String {
        match &self.network {
            Network::Decoder(m) => {
                let c = &m.config;
                let mut formats: Vec<String> = Vec::new();
                for (_, f) in m.projection_formats() {
                    for part in f.split('+') {
                        if !formats.iter().any(|x| x == part) {
                            formats.push(part.to_string());
                        }
                    }
                }
                format!(
                    "{} decoder: {} layers, hidden {}, {} heads / {} KV heads x {}, vocab {}; weights {}",
                    c.model_type,
                    c.num_layers,
                    c.hidden_size,
                    c.num_heads,
                    c.num_kv_heads,
                    c.head_dim,
                    c.vocab_size,
                    formats.join(", ")
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

/// `chat_template` from `tokenizer_config.json` (a string, or the `default` of a list of named
/// templates), if there is one.
fn hf_chat_template(source: &mut ModelSource) -> Result<Option<String>> {
    const FILE: &str = "tokenizer_config.json";
    if !source.has(FILE) {
        return Ok(None);
    }
    let shown = source.display(FILE);
    let json: serde_json::Value = serde_json::from_str(&source.read_text(FILE)?)
        .map_err(|e| crate::TwinferError::ModelFile { file: shown, reason: format!("not valid JSON: {e}") })?;
    Ok(match json.get("chat_template") {
        Some(serde_json::Value::String(t)) => Some(t.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    })
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

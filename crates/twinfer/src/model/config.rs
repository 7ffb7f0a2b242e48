//! `config.json` of a Hugging Face model folder, read into the two architectures twinfer runs.

use serde_json::Value;

use crate::error::{Result, TwinferError};

const SUPPORTED: &str = "llama, mistral, qwen2 (decoders); bert (encoder)";

/// A model's architecture and sizes.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// A Llama-family causal language model.
    Decoder(DecoderConfig),
    /// A BERT encoder.
    Encoder(EncoderConfig),
}

/// The Llama family: RMSNorm, RoPE, GQA, SwiGLU.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// `model_type` of `config.json`: `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP's hidden layer.
    pub intermediate_size: usize,
    /// Transformer layers (`num_hidden_layers`).
    pub num_layers: usize,
    /// Query heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Key/value heads (`num_key_value_heads`, default `num_heads`).
    pub num_kv_heads: usize,
    /// Elements per head (`head_dim`, default `hidden_size / num_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon (default 1e-6).
    pub rms_norm_eps: f32,
    /// RoPE base frequency (default 10000).
    pub rope_theta: f64,
    /// RoPE scaling for long contexts.
    pub rope_scaling: RopeScaling,
    /// The LM head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// Longest context, in tokens (default 4096).
    pub max_position_embeddings: usize,
    /// Mistral's sliding window, in tokens.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens: generation stops at any of them.
    pub eos_token_ids: Vec<u32>,
}

/// How RoPE frequencies are adjusted for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Position divisor.
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// Divisor of the low (long-wavelength) frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained at.
        original_max_position_embeddings: f64,
    },
}

/// BERT: learned absolute positions, post-LayerNorm, GELU.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the GELU MLP's hidden layer.
    pub intermediate_size: usize,
    /// Transformer layers (`num_hidden_layers`).
    pub num_layers: usize,
    /// Attention heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Learned positions, hence the longest input in tokens.
    pub max_position_embeddings: usize,
    /// Token type (segment) embeddings (default 2).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon (default 1e-12).
    pub layer_norm_eps: f32,
}

impl ModelConfig {
    /// Parses the text of `config.json`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text).map_err(|e| bad(file, format!("not valid JSON: {e}")))?;
        let c = Fields { json: &json, file };
        let model_type = c.str("model_type")?;
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => Ok(Self::Decoder(decoder(&c, model_type)?)),
            "bert" => Ok(Self::Encoder(encoder(&c)?)),
            _ => Err(TwinferError::UnsupportedArchitecture { model_type, supported: SUPPORTED }),
        }
    }
}

fn decoder(c: &Fields<'_>, model_type: String) -> Result<DecoderConfig> {
    let hidden_size = c.usize("hidden_size")?;
    let num_heads = c.usize("num_attention_heads")?;
    let num_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = match c.opt_usize("head_dim")? {
        Some(d) => d,
        None if num_heads > 0 && hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
        None => return Err(bad(c.file, format!("hidden_size {hidden_size} is not a multiple of {num_heads} heads"))),
    };
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(bad(c.file, format!("{num_heads} attention heads cannot share {num_kv_heads} KV heads")));
    }
    let qkv_bias = match c.opt_bool("attention_bias")? {
        Some(b) => b,
        None => model_type == "qwen2",
    };
    let sliding_window = match model_type.as_str() {
        "qwen2" if !c.opt_bool("use_sliding_window")?.unwrap_or(false) => None,
        _ => c.opt_usize("sliding_window")?,
    };
    Ok(DecoderConfig {
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_layers: c.usize("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        rope_theta: c.opt_f64("rope_theta")?.unwrap_or(10_000.0),
        rope_scaling: rope_scaling(c)?,
        tie_word_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        max_position_embeddings: c.opt_usize("max_position_embeddings")?.unwrap_or(4096),
        sliding_window,
        bos_token_id: c.opt_ids("bos_token_id")?.first().copied(),
        eos_token_ids: c.opt_ids("eos_token_id")?,
        model_type,
    })
}

fn rope_scaling(c: &Fields<'_>) -> Result<RopeScaling> {
    let Some(obj) = c.json.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let s = Fields { json: obj, file: c.file };
    let kind = match s.json.get("rope_type").or_else(|| s.json.get("type")) {
        Some(Value::String(k)) => k.as_str(),
        _ => "default",
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: s.f64("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: s.f64("factor")?,
            low_freq_factor: s.f64("low_freq_factor")?,
            high_freq_factor: s.f64("high_freq_factor")?,
            original_max_position_embeddings: s.f64("original_max_position_embeddings")?,
        }),
        other => Err(bad(c.file, format!("rope_scaling type {other:?} is not supported (linear, llama3)"))),
    }
}

fn encoder(c: &Fields<'_>) -> Result<EncoderConfig> {
    let act = c.opt_str("hidden_act")?.unwrap_or_else(|| "gelu".into());
    if act != "gelu" {
        return Err(bad(c.file, format!("hidden_act {act:?} is not supported (gelu)")));
    }
    let hidden_size = c.usize("hidden_size")?;
    let num_heads = c.usize("num_attention_heads")?;
    if num_heads == 0 || !hidden_size.is_multiple_of(num_heads) {
        return Err(bad(c.file, format!("hidden_size {hidden_size} is not a multiple of {num_heads} heads")));
    }
    Ok(EncoderConfig {
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_layers: c.usize("num_hidden_layers")?,
        num_heads,
        max_position_embeddings: c.usize("max_position_embeddings")?,
        type_vocab_size: c.opt_usize("type_vocab_size")?.unwrap_or(2),
        layer_norm_eps: c.opt_f64("layer_norm_eps")?.unwrap_or(1e-12) as f32,
    })
}

impl DecoderConfig {
    /// Width of the concatenated query heads: `num_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    /// Width of the concatenated key (or value) heads: `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

impl EncoderConfig {
    /// Elements per head: `hidden_size / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

fn bad(file: &str, reason: String) -> TwinferError {
    TwinferError::ModelFile { file: file.to_string(), reason }
}

/// Typed access to a JSON object's fields, with errors that name the file and the field.
struct Fields<'a> {
    json: &'a Value,
    file: &'a str,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }
    fn missing(&self, key: &str) -> TwinferError {
        bad(self.file, format!("field {key:?} is missing"))
    }
    fn wrong(&self, key: &str, want: &str) -> TwinferError {
        bad(self.file, format!("field {key:?} must be {want}"))
    }
    fn str(&self, key: &str) -> Result<String> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        self.get(key).map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.wrong(key, "a string"))).transpose()
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| self.wrong(key, "a positive integer"))
            })
            .transpose()
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| self.wrong(key, "a positive number"))
            })
            .transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.wrong(key, "true or false"))).transpose()
    }
    /// A token id or a list of them (`eos_token_id` is either).
    fn opt_ids(&self, key: &str) -> Result<Vec<u32>> {
        let one =
            |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| self.wrong(key, "token ids"));
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_config_parses_with_its_defaults() {
        let text = r#"{"model_type":"llama","vocab_size":512,"hidden_size":256,"intermediate_size":512,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"rms_norm_eps":1e-5,
            "rope_theta":500000.0,"eos_token_id":[1,2],"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}}"#;
        let ModelConfig::Decoder(c) = ModelConfig::parse(text, "config.json").unwrap() else { panic!() };
        assert_eq!((c.head_dim, c.num_kv_heads, c.qkv_bias, c.tie_word_embeddings), (64, 1, false, false));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let unknown = ModelConfig::parse(r#"{"model_type":"gpt2"}"#, "c.json").unwrap_err();
        assert!(matches!(unknown, TwinferError::UnsupportedArchitecture { .. }), "{unknown}");
        let missing = ModelConfig::parse(r#"{"model_type":"llama","vocab_size":3}"#, "c.json").unwrap_err();
        assert!(missing.to_string().contains("hidden_size"), "{missing}");
        let garbage = ModelConfig::parse("{", "c.json").unwrap_err();
        assert!(matches!(garbage, TwinferError::ModelFile { .. }));
        let ratio = r#"{"model_type":"llama","vocab_size":8,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#;
        assert!(ModelConfig::parse(ratio, "c.json").unwrap_err().to_string().contains("KV heads"));
    }
}

//! A GGUF file as a model: its metadata read as a `config.json`, its tokenizer metadata built
//! into a `tokenizers` byte-level BPE, and its tensors served under Hugging Face's names, so the
//! decoder loads the same way from either source.
//!
//! GGUF files of the `llama` architecture store the Q and K projection rows permuted for
//! llama.cpp's RoPE, which rotates adjacent pairs `(x[2i], x[2i+1])` of a head; twinfer rotates
//! halves `(x[i], x[i + d/2])` like Hugging Face, so those rows are put back in Hugging Face's
//! order at load (row `h*d + 2i + half` of the file becomes row `h*d + half*d/2 + i`). Rows are
//! moved whole, so quantized rows move without decoding. Other architectures (qwen2) are stored
//! unpermuted.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::dtype::DType;
use crate::error::{Result, TwinferError};
use crate::model::config::ModelConfig;
use crate::model::gguf::{GgmlType, GgufFile, MetaValue};
use crate::model::source::FileBytes;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::WeightData;
use crate::quant::PackedQuant;

/// The architectures whose GGUF tensors and metadata this maps.
const ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// A GGUF file's tensors under Hugging Face's names.
#[derive(Debug)]
pub(crate) struct GgufWeights {
    file: GgufFile,
    arch: String,
    heads: usize,
    kv_heads: usize,
}

impl GgufWeights {
    pub(crate) fn new(file: GgufFile) -> Result<Self> {
        let arch = architecture(&file)?;
        let heads = file.require(&format!("{arch}.attention.head_count"), "a count", MetaValue::as_u64)? as usize;
        let kv_heads = match file.metadata(&format!("{arch}.attention.head_count_kv")) {
            Some(v) => v.as_u64().ok_or_else(|| bad(&file, "head_count_kv is not a count"))? as usize,
            None => heads,
        };
        Ok(Self { file, arch, heads, kv_heads })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.tensor(&g).is_some())
    }

    /// The tensor Hugging Face calls `name`, of `shape` (outermost first).
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<WeightData> {
        let err = |tensor: &str, reason: String| TwinferError::ModelTensor {
            file: self.file.file.clone(),
            tensor: tensor.into(),
            reason,
        };
        let gname = gguf_name(name).ok_or_else(|| err(name, "has no GGUF counterpart".into()))?;
        let t = self.file.tensor(&gname).ok_or_else(|| err(&gname, format!("missing (the model's {name})")))?;
        let dims: Vec<usize> = t.dims.iter().rev().copied().collect();
        if dims != shape {
            return Err(err(&gname, format!("shape {dims:?}, expected {shape:?}")));
        }
        let (n, k) = if shape.len() == 2 { (shape[0], shape[1]) } else { (1, shape.iter().product()) };
        let groups = match (self.arch.as_str(), name.rsplit('.').nth(1)) {
            ("llama", Some("q_proj")) => Some(self.heads),
            ("llama", Some("k_proj")) => Some(self.kv_heads),
            _ => None,
        };
        // The bytes to read from: the file itself, or the rows put back in Hugging Face's order.
        let (source, range) = match groups {
            Some(h) => {
                if h == 0 || !n.is_multiple_of(2 * h) {
                    return Err(err(&gname, format!("{n} rows do not split into {h} heads of pairs")));
                }
                let permuted = unpermute_rows(self.file.data(t), n, h);
                let len = permuted.len();
                (Arc::new(FileBytes::Owned(permuted)), 0..len)
            }
            None => (self.file.shared_bytes().clone(), t.start..t.start + t.len),
        };
        let data = match t.ty {
            GgmlType::F32 => WeightData::from_file(&source, range, DType::F32),
            GgmlType::F16 => WeightData::from_file(&source, range, DType::F16),
            GgmlType::BF16 => WeightData::from_file(&source, range, DType::BF16),
            GgmlType::Quant(format) => WeightData::Quant(
                PackedQuant::from_row_bytes(format, n, k, &source[range]).map_err(|e| err(&gname, e.to_string()))?,
            ),
        };
        // Copied out (packed, or permuted): its pages need not stay resident beside the copy.
        if !data.in_file() || groups.is_some() {
            self.file.release(t);
        }
        Ok(data)
    }
}

/// Rows `h*d + 2i + half` of the file go to `h*d + half*d/2 + i` (see the module notes).
fn unpermute_rows(bytes: &[u8], n: usize, heads: usize) -> Vec<u8> {
    let row = bytes.len() / n;
    let d = n / heads;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for half in 0..2 {
                let from = h * d + 2 * i + half;
                let to = h * d + half * d / 2 + i;
                out[to * row..(to + 1) * row].copy_from_slice(&bytes[from * row..(from + 1) * row]);
            }
        }
    }
    out
}

/// The GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

fn bad(file: &GgufFile, reason: &str) -> TwinferError {
    TwinferError::ModelFile { file: file.file.clone(), reason: reason.into() }
}

fn architecture(file: &GgufFile) -> Result<String> {
    let arch = file.require("general.architecture", "a string", |v| v.as_str().map(str::to_string))?;
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(TwinferError::UnsupportedArchitecture { model_type: arch, supported: "llama, qwen2 (GGUF)" });
    }
    Ok(arch)
}

/// The model's configuration, as the `config.json` its metadata describes.
pub(crate) fn config(file: &GgufFile) -> Result<ModelConfig> {
    let arch = architecture(file)?;
    let key = |k: &str| format!("{arch}.{k}");
    let count = |k: &str| file.require(&key(k), "a count", MetaValue::as_u64);
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(bad(file, "per-frequency RoPE factors (rope_freqs, Llama 3.1 scaling) are not supported yet"));
    }
    let heads = count("attention.head_count")?;
    let vocab = match file.metadata(&key("vocab_size")).and_then(MetaValue::as_u64) {
        Some(v) => v,
        None => tokens(file)?.len() as u64,
    };
    let mut c = Map::new();
    c.insert("model_type".into(), json!(arch));
    c.insert("hidden_size".into(), json!(count("embedding_length")?));
    c.insert("intermediate_size".into(), json!(count("feed_forward_length")?));
    c.insert("num_hidden_layers".into(), json!(count("block_count")?));
    c.insert("num_attention_heads".into(), json!(heads));
    if let Some(kv) = file.metadata(&key("attention.head_count_kv")).and_then(MetaValue::as_u64) {
        c.insert("num_key_value_heads".into(), json!(kv));
    }
    if let Some(d) = file.metadata(&key("attention.key_length")).and_then(MetaValue::as_u64) {
        c.insert("head_dim".into(), json!(d));
    }
    c.insert("vocab_size".into(), json!(vocab));
    if let Some(ctx) = file.metadata(&key("context_length")).and_then(MetaValue::as_u64) {
        c.insert("max_position_embeddings".into(), json!(ctx));
    }
    if let Some(eps) = file.metadata(&key("attention.layer_norm_rms_epsilon")).and_then(MetaValue::as_f64) {
        // The file stores f32; its shortest decimal is what the model was trained with.
        c.insert("rms_norm_eps".into(), json!(format!("{}", eps as f32).parse::<f64>().unwrap_or(eps)));
    }
    if let Some(theta) = file.metadata(&key("rope.freq_base")).and_then(MetaValue::as_f64) {
        c.insert("rope_theta".into(), json!(theta));
    }
    match file.metadata(&key("rope.scaling.type")).and_then(MetaValue::as_str) {
        None | Some("none") => {}
        Some("linear") => {
            let factor = file.require(&key("rope.scaling.factor"), "a number", MetaValue::as_f64)?;
            c.insert("rope_scaling".into(), json!({"type": "linear", "factor": factor}));
        }
        Some(other) => return Err(bad(file, &format!("RoPE scaling {other:?} is not supported (linear is)"))),
    }
    c.insert("tie_word_embeddings".into(), json!(file.tensor("output.weight").is_none()));
    c.insert("attention_bias".into(), json!(file.tensor("blk.0.attn_q.bias").is_some()));
    if let Some(bos) = file.metadata("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64) {
        c.insert("bos_token_id".into(), json!(bos));
    }
    let eos: Vec<u64> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| file.metadata(k).and_then(MetaValue::as_u64))
        .fold(Vec::new(), |mut v, id| {
            if !v.contains(&id) {
                v.push(id);
            }
            v
        });
    c.insert("eos_token_id".into(), json!(eos));
    ModelConfig::parse(&Value::Object(c).to_string(), &file.file)
}

fn tokens(file: &GgufFile) -> Result<Vec<&str>> {
    let list = file
        .metadata("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .ok_or_else(|| bad(file, "tokenizer.ggml.tokens is missing or not a list"))?;
    list.iter().map(|t| t.as_str().ok_or_else(|| bad(file, "tokenizer.ggml.tokens holds a non-string"))).collect()
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, in `tokenizers` JSON.
fn pre_tokenizer(file: &GgufFile, pre: &str) -> Result<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    // GPT-2's own split is what ByteLevel's built-in regex does.
    Ok(match pre {
        "gpt-2" | "gpt2" | "default" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        other => {
            return Err(TwinferError::Tokenizer {
                file: file.file.clone(),
                reason: format!("pre-tokenizer {other:?} is not supported (gpt2, smollm, qwen2, llama-bpe)"),
            });
        }
    })
}

/// The tokenizer described by the `tokenizer.ggml.*` metadata: a byte-level BPE (the `gpt2`
/// model) with its pre-tokenizer and special tokens.
pub(crate) fn tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let tok_err = |reason: String| TwinferError::Tokenizer { file: file.file.clone(), reason };
    let model = file.require("tokenizer.ggml.model", "a string", |v| v.as_str().map(str::to_string))?;
    if model != "gpt2" {
        return Err(tok_err(format!("tokenizer model {model:?} is not supported (the byte-level BPE \"gpt2\" is)")));
    }
    let tokens = tokens(file)?;
    let types: Vec<i64> = match file.metadata("tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
        Some(a) => a.iter().map(|v| if let MetaValue::Int(i) = v { *i } else { 1 }).collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(tok_err(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let merges: Vec<&str> = match file.metadata("tokenizer.ggml.merges").and_then(MetaValue::as_array) {
        Some(a) => a
            .iter()
            .map(|m| m.as_str().ok_or_else(|| tok_err("a merge is not a string".into())))
            .collect::<Result<_>>()?,
        None => return Err(tok_err("tokenizer.ggml.merges is missing".into())),
    };
    let vocab: Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
    // Control (3) and user-defined (4) tokens are matched whole before the BPE sees the text.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(i, t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                             "rstrip": false, "normalized": false, "special": *t == 3})
        })
        .collect();
    let pre = file.metadata("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
    let add_bos = file.metadata("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(false);
    let post = match file.metadata("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64) {
        Some(bos) if add_bos => {
            let text = tokens.get(bos as usize).ok_or_else(|| tok_err(format!("bos id {bos} is not a token")))?;
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {*text: {"id": text, "ids": [bos], "tokens": [text]}}})
        }
        _ => Value::Null,
    };
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(file, pre)?,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    Tokenizer::from_bytes(json.to_string().as_bytes(), &file.file)
}

/// The chat template (`tokenizer.chat_template`), if the file has one.
pub(crate) fn chat_template(file: &GgufFile) -> Option<String> {
    file.metadata("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_map_to_gguf_names() {
        assert_eq!(gguf_name("model.layers.3.self_attn.q_proj.weight").as_deref(), Some("blk.3.attn_q.weight"));
        assert_eq!(gguf_name("model.layers.0.self_attn.k_proj.bias").as_deref(), Some("blk.0.attn_k.bias"));
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.1.mlp.other.weight"), None);
    }

    /// Interleaved pairs (llama.cpp's order) come back as halves (Hugging Face's).
    #[test]
    fn unpermuting_restores_the_halves_order() {
        // 2 heads of dim 4, one byte per row: the file holds rows [a0 b0 a1 b1] per head, where
        // a is the first half and b the second.
        let file = [0u8, 2, 1, 3, 4, 6, 5, 7];
        assert_eq!(unpermute_rows(&file, 8, 2), vec![0, 1, 2, 3, 4, 5, 6, 7]);
    }
}

//! Llama-shaped decoders with seeded random weights, for timing the engine on real model shapes
//! without downloading one. The weights go through the same safetensors loader as a real model.

use std::collections::HashMap;

use crate::dtype::DType;
use crate::error::{Result, TwinferError};
use crate::model::config::{DecoderConfig, RopeScaling};
use crate::model::llama::LlamaModel;
use crate::model::source::ModelSource;
use crate::model::weights::Weights;

/// Public model shapes the engine can be timed on.
pub const PRESETS: &[&str] = &["smollm-135m", "smollm-360m", "qwen2.5-0.5b", "tiny"];

/// The shape of a preset (its config.json, in effect).
pub fn preset(name: &str) -> Result<DecoderConfig> {
    let llama = |hidden, layers, heads, kv_heads, inter, vocab| DecoderConfig {
        model_type: "llama".into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: true,
        qkv_bias: false,
        max_position_embeddings: 1 << 17,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    Ok(match name {
        "smollm-135m" => llama(576, 30, 9, 3, 1536, 49_152),
        "smollm-360m" => llama(960, 32, 15, 5, 2560, 49_152),
        "qwen2.5-0.5b" => DecoderConfig {
            model_type: "qwen2".into(),
            qkv_bias: true,
            rope_theta: 1_000_000.0,
            ..llama(896, 24, 14, 2, 4864, 151_936)
        },
        "tiny" => llama(256, 4, 4, 1, 768, 4096),
        other => {
            return Err(TwinferError::InvalidParameter(format!(
                "unknown model preset {other:?} (known: {})",
                PRESETS.join(", ")
            )));
        }
    })
}

/// A decoder of shape `config` with weights uniform in ±0.035 (std 0.02), norms at 1, stored
/// as `dtype`; the same seed gives the same weights.
pub fn random_decoder(config: DecoderConfig, dtype: DType, seed: u64) -> Result<LlamaModel> {
    let bytes = random_safetensors(&config, dtype, seed)?;
    let mut source = ModelSource::Files(HashMap::from([("model.safetensors".to_string(), bytes)]));
    let weights = Weights::load(&mut source)?;
    LlamaModel::load(config, &weights)
}

/// The `model.safetensors` file of [`random_decoder`]: Hugging Face's tensor names in the
/// preset's shapes, an untied `lm_head.weight` only when the config says so.
pub fn random_safetensors(config: &DecoderConfig, dtype: DType, seed: u64) -> Result<Vec<u8>> {
    if dtype == DType::Q8 {
        return Err(TwinferError::InvalidParameter(
            "random weights are f32, f16 or bf16 (q8 is a KV cache type; quantize weights with --quantize)".into(),
        ));
    }
    let c = config;
    let (h, q, kv, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let mut tensors: Vec<(String, Vec<usize>, bool)> =
        vec![("model.embed_tokens.weight".into(), vec![c.vocab_size, h], false)];
    for i in 0..c.num_layers {
        let l = format!("model.layers.{i}");
        tensors.push((format!("{l}.input_layernorm.weight"), vec![h], true));
        tensors.push((format!("{l}.post_attention_layernorm.weight"), vec![h], true));
        for (name, n, k) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)] {
            tensors.push((format!("{l}.self_attn.{name}.weight"), vec![n, k], false));
            if c.qkv_bias && name != "o_proj" {
                tensors.push((format!("{l}.self_attn.{name}.bias"), vec![n], false));
            }
        }
        for (name, n, k) in [("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)] {
            tensors.push((format!("{l}.mlp.{name}.weight"), vec![n, k], false));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h], true));
    if !c.tie_word_embeddings {
        tensors.push(("lm_head.weight".into(), vec![c.vocab_size, h], false));
    }
    Ok(safetensors_bytes(&tensors, dtype, seed))
}

/// A safetensors file: an 8-byte header length, the JSON header, then the tensors' bytes.
fn safetensors_bytes(tensors: &[(String, Vec<usize>, bool)], dtype: DType, seed: u64) -> Vec<u8> {
    let name = match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::Q8 => unreachable!("refused by random_decoder"),
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (tensor, shape, _) in tensors {
        let len = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            tensor.clone(),
            serde_json::json!({"dtype": name, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut json = serde_json::Value::Object(header).to_string();
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (_, shape, ones) in tensors {
        for _ in 0..shape.iter().product::<usize>() {
            let x = if *ones {
                1.0
            } else {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.0346
            };
            match dtype {
                DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
                DType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                DType::Q8 => unreachable!("refused by random_decoder"),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_load_and_unknown_ones_are_errors() {
        let m = random_decoder(preset("tiny").unwrap(), DType::F16, 1).unwrap();
        assert_eq!(m.config.num_layers, 4);
        assert!(m.weight_bytes() > 2 * 4096 * 256);
        assert!(preset("gpt-5").is_err());
    }
}

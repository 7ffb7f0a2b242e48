//! Safetensors converted as they stream in (`SafetensorsStream`, the browser's loader for
//! in-situ quantization): the same model, bit for bit, as loading the whole file and quantizing
//! it, whatever the chunking; never the float file held; every malformed or truncated stream a
//! typed error naming the file or the tensor.

use std::collections::HashMap;

use twinfer::kv::{KvCacheConfig, KvLayout, PagedKvCache};
use twinfer::model::{
    DecoderConfig, Engines, LlamaModel, Logits, ModelSource, PreparedTensors, SafetensorsStream, StepSeq, Weights,
    preset, random_safetensors,
};
use twinfer::quant::QuantFormat;
use twinfer::{Attention, DType, TwinferError, cpu::SimdLevel};

const FILE: &str = "model.safetensors";

/// xorshift64: chunk lengths that differ from run to run of the seed, not between runs.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Streams `bytes` in random chunks (1-byte ones through the header, then up to `max`), and
/// returns the tensors with the most bytes the stream held at any point.
fn stream(bytes: &[u8], format: QuantFormat, seed: u64, max: usize) -> twinfer::Result<(PreparedTensors, usize)> {
    // Odd seeds as a download of known length, even ones of unknown length.
    let total = (seed % 2 == 1).then_some(bytes.len() as u64);
    let mut s = SafetensorsStream::new(FILE, format, total)?;
    let (mut state, mut at, mut peak) = (seed | 1, 0, 0);
    while at < bytes.len() {
        let n = if at < 64 { 1 } else { 1 + next(&mut state) as usize % max };
        let end = (at + n).min(bytes.len());
        s.push(&bytes[at..end])?;
        peak = peak.max(s.held_bytes());
        at = end;
    }
    Ok((s.finish()?, peak))
}

fn whole_file(config: &DecoderConfig, bytes: Vec<u8>) -> LlamaModel {
    let mut source = ModelSource::Files(HashMap::from([(FILE.to_string(), bytes)]));
    LlamaModel::load(config.clone(), &Weights::load(&mut source).unwrap()).unwrap()
}

/// Logits at every position of a short prompt, on this CPU's widest SIMD level.
fn logits(model: &LlamaModel) -> Vec<f32> {
    let cpu = Attention::cpu(SimdLevel::detect());
    let c = &model.config;
    let layout = KvLayout::new(16, c.num_kv_heads, c.head_dim).unwrap();
    let mut cache =
        PagedKvCache::new(KvCacheConfig { num_layers: c.num_layers, num_pages: 8, layout, dtype: DType::F32 }).unwrap();
    let seq = cache.add_sequence();
    let prompt = [5u32, 17, 400, 3, 4095, 9];
    cache.reserve(&[seq], &[prompt.len()]).unwrap();
    let engines = Engines { level: SimdLevel::detect(), prefill: &cpu, decode: &cpu };
    model.forward(engines, &mut cache, &[StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::All }]).unwrap()
}

#[test]
fn streamed_quantization_equals_quantizing_the_loaded_model() {
    for tied in [true, false] {
        for format in [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let mut config = preset("tiny").unwrap();
            config.tie_word_embeddings = tied;
            let bytes = random_safetensors(&config, DType::BF16, 11).unwrap();
            let mut whole = whole_file(&config, bytes.clone());
            whole.quantize(format).unwrap();
            let want = logits(&whole);
            let formats = whole.projection_formats();
            let head = &formats.iter().find(|(n, _)| n == "lm_head").unwrap().1;
            // A tied table is one Q8_0 copy for the lookup and the logits; an untied head takes
            // the format of the projections.
            assert_eq!(head, if tied { "q8_0" } else { format.name() }, "tied {tied} {format:?}");
            for (seed, max) in [(1, 7), (2, 4096), (3, 1 << 20)] {
                let (tensors, peak) = stream(&bytes, format, seed, max).unwrap();
                let mut streamed = LlamaModel::load(config.clone(), &Weights::from_prepared(tensors)).unwrap();
                streamed.quantize(format).unwrap();
                let what = format!("tied {tied} {format:?} chunks up to {max}");
                assert_eq!(streamed.projection_formats(), formats, "{what}");
                assert_eq!(streamed.weight_bytes(), whole.weight_bytes(), "{what}");
                let got = logits(&streamed);
                assert!(got.iter().all(|x| x.is_finite()), "{what}");
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: logits differ");
                // Never the float file: at most the converted tensors plus one matrix's blocks
                // and one float row (the bf16 file is 2 bytes a weight; 4-bit blocks 0.56-0.63).
                assert!(peak < bytes.len() * 3 / 4, "{what}: held {peak} of a {}-byte file", bytes.len());
            }
        }
    }
}

/// A small safetensors file from a JSON header and a data section.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// The stream's error, its length unknown (a download cut short does not know it is short).
fn expect_err(bytes: &[u8]) -> TwinferError {
    match stream(bytes, QuantFormat::Q4_0, 6, 16) {
        Ok(_) => panic!("a malformed stream loaded"),
        Err(e) => e,
    }
}

#[test]
fn malformed_and_truncated_streams_are_typed_errors() {
    let proj = r#"{"model.layers.0.self_attn.q_proj.weight":{"dtype":"F16","shape":[2,32],"data_offsets":[0,128]},"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[128,136]}}"#;
    let good = file(proj, &[0u8; 136]);
    let (tensors, _) = stream(&good, QuantFormat::Q4_0, 1, 16).unwrap();
    assert_eq!(tensors.len(), 2);

    // Cut inside the header, inside the quantized matrix and inside the last tensor.
    for cut in [3, 20, 8 + proj.len() + 70, good.len() - 1] {
        let e = expect_err(&good[..cut]);
        let text = e.to_string();
        match cut {
            3 | 20 => assert!(matches!(e, TwinferError::ModelFile { .. }) && text.contains("header"), "{text}"),
            _ => assert!(matches!(e, TwinferError::ModelTensor { .. }) && text.contains("ended inside"), "{text}"),
        }
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(expect_err(&trailing).to_string().contains("after the last tensor"));

    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(expect_err(&huge).to_string().contains("header of"));
    assert!(expect_err(&file("{not json", &[])).to_string().contains("not a valid safetensors header"));
    let overlapping = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    assert!(matches!(expect_err(&file(overlapping, &[0u8; 12])), TwinferError::ModelFile { .. }));
    let ints = r#"{"model.norm.weight":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#;
    let e = expect_err(&file(ints, &[0u8; 4]));
    assert!(matches!(&e, TwinferError::ModelTensor { tensor, .. } if tensor == "model.norm.weight"), "{e}");
    let ragged = r#"{"model.layers.0.mlp.up_proj.weight":{"dtype":"F32","shape":[2,40],"data_offsets":[0,320]}}"#;
    let e = expect_err(&file(ragged, &[0u8; 320]));
    assert!(e.to_string().contains("whole blocks"), "{e}");
    // Non-finite weights cannot be quantized to finite scales: refused, not stored as NaN.
    let nan: Vec<u8> = std::iter::repeat_n(f32::NAN.to_le_bytes(), 64).flatten().collect();
    let q = r#"{"model.layers.0.mlp.up_proj.weight":{"dtype":"F32","shape":[2,32],"data_offsets":[0,256]}}"#;
    let e = expect_err(&file(q, &nan));
    assert!(matches!(&e, TwinferError::ModelTensor { .. }), "{e}");
    assert!(SafetensorsStream::new(FILE, QuantFormat::Q4_K, None).is_err(), "Q4_K is read from GGUF files only");
}

/// A header that announces more than the file holds is refused before any room is reserved for
/// it when the length is known; when it is not, nothing is reserved beyond what has arrived.
#[test]
fn a_header_cannot_claim_memory_the_file_does_not_have() {
    // 4 GB of f32 "norm weights" announced, 64 bytes sent.
    let lie = r#"{"model.norm.weight":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}}"#;
    let bytes = file(lie, &[0u8; 64]);
    let mut known = SafetensorsStream::new(FILE, QuantFormat::Q4_0, Some(bytes.len() as u64)).unwrap();
    let e = known.push(&bytes).expect_err("a header larger than its file was accepted");
    assert!(e.to_string().contains("announces"), "{e}");
    let mut unknown = SafetensorsStream::new(FILE, QuantFormat::Q4_0, None).unwrap();
    unknown.push(&bytes).unwrap();
    assert!(unknown.held_bytes() < 1 << 20, "held {} bytes for 64 received", unknown.held_bytes());
    let e = unknown.finish().expect_err("a truncated stream finished");
    assert!(e.to_string().contains("ended inside"), "{e}");
    // The same for a quantized matrix with a huge row.
    let wide =
        r#"{"model.layers.0.mlp.up_proj.weight":{"dtype":"F16","shape":[2,1000000000],"data_offsets":[0,4000000000]}}"#;
    let bytes = file(wide, &[0u8; 64]);
    let mut unknown = SafetensorsStream::new(FILE, QuantFormat::Q4_0, None).unwrap();
    unknown.push(&bytes).unwrap();
    assert!(unknown.held_bytes() < 1 << 20, "held {} bytes for 64 received", unknown.held_bytes());
}

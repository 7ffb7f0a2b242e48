//! candle's BERT on one text: tokenize, forward, mean-pool over the attention mask and
//! L2-normalize (sentence-transformers' pipeline for all-MiniLM-L6-v2, as `twinfer embed`
//! runs it); one cold call, then the median and range of N warm calls.
//! Usage: candle-bert-peer MODEL_DIR REPEATS TEXT

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, repeats, text) = (&args[1], args[2].parse::<usize>()?, &args[3]);
    let device = Device::Cpu;
    let config: Config = serde_json::from_str(&std::fs::read_to_string(format!("{dir}/config.json"))?)?;
    let tokenizer = tokenizers::Tokenizer::from_file(format!("{dir}/tokenizer.json")).map_err(|e| e.to_string())?;
    // SAFETY: the weights file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[format!("{dir}/model.safetensors")], DType::F32, &device)? };
    let model = BertModel::load(vb, &config)?;
    let embed = || -> Result<(usize, Vec<f32>), Box<dyn std::error::Error>> {
        let encoding = tokenizer.encode(text.as_str(), true).map_err(|e| e.to_string())?;
        let ids = Tensor::new(encoding.get_ids(), &device)?.unsqueeze(0)?;
        let types = ids.zeros_like()?;
        let mask = Tensor::new(encoding.get_attention_mask(), &device)?.unsqueeze(0)?;
        let hidden = model.forward(&ids, &types, Some(&mask))?;
        let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = hidden.broadcast_mul(&mask_f)?.sum(1)?.broadcast_div(&mask_f.sum(1)?)?;
        let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
        let unit = pooled.broadcast_div(&norm)?;
        Ok((encoding.get_ids().len(), unit.flatten_all()?.to_vec1::<f32>()?))
    };
    let t = Instant::now();
    let (tokens, first) = embed()?;
    let cold = t.elapsed().as_secs_f64() * 1e3;
    let mut warm: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            let (_, v) = embed().expect("embedding");
            assert_eq!(v, first, "repeats must give the same embedding");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    warm.sort_by(f64::total_cmp);
    println!(
        "candle {tokens} tokens: cold {cold:.1} ms, warm median {:.2} ms [{:.2}..{:.2}] over {repeats}; first values {:?}",
        warm[repeats / 2],
        warm[0],
        warm[repeats - 1],
        &first[..4]
    );
    Ok(())
}

//! A float model rounded to bf16 at load (`--quantize bf16`): its projections take activations
//! rounded to bf16 (bf16 dot products where the CPU has them, f32 products of the same values
//! elsewhere). The two tiny decoders against the float64 reference, on every CPU level, and a
//! decode row's logits alone against the same row in a batch that takes the prompt-chunk path.
#![cfg(not(target_arch = "wasm32"))]

use twinfer::kv::{KvCacheConfig, KvLayout, PagedKvCache};
use twinfer::model::{Engines, LlamaModel, Logits, Model, ModelSource, Network, StepSeq, WeightFormat};
use twinfer::{Attention, DType};
use twinfer_tests::models::{floats, golden, ids, levels, model_dir, rel_err};

const MODELS: [&str; 2] = ["tiny-llama", "tiny-qwen2"];

fn load_bf16(name: &str) -> LlamaModel {
    let Network::Decoder(mut model) = Model::load(ModelSource::dir(model_dir(name))).unwrap().network else {
        panic!("{name} is not a decoder");
    };
    model.quantize(WeightFormat::Bf16).unwrap();
    for (tensor, format) in model.projection_formats() {
        assert_eq!(format, "bf16", "{name}: {tensor}");
    }
    model
}

fn cache(model: &LlamaModel, pages: usize) -> PagedKvCache {
    let c = &model.config;
    let layout = KvLayout::new(16, c.num_kv_heads, c.head_dim).unwrap();
    PagedKvCache::new(KvCacheConfig { num_layers: c.num_layers, num_pages: pages, layout, dtype: DType::F32 }).unwrap()
}

/// Prompt logits at every position against the f64 reference of the float model: two roundings
/// to bf16 (weights and activations, 2^-9 of each value at most) through every layer measured
/// 1.9e-2 (tiny-llama) and 2.6e-2 to 2.7e-2 (tiny-qwen2) of the largest logit on an AVX-512 EPYC.
const REFERENCE_RTOL: f64 = 4e-2;
/// Between levels only the order of the f32 sums differs, and through it now and then an
/// activation's rounding to bf16: 2.3e-3 to 2.8e-3 measured there.
const LEVELS_RTOL: f64 = 6e-3;

#[test]
fn a_bf16_model_stays_within_its_rounding_of_the_float_reference_on_every_level() {
    for name in MODELS {
        let model = load_bf16(name);
        let g = golden(name);
        let prompt = ids(&g["prompt_ids"]);
        let vocab = model.config.vocab_size;
        let want = g["prefill_logits"].as_array().unwrap();
        let mut first: Option<Vec<f32>> = None;
        for level in levels() {
            let attention = Attention::cpu(level);
            let engines = Engines { level, prefill: &attention, decode: &attention };
            let mut cache = cache(&model, 64);
            let seq = cache.add_sequence();
            cache.reserve(&[seq], &[prompt.len()]).unwrap();
            let step = StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::All };
            let logits = model.forward(engines, &mut cache, &[step]).unwrap();
            let mut worst = 0f64;
            for (p, row) in want.iter().enumerate() {
                worst = worst.max(rel_err(&logits[p * vocab..(p + 1) * vocab], &floats(row)));
            }
            let across = first.as_ref().map_or(0.0, |f| rel_err(&logits, f));
            assert!(worst <= REFERENCE_RTOL, "{name} {level}: {worst:.2e} from the reference");
            assert!(across <= LEVELS_RTOL, "{name} {level}: {across:.2e} from the first level");
            first.get_or_insert(logits);
        }
    }
}

/// A decode row alone takes the row-at-a-time kernels; 40 rows take the prompt-chunk path (from
/// 32 rows on). A sequence's logits are the same bits either way, as with float weights.
#[test]
fn a_decode_row_gives_the_same_bits_alone_and_among_forty() {
    let level = twinfer::cpu::SimdLevel::detect();
    let attention = Attention::cpu(level);
    let engines = Engines { level, prefill: &attention, decode: &attention };
    for name in MODELS {
        let model = load_bf16(name);
        let prompt = ids(&golden(name)["prompt_ids"]);
        let mut cache = cache(&model, 41 * prompt.len().div_ceil(16) + 41);
        let seqs: Vec<_> = (0..41).map(|_| cache.add_sequence()).collect();
        // Each sequence's prompt cut differently, so that the batch's rows differ.
        let lens: Vec<usize> = (0..41).map(|i| prompt.len() - i % 5).collect();
        cache.reserve(&seqs, &lens).unwrap();
        let prefill: Vec<StepSeq<'_>> = seqs
            .iter()
            .zip(&lens)
            .map(|(&seq, &len)| StepSeq { seq, tokens: &prompt[..len], start: 0, logits: Logits::Last })
            .collect();
        model.forward(engines, &mut cache, &prefill).unwrap();
        // Sequence 0 alone; sequence 5 (the same prompt) among the other 39 and itself.
        let token = [7u32];
        let step = |cache: &mut PagedKvCache, which: &[usize]| {
            let ids: Vec<_> = which.iter().map(|&i| seqs[i]).collect();
            cache.reserve(&ids, &vec![1; ids.len()]).unwrap();
            let steps: Vec<StepSeq<'_>> = which
                .iter()
                .map(|&i| StepSeq { seq: seqs[i], tokens: &token, start: lens[i], logits: Logits::Last })
                .collect();
            model.forward(engines, cache, &steps).unwrap()
        };
        let alone = step(&mut cache, &[0]);
        let batch = step(&mut cache, &(1..41).collect::<Vec<_>>());
        let vocab = model.config.vocab_size;
        assert_eq!(lens[0], lens[5]);
        assert_eq!(alone, batch[4 * vocab..5 * vocab], "{name} {level}");
        // The batch's rows are not all alike (else the check would be weaker than it looks).
        assert_ne!(batch[..vocab], batch[vocab..2 * vocab], "{name}");
    }
}

//! A model's float weights are read in place from its file, not copied: loading tiny-llama (f32,
//! and the same weights as f16) from a folder (memory-mapped) or from files already in memory (the
//! browser's path) must grow the heap by a small fraction of the weights, and the fused q/k/v and
//! gate/up projections must not copy either. A counting allocator measures the peak of live heap
//! bytes during each load; this binary holds one test, so nothing else allocates meanwhile.
#![cfg(not(target_arch = "wasm32"))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Map, Value};
use twinfer::kv::{KvCacheConfig, KvLayout, PagedKvCache};
use twinfer::model::{Engines, Logits, Model, ModelSource, Network, StepSeq};
use twinfer::{Attention, DType, cpu::SimdLevel};
use twinfer_tests::models::model_dir;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: the caller's layout is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap a load may add beyond the weights: the parsed tokenizer (its vocabulary, merges and
/// regexes: about 0.9 MiB for this one) and config, and f32 copies of the norms. A copy of the
/// weights (the defect this guards) adds 100% of them or more.
const FIXED_ALLOWANCE: usize = 1 << 20;
const ALLOWED_FRACTION: f64 = 0.05;

const LAYERS: usize = 12;
const HIDDEN: usize = 256;
const KV_DIM: usize = 64;
const INTERMEDIATE: usize = 1024;
const VOCAB: usize = 512;

/// Loads `source` and returns the model with the peak heap growth during the load.
fn load_measured(source: ModelSource) -> (Model, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let model = Model::load(source).expect("the test model loads");
    (model, PEAK.load(Ordering::SeqCst) - base)
}

/// tiny-llama's config with 12 layers and a 1024-wide MLP: 23 MB of f16 weights, so that the
/// fixed costs of a load are small beside them.
fn config() -> Vec<u8> {
    let mut c: Value =
        serde_json::from_slice(&std::fs::read(model_dir("tiny-llama").join("config.json")).unwrap()).unwrap();
    c["num_hidden_layers"] = LAYERS.into();
    c["intermediate_size"] = INTERMEDIATE.into();
    assert_eq!((c["hidden_size"].as_u64(), c["vocab_size"].as_u64()), (Some(HIDDEN as u64), Some(VOCAB as u64)));
    serde_json::to_vec(&c).unwrap()
}

/// A safetensors file of the model's tensors in `dtype` ("F32" or "F16"), small seeded values.
fn weights(dtype: &str) -> Vec<u8> {
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]),
        ("lm_head.weight".into(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".into(), vec![HIDDEN]),
    ];
    for i in 0..LAYERS {
        let l = format!("model.layers.{i}");
        for (name, shape) in [
            ("input_layernorm", vec![HIDDEN]),
            ("post_attention_layernorm", vec![HIDDEN]),
            ("self_attn.q_proj", vec![HIDDEN, HIDDEN]),
            ("self_attn.k_proj", vec![KV_DIM, HIDDEN]),
            ("self_attn.v_proj", vec![KV_DIM, HIDDEN]),
            ("self_attn.o_proj", vec![HIDDEN, HIDDEN]),
            ("mlp.gate_proj", vec![INTERMEDIATE, HIDDEN]),
            ("mlp.up_proj", vec![INTERMEDIATE, HIDDEN]),
            ("mlp.down_proj", vec![HIDDEN, INTERMEDIATE]),
        ] {
            tensors.push((format!("{l}.{name}.weight"), shape));
        }
    }
    let (mut header, mut data) = (Map::new(), Vec::new());
    for (t, (name, shape)) in tensors.iter().enumerate() {
        let start = data.len();
        for i in 0..shape.iter().product::<usize>() {
            let v = ((i * 7919 + t * 104729) % 2001) as f32 / 2000.0 * 0.07 - 0.035;
            match dtype {
                "F32" => data.extend_from_slice(&v.to_le_bytes()),
                _ => data.extend_from_slice(&twinfer::f16::from_f32(v).to_le_bytes()),
            }
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = Value::Object(header).to_string();
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn check(what: &str, weight_bytes: usize, peak: usize) {
    let bound = FIXED_ALLOWANCE + (ALLOWED_FRACTION * weight_bytes as f64) as usize;
    eprintln!(
        "{what}: peak heap growth {} KiB for {} KiB of weights (bound {} KiB)",
        peak >> 10,
        weight_bytes >> 10,
        bound >> 10
    );
    assert!(peak <= bound, "{what}: loading grew the heap by {peak} bytes for {weight_bytes} bytes of weights: a copy");
}

#[test]
fn float_weights_are_read_in_place_from_a_folder_and_from_memory() {
    let tokenizer = std::fs::read(model_dir("tiny-llama").join("tokenizer.json")).unwrap();
    let config = config();
    let scratch = std::env::temp_dir().join(format!("twinfer-weights-in-place-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("config.json"), &config).unwrap();
    std::fs::write(scratch.join("tokenizer.json"), &tokenizer).unwrap();
    for dtype in ["F32", "F16"] {
        let weights = weights(dtype);
        // A folder on disk: the weights file is memory-mapped.
        std::fs::write(scratch.join("model.safetensors"), &weights).unwrap();
        let (from_dir, peak) = load_measured(ModelSource::dir(&scratch));
        check(&format!("{dtype}, folder"), weights.len(), peak);
        // Files already in memory (a browser's downloads): the model borrows the buffer.
        let files = HashMap::from([
            ("config.json".to_string(), config.clone()),
            ("tokenizer.json".to_string(), tokenizer.clone()),
            ("model.safetensors".to_string(), weights),
        ]);
        let (in_memory, peak) = load_measured(ModelSource::Files(files));
        check(&format!("{dtype}, in memory"), from_dir_bytes(&scratch), peak);
        // Both read the same weights: the same prompt gives the same logits.
        assert_eq!(logits(&from_dir), logits(&in_memory), "{dtype}: folder and in-memory models differ");
    }
    std::fs::remove_dir_all(Path::new(&scratch)).unwrap();
}

fn from_dir_bytes(dir: &Path) -> usize {
    std::fs::metadata(dir.join("model.safetensors")).unwrap().len() as usize
}

/// The logits of a fixed 5-token prompt on the CPU engine (prefill, every position).
fn logits(model: &Model) -> Vec<f32> {
    let Network::Decoder(m) = &model.network else { panic!("the test model is a decoder") };
    let level = SimdLevel::detect();
    let attention = Attention::cpu(level);
    let engines = Engines { level, prefill: &attention, decode: &attention };
    let c = &m.config;
    let layout = KvLayout::new(16, c.num_kv_heads, c.head_dim).unwrap();
    let mut cache =
        PagedKvCache::new(KvCacheConfig { num_layers: c.num_layers, num_pages: 4, layout, dtype: DType::F32 }).unwrap();
    let seq = cache.add_sequence();
    let prompt = [3, 141, 59, 265, 35];
    cache.reserve(&[seq], &[prompt.len()]).unwrap();
    let logits =
        m.forward(engines, &mut cache, &[StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::All }]).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    logits
}

//! The Llama-family decoder against the independent numpy reference (`tests/reference/`): two
//! tiny seeded models (a Llama with Llama-3 RoPE scaling and GQA 4:1; a Qwen2 with q/k/v biases and
//! tied embeddings). Prefill logits at every prompt position and 32 greedy decode steps must match
//! (f32 relative error <= 1e-4, identical tokens) through the paged cache with pages of 1 and 16,
//! on every CPU SIMD level and on the GPU engine.
//! Then the engine: a request's output is the same alone, among 64 others, and under preemption.
#![cfg(not(target_arch = "wasm32"))]

use std::sync::Arc;

use twinfer::engine::{EngineConfig, Event, FinishReason, GenerateRequest, SamplingParams, Scheduler};
use twinfer::gpu::{GpuOptions, Variant, step_submissions};
use twinfer::kv::{KvCacheConfig, KvLayout, PagedKvCache};
use twinfer::model::{Engines, Logits, Model, ModelSource, Network, ResidentDecoder, StepSeq};
use twinfer::{Attention, Backend, DType, cpu::SimdLevel};
use twinfer_tests::models::{emulated, engines, floats, golden, ids, model_dir, rel_err};

const MODELS: [&str; 2] = ["tiny-llama", "tiny-qwen2"];
const LOGITS_RTOL: f64 = 1e-4;
/// The GPU's int8 cache against the CPU's, where both hold the same codes: f32 rounding (tiny-llama
/// measured 1.5e-6 on every row). K/V that differ by f32 rounding still round to different codes
/// now and then (a value within rounding of a half step), and such a code moves every later row:
/// tiny-qwen2's prompt on lavapipe measured rows 0-34 within 3e-6 and rows from 35 on up to
/// 2.9e-3, which `Q8_FLIP_RTOL` bounds.
const Q8_ENGINES_RTOL: f64 = 1e-5;
const Q8_FLIP_RTOL: f64 = 1e-2;

fn load(name: &str) -> (twinfer::model::LlamaModel, twinfer::model::Tokenizer) {
    let model = Model::load(ModelSource::dir(model_dir(name))).unwrap();
    match model.network {
        Network::Decoder(m) => (m, model.tokenizer),
        Network::Encoder(_) => panic!("{name} is not a decoder"),
    }
}

/// Prefill of the whole prompt (logits at every position), then greedy decode one token at a
/// time, checking each step's logits; on every SIMD level and page size.
#[test]
fn prefill_and_greedy_decode_match_the_reference() {
    for name in MODELS {
        let (model, tokenizer) = load(name);
        let g = golden(name);
        let prompt = ids(&g["prompt_ids"]);
        assert_eq!(tokenizer.encode(g["prompt"].as_str().unwrap(), true).unwrap(), prompt, "{name}: tokenizer");
        let want_greedy = ids(&g["greedy_ids"]);
        let vocab = model.config.vocab_size;
        for (level, simd, attention) in engines() {
            let engines = Engines { level: simd, prefill: &attention, decode: &attention };
            for page_size in [1, 16] {
                let c = &model.config;
                let layout = KvLayout::new(page_size, c.num_kv_heads, c.head_dim).unwrap();
                let mut cache = PagedKvCache::new(KvCacheConfig {
                    num_layers: c.num_layers,
                    num_pages: 256,
                    layout,
                    dtype: DType::F32,
                })
                .unwrap();
                let seq = cache.add_sequence();
                cache.reserve(&[seq], &[prompt.len()]).unwrap();
                let step = StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::All };
                let logits = model.forward(engines, &mut cache, &[step]).unwrap();
                let want = g["prefill_logits"].as_array().unwrap();
                assert_eq!(logits.len(), want.len() * vocab);
                for (p, row) in want.iter().enumerate() {
                    let err = rel_err(&logits[p * vocab..(p + 1) * vocab], &floats(row));
                    assert!(err <= LOGITS_RTOL, "{name} {level} page {page_size}: prefill position {p}: {err:.2e}");
                }
                let mut next = twinfer::engine::argmax(&logits[(prompt.len() - 1) * vocab..]);
                let mut got = vec![next];
                for (s, want_row) in g["step_logits"].as_array().unwrap().iter().enumerate().take(want_greedy.len() - 1)
                {
                    let start = cache.seq_len(seq).unwrap();
                    cache.reserve(&[seq], &[1]).unwrap();
                    let step = StepSeq { seq, tokens: &[next], start, logits: Logits::Last };
                    let logits = model.forward(engines, &mut cache, &[step]).unwrap();
                    let err = rel_err(&logits, &floats(want_row));
                    assert!(err <= LOGITS_RTOL, "{name} {level} page {page_size}: decode step {s}: {err:.2e}");
                    next = twinfer::engine::argmax(&logits);
                    got.push(next);
                }
                assert_eq!(got, want_greedy, "{name} {level} page {page_size}: greedy tokens");
            }
        }
    }
}

fn scheduler(name: &str, config: EngineConfig) -> Scheduler {
    scheduler_on(name, config, Attention::new(Backend::Cpu).unwrap())
}

fn scheduler_on(name: &str, config: EngineConfig, attention: Attention) -> Scheduler {
    let (model, tokenizer) = load(name);
    let level = SimdLevel::detect();
    Scheduler::new(Arc::new(model), Some(Arc::new(tokenizer)), level, attention.clone(), attention, config).unwrap()
}

/// The GPU engine, or a loud skip (a failure under `TWINFER_REQUIRE_GPU=1`).
fn gpu_attention() -> Option<Attention> {
    match Attention::new(Backend::Gpu) {
        Ok(a) => Some(a),
        Err(e) if std::env::var("TWINFER_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("TWINFER_REQUIRE_GPU=1 but the GPU engine is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: the resident GPU model tests do NOT run here: {e}");
            None
        }
    }
}

/// The whole model resident on the GPU (weights, KV pages, activations; every buffer poisoned
/// with NaN before each step): prefill logits at every position and greedy decode match the
/// reference as closely as the CPU does, with pages of 1 and 16, and each step is one readback
/// whatever the number of layers (submitted in parts as it is recorded: `step_submissions`).
#[test]
fn resident_gpu_model_matches_the_reference_with_one_readback_per_step() {
    let Some(gpu) = gpu_attention() else { return };
    let default = gpu.gpu_engine().unwrap();
    // The baseline variant as well where the default reduces with subgroups.
    let baseline = default.with_options(GpuOptions { variant: Variant::Baseline, ..default.options() }).unwrap();
    let engines = if default.options().variant == Variant::Baseline { vec![default] } else { vec![default, &baseline] };
    for (engine, name) in engines.into_iter().flat_map(|e| MODELS.iter().map(move |n| (e, n))) {
        let variant = engine.options().variant.name();
        let (model, _) = load(name);
        let g = golden(name);
        let prompt = ids(&g["prompt_ids"]);
        let want_greedy = ids(&g["greedy_ids"]);
        let vocab = model.config.vocab_size;
        for page_size in [1, 16] {
            let c = &model.config;
            let layout = KvLayout::new(page_size, c.num_kv_heads, c.head_dim).unwrap();
            let config = KvCacheConfig { num_layers: c.num_layers, num_pages: 256, layout, dtype: DType::F32 };
            let mut cache = PagedKvCache::new(config).unwrap();
            let resident = ResidentDecoder::new(&model, engine, &config).unwrap().poison_for_test();
            let run = |cache: &mut PagedKvCache, step: StepSeq<'_>| {
                let before = engine.counts();
                let logits = model.forward_resident(&resident, cache, &[step]).unwrap();
                let after = engine.counts();
                // The step is submitted in parts as it is recorded (no readback in between).
                let dispatches = after.dispatches - before.dispatches;
                assert!(dispatches >= 4 * c.num_layers as u64, "{name}: {dispatches} dispatches");
                assert_eq!(after.submits - before.submits, step_submissions(dispatches), "{name}: submissions");
                assert_eq!(after.readbacks - before.readbacks, 1, "{name}: readbacks in one step");
                assert_eq!(after.readback_bytes - before.readback_bytes, logits.len() as u64 * 4, "{name}");
                logits
            };
            let seq = cache.add_sequence();
            cache.reserve(&[seq], &[prompt.len()]).unwrap();
            let logits = run(&mut cache, StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::All });
            let want = g["prefill_logits"].as_array().unwrap();
            assert_eq!(logits.len(), want.len() * vocab);
            for (p, row) in want.iter().enumerate() {
                let err = rel_err(&logits[p * vocab..(p + 1) * vocab], &floats(row));
                assert!(
                    err <= LOGITS_RTOL,
                    "{name} {variant} resident page {page_size}: prefill position {p}: {err:.2e}"
                );
            }
            let mut next = twinfer::engine::argmax(&logits[(prompt.len() - 1) * vocab..]);
            let mut got = vec![next];
            for (s, want_row) in g["step_logits"].as_array().unwrap().iter().enumerate().take(want_greedy.len() - 1) {
                let start = cache.seq_len(seq).unwrap();
                cache.reserve(&[seq], &[1]).unwrap();
                let logits = run(&mut cache, StepSeq { seq, tokens: &[next], start, logits: Logits::Last });
                let err = rel_err(&logits, &floats(want_row));
                assert!(err <= LOGITS_RTOL, "{name} {variant} resident page {page_size}: decode step {s}: {err:.2e}");
                next = twinfer::engine::argmax(&logits);
                got.push(next);
            }
            assert_eq!(got, want_greedy, "{name} {variant} resident page {page_size}: greedy tokens");
        }
    }
}

/// An int8 KV cache resident on the GPU (codes and scales written by the RoPE/append kernel, read
/// by prefill and decode, a forked sequence's partial page copied on the device), and the GPU's
/// op-by-op path over the host's int8 cache (its rows dequantized for the attention kernels),
/// each against the CPU engine over its own int8 cache. With f32 weights the engines quantize the
/// same K/V up to f32 rounding, so their logits agree far closer than either does with the
/// float64 reference.
#[test]
fn resident_gpu_int8_cache_matches_the_cpu_int8_cache() {
    let Some(gpu) = gpu_attention() else { return };
    let engine = gpu.gpu_engine().unwrap();
    let level = SimdLevel::detect();
    let cpu = Attention::cpu(level);
    let engines = Engines { level, prefill: &cpu, decode: &cpu };
    for name in MODELS {
        let (model, _) = load(name);
        let prompt = ids(&golden(name)["prompt_ids"]);
        let c = &model.config;
        let layout = KvLayout::new(16, c.num_kv_heads, c.head_dim).unwrap();
        let config = KvCacheConfig { num_layers: c.num_layers, num_pages: 64, layout, dtype: DType::Q8 };
        let resident = ResidentDecoder::new(&model, engine, &config).unwrap().poison_for_test();
        // The prompt, then a fork of it, then three steps of both sequences with different tokens.
        let run = |forward: &dyn Fn(&mut PagedKvCache, &[StepSeq<'_>]) -> Vec<f32>| {
            let mut cache = PagedKvCache::new(config).unwrap();
            cache.record_page_copies(true);
            let a = cache.add_sequence();
            cache.reserve(&[a], &[prompt.len()]).unwrap();
            let mut out =
                vec![forward(&mut cache, &[StepSeq { seq: a, tokens: &prompt, start: 0, logits: Logits::All }])];
            let b = cache.fork(a).unwrap();
            for step in 0..3u32 {
                let start = cache.seq_len(a).unwrap();
                cache.reserve(&[a, b], &[1, 1]).unwrap();
                let (ta, tb) = ([7 + step], [100 + 3 * step]);
                out.push(forward(
                    &mut cache,
                    &[
                        StepSeq { seq: a, tokens: &ta, start, logits: Logits::Last },
                        StepSeq { seq: b, tokens: &tb, start, logits: Logits::Last },
                    ],
                ));
            }
            out
        };
        let on_cpu = run(&|cache, batch| model.forward(engines, cache, batch).unwrap());
        let gpu_engines = Engines { level, prefill: &gpu, decode: &gpu };
        let paths = [
            ("resident", run(&|cache, batch| model.forward_resident(&resident, cache, batch).unwrap())),
            ("op by op", run(&|cache, batch| model.forward(gpu_engines, cache, batch).unwrap())),
        ];
        let vocab = model.config.vocab_size;
        for (path, on_gpu) in paths {
            let (mut worst, mut rows, mut close) = (0f64, 0, 0);
            for (step, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
                assert_eq!(g.len(), c.len(), "{name}: step {step}: logits rows");
                for (row, (g, c)) in g.chunks(vocab).zip(c.chunks(vocab)).enumerate() {
                    let err = rel_err(g, c);
                    assert!(
                        err <= Q8_FLIP_RTOL,
                        "{name}: step {step}, row {row}: {path} GPU int8 against CPU int8: {err:.2e}"
                    );
                    worst = worst.max(err);
                    rows += 1;
                    close += (err <= Q8_ENGINES_RTOL) as usize;
                }
            }
            eprintln!(
                "{name}: {path} GPU int8 cache against the CPU's: {close} of {rows} logits rows within {Q8_ENGINES_RTOL:.0e}, worst {worst:.2e}"
            );
            assert!(4 * close >= 3 * rows, "{name}: {path}: only {close} of {rows} rows agree to f32 rounding");
        }
    }
}

/// The scheduler on the GPU runs the resident path; a request's greedy output is the reference's
/// alone and among 31 others sharing steps (decode rows and prompt chunks in one submission),
/// with prefix sharing (copy-on-write pages copied on the device) and under preemption. One model
/// per pool size: software Vulkan in CI takes minutes per configuration, and the two models'
/// resident forward passes are each checked against the reference above.
#[test]
fn resident_gpu_engine_outputs_do_not_depend_on_the_batch_or_on_preemption() {
    let Some(gpu) = gpu_attention() else { return };
    for (name, pages, budget) in [("tiny-llama", 4096, 512), ("tiny-qwen2", 40, 128)] {
        let reqs = golden_requests(name);
        {
            let config = EngineConfig {
                kv_dtype: DType::F32,
                kv_pool_pages: Some(pages),
                page_size: 16,
                max_batch_tokens: budget,
                ..Default::default()
            };
            let mut s = scheduler_on(name, config, gpu.clone());
            assert!(s.resident().is_some(), "{name}: not resident: {}", s.residency());
            // Greedy rows are picked on the device (4 bytes read back per row); a step with a
            // sampled row reads logits back instead. tiny-qwen2 mixes in sampled requests.
            let mixed = name == "tiny-qwen2";
            let engine = gpu.gpu_engine().unwrap();
            let before = engine.counts();
            let mut expected = std::collections::BTreeMap::new();
            let mut sampled_ids = Vec::new();
            for i in 0..32u64 {
                let (prompt, want) = &reqs[i as usize % reqs.len()];
                if mixed && i % 4 == 1 {
                    let p = SamplingParams { temperature: 0.9, top_k: 40, seed: i, ..Default::default() };
                    sampled_ids.push(s.add(greedy(prompt.clone(), 12).sampling(p)).unwrap().0);
                } else {
                    let id = s.add(greedy(prompt.clone(), want.len())).unwrap();
                    expected.insert(id.0, want.clone());
                }
                if i % 8 == 7 {
                    s.step().unwrap();
                }
            }
            let out = run_all(&mut s);
            let after = engine.counts();
            let steps = after.steps - before.steps;
            assert!(steps > 0);
            let submits = after.submits - before.submits;
            // Each early submission follows at least 16 dispatches (`step_submissions`).
            let dispatches = after.dispatches - before.dispatches;
            assert!(submits >= steps && submits <= steps + dispatches / 16, "{name}: {submits} submissions");
            assert_eq!(after.readbacks - before.readbacks, steps, "{name}: one readback per step");
            if !mixed {
                // One u32 per sampled row, one word for a step without rows; never logits.
                let rows: u64 = out.values().map(|(t, _)| t.len() as u64).sum();
                let bytes = after.readback_bytes - before.readback_bytes;
                assert!(
                    bytes >= 4 * rows && bytes <= 4 * (rows + steps),
                    "{name}: {bytes} bytes read back for {rows} rows"
                );
            }
            for id in sampled_ids {
                assert_eq!(out[&id].0.len(), 12, "{name}: sampled request {id}");
            }
            for (id, want) in expected {
                assert_eq!(&out[&id].0, &want, "{name}: request {id} among 32 on the GPU, pool {pages} pages");
            }
            assert_eq!(s.cache().free_pages(), s.cache().num_pages(), "{name}: pages leaked");
            if pages == 40 {
                assert!(s.run_metrics().preemptions > 0, "{name}: the small pool never preempted");
            }
        }
    }
}

/// Top-k sampling on the device: the GPU picks each sampled row's k most likely tokens and the
/// host draws from them. Sampled requests (temperatures, top-k up to 128, top-p, seeds) among
/// greedy ones give exactly the tokens that sampling from read-back logits gives, and the steps
/// read back candidates instead of logits.
#[test]
fn resident_gpu_top_k_sampling_equals_sampling_from_read_back_logits() {
    let Some(gpu) = gpu_attention() else { return };
    let engine = gpu.gpu_engine().unwrap();
    let reqs = golden_requests("tiny-llama");
    let requests: Vec<GenerateRequest> = (0..8u64)
        .map(|i| {
            let (prompt, _) = &reqs[i as usize % reqs.len()];
            let p = SamplingParams {
                temperature: [0.0, 0.8, 1.0, 1.5][i as usize % 4],
                top_k: [40, 1, 128, 7][i as usize / 2],
                top_p: [1.0, 0.9][i as usize % 2],
                seed: 100 + i,
                ..Default::default()
            };
            greedy(prompt.clone(), 10).sampling(p)
        })
        .collect();
    let mut runs = Vec::new();
    for on_device in [true, false] {
        let config = EngineConfig { kv_dtype: DType::F32, page_size: 16, ..Default::default() };
        let mut s = scheduler_on("tiny-llama", config, gpu.clone());
        assert!(s.resident().is_some(), "not resident: {}", s.residency());
        s.sample_on_device(on_device);
        let before = engine.counts();
        for r in &requests {
            s.add(r.clone()).unwrap();
        }
        let out = run_all(&mut s);
        let after = engine.counts();
        let tokens: Vec<Vec<u32>> = out.values().map(|(t, _)| t.clone()).collect();
        runs.push((tokens, after.readback_bytes - before.readback_bytes, after.steps - before.steps));
    }
    let ((on, on_bytes, on_steps), (off, off_bytes, off_steps)) = (&runs[0], &runs[1]);
    assert_eq!(on, off, "top-k on the device against sampling from read-back logits");
    assert_eq!(on_steps, off_steps);
    eprintln!("top-k on the device: {on_bytes} bytes read back in {on_steps} steps; logits: {off_bytes} bytes");
    // Every step reads the same rows both ways: per row 128 (id, logit) pairs and a greedy id (the
    // largest top_k of a step's sampled rows is 128 in every step) instead of the vocabulary's
    // logits. The ratio favours the device more as the vocabulary grows (512 here, 49152 for
    // SmolLM2).
    let vocab = load("tiny-llama").0.config.vocab_size as u64;
    assert_eq!(on_bytes * vocab * 4, off_bytes * (128 * 8 + 4), "bytes read back: {on_bytes} against {off_bytes}");
}

fn run_all(s: &mut Scheduler) -> std::collections::BTreeMap<u64, (Vec<u32>, FinishReason)> {
    let mut out = std::collections::BTreeMap::new();
    let mut steps = 0;
    while s.has_work() {
        for e in s.step().unwrap() {
            if let Event::Finished { request, reason, tokens, .. } = e {
                out.insert(request.0, (tokens, reason));
            }
        }
        steps += 1;
        assert!(steps < 100_000, "the scheduler made no progress");
    }
    out
}

fn greedy(ids: Vec<u32>, n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::tokens(ids).max_tokens(n);
    r.ignore_eos = true;
    r
}

/// The prompts of the golden file, each with the reference's greedy continuation.
fn golden_requests(name: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    let g = golden(name);
    let mut all = vec![(ids(&g["prompt_ids"]), ids(&g["greedy_ids"]))];
    for e in g["extra_prompts"].as_array().unwrap() {
        all.push((ids(&e["prompt_ids"]), ids(&e["greedy_ids"])));
    }
    all
}

#[test]
fn engine_outputs_do_not_depend_on_the_batch_or_on_preemption() {
    for name in MODELS {
        let reqs = golden_requests(name);
        // Alone, in a roomy pool: the reference tokens.
        for (prompt, want) in &reqs {
            let mut s = scheduler(name, EngineConfig { kv_dtype: DType::F32, ..Default::default() });
            s.add(greedy(prompt.clone(), want.len())).unwrap();
            let out = run_all(&mut s);
            assert_eq!(&out[&0].0, want, "{name}: alone");
        }
        // Among 64 others (sampled ones too, and long prompts chunked over several steps), with a
        // small token budget and a pool so small that sequences get preempted and recomputed.
        // Under qemu `TWINFER_BATCH_TEST_REQUESTS` makes it 24, which still overflows the pool.
        let requests: u64 =
            std::env::var("TWINFER_BATCH_TEST_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
        // Under emulation only the small pool, which batches and preempts both.
        let pools: &[(usize, usize)] = if emulated() { &[(40, 128)] } else { &[(4096, 512), (40, 128)] };
        for &(pages, budget) in pools {
            let config = EngineConfig {
                kv_dtype: DType::F32,
                kv_pool_pages: Some(pages),
                page_size: 16,
                max_batch_tokens: budget,
                ..Default::default()
            };
            let mut s = scheduler(name, config);
            let mut expected = std::collections::BTreeMap::new();
            for i in 0..requests {
                let (prompt, want) = &reqs[i as usize % reqs.len()];
                if i % 3 == 2 {
                    let sampled =
                        SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.95, seed: i, ..Default::default() };
                    s.add(greedy(prompt.clone(), 24).sampling(sampled)).unwrap();
                } else {
                    let id = s.add(greedy(prompt.clone(), want.len())).unwrap();
                    expected.insert(id.0, want.clone());
                }
                if i % 8 == 7 {
                    // Requests keep arriving while others run.
                    s.step().unwrap();
                }
            }
            let out = run_all(&mut s);
            assert_eq!(out.len() as u64, requests);
            for (id, want) in expected {
                assert_eq!(&out[&id].0, &want, "{name}: request {id} among {requests}, pool {pages} pages");
                assert_eq!(out[&id].1, FinishReason::Length);
            }
            assert_eq!(s.cache().free_pages(), s.cache().num_pages(), "{name}: pages leaked");
            if pages == 40 {
                assert!(s.run_metrics().preemptions > 0, "{name}: the small pool never preempted");
            }
        }
    }
}

/// The threaded engine: tokens stream in order and end with `Finished`; a stop string cuts the
/// text and ends the request; a cancelled request ends with `Cancelled` and frees its pages.
#[test]
fn engine_streams_stops_and_cancels() {
    use twinfer::engine::Engine;
    let config = EngineConfig {
        kv_dtype: DType::F32,
        prefill_backend: Backend::Cpu,
        decode_backend: Backend::Cpu,
        ..Default::default()
    };
    let engine = Engine::new(model_dir("tiny-llama"), config).unwrap();
    let (prompt, want) = golden_requests("tiny-llama").remove(0);

    let events: Vec<Event> = engine.generate(greedy(prompt.clone(), want.len())).unwrap().collect();
    let streamed: Vec<u32> =
        events.iter().filter_map(|e| if let Event::Token { token, .. } = e { Some(*token) } else { None }).collect();
    assert_eq!(streamed, want, "streamed tokens");
    let Some(Event::Finished { text, tokens, metrics, .. }) = events.last() else { panic!("no Finished event") };
    assert_eq!(tokens, &want);
    assert_eq!(metrics.token_times.len(), want.len());
    let pieces: String = events
        .iter()
        .filter_map(|e| if let Event::Token { text, .. } = e { Some(text.as_str()) } else { None })
        .collect();
    assert_eq!(&pieces, text, "the streamed pieces add up to the final text");

    // Stop at a piece of text the full generation contains.
    let cut = text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i);
    let stop: String = text[cut..].chars().take(3).collect();
    if !stop.is_empty() {
        let mut r = greedy(prompt.clone(), want.len());
        r.stop = vec![stop.clone()];
        let Event::Finished { reason, text: stopped, .. } = engine.generate_blocking(r).unwrap() else { panic!() };
        assert_eq!(reason, FinishReason::StopString(stop.clone()));
        assert_eq!(stopped, text[..text.find(&stop).unwrap()]);
    }

    // Cancel after the first token.
    let mut stream = engine.generate(greedy(prompt, 1500)).unwrap();
    assert!(matches!(stream.next(), Some(Event::Token { .. })));
    stream.cancel();
    let last = stream.last().unwrap();
    assert!(matches!(last, Event::Finished { reason: FinishReason::Cancelled, .. }), "{last:?}");
    let m = engine.metrics(false).unwrap();
    assert_eq!(m.requests, 3);
}

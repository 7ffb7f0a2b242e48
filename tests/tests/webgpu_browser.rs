//! The WGSL engine in a browser, on its WebGPU adapter (headless Chromium on SwiftShader in CI:
//! f32 K/V, no shader-f16): prefill and paged decode on poisoned outputs against the f64 oracle and
//! the CPU engine, a decoder step through `LlamaModel::forward_async` (with float and with
//! block-quantized weights), and the scheduler's CPU fallback after the device is destroyed. Everything awaits: a browser cannot block on the GPU.
//! Run by scripts/test-webgpu.sh.

#![cfg(target_arch = "wasm32")]

use std::sync::Arc;

use twinfer::cpu::SimdLevel;
use twinfer::engine::{EngineConfig, Event, GenerateRequest, Scheduler};
use twinfer::kv::{KvCacheConfig, KvLayout, PagedKvCache};
use twinfer::model::{Engines, LlamaModel, Logits, StepSeq, preset, random_decoder};
use twinfer::{Attention, AttentionOutput, Backend, DType, TwinferError};
use twinfer_tests::problem::Buf;
use twinfer_tests::rng::Rng;
use twinfer_tests::{Case, CaseData, KvKind, Mode, Tolerance};
use wasm_bindgen_test::{console_log, wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

async fn gpu() -> Attention {
    let a =
        Attention::new_async(Backend::Gpu).await.expect("the browser's WebGPU engine opens and passes its self-test");
    assert_eq!(a.info().backend, "gpu");
    a
}

/// A few shapes with the nasty sizes: GQA 1..8, head_dim 64/72/128, pages of 1 and 16, lengths
/// 1, 54, 97 and page edges, causal and not, a window, a soft-cap, f16 K/V widened on upload.
fn cases() -> Vec<Case> {
    let mut rng = Rng::new(2024);
    let mut out = Vec::new();
    for i in 0..8 {
        let mode = if i % 2 == 0 { Mode::Prefill } else { Mode::Decode };
        let page_size = [1, 16, 16, 3][i % 4];
        let batch = 1 + i % 3;
        let qo_lens: Vec<usize> = (0..batch)
            .map(|b| match mode {
                Mode::Decode => 1,
                Mode::Prefill => [1, 17, 54, 33][(i + b) % 4],
            })
            .collect();
        let kv_lens: Vec<usize> =
            qo_lens.iter().enumerate().map(|(b, &q)| q + [0, 1, 53, 96, 16][(i + b) % 5]).collect();
        out.push(Case {
            mode,
            kv_kind: if i % 4 == 0 { KvKind::Ragged } else { KvKind::Paged },
            qo_lens,
            kv_lens,
            page_size,
            num_kv_heads: 1 + i % 2,
            group: [1, 2, 4, 8][i % 4],
            head_dim: [64, 72, 128, 64][(i / 2) % 4],
            causal: i % 3 != 2,
            window_left: (i == 5).then_some(20),
            soft_cap: (i == 6).then_some(30.0),
            alibi: i == 7,
            sm_scale: None,
            q_dtype: DType::F32,
            kv_dtype: if i % 3 == 1 { DType::F16 } else { DType::F32 },
            o_dtype: DType::F32,
            want_lse: true,
            q_gain: 1.0 + (rng.below(4) as f32),
            seed: rng.next_u64(),
        });
    }
    out
}

/// Runs one engine on NaN-poisoned outputs.
async fn run(engine: &Attention, data: &CaseData) -> Result<(Vec<f32>, Vec<f32>), TwinferError> {
    let rows: usize = data.case.qo_lens.iter().sum::<usize>() * data.params.num_qo_heads;
    let mut o = Buf::zeros(DType::F32, rows * data.params.head_dim);
    o.view_mut().poison();
    let mut lse = vec![f32::NAN; rows];
    let mut out = AttentionOutput { o: o.view_mut(), lse: Some(&mut lse) };
    match data.case.mode {
        Mode::Prefill => engine.prefill_async(&data.params, &data.prefill_input(data.case.kv_kind), &mut out).await?,
        Mode::Decode => engine.decode_async(&data.params, &data.decode_input(), &mut out).await?,
    }
    Ok((o.to_f32(), lse))
}

#[wasm_bindgen_test]
async fn prefill_and_paged_decode_match_the_oracle_and_the_cpu_engine() {
    let gpu = gpu().await;
    console_log!("{:?}", gpu.info());
    let cpu = Attention::cpu(SimdLevel::detect());
    for case in cases() {
        let data = CaseData::new(&case);
        let (o, lse) = run(&gpu, &data).await.unwrap_or_else(|e| panic!("{case:?}: {e}"));
        data.check(&o, Some(&lse), &data.reference()).unwrap_or_else(|e| panic!("{case:?}: GPU vs oracle: {e}"));
        let (oc, lc) = run(&cpu, &data).await.unwrap();
        let tol = Tolerance::for_output(DType::F32);
        for (i, (g, c)) in o.iter().zip(&oc).chain(lse.iter().zip(&lc)).enumerate() {
            let ok = (g - c).abs() as f64 <= 2.0 * (tol.atol + tol.rtol * c.abs() as f64);
            assert!(ok, "{case:?}: element {i}: GPU {g}, CPU {c}");
        }
    }
}

#[wasm_bindgen_test]
async fn blocking_calls_are_a_typed_error_not_a_hang() {
    let gpu = gpu().await;
    let data = CaseData::new(&cases()[1]);
    let rows = data.params.num_qo_heads * data.case.qo_lens.len();
    let mut o = vec![0f32; rows * data.params.head_dim];
    let err = gpu.decode(&data.params, &data.decode_input(), &mut AttentionOutput::new(o.as_mut_slice())).unwrap_err();
    assert!(matches!(err, TwinferError::WouldBlock { .. }), "{err}");
    assert!(matches!(Attention::new(Backend::Gpu).unwrap_err(), TwinferError::WouldBlock { .. }));
    // Auto without waiting falls back to the CPU, and says why.
    let auto = Attention::new(Backend::Auto).unwrap();
    assert_eq!(auto.info().backend, "cpu");
    console_log!("Attention::new(Auto) in a browser: {}", auto.info().reason);
}

fn tiny() -> Arc<LlamaModel> {
    Arc::new(random_decoder(preset("tiny").unwrap(), DType::F32, 5).unwrap())
}

/// Prefill of a prompt of `prompt_len` tokens, then greedy decode steps; returns the logits of
/// every step.
async fn decode_run(model: &LlamaModel, attention: &Attention, steps: usize, prompt_len: usize) -> Vec<Vec<f32>> {
    let c = &model.config;
    let layout = KvLayout::new(16, c.num_kv_heads, c.head_dim).unwrap();
    let mut cache =
        PagedKvCache::new(KvCacheConfig { num_layers: c.num_layers, num_pages: 16, layout, dtype: DType::F32 })
            .unwrap();
    let e = Engines { level: SimdLevel::detect(), prefill: attention, decode: attention };
    let seq = cache.add_sequence();
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 131 + 7) % 4000 + 10).collect();
    cache.reserve(&[seq], &[prompt.len()]).unwrap();
    let step = StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::Last };
    let mut all = vec![model.forward_async(e, &mut cache, &[step]).await.unwrap()];
    for _ in 0..steps {
        let next = twinfer::engine::argmax(all.last().unwrap());
        let start = cache.seq_len(seq).unwrap();
        cache.reserve(&[seq], &[1]).unwrap();
        let step = StepSeq { seq, tokens: &[next], start, logits: Logits::Last };
        all.push(model.forward_async(e, &mut cache, &[step]).await.unwrap());
    }
    all
}

#[wasm_bindgen_test]
async fn decoder_forward_async_matches_the_cpu_engine() {
    let model = tiny();
    let gpu = gpu().await;
    let got = decode_run(&model, &gpu, 3, 21).await;
    let want = decode_run(&model, &Attention::cpu(SimdLevel::detect()), 3, 21).await;
    compare(&got, &want, 1e-4, "f32 weights");
}

/// Per step, the logits within `rtol` of the largest and the same greedy token.
fn compare(got: &[Vec<f32>], want: &[Vec<f32>], rtol: f32, what: &str) {
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= rtol * scale, "{what}, step {s}: relative error {:.2e}", diff / scale);
        assert_eq!(twinfer::engine::argmax(g), twinfer::engine::argmax(w), "{what}, step {s}: greedy token");
    }
}

/// Block-quantized weights stay quantized on the browser's GPU too: the 4-bit, 8-bit and
/// 8-bit-with-offset `load_w` compile in the browser's WGSL compiler and agree with the CPU engine, in the GEMV (decode
/// steps) and the tiled matmul (a prompt of more than 64 rows). The CPU quantizes activations
/// to 16-bit codes (3e-4 of the top logit is the SmolLM2 test's bound for it); the GPU keeps
/// them f32 and decodes the weights exactly.
#[wasm_bindgen_test]
async fn quantized_weights_on_the_browser_gpu_match_the_cpu_engine() {
    let gpu = gpu().await;
    for format in
        [twinfer::quant::QuantFormat::Q4_1, twinfer::quant::QuantFormat::Q8_0, twinfer::quant::QuantFormat::Q5_1]
    {
        let mut model = random_decoder(preset("tiny").unwrap(), DType::F32, 5).unwrap();
        model.quantize(format).unwrap();
        let got = decode_run(&model, &gpu, 2, 70).await;
        let want = decode_run(&model, &Attention::cpu(SimdLevel::detect()), 2, 70).await;
        compare(&got, &want, 3e-4, format.name());
    }
}

/// An int8 KV cache resident on the browser's GPU (the int8 RoPE/append, prefill and decode
/// kernels through the browser's WGSL compiler, step buffers poisoned) against the CPU engine
/// over its own int8 cache: the same bound as `decoder_model`'s native check (f32 weights, so the
/// engines quantize the same K/V up to f32 rounding; a value that rounds to the other code on one
/// engine moves later logits by up to 1e-2).
#[wasm_bindgen_test]
async fn an_int8_cache_resident_on_the_browser_gpu_matches_the_cpu_engine() {
    let gpu = gpu().await;
    let model = tiny();
    let c = &model.config;
    let layout = KvLayout::new(16, c.num_kv_heads, c.head_dim).unwrap();
    let config = KvCacheConfig { num_layers: c.num_layers, num_pages: 16, layout, dtype: DType::Q8 };
    let resident =
        twinfer::model::ResidentDecoder::new(&model, gpu.gpu_engine().unwrap(), &config).unwrap().poison_for_test();
    let prompt: Vec<u32> = (0..21u32).map(|i| (i * 131 + 7) % 4000 + 10).collect();
    let mut runs = Vec::new();
    for on_gpu in [true, false] {
        let mut cache = PagedKvCache::new(config).unwrap();
        let seq = cache.add_sequence();
        cache.reserve(&[seq], &[prompt.len()]).unwrap();
        let cpu = Attention::cpu(SimdLevel::detect());
        let e = Engines { level: SimdLevel::detect(), prefill: &cpu, decode: &cpu };
        let mut logits: Vec<Vec<f32>> = Vec::new();
        let mut tokens: &[u32] = &prompt;
        let mut next = [0u32];
        let mut start = 0;
        for _ in 0..4 {
            let step = [StepSeq { seq, tokens, start, logits: Logits::Last }];
            let out = if on_gpu {
                model.forward_resident_async(&resident, &mut cache, &step).await.unwrap()
            } else {
                model.forward_async(e, &mut cache, &step).await.unwrap()
            };
            next[0] = twinfer::engine::argmax(&out);
            logits.push(out);
            start = cache.seq_len(seq).unwrap();
            cache.reserve(&[seq], &[1]).unwrap();
            tokens = &next;
        }
        runs.push(logits);
    }
    let (got, want) = (&runs[0], &runs[1]);
    let errs: Vec<f32> = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
        })
        .collect();
    console_log!("int8 cache, resident browser GPU against the CPU engine: logits errors {errs:?}");
    assert!(errs.iter().all(|&e| e <= 1e-2), "int8 cache: resident GPU against CPU: {errs:?}");
    assert!(errs.iter().filter(|&&e| e <= 1e-5).count() * 4 >= 3 * errs.len(), "int8 cache: {errs:?}");
}

fn scheduler(prefill: Attention, decode: Attention) -> Scheduler {
    let config = EngineConfig { kv_dtype: DType::F32, page_size: 8, max_batch_tokens: 32, ..Default::default() };
    let mut s = Scheduler::new(tiny(), None, SimdLevel::detect(), prefill, decode, config).unwrap();
    for (r, n) in [5usize, 19, 41].into_iter().enumerate() {
        let ids = (0..n).map(|i| ((i * 37 + r * 101 + 3) % 4000) as u32 + 10).collect();
        let mut req = GenerateRequest::tokens(ids).max_tokens(8);
        req.ignore_eos = true;
        s.add(req).unwrap();
    }
    s
}

async fn finish(s: &mut Scheduler, lose_at: usize, gpu: Option<&Attention>) -> Vec<Vec<u32>> {
    let mut out = std::collections::BTreeMap::new();
    let mut steps = 0;
    while s.has_work() {
        if steps == lose_at
            && let Some(g) = gpu
        {
            assert!(g.lose_device_for_test());
        }
        for e in s.step_async().await.unwrap() {
            if let Event::Finished { request, tokens, .. } = e {
                out.insert(request.0, tokens);
            }
        }
        steps += 1;
        assert!(steps < 10_000, "no progress");
    }
    out.into_values().collect()
}

#[wasm_bindgen_test]
async fn a_destroyed_device_falls_back_to_the_cpu_with_the_same_tokens() {
    let level = SimdLevel::detect();
    let want = finish(&mut scheduler(Attention::cpu(level), Attention::cpu(level)), usize::MAX, None).await;
    let gpu = gpu().await;
    let mut s = scheduler(gpu.clone(), gpu.clone());
    let got = finish(&mut s, 4, Some(&gpu)).await;
    assert_eq!(got, want);
    console_log!("after the loss: {:?}", s.fallback());
    assert!(s.fallback().is_some());
    assert_eq!(s.decode_attention().info().backend, "cpu");
    assert!(s.decode_attention().info().reason.starts_with("fallback:"));
}

/// Top-k sampling on the browser's GPU (`topk_rows.wgsl` through the browser's WGSL compiler): the
/// same tokens as sampling from read-back logits.
#[wasm_bindgen_test]
async fn top_k_sampling_on_the_browser_gpu_equals_sampling_from_logits() {
    let gpu = gpu().await;
    let mut runs = Vec::new();
    for on_device in [true, false] {
        let mut s = scheduler(gpu.clone(), gpu.clone());
        assert!(s.resident().is_some(), "not resident: {}", s.residency());
        s.sample_on_device(on_device);
        for (i, top_k) in [40usize, 3].into_iter().enumerate() {
            let ids = (0..9).map(|t| (t * 53 + i * 7 + 5) as u32 + 10).collect();
            let p =
                twinfer::engine::SamplingParams { temperature: 0.9, top_k, seed: 7 + i as u64, ..Default::default() };
            let mut req = GenerateRequest::tokens(ids).max_tokens(8).sampling(p);
            req.ignore_eos = true;
            s.add(req).unwrap();
        }
        runs.push(finish(&mut s, usize::MAX, None).await);
    }
    console_log!("top-k on the browser GPU: {:?}", runs[0]);
    assert_eq!(runs[0], runs[1]);
}

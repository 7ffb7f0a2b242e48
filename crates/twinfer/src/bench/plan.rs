//! `plan`: the design's decision tree ("FlashAttention-style prefill, FlashInfer-style decode"),
//! made executable and measured on this device. Every available attention engine (each CPU SIMD
//! level, the GPU when there is one) runs the model's real forward pass for a prompt chunk
//! (compute-bound) and for a decode batch (memory-bound) at several page sizes; the fastest per
//! phase wins, and the evidence comes with the recommendation.

use std::sync::Arc;

use serde_json::{Value, json};

use super::timing::Stats;
use crate::backend::{Attention, Backend};
use crate::cpu::SimdLevel;
use crate::dtype::DType;
use crate::error::Result;
use crate::kv::{KvCacheConfig, KvLayout, PagedKvCache, SeqId};
use crate::model::{Engines, LlamaModel, Logits, ResidentDecoder, StepSeq};

/// The shapes to time.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Tokens of the prompt chunk timed for prefill.
    pub prefill_tokens: usize,
    /// Sequences and their context for the decode step.
    pub decode_batch: usize,
    /// KV tokens of each sequence in the decode step.
    pub decode_context: usize,
    /// KV page sizes to time decode (and prefill) at.
    pub page_sizes: Vec<usize>,
    /// Element type of the KV cache timed.
    pub kv_dtype: DType,
    /// Stop repeating a measurement once it has taken this long.
    pub budget_s: f64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            prefill_tokens: 256,
            decode_batch: 8,
            decode_context: 512,
            page_sizes: vec![16, 64],
            kv_dtype: DType::F16,
            budget_s: 2.0,
        }
    }
}

/// One attention engine the plan can choose.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Display name, such as `cpu avx2` or `gpu <variant> on <device>`.
    pub name: String,
    /// The backend that runs its attention.
    pub backend: Backend,
    /// The CPU instruction set of the projections (and of the CPU attention engine).
    pub simd: SimdLevel,
    attention: Attention,
}

/// One timing.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Name of the [`Candidate`] timed.
    pub candidate: String,
    /// `"prefill"` or `"decode"`.
    pub phase: &'static str,
    /// KV page size of the run.
    pub page_size: usize,
    /// Tokens the step processes: the prompt chunk (prefill) or the batch (decode).
    pub tokens: usize,
    /// Wall time of a step, in seconds.
    pub seconds: Stats,
    /// The step's kernels alone (GPU timestamps around a replay of its dispatches), where the
    /// forward pass is resident on a GPU with timestamps: the rest of `seconds` is host work,
    /// copies and the readback.
    pub device_seconds: Option<Stats>,
    /// The same split by kernel, in the step's order (empty where `device_seconds` is `None`).
    pub device_kernels: Vec<KernelShare>,
    /// Host time recording a resident step (mean over the timed steps): with `device_seconds`,
    /// what the wall time is made of; the rest is the readback and waiting.
    pub record_seconds: Option<f64>,
}

/// One kernel's dispatches in a step and their device time replayed alone.
#[derive(Debug, Clone)]
pub struct KernelShare {
    /// Kernel (pipeline) name.
    pub kernel: &'static str,
    /// Dispatches of it in one step.
    pub dispatches: usize,
    /// Their device time, in seconds.
    pub seconds: Stats,
}

/// A resident step's kernel time: all of it, by kernel, and the host's recording time per step.
type DeviceTime = (Option<Stats>, Vec<KernelShare>, Option<f64>);

impl Measurement {
    /// Throughput of the step: `tokens / median seconds`.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.median
    }
}

/// The recommendation and its evidence.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Every timing taken.
    pub measurements: Vec<Measurement>,
    /// The prefill engine's name and backend.
    pub prefill: (String, Backend),
    /// The decode engine's name and backend.
    pub decode: (String, Backend),
    /// CPU instruction set for the projections (decode's, when decode runs on the CPU).
    pub simd: SimdLevel,
    /// KV page size of the fastest decode.
    pub page_size: usize,
    /// KV element type the plan was timed with.
    pub kv_dtype: DType,
    /// Why, one sentence per decision, for the report.
    pub reasons: Vec<String>,
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Auto => "auto",
        Backend::Cpu => "cpu",
        Backend::Gpu => "gpu",
    }
}

impl Plan {
    /// The config file `run` and `bench serve` accept with `--config`.
    pub fn to_json(&self) -> Value {
        json!({
            "prefill_backend": backend_name(self.prefill.1), "decode_backend": backend_name(self.decode.1),
            "simd": self.simd.name(), "page_size": self.page_size, "kv_dtype": self.kv_dtype.to_string(),
            "prefill_engine": self.prefill.0, "decode_engine": self.decode.0, "reasons": self.reasons,
            "evidence": self.measurements.iter().map(|m| json!({
                "engine": m.candidate, "phase": m.phase, "page_size": m.page_size, "tokens": m.tokens,
                "median_ms": m.seconds.median * 1e3, "min_ms": m.seconds.min * 1e3, "max_ms": m.seconds.max * 1e3,
                "runs": m.seconds.runs, "tokens_per_s": m.tokens_per_s(),
                "device_median_ms": m.device_seconds.as_ref().map(|d| d.median * 1e3),
                "record_ms": m.record_seconds.map(|s| s * 1e3),
                "device_kernels": m.device_kernels.iter().map(|k| json!({
                    "kernel": k.kernel, "dispatches": k.dispatches, "median_ms": k.seconds.median * 1e3,
                })).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        })
    }
}

/// Every engine this device can run: each CPU SIMD level, and the GPU if one passes its self-test.
pub fn candidates() -> Vec<Candidate> {
    let mut all: Vec<Candidate> = SimdLevel::available()
        .into_iter()
        .map(|l| Candidate {
            name: format!("cpu {}", l.name()),
            backend: Backend::Cpu,
            simd: l,
            attention: Attention::cpu(l),
        })
        .collect();
    // The GPU when one passes its self-test, in every shader variant its adapter supports.
    if let Ok(auto_gpu) = Attention::new(Backend::Gpu)
        && let Ok(base) = crate::gpu::GpuEngine::new()
    {
        let device = auto_gpu.info().device.clone();
        for variant in [crate::gpu::Variant::Baseline, crate::gpu::Variant::Subgroup] {
            // The tensor cores (prompt projections) on and off where the device has them.
            let tensor_cores: &[bool] = if variant == crate::gpu::Variant::Subgroup && base.options().tensor_cores {
                &[false, true]
            } else {
                &[false]
            };
            for (f16_kv, tensor_cores) in
                [false, true].into_iter().flat_map(|f| tensor_cores.iter().map(move |&t| (f, t)))
            {
                let opts = crate::gpu::GpuOptions { variant, f16_kv, tensor_cores, ..base.options() };
                if let Ok(engine) = base.with_options(opts) {
                    let attention = Attention::gpu(engine);
                    all.push(Candidate {
                        name: format!("gpu {} on {device}", attention.info().variant),
                        backend: Backend::Gpu,
                        simd: SimdLevel::detect(),
                        attention,
                    });
                }
            }
        }
    }
    all
}

/// Times every candidate on `model` and picks the fastest per phase.
pub fn plan(model: &Arc<LlamaModel>, opts: &PlanOptions, candidates: &[Candidate]) -> Result<Plan> {
    let mut measurements = Vec::new();
    for c in candidates {
        let engines = Engines { level: c.simd, prefill: &c.attention, decode: &c.attention };
        let page = opts.page_sizes[0];
        let (seconds, (device_seconds, device_kernels, record_seconds)) = time_prefill(model, engines, opts, page)?;
        measurements.push(Measurement {
            candidate: c.name.clone(),
            phase: "prefill",
            page_size: page,
            tokens: opts.prefill_tokens,
            seconds,
            device_seconds,
            device_kernels,
            record_seconds,
        });
        for &page in &opts.page_sizes {
            let (seconds, (device_seconds, device_kernels, record_seconds)) = time_decode(model, engines, opts, page)?;
            measurements.push(Measurement {
                candidate: c.name.clone(),
                phase: "decode",
                page_size: page,
                tokens: opts.decode_batch,
                seconds,
                device_seconds,
                device_kernels,
                record_seconds,
            });
        }
    }
    recommend(measurements, candidates, opts)
}

/// The fastest engine per phase from the timings, and why.
fn recommend(measurements: Vec<Measurement>, candidates: &[Candidate], opts: &PlanOptions) -> Result<Plan> {
    let best = |phase: &str| {
        measurements
            .iter()
            .filter(|m| m.phase == phase)
            .min_by(|a, b| a.seconds.median.total_cmp(&b.seconds.median))
            .expect("at least the scalar CPU engine was measured")
            .clone()
    };
    let (p, d) = (best("prefill"), best("decode"));
    let find = |name: &str| candidates.iter().find(|c| c.name == name).expect("measured candidate");
    let (pc, dc) = (find(&p.candidate), find(&d.candidate));
    let mut reasons = vec![
        format!(
            "prefill (compute-bound): {} at {:.0} tokens/s is the fastest of {} engines",
            p.candidate,
            p.tokens_per_s(),
            candidates.len()
        ),
        format!(
            "decode (memory-bound): {} with pages of {} at {:.0} tokens/s is the fastest of {} engine x page-size pairs",
            d.candidate,
            d.page_size,
            d.tokens_per_s(),
            measurements.iter().filter(|m| m.phase == "decode").count()
        ),
    ];
    if pc.backend != dc.backend {
        reasons.push("the phases run on different backends: the hybrid configuration".into());
    }
    // The projections dominate a CPU forward pass: run them where decode was fastest.
    let simd = if dc.backend == Backend::Cpu { dc.simd } else { pc.simd };
    let mut prefill_engine = p.candidate.clone();
    if pc.backend == Backend::Cpu && pc.simd.name() != simd.name() {
        // One step runs prompt chunks and decode tokens through the same projections, so both
        // phases get one instruction set: write the prefill engine that will really run, and say so.
        let same_level = candidates.iter().find(|c| c.backend == Backend::Cpu && c.simd.name() == simd.name());
        if let Some(c) = same_level
            && let Some(m) = measurements.iter().find(|m| m.phase == "prefill" && m.candidate == c.name)
        {
            reasons.push(format!(
                "prefill: {} was fastest, but a step runs both phases through the same projections, so \
                 prefill takes decode's {simd} too: {} prefills at {:.0} tokens/s",
                p.candidate,
                c.name,
                m.tokens_per_s()
            ));
            prefill_engine = c.name.clone();
        }
    }
    Ok(Plan {
        prefill: (prefill_engine, pc.backend),
        decode: (d.candidate.clone(), dc.backend),
        simd,
        page_size: d.page_size,
        kv_dtype: opts.kv_dtype,
        measurements,
        reasons,
    })
}

fn cache_for(model: &LlamaModel, opts: &PlanOptions, page: usize, tokens: usize) -> Result<PagedKvCache> {
    let c = &model.config;
    let layout = KvLayout::new(page, c.num_kv_heads, c.head_dim)?;
    let num_pages = tokens.div_ceil(page) + opts.decode_batch + 1;
    PagedKvCache::new(KvCacheConfig { num_layers: c.num_layers, num_pages, layout, dtype: opts.kv_dtype })
}

fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729) % (vocab - 3) + 3) as u32).collect()
}

/// Repeats `f` until `budget` seconds or 5 runs, after one warm-up run (skipped when a single
/// run already exceeds the budget).
fn repeat(budget: f64, mut f: impl FnMut() -> Result<f64>) -> Result<Stats> {
    let first = f()?;
    let mut samples = Vec::new();
    let mut spent = first;
    if first > budget {
        samples.push(first);
    }
    while samples.len() < 5 && (spent < budget || samples.is_empty()) {
        let t = f()?;
        spent += t;
        samples.push(t);
    }
    Ok(Stats::from_samples(samples))
}

/// The step the engine would run for greedy requests, through to the next tokens: the whole
/// model resident on the GPU when both phases are there (as the scheduler does, picking the
/// tokens on the device), else op by op with the pick on the host.
fn forward(
    model: &LlamaModel,
    engines: Engines<'_>,
    resident: Option<&ResidentDecoder>,
    cache: &mut PagedKvCache,
    seqs: &[StepSeq<'_>],
    records: &mut Vec<f64>,
) -> Result<Vec<u32>> {
    match resident {
        Some(r) => {
            let before = r.engine().counts().record_ns;
            let tokens = model.forward_resident_greedy(r, cache, seqs)?;
            records.push((r.engine().counts().record_ns - before) as f64 * 1e-9);
            Ok(tokens)
        }
        None => {
            let logits = model.forward(engines, cache, seqs)?;
            Ok(logits.chunks(model.config.vocab_size).map(crate::engine::argmax).collect())
        }
    }
}

/// The median host recording time of the resident steps, the first (warm-up) left out.
fn median_record(records: &[f64]) -> Option<f64> {
    let warm = records.get(1..).filter(|r| !r.is_empty())?;
    Some(Stats::from_samples(warm.to_vec()).median)
}

/// Replays the resident step last recorded with GPU timestamps: its kernels' time alone, and
/// each kernel's dispatches alone.
fn device_time(resident: Option<&ResidentDecoder>, record: Option<f64>) -> Result<DeviceTime> {
    let Some(r) = resident else { return Ok((None, Vec::new(), None)) };
    let total = r.engine().timestamp_samples(20)?.map(Stats::from_samples);
    let kernels = r.engine().timestamp_by_kernel(10)?.unwrap_or_default();
    let shares = kernels
        .into_iter()
        .map(|k| KernelShare { kernel: k.kernel, dispatches: k.dispatches, seconds: Stats::from_samples(k.seconds) })
        .collect();
    Ok((total, shares, record))
}

fn time_prefill(
    model: &LlamaModel,
    engines: Engines<'_>,
    opts: &PlanOptions,
    page: usize,
) -> Result<(Stats, DeviceTime)> {
    let prompt = tokens(opts.prefill_tokens, model.config.vocab_size, 1);
    let mut cache = cache_for(model, opts, page, opts.prefill_tokens)?;
    let (resident, _) = ResidentDecoder::for_engines(model, engines.prefill, engines.decode, &cache.config());
    let mut records = Vec::new();
    let host = repeat(opts.budget_s, || {
        let seq = cache.add_sequence();
        cache.reserve(&[seq], &[prompt.len()])?;
        let t = std::time::Instant::now();
        let step = [StepSeq { seq, tokens: &prompt, start: 0, logits: Logits::Last }];
        forward(model, engines, resident.as_ref(), &mut cache, &step, &mut records)?;
        let secs = t.elapsed().as_secs_f64();
        cache.free(seq)?;
        Ok(secs)
    })?;
    Ok((host, device_time(resident.as_ref(), median_record(&records))?))
}

fn time_decode(
    model: &LlamaModel,
    engines: Engines<'_>,
    opts: &PlanOptions,
    page: usize,
) -> Result<(Stats, DeviceTime)> {
    let (b, ctx) = (opts.decode_batch, opts.decode_context);
    // Room for the warm-up and five timed steps.
    let mut cache = cache_for(model, opts, page, b * (ctx + 8))?;
    // The contexts hold arbitrary K/V rows: attention costs the same whatever the values, and
    // filling them through the model would cost more than the measurement.
    let seqs: Vec<SeqId> = (0..b).map(|_| cache.add_sequence()).collect();
    cache.reserve(&seqs, &vec![ctx; b])?;
    let indptr: Vec<u32> = (0..=b).map(|i| (i * ctx) as u32).collect();
    let rows = b * ctx * model.config.kv_dim();
    let values: Vec<f32> = (0..rows).map(|i| ((i * 2_654_435_761) % 2001) as f32 / 1000.0 - 1.0).collect();
    let stored = crate::kv::storage::Storage::from_f32(opts.kv_dtype, &values, model.config.head_dim)?;
    for layer in 0..model.config.num_layers {
        cache.append(layer, &seqs, &indptr, stored.as_ref(), stored.as_ref())?;
    }
    let next: Vec<[u32; 1]> = (0..b).map(|i| [(i % 1000 + 3) as u32]).collect();
    // On the resident path the device pool holds zeros where the host cache holds the rows above:
    // the attention reads the same bytes either way.
    let (resident, _) = ResidentDecoder::for_engines(model, engines.prefill, engines.decode, &cache.config());
    let mut steps = 0;
    let mut records = Vec::new();
    let host = repeat(opts.budget_s, || {
        if steps == 8 {
            return Err(crate::TwinferError::InvalidParameter("decode plan ran out of room".into()));
        }
        steps += 1;
        let starts: Vec<usize> = seqs.iter().map(|&s| cache.seq_len(s)).collect::<Result<_>>()?;
        cache.reserve(&seqs, &vec![1; b])?;
        let batch: Vec<StepSeq<'_>> = seqs
            .iter()
            .zip(&starts)
            .zip(&next)
            .map(|((&seq, &start), tok)| StepSeq { seq, tokens: tok, start, logits: Logits::Last })
            .collect();
        let t = std::time::Instant::now();
        forward(model, engines, resident.as_ref(), &mut cache, &batch, &mut records)?;
        Ok(t.elapsed().as_secs_f64())
    })?;
    Ok((host, device_time(resident.as_ref(), median_record(&records))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(level: SimdLevel) -> Candidate {
        Candidate {
            name: format!("cpu {}", level.name()),
            backend: Backend::Cpu,
            simd: level,
            attention: Attention::cpu(level),
        }
    }

    fn timing(candidate: &str, phase: &'static str, seconds: f64) -> Measurement {
        let seconds = Stats::from_samples(vec![seconds]);
        Measurement {
            candidate: candidate.into(),
            phase,
            page_size: 16,
            tokens: 256,
            seconds,
            device_seconds: None,
            device_kernels: Vec::new(),
            record_seconds: None,
        }
    }

    /// When the phases' fastest CPU engines use different instruction sets, the config cannot run
    /// both (a step shares the projections): the prefill engine it names is the one that will run.
    #[test]
    fn the_written_prefill_engine_runs_on_the_level_the_config_sets() {
        let levels = SimdLevel::available();
        let [.., narrow, wide] = levels.as_slice() else { panic!("every target has scalar and one SIMD level") };
        let (narrow, wide) = (cpu(*narrow), cpu(*wide));
        let measurements = vec![
            timing(&wide.name, "prefill", 1.0),
            timing(&narrow.name, "prefill", 2.0),
            timing(&wide.name, "decode", 2.0),
            timing(&narrow.name, "decode", 1.0),
        ];
        let plan = recommend(measurements, &[narrow.clone(), wide.clone()], &PlanOptions::default()).unwrap();
        assert_eq!(plan.simd.name(), narrow.simd.name(), "decode's level runs the projections");
        assert_eq!(plan.decode.0, narrow.name);
        assert_eq!(plan.prefill.0, narrow.name, "the config names a prefill engine that cannot run");
        assert!(
            plan.reasons.iter().any(|r| r.contains(&wide.name) && r.contains("same projections")),
            "{:?}",
            plan.reasons
        );
    }
}

//! `bench serve`: the three serving scenarios of the design (support agent, long-context analysis,
//! high-concurrency API) as Poisson arrivals into the continuous-batching scheduler, on a
//! Llama-shaped model with seeded random weights, reporting TTFT / TPOT / TPS / ITL and a
//! PASS/FAIL line against the scenario's thresholds. A `scale` shrinks contexts and concurrency to
//! what the device can run, and is printed next to every verdict.
//!
//! It also measures the decode floor: one sequence's TPOT against (weight bytes + KV bytes read
//! per token) / the read bandwidth measured in the same run.

use std::sync::Arc;

use serde_json::{Value, json};

use super::ceilings::read_bandwidth;
use super::timing::Stats;
use crate::backend::Attention;
use crate::cpu::SimdLevel;
use crate::dtype::DType;
use crate::engine::{EngineConfig, GenerateRequest, RequestMetrics, RunMetrics, Scheduler};
use crate::error::{Result, TwinferError};
use crate::model::{LlamaModel, preset, random_decoder};

/// The design's three scenarios, at full scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Support agent: contexts of 4K-8K tokens, 10-50 requests in flight.
    Support,
    /// Long-context analysis: contexts of 32K-128K tokens, 20-100 requests in flight.
    LongContext,
    /// High-concurrency API: contexts of 8K-16K tokens, 100-1000 requests in flight.
    HighConcurrency,
}

/// A scenario's workload and the thresholds it must meet (`None`: not judged).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScenarioSpec {
    /// The scenario's name on the command line (`support`, `long-context`, `high-concurrency`).
    pub name: &'static str,
    /// Prompt lengths in tokens, `(min, max)`.
    pub context: (usize, usize),
    /// Requests in flight, `(min, max)`.
    pub concurrency: (usize, usize),
    /// Largest median time to first token, in seconds.
    pub ttft_max_s: Option<f64>,
    /// Largest median time per output token, in seconds.
    pub tpot_max_s: Option<f64>,
    /// Smallest output tokens per second of the whole run.
    pub tps_min: Option<f64>,
    /// Largest standard deviation of the inter-token latency, in seconds.
    pub itl_std_max_s: Option<f64>,
}

impl Scenario {
    /// Parses a scenario name: `support`, `long-context` or `high-concurrency`.
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "support" => Ok(Self::Support),
            "long-context" => Ok(Self::LongContext),
            "high-concurrency" => Ok(Self::HighConcurrency),
            _ => Err(TwinferError::InvalidParameter(format!(
                "unknown scenario {name:?} (support, long-context, high-concurrency)"
            ))),
        }
    }

    /// The scenario's workload and thresholds at full scale.
    pub fn spec(self) -> ScenarioSpec {
        let none = ScenarioSpec {
            name: "",
            context: (0, 0),
            concurrency: (0, 0),
            ttft_max_s: None,
            tpot_max_s: None,
            tps_min: None,
            itl_std_max_s: None,
        };
        match self {
            Self::Support => ScenarioSpec {
                name: "support",
                context: (4096, 8192),
                concurrency: (10, 50),
                ttft_max_s: Some(0.200),
                tpot_max_s: Some(0.050),
                tps_min: Some(30.0),
                ..none
            },
            Self::LongContext => ScenarioSpec {
                name: "long-context",
                context: (32_768, 131_072),
                concurrency: (20, 100),
                tpot_max_s: Some(0.050),
                itl_std_max_s: Some(0.010),
                tps_min: Some(40.0),
                ..none
            },
            Self::HighConcurrency => ScenarioSpec {
                name: "high-concurrency",
                context: (8192, 16_384),
                concurrency: (100, 1000),
                ttft_max_s: Some(0.150),
                tpot_max_s: Some(0.060),
                tps_min: Some(80.0),
                ..none
            },
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The scenario to run.
    pub scenario: Scenario,
    /// Multiplies the scenario's context lengths.
    pub scale: f64,
    /// Multiplies the scenario's concurrency.
    pub concurrency_scale: f64,
    /// Requests to submit.
    pub requests: usize,
    /// Tokens each request generates.
    pub output_tokens: usize,
    /// Mean arrivals per second; `None` calibrates it so that about the middle of the scenario's
    /// (scaled) concurrency range is in flight.
    pub rate: Option<f64>,
    /// A closed loop instead of Poisson arrivals: this many users, each sending its next request
    /// the moment its previous one finishes, so that exactly this many are in flight (the
    /// scenario's concurrency taken literally; `rate` must then be `None`).
    pub users: Option<usize>,
    /// A preset of [`crate::model::PRESETS`].
    pub model: String,
    /// Storage type of the random weights.
    pub weight_dtype: DType,
    /// Engine settings; `max_running` and the KV pool are sized from the scenario.
    pub engine: EngineConfig,
    /// Caps the KV pool (bytes, all layers, K and V); by default it holds every request that may
    /// run at once at its longest.
    pub kv_budget_bytes: Option<usize>,
    /// Seed of the weights, prompts and arrivals.
    pub seed: u64,
}

impl ServeOptions {
    /// The quick run of the README: contexts / 32, concurrency / 5, 16 requests of 32 tokens.
    pub fn quick(scenario: Scenario) -> Self {
        Self {
            scenario,
            scale: 1.0 / 32.0,
            concurrency_scale: 0.2,
            requests: 16,
            output_tokens: 32,
            rate: None,
            users: None,
            model: "smollm-135m".into(),
            weight_dtype: DType::F16,
            engine: EngineConfig::default(),
            kv_budget_bytes: None,
            seed: 7,
        }
    }
}

/// One sequence decoding alone, against the memory floor.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeFloor {
    /// KV tokens of the sequence (the scaled context's lower end).
    pub context: usize,
    /// Time per output token, in seconds.
    pub tpot_s: Stats,
    /// Bytes of weights read per token.
    pub weight_bytes: usize,
    /// Bytes of KV read per token (all layers, K and V) at the middle of the timed steps.
    pub kv_bytes: usize,
    /// Read bandwidth of the device, in GB/s.
    pub read_gbps: Stats,
    /// Whose read ceiling: the GPU's when the model is resident there, else the CPU's.
    pub device: String,
}

impl DecodeFloor {
    /// The memory floor of one token, in seconds: bytes read / bandwidth.
    pub fn floor_s(&self) -> f64 {
        (self.weight_bytes + self.kv_bytes) as f64 / (self.read_gbps.median * 1e9)
    }
    /// Median TPOT over the floor: 1 means bandwidth-bound.
    pub fn ratio(&self) -> f64 {
        self.tpot_s.median / self.floor_s()
    }
}

/// GPU work per scheduler step: submissions, dispatches, host readbacks and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerStep {
    /// Scheduler steps measured.
    pub steps: u64,
    /// Queue submissions per step.
    pub submits: f64,
    /// Compute dispatches per step.
    pub dispatches: f64,
    /// Copies to the host per step.
    pub readbacks: f64,
    /// Bytes copied to the host per step.
    pub readback_bytes: f64,
    /// Host seconds recording the step (the model's own work up to the submission).
    pub record_s: f64,
}

impl PerStep {
    fn between(before: crate::gpu::ResourceCounts, after: crate::gpu::ResourceCounts, steps: u64) -> Self {
        let per = |a: u64, b: u64| (b - a) as f64 / steps.max(1) as f64;
        Self {
            steps,
            submits: per(before.submits, after.submits),
            dispatches: per(before.dispatches, after.dispatches),
            readbacks: per(before.readbacks, after.readbacks),
            readback_bytes: per(before.readback_bytes, after.readback_bytes),
            record_s: per(before.record_ns, after.record_ns) * 1e-9,
        }
    }
}

/// Everything `bench serve` measured.
#[derive(Debug, Clone)]
pub struct ServeReport {
    /// The scenario's full-scale workload and thresholds.
    pub spec: ScenarioSpec,
    /// Multiplier applied to the context lengths.
    pub scale: f64,
    /// Multiplier applied to the concurrency.
    pub concurrency_scale: f64,
    /// Prompt lengths after scaling, `(min, max)`.
    pub context: (usize, usize),
    /// Concurrency after scaling, `(min, max)`.
    pub concurrency: (usize, usize),
    /// Mean arrivals per second: the Poisson rate, or what a closed loop achieved.
    pub rate: f64,
    /// The closed loop's users, or `None` for Poisson arrivals.
    pub users: Option<usize>,
    /// Tokens each request generated.
    pub output_tokens: usize,
    /// The model preset.
    pub model: String,
    /// One line on the model: preset, dtype, sizes.
    pub model_description: String,
    /// The prefill attention engine: backend, variant and device.
    pub prefill_engine: String,
    /// The decode attention engine: backend, variant and device.
    pub decode_engine: String,
    /// Where the forward pass ran (resident on the GPU, or op by op) and why.
    pub residency: String,
    /// KV pool: pages and bytes (all layers, K and V).
    pub kv_pool: (usize, usize),
    /// GPU work per scheduler step of the timed run (zeros on the CPU).
    pub per_step: PerStep,
    /// Metrics of the whole timed run.
    pub run: RunMetrics,
    /// Each request's submission time (seconds from the start) and metrics, for plots.
    pub requests: Vec<(f64, RequestMetrics)>,
    /// The single-sequence decode floor.
    pub floor: DecodeFloor,
    /// The request of the mean context served alone to calibrate the arrival rate; `None` when a
    /// rate or users were given. Prompt lengths are uniform, so the median request's prompt is
    /// about this long and its TTFT in the run is at least this one's.
    pub alone: Option<RequestMetrics>,
    /// (criterion, measured, threshold, passed).
    pub verdicts: Vec<(&'static str, f64, f64, bool)>,
}

impl ServeReport {
    /// Whether every verdict passed.
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.3)
    }

    /// The report as JSON, for `--json` output and plots.
    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.spec.name, "scale": self.scale, "concurrency_scale": self.concurrency_scale,
            "context": [self.context.0, self.context.1], "concurrency": [self.concurrency.0, self.concurrency.1],
            "rate_per_s": self.rate, "arrivals": if self.users.is_some() { "closed loop" } else { "poisson" },
            "users": self.users, "output_tokens": self.output_tokens, "model": self.model,
            "model_description": self.model_description, "prefill_engine": self.prefill_engine,
            "decode_engine": self.decode_engine, "residency": self.residency,
            "kv_pool_pages": self.kv_pool.0, "kv_pool_bytes": self.kv_pool.1, "metrics": self.run.to_json(),
            "gpu_per_step": {"steps": self.per_step.steps, "submits": self.per_step.submits,
                "dispatches": self.per_step.dispatches, "readbacks": self.per_step.readbacks,
                "readback_bytes": self.per_step.readback_bytes, "record_ms": self.per_step.record_s * 1e3},
            "read_ceiling_device": self.floor.device,
            "decode_floor": {"context": self.floor.context, "tpot_s": self.floor.tpot_s.median,
                "tpot_min_s": self.floor.tpot_s.min, "tpot_max_s": self.floor.tpot_s.max,
                "weight_bytes": self.floor.weight_bytes, "kv_bytes": self.floor.kv_bytes,
                "read_gbps": self.floor.read_gbps.median, "floor_s": self.floor.floor_s(), "ratio": self.floor.ratio()},
            "alone": self.alone.as_ref().map(|m| json!({"prompt_tokens": m.prompt_tokens, "ttft_s": m.ttft(), "tpot_s": m.tpot(), "e2e_s": m.e2e})),
            "verdicts": self.verdicts.iter().map(|(name, got, limit, ok)| json!({"criterion": name, "measured": got, "threshold": limit, "pass": ok})).collect::<Vec<_>>(),
            "pass": self.passed(),
        })
    }
}

fn scaled(range: (usize, usize), s: f64, min: usize) -> (usize, usize) {
    let f = |x: usize| ((x as f64 * s).round() as usize).max(min);
    (f(range.0), f(range.1).max(f(range.0)))
}

/// Seeded stream of uniform numbers in [0, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() * (hi - lo + 1) as f64) as usize % (hi - lo + 1)
    }
}

fn prompt(rng: &mut Rng, len: usize, vocab: usize) -> Vec<u32> {
    // Token 0..3 are often special; stay clear of them.
    (0..len).map(|_| 3 + rng.range(0, vocab - 4) as u32).collect()
}

/// Runs the scenario.
pub fn run_serve(opts: &ServeOptions) -> Result<ServeReport> {
    let spec = opts.scenario.spec();
    if !(opts.scale > 0.0 && opts.concurrency_scale > 0.0) || opts.requests == 0 || opts.output_tokens == 0 {
        return Err(TwinferError::InvalidParameter("scales, requests and output tokens must be positive".into()));
    }
    let context = scaled(spec.context, opts.scale, 16);
    let concurrency = scaled(spec.concurrency, opts.concurrency_scale, 1);
    let config = preset(&opts.model)?;
    let mut model = random_decoder(config, opts.weight_dtype, opts.seed)?;
    if let Some(format) = opts.engine.quantize {
        model.quantize(format)?;
    }
    model.set_activations(opts.engine.activations);
    let model = Arc::new(model);
    let level = opts.engine.simd.unwrap_or_else(SimdLevel::detect);
    let prefill = Attention::with_simd(opts.engine.prefill_backend, opts.engine.simd)?;
    let decode = Attention::with_simd(opts.engine.decode_backend, opts.engine.simd)?;
    let engine_name = |a: &Attention| format!("{} {} on {}", a.info().backend, a.info().variant, a.info().device);
    let (prefill_engine, decode_engine) = (engine_name(&prefill), engine_name(&decode));

    // The pool holds every request that may run at once at its longest, plus a margin.
    let mut engine = opts.engine.clone();
    let in_flight = opts.users.unwrap_or(0).max(concurrency.1);
    engine.max_running = in_flight;
    let longest = context.1 + opts.output_tokens;
    let pages_needed = in_flight * longest.div_ceil(engine.page_size) + 8;
    let c = &model.config;
    let layout =
        crate::kv::KvLayout { page_size: engine.page_size, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
    let page_bytes = 2 * c.num_layers * layout.page_bytes(engine.kv_dtype);
    let mut pages = pages_needed;
    if let Some(budget) = opts.kv_budget_bytes {
        pages = pages.min((budget / page_bytes).max(1));
    }
    // Resident on a GPU, each layer's pool (K or V) is one binding: beyond that the scheduler
    // preempts instead of the forward pass leaving the device.
    if let (Some(_), Some(gpu)) = (prefill.gpu_engine(), decode.gpu_engine()) {
        let layer_page = page_bytes / (2 * c.num_layers);
        pages = pages.min((gpu.context().limits.max_storage_buffer_binding_size as usize / layer_page).max(1));
    }
    engine.kv_pool_pages.get_or_insert(pages);
    let mut sched = Scheduler::new(model.clone(), None, level, prefill, decode, engine)?;

    let floor = decode_floor(&mut sched, &model, context.0, level)?;

    let mut rng = Rng(opts.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let vocab = model.config.vocab_size;
    let mut alone = None;
    let rate = match (opts.rate, opts.users) {
        (_, Some(0)) => return Err(TwinferError::InvalidParameter("users must be at least 1".into())),
        (Some(_), Some(_)) => {
            return Err(TwinferError::InvalidParameter("a closed loop of users has no arrival rate".into()));
        }
        // Set from the run below.
        (None, Some(_)) => 0.0,
        (Some(r), None) if r > 0.0 => r,
        (Some(_), None) => return Err(TwinferError::InvalidParameter("rate must be positive".into())),
        (None, None) => {
            // One request alone takes about a prefill of the mean context plus the decode steps.
            let mean_ctx = (context.0 + context.1) / 2;
            let t0 = sched.now();
            sched.add(greedy(prompt(&mut rng, mean_ctx, vocab), opts.output_tokens))?;
            while sched.has_work() {
                for e in sched.step()? {
                    if let crate::engine::Event::Finished { metrics, .. } = e {
                        alone = Some(metrics);
                    }
                }
            }
            let target = (concurrency.0 + concurrency.1) as f64 / 2.0;
            target / (sched.now() - t0).max(1e-3)
        }
    };
    sched.reset_metrics();
    let counts = |s: &Scheduler| s.decode_attention().gpu_engine().map(|g| g.counts()).unwrap_or_default();
    let counts_before = counts(&sched);
    let mut steps = 0u64;

    // Poisson arrivals: exponential gaps at `rate`. A closed loop's first requests arrive at 0,
    // and each later one when a request finishes (its time set then; infinite until).
    let mut arrivals = Vec::with_capacity(opts.requests);
    let mut t = 0.0;
    for i in 0..opts.requests {
        t = match opts.users {
            Some(u) => {
                if i < u {
                    0.0
                } else {
                    f64::INFINITY
                }
            }
            None => t - (1.0 - rng.next()).ln() / rate,
        };
        let len = rng.range(context.0, context.1);
        arrivals.push((t, prompt(&mut rng, len, vocab)));
    }
    let mut released = opts.users.map_or(opts.requests, |u| u.min(opts.requests));
    let start = sched.now();
    let mut next = 0;
    let mut submitted = Vec::with_capacity(opts.requests);
    let mut finished: Vec<(u64, RequestMetrics)> = Vec::new();
    while next < arrivals.len() || sched.has_work() {
        let now = sched.now() - start;
        while next < arrivals.len() && arrivals[next].0 <= now {
            // A request that arrived while a step ran has waited since its arrival: its TTFT
            // counts from then, not from when the step let it in.
            let (arrived, ids) = (arrivals[next].0, std::mem::take(&mut arrivals[next].1));
            let id = sched.add_arrived(greedy(ids, opts.output_tokens), start + arrived)?;
            submitted.push((id.0, arrived));
            next += 1;
        }
        if sched.has_work() {
            steps += 1;
            for e in sched.step()? {
                if let crate::engine::Event::Finished { request, metrics, .. } = e {
                    finished.push((request.0, metrics));
                    if released < arrivals.len() {
                        arrivals[released].0 = sched.now() - start;
                        released += 1;
                    }
                }
            }
        } else if next < arrivals.len() {
            let wait = arrivals[next].0 - (sched.now() - start);
            if !wait.is_finite() {
                return Err(TwinferError::InvalidParameter(
                    "closed loop: nothing in flight and nothing to send".into(),
                ));
            }
            if wait > 0.0 {
                std::thread::sleep(std::time::Duration::from_secs_f64(wait));
            }
        }
    }
    let run = sched.run_metrics();
    let rate = if opts.users.is_some() { opts.requests as f64 / run.wall.max(1e-9) } else { rate };
    let per_step = PerStep::between(counts_before, counts(&sched), steps);
    finished.sort_by_key(|(id, _)| *id);
    let requests =
        finished.into_iter().map(|(id, m)| (submitted.iter().find(|s| s.0 == id).map_or(0.0, |s| s.1), m)).collect();
    let mut verdicts = Vec::new();
    if let Some(max) = spec.ttft_max_s {
        verdicts.push(("TTFT p50 (s)", run.ttft.p50, max, run.ttft.p50 < max));
    }
    if let Some(max) = spec.tpot_max_s {
        verdicts.push(("TPOT p50 (s)", run.tpot.p50, max, run.tpot.p50 < max));
    }
    if let Some(max) = spec.itl_std_max_s {
        verdicts.push(("ITL std (s)", run.itl.std, max, run.itl.std < max));
    }
    if let Some(min) = spec.tps_min {
        verdicts.push(("TPS", run.tps, min, run.tps > min));
    }
    Ok(ServeReport {
        spec,
        scale: opts.scale,
        concurrency_scale: opts.concurrency_scale,
        context,
        concurrency,
        rate,
        users: opts.users,
        output_tokens: opts.output_tokens,
        model: opts.model.clone(),
        model_description: format!(
            "{} (random weights, {}): {} layers, hidden {}, {} heads / {} KV heads, vocab {}, {:.0} MB of weights",
            opts.model,
            match opts.engine.quantize {
                Some(crate::model::WeightFormat::Bf16) => format!("{} rounded to bf16", opts.weight_dtype),
                Some(format) => format!(
                    "{} quantized to {}, {} activations",
                    opts.weight_dtype,
                    format.name(),
                    opts.engine.activations.name()
                ),
                None => opts.weight_dtype.to_string(),
            },
            model.config.num_layers,
            model.config.hidden_size,
            model.config.num_heads,
            model.config.num_kv_heads,
            model.config.vocab_size,
            model.weight_bytes() as f64 / 1e6
        ),
        prefill_engine,
        decode_engine,
        residency: sched.residency().to_string(),
        kv_pool: (sched.cache().num_pages(), sched.cache().num_pages() * page_bytes),
        per_step,
        run,
        requests,
        floor,
        alone,
        verdicts,
    })
}

fn greedy(ids: Vec<u32>, n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::tokens(ids).max_tokens(n);
    r.ignore_eos = true;
    r
}

/// One sequence alone: TPOT over 32 decode steps at `context`, against the bytes each step reads.
fn decode_floor(sched: &mut Scheduler, model: &LlamaModel, context: usize, level: SimdLevel) -> Result<DecodeFloor> {
    let steps = 32;
    let mut rng = Rng(0x5EED);
    sched.add(greedy(prompt(&mut rng, context, model.config.vocab_size), steps + 1))?;
    // Prefill, then the first token: not part of TPOT.
    while sched.num_running() + sched.num_waiting() > 0 {
        let events = sched.step()?;
        if events.iter().any(|e| matches!(e, crate::engine::Event::Token { .. })) {
            break;
        }
    }
    let mut gaps = Vec::with_capacity(steps);
    let mut last = sched.now();
    while sched.has_work() {
        sched.step()?;
        let now = sched.now();
        gaps.push(now - last);
        last = now;
    }
    sched.reset_metrics();
    let c = &model.config;
    let kv_len = context + steps / 2;
    // Per token: a page of one row.
    let row = crate::kv::KvLayout { page_size: 1, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
    let kv_bytes = 2 * c.num_layers * kv_len * row.page_bytes(sched.cache().dtype());
    // The floor is the ceiling of the memory the step reads: the GPU's when the model is resident.
    let (read_gbps, device) = match sched.resident() {
        Some(r) => {
            let gpu = r.engine();
            // A power of two within one binding: 1 GiB, or half the largest binding below that.
            let binding = gpu.context().limits.max_storage_buffer_binding_size;
            let bytes = (1u64 << 30).min((binding / 2 + 1).next_power_of_two());
            let secs = gpu.measure_read(bytes, 5)?;
            let gbps = secs.iter().map(|s| bytes as f64 / s / 1e9).collect();
            (Stats::from_samples(gbps), gpu.context().summary.name.clone())
        }
        None => (read_bandwidth(level, super::ceilings::READ_BYTES / 4, 5), crate::cpu_model_name()),
    };
    Ok(DecodeFloor {
        context,
        tpot_s: Stats::from_samples(gaps),
        weight_bytes: model.weight_bytes(),
        kv_bytes,
        read_gbps,
        device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two users over six requests: two start at once, a later one only once another has
    /// finished, and never more than two are in flight.
    #[test]
    fn a_closed_loop_keeps_its_users_in_flight() {
        let mut opts = ServeOptions::quick(Scenario::Support);
        (opts.model, opts.requests, opts.output_tokens, opts.users) = ("tiny".into(), 6, 3, Some(2));
        opts.engine.prefill_backend = crate::Backend::Cpu;
        opts.engine.decode_backend = crate::Backend::Cpu;
        let report = run_serve(&opts).unwrap();
        assert_eq!((report.run.requests, report.users), (6, Some(2)));
        let spans: Vec<(f64, f64)> = report.requests.iter().map(|(t, m)| (*t, t + m.e2e)).collect();
        assert_eq!(spans.iter().filter(|s| s.0 == 0.0).count(), 2, "{spans:?}");
        for &(t, _) in &spans {
            let live = spans.iter().filter(|s| s.0 <= t && t < s.1).count();
            let later_started = spans.iter().filter(|s| s.0 > 0.0 && s.0 <= t).count();
            let ended = spans.iter().filter(|s| s.1 <= t + 1e-9).count();
            assert!(live <= 2 && later_started <= ended, "at {t}: {spans:?}");
        }
        assert!(report.rate > 0.0);
    }
}

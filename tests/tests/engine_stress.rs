//! The engine under load, seeded and bounded: hundreds of requests (thousands in the long tier) on
//! the tiny seeded Llama with
//! random prompt lengths over shared prefixes, random max tokens, greedy and seeded sampling, stop
//! strings, stop tokens, cancellations and a page pool small enough to force preemption.
//!
//! Checked after every step: the scheduler's and the pool's bookkeeping agree
//! (`Scheduler::audit`: no page leaked, counted wrong or owned twice), no request gets an event
//! after its end, and the oldest request keeps making progress (no starvation). Checked at the end:
//! the pool is full again, every request ended exactly once, its streamed text equals its final
//! text, and its tokens, reason and text equal the same request run alone (a cancelled one: a
//! prefix of it). The dropped-stream variant runs through `Engine`'s thread.
//!
//! `TWINFER_STRESS_REQUESTS` sets the number of requests (default 500, the quick tier; the long tier
//! runs 20000 per seed; on the GPU
//! `TWINFER_STRESS_GPU_REQUESTS`, default 8); `TWINFER_STRESS_SEED`
//! the seed (default 1; a failure prints it).
#![cfg(not(target_arch = "wasm32"))]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinfer::engine::{
    Engine, EngineConfig, Event, FinishReason, GenerateRequest, RequestId, SamplingParams, Scheduler,
};
use twinfer::model::{Model, ModelSource, Network};
use twinfer::{Attention, Backend, DType, cpu::SimdLevel};
use twinfer_tests::models::model_dir;
use twinfer_tests::rng::Rng;

const MODEL: &str = "tiny-llama";
const MAX_NEW_TOKENS: usize = 40;
/// Steps the oldest unfinished request may go without an event: it is never the one preempted, so
/// it waits at most for the running requests to finish (each within `MAX_NEW_TOKENS` steps) and for
/// its own prompt chunks.
const MAX_GAP_STEPS: usize = 2 * MAX_NEW_TOKENS + 16;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A pool of 40 pages of 16 tokens holds about four of the longest requests (10 pages): with up to
/// 12 running, preemption is routine.
fn config() -> EngineConfig {
    config_with_pages(40)
}

fn config_with_pages(pages: usize) -> EngineConfig {
    EngineConfig {
        kv_dtype: DType::F32,
        prefill_backend: Backend::Cpu,
        decode_backend: Backend::Cpu,
        page_size: 16,
        kv_pool_pages: Some(pages),
        max_batch_tokens: 96,
        max_running: 12,
        ..Default::default()
    }
}

fn scheduler(attention: Attention, config: EngineConfig) -> Scheduler {
    let model = Model::load(ModelSource::dir(model_dir(MODEL))).unwrap();
    let Network::Decoder(m) = model.network else { panic!("{MODEL} is not a decoder") };
    Scheduler::new(
        Arc::new(m),
        Some(Arc::new(model.tokenizer)),
        SimdLevel::detect(),
        attention.clone(),
        attention,
        config,
    )
    .unwrap()
}

/// What the model says to a few prompts, to aim stop strings and stop tokens at text it produces.
struct Vocabulary {
    texts: Vec<String>,
    tokens: Vec<u32>,
}

fn calibrate(s: &mut Scheduler, prefixes: &[Vec<u32>]) -> Vocabulary {
    let mut v = Vocabulary { texts: Vec::new(), tokens: Vec::new() };
    for p in prefixes.iter().filter(|p| !p.is_empty()) {
        let mut r = GenerateRequest::tokens(p.clone()).max_tokens(MAX_NEW_TOKENS);
        r.ignore_eos = true;
        let (_, events) = run_alone(s, r);
        let Some(Event::Finished { text, tokens, .. }) = events.last() else { panic!("no Finished event") };
        v.texts.push(text.clone());
        v.tokens.extend(tokens);
    }
    assert!(v.texts.iter().any(|t| t.chars().count() > 8), "the model's text is too short to aim stop strings at");
    v
}

struct Spec {
    request: GenerateRequest,
    /// Cancelled this many steps after it was added.
    cancel_after: Option<usize>,
}

/// `sampled`: some requests sample (seeded); without it every request is greedy.
fn random_spec(rng: &mut Rng, prefixes: &[Vec<u32>], vocab: &Vocabulary, vocab_size: usize, sampled: bool) -> Spec {
    let mut prompt = prefixes[rng.below(prefixes.len())].clone();
    let suffix = 1 + rng.below(40);
    prompt.extend((0..suffix).map(|_| 2 + rng.below(vocab_size - 2) as u32));
    let max_tokens = if rng.below(10) == 0 { 1 } else { 1 + rng.below(MAX_NEW_TOKENS) };
    let mut r = GenerateRequest::tokens(prompt).max_tokens(max_tokens);
    r.ignore_eos = rng.below(2) == 0;
    if sampled && rng.below(10) < 3 {
        r.sampling = SamplingParams {
            temperature: 0.6 + rng.below(7) as f32 / 10.0,
            top_k: [0, 1, 5, 40][rng.below(4)],
            top_p: [1.0, 0.9, 0.5][rng.below(3)],
            repetition_penalty: [1.0, 1.1][rng.below(2)],
            seed: rng.next_u64(),
        };
    }
    if rng.below(10) < 3 {
        let text = &vocab.texts[rng.below(vocab.texts.len())];
        let chars: Vec<char> = text.chars().collect();
        if !chars.is_empty() {
            let at = rng.below(chars.len());
            let len = 1 + rng.below(3);
            r.stop = vec![chars[at..(at + len).min(chars.len())].iter().collect()];
        }
    }
    if rng.below(10) < 2 {
        r.stop_token_ids = (0..1 + rng.below(2)).map(|_| vocab.tokens[rng.below(vocab.tokens.len())]).collect();
    }
    let cancel_after = (rng.below(20) == 0).then(|| rng.below(30));
    Spec { request: r, cancel_after }
}

/// Runs `request` with nothing else in the scheduler (and nothing in its prefix cache); its id
/// and its events.
fn run_alone(s: &mut Scheduler, request: GenerateRequest) -> (RequestId, Vec<Event>) {
    assert!(!s.has_work());
    s.clear_prefix_cache().unwrap();
    let id = s.add(request).unwrap();
    let mut events = Vec::new();
    while s.has_work() {
        events.extend(s.step().unwrap());
    }
    assert!(events.iter().all(|e| e.request() == id));
    s.clear_prefix_cache().unwrap();
    assert_eq!(s.cache().free_pages(), s.cache().num_pages(), "a request run alone leaked pages");
    (id, events)
}

/// (streamed text, final text, reason, tokens) of one request's events, which must end with its
/// only `Finished` event.
fn outcome(events: &[Event]) -> (String, String, FinishReason, Vec<u32>) {
    let streamed: String = events
        .iter()
        .filter_map(|e| if let Event::Token { text, .. } = e { Some(text.as_str()) } else { None })
        .collect();
    let finished = events.iter().filter(|e| matches!(e, Event::Finished { .. })).count();
    assert_eq!(finished, 1, "{finished} Finished events");
    let Some(Event::Finished { text, reason, tokens, .. }) = events.last() else { panic!("Finished is not last") };
    (streamed, text.clone(), reason.clone(), tokens.clone())
}

struct Live {
    spec: usize,
    added: usize,
    events: Vec<Event>,
}

/// The stress run on `attention`; returns (steps, preemptions, most pages shared at once).
/// Returns (steps, preemptions, most pages shared at once, most finished requests kept by the
/// prefix cache at once).
fn stress(
    attention: Attention,
    requests: usize,
    seed: u64,
    sampled: bool,
    pages: usize,
    prefix_cache: usize,
) -> (usize, usize, usize, usize) {
    let mut rng = Rng::new(seed);
    let mut s =
        scheduler(attention.clone(), EngineConfig { prefix_cache_sequences: prefix_cache, ..config_with_pages(pages) });
    let vocab_size = s.model().config.vocab_size;
    // Shared prefixes of 0 to 5 pages, so that prefix sharing and its copy-on-write happen.
    let prefixes: Vec<Vec<u32>> =
        [0, 16, 24, 40, 80].iter().map(|&n| (0..n).map(|_| 2 + rng.below(vocab_size - 2) as u32).collect()).collect();
    let vocab = calibrate(&mut s, &prefixes);
    let specs: Vec<Spec> =
        (0..requests).map(|_| random_spec(&mut rng, &prefixes, &vocab, vocab_size, sampled)).collect();

    let mut next_spec = 0;
    let mut live: BTreeMap<RequestId, Live> = BTreeMap::new();
    let mut done: HashMap<usize, Vec<Event>> = HashMap::new();
    let mut last_event: HashMap<RequestId, usize> = HashMap::new();
    let mut longest_to_first_event = 0usize;
    let (mut step, mut worst_gap, mut most_shared, mut most_kept) = (0usize, 0usize, 0usize, 0usize);
    while next_spec < specs.len() || s.has_work() {
        for _ in 0..rng.below(4) {
            if next_spec < specs.len() {
                let id = s.add(specs[next_spec].request.clone()).unwrap();
                live.insert(id, Live { spec: next_spec, added: step, events: Vec::new() });
                last_event.insert(id, step);
                next_spec += 1;
            }
        }
        for (&id, l) in &live {
            if specs[l.spec].cancel_after.is_some_and(|n| l.added + n == step) {
                assert!(s.cancel(id), "request {} is live but unknown to the scheduler", id.0);
            }
        }
        for e in s.step().unwrap() {
            let id = e.request();
            let l =
                live.get_mut(&id).unwrap_or_else(|| panic!("step {step}: event for request {} after its end", id.0));
            if l.events.is_empty() {
                longest_to_first_event = longest_to_first_event.max(step - l.added);
            }
            last_event.insert(id, step);
            let end = matches!(e, Event::Finished { .. });
            l.events.push(e);
            if end {
                let l = live.remove(&id).unwrap();
                done.insert(l.spec, l.events);
                last_event.remove(&id);
            }
        }
        s.audit().unwrap_or_else(|e| panic!("seed {seed}, step {step}: {e}"));
        let shared = (0..s.cache().num_pages() as u32).filter(|&p| s.cache().allocator().refcount(p) > 1).count();
        most_shared = most_shared.max(shared);
        most_kept = most_kept.max(s.kept_prefixes());
        if let Some((&oldest, _)) = live.first_key_value() {
            let gap = step - last_event[&oldest];
            worst_gap = worst_gap.max(gap);
            assert!(gap <= MAX_GAP_STEPS, "seed {seed}: request {} starves: no event for {gap} steps", oldest.0);
        }
        step += 1;
        assert!(step < 200 * requests + 1000, "seed {seed}: no end in sight after {step} steps");
    }
    s.clear_prefix_cache().unwrap();
    assert_eq!(s.cache().free_pages(), s.cache().num_pages(), "seed {seed}: pages leaked");
    s.audit().unwrap();
    assert_eq!(done.len(), specs.len(), "seed {seed}: every request ends exactly once");

    // Every request against the same request alone.
    let mut reasons: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut preemptions = 0;
    for (i, spec) in specs.iter().enumerate() {
        let events = &done[&i];
        let (streamed, text, reason, tokens) = outcome(events);
        let Some(Event::Finished { metrics, .. }) = events.last() else { unreachable!() };
        preemptions += metrics.preemptions;
        *reasons.entry(reason.as_str()).or_default() += 1;
        assert_eq!(streamed, text, "seed {seed}, request {i}: the stream does not add up to the final text");
        let (_, alone) = run_alone(&mut s, spec.request.clone());
        let (_, want_text, want_reason, want_tokens) = outcome(&alone);
        if reason == FinishReason::Cancelled && spec.cancel_after.is_some() {
            assert!(
                want_tokens.starts_with(&tokens),
                "seed {seed}, request {i}: cancelled tokens are not the solo run's"
            );
            assert!(want_text.starts_with(&text), "seed {seed}, request {i}: cancelled text is not the solo run's");
        } else {
            assert_eq!(
                (&tokens, &reason, &text),
                (&want_tokens, &want_reason, &want_text),
                "seed {seed}, request {i} ({:?}, preempted {} times): under load vs alone",
                spec.request,
                metrics.preemptions
            );
        }
    }
    eprintln!(
        "{} requests, seed {seed}: {step} steps, {preemptions} preemptions, at most {most_shared} pages shared \
         at once, longest wait of the oldest request {worst_gap} steps, longest wait for a first event \
         {longest_to_first_event} steps, endings {reasons:?}",
        specs.len()
    );
    (step, preemptions, most_shared, most_kept)
}

#[test]
fn random_requests_leak_nothing_and_match_their_solo_runs() {
    let start = Instant::now();
    let requests = env_or("TWINFER_STRESS_REQUESTS", 500) as usize;
    let seed = env_or("TWINFER_STRESS_SEED", 1);
    // The prefix cache keeps up to 4 finished requests, so kept pages are shared, evicted under
    // pressure and cleared at the end, all under the audit.
    let (_, preemptions, shared, kept) = stress(Attention::new(Backend::Cpu).unwrap(), requests, seed, true, 40, 4);
    assert!(preemptions > 0, "the pool never ran short: the test does not exercise preemption");
    assert!(shared > 0, "no page was ever shared: the test does not exercise prefix sharing");
    assert!(kept > 0, "no finished request was ever kept: the test does not exercise the prefix cache");
    eprintln!("CPU stress: {:.1} s", start.elapsed().as_secs_f64());
}

/// The same on the GPU engine (the whole model resident: on lavapipe in CI), shorter, and greedy
/// only: the GPU's split-K partition follows the batch, so its outputs are equal to solo runs up to
/// rounding, which greedy decoding of this model does not notice but sampling could.
#[test]
fn a_shorter_run_on_the_gpu_engine() {
    let gpu = match Attention::new(Backend::Gpu) {
        Ok(a) => a,
        Err(e) if std::env::var("TWINFER_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("TWINFER_REQUIRE_GPU=1 but the GPU engine is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: the GPU stress test does NOT run here: {e}");
            return;
        }
    };
    let start = Instant::now();
    let requests = env_or("TWINFER_STRESS_GPU_REQUESTS", 8) as usize;
    let seed = env_or("TWINFER_STRESS_SEED", 1);
    // 12 pages: the longest request (10 pages) fits, two of them do not. Eight requests of a seed
    // may all be short enough to fit together (seed 2 does): each run is checked in full, and
    // another seed follows until one has run short of pages, four at most.
    let preempted = (0..4).any(|attempt| {
        let (_, preemptions, _, _) = stress(gpu.clone(), requests, seed + attempt * 1_000_003, false, 12, 2);
        if preemptions == 0 {
            eprintln!("seed {}: the pool never ran short; another seed", seed + attempt * 1_000_003);
        }
        preemptions > 0
    });
    assert!(preempted, "the pool never ran short on the GPU in four seeds");
    eprintln!("GPU stress: {:.1} s", start.elapsed().as_secs_f64());
}

/// Streams dropped at random points through `Engine`'s worker thread: the pool comes back full and
/// the streams read to their end match their solo runs.
#[test]
fn dropped_streams_free_their_pages_and_the_others_are_unchanged() {
    let mut rng = Rng::new(env_or("TWINFER_STRESS_SEED", 1));
    let engine = Arc::new(Engine::new(model_dir(MODEL), config()).unwrap());
    let mut solo = scheduler(Attention::new(Backend::Cpu).unwrap(), config());
    let vocab_size = solo.model().config.vocab_size;
    let prefix: Vec<u32> = (0..32).map(|_| 2 + rng.below(vocab_size - 2) as u32).collect();
    let mut handles = Vec::new();
    // 64 streams natively; fewer when the stress size is cut (under qemu).
    let streams = (env_or("TWINFER_STRESS_REQUESTS", 500) as usize / 30).clamp(16, 64);
    for i in 0..streams {
        let mut prompt = prefix.clone();
        prompt.extend((0..1 + rng.below(30)).map(|_| 2 + rng.below(vocab_size - 2) as u32));
        let mut request = GenerateRequest::tokens(prompt).max_tokens(1 + rng.below(MAX_NEW_TOKENS));
        request.ignore_eos = true;
        let drop_after = (i % 3 == 0).then(|| rng.below(8));
        let stream = engine.generate(request.clone()).unwrap();
        handles.push(std::thread::spawn(move || {
            let mut events = Vec::new();
            for e in stream {
                events.push(e);
                let tokens = events.iter().filter(|e| matches!(e, Event::Token { .. })).count();
                if drop_after.is_some_and(|n| tokens > n) {
                    return (request, None);
                }
            }
            (request, Some(events))
        }));
    }
    let mut read_to_the_end = 0;
    for h in handles {
        let (request, events) = h.join().unwrap();
        let Some(events) = events else { continue };
        read_to_the_end += 1;
        let (streamed, text, reason, tokens) = outcome(&events);
        assert_eq!(streamed, text);
        let (_, alone) = run_alone(&mut solo, request);
        let (_, want_text, want_reason, want_tokens) = outcome(&alone);
        assert_eq!((tokens, reason, text), (want_tokens, want_reason, want_text), "under load vs alone");
    }
    assert!(read_to_the_end >= streams / 2, "{read_to_the_end} of {streams} streams read to their end");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = engine.stats().unwrap();
        if stats.running == 0 && stats.waiting == 0 {
            assert_eq!(stats.kv_pages_free, stats.kv_pages_total, "dropped streams kept pages");
            break;
        }
        assert!(Instant::now() < deadline, "dropped requests still run: {stats:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

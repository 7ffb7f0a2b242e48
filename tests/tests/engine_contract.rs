//! What the engine promises its callers, on the tiny seeded Llama (CPU, fast):
//! - the streamed pieces add up to the final text, for every way a request can end;
//! - a dropped stream cancels its request and its pages come back;
//! - `max_tokens` 0 is refused and a huge one ends at the context instead of overflowing;
//! - TTFT counts from the request's arrival, not from when a step let it in;
//! - prefix sharing happens and saves pages, and a cancelled request frees its pages;
//! - the prefix cache serves a later turn from a finished request's pages, and gives them up
//!   before a running request is preempted.
#![cfg(not(target_arch = "wasm32"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use twinfer::engine::{Engine, EngineConfig, Event, FinishReason, GenerateRequest, RequestId, Scheduler};
use twinfer::model::{Model, ModelSource, Network};
use twinfer::{Attention, Backend, DType, TwinferError, cpu::SimdLevel};
use twinfer_tests::models::{golden, ids, model_dir};

const MODEL: &str = "tiny-llama";

fn scheduler(config: EngineConfig) -> Scheduler {
    let model = Model::load(ModelSource::dir(model_dir(MODEL))).unwrap();
    let Network::Decoder(m) = model.network else { panic!("{MODEL} is not a decoder") };
    let cpu = Attention::new(Backend::Cpu).unwrap();
    Scheduler::new(Arc::new(m), Some(Arc::new(model.tokenizer)), SimdLevel::detect(), cpu.clone(), cpu, config).unwrap()
}

fn config() -> EngineConfig {
    EngineConfig {
        kv_dtype: DType::F32,
        prefill_backend: Backend::Cpu,
        decode_backend: Backend::Cpu,
        ..Default::default()
    }
}

fn prompt() -> Vec<u32> {
    ids(&golden(MODEL)["prompt_ids"])
}

fn greedy(ids: Vec<u32>, n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::tokens(ids).max_tokens(n);
    r.ignore_eos = true;
    r
}

/// Every event of one request, run alone to its end; `cancel_after` cancels it after that many
/// tokens.
fn events_of(s: &mut Scheduler, request: GenerateRequest, cancel_after: Option<usize>) -> Vec<Event> {
    let id = s.add(request).unwrap();
    let mut out = Vec::new();
    while s.has_work() {
        for e in s.step().unwrap() {
            assert_eq!(e.request(), id);
            out.push(e);
        }
        let tokens = out.iter().filter(|e| matches!(e, Event::Token { .. })).count();
        if cancel_after.is_some_and(|n| tokens >= n) {
            s.cancel(id);
        }
    }
    out
}

/// (concatenated `Token` texts, the `Finished` event's text, its reason, its tokens).
fn stream_and_final(events: &[Event]) -> (String, String, FinishReason, Vec<u32>) {
    let streamed: String = events
        .iter()
        .filter_map(|e| if let Event::Token { text, .. } = e { Some(text.as_str()) } else { None })
        .collect();
    let Some(Event::Finished { text, reason, tokens, .. }) = events.last() else { panic!("no Finished event last") };
    (streamed, text.clone(), reason.clone(), tokens.clone())
}

#[test]
fn streamed_text_equals_the_final_text_for_every_finish_reason() {
    let mut s = scheduler(config());
    let n = 40;
    let full = events_of(&mut s, greedy(prompt(), n), None);
    let (streamed, text, reason, tokens) = stream_and_final(&full);
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(streamed, text, "length");
    assert_eq!(tokens.len(), n);
    assert!(text.chars().count() >= 8, "the tiny model's text is too short to test with: {text:?}");

    // The text each token completed, to aim stop tokens and strings at known places.
    let pieces: Vec<&str> = full
        .iter()
        .filter_map(|e| if let Event::Token { text, .. } = e { Some(text.as_str()) } else { None })
        .collect();
    let before = |k: usize| pieces[..k].concat();

    // A stop token whose preceding text ends with a proper prefix of a stop string: the engine
    // holds that tail back, and the end token's event must deliver it.
    let k = (n / 2..n).find(|&k| !before(k).is_empty()).expect("some text before the stop token");
    let tail = before(k).chars().last().unwrap();
    let mut r = greedy(prompt(), n);
    r.stop_token_ids = vec![tokens[k]];
    r.stop = vec![format!("{tail}\u{1}never generated")];
    let first_k = tokens.iter().position(|&t| t == tokens[k]).unwrap();
    let (streamed, text, reason, got) = stream_and_final(&events_of(&mut s, r, None));
    assert_eq!(reason, FinishReason::StopToken(tokens[k]));
    assert_eq!(got, tokens[..=first_k], "stops at the first occurrence of the stop token");
    assert_eq!(text, before(first_k), "the final text is everything before the stop token");
    assert_eq!(streamed, text, "stop token: the held-back tail must be streamed");

    // A stop string in the middle of the text.
    let cut = text_char_boundary(&before(n), before(n).chars().count() / 2);
    let stop: String = before(n)[cut..].chars().take(2).collect();
    let mut r = greedy(prompt(), n);
    r.stop = vec![stop.clone()];
    let (streamed, text, reason, _) = stream_and_final(&events_of(&mut s, r, None));
    assert_eq!(reason, FinishReason::StopString(stop.clone()));
    assert_eq!(text, before(n)[..before(n).find(&stop).unwrap()]);
    assert_eq!(streamed, text, "stop string");

    // Cancelled while a tail is held back: the final text is what was streamed.
    let mut r = greedy(prompt(), n);
    r.stop = vec![format!("{tail}\u{1}never generated")];
    let (streamed, text, reason, _) = stream_and_final(&events_of(&mut s, r, Some(k)));
    assert_eq!(reason, FinishReason::Cancelled);
    assert_eq!(streamed, text, "cancelled");
    assert_eq!(s.cache().free_pages(), s.cache().num_pages(), "pages leaked");
}

fn text_char_boundary(text: &str, chars: usize) -> usize {
    text.char_indices().nth(chars).map_or(text.len(), |(i, _)| i)
}

#[test]
fn dropping_a_stream_cancels_its_request_and_frees_its_pages() {
    let engine = Engine::new(model_dir(MODEL), config()).unwrap();
    // Run to its end, the request would generate `limit` tokens: up to the full context.
    let limit = 2048 - prompt().len();
    let mut stream = engine.generate(greedy(prompt(), limit)).unwrap();
    assert!(matches!(stream.next(), Some(Event::Token { .. })));
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = engine.stats().unwrap();
        if stats.running == 0 && stats.waiting == 0 {
            assert_eq!(stats.kv_pages_free, stats.kv_pages_total, "the dropped request kept pages");
            break;
        }
        assert!(Instant::now() < deadline, "the dropped request still runs: {stats:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let m = engine.metrics(false).unwrap();
    assert_eq!(m.requests, 1);
    assert!(m.generated_tokens < limit, "the dropped request ran to its end ({} tokens)", m.generated_tokens);
}

#[test]
fn max_tokens_zero_is_refused_and_a_huge_one_ends_at_the_context() {
    let mut s = scheduler(config());
    match s.add(greedy(prompt(), 0)) {
        Err(TwinferError::InvalidParameter(why)) => assert!(why.contains("max_tokens"), "{why}"),
        other => panic!("max_tokens 0 was not refused: {other:?}"),
    }
    assert!(!s.has_work());
    let p = prompt();
    let (streamed, text, reason, tokens) = stream_and_final(&events_of(&mut s, greedy(p.clone(), usize::MAX), None));
    assert_eq!(reason, FinishReason::Length);
    let context = s.model().config.max_position_embeddings;
    assert_eq!(p.len() + tokens.len(), context, "generation ends when the context is full");
    assert_eq!(streamed, text);
}

/// The scheduler's clock, set by the test.
static NOW_BITS: AtomicU64 = AtomicU64::new(0);
fn test_clock() -> f64 {
    f64::from_bits(NOW_BITS.load(Ordering::SeqCst))
}
fn set_clock(t: f64) {
    NOW_BITS.store(t.to_bits(), Ordering::SeqCst);
}

#[test]
fn ttft_counts_from_arrival() {
    set_clock(100.0);
    let mut s = scheduler(EngineConfig { clock: Some(test_clock), ..config() });
    // Arrived at 96 while a step ran; let in at 100; its first token comes at 100.
    let late = s.add_arrived(greedy(prompt(), 2), 96.0).unwrap();
    let on_time = s.add(greedy(prompt(), 2)).unwrap();
    let mut ttft = std::collections::HashMap::<RequestId, f64>::new();
    let mut e2e = std::collections::HashMap::<RequestId, f64>::new();
    while s.has_work() {
        for e in s.step().unwrap() {
            if let Event::Finished { request, metrics, .. } = e {
                ttft.insert(request, metrics.ttft().unwrap());
                e2e.insert(request, metrics.e2e);
            }
        }
    }
    assert_eq!(ttft[&late], 4.0);
    assert_eq!(ttft[&on_time], 0.0);
    assert_eq!(e2e[&late], 4.0);
    let run = s.run_metrics();
    assert_eq!(run.wall, 4.0, "the run starts at the first arrival");
    // An arrival in the future is clamped to now.
    let future = s.add_arrived(greedy(prompt(), 1), 1e9).unwrap();
    let Some(Event::Finished { metrics, .. }) =
        s.step().unwrap().into_iter().find(|e| e.request() == future && matches!(e, Event::Finished { .. }))
    else {
        panic!("a one-token request ends in one step")
    };
    assert_eq!(metrics.ttft(), Some(0.0));
}

#[test]
fn prefix_sharing_saves_pages_and_cancelling_frees_them() {
    let page = 16;
    let mut s = scheduler(EngineConfig { page_size: page, kv_pool_pages: Some(64), ..config() });
    // Five pages of shared prompt plus a different last token each.
    let base: Vec<u32> = (0..5 * page as u32).map(|i| 3 + (i * 7) % 500).collect();
    let with_tail = |t: u32| base.iter().copied().chain([t]).collect::<Vec<u32>>();
    let first = s.add(greedy(with_tail(11), 50)).unwrap();
    s.step().unwrap();
    let alone = s.cache().num_pages() - s.cache().free_pages();
    assert_eq!(alone, 6, "an 81-token prompt takes 6 pages of 16");
    let second = s.add(greedy(with_tail(12), 50)).unwrap();
    s.step().unwrap();
    let both = s.cache().num_pages() - s.cache().free_pages();
    // The second shares the first 64 prompt tokens (4 pages: shared prefixes end at a multiple
    // of the prefill alignment, so the rest is chunked as it would be alone) and takes 2 pages of
    // its own for tokens 64..81; the first's decode token still fits its last page.
    assert_eq!(both, alone + 2, "prefix sharing: {alone} pages alone, {both} for both");
    let shared = (0..s.cache().num_pages() as u32).filter(|&p| s.cache().allocator().refcount(p) > 1).count();
    assert_eq!(shared, 4, "the 4 pages of the first 64 prompt tokens are shared");

    s.cancel(second);
    let events = s.step().unwrap();
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Finished { request, reason: FinishReason::Cancelled, .. } if *request == second)
        )
    );
    let after = s.cache().num_pages() - s.cache().free_pages();
    assert!(after < both, "cancelling freed no page: {both} before, {after} after");
    s.cancel(first);
    s.step().unwrap();
    assert!(!s.has_work());
    assert_eq!(s.cache().free_pages(), s.cache().num_pages(), "pages leaked after cancelling both");
}

/// The `Finished` event's metrics.
fn finished_metrics(events: &[Event]) -> twinfer::engine::RequestMetrics {
    let Some(Event::Finished { metrics, .. }) = events.last() else { panic!("no Finished event last") };
    metrics.clone()
}

#[test]
fn the_prefix_cache_serves_a_later_turn_and_gives_way_under_pressure() {
    let page = 16;
    let cached = EngineConfig { page_size: page, kv_pool_pages: Some(40), prefix_cache_sequences: 2, ..config() };
    let mut s = scheduler(cached.clone());
    let turn1: Vec<u32> = (0..150u32).map(|i| 3 + (i * 7) % 500).collect();
    let (_, _, _, answer) = stream_and_final(&events_of(&mut s, greedy(turn1.clone(), 20), None));
    s.audit().unwrap();
    // 150 + 19 computed tokens stay: 11 pages.
    assert_eq!(s.cache().num_pages() - s.cache().free_pages(), 11, "the finished request's pages are kept");

    // The next turn re-sends the conversation and adds a message.
    let turn2: Vec<u32> = turn1.iter().chain(&answer).copied().chain(5..35).collect();
    let events = events_of(&mut s, greedy(turn2.clone(), 20), None);
    s.audit().unwrap();
    // 169 computed tokens shared at a multiple of 64: 128.
    assert_eq!(finished_metrics(&events).cached_tokens, 128, "turn 2 reuses turn 1's pages");
    let mut fresh = scheduler(EngineConfig { prefix_cache_sequences: 0, ..cached.clone() });
    let alone = events_of(&mut fresh, greedy(turn2, 20), None);
    assert_eq!(finished_metrics(&alone).cached_tokens, 0);
    assert_eq!(stream_and_final(&events).3, stream_and_final(&alone).3, "the cache changes no token");
    assert_eq!(fresh.cache().free_pages(), fresh.cache().num_pages(), "without the cache every page comes back");

    // A request that needs most of the pool: the kept pages give way, nobody is preempted.
    let big: Vec<u32> = (0..520u32).map(|i| 9 + (i * 13) % 400).collect();
    let events = events_of(&mut s, greedy(big.clone(), 40), None);
    s.audit().unwrap();
    assert_eq!(finished_metrics(&events).preemptions, 0);
    let mut fresh = scheduler(EngineConfig { prefix_cache_sequences: 0, ..cached });
    assert_eq!(stream_and_final(&events).3, stream_and_final(&events_of(&mut fresh, greedy(big, 40), None)).3);
    // Only the big request's own pages are kept now (559 computed tokens: 35 pages).
    assert_eq!(s.cache().num_pages() - s.cache().free_pages(), 35, "the older prefixes were evicted");
}

/// What `twinfer serve` predicts overflow from: the prompt tokens still to compute and the
/// step-time model fitted to the steps (the first, cold one left out).
#[test]
fn pending_prompt_tokens_and_the_step_cost_follow_the_steps() {
    let mut s = scheduler(config());
    assert_eq!((s.pending_prompt_tokens(), s.step_cost()), (0, Default::default()));
    let p = prompt();
    let run = |s: &mut Scheduler, p: &[u32]| {
        s.add(greedy(p.to_vec(), 4)).unwrap();
        s.add(greedy(p[..p.len() - 1].to_vec(), 4)).unwrap();
        assert_eq!(s.pending_prompt_tokens(), 2 * p.len() - 1, "both prompts are pending");
        s.step().unwrap();
        assert_eq!(s.pending_prompt_tokens(), 0, "one step computed both prompts (they fit its budget)");
        while s.has_work() {
            s.step().unwrap();
        }
    };
    run(&mut s, &p);
    let first = s.step_cost();
    assert!(first.steps >= 4 && first.fixed > 0.0, "decode steps measured: {first:?}");
    assert_eq!(first.per_token, 0.0, "the only prompt step was the first, cold one: {first:?}");
    run(&mut s, &p);
    let cost = s.step_cost();
    assert!(cost.per_token > 0.0 && cost.per_token.is_finite(), "{cost:?}");
    let t = cost.prefill_seconds(1000, 0, 512).unwrap();
    assert!((t - (2.0 * cost.fixed + 1000.0 * cost.per_token)).abs() < 1e-12, "two steps of fixed cost: {t}");
    // 12 sequences decoding take 12 tokens of each step: 1001 prompt tokens need 3 steps of 500.
    let t = cost.prefill_seconds(1001, 12, 512).unwrap();
    assert!((t - (3.0 * cost.fixed + 1037.0 * cost.per_token)).abs() < 1e-12, "decode tokens share the steps: {t}");
    assert_eq!(s.predicted_ttft(&p), cost.prefill_seconds(p.len(), 0, 512), "no prefix cache: every token counts");
    // A running request past its prompt adds a token to each step of the next one's prompt.
    s.add(greedy(p.to_vec(), 8)).unwrap();
    s.step().unwrap();
    assert_eq!(s.num_decoding(), 1);
    assert_eq!(s.predicted_ttft(&p), s.step_cost().prefill_seconds(p.len(), 1, 512), "one sequence decodes");
    while s.has_work() {
        s.step().unwrap();
    }

    // With the prefix cache, a prompt that starts like a kept one counts only what it adds.
    let mut s = scheduler(EngineConfig { prefix_cache_sequences: 2, ..config() });
    let long: Vec<u32> = (0..150u32).map(|i| 3 + (i * 7) % 500).collect();
    run(&mut s, &long);
    run(&mut s, &long);
    let cost = s.step_cost();
    let next: Vec<u32> = long.iter().copied().chain(5..25).collect();
    assert_eq!(s.predicted_ttft(&next), cost.prefill_seconds(170 - 128, 0, 512), "128 tokens come from the cache");
}

/// A TPOT objective caps the prompt tokens of a step that carries decode tokens at what the
/// fitted step cost allows (here, an objective no step can meet: the decode tokens and one
/// aligned chunk), while a step with nobody decoding still takes the whole budget; the outputs
/// do not change, only how the prompts are cut.
#[test]
fn a_tpot_objective_caps_the_prompt_tokens_of_decoding_steps() {
    let p: Vec<u32> = (0..300u32).map(|i| 3 + (i * 11) % 500).collect();
    let mut outputs = Vec::new();
    for target in [None, Some(1e-9)] {
        let mut s = scheduler(EngineConfig { tpot_target: target, max_batch_tokens: 512, ..config() });
        // Warm the step-cost model: a prompt step and decode steps.
        s.add(greedy(p[..40].to_vec(), 4)).unwrap();
        while s.has_work() {
            s.step().unwrap();
        }
        s.add(greedy(p[..40].to_vec(), 4)).unwrap();
        while s.has_work() {
            s.step().unwrap();
        }
        assert!(s.step_cost().per_token > 0.0 && s.step_cost().fixed > 0.0, "{:?}", s.step_cost());
        // One request decoding, then a long prompt arrives.
        let first = s.add(greedy(p[..20].to_vec(), 40)).unwrap();
        s.step().unwrap();
        assert_eq!(s.num_decoding(), 1);
        let second = s.add(greedy(p.clone(), 8)).unwrap();
        let mut chunks = Vec::new();
        let mut events = Vec::new();
        while s.pending_prompt_tokens() > 0 {
            let before = s.pending_prompt_tokens();
            events.extend(s.step().unwrap());
            chunks.push(before - s.pending_prompt_tokens());
        }
        while s.has_work() {
            events.extend(s.step().unwrap());
        }
        let tokens = |id: twinfer::engine::RequestId| {
            events.iter().find_map(|e| match e {
                Event::Finished { request, tokens, .. } if *request == id => Some(tokens.clone()),
                _ => None,
            })
        };
        eprintln!("TPOT objective {target:?}: prompt chunks {chunks:?}");
        match target {
            None => assert_eq!(chunks, [300], "without an objective the prompt fits one step"),
            Some(_) => {
                let align = twinfer::cpu::PREFILL_ALIGN;
                assert!(chunks.iter().all(|&c| c <= align), "chunks of at most {align}: {chunks:?}");
                assert_eq!(chunks.iter().sum::<usize>(), 300);
            }
        }
        outputs.push((tokens(first).unwrap(), tokens(second).unwrap()));
    }
    assert_eq!(outputs[0], outputs[1], "the objective changes how prompts are cut, not the tokens");
}

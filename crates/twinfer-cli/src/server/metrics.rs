//! `GET /metrics`: what the server measured, in the Prometheus text format. Per request, labelled
//! by model and by route (`local`: this engine; `upstream`: forwarded), and finish reasons in
//! OpenAI's words (`stop`, `length`) plus `cancelled` and `failed`: TTFT and end-to-end time
//! from the moment the server received the request, TPOT and every inter-token gap; token and
//! request counters; and, read from each engine at scrape time, the queue, the running requests
//! and the KV pool's occupancy. Generation throughput over the last seconds is a gauge, so that a
//! dashboard without PromQL's `rate` still shows tokens/s.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use twinfer::engine::EngineStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Local,
    Upstream,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Upstream => "upstream",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    model: String,
    route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FinishLabels {
    model: String,
    route: String,
    finish_reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// One finished request as the server saw it; times in seconds from its arrival at the server.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub ttft: Option<f64>,
    pub tpot: Option<f64>,
    pub itl: Vec<f64>,
    pub e2e: f64,
    pub preemptions: usize,
}

/// Tokens per whole second over the last `WINDOW_S` seconds.
const WINDOW_S: u64 = 10;

pub struct ServerMetrics {
    registry: Registry,
    ttft: Family<RouteLabels, Histogram>,
    tpot: Family<RouteLabels, Histogram>,
    itl: Family<RouteLabels, Histogram>,
    e2e: Family<RouteLabels, Histogram>,
    prompt_tokens: Family<RouteLabels, Counter>,
    cached_tokens: Family<RouteLabels, Counter>,
    generated_tokens: Family<RouteLabels, Counter>,
    requests: Family<FinishLabels, Counter>,
    preemptions: Family<ModelLabels, Counter>,
    rejected: Family<ModelLabels, Counter>,
    upstream_failures: Family<ModelLabels, Counter>,
    running: Family<ModelLabels, Gauge>,
    waiting: Family<ModelLabels, Gauge>,
    kv_pages_total: Family<ModelLabels, Gauge>,
    kv_pages_used: Family<ModelLabels, Gauge>,
    throughput: Gauge<f64, AtomicU64>,
    /// Tokens generated in each of the last seconds: (second since start, count).
    per_second: Mutex<Vec<(u64, u64)>>,
    started: Instant,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerMetrics")
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms .. about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn gap_histogram() -> Histogram {
    // 0.5 ms .. about 4 s: token gaps and TPOT.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

impl ServerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("twinfer");
        let ttft = Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let e2e = Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let tpot = Family::<RouteLabels, Histogram>::new_with_constructor(gap_histogram as fn() -> Histogram);
        let itl = Family::<RouteLabels, Histogram>::new_with_constructor(gap_histogram as fn() -> Histogram);
        let m = Self {
            ttft,
            tpot,
            itl,
            e2e,
            prompt_tokens: Family::default(),
            cached_tokens: Family::default(),
            generated_tokens: Family::default(),
            requests: Family::default(),
            preemptions: Family::default(),
            rejected: Family::default(),
            upstream_failures: Family::default(),
            running: Family::default(),
            waiting: Family::default(),
            kv_pages_total: Family::default(),
            kv_pages_used: Family::default(),
            throughput: Gauge::default(),
            per_second: Mutex::new(Vec::new()),
            started: Instant::now(),
            registry: Registry::default(),
        };
        registry.register_with_unit(
            "time_to_first_token",
            "Time from the request's arrival at the server to its first token",
            prometheus_client::registry::Unit::Seconds,
            m.ttft.clone(),
        );
        registry.register_with_unit(
            "time_per_output_token",
            "Mean gap between a request's generated tokens after the first",
            prometheus_client::registry::Unit::Seconds,
            m.tpot.clone(),
        );
        registry.register_with_unit(
            "inter_token_latency",
            "Every gap between consecutive generated tokens",
            prometheus_client::registry::Unit::Seconds,
            m.itl.clone(),
        );
        registry.register_with_unit(
            "e2e_request_latency",
            "Time from the request's arrival at the server to its end",
            prometheus_client::registry::Unit::Seconds,
            m.e2e.clone(),
        );
        registry.register("prompt_tokens", "Prompt tokens of finished requests", m.prompt_tokens.clone());
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens whose KV came from the prefix cache or a running request",
            m.cached_tokens.clone(),
        );
        registry.register("generation_tokens", "Generated tokens", m.generated_tokens.clone());
        registry.register("requests", "Finished requests by finish reason", m.requests.clone());
        registry.register("preemptions", "Times a request's KV was freed to make room", m.preemptions.clone());
        registry.register("rejected_requests", "Requests refused before they ran", m.rejected.clone());
        registry.register(
            "upstream_failures",
            "Requests meant for the upstream that ran here because it could not be reached",
            m.upstream_failures.clone(),
        );
        registry.register("requests_running", "Requests holding KV pages", m.running.clone());
        registry.register("requests_waiting", "Requests queued or preempted (the queue depth)", m.waiting.clone());
        registry.register("kv_pages", "Pages in the KV pool", m.kv_pages_total.clone());
        registry.register("kv_pages_used", "Pages of the KV pool in use", m.kv_pages_used.clone());
        registry.register(
            "generation_throughput_tokens_per_second",
            "Tokens generated per second over the last 10 s",
            m.throughput.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one generated token as it streams (the throughput gauge's source).
    pub fn token(&self) {
        let second = self.started.elapsed().as_secs();
        if let Ok(mut ring) = self.per_second.lock() {
            match ring.last_mut() {
                Some((s, n)) if *s == second => *n += 1,
                _ => {
                    ring.push((second, 1));
                    ring.retain(|(s, _)| second - s <= WINDOW_S);
                }
            }
        }
    }

    pub fn rejected(&self, model: &str) {
        self.rejected.get_or_create(&ModelLabels { model: model.into() }).inc();
    }

    pub fn upstream_failed(&self, model: &str) {
        self.upstream_failures.get_or_create(&ModelLabels { model: model.into() }).inc();
    }

    pub fn finished(&self, model: &str, route: Route, finish_reason: &str, r: &Served) {
        let labels = RouteLabels { model: model.into(), route: route.as_str().into() };
        if let Some(t) = r.ttft {
            self.ttft.get_or_create(&labels).observe(t);
        }
        if let Some(t) = r.tpot {
            self.tpot.get_or_create(&labels).observe(t);
        }
        let itl = self.itl.get_or_create(&labels);
        for &gap in &r.itl {
            itl.observe(gap);
        }
        self.e2e.get_or_create(&labels).observe(r.e2e);
        self.prompt_tokens.get_or_create(&labels).inc_by(r.prompt_tokens as u64);
        self.cached_tokens.get_or_create(&labels).inc_by(r.cached_tokens as u64);
        self.generated_tokens.get_or_create(&labels).inc_by(r.generated_tokens as u64);
        self.requests
            .get_or_create(&FinishLabels {
                model: model.into(),
                route: route.as_str().into(),
                finish_reason: finish_reason.into(),
            })
            .inc();
        self.preemptions.get_or_create(&ModelLabels { model: model.into() }).inc_by(r.preemptions as u64);
    }

    /// The text exposition, with the engines' state read now.
    pub fn render(&self, engines: &[(String, EngineStats)]) -> String {
        for (model, s) in engines {
            let labels = ModelLabels { model: model.clone() };
            self.running.get_or_create(&labels).set(s.running as i64);
            self.waiting.get_or_create(&labels).set(s.waiting as i64);
            self.kv_pages_total.get_or_create(&labels).set(s.kv_pages_total as i64);
            self.kv_pages_used.get_or_create(&labels).set((s.kv_pages_total - s.kv_pages_free) as i64);
        }
        let now = self.started.elapsed();
        let second = now.as_secs();
        let recent: u64 = self
            .per_second
            .lock()
            .map_or(0, |ring| ring.iter().filter(|(s, _)| *s < second && second - s <= WINDOW_S).map(|(_, n)| n).sum());
        // Whole seconds only (the current one is still filling); fewer right after the start.
        let window = WINDOW_S.min(second).max(1);
        self.throughput.set(recent as f64 / Duration::from_secs(window).as_secs_f64());
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

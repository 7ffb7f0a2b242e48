//! `twinfer bench serve`: the scenario runs of the core crate, printed as a table, JSON or SVG.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use twinfer::DType;
use twinfer::bench::serve::{Scenario, ServeOptions, ServeReport, run_serve};

use crate::options::EngineArgs;

#[derive(Clone, Copy, ValueEnum)]
pub enum ScenarioArg {
    /// Support agent: 4-8K context, 10-50 concurrent; TTFT < 200 ms, TPOT < 50 ms, TPS > 30.
    Support,
    /// Long-context analysis: 32-128K context, 20-100 concurrent; TPOT < 50 ms, ITL std < 10 ms, TPS > 40.
    LongContext,
    /// High-concurrency API: 8-16K context, 100-1000 concurrent; TPS > 80, TTFT < 150 ms, TPOT < 60 ms.
    HighConcurrency,
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, value_enum)]
    pub scenario: ScenarioArg,
    /// Small, fast settings: contexts x1/32, concurrency x1/5, 16 requests of 32 tokens, smollm-135m.
    #[arg(long)]
    pub quick: bool,
    /// Multiplies the scenario's context lengths (1 = the full scenario).
    #[arg(long)]
    pub scale: Option<f64>,
    /// Multiplies the scenario's concurrency (default: same as --scale).
    #[arg(long)]
    pub concurrency_scale: Option<f64>,
    /// Requests to send.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Tokens generated per request.
    #[arg(long)]
    pub output_tokens: Option<usize>,
    /// Mean Poisson arrival rate in requests/s (default: calibrated to the scenario's concurrency).
    #[arg(long, conflicts_with = "users")]
    pub rate: Option<f64>,
    /// A closed loop instead of Poisson arrivals: N users, each sending its next request as soon
    /// as its previous one finishes, so that exactly N are in flight.
    #[arg(long, value_name = "N")]
    pub users: Option<usize>,
    /// Model shape, with seeded random weights: smollm-135m, smollm-360m, qwen2.5-0.5b, tiny.
    #[arg(long)]
    pub model: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write TTFT and ITL distributions and throughput over time as an SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: ServeArgs) -> Result<(), String> {
    let scenario = match args.scenario {
        ScenarioArg::Support => Scenario::Support,
        ScenarioArg::LongContext => Scenario::LongContext,
        ScenarioArg::HighConcurrency => Scenario::HighConcurrency,
    };
    let mut opts = ServeOptions::quick(scenario);
    if !args.quick {
        opts.scale = 1.0;
        opts.concurrency_scale = 1.0;
        opts.requests = 64;
        opts.output_tokens = 128;
        opts.model = "smollm-360m".into();
    }
    if let Some(s) = args.scale {
        opts.scale = s;
        opts.concurrency_scale = args.concurrency_scale.unwrap_or(s);
    } else if let Some(c) = args.concurrency_scale {
        opts.concurrency_scale = c;
    }
    opts.requests = args.requests.unwrap_or(opts.requests);
    opts.output_tokens = args.output_tokens.unwrap_or(opts.output_tokens);
    opts.rate = args.rate;
    opts.users = args.users;
    opts.model = args.model.unwrap_or(opts.model);
    opts.weight_dtype = DType::F16;
    opts.engine = args.engine.config()?;
    opts.kv_budget_bytes = args.engine.kv_mib.map(|m| m << 20);
    if !args.json {
        eprintln!("building {} with random weights and running {} requests ...", opts.model, opts.requests);
    }
    let report = run_serve(&opts).map_err(|e| e.to_string())?;
    if let Some(path) = &args.plot {
        std::fs::write(path, crate::plot::serve_svg(&report)?).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if args.json {
        println!("{}", report.to_json());
    } else {
        print(&report);
        if let Some(path) = &args.plot {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

fn print(r: &ServeReport) {
    let m = &r.run;
    println!(
        "scenario: {} at scale x{} (context {}..{} tokens), concurrency x{} ({}..{}); full scale is context {}..{}, concurrency {}..{}",
        r.spec.name,
        r.scale,
        r.context.0,
        r.context.1,
        r.concurrency_scale,
        r.concurrency.0,
        r.concurrency.1,
        r.spec.context.0,
        r.spec.context.1,
        r.spec.concurrency.0,
        r.spec.concurrency.1
    );
    println!("model:    {}", r.model_description);
    println!("engines:  prefill {} | decode {}", r.prefill_engine, r.decode_engine);
    println!("forward:  {}", r.residency);
    println!("KV pool:  {} pages, {:.2} GB", r.kv_pool.0, r.kv_pool.1 as f64 / 1e9);
    let p = &r.per_step;
    if p.submits > 0.0 {
        println!(
            "GPU per step ({} steps): {:.2} submissions, {:.1} dispatches, {:.2} readbacks, {:.0} bytes read back, {:.2} ms host recording",
            p.steps,
            p.submits,
            p.dispatches,
            p.readbacks,
            p.readback_bytes,
            p.record_s * 1e3
        );
    }
    let arrivals = match r.users {
        Some(u) => format!("a closed loop of {u} users ({:.2} arrivals/s)", r.rate),
        None => format!("Poisson arrivals at {:.2}/s", r.rate),
    };
    println!(
        "load:     {} requests, {arrivals}, {} output tokens each, {:.1} s wall",
        m.requests, r.output_tokens, m.wall
    );
    println!("{:<10} {:>10} {:>10} {:>10} {:>10} {:>10}", "metric", "p50", "p90", "p99", "mean", "std");
    for (name, d) in [("TTFT ms", &m.ttft), ("TPOT ms", &m.tpot), ("ITL ms", &m.itl)] {
        println!(
            "{:<10} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            name,
            d.p50 * 1e3,
            d.p90 * 1e3,
            d.p99 * 1e3,
            d.mean * 1e3,
            d.std * 1e3
        );
    }
    println!(
        "TPS {:.1} tokens/s | {:.2} requests/s | KV occupancy mean {:.0}% max {:.0}% | {} preemptions",
        m.tps,
        m.requests_per_s,
        m.kv_occupancy.mean * 100.0,
        m.kv_occupancy.max * 100.0,
        m.preemptions
    );
    let f = &r.floor;
    println!(
        "decode floor (one sequence, context {}): TPOT {:.2} ms [{:.2}..{:.2}] vs floor {:.2} ms = ({:.1} MB weights + {:.1} MB KV) / {:.1} GB/s read on {} -> {:.2}x the floor",
        f.context,
        f.tpot_s.median * 1e3,
        f.tpot_s.min * 1e3,
        f.tpot_s.max * 1e3,
        f.floor_s() * 1e3,
        f.weight_bytes as f64 / 1e6,
        f.kv_bytes as f64 / 1e6,
        f.read_gbps.median,
        f.device,
        f.ratio()
    );
    if let Some(a) = &r.alone {
        println!(
            "alone:    one request of {} prompt tokens before the run (it sets the arrival rate): TTFT {:.1} ms, TPOT {:.2} ms, {:.2} s in all",
            a.prompt_tokens,
            a.ttft().unwrap_or(f64::NAN) * 1e3,
            a.tpot().unwrap_or(f64::NAN) * 1e3,
            a.e2e
        );
    }
    let checks: Vec<String> = r
        .verdicts
        .iter()
        .map(|(name, got, limit, ok)| {
            let (got, limit) = if name.contains("(s)") { (got * 1e3, limit * 1e3) } else { (*got, *limit) };
            let unit = if name.contains("(s)") { " ms" } else { "" };
            format!(
                "{} {:.1}{unit} vs {:.1}{unit} {}",
                name.replace(" (s)", ""),
                got,
                limit,
                if *ok { "ok" } else { "MISSED" }
            )
        })
        .collect();
    println!(
        "{} at scale x{} / concurrency x{} (not the full scenario unless both are 1): {}",
        if r.passed() { "PASS" } else { "FAIL" },
        r.scale,
        r.concurrency_scale,
        checks.join("; ")
    );
}

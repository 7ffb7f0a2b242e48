//! `twinfer`: the native binary. Thin: every measurement and kernel lives in the core crate.

use std::process::ExitCode;

mod bench_model;
mod bench_serve;
mod chat;
mod generate;
mod hub;
mod info;
mod interrupt;
mod options;
mod plan;
mod plot;
mod progress;
mod server;

use clap::{Parser, Subcommand, ValueEnum};
use twinfer::bench::{self, KernelReport, Scope};
use twinfer::cpu::{CpuEngine, SimdLevel};
use twinfer::gpu::{GpuEngine, ShaderChecks, Variant};

use options::SimdArg;

#[derive(Parser)]
#[command(name = "twinfer", version, about = "Prefill and paged-decode attention engines on SIMD CPUs and GPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the CPU, its SIMD levels, and which engine `auto` picks and why.
    Info {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a decoder model folder, streaming tokens; prints TTFT/TPOT/TPS/ITL at the end.
    Run(generate::RunArgs),
    /// Chat with a model through its chat template, one line per turn.
    Chat(chat::ChatArgs),
    /// Embed texts with an encoder model folder; with several texts, rank the rest against the first.
    Embed(generate::EmbedArgs),
    /// Time every engine on this device for prefill and for decode, recommend one per phase, write a config.
    Plan(plan::PlanArgs),
    /// An OpenAI-compatible HTTP server: chat and text completions (streamed or whole),
    /// embeddings, models, Prometheus metrics.
    Serve(Box<server::ServeArgs>),
    /// Measure kernels against this machine's own ceilings, or the serving scenarios.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Prefill and paged decode attention, with read-bandwidth and FMA-peak ceilings measured in the same run.
    Kernels {
        /// Small shapes and few runs (seconds instead of minutes).
        #[arg(long)]
        quick: bool,
        /// Instruction set to run (default: the widest this CPU has).
        #[arg(long, value_enum)]
        simd: Option<SimdArg>,
        /// Engine to measure.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: KernelBackendArg,
        /// GPU shader variant (default: the best the adapter supports).
        #[arg(long, value_enum)]
        variant: Option<VariantArg>,
        /// GPU decode workgroup size in threads (teams of head_dim / 8 lanes): 64, 128 or 256.
        #[arg(long)]
        decode_wg: Option<u32>,
        /// Checks compiled into the GPU kernels: full (wgpu's default, with loop bounding), bounds,
        /// or unchecked (default: unchecked on Vulkan, whose driver bounds buffer accesses, else bounds).
        #[arg(long, value_enum)]
        shader_checks: Option<ShaderChecksArg>,
        /// Run prompt projections over f16 weights on the FMA matmul even where the GPU has tensor
        /// cores (cooperative matrices), to compare the two.
        #[arg(long)]
        no_tensor_cores: bool,
        /// Run prefill attention over f16 K/V on the tensor cores (experimental, off by default,
        /// results not yet verified on a device: see the README), to compare it with the FMA kernel.
        #[arg(long)]
        tensor_core_prefill: bool,
        /// Measure only these shapes: `prefill:LEN`, `prefill-bf16:LEN` (bf16 K/V, CPU),
        /// `decode:BATCH:CTX[:PAGE]` (f16 KV, pages of 16
        /// unless PAGE; other sizes on the CPU only), `decode-f32:...` and `decode-bf16:...` (CPU), `decode-q8:...` (int8 KV),
        /// or a projection `linear:ROWS:N:K` (f16 weights) or
        /// `linear-FORMAT:ROWS:N:K` (f32, bf16, q8_0, q4_0, q4_1, q5_0, q5_1; a block format with
        /// `-i8`, as `q8_0-i8`, takes 8-bit activation codes, CPU); repeatable. On the GPU a
        /// projection of at most 64 rows is a GEMV, rated by the weight bytes it reads.
        #[arg(long = "case", value_name = "CASE")]
        cases: Vec<bench::Case>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The serving scenarios (Poisson arrivals, continuous batching) with PASS/FAIL against their thresholds.
    Serve(Box<bench_serve::ServeArgs>),
    /// A model file's prompt-processing and generation rates (llama-bench's pp and tg), against the
    /// read ceiling measured in the same run and, when it is installed, llama-bench on the same file.
    Model(Box<bench_model::BenchModelArgs>),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KernelBackendArg {
    Cpu,
    Gpu,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ShaderChecksArg {
    Full,
    Bounds,
    Unchecked,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum VariantArg {
    Baseline,
    Subgroup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinfer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Info { json } => info::run(json),
        Command::Bench {
            what:
                BenchWhat::Kernels {
                    quick,
                    backend: KernelBackendArg::Gpu,
                    variant,
                    decode_wg,
                    shader_checks,
                    no_tensor_cores,
                    tensor_core_prefill,
                    simd,
                    cases,
                    json,
                },
        } => {
            if simd.is_some() {
                return Err(
                    "--simd picks the CPU engine's instruction set; it has no meaning with --backend gpu".into()
                );
            }
            bench::gpu::check_gpu_cases(&cases).map_err(|e| e.to_string())?;
            let scope = if quick { Scope::Quick } else { Scope::Full };
            let gpu = GpuEngine::new().map_err(|e| e.to_string())?;
            let mut opts = gpu.options();
            if let Some(v) = variant {
                opts.variant = match v {
                    VariantArg::Baseline => Variant::Baseline,
                    VariantArg::Subgroup => Variant::Subgroup,
                };
            }
            if let Some(wg) = decode_wg {
                opts.decode_wg = wg;
            }
            if no_tensor_cores {
                opts.tensor_cores = false;
            }
            opts.tensor_core_prefill = tensor_core_prefill;
            if let Some(c) = shader_checks {
                opts.shader_checks = match c {
                    ShaderChecksArg::Full => ShaderChecks::Full,
                    ShaderChecksArg::Bounds => ShaderChecks::Bounds,
                    ShaderChecksArg::Unchecked => ShaderChecks::Unchecked,
                };
            }
            let gpu = gpu.with_options(opts).map_err(|e| e.to_string())?;
            let only = (!cases.is_empty()).then_some(cases.as_slice());
            let report = bench::gpu::run_gpu_kernels(&gpu, scope, only).map_err(|e| e.to_string())?;
            if json {
                println!("{}", report.to_json());
            } else {
                print_report(&report);
            }
            Ok(())
        }
        Command::Run(args) => generate::run(args),
        Command::Serve(args) => server::run(*args),
        Command::Chat(args) => chat::run(args),
        Command::Embed(args) => generate::embed(args),
        Command::Plan(args) => plan::run(args),
        Command::Bench { what: BenchWhat::Serve(args) } => bench_serve::run(*args),
        Command::Bench { what: BenchWhat::Model(args) } => bench_model::run(*args),
        Command::Bench {
            what:
                BenchWhat::Kernels {
                    quick,
                    simd,
                    cases,
                    json,
                    variant,
                    decode_wg,
                    shader_checks,
                    no_tensor_cores,
                    tensor_core_prefill,
                    ..
                },
        } => {
            if variant.is_some()
                || decode_wg.is_some()
                || shader_checks.is_some()
                || no_tensor_cores
                || tensor_core_prefill
            {
                return Err(
                    "--variant, --decode-wg, --shader-checks, --no-tensor-cores and --tensor-core-prefill set up the GPU engine: add --backend gpu"
                        .into(),
                );
            }
            let level = match simd {
                Some(s) => SimdLevel::by_name(s.name()).ok_or_else(|| format!("this CPU has no {}", s.name()))?,
                None => SimdLevel::detect(),
            };
            let scope = if quick { Scope::Quick } else { Scope::Full };
            let cases = if cases.is_empty() { scope.cases() } else { cases };
            let (runs, ceiling_bytes) = scope.runs_and_ceiling_bytes();
            let report = bench::run_kernel_cases(&CpuEngine::with_level(level), &cases, runs, ceiling_bytes)
                .map_err(|e| e.to_string())?;
            if json {
                println!("{}", report.to_json());
            } else {
                print_report(&report);
            }
            Ok(())
        }
    }
}

fn print_report(r: &KernelReport) {
    println!("machine: {} | simd {} | {} threads", r.cpu, r.simd, r.threads);
    println!(
        "ceilings: read {:.1} GB/s [{:.1}..{:.1}], FMA peak {:.1} GFLOP/s [{:.1}..{:.1}] (median [min..max] of {} runs)",
        r.read_gbps.median,
        r.read_gbps.min,
        r.read_gbps.max,
        r.fma_gflops.median,
        r.fma_gflops.min,
        r.fma_gflops.max,
        r.read_gbps.runs
    );
    if let Some(rows) = &r.row_read_gbps {
        println!(
            "          {} KiB rows at random (one-token pages) {:.1} GB/s [{:.1}..{:.1}]: the ceiling of the page-1 decode cases",
            twinfer::bench::cases::ROW_BYTES / 1024,
            rows.median,
            rows.min,
            rows.max
        );
    }
    let peak = |s: &Option<twinfer::bench::timing::Stats>, unit: &str| {
        s.as_ref().map_or("none".to_string(), |s| format!("{:.1} {unit} [{:.1}..{:.1}]", s.median, s.min, s.max))
    };
    if r.bf16_dot_gflops.is_some() || r.int8_dot_gops.is_some() {
        println!(
            "          dot products: bf16 {}, int8 {} (the bf16 and int8 cases' % is of the FMA peak)",
            peak(&r.bf16_dot_gflops, "GFLOP/s"),
            peak(&r.int8_dot_gops, "GOP/s")
        );
    }
    let walls = r.cases.iter().any(|c| c.wall.is_some());
    if walls {
        println!("times: GPU timestamps, median of single runs; wall: submit to completion of back-to-back runs");
    }
    print!("{:<34} {:>11} {:>8} {:>16} {:>9}", "case", "median ms", "spread", "rate", "% ceiling");
    println!("{}", if walls { format!(" {:>11} {:>8}", "wall ms", "spread") } else { String::new() });
    for c in &r.cases {
        let rate = c.rate();
        let unit = match c.bound {
            bench::cases::Bound::Compute => "GFLOP/s",
            bench::cases::Bound::Memory => "GB/s",
        };
        print!(
            "{:<34} {:>11.3} {:>7.1}% {:>8.1} {:<7} {:>8.1}%",
            c.name,
            c.seconds.median * 1e3,
            c.seconds.spread_pct(),
            rate.median,
            unit,
            rate.median / r.ceiling(c) * 100.0
        );
        match c.wall {
            Some(w) => println!(" {:>11.3} {:>7.1}%", w.median * 1e3, w.spread_pct()),
            None => println!(),
        }
    }
    println!(
        "note: decode cases whose KV fits in the last-level cache are not memory-bound and may exceed \
         the read ceiling; the largest contexts are the ones that measure the memory path"
    );
}

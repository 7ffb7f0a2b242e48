//! The binary end to end: every subcommand on the small models, `--json` documents with their
//! fields, and bad input exiting non-zero with a one-line reason.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use twinfer_tests::cli::command;
use twinfer_tests::models::model_dir;

/// Runs the binary; `TWINFER_CLI_RUNNER` (an emulator command, for cross-built binaries) goes first.
fn twinfer(args: &[&str]) -> Output {
    command(env!("CARGO_BIN_EXE_twinfer")).args(args).output().expect("the binary runs")
}

fn ok_json(args: &[&str]) -> Value {
    let out = twinfer(args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Exits non-zero and says why in one line: ours start with `twinfer:`, the argument parser's
/// with `error:`. (A GPU driver probed on the way may print its own lines; they are not ours.)
fn fails_with(args: &[&str], reason: &str) {
    let out = twinfer(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("twinfer: ")).collect();
    let line = match ours.as_slice() {
        [one] => *one,
        [] => err.lines().next().unwrap_or(""),
        many => panic!("{args:?}: {} reason lines: {many:?}", many.len()),
    };
    assert!(line.contains(reason), "{args:?}: reason {line:?} lacks {reason:?}");
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn info_reports_the_engine_and_its_reason() {
    let out = twinfer(&["info"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("backend:") && text.contains("reason:"), "{text}");
}

#[test]
fn embed_json_has_one_unit_vector_per_text() {
    let dir = model_dir("all-MiniLM-L6-v2");
    let doc = ok_json(&["embed", "--model", path(&dir), "--json", "a cat sat", "ein Hund bellt"]);
    assert_eq!(doc["dim"], 384);
    let e = doc["embeddings"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    let norm: f64 = e[0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    // Warm timing: the repeats' median within their range, the same embeddings as one call.
    let timed = ok_json(&["embed", "--model", path(&dir), "--json", "--repeat", "3", "a cat sat", "ein Hund bellt"]);
    let w = &timed["warm_seconds"];
    assert_eq!(w["runs"], 3);
    let (lo, mid, hi) = (w["min"].as_f64().unwrap(), w["median"].as_f64().unwrap(), w["max"].as_f64().unwrap());
    assert!(0.0 < lo && lo <= mid && mid <= hi, "{w}");
    assert_eq!(timed["embeddings"], doc["embeddings"]);
    assert!(doc["warm_seconds"].is_null(), "no repeats, no warm figures");
}

#[test]
fn embed_ranks_the_related_sentence_first() {
    let dir = model_dir("all-MiniLM-L6-v2");
    let out = twinfer(&[
        "embed",
        "--model",
        path(&dir),
        "How do I reset my password?",
        "Pizza in Naples",
        "Steps to change your password",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let ranked: Vec<&str> = text.lines().filter(|l| l.starts_with("  ")).collect();
    assert!(ranked[0].contains("change your password"), "{text}");
}

#[test]
fn run_json_has_text_tokens_and_metrics() {
    let dir = model_dir("tiny-llama");
    let doc = ok_json(&["run", "--model", path(&dir), "--prompt", "the river", "--max-tokens", "8", "--json"]);
    let tokens = doc["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 8);
    assert!(["length", "eos"].contains(&doc["finish_reason"].as_str().unwrap()));
    let m = &doc["metrics"];
    assert!(m["ttft"].as_f64().unwrap() > 0.0);
    assert_eq!(m["generated_tokens"].as_u64().unwrap() as usize, tokens.len());
    assert!(doc["text"].is_string() && doc["decode_backend"].is_string());
}

#[test]
fn run_streams_text_and_prints_metrics() {
    let dir = model_dir("tiny-qwen2");
    let out = twinfer(&[
        "run",
        "--model",
        path(&dir),
        "--prompt",
        "once",
        "--max-tokens",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TTFT") && err.contains("TPOT") && err.contains("ITL"), "{err}");
}

#[test]
fn bench_serve_json_reports_metrics_scale_and_verdicts() {
    let doc = ok_json(&[
        "bench",
        "serve",
        "--scenario",
        "support",
        "--quick",
        "--model",
        "tiny",
        "--requests",
        "4",
        "--output-tokens",
        "6",
        "--json",
    ]);
    assert_eq!(doc["scenario"], "support");
    assert_eq!(doc["scale"].as_f64().unwrap(), 1.0 / 32.0);
    assert_eq!(doc["metrics"]["requests"], 4);
    assert_eq!(doc["metrics"]["generated_tokens"], 24);
    for key in ["ttft", "tpot", "itl"] {
        assert!(doc["metrics"][key]["p50"].as_f64().unwrap() > 0.0, "{key}");
    }
    assert_eq!(doc["verdicts"].as_array().unwrap().len(), 3);
    assert!(doc["decode_floor"]["ratio"].as_f64().unwrap() > 0.0);
    assert!(doc["pass"].is_boolean());
    // The calibrating request: the middle of the quick context range (128..256), timed.
    let alone = &doc["alone"];
    assert_eq!(alone["prompt_tokens"], 192);
    let (ttft, e2e) = (alone["ttft_s"].as_f64().unwrap(), alone["e2e_s"].as_f64().unwrap());
    assert!(ttft > 0.0 && e2e >= ttft, "{alone}");
}

/// A closed loop of 2 users over 5 requests: two start at once, every later one at the moment
/// another finishes, and never more than two are in flight.
#[test]
fn bench_serve_closed_loop_keeps_its_users_in_flight() {
    let doc = ok_json(&[
        "bench",
        "serve",
        "--scenario",
        "support",
        "--quick",
        "--model",
        "tiny",
        "--requests",
        "5",
        "--output-tokens",
        "4",
        "--users",
        "2",
        "--json",
    ]);
    assert_eq!(doc["arrivals"], "closed loop");
    assert!(doc["alone"].is_null(), "a closed loop calibrates nothing");
    assert_eq!(doc["users"], 2);
    assert_eq!(doc["metrics"]["requests"], 5);
    assert!(doc["rate_per_s"].as_f64().unwrap() > 0.0);
    fails_with(&["bench", "serve", "--users", "2", "--rate", "1"], "cannot be used with");
}

#[test]
fn bench_serve_writes_an_svg_plot() {
    let svg = std::env::temp_dir().join(format!("twinfer-cli-test-{}.svg", std::process::id()));
    let out = twinfer(&[
        "bench",
        "serve",
        "--scenario",
        "long-context",
        "--quick",
        "--scale",
        "0.002",
        "--model",
        "tiny",
        "--requests",
        "3",
        "--output-tokens",
        "4",
        "--plot",
        path(&svg),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(text.starts_with("<svg") && text.contains("<rect") && text.contains("<polyline"), "{text}");
    for label in
        ["TTFT, 3 samples", "inter-token latency", "generated tokens/s over time", "seconds since the first request"]
    {
        assert!(text.contains(label), "the plot has no {label:?}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("scale x0.002"));
}

#[test]
fn bad_flags_and_bad_models_exit_non_zero_with_a_reason() {
    fails_with(&["run", "--bogus"], "unexpected argument");
    fails_with(&["bench", "serve", "--scenario", "nope"], "invalid value");
    let empty = std::env::temp_dir().join(format!("twinfer-cli-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    fails_with(&["run", "--model", path(&empty), "--prompt", "x"], "config.json");
    // A truncated weights file next to a good config and tokenizer.
    let src = model_dir("tiny-llama");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), empty.join(f)).unwrap();
    }
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(empty.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    fails_with(&["run", "--model", path(&empty), "--prompt", "x"], "model.safetensors");
    fails_with(&["embed", "--model", path(&src), "hello"], "decoder");
    let _ = std::fs::remove_dir_all(&empty);
    // A flag is obeyed or refused, never dropped.
    fails_with(&["run", "--model", path(&src), "--prompt", "x", "--max-tokens", "0"], "max_tokens must be at least 1");
    fails_with(&["bench", "kernels", "--backend", "gpu", "--simd", "scalar"], "--simd");
    fails_with(&["bench", "kernels", "--quick", "--decode-wg", "64"], "--backend gpu");
    fails_with(&["bench", "kernels", "--backend", "gpu", "--quick", "--case", "decode-f32:1:64"], "f16");
}

#[test]
fn plan_writes_a_config_that_run_accepts() {
    let out = std::env::temp_dir().join(format!("twinfer-cli-plan-{}.json", std::process::id()));
    let doc = ok_json(&[
        "plan",
        "--preset",
        "tiny",
        "--prefill-tokens",
        "32",
        "--decode-batch",
        "2",
        "--decode-context",
        "64",
        // Every CPU level and the subgroup GPU variants, one page size: each GPU engine costs
        // a minute of software Vulkan in CI.
        "--page-sizes",
        "16",
        "--engines",
        "cpu,gpu subgroup",
        "--tpot-target-ms",
        "40",
        "--out",
        path(&out),
        "--json",
    ]);
    assert_eq!(doc["tpot_target_ms"], 40.0, "the objective goes into the config");
    for key in ["prefill_backend", "decode_backend", "simd", "page_size", "evidence", "reasons"] {
        assert!(!doc[key].is_null(), "plan JSON lacks {key}");
    }
    // Every engine timed for prefill and for each page size of decode.
    let evidence = doc["evidence"].as_array().unwrap();
    assert!(evidence.iter().any(|e| e["phase"] == "prefill") && evidence.iter().any(|e| e["phase"] == "decode"));
    let model = model_dir("tiny-llama");
    let run = ok_json(&[
        "run",
        "--model",
        path(&model),
        "--prompt",
        "a",
        "--max-tokens",
        "3",
        "--config",
        path(&out),
        "--json",
    ]);
    assert_eq!(run["decode_backend"], doc["decode_backend"]);
    std::fs::write(&out, "{\"page_size\": \"big\"}").unwrap();
    fails_with(&["run", "--model", path(&model), "--prompt", "a", "--config", path(&out)], "page_size");
    std::fs::write(&out, "{\"tpot_target_ms\": -1}").unwrap();
    fails_with(&["run", "--model", path(&model), "--prompt", "a", "--config", path(&out)], "tpot_target_ms");
    fails_with(&["run", "--model", path(&model), "--prompt", "a", "--tpot-target-ms", "nan"], "--tpot-target-ms");
    let _ = std::fs::remove_file(&out);
}

/// On a GPU, `bench kernels --case linear-FORMAT:ROWS:N:K` times a projection of any shape and
/// weight format: up to 64 rows a GEMV rated by the weight bytes it reads as stored (codes and
/// scales for the block formats), above that the matmul rated by FLOPs.
#[test]
fn gpu_bench_times_projections_in_any_format() {
    let info = ok_json(&["info", "--json"]);
    if info["gpu"]["available"] != true {
        assert!(
            !std::env::var("TWINFER_REQUIRE_GPU").is_ok_and(|v| v == "1"),
            "TWINFER_REQUIRE_GPU=1 but no GPU: {}",
            info["gpu"]["reason"]
        );
        eprintln!("SKIPPED: no GPU adapter here, the GPU projection benchmark does NOT run: {}", info["gpu"]["reason"]);
        return;
    }
    let args = ["bench", "kernels", "--backend", "gpu", "--quick", "--json"];
    let cases = ["linear-q4_1:1:40:256", "linear-f32:2:24:64", "linear-q8_0:70:16:64"];
    let mut argv = args.to_vec();
    for c in &cases {
        argv.extend(["--case", c]);
    }
    let doc = ok_json(&argv);
    let got: Vec<(&str, &str, f64)> = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["bound"].as_str().unwrap(), c["work"].as_f64().unwrap()))
        .collect();
    // Q4_1: per row 256 / 8 code words and 8 groups of (scale, offset) words, 4 bytes each.
    let q4_bytes = 40.0 * (32.0 + 16.0) * 4.0;
    assert_eq!(
        got,
        [
            ("gemv q4_1 rows=1 [40, 256]", "memory", q4_bytes),
            ("gemv f32 rows=2 [24, 64]", "memory", 24.0 * 64.0 * 4.0),
            ("matmul q8_0 rows=70 [16, 64]", "compute", 2.0 * 70.0 * 16.0 * 64.0),
        ]
    );
    for c in doc["cases"].as_array().unwrap() {
        assert!(c["rate"]["median"].as_f64().unwrap() > 0.0, "{c}");
    }
}

#[test]
fn info_json_has_cpu_gpu_and_the_choice_per_phase() {
    let doc = ok_json(&["info", "--json"]);
    assert!(doc["cpu"].is_string() && doc["simd_chosen"].is_string());
    assert!(doc["simd_available"].as_array().unwrap().iter().any(|l| l == "scalar"));
    assert!(doc["gpu"]["available"].is_boolean());
    if doc["gpu"]["available"] == true {
        assert!(doc["gpu"]["name"].is_string() && doc["gpu"]["shader_f16"].is_boolean());
        assert!(doc["gpu"]["subgroups"].is_boolean() && doc["gpu"]["cooperative_matrix"].is_boolean());
    } else {
        assert!(doc["gpu"]["reason"].is_string());
    }
    for phase in ["prefill", "decode"] {
        assert!(doc["auto"][phase]["backend"].is_string() && doc["auto"][phase]["reason"].is_string(), "{phase}");
    }
}

#[test]
fn bench_model_reports_pp_tg_and_the_read_ceiling() {
    let dir = model_dir("tiny-llama");
    let report = ok_json(&[
        "bench",
        "model",
        "--model",
        path(&dir),
        "--prompt-tokens",
        "64",
        "--gen-tokens",
        "8",
        "--reps",
        "2",
        "--prefill-backend",
        "cpu",
        "--decode-backend",
        "cpu",
        "--json",
    ]);
    for phase in ["pp", "tg"] {
        let rate = &report[phase]["tokens_per_s"];
        assert!(rate["median"].as_f64().unwrap() > 0.0, "{phase}: {report:#}");
        assert!(rate["min"].as_f64().unwrap() <= rate["max"].as_f64().unwrap());
    }
    assert_eq!(report["pp"]["tokens"], 64);
    assert!(report["read_gbps"]["median"].as_f64().unwrap() > 0.0);
    assert!(report["weight_bytes"].as_u64().unwrap() > 0);
    // A folder is not a GGUF file: llama-bench is not run, and the report says why.
    assert_eq!(report["llama_bench"]["skipped"], "the model is not a GGUF file");
    fails_with(&["bench", "model", "--model", path(&dir), "--gen-tokens", "1"], "--gen-tokens at least 2");
}

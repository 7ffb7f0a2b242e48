//! The real-model fixtures: the folder `scripts/fetch-models.sh` fills (all-MiniLM-L6-v2 and the
//! tiny seeded decoders) and the goldens that the independent numpy reference wrote there.

use std::path::PathBuf;

use serde_json::Value;

/// `$TWINFER_MODELS`, else `$HOME/.cache/twinfer/models`. A missing folder fails the test with
/// the command that fills it: these checks are never skipped.
pub fn model_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("TWINFER_MODELS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/twinfer/models")))
        .expect("neither TWINFER_MODELS nor HOME is set");
    let dir = root.join(name);
    assert!(
        dir.join("golden.json").is_file(),
        "{} has no golden.json: run scripts/fetch-models.sh first (it fetches the model and runs the numpy reference)",
        dir.display()
    );
    dir
}

pub fn golden(name: &str) -> Value {
    let path = model_dir(name).join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// `max |a - b| / max |b|`: the relative error of a logits row.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Whether the tests run under an emulator (`TWINFER_TEST_EMULATED=1`, set by
/// scripts/test-aarch64.sh), where the model tests check fewer inputs: every kernel still runs, on
/// less data.
pub fn emulated() -> bool {
    std::env::var("TWINFER_TEST_EMULATED").is_ok_and(|v| v == "1")
}

/// The SIMD levels the model tests run on: all of them, or only the widest when
/// `TWINFER_TEST_LEVELS=widest` (under emulation, where each level costs minutes).
pub fn levels() -> Vec<twinfer::cpu::SimdLevel> {
    if std::env::var("TWINFER_TEST_LEVELS").is_ok_and(|v| v == "widest") {
        vec![twinfer::cpu::SimdLevel::detect()]
    } else {
        twinfer::cpu::SimdLevel::available()
    }
}

/// The attention engines the model tests run through, each with the SIMD level of the
/// projections: every CPU level of [`levels`], then the GPU engine when there is one (the
/// projections run on it too; the level is then that of the norms and activations). No GPU: a
/// loud skip, or a failure under `TWINFER_REQUIRE_GPU=1`.
pub fn engines() -> Vec<(String, twinfer::cpu::SimdLevel, twinfer::Attention)> {
    let mut all: Vec<_> = levels().into_iter().map(|l| (format!("cpu {l}"), l, twinfer::Attention::cpu(l))).collect();
    match twinfer::Attention::new(twinfer::Backend::Gpu) {
        Ok(gpu) => all.push((format!("gpu {}", gpu.info().variant), twinfer::cpu::SimdLevel::detect(), gpu)),
        Err(e) if std::env::var("TWINFER_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("TWINFER_REQUIRE_GPU=1 but the GPU engine is unavailable: {e}")
        }
        Err(e) => eprintln!("SKIPPED: the model tests do NOT run on the GPU engine here: {e}"),
    }
    all
}

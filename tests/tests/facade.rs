//! The `Attention` facade: backend choice, what it reports, and that it runs the same kernels as
//! the engine it wraps.
//!
//! `TWINFER_BACKEND` and `TWINFER_SIMD` override the choice at startup. These tests never set
//! them (setting variables races with other tests); where a caller's environment sets them, the
//! checks that depend on the default choice say so and step aside.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use twinfer::cpu::{CpuEngine, SimdLevel};
use twinfer::{Attention, Backend, TwinferError};
use twinfer_tests::{Case, CaseData, KvKind, Mode};

/// True when the environment overrides the backend choice (never on wasm32, which has none).
fn env_overrides() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let overridden = set("TWINFER_BACKEND") || set("TWINFER_SIMD");
    if overridden {
        eprintln!("SKIPPED: TWINFER_BACKEND or TWINFER_SIMD is set; the default choice is not tested");
    }
    overridden
}

fn level_names() -> Vec<&'static str> {
    SimdLevel::available().iter().map(|l| l.name()).collect()
}

/// A small mixed problem (GQA, ALiBi, soft-cap, f16 KV) in each mode.
fn problem(mode: Mode, seed: u64) -> CaseData {
    let kv_lens = vec![70, 3, 129];
    let qo_lens = match mode {
        Mode::Prefill => vec![17, 3, 65],
        Mode::Decode => vec![1; 3],
    };
    CaseData::new(&Case {
        head_dim: 72,
        causal: mode == Mode::Prefill,
        soft_cap: Some(30.0),
        alibi: true,
        seed,
        ..Case::pinned(mode, KvKind::Paged, qo_lens, kv_lens)
    })
}

/// Runs prefill (paged and ragged) and decode through the facade and checks them with the oracle.
fn assert_works(attention: &Attention) {
    for mode in [Mode::Prefill, Mode::Decode] {
        let data = problem(mode, 5);
        let want = data.reference();
        let kinds: &[KvKind] = if mode == Mode::Prefill { &[KvKind::Paged, KvKind::Ragged] } else { &[KvKind::Paged] };
        for &kind in kinds {
            let (o, lse) = data
                .run(|p, d, out| match mode {
                    Mode::Prefill => attention.prefill(p, &d.prefill_input(kind), out),
                    Mode::Decode => attention.decode(p, &d.decode_input(), out),
                })
                .unwrap();
            data.check(&o, lse.as_deref(), &want).unwrap_or_else(|e| panic!("{mode:?} {kind:?}: {e}"));
        }
    }
}

fn assert_reports_cpu(attention: &Attention) {
    let info = attention.info();
    assert_eq!(info.backend, "cpu");
    assert!(!info.reason.trim().is_empty(), "no reason given: {info:?}");
    assert!(!info.device.trim().is_empty(), "no device named: {info:?}");
    assert!(level_names().contains(&info.variant.as_str()), "{info:?} not among {:?}", level_names());
    assert!(info.threads >= 1, "{info:?}");
}

#[test]
fn cpu_backend_works_and_reports_itself() {
    if env_overrides() {
        return;
    }
    let attention = Attention::new(Backend::Cpu).unwrap();
    assert_reports_cpu(&attention);
    assert_eq!(attention.info().variant, SimdLevel::detect().name(), "the widest level is the default");
    assert!(attention.info().reason.to_lowercase().contains("cpu"), "{:?}", attention.info());
    assert_works(&attention);
}

/// The default level is the vector unit every CPU of the architecture has (NEON on aarch64,
/// AVX2 or wider on x86-64 machines that run these tests, simd128 in the wasm builds), not the
/// scalar fallback. Under qemu this is the check that the aarch64 build picks NEON.
#[test]
fn the_default_level_is_the_vector_unit() {
    let name = SimdLevel::detect().name();
    let expected: &[&str] = if cfg!(target_arch = "aarch64") {
        &["neon"]
    } else if cfg!(target_arch = "x86_64") {
        &["avx2", "avx512"]
    } else if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
        &["simd128", "simd128-relaxed"]
    } else {
        &["scalar"]
    };
    assert!(expected.contains(&name), "default level {name}, expected one of {expected:?}");
}

#[test]
fn auto_backend_chooses_and_says_why() {
    if env_overrides() {
        return;
    }
    let attention = Attention::new(Backend::Auto).unwrap();
    eprintln!("auto chose: {:?}", attention.info());
    if attention.info().backend == "gpu" {
        assert!(attention.info().reason.contains("self-test"), "{:?}", attention.info());
    } else {
        assert_reports_cpu(&attention);
    }
    assert!(attention.info().reason.starts_with("auto"), "{:?}", attention.info());
    assert_works(&attention);
    assert_eq!(Backend::default(), Backend::Auto);
}

/// `Backend::Gpu` runs on the GPU and says so, or fails with a typed error saying why (a failure
/// under `TWINFER_REQUIRE_GPU=1`).
#[test]
fn gpu_backend_runs_or_says_why() {
    if env_overrides() {
        return;
    }
    match Attention::new(Backend::Gpu) {
        Ok(attention) => {
            let info = attention.info();
            assert_eq!(info.backend, "gpu", "{info:?}");
            assert!(info.reason.contains("self-test"), "{info:?}");
            assert_works(&attention);
        }
        // A browser cannot wait for its GPU inside a blocking call: the typed answer is WouldBlock
        // (`Attention::new_async` is the way there).
        Err(TwinferError::WouldBlock { .. }) if cfg!(target_arch = "wasm32") => {}
        Err(e @ (TwinferError::GpuUnavailable(_) | TwinferError::BackendUnavailable { .. })) => {
            assert!(std::env::var("TWINFER_REQUIRE_GPU").as_deref() != Ok("1"), "TWINFER_REQUIRE_GPU=1: {e}");
            eprintln!("SKIPPED: no GPU: {e}");
        }
        Err(other) => panic!("expected a GPU or GpuUnavailable, got {other:?}"),
    }
}

#[test]
fn backend_names_parse() {
    for (s, want) in [
        ("auto", Backend::Auto),
        ("cpu", Backend::Cpu),
        ("gpu", Backend::Gpu),
        ("CPU", Backend::Cpu),
        (" Gpu\n", Backend::Gpu),
        ("AUTO", Backend::Auto),
    ] {
        assert_eq!(s.parse::<Backend>(), Ok(want), "{s:?}");
    }
    for s in ["", " ", "tpu", "cpu,gpu", "cpu gpu", "c pu", "webgpu", "auto!", "0"] {
        match s.parse::<Backend>() {
            Err(TwinferError::InvalidParameter(msg)) => assert!(msg.contains("auto, cpu, gpu"), "{s:?}: {msg}"),
            other => panic!("{s:?}: expected InvalidParameter, got {other:?}"),
        }
    }
}

/// `Attention::cpu(level)` runs exactly the kernels of `CpuEngine::with_level(level)`, for every
/// level this machine has (not only the widest).
#[test]
fn cpu_facade_equals_engine_at_every_level() {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for level in SimdLevel::available() {
        let attention = Attention::cpu(level);
        let engine = CpuEngine::with_level(level);
        assert_reports_cpu(&attention);
        assert_eq!(attention.info().variant, level.name());
        assert!(attention.info().reason.contains(level.name()), "{:?}", attention.info());
        for mode in [Mode::Prefill, Mode::Decode] {
            let data = problem(mode, 0x5eed + level.f32_lanes() as u64);
            let via_facade = data
                .run(|p, d, out| match mode {
                    Mode::Prefill => attention.prefill(p, &d.prefill_input(KvKind::Paged), out),
                    Mode::Decode => attention.decode(p, &d.decode_input(), out),
                })
                .unwrap();
            let via_engine = data
                .run(|p, d, out| match mode {
                    Mode::Prefill => engine.prefill(p, &d.prefill_input(KvKind::Paged), out),
                    Mode::Decode => engine.decode(p, &d.decode_input(), out),
                })
                .unwrap();
            assert_eq!(bits(&via_facade.0), bits(&via_engine.0), "{level} {mode:?}: o differs");
            let (lse_f, lse_e) = (via_facade.1.unwrap(), via_engine.1.unwrap());
            assert_eq!(bits(&lse_f), bits(&lse_e), "{level} {mode:?}: lse differs");
            // Both are right, not merely equal.
            data.check(&via_facade.0, Some(&lse_f), &data.reference()).unwrap_or_else(|e| panic!("{level}: {e}"));
        }
    }
}

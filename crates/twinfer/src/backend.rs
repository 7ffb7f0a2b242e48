//! The backend seam: one trait every engine implements, an enum for the runtime choice, and the
//! startup decision (with its reason) that the API reports.

use std::fmt;
use std::str::FromStr;

use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, PrefillInput};
use crate::cpu::{CpuEngine, SimdLevel};
use crate::error::{Result, TwinferError};
#[cfg(not(target_arch = "wasm32"))]
use crate::gpu::GpuEngine;

/// What the caller asks for. `TWINFER_BACKEND=auto|cpu|gpu` overrides it at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The GPU when one passes its self-test, else the CPU.
    #[default]
    Auto,
    Cpu,
    Gpu,
}

impl FromStr for Backend {
    type Err = TwinferError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "cpu" => Ok(Backend::Cpu),
            "gpu" => Ok(Backend::Gpu),
            other => Err(TwinferError::InvalidParameter(format!("unknown backend {other:?} (auto, cpu, gpu)"))),
        }
    }
}

/// What runs and why: reported by [`Attention::info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// `"cpu"` or `"gpu"`.
    pub backend: &'static str,
    /// The device: the CPU's model name or the GPU adapter's name.
    pub device: String,
    /// The SIMD level (CPU) or shader variant (GPU).
    pub variant: String,
    /// Worker threads (CPU).
    pub threads: usize,
    /// Why this backend was chosen.
    pub reason: String,
}

/// One attention engine. Implementations validate their inputs and never panic on bad input.
pub trait AttentionBackend: fmt::Debug + Send + Sync {
    fn prefill(&self, params: &AttentionParams, input: &PrefillInput<'_>, out: &mut AttentionOutput<'_>) -> Result<()>;
    fn decode(&self, params: &AttentionParams, input: &DecodeInput<'_>, out: &mut AttentionOutput<'_>) -> Result<()>;
    /// Device and variant, without the reason.
    fn describe(&self) -> (String, String, usize);
}

impl AttentionBackend for CpuEngine {
    fn prefill(&self, params: &AttentionParams, input: &PrefillInput<'_>, out: &mut AttentionOutput<'_>) -> Result<()> {
        CpuEngine::prefill(self, params, input, out)
    }
    fn decode(&self, params: &AttentionParams, input: &DecodeInput<'_>, out: &mut AttentionOutput<'_>) -> Result<()> {
        CpuEngine::decode(self, params, input, out)
    }
    fn describe(&self) -> (String, String, usize) {
        (cpu_model_name(), self.level().name().to_string(), self.threads())
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl AttentionBackend for GpuEngine {
    fn prefill(&self, params: &AttentionParams, input: &PrefillInput<'_>, out: &mut AttentionOutput<'_>) -> Result<()> {
        GpuEngine::prefill(self, params, input, out)
    }
    fn decode(&self, params: &AttentionParams, input: &DecodeInput<'_>, out: &mut AttentionOutput<'_>) -> Result<()> {
        GpuEngine::decode(self, params, input, out)
    }
    fn describe(&self) -> (String, String, usize) {
        (self.context().summary.name.clone(), self.variant_name(), 1)
    }
}

/// The engines, statically dispatched.
#[derive(Debug, Clone)]
enum Engine {
    Cpu(CpuEngine),
    #[cfg(not(target_arch = "wasm32"))]
    Gpu(GpuEngine),
}

impl Engine {
    fn as_backend(&self) -> &dyn AttentionBackend {
        match self {
            Engine::Cpu(e) => e,
            #[cfg(not(target_arch = "wasm32"))]
            Engine::Gpu(e) => e,
        }
    }
}

/// The attention API. Which engine runs is chosen once, here, and reported by [`Attention::info`];
/// the calls are the same whichever it is.
#[derive(Debug, Clone)]
pub struct Attention {
    engine: Engine,
    info: BackendInfo,
}

impl Attention {
    /// Chooses a backend. `TWINFER_BACKEND` (auto, cpu, gpu) overrides `requested`, and
    /// `TWINFER_SIMD` (scalar, avx2, avx512, neon, simd128) pins the CPU instruction set.
    pub fn new(requested: Backend) -> Result<Self> {
        let requested = match env_var("TWINFER_BACKEND") {
            Some(v) => v.parse()?,
            None => requested,
        };
        let (level, simd_reason) = match env_var("TWINFER_SIMD") {
            Some(name) => match SimdLevel::by_name(&name) {
                Some(l) => (l, format!("TWINFER_SIMD={name}")),
                None => {
                    let available: Vec<_> = SimdLevel::available().iter().map(|l| l.name()).collect();
                    return Err(TwinferError::InvalidParameter(format!(
                        "TWINFER_SIMD={name} is not available here (available: {})",
                        available.join(", ")
                    )));
                }
            },
            None => (SimdLevel::detect(), "widest SIMD level this CPU has".to_string()),
        };
        let cpu = CpuEngine::with_level(level);
        let reason = match requested {
            Backend::Gpu => {
                let (gpu, why) = open_gpu(&cpu)?;
                return Ok(Self::with_engine(gpu, format!("GPU requested; {why}")));
            }
            Backend::Cpu => format!("CPU requested; {simd_reason}"),
            Backend::Auto => match open_gpu(&cpu) {
                Ok((gpu, why)) if gpu_preferred(&gpu) => {
                    return Ok(Self::with_engine(gpu, format!("auto: {why}")));
                }
                Ok((gpu, _)) => format!(
                    "auto: the GPU adapter {} is a software rasterizer, slower than the SIMD engine, so the CPU; {simd_reason}",
                    gpu.as_backend().describe().0
                ),
                Err(e) => format!("auto: {e}, so the CPU; {simd_reason}"),
            },
        };
        Ok(Self::with_engine(Engine::Cpu(cpu), reason))
    }

    /// The CPU engine on a given instruction set.
    pub fn cpu(level: SimdLevel) -> Self {
        Self::with_engine(Engine::Cpu(CpuEngine::with_level(level)), format!("CPU with {level} requested"))
    }

    /// A given GPU engine (a chosen shader variant), as `twinfer plan` compares them.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn gpu(engine: GpuEngine) -> Self {
        let why = format!("GPU variant {} requested", engine.variant_name());
        Self::with_engine(Engine::Gpu(engine), why)
    }

    fn with_engine(engine: Engine, reason: String) -> Self {
        let (device, variant, threads) = engine.as_backend().describe();
        let backend = match engine {
            Engine::Cpu(_) => "cpu",
            #[cfg(not(target_arch = "wasm32"))]
            Engine::Gpu(_) => "gpu",
        };
        Self { engine, info: BackendInfo { backend, device, variant, threads, reason } }
    }

    /// Which backend runs, on what, and why.
    pub fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Batch prefill: ragged queries against ragged contiguous KV or the paged cache.
    pub fn prefill(
        &self,
        params: &AttentionParams,
        input: &PrefillInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        self.engine.as_backend().prefill(params, input, out)
    }

    /// Batch decode: one query token per sequence against the paged cache.
    pub fn decode(
        &self,
        params: &AttentionParams,
        input: &DecodeInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        self.engine.as_backend().decode(params, input, out)
    }
}

/// Opens the GPU engine and runs its self-test against the CPU engine.
#[cfg(not(target_arch = "wasm32"))]
fn open_gpu(cpu: &CpuEngine) -> Result<(Engine, String)> {
    let gpu = GpuEngine::new()?;
    gpu.self_test(cpu)?;
    let why = format!("{} passed the self-test; variant {}", gpu.context().summary, gpu.variant_name());
    Ok((Engine::Gpu(gpu), why))
}

#[cfg(target_arch = "wasm32")]
fn open_gpu(_cpu: &CpuEngine) -> Result<(Engine, String)> {
    Err(TwinferError::BackendUnavailable { backend: "gpu", reason: "the wasm build has no GPU engine yet".into() })
}

/// Auto prefers a real GPU; a software adapter (device type Cpu, as lavapipe) loses to SIMD.
fn gpu_preferred(engine: &Engine) -> bool {
    match engine {
        #[cfg(not(target_arch = "wasm32"))]
        Engine::Gpu(g) => g.context().summary.device_type != "Cpu",
        _ => false,
    }
}

fn env_var(name: &str) -> Option<String> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = name;
        None
    }
}

/// The CPU's marketing name, where the OS tells it.
pub fn cpu_model_name() -> String {
    #[cfg(target_os = "linux")]
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        for line in info.lines() {
            let lower = line.to_ascii_lowercase();
            if (lower.starts_with("model name") || lower.starts_with("hardware") || lower.starts_with("cpu model"))
                && let Some((_, v)) = line.split_once(':')
            {
                return v.trim().to_string();
            }
        }
    }
    format!("{} CPU", std::env::consts::ARCH)
}

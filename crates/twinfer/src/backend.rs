//! The backend seam: one trait every engine implements, an enum for the runtime choice, and the
//! startup decision (with its reason) that the API reports. Every call has an async twin for
//! browsers, where GPU results arrive only through the event loop.

use std::fmt;
use std::str::FromStr;

use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, PrefillInput};
use crate::cpu::{CpuEngine, SimdLevel};
use crate::error::{Result, TwinferError};
use crate::gpu::GpuEngine;
use crate::wait::{CAN_BLOCK, block_on};

/// What the caller asks for. `TWINFER_BACKEND=auto|cpu|gpu` overrides it at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The GPU when one passes its self-test, else the CPU.
    #[default]
    Auto,
    /// The CPU engine, always available.
    Cpu,
    /// The GPU engine; an error when no GPU passes the self-test.
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
    /// Batch prefill: attention of ragged query rows over ragged or paged KV, into `out`.
    /// Errors on shapes, dtypes or indices that do not match `params`.
    fn prefill(&self, params: &AttentionParams, input: &PrefillInput<'_>, out: &mut AttentionOutput<'_>) -> Result<()>;
    /// Batch decode: one query row per sequence over a paged KV cache, into `out`.
    /// Errors on shapes, dtypes or indices that do not match `params`.
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
    Gpu(GpuEngine),
}

impl Engine {
    fn as_backend(&self) -> &dyn AttentionBackend {
        match self {
            Engine::Cpu(e) => e,
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
    /// Opening the GPU waits for the adapter, so in a browser this never tries it (`Auto` gives
    /// the CPU, `Gpu` fails with `WouldBlock`): use [`Attention::new_async`] there.
    pub fn new(requested: Backend) -> Result<Self> {
        block_on("Attention::new", Self::choose(requested, None, CAN_BLOCK))?
    }

    /// [`Attention::new`] with the CPU engine, if that is what runs, on `level` when given (it
    /// overrides `TWINFER_SIMD`).
    pub fn with_simd(requested: Backend, level: Option<SimdLevel>) -> Result<Self> {
        block_on("Attention::with_simd", Self::choose(requested, level, CAN_BLOCK))?
    }

    /// [`Attention::new`] without blocking: in a browser, the way to get the WebGPU engine. The
    /// reason in [`Attention::info`] says why the GPU was or was not chosen (no WebGPU, failed
    /// self-test, software adapter under `Auto`).
    pub async fn new_async(requested: Backend) -> Result<Self> {
        Self::choose(requested, None, true).await
    }

    async fn choose(requested: Backend, level: Option<SimdLevel>, may_wait: bool) -> Result<Self> {
        let requested = match env_var("TWINFER_BACKEND") {
            Some(v) => v.parse()?,
            None => requested,
        };
        let (level, simd_reason) = match (level, env_var("TWINFER_SIMD")) {
            (Some(l), _) => (l, format!("{l} requested")),
            (None, Some(name)) => match SimdLevel::by_name(&name) {
                Some(l) => (l, format!("TWINFER_SIMD={name}")),
                None => {
                    let available: Vec<_> = SimdLevel::available().iter().map(|l| l.name()).collect();
                    return Err(TwinferError::InvalidParameter(format!(
                        "TWINFER_SIMD={name} is not available here (available: {})",
                        available.join(", ")
                    )));
                }
            },
            (None, None) => (SimdLevel::detect(), "widest SIMD level this CPU has".to_string()),
        };
        let cpu = CpuEngine::with_level(level);
        let reason = match requested {
            Backend::Gpu => {
                let (gpu, why) = open_gpu(&cpu, may_wait).await?;
                return Ok(Self::with_engine(gpu, format!("GPU requested; {why}")));
            }
            Backend::Cpu => format!("CPU requested; {simd_reason}"),
            Backend::Auto => match open_gpu(&cpu, may_wait).await {
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
    pub fn gpu(engine: GpuEngine) -> Self {
        let why = format!("GPU variant {} requested", engine.variant_name());
        Self::with_engine(Engine::Gpu(engine), why)
    }

    fn with_engine(engine: Engine, reason: String) -> Self {
        let (device, variant, threads) = engine.as_backend().describe();
        let backend = match engine {
            Engine::Cpu(_) => "cpu",
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

    /// [`Attention::prefill`] without blocking (the CPU engine simply runs).
    pub async fn prefill_async(
        &self,
        params: &AttentionParams,
        input: &PrefillInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        match &self.engine {
            Engine::Cpu(e) => e.prefill(params, input, out),
            Engine::Gpu(e) => e.prefill_async(params, input, out).await,
        }
    }

    /// [`Attention::decode`] without blocking (the CPU engine simply runs).
    pub async fn decode_async(
        &self,
        params: &AttentionParams,
        input: &DecodeInput<'_>,
        out: &mut AttentionOutput<'_>,
    ) -> Result<()> {
        match &self.engine {
            Engine::Cpu(e) => e.decode(params, input, out),
            Engine::Gpu(e) => e.decode_async(params, input, out).await,
        }
    }

    /// The GPU engine, when this is it (the models run their projections on it).
    pub fn gpu_engine(&self) -> Option<&GpuEngine> {
        match &self.engine {
            Engine::Gpu(e) => Some(e),
            Engine::Cpu(_) => None,
        }
    }

    /// Whether this is the GPU engine.
    pub fn is_gpu(&self) -> bool {
        matches!(self.engine, Engine::Gpu(_))
    }

    /// Why the GPU device is gone, once it is (always `None` for the CPU engine).
    pub fn device_lost(&self) -> Option<String> {
        match &self.engine {
            Engine::Gpu(g) => g.context().check_alive().err().map(|e| match e {
                TwinferError::DeviceLost(why) => why,
                other => other.to_string(),
            }),
            Engine::Cpu(_) => None,
        }
    }

    /// `Err(WouldBlock)` when the blocking calls cannot run here: a GPU engine in a browser.
    pub(crate) fn check_blocking(&self, call: &'static str) -> Result<()> {
        if self.is_gpu() && !CAN_BLOCK { Err(TwinferError::WouldBlock { call }) } else { Ok(()) }
    }

    /// Destroys the GPU device under this engine, as a driver reset or the browser reclaiming
    /// the GPU would; returns false (and does nothing) for the CPU engine. For tests of the CPU
    /// fallback.
    #[doc(hidden)]
    pub fn lose_device_for_test(&self) -> bool {
        match &self.engine {
            Engine::Gpu(g) => {
                g.lose_device_for_test();
                true
            }
            Engine::Cpu(_) => false,
        }
    }

    /// The CPU engine that takes over from a lost GPU one, with the reason it reports.
    pub(crate) fn cpu_fallback(&self, level: SimdLevel, why: &str) -> Self {
        let reason = format!(
            "fallback: the GPU {} was lost ({why}), so the CPU with {level}; the step's sequences were recomputed",
            self.info.device
        );
        Self::with_engine(Engine::Cpu(CpuEngine::with_level(level)), reason)
    }
}

/// Opens the GPU engine and runs its self-test against the CPU engine. `may_wait` is false for
/// the blocking constructor in a browser, which cannot wait for the adapter.
async fn open_gpu(cpu: &CpuEngine, may_wait: bool) -> Result<(Engine, String)> {
    if !may_wait {
        return Err(TwinferError::WouldBlock { call: "Attention::new" });
    }
    let gpu = GpuEngine::new_async().await?;
    gpu.self_test_async(cpu).await?;
    let why = format!("{} passed the self-test; variant {}", gpu.context().summary, gpu.variant_name());
    Ok((Engine::Gpu(gpu), why))
}

/// Auto prefers a real GPU; a software adapter (device type Cpu, as lavapipe) loses to SIMD.
fn gpu_preferred(engine: &Engine) -> bool {
    match engine {
        Engine::Gpu(g) => g.context().summary.device_type != "Cpu",
        Engine::Cpu(_) => false,
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

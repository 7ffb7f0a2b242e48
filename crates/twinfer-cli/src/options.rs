//! Engine options shared by the commands that load a model.

use clap::{Args, ValueEnum};
use twinfer::cpu::SimdLevel;
use twinfer::engine::EngineConfig;
use twinfer::{Backend, DType};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BackendArg {
    Auto,
    Cpu,
    Gpu,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Cpu => Backend::Cpu,
            BackendArg::Gpu => Backend::Gpu,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SimdArg {
    Scalar,
    Avx2,
    Avx512,
    Neon,
    Simd128,
}

impl SimdArg {
    pub fn name(self) -> &'static str {
        match self {
            SimdArg::Scalar => "scalar",
            SimdArg::Avx2 => "avx2",
            SimdArg::Avx512 => "avx512",
            SimdArg::Neon => "neon",
            SimdArg::Simd128 => "simd128",
        }
    }
    pub fn level(self) -> Result<SimdLevel, String> {
        SimdLevel::by_name(self.name()).ok_or_else(|| format!("this CPU has no {}", self.name()))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KvDtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Attention engine for prompt chunks (prefill).
    #[arg(long, value_enum, default_value = "auto")]
    pub prefill_backend: BackendArg,
    /// Attention engine for decode tokens; may differ from the prefill one.
    #[arg(long, value_enum, default_value = "auto")]
    pub decode_backend: BackendArg,
    /// CPU instruction set (default: the widest this CPU has).
    #[arg(long, value_enum)]
    pub simd: Option<SimdArg>,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// KV cache budget in MiB.
    #[arg(long, default_value_t = 512)]
    pub kv_mib: usize,
    #[arg(long, value_enum, default_value = "f16")]
    pub kv_dtype: KvDtypeArg,
    /// Tokens per continuous-batching step (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
}

impl EngineArgs {
    pub fn config(&self) -> Result<EngineConfig, String> {
        Ok(EngineConfig {
            prefill_backend: self.prefill_backend.into(),
            decode_backend: self.decode_backend.into(),
            simd: self.simd.map(SimdArg::level).transpose()?,
            page_size: self.page_size,
            kv_memory_bytes: self.kv_mib << 20,
            kv_dtype: match self.kv_dtype {
                KvDtypeArg::F32 => DType::F32,
                KvDtypeArg::F16 => DType::F16,
                KvDtypeArg::Bf16 => DType::BF16,
            },
            max_batch_tokens: self.max_batch_tokens,
            ..Default::default()
        })
    }
}

//! Engine options shared by the commands that load a model.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde_json::Value;
use twinfer::cpu::{ActivationCodes, SimdLevel};
use twinfer::engine::EngineConfig;
use twinfer::model::WeightFormat;
use twinfer::quant::QuantFormat;
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
    /// int8 codes with an f32 scale per token and KV head (both engines read them directly).
    Q8,
}

impl From<KvDtypeArg> for DType {
    fn from(d: KvDtypeArg) -> Self {
        match d {
            KvDtypeArg::F32 => DType::F32,
            KvDtypeArg::F16 => DType::F16,
            KvDtypeArg::Bf16 => DType::BF16,
            KvDtypeArg::Q8 => DType::Q8,
        }
    }
}

#[derive(Args, Clone)]
pub struct EngineArgs {
    /// A config file written by `twinfer plan`; flags given here override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Attention engine for prompt chunks (prefill) [default: auto].
    #[arg(long, value_enum)]
    pub prefill_backend: Option<BackendArg>,
    /// Attention engine for decode tokens; may differ from the prefill one [default: auto].
    #[arg(long, value_enum)]
    pub decode_backend: Option<BackendArg>,
    /// CPU instruction set [default: the widest this CPU has].
    #[arg(long, value_enum)]
    pub simd: Option<SimdArg>,
    /// Tokens per KV page [default: 16].
    #[arg(long)]
    pub page_size: Option<usize>,
    /// KV cache budget in MiB [default: 512].
    #[arg(long)]
    pub kv_mib: Option<usize>,
    /// KV cache dtype [default: f16].
    #[arg(long, value_enum)]
    pub kv_dtype: Option<KvDtypeArg>,
    /// Tokens per continuous-batching step: decode tokens plus prompt chunks [default: 512].
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// A time-per-output-token objective: steps with decoding requests take prompt tokens only
    /// as far as the measured step cost keeps them within it (0: none) [default: none, in `bench
    /// serve` too; a `plan` config may carry one].
    #[arg(long, value_name = "MS")]
    pub tpot_target_ms: Option<f64>,
    /// Quantize a float model's projections at load, or round them to bf16.
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// How quantized projections quantize their activations on the CPU: int8 multiplies prompts
    /// about twice as fast where the CPU has int8 dot products (VNNI), at a visible cost in
    /// accuracy, as llama.cpp does [default: int16].
    #[arg(long, value_enum)]
    pub activations: Option<ActivationsArg>,
    /// Finished requests whose KV pages stay for later prompts with the same start (0: none)
    /// [default: 0; `chat`: 4].
    #[arg(long)]
    pub prefix_cache: Option<usize>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QuantizeArg {
    /// bf16 projections and embeddings, computed with bf16 activations (bf16 dot products where
    /// the CPU has them, as AVX512-BF16 does).
    #[value(name = "bf16")]
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActivationsArg {
    /// Codes up to 32385 per block of 32: near f32 activations.
    #[value(name = "int16")]
    Int16,
    /// Codes up to 127 per block of 32 (llama.cpp's Q8 activations): one int8 digit.
    #[value(name = "int8")]
    Int8,
}

impl From<ActivationsArg> for ActivationCodes {
    fn from(a: ActivationsArg) -> Self {
        match a {
            ActivationsArg::Int16 => ActivationCodes::Int16,
            ActivationsArg::Int8 => ActivationCodes::Int8,
        }
    }
}

impl From<QuantizeArg> for WeightFormat {
    fn from(q: QuantizeArg) -> Self {
        match q {
            QuantizeArg::Bf16 => WeightFormat::Bf16,
            QuantizeArg::Q8_0 => QuantFormat::Q8_0.into(),
            QuantizeArg::Q4_0 => QuantFormat::Q4_0.into(),
            QuantizeArg::Q4_1 => QuantFormat::Q4_1.into(),
            QuantizeArg::Q5_0 => QuantFormat::Q5_0.into(),
            QuantizeArg::Q5_1 => QuantFormat::Q5_1.into(),
        }
    }
}

impl EngineArgs {
    pub fn config(&self) -> Result<EngineConfig, String> {
        let mut c = EngineConfig::default();
        if let Some(path) = &self.config {
            apply_config_file(&mut c, path)?;
        }
        if let Some(b) = self.prefill_backend {
            c.prefill_backend = b.into();
        }
        if let Some(b) = self.decode_backend {
            c.decode_backend = b.into();
        }
        if let Some(s) = self.simd {
            c.simd = Some(s.level()?);
        }
        c.page_size = self.page_size.unwrap_or(c.page_size);
        if let Some(mib) = self.kv_mib {
            c.kv_memory_bytes = mib << 20;
        }
        if let Some(d) = self.kv_dtype {
            c.kv_dtype = d.into();
        }
        c.max_batch_tokens = self.max_batch_tokens.unwrap_or(c.max_batch_tokens);
        if let Some(ms) = self.tpot_target_ms {
            if !(ms >= 0.0 && ms.is_finite()) {
                return Err(format!("--tpot-target-ms {ms}: give a number of milliseconds, 0 for none"));
            }
            c.tpot_target = (ms > 0.0).then_some(ms / 1e3);
        }
        if let Some(q) = self.quantize {
            c.quantize = Some(q.into());
        }
        if let Some(a) = self.activations {
            c.activations = a.into();
        }
        c.prefix_cache_sequences = self.prefix_cache.unwrap_or(c.prefix_cache_sequences);
        Ok(c)
    }
}

/// Reads the fields of a `twinfer plan` config into `c`.
fn apply_config_file(c: &mut EngineConfig, path: &Path) -> Result<(), String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| format!("{shown}: not valid JSON: {e}"))?;
    let field = |key: &str| json.get(key).and_then(Value::as_str);
    let bad = |key: &str, v: &str| format!("{shown}: {key} {v:?} is not valid");
    if let Some(v) = field("prefill_backend") {
        c.prefill_backend = v.parse::<Backend>().map_err(|_| bad("prefill_backend", v))?;
    }
    if let Some(v) = field("decode_backend") {
        c.decode_backend = v.parse::<Backend>().map_err(|_| bad("decode_backend", v))?;
    }
    if let Some(v) = field("simd") {
        c.simd =
            Some(SimdLevel::by_name(v).ok_or_else(|| format!("{shown}: simd {v:?} is not available on this CPU"))?);
    }
    if let Some(v) = field("kv_dtype") {
        c.kv_dtype = match v {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "q8" => DType::Q8,
            _ => return Err(bad("kv_dtype", v)),
        };
    }
    if let Some(v) = json.get("tpot_target_ms") {
        let ms = v
            .as_f64()
            .filter(|ms| *ms >= 0.0 && ms.is_finite())
            .ok_or_else(|| bad("tpot_target_ms", &v.to_string()))?;
        c.tpot_target = (ms > 0.0).then_some(ms / 1e3);
    }
    if let Some(v) = json.get("max_batch_tokens") {
        c.max_batch_tokens =
            v.as_u64().filter(|&n| n > 0).ok_or_else(|| bad("max_batch_tokens", &v.to_string()))? as usize;
    }
    if let Some(v) = field("activations") {
        c.activations = ActivationCodes::parse(v).map_err(|_| bad("activations", v))?;
    }
    if let Some(p) = json.get("page_size") {
        c.page_size = p.as_u64().filter(|&p| p > 0).ok_or_else(|| bad("page_size", &p.to_string()))? as usize;
    }
    Ok(())
}

//! A projection `y = x · Wᵀ + b` with its weights in the dtype they were stored in: on the CPU
//! through the pulp kernels (float or block-quantized), or on a GPU engine, where the weights are
//! uploaded on first use and stay resident (one copy per device, shared by clones of the model).
//! Quantized weights are decoded to f16 (f32 without shader-f16) for the GPU for now.

use std::sync::{Arc, Mutex};

use crate::cpu::{SimdLevel, linear, linear_quant};
use crate::dtype::TensorRef;
use crate::error::{Result, TwinferError};
use crate::gpu::{DEFAULT_MAX_WEIGHT_BUFFER, GpuEngine, GpuLinear};
use crate::model::weights::{WeightData, Weights};

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[n, k]`: one row per output feature.
    pub w: Arc<WeightData>,
    pub bias: Option<Vec<f32>>,
    pub n: usize,
    pub k: usize,
    /// The weights' copies on GPU devices, made on first use there.
    pub device: DeviceCopies,
}

/// A projection's resident copies, one per live device (a prefill and a decode engine may be two).
#[derive(Debug, Clone, Default)]
pub struct DeviceCopies(Arc<Mutex<Vec<Arc<GpuLinear>>>>);

impl Linear {
    /// `{name}.weight` of shape `[n, k]` and, with `bias`, `{name}.bias` of shape `[n]`.
    pub fn load(weights: &Weights, name: &str, n: usize, k: usize, bias: bool) -> Result<Self> {
        let w = Arc::new(weights.get(&format!("{name}.weight"), &[n, k])?);
        let bias = if bias { Some(weights.f32(&format!("{name}.bias"), &[n])?) } else { None };
        Ok(Self { w, bias, n, k, device: DeviceCopies::default() })
    }

    /// A projection over weights already loaded (a tied LM head shares the embeddings).
    pub fn new(w: Arc<WeightData>, bias: Option<Vec<f32>>, n: usize, k: usize) -> Self {
        Self { w, bias, n, k, device: DeviceCopies::default() }
    }

    /// Several projections of the same input stacked into one (q, k, v; gate, up), so the input is
    /// read once and one product runs instead of three.
    pub fn stack(parts: Vec<Linear>) -> Result<Self> {
        let k = parts[0].k;
        let dtype = parts[0].w.dtype();
        let differ = || TwinferError::InvalidParameter("stacked projections differ in width or dtype".into());
        if parts.iter().any(|p| p.k != k || p.w.dtype() != dtype) {
            return Err(differ());
        }
        let n = parts.iter().map(|p| p.n).sum();
        let has_bias = parts.iter().any(|p| p.bias.is_some());
        let mut bias = Vec::with_capacity(if has_bias { n } else { 0 });
        let w = match dtype {
            None => {
                let packed: Vec<&crate::quant::PackedQuant> = parts
                    .iter()
                    .map(|p| if let WeightData::Quant(q) = &*p.w { Some(q) } else { None })
                    .collect::<Option<_>>()
                    .ok_or_else(differ)?;
                WeightData::Quant(crate::quant::PackedQuant::stack(&packed).ok_or_else(differ)?)
            }
            Some(crate::DType::F32) => {
                WeightData::F32(concat(&parts, |w| if let WeightData::F32(v) = w { v } else { unreachable!() }))
            }
            Some(crate::DType::F16) => {
                WeightData::F16(concat(&parts, |w| if let WeightData::F16(v) = w { v } else { unreachable!() }))
            }
            Some(crate::DType::BF16) => {
                WeightData::BF16(concat(&parts, |w| if let WeightData::BF16(v) = w { v } else { unreachable!() }))
            }
        };
        if has_bias {
            for p in &parts {
                match &p.bias {
                    Some(b) => bias.extend_from_slice(b),
                    None => bias.extend(std::iter::repeat_n(0.0, p.n)),
                }
            }
        }
        Ok(Self::new(Arc::new(w), has_bias.then_some(bias), n, k))
    }

    /// The float weights, or `None` when they are block-quantized.
    pub fn weight_ref(&self) -> Option<TensorRef<'_>> {
        match &*self.w {
            WeightData::F32(v) => Some(TensorRef::F32(v)),
            WeightData::F16(v) => Some(TensorRef::F16(v)),
            WeightData::BF16(v) => Some(TensorRef::BF16(v)),
            WeightData::Quant(_) => None,
        }
    }

    /// `y[rows, n] = x[rows, k] · Wᵀ + b`.
    pub fn forward(&self, level: SimdLevel, x: &[f32], rows: usize, y: &mut Vec<f32>) -> Result<()> {
        y.clear();
        y.resize(rows * self.n, f32::NAN);
        match (&*self.w, self.weight_ref()) {
            (WeightData::Quant(q), _) => linear_quant(level, x, rows, q, self.bias.as_deref(), y),
            (_, Some(w)) => linear(level, x, rows, w, self.n, self.k, self.bias.as_deref(), y),
            (_, None) => unreachable!("only quantized weights have no float view"),
        }
    }

    /// [`Linear::forward`] on `gpu` when given (awaiting the readback), else on the CPU. A lost
    /// device is `DeviceLost`, as attention reports it.
    pub async fn forward_async(
        &self,
        level: SimdLevel,
        gpu: Option<&GpuEngine>,
        x: &[f32],
        rows: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let Some(gpu) = gpu else { return self.forward(level, x, rows, y) };
        let weights = self.on_device(gpu)?;
        y.clear();
        y.resize(rows * self.n, f32::NAN);
        gpu.linear_async(&weights, x, rows, y).await
    }

    /// The weights on `gpu`'s device, uploaded on the first call there.
    pub fn on_device(&self, gpu: &GpuEngine) -> Result<Arc<GpuLinear>> {
        let mut copies =
            self.device.0.lock().map_err(|_| TwinferError::DeviceLost("a previous call panicked".into()))?;
        if let Some(w) = copies.iter().find(|w| w.is_on(gpu.context())) {
            return Ok(w.clone());
        }
        // Copies on devices that are gone free their buffers here.
        copies.retain(|w| w.device_alive());
        // Quantized weights are decoded for the GPU's float kernels (f16 where the adapter has it).
        let (as_f16, as_f32): (Vec<half::f16>, Vec<f32>);
        let w = match self.weight_ref() {
            Some(w) => w,
            None if gpu.context().summary.shader_f16 => {
                as_f16 = self.w.to_f32().into_iter().map(half::f16::from_f32).collect();
                TensorRef::F16(&as_f16)
            }
            None => {
                as_f32 = self.w.to_f32();
                TensorRef::F32(&as_f32)
            }
        };
        let storage = GpuLinear::storage_for(gpu, w);
        let uploaded =
            GpuLinear::upload(gpu, w, self.n, self.k, self.bias.as_deref(), storage, DEFAULT_MAX_WEIGHT_BUFFER)?;
        let uploaded = Arc::new(uploaded);
        copies.push(uploaded.clone());
        Ok(uploaded)
    }

    /// Bytes of weights one forward reads.
    pub fn weight_bytes(&self) -> usize {
        self.w.bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

fn concat<T: Copy>(parts: &[Linear], get: impl Fn(&WeightData) -> &Vec<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.w.len()).sum());
    for p in parts {
        out.extend_from_slice(get(&p.w));
    }
    out
}

/// Puts `linears` on `gpu`'s device, reporting (bytes done, bytes in all) after each.
pub(crate) fn upload_all(linears: &[&Linear], gpu: &GpuEngine, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    let total = linears.iter().map(|l| l.weight_bytes()).sum();
    let mut done = 0;
    for l in linears {
        l.on_device(gpu)?;
        done += l.weight_bytes();
        progress(done, total);
    }
    Ok(())
}

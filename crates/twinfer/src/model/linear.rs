//! A projection `y = x · Wᵀ + b` with its weights in the dtype they were stored in: on the CPU
//! through the pulp kernels (float or block-quantized), or on a GPU engine, where the weights are
//! uploaded on first use and stay resident (one copy per device, shared by clones of the model).
//! Block-quantized weights stay quantized there too, decoded in the kernels' registers.

use std::sync::{Arc, Mutex, OnceLock};

use crate::cpu::{ActivationCodes, Bf16Panels, SimdLevel, linear_parts_packed, linear_quant_parts};
use crate::dtype::TensorRef;
use crate::error::{Result, TwinferError};
use crate::gpu::{DEFAULT_MAX_WEIGHT_BUFFER, GpuEngine, GpuLinear};
use crate::model::weights::{WeightData, Weights};
use crate::quant::PackedQuant;

/// A projection `y = x · Wᵀ + b`: its weight blocks, bias and sizes, and its copies on GPU devices.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[n, k]`, one row per output feature, as row blocks stacked in order: one block, unless
    /// projections of one input were fused (q, k, v; gate, up), whose float blocks stay where they
    /// were loaded (in the model file when they can) instead of being copied into one matrix.
    pub parts: Vec<Arc<WeightData>>,
    /// Bias per output feature, `[n]`.
    pub bias: Option<Vec<f32>>,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// The weights' copies on GPU devices, made on first use there.
    pub device: DeviceCopies,
    /// bf16 weights packed for the CPU's bf16 dot products, made on first use there.
    pub cpu: CpuPanels,
    /// How finely block-quantized weights' CPU products quantize the activations (GPU kernels
    /// take them in f32).
    pub activations: ActivationCodes,
}

/// A projection's resident copies, one per live device (a prefill and a decode engine may be two).
#[derive(Debug, Clone, Default)]
pub struct DeviceCopies(Arc<Mutex<Vec<Arc<GpuLinear>>>>);

/// A projection's bf16 weights packed for AVX512-BF16 ([`Bf16Panels`]): made on the first CPU
/// product that can use them and kept beside the weights (as many bytes again), shared by clones
/// of the model. Without them each call would pack its weights again, which a decode step cannot
/// afford.
#[derive(Debug, Clone, Default)]
pub struct CpuPanels(Arc<OnceLock<Option<Bf16Panels>>>);

impl Linear {
    /// `{name}.weight` of shape `[n, k]` and, with `bias`, `{name}.bias` of shape `[n]`.
    pub fn load(weights: &Weights, name: &str, n: usize, k: usize, bias: bool) -> Result<Self> {
        let w = Arc::new(weights.get(&format!("{name}.weight"), &[n, k])?);
        let bias = if bias { Some(weights.f32(&format!("{name}.bias"), &[n])?) } else { None };
        Ok(Self::new(w, bias, n, k))
    }

    /// A projection over weights already loaded (a tied LM head shares the embeddings).
    pub fn new(w: Arc<WeightData>, bias: Option<Vec<f32>>, n: usize, k: usize) -> Self {
        Self {
            parts: vec![w],
            bias,
            n,
            k,
            device: DeviceCopies::default(),
            cpu: CpuPanels::default(),
            activations: ActivationCodes::default(),
        }
    }

    /// Several projections of the same input stacked into one (q, k, v; gate, up), so the input is
    /// read once and one product runs instead of three. No weight is copied: the parts stay as
    /// loaded, and the kernels walk them in order.
    pub fn stack(parts: Vec<Linear>) -> Result<Self> {
        let k = parts[0].k;
        let dtype = parts[0].dtype();
        let differ = || TwinferError::InvalidParameter("stacked projections differ in width or dtype".into());
        if parts.iter().any(|p| p.k != k || p.dtype() != dtype) {
            return Err(differ());
        }
        let n = parts.iter().map(|p| p.n).sum();
        let has_bias = parts.iter().any(|p| p.bias.is_some());
        let mut bias = Vec::with_capacity(if has_bias { n } else { 0 });
        if has_bias {
            for p in &parts {
                match &p.bias {
                    Some(b) => bias.extend_from_slice(b),
                    None => bias.extend(std::iter::repeat_n(0.0, p.n)),
                }
            }
        }
        let blocks = parts.iter().flat_map(|p| p.parts.iter().cloned()).collect();
        Ok(Self {
            parts: blocks,
            bias: has_bias.then_some(bias),
            n,
            k,
            device: DeviceCopies::default(),
            cpu: CpuPanels::default(),
            activations: parts[0].activations,
        })
    }

    /// The weights' float dtype, or `None` when they are block-quantized.
    pub fn dtype(&self) -> Option<crate::DType> {
        self.parts[0].dtype()
    }

    /// The weights' format: a float dtype (`f16`) or a block format (`q4_k`); stacked parts of
    /// several block formats are named together (`q4_k+q6_k`).
    pub fn format_name(&self) -> String {
        if let Some(dtype) = self.dtype() {
            return dtype.to_string();
        }
        let mut names: Vec<&str> = Vec::new();
        for q in self.quant_parts().into_iter().flatten() {
            if !names.contains(&q.format.name()) {
                names.push(q.format.name());
            }
        }
        names.join("+")
    }

    /// The block-quantized weights' row blocks, or `None` when they are float.
    pub fn quant_parts(&self) -> Option<Vec<&PackedQuant>> {
        self.parts
            .iter()
            .map(|w| match &**w {
                WeightData::Quant(q) => Some(q),
                _ => None,
            })
            .collect()
    }

    /// The float weights' row blocks, or `None` when they are block-quantized.
    pub fn weight_parts(&self) -> Option<Vec<TensorRef<'_>>> {
        self.parts
            .iter()
            .map(|w| match &**w {
                WeightData::F32(v) => Some(TensorRef::F32(v)),
                WeightData::F16(v) => Some(TensorRef::F16(v)),
                WeightData::BF16(v) => Some(TensorRef::BF16(v)),
                WeightData::Quant(_) => None,
            })
            .collect()
    }

    /// All the weights as f32, `[n, k]`.
    pub fn to_f32(&self) -> Vec<f32> {
        self.parts.iter().flat_map(|w| w.to_f32()).collect()
    }

    /// `y[rows, n] = x[rows, k] · Wᵀ + b`.
    pub fn forward(&self, level: SimdLevel, x: &[f32], rows: usize, y: &mut Vec<f32>) -> Result<()> {
        y.clear();
        y.resize(rows * self.n, f32::NAN);
        if let Some(q) = self.quant_parts() {
            return linear_quant_parts(level, self.activations, x, rows, &q, self.bias.as_deref(), y);
        }
        let parts = self
            .weight_parts()
            .ok_or_else(|| TwinferError::InvalidParameter("a projection mixes float and quantized weights".into()))?;
        // Packed only where the level has bf16 dot products: what is cached then does not
        // depend on the level that asked first.
        let packed = if self.dtype() == Some(crate::DType::BF16) && level.bf16_dot() {
            self.cpu.0.get_or_init(|| Bf16Panels::pack(level, &parts, self.k)).as_ref()
        } else {
            None
        };
        linear_parts_packed(level, x, rows, &parts, packed, self.k, self.bias.as_deref(), y)
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
        if let Some(parts) = self.quant_parts() {
            let uploaded = GpuLinear::upload_quant(gpu, &parts, self.bias.as_deref(), DEFAULT_MAX_WEIGHT_BUFFER)?;
            let uploaded = Arc::new(uploaded);
            copies.push(uploaded.clone());
            return Ok(uploaded);
        }
        // Stacked float blocks are joined for the upload only (the host keeps them apart).
        let (as_f16, as_f32, as_bf16): (Vec<half::f16>, Vec<f32>, Vec<half::bf16>);
        let parts = self.weight_parts();
        let w = match parts.as_deref() {
            Some([w]) => *w,
            Some(_) => match self.dtype() {
                Some(crate::DType::F16) => {
                    as_f16 = concat(&self.parts, |w| if let WeightData::F16(v) = w { Some(&**v) } else { None });
                    TensorRef::F16(&as_f16)
                }
                Some(crate::DType::BF16) => {
                    as_bf16 = concat(&self.parts, |w| if let WeightData::BF16(v) = w { Some(&**v) } else { None });
                    TensorRef::BF16(&as_bf16)
                }
                _ => {
                    as_f32 = self.to_f32();
                    TensorRef::F32(&as_f32)
                }
            },
            None => {
                return Err(TwinferError::InvalidParameter("a projection mixes float and quantized weights".into()));
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
        self.parts.iter().map(|w| w.bytes()).sum::<usize>() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// The blocks of one float dtype joined into one matrix (`get` picks that dtype's elements).
fn concat<T: Copy>(parts: &[Arc<WeightData>], get: impl Fn(&WeightData) -> Option<&[T]>) -> Vec<T> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.extend_from_slice(get(p).expect("stacked blocks share one dtype"));
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

//! The tensors of a model: one `model.safetensors`, the shards a `model.safetensors.index.json`
//! names, or a GGUF file (read under Hugging Face's tensor names, see `gguf_model.rs`). Headers
//! are checked on load. A float tensor is read in place from the file (see `elems.rs`); others
//! are converted on request, once, into the format the kernels read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorInfo};
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Result, TwinferError};
use crate::model::elems::Elems;
use crate::model::gguf::GgufFile;
use crate::model::gguf_model;
use crate::model::source::{FileBytes, ModelSource};
use crate::model::stream::PreparedTensors;
use crate::quant::PackedQuant;

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

#[derive(Debug)]
struct Shard {
    file: String,
    bytes: Arc<FileBytes>,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// A model's weight tensors, by name.
#[derive(Debug)]
pub struct Weights {
    shards: Vec<Shard>,
    /// Tensor name -> shard.
    index: HashMap<String, usize>,
    gguf: Option<gguf_model::GgufWeights>,
    /// Tensors converted as their file streamed in; each is taken out when read.
    prepared: Option<Mutex<PreparedTensors>>,
}

/// A tensor in the format it will be computed from.
#[derive(Debug, Clone)]
pub enum WeightData {
    /// f32 weights.
    F32(Elems<f32>),
    /// f16 weights.
    F16(Elems<f16>),
    /// bf16 weights.
    BF16(Elems<bf16>),
    /// A block-quantized matrix, kept quantized in the CPU kernel's layout.
    Quant(PackedQuant),
}

impl WeightData {
    /// The float dtype, or `None` for quantized weights.
    pub fn dtype(&self) -> Option<DType> {
        match self {
            Self::F32(_) => Some(DType::F32),
            Self::F16(_) => Some(DType::F16),
            Self::BF16(_) => Some(DType::BF16),
            Self::Quant(_) => None,
        }
    }
    /// Elements (weights).
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::BF16(v) => v.len(),
            Self::Quant(q) => q.n * q.k,
        }
    }
    /// Whether the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Quant(q) => q.bytes(),
            other => other.len() * other.dtype().map_or(4, DType::size),
        }
    }
    /// The weights widened (or dequantized) to f32, in row-major order.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Self::F32(v) => v.to_vec(),
            Self::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Self::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Self::Quant(q) => q.to_f32(),
        }
    }
    /// Row `r` of a `[rows, width]` tensor as f32 (an embedding lookup).
    pub fn row_f32(&self, r: usize, width: usize, out: &mut [f32]) {
        match self {
            Self::F32(e) => out.copy_from_slice(&e[r * width..][..width]),
            Self::F16(e) => out.iter_mut().zip(&e[r * width..][..width]).for_each(|(d, s)| *d = s.to_f32()),
            Self::BF16(e) => out.iter_mut().zip(&e[r * width..][..width]).for_each(|(d, s)| *d = s.to_f32()),
            Self::Quant(q) => q.row_f32(r, out),
        }
    }
}

impl WeightData {
    /// The float tensor at `file[range]`, stored little-endian as `dtype`, in place where it can be.
    pub(crate) fn from_file(file: &Arc<FileBytes>, range: std::ops::Range<usize>, dtype: DType) -> Self {
        match dtype {
            DType::F32 => Self::F32(Elems::from_file(file, range, |b| f32::from_le_bytes(b.try_into().unwrap()))),
            DType::F16 => Self::F16(Elems::from_file(file, range, |b| f16::from_le_bytes([b[0], b[1]]))),
            DType::BF16 => Self::BF16(Elems::from_file(file, range, |b| bf16::from_le_bytes([b[0], b[1]]))),
            DType::Q8 => unreachable!("file tensors are f32, f16 or bf16; Q8 is the KV cache's type"),
        }
    }

    /// Whether the tensor is read in place from its model file (no copy of it in memory).
    pub fn in_file(&self) -> bool {
        match self {
            Self::F32(v) => v.in_file(),
            Self::F16(v) => v.in_file(),
            Self::BF16(v) => v.in_file(),
            Self::Quant(_) => false,
        }
    }
}

impl Weights {
    /// Reads the headers of the model's safetensors file(s) from `source`.
    pub fn load(source: &mut ModelSource) -> Result<Self> {
        let files = if source.has(INDEX) {
            shard_files(&source.read_text(INDEX)?, &source.display(INDEX))?
        } else {
            vec![SINGLE.to_string()]
        };
        let mut weights = Weights { shards: Vec::new(), index: HashMap::new(), gguf: None, prepared: None };
        for file in files {
            let shown = source.display(&file);
            let bytes = source.read(&file)?;
            let (header, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| TwinferError::ModelFile {
                file: shown.clone(),
                reason: format!("not a valid safetensors file: {e}"),
            })?;
            let tensors: HashMap<String, TensorInfo> =
                metadata.tensors().into_iter().map(|(name, info)| (name, info.clone())).collect();
            for name in tensors.keys() {
                if weights.index.insert(name.clone(), weights.shards.len()).is_some() {
                    return Err(TwinferError::ModelTensor {
                        file: shown,
                        tensor: name.clone(),
                        reason: "appears in two shards".into(),
                    });
                }
            }
            weights.shards.push(Shard { file: shown, bytes: Arc::new(bytes), data_start: 8 + header, tensors });
        }
        Ok(weights)
    }

    /// The tensors of a parsed GGUF file, under Hugging Face's names.
    pub(crate) fn from_gguf(file: GgufFile) -> Result<Self> {
        Ok(Weights {
            shards: Vec::new(),
            index: HashMap::new(),
            gguf: Some(gguf_model::GgufWeights::new(file)?),
            prepared: None,
        })
    }

    /// Tensors already converted as their file streamed in ([`crate::model::SafetensorsStream`]).
    pub fn from_prepared(tensors: PreparedTensors) -> Self {
        Weights { shards: Vec::new(), index: HashMap::new(), gguf: None, prepared: Some(Mutex::new(tensors)) }
    }

    /// Whether the model has a tensor of this (Hugging Face) name.
    pub fn contains(&self, name: &str) -> bool {
        if let Some(p) = &self.prepared {
            return p.lock().is_ok_and(|p| p.tensors.contains_key(name));
        }
        match &self.gguf {
            Some(g) => g.contains(name),
            None => self.index.contains_key(name),
        }
    }

    /// The tensor `name`, which must have exactly `shape`, in its stored dtype (block-quantized
    /// GGUF matrices stay quantized).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<WeightData> {
        if let Some(g) = &self.gguf {
            return g.get(name, shape);
        }
        if let Some(p) = &self.prepared {
            return take_prepared(p, name, shape);
        }
        let Some(&s) = self.index.get(name) else {
            let file = self.shards.iter().map(|s| s.file.as_str()).collect::<Vec<_>>().join(", ");
            return Err(TwinferError::ModelTensor { file, tensor: name.into(), reason: "missing".into() });
        };
        let shard = &self.shards[s];
        let info = &shard.tensors[name];
        let err = |reason: String| TwinferError::ModelTensor { file: shard.file.clone(), tensor: name.into(), reason };
        if info.shape != shape {
            return Err(err(format!("shape {:?}, expected {shape:?}", info.shape)));
        }
        let range = shard.data_start + info.data_offsets.0..shard.data_start + info.data_offsets.1;
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => return Err(err(format!("dtype {other:?} is not supported (F32, F16, BF16)"))),
        };
        Ok(WeightData::from_file(&shard.bytes, range, dtype))
    }

    /// The tensor as f32 (norms, biases, embeddings).
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.get(name, shape)?.to_f32())
    }
}

/// Takes a streamed tensor out (each is read once, so nothing is held twice).
fn take_prepared(p: &Mutex<PreparedTensors>, name: &str, shape: &[usize]) -> Result<WeightData> {
    let mut p = p.lock().map_err(|_| TwinferError::InvalidParameter("a previous load panicked".into()))?;
    let err = |file: &str, reason: String| TwinferError::ModelTensor { file: file.into(), tensor: name.into(), reason };
    let Some((stored, data)) = p.tensors.remove(name) else {
        return Err(err(&p.file, "missing (or read twice)".into()));
    };
    if stored != shape {
        return Err(err(&p.file, format!("shape {stored:?}, expected {shape:?}")));
    }
    Ok(data)
}

fn shard_files(index: &str, shown: &str) -> Result<Vec<String>> {
    let bad = |reason: &str| TwinferError::ModelFile { file: shown.to_string(), reason: reason.to_string() };
    let json: Value = serde_json::from_str(index).map_err(|_| bad("not valid JSON"))?;
    let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no weight_map object"))?;
    let mut files = Vec::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| bad("weight_map values must be file names"))?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(bad("weight_map names a file outside the model folder"));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files)
}

//! A safetensors file converted as it downloads: the header is parsed as soon as it is in, and
//! each tensor is turned into the format it will be computed from the moment its bytes are,
//! without the whole file ever being held. Projections are quantized row by row as the rows
//! arrive, so a browser can load a model whose float file is larger than its memory (a 0.5B
//! model's 1 GB of bf16 as 0.3 GB of 4-bit blocks), the in-situ quantization of
//! [`LlamaModel::quantize`](crate::model::LlamaModel::quantize) done on the way in.

use std::collections::HashMap;
use std::sync::Arc;

use safetensors::Dtype;
use safetensors::tensor::Metadata;

use crate::dtype::DType;
use crate::error::{Result, TwinferError};
use crate::model::source::FileBytes;
use crate::model::weights::WeightData;
use crate::quant::{BLOCK, PackedQuant, QuantFormat};

/// The safetensors crate's bound on a header: larger ones are refused before any is buffered.
const MAX_HEADER: usize = 100_000_000;

/// The suffixes of the projections that in-situ quantization converts (Llama family names).
const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];
const EMBEDDING: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// The format a tensor is kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// As stored (norms, biases, an untied embedding table).
    Stored,
    /// Block-quantized, one row at a time.
    Quantized(QuantFormat),
}

/// Which format each tensor of a decoder ends up in under in-situ quantization to `format`:
/// every projection and an untied LM head in `format`; a tied embedding table, which is also the
/// LM head, in Q8_0 (one copy serves the lookup and the logits, at the precision that llama.cpp
/// gives output matrices); the rest as stored. `LlamaModel::quantize` applies the same rule.
fn target(name: &str, shape: &[usize], format: QuantFormat, tied: bool) -> Target {
    let matrix = shape.len() == 2;
    if matrix && (PROJECTIONS.iter().any(|p| name.ends_with(p)) || name == LM_HEAD) {
        Target::Quantized(format)
    } else if matrix && tied && name == EMBEDDING {
        Target::Quantized(QuantFormat::Q8_0)
    } else {
        Target::Stored
    }
}

/// One tensor of the file, in offset order.
#[derive(Debug)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    bytes: usize,
    target: Target,
}

/// Tensors converted from a streamed safetensors file, by name, each with its shape. Reading
/// one (through the model loader) takes it out, so nothing is held twice.
#[derive(Debug, Default)]
pub struct PreparedTensors {
    pub(crate) file: String,
    pub(crate) tensors: HashMap<String, (Vec<usize>, WeightData)>,
}

impl PreparedTensors {
    /// Bytes held by the converted tensors.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|(_, w)| w.bytes()).sum()
    }
    /// Tensors held.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    /// Whether no tensor is held.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// Adds the tensors of another shard of the same model. A name in both is an error.
    pub fn absorb(&mut self, other: PreparedTensors) -> Result<()> {
        for (name, tensor) in other.tensors {
            if self.tensors.contains_key(&name) {
                let reason = format!("appears in two shards ({} and {})", self.file, other.file);
                return Err(TwinferError::ModelTensor { file: other.file.clone(), tensor: name, reason });
            }
            self.tensors.insert(name, tensor);
        }
        Ok(())
    }
}

/// A `model.safetensors` being received in chunks; see the module docs.
#[derive(Debug)]
pub struct SafetensorsStream {
    file: String,
    format: QuantFormat,
    /// The file's length when the caller knows it (a download's Content-Length): the header must
    /// agree with it, and only then is a tensor's room reserved from what the header says.
    total: Option<u64>,
    /// The 8-byte length and the JSON header, until the header is parsed.
    head: Vec<u8>,
    /// Tensors in file order once the header is parsed; `None` before.
    entries: Option<Vec<Entry>>,
    /// The tensor being received.
    next: usize,
    /// Its bytes received so far: a whole tensor kept as stored, one row of one quantized.
    unit: Vec<u8>,
    /// Rows of the quantized tensor done, and their blocks.
    rows_done: usize,
    blocks: Vec<u8>,
    row_f32: Vec<f32>,
    done: PreparedTensors,
}

impl SafetensorsStream {
    /// A stream for the file shown as `file` in errors, quantizing projections to `format`;
    /// `total` is the file's length when known. With it, a header that announces more (or fewer)
    /// bytes than the file has is refused before anything is reserved for them; without it, the
    /// buffers grow with the bytes as they arrive, so a lying header cannot claim memory either.
    pub fn new(file: &str, format: QuantFormat, total: Option<u64>) -> Result<Self> {
        if !format.can_quantize() {
            return Err(TwinferError::InvalidParameter(format!(
                "quantizing into {} is not supported (q8_0, q4_0, q4_1, q5_0 or q5_1)",
                format.name()
            )));
        }
        Ok(Self {
            file: file.to_string(),
            format,
            total,
            head: Vec::new(),
            entries: None,
            next: 0,
            unit: Vec::new(),
            rows_done: 0,
            blocks: Vec::new(),
            row_f32: Vec::new(),
            done: PreparedTensors { file: file.to_string(), tensors: HashMap::new() },
        })
    }

    /// Bytes held now: the converted tensors and the partial one.
    pub fn held_bytes(&self) -> usize {
        self.done.bytes() + self.unit.capacity() + self.blocks.capacity() + self.head.capacity()
    }

    /// Takes the next chunk of the file.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<()> {
        while !chunk.is_empty() {
            if self.entries.is_none() {
                let taken = self.take_header(chunk)?;
                chunk = &chunk[taken..];
                continue;
            }
            let Some(need) = self.unit_bytes().map(|n| n - self.unit.len()) else {
                return Err(self.file_error(format!("{} bytes after the last tensor", chunk.len())));
            };
            let take = need.min(chunk.len());
            self.unit.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            self.complete_units()?;
        }
        Ok(())
    }

    /// The converted tensors, once every byte the header announced has arrived.
    pub fn finish(mut self) -> Result<PreparedTensors> {
        let Some(entries) = &self.entries else {
            return Err(self.file_error("the file ended inside its header".into()));
        };
        if let Some(e) = entries.get(self.next) {
            let reason = format!("the file ended inside this tensor ({} of {} bytes)", self.received(), e.bytes);
            return Err(TwinferError::ModelTensor { file: self.file.clone(), tensor: e.name.clone(), reason });
        }
        Ok(std::mem::take(&mut self.done))
    }

    fn file_error(&self, reason: String) -> TwinferError {
        TwinferError::ModelFile { file: self.file.clone(), reason }
    }

    /// Bytes of the current tensor received so far (for the truncation message).
    fn received(&self) -> usize {
        let Some(e) = self.entries.as_ref().and_then(|es| es.get(self.next)) else { return 0 };
        match e.target {
            Target::Stored => self.unit.len(),
            Target::Quantized(_) => self.rows_done * e.shape[1] * e.dtype.size() + self.unit.len(),
        }
    }

    /// Buffers header bytes from `chunk`; parses the header once it is complete. Returns the
    /// bytes of `chunk` consumed.
    fn take_header(&mut self, chunk: &[u8]) -> Result<usize> {
        let take = (self.header_want()? - self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..take]);
        if self.head.len() >= 8 && self.head.len() == self.header_want()? {
            self.parse_header()?;
        }
        Ok(take)
    }

    /// Header bytes to buffer: the 8-byte length, then the JSON it announces.
    fn header_want(&self) -> Result<usize> {
        if self.head.len() < 8 {
            return Ok(8);
        }
        let n = u64::from_le_bytes(self.head[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER as u64 {
            return Err(self.file_error(format!("a header of {n} bytes (at most {MAX_HEADER})")));
        }
        Ok(8 + n as usize)
    }

    fn parse_header(&mut self) -> Result<()> {
        let metadata: Metadata = serde_json::from_slice(&self.head[8..])
            .map_err(|e| self.file_error(format!("not a valid safetensors header: {e}")))?;
        if let Some(total) = self.total {
            let announced = self.head.len() as u64 + metadata.data_len() as u64;
            if announced != total {
                return Err(
                    self.file_error(format!("the header announces {announced} bytes in all, but the file has {total}"))
                );
            }
        }
        let names = metadata.offset_keys();
        let tied = !names.iter().any(|n| n == LM_HEAD);
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let info = metadata.info(&name).expect("a name the header lists");
            let err =
                |reason: String| TwinferError::ModelTensor { file: self.file.clone(), tensor: name.clone(), reason };
            let dtype = match info.dtype {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                other => return Err(err(format!("dtype {other:?} is not supported (F32, F16, BF16)"))),
            };
            let mut target = target(&name, &info.shape, self.format, tied);
            if let Target::Quantized(_) = target
                && !info.shape[1].is_multiple_of(BLOCK)
            {
                return Err(err(format!(
                    "{} inputs are not whole blocks of {BLOCK}, so it cannot be quantized",
                    info.shape[1]
                )));
            }
            if info.shape.contains(&0) {
                target = Target::Stored;
            }
            let bytes = info.data_offsets.1 - info.data_offsets.0;
            entries.push(Entry { name, shape: info.shape.clone(), dtype, bytes, target });
        }
        self.head = Vec::new();
        self.entries = Some(entries);
        self.start_tensor()?;
        self.complete_units()
    }

    /// Bytes of the unit now being received: the whole tensor, or one row; `None` past the end.
    fn unit_bytes(&self) -> Option<usize> {
        let e = self.entries.as_ref()?.get(self.next)?;
        Some(match e.target {
            Target::Stored => e.bytes,
            Target::Quantized(_) => e.shape[1] * e.dtype.size(),
        })
    }

    /// Room for the tensor now starting, reserved up front so that a model too large for memory
    /// fails with a typed error at its first tensor that does not fit.
    fn start_tensor(&mut self) -> Result<()> {
        let Some(e) = self.entries.as_ref().and_then(|es| es.get(self.next)) else { return Ok(()) };
        let too_large = |what: usize| TwinferError::OverLimit {
            what: "memory for a streamed tensor",
            requested: what as u64,
            limit: (isize::MAX as u64).min(usize::MAX as u64),
        };
        self.unit = Vec::new();
        self.rows_done = 0;
        self.blocks = Vec::new();
        if self.total.is_none() {
            // Sizes from a header nothing has confirmed: grow with the data instead.
            return Ok(());
        }
        match e.target {
            Target::Stored => self.unit.try_reserve_exact(e.bytes).map_err(|_| too_large(e.bytes))?,
            Target::Quantized(format) => {
                let bytes = e.shape[0] * format.row_bytes(e.shape[1]);
                self.blocks.try_reserve_exact(bytes).map_err(|_| too_large(bytes))?;
                self.unit.try_reserve_exact(e.shape[1] * e.dtype.size()).map_err(|_| too_large(e.bytes))?;
            }
        }
        Ok(())
    }

    /// Converts every unit that is complete (zero-byte tensors complete at once).
    fn complete_units(&mut self) -> Result<()> {
        while let Some(need) = self.unit_bytes() {
            if self.unit.len() < need {
                return Ok(());
            }
            let e = &self.entries.as_ref().expect("parsed")[self.next];
            match e.target {
                Target::Stored => {
                    let bytes = Arc::new(FileBytes::Owned(std::mem::take(&mut self.unit)));
                    let w = WeightData::from_file(&bytes, 0..e.bytes, e.dtype);
                    // A tensor read in place keeps its bytes alive; a copied one let them go.
                    self.done.tensors.insert(e.name.clone(), (e.shape.clone(), w));
                    self.next += 1;
                    self.start_tensor()?;
                }
                Target::Quantized(format) => {
                    // A row's floats, sized once its bytes are in (never from the header alone).
                    self.row_f32.resize(e.shape[1], 0.0);
                    widen(&self.unit, e.dtype, &mut self.row_f32);
                    if let Some(x) = self.row_f32.iter().find(|x| !x.is_finite()) {
                        let reason = format!("row {} holds {x}: only finite weights can be quantized", self.rows_done);
                        return Err(TwinferError::ModelTensor {
                            file: self.file.clone(),
                            tensor: e.name.clone(),
                            reason,
                        });
                    }
                    format.quantize_row(&self.row_f32, &mut self.blocks);
                    self.unit.clear();
                    self.rows_done += 1;
                    if self.rows_done == e.shape[0] {
                        let (n, k) = (e.shape[0], e.shape[1]);
                        let packed = PackedQuant::from_row_bytes(format, n, k, &std::mem::take(&mut self.blocks))
                            .map_err(|err| TwinferError::ModelTensor {
                                file: self.file.clone(),
                                tensor: e.name.clone(),
                                reason: err.to_string(),
                            })?;
                        self.done.tensors.insert(e.name.clone(), (e.shape.clone(), WeightData::Quant(packed)));
                        self.next += 1;
                        self.start_tensor()?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Little-endian `dtype` values to f32.
fn widen(bytes: &[u8], dtype: DType, out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            out.iter_mut().zip(bytes.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes(b.try_into().unwrap()))
        }
        DType::F16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        DType::BF16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        DType::Q8 => unreachable!("file tensors are f32, f16 or bf16"),
    }
}

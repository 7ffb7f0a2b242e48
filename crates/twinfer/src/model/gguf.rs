//! A GGUF reader (versions 2 and 3): the header, the metadata key/values and the tensor table,
//! over a memory-mapped file. Every count, length, offset and size is checked against the file
//! before it is used, so a malformed file gives a typed error naming what is wrong (and the
//! tensor, where there is one) and nothing is ever read outside the bytes.
//!
//! Layout (llama.cpp's `gguf.h`): magic `GGUF`, `u32` version, `u64` tensor count, `u64` key
//! count; each key is a string (`u64` length + UTF-8) with a `u32` value type and its value;
//! each tensor is a name, `u32` dimension count, `u64` dimensions (innermost first), `u32` ggml
//! type and a `u64` offset into the data section, which starts at the next multiple of
//! `general.alignment` (32 by default) after the table. All little-endian.

use std::collections::HashMap;
use std::sync::Arc;

use super::gguf_cursor::Cursor;
use crate::error::{Result, TwinferError};
use crate::model::source::FileBytes;
use crate::quant::QuantFormat;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type (`u8` to `u64`).
    Uint(u64),
    /// Any signed integer type (`i8` to `i64`).
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values (arrays of arrays are read two levels deep at most).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as `u64`: unsigned integers, and signed ones that are not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::Uint(v) => Some(v),
            Self::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as `f64`: floats and integers.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::Float(v) => Some(v),
            Self::Uint(v) => Some(v as f64),
            Self::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    /// The string, when the value is one.
    pub fn as_str(&self) -> Option<&str> {
        if let Self::String(s) = self { Some(s) } else { None }
    }
    /// The boolean, when the value is one.
    pub fn as_bool(&self) -> Option<bool> {
        if let Self::Bool(b) = *self { Some(b) } else { None }
    }
    /// The elements, when the value is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        if let Self::Array(a) = self { Some(a) } else { None }
    }
}

/// How a tensor's elements are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// 16-bit IEEE half floats.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of a quantized format.
    Quant(QuantFormat),
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Quant(QuantFormat::Q4_0),
            3 => Self::Quant(QuantFormat::Q4_1),
            6 => Self::Quant(QuantFormat::Q5_0),
            7 => Self::Quant(QuantFormat::Q5_1),
            8 => Self::Quant(QuantFormat::Q8_0),
            12 => Self::Quant(QuantFormat::Q4_K),
            13 => Self::Quant(QuantFormat::Q5_K),
            14 => Self::Quant(QuantFormat::Q6_K),
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Quant(q) => (q.block_weights(), q.block_bytes()),
        }
    }
}

/// The ggml type names of ids twinfer does not read, for error messages.
fn unsupported_type_name(id: u32) -> String {
    let name = match id {
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        _ => return format!("ggml type {id}"),
    };
    format!("{name} (ggml type {id})")
}

/// One tensor of the table.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Dimensions, innermost first (`[k, n]` for an `n x k` matrix).
    pub dims: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte range in the file.
    pub start: usize,
    /// Length of the byte range, in bytes.
    pub len: usize,
}

/// A parsed GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    /// The file's name, for errors.
    pub file: String,
    /// GGUF version: 2 or 3.
    pub version: u32,
    bytes: Arc<FileBytes>,
    /// Bytes before the data section: the header, metadata and tensor table.
    header_len: usize,
    metadata: HashMap<String, MetaValue>,
    tensors: HashMap<String, GgufTensor>,
}

const MAGIC: &[u8; 4] = b"GGUF";
/// Arrays of arrays are legal GGUF, but no model uses more than one level; deeper nesting is
/// refused so a hostile file cannot recurse without bound.
pub(super) const MAX_ARRAY_DEPTH: usize = 2;
const MAX_DIMS: usize = 4;

/// Two tensors whose bytes overlap are refused: no writer produces them, and releasing one's
/// pages after packing ([`GgufFile::release`]) would pull the other's data away.
fn check_no_overlap(tensors: &HashMap<String, GgufTensor>, file: &str) -> Result<()> {
    let mut spans: Vec<(usize, usize, &str)> =
        tensors.iter().filter(|(_, t)| t.len > 0).map(|(n, t)| (t.start, t.start + t.len, n.as_str())).collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(TwinferError::ModelTensor {
                file: file.into(),
                tensor: second.into(),
                reason: format!("its data overlaps tensor {first:?}'s"),
            });
        }
    }
    Ok(())
}

impl GgufFile {
    /// Parses the header and tables of `bytes`; `file` names it in errors.
    pub fn parse(bytes: FileBytes, file: &str) -> Result<Self> {
        let mut r = Cursor { bytes: &bytes, at: 0, file };
        if r.take(4)? != MAGIC {
            return Err(r.bad("not a GGUF file (the magic is not \"GGUF\")".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let tensor_count = r.count("tensor count", 8 + 4 + 8 + 4 + 8)?;
        let kv_count = r.count("metadata count", 8 + 4)?;
        let mut metadata = HashMap::with_capacity(kv_count);
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| match e {
                TwinferError::ModelFile { reason, .. } => r.bad(format!("metadata {key:?}: {reason}")),
                other => other,
            })?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.bad(format!("metadata key {key:?} appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => return Err(r.bad(format!("general.alignment {v:?} is not a power of two up to 65536"))),
            },
        };
        let mut table = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let bad = |reason: String| TwinferError::ModelTensor { file: file.into(), tensor: name.clone(), reason };
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(format!("{n_dims} dimensions (1 to {MAX_DIMS} are valid)")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64()?;
                dims.push(usize::try_from(d).map_err(|_| bad(format!("dimension {d} is too large")))?);
            }
            let type_id = r.u32()?;
            let ty = GgmlType::from_id(type_id)
                .ok_or_else(|| bad(format!("{} is not supported", unsupported_type_name(type_id))))?;
            let offset = r.u64()?;
            table.push((name, dims, ty, offset));
        }
        let data_start = r.at.div_ceil(alignment) * alignment;
        let mut tensors = HashMap::with_capacity(table.len());
        for (name, dims, ty, offset) in table {
            let bad = |reason: String| TwinferError::ModelTensor { file: file.into(), tensor: name.clone(), reason };
            let elements = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad("too many elements".into()))?;
            let (per_block, block_bytes) = ty.block();
            if !dims[0].is_multiple_of(per_block) {
                return Err(bad(format!("rows of {} elements are not whole blocks of {per_block}", dims[0])));
            }
            let len = (elements / per_block).checked_mul(block_bytes).ok_or_else(|| bad("too large".into()))?;
            if !offset.is_multiple_of(alignment as u64) {
                return Err(bad(format!("offset {offset} is not aligned to {alignment}")));
            }
            let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
            let end = start.and_then(|s| s.checked_add(len));
            let (Some(start), Some(end)) = (start, end) else { return Err(bad("offset out of range".into())) };
            if end > bytes.len() {
                return Err(bad(format!(
                    "data at bytes {start}..{end} runs past the end of the file ({} bytes): truncated?",
                    bytes.len()
                )));
            }
            if tensors.insert(name.clone(), GgufTensor { dims, ty, start, len }).is_some() {
                return Err(bad("appears twice in the tensor table".into()));
            }
        }
        check_no_overlap(&tensors, file)?;
        Ok(Self { file: file.into(), version, bytes: Arc::new(bytes), header_len: data_start, metadata, tensors })
    }

    /// The metadata value under `key` (such as `general.architecture`).
    pub fn metadata(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The table entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.get(name)
    }

    /// Names of all tensors, in no particular order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The bytes of a tensor of the table.
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        &self.bytes[t.start..t.start + t.len]
    }

    /// The whole file, shared with the tensors read in place from it.
    pub(crate) fn shared_bytes(&self) -> &Arc<FileBytes> {
        &self.bytes
    }

    /// Frees the tokenizer's metadata (tens of thousands of token and merge strings) once the
    /// tokenizer is built, so it does not stay in memory while the weights load.
    pub fn drop_tokenizer_metadata(&mut self) {
        self.metadata.retain(|k, _| !k.starts_with("tokenizer.ggml."));
        self.metadata.shrink_to_fit();
        // Everything parsed from the header is held as values now.
        self.bytes.release(0, self.header_len.min(self.bytes.len()));
    }

    /// Drops the tensor's pages from resident memory once its bytes have been copied out.
    pub fn release(&self, t: &GgufTensor) {
        self.bytes.release(t.start, t.len);
    }

    fn bad(&self, reason: String) -> TwinferError {
        TwinferError::ModelFile { file: self.file.clone(), reason }
    }

    /// A required metadata value, read by `get`.
    pub fn require<T>(&self, key: &str, what: &str, get: impl Fn(&MetaValue) -> Option<T>) -> Result<T> {
        match self.metadata(key) {
            None => Err(self.bad(format!("metadata {key:?} is missing"))),
            Some(v) => get(v).ok_or_else(|| self.bad(format!("metadata {key:?} is not {what}"))),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a small GGUF file: metadata and tensors with their data (test builder).
    pub(crate) struct Builder {
        kv: Vec<u8>,
        kv_count: u64,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
        offsets: Option<Vec<u64>>,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Self { kv: Vec::new(), kv_count: 0, tensors: Vec::new(), offsets: None }
        }
        /// Writes these offsets into the tensor table instead of the packed ones.
        pub(crate) fn offsets(mut self, offsets: &[u64]) -> Self {
            self.offsets = Some(offsets.to_vec());
            self
        }
        fn key(&mut self, key: &str, ty: u32) {
            self.kv.extend_from_slice(&(key.len() as u64).to_le_bytes());
            self.kv.extend_from_slice(key.as_bytes());
            self.kv.extend_from_slice(&ty.to_le_bytes());
            self.kv_count += 1;
        }
        pub(crate) fn u32(mut self, key: &str, v: u32) -> Self {
            self.key(key, 4);
            self.kv.extend_from_slice(&v.to_le_bytes());
            self
        }
        pub(crate) fn f32(mut self, key: &str, v: f32) -> Self {
            self.key(key, 6);
            self.kv.extend_from_slice(&v.to_le_bytes());
            self
        }
        pub(crate) fn string(mut self, key: &str, v: &str) -> Self {
            self.key(key, 8);
            self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
            self.kv.extend_from_slice(v.as_bytes());
            self
        }
        pub(crate) fn strings(mut self, key: &str, v: &[&str]) -> Self {
            self.key(key, 9);
            self.kv.extend_from_slice(&8u32.to_le_bytes());
            self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for s in v {
                self.kv.extend_from_slice(&(s.len() as u64).to_le_bytes());
                self.kv.extend_from_slice(s.as_bytes());
            }
            self
        }
        pub(crate) fn i32s(mut self, key: &str, v: &[i32]) -> Self {
            self.key(key, 9);
            self.kv.extend_from_slice(&5u32.to_le_bytes());
            self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| self.kv.extend_from_slice(&x.to_le_bytes()));
            self
        }
        pub(crate) fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
            self.tensors.push((name.into(), dims.to_vec(), ty, data));
            self
        }
        pub(crate) fn build(self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&self.kv_count.to_le_bytes());
            out.extend_from_slice(&self.kv);
            let mut offset = 0u64;
            for (i, (name, dims, ty, data)) in self.tensors.iter().enumerate() {
                out.extend_from_slice(&(name.len() as u64).to_le_bytes());
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
                out.extend_from_slice(&ty.to_le_bytes());
                let written = self.offsets.as_ref().map_or(offset, |o| o[i]);
                out.extend_from_slice(&written.to_le_bytes());
                offset += (data.len() as u64).div_ceil(32) * 32;
            }
            out.resize(out.len().div_ceil(32) * 32, 0);
            for (i, (_, _, _, data)) in self.tensors.iter().enumerate() {
                out.extend_from_slice(data);
                // The file ends with the last tensor's data: any cut reaches into something.
                if i + 1 < self.tensors.len() {
                    out.resize(out.len().div_ceil(32) * 32, 0);
                }
            }
            out
        }
    }

    fn sample() -> Vec<u8> {
        Builder::new()
            .string("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .f32("llama.rope.freq_base", 10000.0)
            .strings("tokenizer.ggml.tokens", &["a", "b", "ab"])
            .i32s("tokenizer.ggml.token_type", &[1, 1, 1])
            .tensor("w", &[32, 2], 8, vec![0; 2 * 34])
            .tensor("n", &[4], 0, 1f32.to_le_bytes().repeat(4))
            .build()
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let g = GgufFile::parse(FileBytes::Owned(sample()), "t.gguf").unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.metadata("general.architecture").and_then(MetaValue::as_str), Some("llama"));
        assert_eq!(g.metadata("llama.block_count").and_then(MetaValue::as_u64), Some(2));
        assert_eq!(g.metadata("tokenizer.ggml.tokens").and_then(MetaValue::as_array).map(<[_]>::len), Some(3));
        let w = g.tensor("w").unwrap();
        assert_eq!((w.dims.clone(), w.ty, w.len), (vec![32, 2], GgmlType::Quant(QuantFormat::Q8_0), 68));
        let n = g.tensor("n").unwrap();
        assert_eq!(g.data(n), &1f32.to_le_bytes().repeat(4)[..]);
    }

    /// Every truncation and many single-byte corruptions give an error or a valid file, never a
    /// panic, and every tensor range stays inside the bytes.
    #[test]
    fn truncated_and_corrupted_files_are_errors_not_panics() {
        let good = sample();
        for len in 0..good.len() {
            let r = GgufFile::parse(FileBytes::Owned(good[..len].to_vec()), "t.gguf");
            // The data section is the tail: cutting into it must still be caught.
            assert!(r.is_err(), "a file cut to {len} of {} bytes parsed", good.len());
        }
        let mut state = 0x9E37_79B9u32;
        for _ in 0..4000 {
            let mut bad = good.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let i = state as usize % bad.len();
                bad[i] = (state >> 8) as u8;
            }
            if let Ok(g) = GgufFile::parse(FileBytes::Owned(bad.clone()), "t.gguf") {
                for name in g.tensor_names() {
                    let t = g.tensor(name).unwrap();
                    assert!(t.start + t.len <= bad.len());
                }
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |bytes: Vec<u8>| GgufFile::parse(FileBytes::Owned(bytes), "t.gguf").unwrap_err().to_string();
        let mut v1 = sample();
        v1[4] = 1;
        assert!(err(v1).contains("version 1"), "version");
        assert!(err(b"GGML0000".to_vec()).contains("magic"));
        let q2k = Builder::new().tensor("blk.0.attn_q.weight", &[256, 1], 10, vec![0; 84]).build();
        let e = err(q2k);
        assert!(e.contains("Q2_K") && e.contains("blk.0.attn_q.weight"), "{e}");
        let ragged = Builder::new().tensor("w", &[33, 1], 8, vec![0; 68]).build();
        assert!(err(ragged).contains("whole blocks"));
        // K-quant rows are whole blocks of 256.
        let ragged = Builder::new().tensor("w", &[128, 1], 14, vec![0; 105]).build();
        assert!(err(ragged).contains("whole blocks of 256"));
        let q6k = Builder::new().tensor("w", &[256, 2], 14, vec![0; 420]).build();
        let g = GgufFile::parse(FileBytes::Owned(q6k), "t.gguf").unwrap();
        assert_eq!(g.tensor("w").unwrap().len, 420);
        let mut huge = Builder::new().build();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(huge).contains("cannot fit"));
    }

    /// Hostile files: each is a typed error naming the problem, found before anything the size of
    /// a claimed shape or count is allocated (the reader only allocates per item it has read, and
    /// counts are checked against the bytes left).
    #[test]
    fn crafted_files_are_typed_errors() {
        let err = |bytes: Vec<u8>| match GgufFile::parse(FileBytes::Owned(bytes), "t.gguf") {
            Err(e @ (TwinferError::ModelFile { .. } | TwinferError::ModelTensor { .. })) => e.to_string(),
            other => panic!("not a typed file error: {other:?}"),
        };
        let f32s = |n: usize| 1f32.to_le_bytes().repeat(n);
        // Shapes whose element count overflows, or that claim far more bytes than the file has.
        let e = err(Builder::new().tensor("w", &[1 << 32, 1 << 32, 1 << 32], 0, f32s(4)).build());
        assert!(e.contains("too many elements"), "{e}");
        let e = err(Builder::new().tensor("w", &[1 << 30, 1 << 10], 0, f32s(4)).build());
        assert!(e.contains("past the end"), "{e}");
        // Offsets past the end, unaligned, or making two tensors share bytes.
        let two = || Builder::new().tensor("a", &[8], 0, f32s(8)).tensor("b", &[8], 0, f32s(8));
        assert!(err(two().offsets(&[0, 1 << 40]).build()).contains("past the end"));
        assert!(err(two().offsets(&[0, u64::MAX - 31]).build()).contains("out of range"));
        assert!(err(two().offsets(&[0, 4]).build()).contains("not aligned"));
        let e = err(two().offsets(&[0, 0]).build());
        assert!(e.contains("overlaps"), "{e}");
        // Names: twice, or not UTF-8.
        let e = err(Builder::new().tensor("w", &[8], 0, f32s(8)).tensor("w", &[8], 0, f32s(8)).build());
        assert!(e.contains("twice"), "{e}");
        let mut bytes = Builder::new().tensor("w", &[8], 0, f32s(8)).build();
        let at = bytes.windows(1).position(|w| w == b"w").unwrap();
        bytes[at] = 0xff;
        assert!(err(bytes).contains("not UTF-8"));
        // Counts and lengths far beyond the file: refused before allocating for them.
        let mut bytes = Builder::new().build();
        bytes[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(err(bytes).contains("cannot fit"));
        let mut bytes = Builder::new().string("k", "v").build();
        bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        err(bytes);
        let mut bytes = Builder::new().strings("k", &["a"]).build();
        let count_at = 24 + 8 + 1 + 4 + 4;
        bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 61).to_le_bytes());
        err(bytes);
    }
}

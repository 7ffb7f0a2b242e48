//! A model folder's files in wasm memory, written chunk by chunk as they download, so the page
//! never holds a second full copy of the weights: each chunk is copied in and can be dropped.
//! With `quantizeTo`, safetensors files are not held at all: each tensor is converted as its
//! bytes arrive (`SafetensorsStream`), so a model larger than wasm memory in float loads in its
//! quantized size.

use std::collections::HashMap;

use twinfer::model::{ModelSource, PreparedTensors, SafetensorsStream};
use twinfer::quant::QuantFormat;
use wasm_bindgen::prelude::*;

use crate::errors::{js_error, to_js_error};

/// Files by name (`config.json`, `tokenizer.json`, `model.safetensors`, shards, ...).
#[wasm_bindgen]
#[derive(Debug, Default)]
pub struct ModelFiles {
    files: HashMap<String, Vec<u8>>,
    /// In-situ quantization of float safetensors, as they stream in.
    quantize: Option<QuantFormat>,
    /// Safetensors files being converted, by name.
    streams: HashMap<String, SafetensorsStream>,
}

#[wasm_bindgen]
impl ModelFiles {
    /// No files yet.
    #[wasm_bindgen(constructor)]
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts (or restarts) the file `name`. `size` is its length when known (else 0): the room
    /// is reserved now, so a model that cannot fit wasm memory fails here with `OverLimit` rather
    /// than halfway through the download.
    pub fn begin(&mut self, name: &str, size: f64) -> Result<(), js_sys::Error> {
        if let Some(format) = self.quantize.filter(|_| name.ends_with(".safetensors")) {
            // A download's length, when known, is checked against the header before anything is
            // reserved for the tensors it announces.
            let total = (size > 0.0 && size.is_finite()).then_some(size as u64);
            let stream = SafetensorsStream::new(name, format, total).map_err(to_js_error)?;
            self.files.remove(name);
            self.streams.insert(name.to_string(), stream);
            return Ok(());
        }
        self.streams.remove(name);
        let mut bytes = Vec::new();
        if size > 0.0 {
            reserve(&mut bytes, size, name)?;
        }
        self.files.insert(name.to_string(), bytes);
        Ok(())
    }

    /// Appends one downloaded chunk to `name` (started with `begin`).
    pub fn append(&mut self, name: &str, chunk: &[u8]) -> Result<(), js_sys::Error> {
        if let Some(stream) = self.streams.get_mut(name) {
            return stream.push(chunk).map_err(to_js_error);
        }
        let Some(bytes) = self.files.get_mut(name) else {
            return Err(js_error("InvalidParameter", &format!("append to {name:?} before begin")));
        };
        if bytes.capacity() - bytes.len() < chunk.len() {
            reserve(bytes, (bytes.len() + chunk.len()) as f64, name)?;
        }
        bytes.extend_from_slice(chunk);
        Ok(())
    }

    /// Converts float safetensors files begun from now on to `format` (`q8_0`, `q4_0`, `q4_1`,
    /// `q5_0` or `q5_1`) as they stream in, instead of holding them.
    #[wasm_bindgen(js_name = quantizeTo)]
    pub fn quantize_to(&mut self, format: &str) -> Result<(), js_sys::Error> {
        let format = QuantFormat::parse(format).map_err(to_js_error)?;
        if !format.can_quantize() {
            return Err(js_error("InvalidParameter", &format!("quantize: {format:?} is read from GGUF files only")));
        }
        self.quantize = Some(format);
        Ok(())
    }

    /// Whether the file `name` was begun.
    pub fn has(&self, name: &str) -> bool {
        self.files.contains_key(name) || self.streams.contains_key(name)
    }

    /// The names held so far.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.keys().chain(self.streams.keys()).cloned().collect();
        names.sort();
        names
    }

    /// Bytes held in all files.
    #[wasm_bindgen(getter, js_name = totalBytes)]
    pub fn total_bytes(&self) -> f64 {
        let streamed: usize = self.streams.values().map(SafetensorsStream::held_bytes).sum();
        self.files.values().map(|f| f.len() as f64).sum::<f64>() + streamed as f64
    }
}

impl ModelFiles {
    /// Hands the files over to the loader (which frees each one once it is converted), with the
    /// tensors of the streamed safetensors files when there were any.
    pub(crate) fn take_source(&mut self) -> twinfer::Result<(ModelSource, Option<PreparedTensors>)> {
        let mut prepared: Option<PreparedTensors> = None;
        let mut streams: Vec<_> = std::mem::take(&mut self.streams).into_iter().collect();
        streams.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, stream) in streams {
            let tensors = stream.finish()?;
            match &mut prepared {
                None => prepared = Some(tensors),
                Some(all) => all.absorb(tensors)?,
            }
        }
        Ok((ModelSource::Files(std::mem::take(&mut self.files)), prepared))
    }
}

/// Grows `bytes` to hold `total` bytes, or says the model is too large for wasm memory.
fn reserve(bytes: &mut Vec<u8>, total: f64, name: &str) -> Result<(), js_sys::Error> {
    // One wasm32 allocation is at most isize::MAX bytes (2 GiB), and the 4 GiB address space
    // also holds the converted weights.
    let too_large = || {
        js_error(
            "OverLimit",
            &format!("{name} needs {:.0} MB, more than this WebAssembly memory can hold", total / 1e6),
        )
    };
    if !(total.is_finite() && total >= 0.0 && total < isize::MAX as f64) {
        return Err(too_large());
    }
    let extra = (total as usize).saturating_sub(bytes.len());
    bytes.try_reserve_exact(extra).map_err(|_| too_large())
}

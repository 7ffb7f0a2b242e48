//! A model folder's files in wasm memory, written chunk by chunk as they download, so the page
//! never holds a second full copy of the weights: each chunk is copied in and can be dropped.

use std::collections::HashMap;

use twinfer::model::ModelSource;
use wasm_bindgen::prelude::*;

use crate::errors::js_error;

/// Files by name (`config.json`, `tokenizer.json`, `model.safetensors`, shards, ...).
#[wasm_bindgen]
#[derive(Debug, Default)]
pub struct ModelFiles {
    files: HashMap<String, Vec<u8>>,
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
        let mut bytes = Vec::new();
        if size > 0.0 {
            reserve(&mut bytes, size, name)?;
        }
        self.files.insert(name.to_string(), bytes);
        Ok(())
    }

    /// Appends one downloaded chunk to `name` (started with `begin`).
    pub fn append(&mut self, name: &str, chunk: &[u8]) -> Result<(), js_sys::Error> {
        let Some(bytes) = self.files.get_mut(name) else {
            return Err(js_error("InvalidParameter", &format!("append to {name:?} before begin")));
        };
        if bytes.capacity() - bytes.len() < chunk.len() {
            reserve(bytes, (bytes.len() + chunk.len()) as f64, name)?;
        }
        bytes.extend_from_slice(chunk);
        Ok(())
    }

    /// Whether the file `name` was begun.
    pub fn has(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    /// The names held so far.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.keys().cloned().collect();
        names.sort();
        names
    }

    /// Bytes held in all files.
    #[wasm_bindgen(getter, js_name = totalBytes)]
    pub fn total_bytes(&self) -> f64 {
        self.files.values().map(|f| f.len() as f64).sum()
    }
}

impl ModelFiles {
    /// Hands the files over to the loader (which frees each one once it is converted).
    pub(crate) fn take_source(&mut self) -> ModelSource {
        ModelSource::Files(std::mem::take(&mut self.files))
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

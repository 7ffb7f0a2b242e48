//! Where a model's files come from: a folder on disk (memory-mapped) or files handed over in
//! memory (a browser's downloads or drag-and-drop).

use std::collections::HashMap;
use std::ops::Deref;
use std::path::PathBuf;

use crate::error::{Result, TwinferError};

/// The bytes of one file.
#[derive(Debug)]
pub enum FileBytes {
    Owned(Vec<u8>),
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Owned(v) => v,
            #[cfg(not(target_arch = "wasm32"))]
            FileBytes::Mapped(m) => m,
        }
    }
}

/// A model folder's files, by name (`config.json`, `model.safetensors`, `tokenizer.json`, ...).
#[derive(Debug)]
pub enum ModelSource {
    Dir(PathBuf),
    Files(HashMap<String, Vec<u8>>),
}

impl ModelSource {
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        Self::Dir(path.into())
    }

    /// A name for error messages: the path on disk, or the bare file name.
    pub fn display(&self, name: &str) -> String {
        match self {
            Self::Dir(dir) => dir.join(name).display().to_string(),
            Self::Files(_) => name.to_string(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Self::Dir(dir) => dir.join(name).is_file(),
            Self::Files(files) => files.contains_key(name),
        }
    }

    /// The file's bytes; a large file on disk is memory-mapped rather than read.
    pub fn read(&mut self, name: &str) -> Result<FileBytes> {
        let missing = |path: String| TwinferError::Io { path, reason: "no such file in the model folder".into() };
        match self {
            Self::Files(files) => files.remove(name).map(FileBytes::Owned).ok_or_else(|| missing(name.to_string())),
            #[cfg(not(target_arch = "wasm32"))]
            Self::Dir(dir) => {
                let path = dir.join(name);
                let io =
                    |e: std::io::Error| TwinferError::Io { path: path.display().to_string(), reason: e.to_string() };
                let file = std::fs::File::open(&path).map_err(io)?;
                if file.metadata().map_err(io)?.len() < 1 << 20 {
                    return std::fs::read(&path).map(FileBytes::Owned).map_err(io);
                }
                // SAFETY: the map is read-only; a model file changed underneath a running process
                // is outside what any loader can defend against (every peer maps the same way).
                unsafe { memmap2::Mmap::map(&file) }.map(FileBytes::Mapped).map_err(io)
            }
            #[cfg(target_arch = "wasm32")]
            Self::Dir(dir) => Err(missing(dir.join(name).display().to_string())),
        }
    }

    pub fn read_text(&mut self, name: &str) -> Result<String> {
        let shown = self.display(name);
        let bytes = self.read(name)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| TwinferError::ModelFile { file: shown, reason: "not UTF-8".into() })
    }
}

//! Where a model's files come from: a folder on disk (memory-mapped) or files handed over in
//! memory (a browser's downloads or drag-and-drop).

use std::collections::HashMap;
use std::ops::Deref;
use std::path::PathBuf;

use crate::error::{Result, TwinferError};

/// The bytes of one file.
#[derive(Debug)]
pub enum FileBytes {
    /// Read into memory.
    Owned(Vec<u8>),
    /// Memory-mapped from disk (files of 1 MiB or more).
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

impl FileBytes {
    /// Lets the OS drop the resident pages of `start..start + len` of a mapped file (they are
    /// read from the file again if touched): a loader that has copied a tensor out keeps its peak
    /// memory near the model's size instead of the model plus the whole file. A no-op for bytes
    /// held in memory.
    pub fn release(&self, start: usize, len: usize) {
        #[cfg(all(unix, not(target_arch = "wasm32")))]
        if let FileBytes::Mapped(m) = self {
            // SAFETY: a read-only private mapping of a file: dropped pages hold file contents and
            // fault back in unchanged, so no view of them ever sees different bytes.
            let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
        }
        let _ = (start, len);
    }
}

/// A model folder's files, by name (`config.json`, `model.safetensors`, `tokenizer.json`, ...),
/// or a single GGUF file.
#[derive(Debug)]
pub enum ModelSource {
    /// A folder on disk.
    Dir(PathBuf),
    /// Files in memory, by name; reading one takes it out of the map.
    Files(HashMap<String, Vec<u8>>),
    /// One file on disk (a `.gguf`), known by its file name.
    File(PathBuf),
}

impl ModelSource {
    /// A folder, or a single model file when `path` is a file.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        if path.is_file() { Self::File(path) } else { Self::Dir(path) }
    }

    /// A name for error messages: the path on disk, or the bare file name.
    pub fn display(&self, name: &str) -> String {
        match self {
            Self::Dir(dir) => dir.join(name).display().to_string(),
            Self::File(path) if Self::is_named(path, name) => path.display().to_string(),
            Self::File(path) => path.with_file_name(name).display().to_string(),
            Self::Files(_) => name.to_string(),
        }
    }

    fn is_named(path: &std::path::Path, name: &str) -> bool {
        path.file_name().is_some_and(|f| f == name)
    }

    /// Whether the source has a file of this name.
    pub fn has(&self, name: &str) -> bool {
        match self {
            Self::Dir(dir) => dir.join(name).is_file(),
            Self::File(path) => Self::is_named(path, name),
            Self::Files(files) => files.contains_key(name),
        }
    }

    /// The GGUF file this source is, if it is one: a `.gguf` file, or a folder or file set
    /// without `config.json` that holds exactly one `.gguf`.
    pub fn gguf_name(&self) -> Option<String> {
        let is_gguf = |n: &str| n.to_ascii_lowercase().ends_with(".gguf");
        let only = |mut names: Vec<String>| {
            names.retain(|n| is_gguf(n));
            (names.len() == 1).then(|| names.remove(0))
        };
        match self {
            Self::File(path) => path.file_name().and_then(|f| f.to_str()).filter(|n| is_gguf(n)).map(str::to_string),
            _ if self.has("config.json") => None,
            Self::Files(files) => only(files.keys().cloned().collect()),
            Self::Dir(dir) => {
                only(std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            }
        }
    }

    /// The file's bytes; a large file on disk is memory-mapped rather than read.
    pub fn read(&mut self, name: &str) -> Result<FileBytes> {
        let missing = |path: String| TwinferError::Io { path, reason: "no such file in the model folder".into() };
        match self {
            Self::Files(files) => files.remove(name).map(FileBytes::Owned).ok_or_else(|| missing(name.to_string())),
            #[cfg(not(target_arch = "wasm32"))]
            Self::Dir(_) | Self::File(_) => {
                let path = match self {
                    Self::File(path) if Self::is_named(path, name) => path.clone(),
                    Self::File(path) => return Err(missing(path.with_file_name(name).display().to_string())),
                    Self::Dir(dir) => dir.join(name),
                    Self::Files(_) => unreachable!(),
                };
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
            Self::Dir(_) | Self::File(_) => Err(missing(self.display(name))),
        }
    }

    /// The file as UTF-8 text. Errors with `Io` when it is missing, `ModelFile` when it is not UTF-8.
    pub fn read_text(&mut self, name: &str) -> Result<String> {
        let shown = self.display(name);
        let bytes = self.read(name)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| TwinferError::ModelFile { file: shown, reason: "not UTF-8".into() })
    }
}

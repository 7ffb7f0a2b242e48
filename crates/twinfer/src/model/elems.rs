//! A float tensor's elements, read in place from the model file they were stored in whenever its
//! bytes already are the kernels' format (a little-endian host and an aligned offset, which
//! safetensors and GGUF writers give every tensor), else decoded once into memory. In place, a
//! model costs its file's bytes and nothing more: the mapped pages natively, the downloaded
//! buffer in a browser.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

use bytemuck::Pod;

use crate::model::source::FileBytes;

/// Elements of type `T` (f32, f16 or bf16), owned or borrowed from a file kept alive by `Arc`.
#[derive(Clone)]
pub struct Elems<T>(Repr<T>);

#[derive(Clone)]
enum Repr<T> {
    Owned(Vec<T>),
    InFile { file: Arc<FileBytes>, bytes: Range<usize> },
}

impl<T: Pod> Elems<T> {
    /// Elements held in memory.
    pub fn owned(values: Vec<T>) -> Self {
        Self(Repr::Owned(values))
    }

    /// `file[bytes]` read as little-endian `T`s: in place when the host and the offset allow,
    /// else decoded by `from_le` into an owned copy.
    pub fn from_file(file: &Arc<FileBytes>, bytes: Range<usize>, from_le: impl Fn(&[u8]) -> T) -> Self {
        let raw = &file[bytes.clone()];
        if cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, T>(raw).is_ok() {
            return Self(Repr::InFile { file: file.clone(), bytes });
        }
        Self::owned(raw.chunks_exact(size_of::<T>()).map(from_le).collect())
    }

    /// Whether the elements are read in place from the file rather than copied.
    pub fn in_file(&self) -> bool {
        matches!(self.0, Repr::InFile { .. })
    }
}

impl<T: Pod> Deref for Elems<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.0 {
            Repr::Owned(v) => v,
            // Alignment and length were checked when the range was accepted; the file's bytes
            // never move while the Arc holds them.
            Repr::InFile { file, bytes } => bytemuck::cast_slice(&file[bytes.clone()]),
        }
    }
}

impl<T: Pod> fmt::Debug for Elems<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = if self.in_file() { "in the file" } else { "in memory" };
        write!(f, "Elems({} x {}, {place})", self.len(), std::any::type_name::<T>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_bytes_are_read_in_place_and_unaligned_ones_copied() {
        let values: Vec<f32> = vec![1.5, -2.0, 3.25, 0.0];
        // One spare byte in front, so that some offset is misaligned whatever the allocation.
        let mut bytes = vec![0u8];
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        bytes.extend([0u8; 3]);
        let file = Arc::new(FileBytes::Owned(bytes));
        let from_le = |b: &[u8]| f32::from_le_bytes(b.try_into().unwrap());
        let base = file.as_ptr() as usize;
        for start in 0..4 {
            let e = Elems::<f32>::from_file(&file, start..start + 16, from_le);
            let aligned = (base + start).is_multiple_of(align_of::<f32>());
            assert_eq!(e.in_file(), aligned && cfg!(target_endian = "little"), "offset {start}");
            if start == 1 {
                assert_eq!(&e[..], &values[..]);
            }
        }
    }
}

//! Owned, dtype-erased pool storage for one layer's K or V.

use crate::dtype::{DType, TensorMut, TensorRef};
use crate::error::{Result, TwinferError};
use half::{bf16, f16};
use std::fmt;
use std::ops::Range;

/// A flat `[num_pages, page_size, num_kv_heads, head_dim]` buffer in the cache's dtype.
pub(crate) enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Storage {
    /// `len` zeros; an allocation the machine cannot satisfy is an error rather than an abort.
    pub fn zeros(dtype: DType, len: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Storage::F32(zeroed(len)?),
            DType::F16 => Storage::F16(zeroed(len)?),
            DType::BF16 => Storage::BF16(zeroed(len)?),
        })
    }

    /// `values` rounded to `dtype`.
    // Only `twinfer plan` (native) builds pools from f32 values.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub fn from_f32(dtype: DType, values: &[f32]) -> Self {
        match dtype {
            DType::F32 => Storage::F32(values.to_vec()),
            DType::F16 => Storage::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => Storage::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Storage::F32(s) => TensorRef::F32(s),
            Storage::F16(s) => TensorRef::F16(s),
            Storage::BF16(s) => TensorRef::BF16(s),
        }
    }

    pub fn as_mut(&mut self) -> TensorMut<'_> {
        match self {
            Storage::F32(s) => TensorMut::F32(s),
            Storage::F16(s) => TensorMut::F16(s),
            Storage::BF16(s) => TensorMut::BF16(s),
        }
    }

    /// Copies `src` to start at `dst` (used for copy-on-write of a page).
    pub fn copy_within(&mut self, src: Range<usize>, dst: usize) {
        match self {
            Storage::F32(s) => s.copy_within(src, dst),
            Storage::F16(s) => s.copy_within(src, dst),
            Storage::BF16(s) => s.copy_within(src, dst),
        }
    }
}

/// Prints the dtype and length only: a pool is megabytes of numbers nobody wants in a log.
impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.as_ref();
        write!(f, "Storage({}, {} elements)", t.dtype(), t.len())
    }
}

fn zeroed<T: Clone + Default>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| TwinferError::InvalidParameter(format!("cannot allocate a KV pool of {len} elements")))?;
    v.resize(len, T::default());
    Ok(v)
}

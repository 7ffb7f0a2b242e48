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

/// Element types whose all-zero bit pattern is the value zero.
trait ZeroBits: Copy {}
impl ZeroBits for f32 {}
impl ZeroBits for f16 {}
impl ZeroBits for bf16 {}

/// `len` zeros from the allocator's zeroed memory: a large pool comes as untouched zero pages
/// that the OS maps in as sequences first write them, so a generous KV budget costs resident
/// memory only as it fills (a `resize` would write, and so commit, every page up front).
fn zeroed<T: ZeroBits>(len: usize) -> Result<Vec<T>> {
    let fail = || TwinferError::InvalidParameter(format!("cannot allocate a KV pool of {len} elements"));
    if len == 0 || size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| fail())?;
    // SAFETY: the layout has a non-zero size; a null result is reported, not used.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(fail());
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `[T; len]`, and
    // all-zero bits are a valid `T` (ZeroBits), so all `len` elements are initialised.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

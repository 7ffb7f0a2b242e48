//! Owned, dtype-erased pool storage for one layer's K or V.

use crate::dtype::{DType, Q8Mut, Q8Ref, TensorMut, TensorRef};
use crate::error::{Result, TwinferError};
use half::{bf16, f16};
use std::fmt;
use std::ops::Range;

/// A flat `[num_pages, page_size, num_kv_heads, head_dim]` buffer in the cache's dtype; Q8 keeps
/// one scale per `group` (head_dim) codes, `[num_pages, page_size, num_kv_heads]`.
pub(crate) enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Q8 { codes: Vec<i8>, scales: Vec<f32>, group: usize },
}

impl Storage {
    /// `len` zeros (Q8: in groups of `group`, which divides `len`); an allocation the machine
    /// cannot satisfy is an error rather than an abort.
    pub fn zeros(dtype: DType, len: usize, group: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Storage::F32(zeroed(len)?),
            DType::F16 => Storage::F16(zeroed(len)?),
            DType::BF16 => Storage::BF16(zeroed(len)?),
            DType::Q8 => Storage::Q8 { codes: zeroed(len)?, scales: zeroed(len / group.max(1))?, group: group.max(1) },
        })
    }

    /// `values` rounded to `dtype` (Q8: quantized in groups of `group`).
    // Only `twinfer plan` (native) builds pools from f32 values.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub fn from_f32(dtype: DType, values: &[f32], group: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Storage::F32(values.to_vec()),
            DType::F16 => Storage::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => Storage::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::Q8 => {
                let mut s = Self::zeros(dtype, values.len(), group)?;
                s.as_mut().write_f32(0, values);
                s
            }
        })
    }

    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Storage::F32(s) => TensorRef::F32(s),
            Storage::F16(s) => TensorRef::F16(s),
            Storage::BF16(s) => TensorRef::BF16(s),
            Storage::Q8 { codes, scales, group } => TensorRef::Q8(Q8Ref { codes, scales, group: *group }),
        }
    }

    pub fn as_mut(&mut self) -> TensorMut<'_> {
        match self {
            Storage::F32(s) => TensorMut::F32(s),
            Storage::F16(s) => TensorMut::F16(s),
            Storage::BF16(s) => TensorMut::BF16(s),
            Storage::Q8 { codes, scales, group } => TensorMut::Q8(Q8Mut { codes, scales, group: *group }),
        }
    }

    /// Copies `src` to start at `dst` (used for copy-on-write of a page; Q8 ranges are whole
    /// groups, as pages are).
    pub fn copy_within(&mut self, src: Range<usize>, dst: usize) {
        match self {
            Storage::F32(s) => s.copy_within(src, dst),
            Storage::F16(s) => s.copy_within(src, dst),
            Storage::BF16(s) => s.copy_within(src, dst),
            Storage::Q8 { codes, scales, group } => {
                let g = *group;
                scales.copy_within(src.start / g..src.end / g, dst / g);
                codes.copy_within(src, dst);
            }
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
impl ZeroBits for i8 {}

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
    let mut pool = unsafe { Vec::from_raw_parts(ptr, len, len) };
    // Still untouched: the first writes map 2-MiB pages where the OS grants them.
    crate::huge_pages::advise(&mut pool);
    Ok(pool)
}

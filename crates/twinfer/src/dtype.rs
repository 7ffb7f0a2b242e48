//! Element types and dtype-erased tensor views.
//!
//! Kernels accumulate in f32 whatever the storage type; the views let one API take f32, f16 and
//! bf16 buffers and report a dtype mismatch as an error instead of a compile error at the edges
//! (wasm, GPU) where dtypes are only known at run time. [`DType::Q8`] is the KV cache's int8
//! storage: codes with one f32 scale per row of a head ([`Q8Ref`]).

use half::{bf16, f16};
use std::fmt;

/// Storage type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// bfloat16: the upper 16 bits of an f32.
    BF16,
    /// int8 codes with an f32 scale per group of elements (the KV cache: one per token and KV
    /// head); `x = code * scale`, the scale being the group's largest magnitude / 127.
    Q8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8 => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8 => "q8",
        })
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A storage element: f32, f16 or bf16.
pub trait Element: sealed::Sealed + Copy + Default + Send + Sync + fmt::Debug + 'static {
    /// The dtype tag of this element type.
    const DTYPE: DType;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Narrows from f32, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
    /// Wraps a slice as a [`TensorRef`] of this dtype.
    fn view(data: &[Self]) -> TensorRef<'_>;
    /// Wraps a slice as a [`TensorMut`] of this dtype.
    fn view_mut(data: &mut [Self]) -> TensorMut<'_>;
    /// Converts a slice to f32 (exactly: every f16 and bf16 value is an f32 value).
    fn slice_to_f32(src: &[Self], dst: &mut [f32]);
    /// Converts f32 to this type, rounding to nearest even.
    fn slice_from_f32(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn view(data: &[Self]) -> TensorRef<'_> {
        TensorRef::F32(data)
    }
    fn view_mut(data: &mut [Self]) -> TensorMut<'_> {
        TensorMut::F32(data)
    }
    #[inline(always)]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

/// f16 -> f32 by bit manipulation, branch-free so that the loop vectorises inside the kernels'
/// SIMD context (the generic `half` routine is an out-of-line call per 8 elements). Shifting the
/// 15 exponent+mantissa bits into place and scaling by 2^112 rebases the exponent and handles
/// subnormals; infinities and NaNs get the all-ones exponent.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let shifted = (h & 0x7fff) << 13;
    let magnitude = if h & 0x7c00 == 0x7c00 {
        f32::from_bits(shifted | 0x7f80_0000)
    } else {
        f32::from_bits(shifted) * f32::from_bits(0x7780_0000) // 2^112
    };
    f32::from_bits(magnitude.to_bits() | ((h & 0x8000) << 16))
}

macro_rules! half_element {
    ($t:ty, $dtype:expr, $variant:ident, $widen:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
            fn view(data: &[Self]) -> TensorRef<'_> {
                TensorRef::$variant(data)
            }
            fn view_mut(data: &mut [Self]) -> TensorMut<'_> {
                TensorMut::$variant(data)
            }
            #[inline(always)]
            fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
                let widen: fn(u16) -> f32 = $widen;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = widen(s.to_bits());
                }
            }
            #[inline(always)]
            fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
                use half::slice::HalfFloatSliceExt;
                dst.convert_from_f32_slice(src);
            }
        }
    };
}
half_element!(f16, DType::F16, F16, f16_bits_to_f32);
half_element!(bf16, DType::BF16, BF16, |b| f32::from_bits((b as u32) << 16));

/// A borrowed, dtype-erased, flat tensor. Shapes travel beside it in the call's parameters.
#[derive(Debug, Clone, Copy)]
pub enum TensorRef<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// int8 codes with per-group scales (the KV cache's int8 storage).
    Q8(Q8Ref<'a>),
}

/// A mutably borrowed, dtype-erased, flat tensor.
#[derive(Debug)]
pub enum TensorMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f16 elements.
    F16(&'a mut [f16]),
    /// bf16 elements.
    BF16(&'a mut [bf16]),
    /// int8 codes with per-group scales (the KV cache's int8 storage).
    Q8(Q8Mut<'a>),
}

/// int8 codes and one scale per `group` consecutive codes: element `i` is
/// `codes[i] * scales[i / group]`.
#[derive(Debug, Clone, Copy)]
pub struct Q8Ref<'a> {
    /// The int8 codes, `scales.len() * group` of them.
    pub codes: &'a [i8],
    /// One scale per group of `group` codes.
    pub scales: &'a [f32],
    /// Codes per scale (a KV head's `head_dim` in the cache).
    pub group: usize,
}

/// The mutable [`Q8Ref`]: writes quantize whole groups.
#[derive(Debug)]
pub struct Q8Mut<'a> {
    /// The int8 codes, `scales.len() * group` of them.
    pub codes: &'a mut [i8],
    /// One scale per group of `group` codes.
    pub scales: &'a mut [f32],
    /// Codes per scale (a KV head's `head_dim` in the cache).
    pub group: usize,
}

impl<'a> Q8Ref<'a> {
    /// `codes.len()` must be `scales.len() * group`.
    pub fn new(codes: &'a [i8], scales: &'a [f32], group: usize) -> Option<Self> {
        (group > 0 && scales.len().checked_mul(group) == Some(codes.len())).then_some(Self { codes, scales, group })
    }

    /// `dst = self[offset..offset + dst.len()]` dequantized.
    #[inline(always)]
    pub fn read_f32(&self, offset: usize, dst: &mut [f32]) {
        let codes = &self.codes[offset..offset + dst.len()];
        let mut i = 0;
        while i < dst.len() {
            let at = offset + i;
            let (scale, run) = (self.scales[at / self.group], (self.group - at % self.group).min(dst.len() - i));
            for (d, &c) in dst[i..i + run].iter_mut().zip(&codes[i..i + run]) {
                *d = c as f32 * scale;
            }
            i += run;
        }
    }
}

/// Quantizes `src` (whole groups) into `codes` and `scales`: per group, scale = max |x| / 127 and
/// code = round(x / scale), so the largest magnitude is stored exactly and every element is
/// within scale / 2 of its value. An all-zero group has scale 0.
pub fn quantize_q8(src: &[f32], group: usize, codes: &mut [i8], scales: &mut [f32]) {
    debug_assert!(src.len() == codes.len() && src.len() == scales.len() * group);
    for ((x, c), s) in src.chunks_exact(group).zip(codes.chunks_exact_mut(group)).zip(scales.iter_mut()) {
        // NaN propagates (f32::max would drop it): a non-finite group must read back non-finite.
        let amax = x.iter().fold(0f32, |m, v| if v.is_nan() || m.is_nan() { f32::NAN } else { m.max(v.abs()) });
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (c, &v) in c.iter_mut().zip(x) {
            *c = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        // A non-finite group stays non-finite when read (NaN), as it would in f16.
        *s = if amax.is_finite() { scale } else { f32::NAN };
    }
}

impl<'a> From<&'a [f32]> for TensorRef<'a> {
    fn from(s: &'a [f32]) -> Self {
        TensorRef::F32(s)
    }
}
impl<'a> From<&'a [f16]> for TensorRef<'a> {
    fn from(s: &'a [f16]) -> Self {
        TensorRef::F16(s)
    }
}
impl<'a> From<&'a [bf16]> for TensorRef<'a> {
    fn from(s: &'a [bf16]) -> Self {
        TensorRef::BF16(s)
    }
}
impl<'a> From<&'a mut [f32]> for TensorMut<'a> {
    fn from(s: &'a mut [f32]) -> Self {
        TensorMut::F32(s)
    }
}
impl<'a> From<&'a mut [f16]> for TensorMut<'a> {
    fn from(s: &'a mut [f16]) -> Self {
        TensorMut::F16(s)
    }
}
impl<'a> From<&'a mut [bf16]> for TensorMut<'a> {
    fn from(s: &'a mut [bf16]) -> Self {
        TensorMut::BF16(s)
    }
}

impl TensorRef<'_> {
    /// The element type of the view.
    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::F32(_) => DType::F32,
            TensorRef::F16(_) => DType::F16,
            TensorRef::BF16(_) => DType::BF16,
            TensorRef::Q8(_) => DType::Q8,
        }
    }
    /// Number of elements (codes for [`TensorRef::Q8`]).
    pub fn len(&self) -> usize {
        match self {
            TensorRef::F32(s) => s.len(),
            TensorRef::F16(s) => s.len(),
            TensorRef::BF16(s) => s.len(),
            TensorRef::Q8(q) => q.codes.len(),
        }
    }
    /// Whether the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `dst.len()` elements starting at `offset` into `dst` as f32.
    #[inline(always)]
    pub fn read_f32(&self, offset: usize, dst: &mut [f32]) {
        let n = dst.len();
        match self {
            TensorRef::F32(s) => f32::slice_to_f32(&s[offset..offset + n], dst),
            TensorRef::F16(s) => f16::slice_to_f32(&s[offset..offset + n], dst),
            TensorRef::BF16(s) => bf16::slice_to_f32(&s[offset..offset + n], dst),
            TensorRef::Q8(q) => q.read_f32(offset, dst),
        }
    }
    /// Element `i` as f64 (for the reference implementation).
    pub fn get_f64(&self, i: usize) -> f64 {
        match self {
            TensorRef::F32(s) => s[i] as f64,
            TensorRef::F16(s) => s[i].to_f64(),
            TensorRef::BF16(s) => s[i].to_f64(),
            TensorRef::Q8(q) => (q.codes[i] as f32 * q.scales[i / q.group]) as f64,
        }
    }
}

impl TensorMut<'_> {
    /// The element type of the view.
    pub fn dtype(&self) -> DType {
        match self {
            TensorMut::F32(_) => DType::F32,
            TensorMut::F16(_) => DType::F16,
            TensorMut::BF16(_) => DType::BF16,
            TensorMut::Q8(_) => DType::Q8,
        }
    }
    /// Number of elements (codes for [`TensorMut::Q8`]).
    pub fn len(&self) -> usize {
        match self {
            TensorMut::F32(s) => s.len(),
            TensorMut::F16(s) => s.len(),
            TensorMut::BF16(s) => s.len(),
            TensorMut::Q8(q) => q.codes.len(),
        }
    }
    /// Whether the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A shorter-lived mutable view of the same data.
    pub fn reborrow(&mut self) -> TensorMut<'_> {
        match self {
            TensorMut::F32(s) => TensorMut::F32(s),
            TensorMut::F16(s) => TensorMut::F16(s),
            TensorMut::BF16(s) => TensorMut::BF16(s),
            TensorMut::Q8(q) => TensorMut::Q8(Q8Mut { codes: q.codes, scales: q.scales, group: q.group }),
        }
    }
    /// A read-only view of the same data.
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            TensorMut::F32(s) => TensorRef::F32(s),
            TensorMut::F16(s) => TensorRef::F16(s),
            TensorMut::BF16(s) => TensorRef::BF16(s),
            TensorMut::Q8(q) => TensorRef::Q8(Q8Ref { codes: q.codes, scales: q.scales, group: q.group }),
        }
    }
    /// Writes f32 values at `offset`, converting to the storage type. Q8 storage quantizes
    /// whole groups: `offset` and `src.len()` must be multiples of its group (callers write
    /// whole rows of a head).
    #[inline(always)]
    pub fn write_f32(&mut self, offset: usize, src: &[f32]) {
        let n = src.len();
        match self {
            TensorMut::F32(s) => f32::slice_from_f32(src, &mut s[offset..offset + n]),
            TensorMut::F16(s) => f16::slice_from_f32(src, &mut s[offset..offset + n]),
            TensorMut::BF16(s) => bf16::slice_from_f32(src, &mut s[offset..offset + n]),
            TensorMut::Q8(q) => {
                assert!(offset.is_multiple_of(q.group) && n.is_multiple_of(q.group), "Q8 writes whole groups");
                let g = offset / q.group;
                quantize_q8(src, q.group, &mut q.codes[offset..offset + n], &mut q.scales[g..g + n / q.group]);
            }
        }
    }
    /// Fills every element with NaN so that a kernel that forgets an element is caught.
    pub fn poison(&mut self) {
        match self {
            TensorMut::F32(s) => s.fill(f32::NAN),
            TensorMut::F16(s) => s.fill(f16::NAN),
            TensorMut::BF16(s) => s.fill(bf16::NAN),
            // Codes have no NaN: a NaN scale poisons the group.
            TensorMut::Q8(q) => q.scales.fill(f32::NAN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn f16_widening_is_exact_for_every_bit_pattern() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut out = vec![0.0f32; all.len()];
        f16::slice_to_f32(&all, &mut out);
        for (h, f) in all.iter().zip(&out) {
            let want = h.to_f32();
            assert!(
                want.to_bits() == f.to_bits() || (want.is_nan() && f.is_nan()),
                "{:#06x}: {f} vs {want}",
                h.to_bits()
            );
        }
    }

    #[test]
    fn q8_keeps_each_group_within_half_a_step_and_its_largest_magnitude_exactly() {
        let group = 8;
        let src: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37 * (1 + i / 8) as f32).collect();
        let (mut codes, mut scales) = (vec![0i8; 64], vec![0f32; 8]);
        let mut back = vec![0f32; 64];
        let mut part = vec![0f32; 13];
        {
            let mut view = TensorMut::Q8(Q8Mut { codes: &mut codes, scales: &mut scales, group });
            view.write_f32(0, &src);
            view.as_ref().read_f32(0, &mut back);
            // Reads that start and end inside groups use each element's own scale.
            view.as_ref().read_f32(5, &mut part);
        }
        assert_eq!(part, back[5..18]);
        for (g, (x, y)) in src.chunks(group).zip(back.chunks(group)).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scales[g], amax / 127.0);
            for (&a, &b) in x.iter().zip(y) {
                // Half a step, plus the rounding of code * scale (an exact tie sits on the edge).
                let bound = scales[g] * 0.5 + b.abs() * f32::EPSILON;
                assert!((a - b).abs() <= bound, "group {g}: {a} -> {b}");
                if a.abs() == amax {
                    assert_eq!(a, b, "the largest magnitude is stored exactly");
                }
            }
        }
        let zeros = [0f32; 8];
        let mut view = TensorMut::Q8(Q8Mut { codes: &mut codes, scales: &mut scales, group });
        view.write_f32(8, &zeros);
        view.as_ref().read_f32(8, &mut back[..8]);
        assert_eq!(&back[..8], &zeros[..]);
        assert_eq!(view.as_ref().get_f64(8), 0.0);
        for bad in [f32::NAN, f32::INFINITY] {
            let mut row = [1.0f32; 8];
            row[3] = bad;
            view.write_f32(16, &row);
            view.as_ref().read_f32(16, &mut back[..8]);
            assert!(back[..8].iter().all(|v| v.is_nan()), "{bad} in a group reads back as NaN, not a number");
        }
        assert_eq!(scales[1], 0.0, "an all-zero group has scale 0");
    }

    #[test]
    fn bf16_widening_is_exact() {
        let all: Vec<bf16> = (0..=u16::MAX).step_by(7).map(bf16::from_bits).collect();
        let mut out = vec![0.0f32; all.len()];
        bf16::slice_to_f32(&all, &mut out);
        for (h, f) in all.iter().zip(&out) {
            assert!(h.to_f32().to_bits() == f.to_bits() || f.is_nan());
        }
    }
}

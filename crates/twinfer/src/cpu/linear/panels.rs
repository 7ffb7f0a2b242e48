//! [`Bf16Panels`]: a projection's bf16 weights packed once for AVX512-BF16 (see `bf16_packed`).

#[cfg(target_arch = "x86_64")]
use super::{COLS_PER_TASK, bf16, bf16_packed};
use crate::cpu::SimdLevel;
use crate::dtype::TensorRef;

/// bf16 weight parts packed once for the bf16 dot products (AVX512-BF16), as the model keeps
/// them beside its weights: a decode row then reads a panel as it streams in, where packing
/// per call costs more than the product ([`super::linear_parts_packed`]). The arithmetic is that of
/// the parts packed per call, bit for bit.
pub struct Bf16Panels {
    k: usize,
    parts_n: Vec<usize>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    words: Vec<u32>,
}

impl Bf16Panels {
    /// The panels of `parts` (rows of `k`), or `None` where `level` has no bf16 dot products,
    /// a part is not bf16, or `k` is odd (the kernels that take odd widths read rows in place).
    pub fn pack(level: SimdLevel, parts: &[TensorRef<'_>], k: usize) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if !bf16::has_dot(level) || k == 0 || !bf16_packed::applies(k) {
                return None;
            }
            let rows: Vec<&[half::bf16]> = parts
                .iter()
                .map(|p| match p {
                    TensorRef::BF16(w) if w.len().is_multiple_of(k) => Some(*w),
                    _ => None,
                })
                .collect::<Option<_>>()?;
            let parts_n: Vec<usize> = rows.iter().map(|w| w.len() / k).collect();
            let per_task = bf16_packed::panel_words(k);
            let tasks: usize = parts_n.iter().map(|n| n.div_ceil(COLS_PER_TASK)).sum();
            let mut words = crate::huge_pages::vec_from(tasks * per_task, |_| 0u32);
            let mut panels = words.chunks_exact_mut(per_task);
            for (w, &n) in rows.iter().zip(&parts_n) {
                for c0 in (0..n).step_by(COLS_PER_TASK) {
                    let task = &w[c0 * k..(c0 + COLS_PER_TASK).min(n) * k];
                    let panel = panels.next().expect("one panel per task");
                    // SAFETY: the level has AVX512-BF16 (has_dot), with AVX-512 F and BW.
                    unsafe { bf16_packed::pack(task, k, panel) };
                }
            }
            Some(Self { k, parts_n, words })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (level, parts, k);
            None
        }
    }

    /// Whether these are the panels of parts of these sizes.
    pub(super) fn fits(&self, parts: &[TensorRef<'_>], k: usize) -> bool {
        self.k == k
            && parts.len() == self.parts_n.len()
            && parts.iter().zip(&self.parts_n).all(|(p, &n)| p.len() == n * k)
    }

    /// Task `t`'s panel, in the order [`super::linear_parts_packed`] numbers its tasks.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn task(&self, t: usize) -> &[u32] {
        #[cfg(target_arch = "x86_64")]
        {
            let per_task = bf16_packed::panel_words(self.k);
            &self.words[t * per_task..(t + 1) * per_task]
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = t;
            &[]
        }
    }
}

/// The sizes only: the panels are megabytes of numbers nobody wants in a log.
impl std::fmt::Debug for Bf16Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Panels(k {}, parts {:?})", self.k, self.parts_n)
    }
}

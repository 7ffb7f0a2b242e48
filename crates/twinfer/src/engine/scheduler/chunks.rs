//! Where prompt chunks end.

/// Tokens of a prompt chunk that starts at `computed` with `pending` tokens to go and `budget`
/// left in the step: all of them when they fit, else up to the last multiple of `align` (0 when
/// none fits). Chunk boundaries at multiples of [`crate::cpu::PREFILL_ALIGN`] make a request's output
/// independent of how its prompt was split across steps (see `cpu::PREFILL_ALIGN`).
pub(super) fn aligned_chunk(computed: usize, pending: usize, budget: usize, align: usize) -> usize {
    if pending <= budget {
        return pending;
    }
    ((computed + budget) / align * align).saturating_sub(computed)
}

pub(super) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

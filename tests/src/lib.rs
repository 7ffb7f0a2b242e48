//! The conformance suite shared by every backend: random attention problems with the nasty sizes,
//! NaN-poisoned outputs, the f64 oracle, and per-dtype tolerances.
//!
//! Tolerances (`|out - ref| <= atol + rtol * |ref|`), by output dtype; inputs are compared
//! against the oracle on the very same (already rounded) values, so only arithmetic and the
//! final rounding of the output count:
//! - f32 output: atol 2e-5, rtol 2e-5; LSE atol 5e-5 (f32 accumulation over up to a few hundred keys);
//! - f16 output: atol 1e-3, rtol 2e-3 (f16 has an 11-bit significand);
//! - bf16 output: atol 8e-3, rtol 8e-3 (8-bit significand).

#[cfg(not(target_arch = "wasm32"))]
pub mod cli;
pub mod models;
pub mod problem;
pub mod rng;

pub use problem::{BF16_UNIT, Case, CaseData, KvKind, Mode, Tolerance, case_strategy};

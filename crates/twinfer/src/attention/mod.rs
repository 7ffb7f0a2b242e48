//! The public attention API: parameters, inputs and outputs, and `merge_state`.

mod merge;
mod params;
pub(crate) mod problem;

pub(crate) use merge::merge_row;
pub use merge::{merge_state, merge_state_in_place};
pub use params::AttentionParams;
pub use problem::{AttentionOutput, DecodeInput, KvInput, PrefillInput};

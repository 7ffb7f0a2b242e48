//! Kernel benchmarks that report against this machine's own ceilings, measured in the same run.

// The cases build on every target: the browser package times them from JS.
pub mod cases;
#[cfg(not(target_arch = "wasm32"))]
pub mod ceilings;
#[cfg(not(target_arch = "wasm32"))]
pub mod dot_peaks;
#[cfg(not(target_arch = "wasm32"))]
pub mod gpu;
#[cfg(not(target_arch = "wasm32"))]
pub mod plan;
#[cfg(not(target_arch = "wasm32"))]
pub mod serve;
pub mod timing;

#[cfg(not(target_arch = "wasm32"))]
mod kernels;

#[cfg(not(target_arch = "wasm32"))]
pub use kernels::*;

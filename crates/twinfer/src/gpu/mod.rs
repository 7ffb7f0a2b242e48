//! The WGSL engine: device and adapter choice, shader registry, pipeline and buffer pools, and
//! the attention calls over host slices. No wgpu type appears in the attention API.

pub mod params;
pub mod shaders;

#[cfg(not(target_arch = "wasm32"))]
mod device;
#[cfg(not(target_arch = "wasm32"))]
mod engine;
#[cfg(not(target_arch = "wasm32"))]
mod resident;
#[cfg(not(target_arch = "wasm32"))]
mod resources;
#[cfg(not(target_arch = "wasm32"))]
mod upload;

#[cfg(not(target_arch = "wasm32"))]
pub use device::{AdapterSummary, GpuContext, ResourceCounts};
#[cfg(not(target_arch = "wasm32"))]
pub use engine::{GpuEngine, GpuOptions};
#[cfg(not(target_arch = "wasm32"))]
pub use resident::{DEFAULT_MAX_KV_BUFFER, GpuKvCache};
pub use shaders::{KvStorage, Variant};

//! The WGSL engine: device and adapter choice, shader registry, pipeline and buffer pools, and
//! the attention calls over host slices. No wgpu type appears in the attention API. Natively it
//! runs on Vulkan; in a browser (wasm32) on WebGPU, through the `_async` calls.

mod device;
mod engine;
pub mod params;
mod pending;
mod resident;
mod resources;
pub mod shaders;
mod upload;

pub use device::{AdapterSummary, GpuContext, ResourceCounts};
pub use engine::{GpuEngine, GpuOptions};
pub use resident::{DEFAULT_MAX_KV_BUFFER, GpuKvCache};
pub use shaders::{KvStorage, Variant};

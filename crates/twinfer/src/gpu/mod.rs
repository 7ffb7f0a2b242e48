//! The WGSL engine: device and adapter choice, shader registry, pipeline and buffer pools, and
//! the attention calls and the projections over host slices. No wgpu type appears in the attention API. Natively it
//! runs on Vulkan; in a browser (wasm32) on WebGPU, through the `_async` calls.

mod attention_calls;
mod device;
mod engine;
mod linear;
mod linear_quant;
mod linear_split;
pub mod params;
mod pending;
mod resident;
mod resources;
pub mod shaders;
mod step;
mod upload;

pub use device::{AdapterSummary, GpuContext, PREFILL_COOP_STORAGE, ResourceCounts};
pub use engine::{GpuEngine, GpuOptions};
pub use linear::{DEFAULT_MAX_WEIGHT_BUFFER, GEMV_MAX_ROWS, GemvShape, GpuLinear};
pub use resident::{
    DEFAULT_MAX_KV_BUFFER, GpuKvCache, KernelTime, max_pages_per_buffer, pool_buffer_bytes, pool_page_bytes,
};
pub use shaders::{KvStorage, ShaderChecks, Variant};
pub use step::{
    Act, DeviceVec, OnLoad, PlannedDecode, PlannedPrefill, StepPending, StepRecorder, candidates, step_submissions,
};

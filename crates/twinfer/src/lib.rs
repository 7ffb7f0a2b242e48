//! twinfer: FlashAttention-style prefill and FlashInfer-style paged decode attention, on SIMD CPUs
//! (through `pulp`) and on GPUs through WGSL compute shaders (`wgpu`).

#![deny(missing_docs)]
// The threaded wasm build compiles the GPU engine but never opens a device (see `gpu::device`),
// so its wgpu handles, which are neither Send nor Sync there, are never shared.
#![cfg_attr(all(target_arch = "wasm32", target_feature = "atomics"), allow(clippy::arc_with_non_send_sync))]

pub mod attention;
mod backend;
pub mod bench;
pub mod cpu;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod gpu;
mod huge_pages;
pub mod kv;
pub mod model;
pub mod quant;
pub mod reference;
mod wait;
mod weight_slab;

pub use attention::{
    AttentionOutput, AttentionParams, DecodeInput, KvInput, PrefillInput, merge_state, merge_state_in_place,
};
pub use backend::{Attention, AttentionBackend, Backend, BackendInfo, cpu_model_name};
pub use dtype::{DType, Element, Q8Mut, Q8Ref, TensorMut, TensorRef, quantize_q8};
pub use error::{Result, TwinferError};
pub use half::{bf16, f16};
pub use kv::{
    KvCacheConfig, KvLayout, PageAllocator, PageTable, PageTableBuf, PagedKv, PagedKvCache, SeqId, append_paged_kv,
};

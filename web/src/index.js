// twinfer for the web: FlashAttention-style prefill and FlashInfer-style paged decode on WebGPU,
// with a WebAssembly SIMD fallback. See README.md for the API.
export { Twinfer } from "./twinfer.js";
export {
  TwinferError,
  WebGpuUnavailableError,
  FeatureMissingError,
  DeviceLostError,
  ModelTooLargeError,
  KvCacheFullError,
  InvalidModelError,
  EngineCrashedError,
  QuotaExceededError,
} from "./errors.js";
export { listModels, deleteModel, hasModel } from "./cache.js";
export { hasWasmSimd, hasRelaxedSimd } from "./loader.js";
import { loadBindings } from "./loader.js";

/**
 * The attention kernels on their own (f32 arrays in, Float32Array out): `decode` (paged, CSR
 * page table) and `prefill` (ragged, optionally causal), on the wasm SIMD engine.
 */
export async function kernels(options = {}) {
  const b = await loadBindings(options.wasmUrl);
  return { decode: b.decode, prefill: b.prefill, info: b.info, BenchCase: b.BenchCase };
}

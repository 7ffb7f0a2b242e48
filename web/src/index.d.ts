// Types of the `twinfer` package (hand-written; checked with `tsc --noEmit` in the tests).

export type BackendChoice = "auto" | "webgpu" | "wasm";

export interface Progress {
  /** "init": opening the engine; "download": model bytes (from the network or the model cache);
   * "load": building the model; "upload": weights to the GPU (WebGPU only). */
  phase: "init" | "download" | "load" | "upload";
  /** Bytes so far (phase "download": of all the model's files together). */
  loaded: number;
  total: number;
  text: string;
  /** Phase "download": the file the latest bytes belong to. */
  file?: string;
  /** Phase "download": whether the latest bytes came from the model cache (else the network). */
  fromCache?: boolean;
}

export interface CreateOptions {
  /** "auto" (default): WebGPU when an adapter passes the self-test, else WebAssembly SIMD. */
  backend?: BackendChoice;
  onProgress?: (p: Progress) => void;
  /** Run the engine in a Web Worker (browsers); the API is the same. */
  worker?: boolean;
  /** Where twinfer_web_bg.wasm is, when a bundler moved it (the engine then runs one thread). */
  wasmUrl?: string | URL;
  /**
   * CPU threads for the wasm engine: "auto" (default: one per core, at most 8) or a count. More
   * than one needs a cross-origin isolated page (COOP `same-origin`, COEP `require-corp`), the
   * engine in a worker (`worker: true`), relaxed SIMD, and the wasm backend (asked for, or `auto`
   * without a WebGPU adapter); otherwise it runs one thread and `info().threadsReason` says why.
   */
  threads?: "auto" | number;
}

export interface LoadOptions {
  onProgress?: (p: Progress) => void;
  signal?: AbortSignal;
  /**
   * Keep a URL source's files in the browser's model cache (Cache API) and read them back from
   * there (default true; where there is no Cache API, as in Node, the files load from the network
   * and nothing is stored). A download cut short resumes where the stored part ends; a model
   * stored whole loads with no request. A full storage quota is a QuotaExceededError; `false`
   * loads without storing anything.
   */
  cache?: boolean;
  /** The SHA-256 (64 hex digits) of a single `.gguf` source, checked as the bytes stream in. */
  sha256?: string;
  /** SHA-256 digests by file name ("model.safetensors": "ab12..."), checked for any source kind. */
  digests?: Record<string, string> | Map<string, string>;
  /**
   * In-situ quantization of a float (f32/f16/bf16 safetensors) decoder: every projection in this
   * block format, a tied embedding table in Q8_0, converted as the bytes arrive so that the float
   * file is never held in wasm memory. GGUF files keep their own formats.
   */
  quantize?: "q8_0" | "q4_0" | "q4_1" | "q5_0" | "q5_1";
  /**
   * How finely quantized projections (GGUF files, or `quantize`) quantize their activations, per
   * block of 32 (the wasm engine; WebGPU keeps f32): "int16" (default) is near f32; "int8" is
   * llama.cpp's Q8 activations, about 1e-2 of the top logit off, and multiplies 4-bit weights
   * with half the instructions in the relaxed-SIMD build.
   */
  activations?: "int16" | "int8";
  /** Tokens per KV page (default 16). */
  pageSize?: number;
  /** KV cache budget in bytes (default 128 MiB). */
  kvMemoryBytes?: number;
  /** KV cache storage (default: f32 when decode runs on wasm, f16 on WebGPU); "q8" keeps int8
   * codes with a scale per token and KV head (a quarter of f32's bytes; on WebGPU the device pool
   * holds the codes too). */
  kvDtype?: "f16" | "f32" | "q8";
  /** Tokens per engine step: decode tokens plus prompt chunks (default 256). */
  maxBatchTokens?: number;
  /** Requests running at once (default 256). */
  maxRunning?: number;
  /**
   * Finished requests whose KV pages stay for later prompts that start the same way, as a chat's
   * next turn does (default 4; 0 turns it off). Kept pages give way before any request waits.
   */
  prefixCache?: number;
}

/** A model folder: base URL, files by name, dropped files, or the Response of its config.json. */
/** A model folder's base URL, a `.gguf` file's URL, its files, or a Response of its config.json or .gguf. */
export type ModelSource =
  | string
  | URL
  | Response
  | FileList
  | File[]
  | Map<string, ArrayBuffer | ArrayBufferView | Blob | Response>
  | Record<string, ArrayBuffer | ArrayBufferView | Blob | Response>;

export interface GenerateOptions {
  maxTokens?: number;
  /** 0 (default) is greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  repetitionPenalty?: number;
  seed?: number;
  /** Generation ends before the first of these strings; it is not part of the text. */
  stop?: string | string[];
  stopTokenIds?: number[];
  /** Keep going past the model's end-of-sequence token. */
  ignoreEos?: boolean;
  /** Aborting cancels the request; the iterator then throws the signal's reason. */
  signal?: AbortSignal;
}

export interface GeneratedToken {
  /** The text this token completed (may be empty while a character or stop string is pending). */
  text: string;
  tokenId: number;
  /** Milliseconds since the request was submitted. */
  t: number;
}

/** Milliseconds (counts for `count`). */
export interface Distribution {
  count: number;
  mean: number;
  std: number;
  min: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

export interface RequestMetrics {
  promptTokens: number;
  generatedTokens: number;
  /** Time to first token, from submission. */
  ttft: number | null;
  /** Mean time per output token after the first. */
  tpot: number | null;
  e2e: number;
  itl: Distribution;
  tokenTimes: number[];
  preemptions: number;
  /** Prompt tokens whose KV came from another request's pages (a running one's, or a finished one's kept by the prefix cache). */
  cachedTokens: number;
}

export interface GenerateResult {
  text: string;
  tokens: number[];
  reason: "length" | "eos" | "stop_token" | "stop" | "cancelled";
  metrics: RequestMetrics;
}

export interface RunMetrics {
  requests: number;
  generatedTokens: number;
  promptTokens: number;
  wallMs: number;
  /** Generated tokens per second of wall time. */
  tps: number;
  requestsPerSecond: number;
  ttft: Distribution;
  tpot: Distribution;
  itl: Distribution;
  /** Fractions of the KV pool in use, one sample per step (not milliseconds). */
  kvOccupancy: Distribution;
  preemptions: number;
}

export interface EngineReport {
  backend: "cpu" | "gpu";
  device: string;
  variant: string;
  /** The CPU engine's threads, its own included (more than 1 only in the threaded build); 1 on the GPU. */
  threads: number;
  reason: string;
}

export interface AdapterReport {
  vendor: string;
  architecture: string;
  description: string;
  isFallbackAdapter: boolean;
  features: string[];
  limits: Record<string, number>;
}

export interface Info {
  /** "webgpu" when any phase runs on the GPU, else "wasm". */
  backend: "webgpu" | "wasm";
  /** Why this backend was chosen (or why WebGPU was not). */
  reason: string;
  /** The CPU engine's SIMD level: "simd128", or "simd128-relaxed" for the relaxed-SIMD build. */
  simd: string;
  prefill: EngineReport;
  decode: EngineReport;
  /** The WebGPU adapter, when one was found. */
  adapter?: AdapterReport | null;
  /** `chat`: the model has a chat template, so `generate({ messages })` works. */
  model: null | { kind: "decoder" | "encoder"; description: string; chat: boolean };
  /** Bytes of the WebAssembly memory: it never shrinks, so this is the peak so far. */
  wasmMemoryBytes: number;
  /** How many CPU threads the engine runs (`decode.threads`) and why not more. */
  threadsReason: string;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant" | (string & {});
  content: string;
}

export interface ChatPrompt {
  messages: ChatMessage[];
}

export declare class Twinfer {
  static create(options?: CreateOptions): Promise<Twinfer>;
  loadModel(source: ModelSource, options?: LoadOptions): Promise<Info>;
  embed(texts: string | string[]): Promise<Float32Array[]>;
  /** `{ messages }` goes through the model's chat template and ends at its end-of-turn token. */
  generate(prompt: string | number[] | Uint32Array | ChatPrompt, options?: GenerateOptions): AsyncGenerator<GeneratedToken, GenerateResult, void>;
  metrics(options?: { reset?: boolean }): Promise<RunMetrics>;
  info(): Info;
  dispose(): Promise<void>;
}

export declare class TwinferError extends Error {
  /** The engine's name for the case ("ShapeMismatch", "ModelFile", ...). */
  code: string;
}
export declare class WebGpuUnavailableError extends TwinferError {}
export declare class FeatureMissingError extends TwinferError {}
export declare class DeviceLostError extends TwinferError {}
export declare class ModelTooLargeError extends TwinferError {}
export declare class KvCacheFullError extends TwinferError {}
export declare class InvalidModelError extends TwinferError {}
export declare class EngineCrashedError extends TwinferError {}
/** Storing a model would go past the origin's storage quota (code "QuotaExceeded"). */
export declare class QuotaExceededError extends TwinferError {
  /** Bytes of the model that was being stored. */
  bytesNeeded: number | null;
  /** The origin's usage and quota from `navigator.storage.estimate()`, when the browser gives them. */
  usage: number | null;
  quota: number | null;
}

/** A model in the browser's model cache. */
export interface StoredModel {
  /** The model's URL as loadModel resolved it (absolute; a folder's ends with "/"). */
  url: string;
  files: StoredModelFile[];
  /** Bytes of all its files. */
  bytes: number;
  /** When it was stored whole (milliseconds since the epoch, as Date.now()). */
  storedAt: number;
}

export interface StoredModelFile {
  name: string;
  url: string;
  bytes: number;
  /** The SHA-256 the file was checked against when stored, or null when none was given. */
  sha256: string | null;
}

/** The models stored whole in the browser's model cache ([] where there is no Cache API). */
export declare function listModels(): Promise<StoredModel[]>;
/** Whether the model at `url` is stored whole (loading it then makes no request). */
export declare function hasModel(url: string | URL): Promise<boolean>;
/** Removes the model at `url` from the cache, stored whole or in part; true when something was removed. */
export declare function deleteModel(url: string | URL): Promise<boolean>;

export declare function hasWasmSimd(): boolean;
/** Whether this runtime has WebAssembly relaxed SIMD; where it does, the engine loads the build
 * whose multiply-adds are `f32x4.relaxed_madd` (its `info().simd` is "simd128-relaxed"). */
export declare function hasRelaxedSimd(): boolean;

export interface Kernels {
  /** Paged batch decode (f32); returns o `[batch, numQoHeads, headDim]`. */
  decode(
    q: Float32Array,
    kPool: Float32Array,
    vPool: Float32Array,
    pageSize: number,
    numQoHeads: number,
    numKvHeads: number,
    headDim: number,
    kvIndptr: Uint32Array,
    kvIndices: Uint32Array,
    kvLastPageLen: Uint32Array,
  ): Float32Array;
  /** Ragged batch prefill (f32), causal aligned bottom-right; returns o shaped like q. */
  prefill(
    q: Float32Array,
    k: Float32Array,
    v: Float32Array,
    qoIndptr: Uint32Array,
    kvIndptr: Uint32Array,
    numQoHeads: number,
    numKvHeads: number,
    headDim: number,
    causal: boolean,
  ): Float32Array;
  info(): { backend: string; simd: string; simdAvailable: string[]; threads: number; reason: string; device: string; version: string };
}

export declare function kernels(options?: { wasmUrl?: string | URL }): Promise<Kernels>;

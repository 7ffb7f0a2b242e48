// The package's error classes. Every error a call rejects with is a TwinferError; the subclasses
// name the cases an app handles differently. `code` keeps the engine's own variant name.

export class TwinferError extends Error {
  constructor(message, { code = "Other", cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
    this.code = code;
  }
}

/** WebGPU was required (`backend: 'webgpu'`) but there is no adapter, or it failed its self-test. */
export class WebGpuUnavailableError extends TwinferError {}
/** The browser lacks something the package needs (WebAssembly SIMD, a GPU feature or limit). */
export class FeatureMissingError extends TwinferError {}
/** The GPU device was lost and the engine could not continue on the CPU. */
export class DeviceLostError extends TwinferError {}
/** The model does not fit this device: WebAssembly memory, or a GPU buffer limit. */
export class ModelTooLargeError extends TwinferError {}
/** The request cannot fit the KV cache (prompt plus maxTokens), or the pool ran out. */
export class KvCacheFullError extends TwinferError {}
/** The model files are missing, malformed, or of an architecture the package does not run. */
export class InvalidModelError extends TwinferError {}
/** A bug inside the engine stopped it; this instance cannot be used again (create a new one). */
export class EngineCrashedError extends TwinferError {}
/**
 * Storing a model would go past the origin's storage quota (the browser refused a write to the
 * model cache). `bytesNeeded` is the model's size; `usage` and `quota` are the origin's figures
 * from navigator.storage.estimate() when the browser gives them, else null.
 */
export class QuotaExceededError extends TwinferError {
  constructor(message, { code = "QuotaExceeded", cause, bytesNeeded = null, usage = null, quota = null } = {}) {
    super(message, { code, cause });
    this.bytesNeeded = bytesNeeded;
    this.usage = usage;
    this.quota = quota;
  }
}

const CLASS_OF_CODE = {
  GpuUnavailable: WebGpuUnavailableError,
  BackendUnavailable: WebGpuUnavailableError,
  FeatureMissing: FeatureMissingError,
  DeviceLost: DeviceLostError,
  OverLimit: ModelTooLargeError,
  GpuOutOfMemory: ModelTooLargeError,
  RequestTooLarge: KvCacheFullError,
  KvPoolExhausted: KvCacheFullError,
  Io: InvalidModelError,
  ModelFile: InvalidModelError,
  ModelTensor: InvalidModelError,
  UnsupportedArchitecture: InvalidModelError,
  Tokenizer: InvalidModelError,
  Crashed: EngineCrashedError,
  QuotaExceeded: QuotaExceededError,
};

export const ERROR_CLASSES = {
  TwinferError,
  WebGpuUnavailableError,
  FeatureMissingError,
  DeviceLostError,
  ModelTooLargeError,
  KvCacheFullError,
  InvalidModelError,
  EngineCrashedError,
  QuotaExceededError,
};

/** The package error for an engine error code. */
export function errorFor(code, message, cause) {
  const Class = CLASS_OF_CODE[code] ?? TwinferError;
  return new Class(message, { code, cause });
}

/**
 * Turns whatever a wasm call threw into a package error. A `WebAssembly.RuntimeError` is a Rust
 * panic (a bug): it becomes an EngineCrashedError and `onCrash` marks the instance unusable.
 */
export function fromWasm(e, onCrash) {
  if (e instanceof TwinferError) return e;
  if (typeof WebAssembly !== "undefined" && e instanceof WebAssembly.RuntimeError) {
    onCrash?.();
    return errorFor(
      "Crashed",
      `the engine stopped on an internal error (${e.message}); create a new Twinfer instance`,
      e,
    );
  }
  if (e && typeof e === "object" && e.name === "TwinferError") {
    return errorFor(e.code ?? "Other", e.message, e);
  }
  if (e instanceof Error) return new TwinferError(e.message, { cause: e });
  return new TwinferError(String(e));
}

/** An error as postMessage sends it: { name, code, message } and a subclass's own figures. */
export function serialize(e) {
  const out = {};
  if (e && typeof e === "object") {
    for (const [k, v] of Object.entries(e)) if (v === null || ["string", "number", "boolean"].includes(typeof v)) out[k] = v;
  }
  return { ...out, name: e?.name ?? "Error", code: e?.code, message: e?.message ?? String(e) };
}

/** Rebuilds an error sent across postMessage by `serialize`. */
export function revive({ name, code, message, ...fields }) {
  const Class = ERROR_CLASSES[name] ?? TwinferError;
  const error = new Class(message, { code });
  for (const [k, v] of Object.entries(fields)) if (!(k in error) || error[k] === null) error[k] = v;
  return error;
}

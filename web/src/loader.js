// Loads the wasm module once per realm (page, worker or Node process): the browser fetches it
// next to this file; Node reads it from disk. The module is built with simd128, so a runtime
// without WebAssembly SIMD gets a FeatureMissingError instead of a compile error; a runtime with
// relaxed SIMD gets the build that uses it. The threaded build (see threads.js) is loaded on its
// own, beside it.
import init, * as bindings from "../pkg/twinfer_web.js";
import { FeatureMissingError } from "./errors.js";

const IS_NODE = typeof process !== "undefined" && !!process.versions?.node && typeof window === "undefined";

// The smallest module that uses a v128 instruction (i8x16.splat, i8x16.popcnt).
const SIMD_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11,
]);

// A module whose `f` returns lane 0 of i32x4.relaxed_dot_i8x16_i7x16_add_s(2s, 3s, 0) after
// an f32x4.relaxed_madd: 24 by the finished proposal (four products of 6). Validating is not
// enough: Node 20's V8 accepts the opcodes behind a flag but computes an earlier draft's dot
// product (48 here), and the 4-bit weight kernels would then give wrong numbers.
const BYTES = (v) => [253, 12, ...Array(16).fill(v)];
const RELAXED_BODY = [
  0, ...BYTES(0), ...BYTES(0), ...BYTES(0), 253, 133, 2, 26, // relaxed_madd, dropped
  ...BYTES(2), ...BYTES(3), ...BYTES(0), 253, 147, 2, 253, 27, 0, 11, // relaxed_dot, lane 0
];
const RELAXED_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 127, 3, 2, 1, 0, 7, 5, 1, 1, 102, 0, 0,
  10, RELAXED_BODY.length + 2, 1, RELAXED_BODY.length, ...RELAXED_BODY,
]);

export function hasWasmSimd() {
  return typeof WebAssembly === "object" && WebAssembly.validate(SIMD_PROBE);
}

/** Whether the runtime has relaxed SIMD as finished (Chromium 114 and later), checked by running
 * it: validation alone would accept Node 20's draft under its flag. */
export function hasRelaxedSimd() {
  if (typeof WebAssembly !== "object" || !WebAssembly.validate(RELAXED_PROBE)) return false;
  try {
    return new WebAssembly.Instance(new WebAssembly.Module(RELAXED_PROBE)).exports.f() === 24;
  } catch {
    return false;
  }
}

let ready;

/** The bindings, initialised; `wasmUrl` overrides where the .wasm file is. */
export function loadBindings(wasmUrl) {
  ready ??= (async () => {
    if (!hasWasmSimd()) {
      throw new FeatureMissingError(
        "this runtime has no WebAssembly SIMD (simd128); twinfer needs it (Chrome 91+, Firefox 89+, Safari 16.4+, Node 16.4+)",
        { code: "FeatureMissing" },
      );
    }
    // The relaxed-SIMD build where the runtime has it (its multiply-adds are one instruction),
    // else the plain one; `wasmUrl` (a bundler moved the file) is taken as given.
    const url =
      wasmUrl ??
      (hasRelaxedSimd()
        ? new URL("../pkg/twinfer_web_relaxed_bg.wasm", import.meta.url)
        : new URL("../pkg/twinfer_web_bg.wasm", import.meta.url));
    if (IS_NODE) {
      const { readFile } = await import("#platform");
      await init({ module_or_path: await readFile(url) });
    } else {
      await init({ module_or_path: url });
    }
    return bindings;
  })();
  ready.catch(() => {
    ready = undefined;
  });
  return ready;
}

let threaded;

/**
 * The threaded build's bindings (relaxed SIMD, shared memory, the CPU engine only), its pool sized
 * to `threads` and served by `threads - 1` workers: `{ bindings, threads, workers }` (the workers
 * that answered). Once per realm: a later call gets the pool the first one made.
 */
export function loadThreadedBindings(threads) {
  threaded ??= (async () => {
    const glue = await import("../pkg/threads/twinfer_web.js");
    const url = new URL("../pkg/threads/twinfer_web_bg.wasm", import.meta.url);
    const response = await fetch(url);
    if (!response.ok) throw new Error(`fetching ${url}: ${response.status} ${response.statusText}`);
    const module = await WebAssembly.compile(await response.arrayBuffer());
    const exports = await glue.default({ module_or_path: module });
    glue.setThreads(threads);
    const { startWorkers } = await import("./threads.js");
    const workers = await startWorkers(module, exports.memory, threads - 1);
    return { bindings: glue, threads, workers };
  })();
  threaded.catch(() => {
    threaded = undefined;
  });
  return threaded;
}

export { IS_NODE };

// Loads the wasm module once per realm (page, worker or Node process): the browser fetches it
// next to this file; Node reads it from disk. The module is built with simd128, so a runtime
// without WebAssembly SIMD gets a FeatureMissingError instead of a compile error.
import init, * as bindings from "../pkg/twinfer_web.js";
import { FeatureMissingError } from "./errors.js";

const IS_NODE = typeof process !== "undefined" && !!process.versions?.node && typeof window === "undefined";

// The smallest module that uses a v128 instruction (i8x16.splat, i8x16.popcnt).
const SIMD_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11,
]);

export function hasWasmSimd() {
  return typeof WebAssembly === "object" && WebAssembly.validate(SIMD_PROBE);
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
    const url = wasmUrl ?? new URL("../pkg/twinfer_web_bg.wasm", import.meta.url);
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

export { IS_NODE };

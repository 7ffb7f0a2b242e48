// Runtimes the package cannot use, and models that cannot fit: typed errors at once, not a
// compile error or an out-of-memory trap. A separate file: it stubs WebAssembly.validate for the
// whole process.
import { test } from "node:test";
import assert from "node:assert/strict";

test("a runtime without WebAssembly SIMD gets FeatureMissingError; with it, the engine opens", async () => {
  const { Twinfer, FeatureMissingError, hasWasmSimd } = await import("../src/index.js");
  assert.equal(hasWasmSimd(), true);
  const validate = WebAssembly.validate;
  WebAssembly.validate = () => false;
  try {
    assert.equal(hasWasmSimd(), false);
    await assert.rejects(Twinfer.create({ backend: "wasm" }), (e) => e instanceof FeatureMissingError && /SIMD/.test(e.message));
  } finally {
    WebAssembly.validate = validate;
  }
  // The failed load is not cached: the same page can try again once the cause is gone.
  const tf = await Twinfer.create({ backend: "wasm" });
  assert.equal(tf.info().backend, "wasm");
});

test("a model file larger than WebAssembly memory is ModelTooLargeError before any download", async () => {
  const { Twinfer, ModelTooLargeError } = await import("../src/index.js");
  const tf = await Twinfer.create({ backend: "wasm" });
  const huge = new Response(new Uint8Array(16), { headers: { "content-length": String(3 * 2 ** 30) } });
  const files = new Map([
    ["config.json", new TextEncoder().encode("{}").buffer],
    ["tokenizer.json", new TextEncoder().encode("{}").buffer],
    ["model.safetensors", huge],
  ]);
  await assert.rejects(tf.loadModel(files), (e) => e instanceof ModelTooLargeError && /model\.safetensors/.test(e.message));
  // Nothing was lost: the instance still works.
  assert.equal(tf.info().model, null);
  assert.equal((await tf.metrics().catch((e) => e)).code, "InvalidParameter");
});

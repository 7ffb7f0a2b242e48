// The wasm runtime keeps a model's float weights where the download put them: loading an f16
// decoder (tiny-llama's config with 12 layers and a 1024-wide MLP, 23 MB of weights written here)
// must grow the WebAssembly memory by at most 1.3x the weight bytes. A copy of the weights, which
// an earlier loader made, is 2x or more. Its own file, so `node --test` gives it its own process
// and a fresh wasm memory, which only grows: its size after the load is the peak.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

import { Twinfer } from "../src/index.js";
import { syntheticSafetensors } from "./synthetic-model.mjs";

const MODELS = process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models");
const LLAMA = join(MODELS, "tiny-llama");
const [LAYERS, HIDDEN, KV_DIM, INTER, VOCAB] = [12, 256, 64, 1024, 512];
const BOUND = 1.3;

test("an f16 model's weights are not copied in wasm memory", async () => {
  const config = JSON.parse(readFileSync(join(LLAMA, "config.json"), "utf8"));
  Object.assign(config, { num_hidden_layers: LAYERS, intermediate_size: INTER, torch_dtype: "float16" });
  assert.equal(config.hidden_size, HIDDEN);
  const model = syntheticSafetensors({ layers: LAYERS, hidden: HIDDEN, kvDim: KV_DIM, inter: INTER, vocab: VOCAB });
  const tf = await Twinfer.create({ backend: "wasm" });
  try {
    const before = tf.info().wasmMemoryBytes;
    assert.ok(before > 0, "info() reports the wasm memory");
    const files = new Map([
      ["config.json", new TextEncoder().encode(JSON.stringify(config)).buffer],
      ["tokenizer.json", readFileSync(join(LLAMA, "tokenizer.json"))],
      ["model.safetensors", model],
    ]);
    await tf.loadModel(files, { kvMemoryBytes: 1 << 20 });
    // One step, so that the forward pass's buffers count too.
    for await (const _ of tf.generate([3, 141, 59], { maxTokens: 2, ignoreEos: true }));
    const grown = tf.info().wasmMemoryBytes - before;
    const ratio = grown / model.byteLength;
    console.log(`wasm memory grew by ${(grown / 1e6).toFixed(1)} MB for ${(model.byteLength / 1e6).toFixed(1)} MB of f16 weights: ${ratio.toFixed(3)}x`);
    assert.ok(ratio <= BOUND, `loading grew wasm memory by ${ratio.toFixed(2)}x the weights (at most ${BOUND}x)`);
  } finally {
    await tf.dispose();
  }
});

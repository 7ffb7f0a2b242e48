// In-situ quantization in wasm (`loadModel(..., { quantize })`) converts each projection as the
// safetensors bytes arrive: the float file is never held. Loading a bf16 decoder of 46 MB with
// q4_0 must grow the WebAssembly memory by well under the file's size; a loader that held the
// file (or a float copy) would grow it by at least the file. Its own file, so `node --test` gives
// it its own process and a fresh wasm memory, which only grows: its size afterwards is the peak.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

import { Twinfer } from "../src/index.js";
import { syntheticSafetensors } from "./synthetic-model.mjs";

const MODELS = process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models");
const LLAMA = join(MODELS, "tiny-llama");
const [LAYERS, HIDDEN, KV_DIM, INTER, VOCAB] = [24, 256, 64, 1024, 512];
// q4_0 is 4.5 bits a weight against bf16's 16, and the tied table's Q8_0 8.5: the quantized model
// is 0.29x the file. Half the file leaves room for the forward pass's buffers and the allocator.
const BOUND = 0.5;

test("a bf16 model loaded with quantize: q4_0 never holds its float file in wasm memory", async () => {
  const config = JSON.parse(readFileSync(join(LLAMA, "config.json"), "utf8"));
  Object.assign(config, {
    num_hidden_layers: LAYERS,
    intermediate_size: INTER,
    torch_dtype: "bfloat16",
    tie_word_embeddings: true,
  });
  assert.equal(config.hidden_size, HIDDEN);
  const model = syntheticSafetensors({
    layers: LAYERS, hidden: HIDDEN, kvDim: KV_DIM, inter: INTER, vocab: VOCAB, dtype: "BF16", tied: true,
  });
  const files = () =>
    new Map([
      ["config.json", new TextEncoder().encode(JSON.stringify(config)).buffer],
      ["tokenizer.json", readFileSync(join(LLAMA, "tokenizer.json"))],
      ["model.safetensors", model],
    ]);
  const tf = await Twinfer.create({ backend: "wasm" });
  try {
    const before = tf.info().wasmMemoryBytes;
    await tf.loadModel(files(), { quantize: "q4_0", kvMemoryBytes: 1 << 20 });
    assert.match(tf.info().model.description, /q4_0/);
    const first = [];
    for await (const t of tf.generate([3, 141, 59], { maxTokens: 4, ignoreEos: true })) first.push(t.tokenId);
    const grown = tf.info().wasmMemoryBytes - before;
    const ratio = grown / model.byteLength;
    console.log(
      `quantize q4_0: wasm memory grew by ${(grown / 1e6).toFixed(1)} MB for a ${(model.byteLength / 1e6).toFixed(1)} MB bf16 file: ${ratio.toFixed(3)}x`,
    );
    assert.ok(ratio <= BOUND, `loading grew wasm memory by ${ratio.toFixed(2)}x the file (at most ${BOUND}x)`);
    // A bad format name is a typed error before any byte is read.
    await assert.rejects(tf.loadModel(files(), { quantize: "q3_x" }), /unknown quantization/);
    // The same model loaded again gives the same tokens.
    await tf.loadModel(files(), { quantize: "q4_0", kvMemoryBytes: 1 << 20 });
    const again = [];
    for await (const t of tf.generate([3, 141, 59], { maxTokens: 4, ignoreEos: true })) again.push(t.tokenId);
    assert.deepEqual(again, first);
  } finally {
    await tf.dispose();
  }
});

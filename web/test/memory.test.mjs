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

const MODELS = process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models");
const LLAMA = join(MODELS, "tiny-llama");
const [LAYERS, HIDDEN, KV_DIM, INTER, VOCAB] = [12, 256, 64, 1024, 512];
const BOUND = 1.3;

/** f32 -> f16 bits (round to nearest even), for the weights below. */
function f16Bits(x) {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000;
  const exp = ((u >>> 23) & 0xff) - 127 + 15;
  const mant = u & 0x7fffff;
  if (exp <= 0) return sign; // the values below are far from f16's subnormals
  let h = sign | (exp << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1))) h += 1;
  return h;
}

/** The model's safetensors file: f16 weights of small seeded values, norms at 1. */
function weights() {
  const tensors = [
    ["model.embed_tokens.weight", [VOCAB, HIDDEN]],
    ["lm_head.weight", [VOCAB, HIDDEN]],
    ["model.norm.weight", [HIDDEN]],
  ];
  for (let i = 0; i < LAYERS; i++) {
    const l = `model.layers.${i}`;
    tensors.push(
      [`${l}.input_layernorm.weight`, [HIDDEN]],
      [`${l}.post_attention_layernorm.weight`, [HIDDEN]],
      [`${l}.self_attn.q_proj.weight`, [HIDDEN, HIDDEN]],
      [`${l}.self_attn.k_proj.weight`, [KV_DIM, HIDDEN]],
      [`${l}.self_attn.v_proj.weight`, [KV_DIM, HIDDEN]],
      [`${l}.self_attn.o_proj.weight`, [HIDDEN, HIDDEN]],
      [`${l}.mlp.gate_proj.weight`, [INTER, HIDDEN]],
      [`${l}.mlp.up_proj.weight`, [INTER, HIDDEN]],
      [`${l}.mlp.down_proj.weight`, [HIDDEN, INTER]],
    );
  }
  const header = {};
  let offset = 0;
  for (const [name, shape] of tensors) {
    const bytes = shape.reduce((a, b) => a * b, 1) * 2;
    header[name] = { dtype: "F16", shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  while (json.length % 8) json += " ";
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(new TextEncoder().encode(json), 8);
  const data = new Uint16Array(out.buffer, 8 + json.length, offset / 2);
  let at = 0;
  for (const [name, shape] of tensors) {
    const n = shape.reduce((a, b) => a * b, 1);
    for (let i = 0; i < n; i++, at++) {
      data[at] = name.endsWith("norm.weight") ? f16Bits(1) : f16Bits((((i * 7919 + at) % 2001) / 2000) * 0.07 - 0.035);
    }
  }
  return out.buffer;
}

test("an f16 model's weights are not copied in wasm memory", async () => {
  const config = JSON.parse(readFileSync(join(LLAMA, "config.json"), "utf8"));
  Object.assign(config, { num_hidden_layers: LAYERS, intermediate_size: INTER, torch_dtype: "float16" });
  assert.equal(config.hidden_size, HIDDEN);
  const model = weights();
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

// A 0.5B decoder in the browser's wasm fallback: Qwen2.5-0.5B's shapes (24 layers, hidden 896,
// 14/2 heads, MLP 4864, vocab 151,936, tied embeddings, q/k/v biases) with seeded bf16 weights,
// 988 MB on disk, loaded by headless Chromium without WebGPU with `quantize: "q4_0"`, then 16
// greedy tokens. Prints the WebAssembly memory (it only grows, so its size at the end is the
// peak), the load and token times, and writes test-artifacts/edge-memory.json.
// The weights are random (no download here); memory and time do not depend on their values. The
// tokenizer is tiny-qwen2's stand-in: Qwen's real tokenizer.json (7 MB, 151,643 merges) adds its
// own tables, which this run does not count.
// Usage: node bench/edge-memory.mjs [--quantize q4_0] [--tokens 16] [--limit-mb 600]
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

import { serve } from "../demo/serve.mjs";
import { syntheticSafetensors } from "../test/synthetic-model.mjs";

const { values } = parseArgs({
  options: {
    quantize: { type: "string", default: "q4_0" },
    tokens: { type: "string", default: "16" },
    "limit-mb": { type: "string", default: "600" },
  },
});
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const MODELS = process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models");
const NAME = "synthetic-qwen2.5-0.5b";
const DIR = join(MODELS, NAME);

// Qwen2.5-0.5B-Instruct's config.json, as published.
const CONFIG = {
  architectures: ["Qwen2ForCausalLM"],
  bos_token_id: 151643,
  eos_token_id: 151645,
  hidden_act: "silu",
  hidden_size: 896,
  intermediate_size: 4864,
  max_position_embeddings: 32768,
  max_window_layers: 21,
  model_type: "qwen2",
  num_attention_heads: 14,
  num_hidden_layers: 24,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000.0,
  sliding_window: 32768,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  use_sliding_window: false,
  vocab_size: 151936,
};

if (!existsSync(join(DIR, "model.safetensors"))) {
  console.log(`writing ${DIR} (988 MB of seeded bf16 weights) ...`);
  mkdirSync(DIR, { recursive: true });
  const c = CONFIG;
  const kvDim = (c.hidden_size / c.num_attention_heads) * c.num_key_value_heads;
  const bytes = syntheticSafetensors({
    layers: c.num_hidden_layers, hidden: c.hidden_size, kvDim, inter: c.intermediate_size, vocab: c.vocab_size,
    dtype: "BF16", tied: true, qkvBias: true,
  });
  writeFileSync(join(DIR, "model.safetensors"), new Uint8Array(bytes));
  writeFileSync(join(DIR, "config.json"), JSON.stringify(CONFIG, null, 2));
  writeFileSync(join(DIR, "tokenizer.json"), readFileSync(join(MODELS, "tiny-qwen2", "tokenizer.json")));
}
const fileBytes = readFileSync(join(DIR, "model.safetensors")).byteLength;

const server = await serve(0);
let result;
try {
  // No --enable-unsafe-webgpu: requestAdapter() returns null and `auto` takes the wasm fallback.
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-first-run", "--disable-background-networking"] });
  try {
    const page = await browser.newPage();
    const logs = [];
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    await page.goto(`${server.url}/demo/`);
    result = await page.evaluate(
      async ({ url, quantize, tokens }) => {
        const { Twinfer } = await import("/src/index.js");
        const tf = await Twinfer.create({ backend: "auto" });
        const before = tf.info().wasmMemoryBytes;
        const t0 = performance.now();
        await tf.loadModel(url, { quantize, cache: false, kvMemoryBytes: 32 << 20 });
        const loadMs = performance.now() - t0;
        const afterLoad = tf.info().wasmMemoryBytes;
        const ids = [];
        let last;
        const it = tf.generate([17, 42, 311, 5, 99, 256, 7, 400], { maxTokens: tokens, ignoreEos: true });
        for (;;) {
          const r = await it.next();
          if (r.done) {
            last = r.value;
            break;
          }
          ids.push(r.value.tokenId);
        }
        const info = tf.info();
        return { before, afterLoad, after: info.wasmMemoryBytes, loadMs, ids, metrics: last.metrics, info };
      },
      { url: `/models/${NAME}/`, quantize: values.quantize, tokens: Number(values.tokens) },
    );
    result.logs = logs;
  } finally {
    await browser.close();
  }
} finally {
  await server.close();
}

const mb = (b) => (b / 1e6).toFixed(0);
const limit = Number(values["limit-mb"]) * 1e6;
console.log(`engine: ${result.info.backend} (${result.info.reason}); model: ${result.info.model.description}`);
console.log(`file: ${mb(fileBytes)} MB bf16; wasm memory: ${mb(result.before)} MB before, ${mb(result.afterLoad)} MB after the load, ${mb(result.after)} MB after ${result.ids.length} tokens (limit ${values["limit-mb"]} MB)`);
console.log(`load (download + convert): ${(result.loadMs / 1000).toFixed(1)} s; TTFT ${result.metrics.ttft.toFixed(0)} ms, TPOT ${result.metrics.tpot.toFixed(1)} ms`);
mkdirSync(new URL("../test-artifacts/", import.meta.url), { recursive: true });
writeFileSync(new URL("../test-artifacts/edge-memory.json", import.meta.url), JSON.stringify({ fileBytes, ...result }, null, 2));
if (result.info.backend !== "wasm") throw new Error(`expected the wasm fallback, got ${result.info.backend}`);
if (result.after > limit) {
  console.error(`FAIL: ${mb(result.after)} MB of wasm memory, above ${values["limit-mb"]} MB`);
  process.exit(1);
}
console.log("PASS: within the limit");

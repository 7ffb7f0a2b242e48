// The package in headless Chromium (Debian's, driven by playwright-core), through the demo page:
//   1. with WebGPU (--enable-unsafe-webgpu: SwiftShader), `auto` picks WebGPU;
//   2. without it, `auto` falls back to wasm SIMD and says why, and the demo's chat mode talks to
//      SmolLM2 (Q4_1 GGUF) over two turns;
//   3. `wasm` forced; 4. the Web Worker mode (WebGPU and wasm); 5. a GPU lost mid-generation (on
//   the page of 1); 6. SmolLM2 Q4_1 on WebGPU against the reference's greedy tokens.
// Each run's embeddings must match the numpy reference (per element, and unit norm) and its greedy tokens
// the reference decoder's. A screenshot of each finished demo goes to test-artifacts/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

import { checkEmbedding } from "./embedding-check.mjs";
import { serve } from "../demo/serve.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const MODELS = process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models");
const ARTIFACTS = new URL("../test-artifacts/", import.meta.url);
const BASE_FLAGS = ["--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"];
const WEBGPU_FLAGS = ["--enable-unsafe-webgpu"];

const minilm = JSON.parse(readFileSync(join(MODELS, "all-MiniLM-L6-v2/golden.json"), "utf8"));
const llama = JSON.parse(readFileSync(join(MODELS, "tiny-llama/golden.json"), "utf8"));
let server;

before(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install chromium (or set CHROMIUM)`);
  mkdirSync(ARTIFACTS, { recursive: true });
  server = await serve(0);
});
after(() => server?.close());

const ALL_SENTENCES = minilm.sentences.map((_, i) => i);
// On SwiftShader the 20 reference sentences took 75 s to embed (seconds a sentence, whatever its
// length: the encoder's GPU path still reads back between layers), so the WebGPU page checks four
// (5, 2, 29 and 100 tokens: 31 s); the wasm pages and the native GPU suite
// (tests/tests/encoder_model.rs, lavapipe, up to 256 tokens) check all 20.
const WEBGPU_SENTENCES = [0, 2, 9, 17];

/** Runs the demo with `query` in a fresh browser; returns its result and the page's info.
 * `sentences` are the indices of the reference sentences whose embeddings are checked. */
async function runDemo({ flags, query, screenshot, after, sentences = ALL_SENTENCES }) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: [...BASE_FLAGS, ...flags] });
  try {
    const page = await browser.newPage({ viewport: { width: 1000, height: 1400 } });
    const logs = [];
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
    const params = new URLSearchParams({ auto: "1", genModel: "/models/tiny-llama/", promptIds: llama.prompt_ids.join(","), maxTokens: String(llama.greedy_ids.length), ...query });
    await page.goto(`${server.url}/demo/?${params}`);
    await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, { timeout: 480_000 });
    const error = await page.evaluate(() => window.demoError ?? null);
    assert.equal(error, null, `the demo failed: ${JSON.stringify(error)}\n${logs.join("\n")}`);
    const result = await page.evaluate(() => ({ ...window.demoResult, progress: window.demoProgress, times: window.demoTimes }));
    console.log(`demo phases (ms): ${JSON.stringify(result.times)}`);
    let started = Date.now();
    const texts = sentences.map((i) => minilm.sentences[i]);
    const embeddings = await page.evaluate((s) => window.demo.embed(s), texts);
    console.log(`the test's embedding check on the page: ${Date.now() - started} ms`);
    if (screenshot) await page.screenshot({ path: new URL(screenshot, ARTIFACTS).pathname, fullPage: true });
    started = Date.now();
    const extra = after ? await after(page) : null;
    if (after) console.log(`the test's own steps on the page: ${Date.now() - started} ms`);
    return { result, embeddings, sentences, logs, extra };
  } finally {
    await browser.close();
  }
}

function checkOutputs({ result, embeddings, sentences }) {
  assert.deepEqual(result.generated.tokens, llama.greedy_ids, "greedy tokens of the reference decoder");
  assert.equal(embeddings.length, sentences.length);
  let worst = 0;
  for (const [j, i] of sentences.entries()) {
    worst = Math.max(worst, checkEmbedding(embeddings[j], minilm.embeddings[i], `sentence ${i}`));
  }
  console.log(`browser embeddings: worst error ${worst.toExponential(2)} against the float64 reference (${sentences.length} sentences)`);
  // The semantic search put the password sentences first.
  assert.match(result.ranking[0].s, /password|login/i);
  const m = result.metrics;
  // Where a slow run's time went (the WebGPU page on SwiftShader takes minutes).
  console.log(`demo generation: TTFT p50 ${m.ttft.p50.toFixed(1)} ms, TPOT p50 ${m.tpot.p50.toFixed(1)} ms, ${m.generatedTokens} tokens`);
  assert.equal(m.generatedTokens, llama.greedy_ids.length);
  assert.ok(m.ttft.p50 > 0 && m.tpot.p50 > 0 && m.tps > 0);
}

// SmolLM2 Q4_1 on WebGPU (SwiftShader: about 75 s for a 37-token prompt and 4 steps): the
// reference's greedy tokens up to its first near-tie, for every prompt of the reference. Long
// tier only (TWINFER_BROWSER_GGUF_ALL=1, scripts/test-long.sh): the quick tier checks the same
// model on the resident GPU path on lavapipe (tests/tests/gguf_model.rs) and the quantized
// kernels in this browser (tests/tests/webgpu_browser.rs), and CI's time does not fit it.
const GGUF_STEPS = 4;
const GGUF_ALL = process.env.TWINFER_BROWSER_GGUF_ALL === "1";
const GGUF_SKIP = GGUF_ALL
  ? false
  : "SKIPPED in the quick tier: SmolLM2 Q4_1 on WebGPU runs in the long tier (TWINFER_BROWSER_GGUF_ALL=1)";
test("on WebGPU, the Q4_1 GGUF chat model gives the reference's greedy tokens", { skip: GGUF_SKIP }, async () => {
  const g = JSON.parse(readFileSync(join(MODELS, "smollm2/golden.json"), "utf8"));
  const prompts = g.prompts;
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: [...BASE_FLAGS, ...WEBGPU_FLAGS] });
  try {
    const page = await browser.newPage();
    await page.goto(`${server.url}/demo/`);
    const info = await page.evaluate(async () => {
      const i = await window.demo.loadDecoder("/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
      return { backend: i.backend, reason: i.reason };
    });
    assert.equal(info.backend, "webgpu", info.reason);
    // The device keeps the blocks quantized and decodes each weight exactly, with f32
    // activations: within 1e-5 of the top logits (about 32; tests/tests/gguf_model.rs), so two
    // logits can swap only where the reference's top-2 margin is under twice that.
    const nearTie = 2 * 1e-5 * 32;
    let checked = 0;
    for (const p of prompts) {
      const cut = p.margins.findIndex((m) => m < nearTie);
      const n = Math.min(GGUF_STEPS, cut < 0 ? p.greedy.length : cut);
      const started = Date.now();
      const got = await page.evaluate(([ids, steps]) => window.demo.generateIds(ids, steps), [p.ids, n]);
      console.log(`WebGPU Q4_1: ${p.ids.length}-token prompt and ${n} steps in ${Date.now() - started} ms`);
      assert.deepEqual(got, p.greedy.slice(0, n), `prompt ${JSON.stringify(p.message)}`);
      checked += n;
    }
    assert.equal(checked, prompts.length * GGUF_STEPS, "a near-tie cut the check short");
  } finally {
    await browser.close();
  }
});

// One WebGPU page serves both checks (the demo on SwiftShader takes minutes): first the demo's own
// run, then, on the same engines, a device lost mid-generation.
test("with WebGPU, auto picks WebGPU and matches the reference; a GPU lost mid-generation moves the work to wasm unchanged", async () => {
  const run = await runDemo({
    flags: WEBGPU_FLAGS,
    query: { backend: "auto" },
    screenshot: "demo-webgpu.png",
    sentences: WEBGPU_SENTENCES,
    after: (page) =>
      page.evaluate(
        async ({ ids, n, sentences }) => {
          const gen = window.demo.engines.gen;
          const before = gen.info();
          const tokens = [];
          for await (const t of gen.generate(ids, { maxTokens: n, ignoreEos: true })) {
            tokens.push(t.tokenId);
            if (tokens.length === 3) gen._loseDeviceForTest();
          }
          const embed = window.demo.engines.embed;
          embed._loseDeviceForTest();
          const vectors = (await embed.embed(sentences)).map((v) => [...v]);
          return { before, after: gen.info(), tokens, vectors, embedInfo: embed.info() };
        },
        { ids: llama.prompt_ids, n: llama.greedy_ids.length, sentences: minilm.sentences },
      ),
  });
  for (const info of [run.result.embedInfo, run.result.genInfo]) {
    assert.equal(info.backend, "webgpu", `${info.reason}\n${run.logs.join("\n")}`);
    assert.equal(info.adapter.architecture, "swiftshader");
  }
  assert.ok(run.result.progress.includes("upload"), `weights uploaded at load: ${run.result.progress}`);
  checkOutputs(run);

  const x = run.extra;
  assert.equal(x.before.backend, "webgpu");
  assert.deepEqual(x.tokens, llama.greedy_ids);
  assert.equal(x.after.backend, "wasm", x.after.reason);
  assert.match(x.after.reason, /lost/);
  assert.equal(x.embedInfo.backend, "wasm");
  // After the loss the embedder runs on wasm: all the sentences again.
  checkOutputs({ ...run, embeddings: x.vectors, sentences: ALL_SENTENCES });
});

test("without WebGPU, auto falls back to wasm SIMD and says why; the demo chats with SmolLM2", async () => {
  const run = await runDemo({
    flags: [],
    query: { backend: "auto" },
    screenshot: "demo-fallback.png",
    // Then, on the same page, the quantized chat model through the page's own chat mode.
    after: (page) =>
      page.evaluate(async () => {
        const info = await window.demo.loadDecoder("/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        const first = await window.demo.say("What is the capital of France?");
        const second = await window.demo.say("And what is the capital of Italy?");
        return { chat: info.model.chat, first, second };
      }),
  });
  const info = run.result.genInfo;
  assert.equal(info.backend, "wasm");
  // Chromium has relaxed SIMD, so the page runs (and this run checks) the relaxed-SIMD build.
  assert.equal(info.decode.variant, "simd128-relaxed");
  assert.match(info.reason, /WebGPU/);
  assert.ok(!run.result.progress.includes("upload"));
  checkOutputs(run);

  const { chat, first, second } = run.extra;
  assert.ok(chat, "the GGUF model has a chat template");
  assert.equal(first.text, "The capital of France is Paris.");
  assert.equal(first.reason, "eos");
  // The second turn's prompt is the whole conversation.
  assert.ok(second.promptTokens > first.promptTokens + 8, JSON.stringify(second));
  assert.match(second.output, /you: What is the capital of France\?\nmodel: The capital of France is Paris\.\n\nyou: And what is the capital of Italy\?\nmodel: /);
  assert.ok(second.text.length > 0);
});

test("forced wasm runs on the CPU even where WebGPU exists", async () => {
  const run = await runDemo({ flags: WEBGPU_FLAGS, query: { backend: "wasm" }, screenshot: "demo-wasm.png" });
  assert.equal(run.result.genInfo.backend, "wasm");
  checkOutputs(run);
});

// The worker on WebGPU repeats test 1's four minutes on SwiftShader in a worker's scope: it runs in
// the long tier (scripts/test-long.sh sets TWINFER_BROWSER_WORKER_GPU=1), the wasm worker always.
const WORKER_GPU = process.env.TWINFER_BROWSER_WORKER_GPU === "1";
test("the Web Worker mode gives the same results, on WebGPU and on wasm", async () => {
  if (WORKER_GPU) {
    const gpu = await runDemo({
      flags: WEBGPU_FLAGS,
      query: { backend: "auto", worker: "1" },
      screenshot: "demo-worker.png",
      sentences: WEBGPU_SENTENCES,
    });
    assert.equal(gpu.result.genInfo.backend, "webgpu", gpu.result.genInfo.reason);
    checkOutputs(gpu);
  } else {
    console.log("SKIPPED here: the worker on WebGPU (long tier: TWINFER_BROWSER_WORKER_GPU=1); the wasm worker runs");
  }
  // The demo server isolates its pages, so the worker takes the threaded build: one thread per
  // core the browser reports (at most 8).
  const cpu = await runDemo({
    flags: [],
    query: { backend: "wasm", worker: "1" },
    screenshot: "demo-worker.png",
    after: (page) => page.evaluate(() => navigator.hardwareConcurrency),
  });
  const info = cpu.result.genInfo;
  assert.equal(info.backend, "wasm");
  const cores = cpu.extra;
  assert.equal(info.decode.threads, Math.min(cores, 8), info.threadsReason);
  if (cores > 1) assert.match(info.threadsReason, /threaded build/);
  checkOutputs(cpu);
});

test("a panic on a CPU pool worker of the threaded build throws instead of hanging", async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: BASE_FLAGS });
  try {
    const page = await browser.newPage();
    await page.goto(`${server.url}/demo/`);
    const r = await page.evaluate(
      () =>
        new Promise((resolve) => {
          const w = new Worker(new URL("/test/pool-panic-worker.js", location.href), { type: "module" });
          const timer = setTimeout(() => resolve({ hung: true }), 60_000);
          w.onmessage = ({ data }) => {
            clearTimeout(timer);
            resolve(data);
          };
          w.onerror = (e) => {
            clearTimeout(timer);
            resolve({ error: e.message });
          };
          w.postMessage(null);
        }),
    );
    assert.equal(r.error, undefined, JSON.stringify(r));
    assert.equal(r.hung, undefined, "the call hung");
    assert.equal(r.threw, true, JSON.stringify(r));
    assert.equal(r.name, "RuntimeError", JSON.stringify(r));
    console.log(`the panicking pool call threw after ${r.ms.toFixed(0)} ms: ${r.name}: ${r.message}`);
  } finally {
    await browser.close();
  }
});

test("the threaded build's fallbacks: one thread, and why, without isolation or on the main thread", async () => {
  const notIsolated = await runDemo({ flags: [], query: { backend: "wasm", worker: "1", isolation: "0" }, sentences: [0, 9] });
  assert.equal(notIsolated.result.genInfo.decode.threads, 1);
  assert.match(notIsolated.result.genInfo.threadsReason, /not cross-origin isolated/);
  checkOutputs(notIsolated);
  const mainThread = await runDemo({ flags: [], query: { backend: "wasm", threads: "2" }, sentences: [0, 9] });
  assert.equal(mainThread.result.genInfo.decode.threads, 1);
  assert.match(mainThread.result.genInfo.threadsReason, /main thread/);
});

// The engine under load in wasm (Node), a shorter cousin of tests/tests/engine_stress.rs: 100
// seeded requests at once on the tiny Llama, with prompts over shared prefixes, random maxTokens,
// greedy and seeded sampling, stop strings, cancellations (leaving the loop early) and a KV pool
// of 12 pages that forces preemption. Each request's streamed text must equal its final text,
// and its tokens, reason and text must equal the same request run alone (a cancelled one: a
// prefix of it).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

import { Twinfer } from "../src/index.js";

const LLAMA = join(process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models"), "tiny-llama");
const file = (name) => {
  const b = readFileSync(join(LLAMA, name));
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
};

/** mulberry32: a small seeded generator, so a failure can be replayed. */
function rng(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Runs a request to its end (or cancels it after `cancelAfter` tokens): streamed text and result. */
async function run(tf, prompt, options, cancelAfter) {
  const iterator = tf.generate(prompt, options);
  let streamed = "";
  const ids = [];
  for (;;) {
    if (cancelAfter !== undefined && ids.length > cancelAfter) {
      // Leaving early cancels the request; what it produced is what was streamed.
      await iterator.return();
      return { streamed, result: { tokens: ids, text: streamed, reason: "cancelled" }, cancelled: true };
    }
    const r = await iterator.next();
    if (r.done) return { streamed, result: r.value, cancelled: false };
    streamed += r.value.text;
    ids.push(r.value.tokenId);
  }
}

test("100 random requests at once equal their solo runs, and the stream equals the text", async () => {
  const seed = Number(process.env.TWINFER_STRESS_SEED || 1);
  const random = rng(seed);
  const below = (n) => Math.floor(random() * n);
  const tf = await Twinfer.create({ backend: "wasm" });
  const files = new Map(["config.json", "tokenizer.json", "model.safetensors"].map((n) => [n, file(n)]));
  // 16-token pages of 2 layers x K and V x 1 KV head x 64 dims in f32: 16 KiB each; 12 of them.
  await tf.loadModel(files, { pageSize: 16, kvDtype: "f32", kvMemoryBytes: 12 * 16384, maxBatchTokens: 96 });
  const token = () => 2 + below(510);
  const prefixes = [0, 16, 40, 64].map((n) => Array.from({ length: n }, token));
  const calibration = await run(tf, [...prefixes[3], 5], { maxTokens: 24, ignoreEos: true });
  const text = calibration.result.text;
  const specs = Array.from({ length: 100 }, () => {
    const prompt = [...prefixes[below(4)], ...Array.from({ length: 1 + below(30) }, token)];
    const options = { maxTokens: 1 + below(24), ignoreEos: below(2) === 0 };
    if (below(10) < 3) Object.assign(options, { temperature: 0.9, topK: 40, topP: 0.9, seed: below(1e6) });
    if (below(10) < 3 && text.length > 2) options.stop = [text.slice(below(text.length - 2)).slice(0, 2)];
    return { prompt, options, cancelAfter: below(10) === 0 ? below(6) : undefined };
  });
  const together = await Promise.all(specs.map((s) => run(tf, s.prompt, s.options, s.cancelAfter)));
  const m = await tf.metrics();
  let preemptions = 0;
  for (let i = 0; i < specs.length; i++) {
    const got = together[i];
    preemptions += got.result.metrics?.preemptions ?? 0;
    assert.equal(got.streamed, got.result.text, `seed ${seed}, request ${i}: stream vs final text`);
    const alone = await run(tf, specs[i].prompt, specs[i].options);
    if (got.cancelled && got.result.reason === "cancelled") {
      assert.deepEqual(alone.result.tokens.slice(0, got.result.tokens.length), got.result.tokens, `request ${i}`);
      assert.ok(alone.result.text.startsWith(got.result.text), `seed ${seed}, request ${i}: cancelled text`);
    } else {
      const pick = (r) => ({ tokens: r.tokens, reason: r.reason, text: r.text });
      assert.deepEqual(pick(got.result), pick(alone.result), `seed ${seed}, request ${i}: under load vs alone`);
    }
  }
  assert.ok(preemptions > 0, `the 12-page pool never preempted (${m.requests} requests)`);
  console.log(`wasm stress: ${specs.length} requests, ${preemptions} preemptions, all equal to their solo runs`);
});

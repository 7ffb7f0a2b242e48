// The model cache in headless Chromium (Debian's, driven by playwright-core) against the demo
// server, in a browser profile on disk as a user's is:
//   1. the 98 MB SmolLM2 GGUF: the server cuts the first download on purpose; loadModel fails
//      with a Network error; the second resumes with a Range at the first chunk not stored (the
//      bytes sent in all are about the file's, not twice); the model answers "Paris"; after a
//      reload it loads from the cache with no request at all (Playwright's request log and the
//      server's), in the page and in a worker;
//   2. a quota set small through the DevTools protocol: loading a model in a worker is a typed
//      QuotaExceededError, nothing of it stays stored, and with the quota back it loads, is
//      listed, and generates the reference's tokens.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

import { serve } from "../demo/serve.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const MODELS = process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models");
const FLAGS = ["--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"];
const GGUF = "/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MiB = 1 << 20;
// The first download stops here, inside the third 16 MiB chunk: two chunks are stored.
const CUT = 40_000_000;

const smollm = JSON.parse(readFileSync(join(MODELS, "smollm2/golden.json"), "utf8"));
const llama = JSON.parse(readFileSync(join(MODELS, "tiny-llama/golden.json"), "utf8"));
const ggufBytes = readFileSync(join(MODELS, "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
const ggufSha256 = createHash("sha256").update(ggufBytes).digest("hex");

let server;
/** What the server saw: `{ url, range }` of every request for a model file. */
const served = [];
let cutNext = false;

before(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install chromium (or set CHROMIUM)`);
  server = await serve(0, {
    cutAfter: (req) => {
      if (!req.url.startsWith("/models/")) return undefined;
      served.push({ url: req.url, range: req.headers.range ?? null });
      if (cutNext && req.url === GGUF) {
        cutNext = false;
        return CUT;
      }
      return undefined;
    },
  });
});
after(() => server?.close());

/** A browser with a profile on disk (what a reload keeps, a user's browser keeps). */
async function openBrowser() {
  const profile = mkdtempSync(join(tmpdir(), "twinfer-cache-"));
  const context = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, headless: true, args: FLAGS });
  const page = context.pages()[0] ?? (await context.newPage());
  const logs = [];
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  // Playwright's request log: every model request the page or its workers make.
  const requests = [];
  page.on("request", (r) => {
    if (new URL(r.url()).pathname.startsWith("/models/")) requests.push({ url: new URL(r.url()).pathname, range: r.headers().range ?? null, request: r });
  });
  await page.goto(`${server.url}/demo/`);
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, page, logs, requests, close };
}

// In the page: the chat question of the golden file, greedy; plain data back.
const ASK = `async (tf, message) => {
  const tokens = [];
  let result;
  const it = tf.generate({ messages: [{ role: "user", content: message }] }, { maxTokens: 32 });
  for (;;) {
    const r = await it.next();
    if (r.done) { result = r.value; break; }
    tokens.push(r.value.tokenId);
  }
  return { tokens, text: result.text, reason: result.reason };
}`;

function checkAnswer(answer) {
  const first = smollm.prompts[0];
  const end = first.greedy.indexOf(2) + 1;
  assert.deepEqual(answer.tokens, first.greedy.slice(0, end), "greedy tokens of the reference, <|im_end|> included");
  assert.equal(answer.text, "The capital of France is Paris.");
  assert.equal(answer.reason, "eos");
}

test("the 98 MB GGUF: a download cut short resumes at the stored chunks, and after a reload it loads with no request", async () => {
  const started = Date.now();
  const b = await openBrowser();
  try {
    served.length = 0;
    cutNext = true;
    const first = await b.page.evaluate(async (url) => {
      const { Twinfer, listModels } = await import("/src/index.js");
      window.tf = await Twinfer.create({ backend: "wasm" });
      try {
        await window.tf.loadModel(url);
        return { loaded: true };
      } catch (e) {
        return { name: e.name, code: e.code, message: e.message, listed: (await listModels()).length };
      }
    }, GGUF);
    assert.equal(first.code, "Network", JSON.stringify(first));
    assert.equal(first.name, "TwinferError");
    assert.match(first.message, /stopped at byte \d+ of 98362432; the first 33554432 bytes are stored and loading again resumes/);
    assert.equal(first.listed, 0, "a model stored in part is not listed");

    // The bytes of each model response the page got (its Content-Length: the server sends that
    // many unless it cuts the response, as it did the first).
    const lengths = [];
    b.page.on("response", (r) => {
      if (new URL(r.url()).pathname === GGUF) lengths.push({ status: r.status(), bytes: Number(r.headers()["content-length"]) });
    });
    const second = await b.page.evaluate(
      async ({ url, sha256, ask }) => {
        const { listModels } = await import("/src/index.js");
        const progress = [];
        const t0 = performance.now();
        const info = await window.tf.loadModel(url, { sha256, onProgress: (p) => p.phase === "download" && progress.push(p) });
        const ms = performance.now() - t0;
        const answer = await eval(ask)(window.tf, "What is the capital of France?");
        return { description: info.model.description, ms, progress, answer, list: await listModels() };
      },
      { url: GGUF, sha256: ggufSha256, ask: ASK },
    );
    console.log(`resumed load of the GGUF (64.8 MB from the network, 33.5 MB from the cache, SHA-256 checked): ${second.ms.toFixed(0)} ms`);
    // Two requests in all: the one cut short, and the rest from the first chunk not stored.
    assert.deepEqual(served, [
      { url: GGUF, range: null },
      { url: GGUF, range: `bytes=${32 * MiB}-` },
    ]);
    assert.deepEqual(b.requests.map((r) => r.range), [null, `bytes=${32 * MiB}-`], "Playwright's log agrees");
    assert.deepEqual(lengths, [{ status: 206, bytes: ggufBytes.length - 32 * MiB }]);
    const sent = CUT + lengths[0].bytes;
    console.log(`bytes sent for the model: ${sent} for a file of ${ggufBytes.length} (${(sent / ggufBytes.length).toFixed(2)}x)`);
    assert.ok(sent < 1.1 * ggufBytes.length, `about the file's size, not twice: ${sent}`);
    const fromCache = second.progress.filter((p) => p.fromCache);
    assert.ok(fromCache.length > 0 && fromCache.every((p) => p.loaded <= 32 * MiB), "the stored chunks come first, from the cache");
    assert.ok(second.progress.some((p) => !p.fromCache && p.loaded > 32 * MiB));
    assert.equal(second.progress.at(-1).loaded, ggufBytes.length);
    assert.equal(second.progress.at(-1).total, ggufBytes.length);
    assert.match(second.description, /llama decoder: 30 layers/);
    checkAnswer(second.answer);
    assert.equal(second.list.length, 1);
    assert.equal(second.list[0].url, `${server.url}${GGUF}`);
    assert.equal(second.list[0].bytes, ggufBytes.length);
    assert.deepEqual(second.list[0].files, [{ name: "SmolLM2-135M-Instruct.Q4_1.gguf", url: `${server.url}${GGUF}`, bytes: ggufBytes.length, sha256: ggufSha256 }]);

    // A reload: the page starts over; the model comes from the cache with no request at all.
    served.length = 0;
    b.requests.length = 0;
    await b.page.reload();
    const third = await b.page.evaluate(
      async ({ url, ask }) => {
        const { Twinfer, hasModel } = await import("/src/index.js");
        const stored = await hasModel(url);
        const tf = await Twinfer.create({ backend: "wasm" });
        const progress = [];
        const t0 = performance.now();
        await tf.loadModel(url, { onProgress: (p) => p.phase === "download" && progress.push(p) });
        const ms = performance.now() - t0;
        const answer = await eval(ask)(tf, "What is the capital of France?");
        await tf.dispose();
        // The same in a worker (the same origin's cache).
        const remote = await Twinfer.create({ backend: "wasm", worker: true });
        const t1 = performance.now();
        await remote.loadModel(url);
        const workerMs = performance.now() - t1;
        const workerAnswer = await eval(ask)(remote, "What is the capital of France?");
        await remote.dispose();
        return { stored, ms, workerMs, progress, answer, workerAnswer };
      },
      { url: GGUF, ask: ASK },
    );
    console.log(`after a reload, the GGUF from the cache: ${third.ms.toFixed(0)} ms in the page, ${third.workerMs.toFixed(0)} ms in a worker (load and model build)`);
    assert.equal(third.stored, true);
    assert.deepEqual(b.requests, [], "Playwright saw no request for the model");
    assert.deepEqual(served, [], "the server saw none");
    assert.ok(third.progress.length > 0 && third.progress.every((p) => p.fromCache), JSON.stringify(third.progress.slice(0, 3)));
    assert.equal(third.progress.at(-1).text, "read from the cache");
    checkAnswer(third.answer);
    checkAnswer(third.workerAnswer);

    const removed = await b.page.evaluate(async (url) => {
      const { deleteModel, listModels } = await import("/src/index.js");
      return { removed: await deleteModel(url), again: await deleteModel(url), list: await listModels(), keys: (await (await caches.open("twinfer-models")).keys()).length };
    }, GGUF);
    assert.deepEqual(removed, { removed: true, again: false, list: [], keys: 0 });
  } catch (e) {
    console.log(b.logs.join("\n"));
    throw e;
  } finally {
    await b.close();
    console.log(`the GGUF cache test: ${Date.now() - started} ms`);
  }
});

test("a full quota is a typed QuotaExceededError (through a worker) and leaves nothing stored; with room the model loads", async () => {
  const started = Date.now();
  const b = await openBrowser();
  try {
    const cdp = await b.context.newCDPSession(b.page);
    await cdp.send("Storage.overrideQuotaForOrigin", { origin: server.url, quotaSize: 2 * MiB });
    const full = await b.page.evaluate(async () => {
      const { Twinfer, QuotaExceededError, TwinferError, listModels } = await import("/src/index.js");
      const tf = await Twinfer.create({ backend: "wasm", worker: true });
      window.tf = tf;
      try {
        await tf.loadModel("/models/tiny-llama/");
        return { loaded: true };
      } catch (e) {
        return {
          typed: e instanceof QuotaExceededError && e instanceof TwinferError,
          name: e.name,
          code: e.code,
          message: e.message,
          bytesNeeded: e.bytesNeeded,
          quota: e.quota,
          list: await listModels(),
          keys: (await (await caches.open("twinfer-models")).keys()).map((r) => r.url),
        };
      }
    });
    assert.equal(full.typed, true, JSON.stringify(full));
    assert.equal(full.name, "QuotaExceededError");
    assert.equal(full.code, "QuotaExceeded");
    const modelBytes = ["config.json", "tokenizer.json", "model.safetensors"].reduce((n, f) => n + readFileSync(join(MODELS, "tiny-llama", f)).length, 0);
    assert.equal(full.bytesNeeded, modelBytes);
    // navigator.storage.estimate() does not show the quota the DevTools protocol set.
    assert.equal(typeof full.quota, "number");
    assert.match(full.message, /needs 5\.\d MB/);
    assert.deepEqual(full.list, []);
    assert.deepEqual(full.keys, [], "nothing of the model stays stored");

    await cdp.send("Storage.overrideQuotaForOrigin", { origin: server.url });
    const roomy = await b.page.evaluate(
      async ({ ids, n }) => {
        const { listModels } = await import("/src/index.js");
        await window.tf.loadModel("/models/tiny-llama/");
        const tokens = [];
        for await (const t of window.tf.generate(ids, { maxTokens: n, ignoreEos: true })) tokens.push(t.tokenId);
        return { list: await listModels(), tokens };
      },
      { ids: llama.prompt_ids, n: llama.greedy_ids.length },
    );
    assert.deepEqual(roomy.tokens, llama.greedy_ids);
    assert.equal(roomy.list.length, 1);
    assert.equal(roomy.list[0].url, `${server.url}/models/tiny-llama/`);
    assert.equal(roomy.list[0].bytes, modelBytes);
    assert.deepEqual(roomy.list[0].files.map((f) => f.name).sort(), ["config.json", "model.safetensors", "tokenizer.json"]);
  } catch (e) {
    console.log(b.logs.join("\n"));
    throw e;
  } finally {
    await b.close();
    console.log(`the quota test: ${Date.now() - started} ms`);
  }
});

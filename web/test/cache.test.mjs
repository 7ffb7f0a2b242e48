// The model cache's logic in Node, against an in-memory Cache API (Node has none; the browser
// test, browser-cache.test.mjs, runs the real one in Chromium): downloads cut short resume at the
// first chunk not stored, a server that ignores ranges or a file that changed starts over, sizes
// and SHA-256 digests are checked, a full quota is a QuotaExceededError that leaves nothing
// behind, and a stored model loads without a single request. The files go to a sink that keeps
// them, in place of the wasm ModelFiles.
import { test, afterEach } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { homedir } from "node:os";
import { join } from "node:path";

import { collectFiles } from "../src/files.js";
import { InvalidModelError, QuotaExceededError, TwinferError, deleteModel, hasModel, listModels } from "../src/index.js";
import { serve } from "../demo/serve.mjs";

const MODELS = process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models");
const GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MiB = 1 << 20;
const sha256 = (b) => createHash("sha256").update(b).digest("hex");

/** A Cache API in memory, installed as `globalThis.caches`; `quota` bytes of bodies at most. */
function installCache({ quota = Infinity } = {}) {
  const entries = new Map();
  let used = 0;
  const keyOf = (r) => (typeof r === "string" ? r : r.url);
  const cache = {
    entries,
    async match(r) {
      const body = entries.get(keyOf(r));
      return body && new Response(body.slice());
    },
    async put(r, response) {
      const body = new Uint8Array(await response.arrayBuffer());
      const old = entries.get(keyOf(r))?.byteLength ?? 0;
      if (used - old + body.byteLength > quota) throw new DOMException("the quota is full", "QuotaExceededError");
      used += body.byteLength - old;
      entries.set(keyOf(r), body);
    },
    async delete(r) {
      const body = entries.get(keyOf(r));
      if (body) used -= body.byteLength;
      return entries.delete(keyOf(r));
    },
    async keys() {
      return [...entries.keys()].map((k) => new Request(k));
    },
  };
  globalThis.caches = { open: async () => cache };
  return cache;
}

afterEach(() => {
  delete globalThis.caches;
});

/** Stands in for the wasm ModelFiles: keeps what is written. */
function sink() {
  const files = new Map();
  return {
    begin: (name) => files.set(name, []),
    append: (name, chunk) => files.get(name).push(Buffer.from(chunk)),
    bytes: (name) => Buffer.concat(files.get(name)),
    names: () => [...files.keys()],
  };
}

/**
 * A server of one file whose bytes, ETag and manners the test sets: `ignoreRange` answers every
 * request 200; `cut` drops the next response after that many bytes. `log` has each request's range.
 */
async function fileServer(state) {
  const log = [];
  const server = createServer((req, res) => {
    log.push(req.headers.range ?? null);
    const data = state.data;
    let start = 0;
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    const headers = { "content-type": "application/octet-stream" };
    if (state.etag) headers.etag = state.etag;
    if (m && !state.ignoreRange) {
      start = Number(m[1]);
      headers["content-range"] = `bytes ${start}-${data.length - 1}/${data.length}`;
    }
    headers["content-length"] = data.length - start;
    res.writeHead(start > 0 || (m && !state.ignoreRange) ? 206 : 200, headers);
    const body = data.subarray(start);
    if (state.cut !== undefined) {
      const n = state.cut;
      delete state.cut;
      res.write(body.subarray(0, n), () => res.destroy());
    } else res.end(body);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${server.address().port}/m/model.gguf`, log, close: () => new Promise((r) => server.close(r)) };
}

test("a GGUF download cut short resumes at the first chunk not stored, and a stored model loads with no request", async () => {
  const cache = installCache();
  const file = readFileSync(join(MODELS, "smollm2", GGUF));
  const requests = [];
  let cut = true;
  const server = await serve(0, {
    cutAfter: (req) => {
      requests.push({ url: req.url, range: req.headers.range ?? null });
      if (cut && req.url.endsWith(".gguf")) {
        cut = false;
        return 40e6;
      }
    },
  });
  const url = `${server.url}/models/smollm2/${GGUF}`;
  try {
    await assert.rejects(collectFiles(sink(), url), (e) => e instanceof TwinferError && e.code === "Network" && /stopped at byte \d+ of 98362432; the first 33554432 bytes are stored/.test(e.message));
    assert.deepEqual(await listModels(), [], "no manifest for a model stored in part");
    assert.equal(await hasModel(url), false);

    const progress = [];
    let s = sink();
    await collectFiles(s, url, { sha256: sha256(file), onProgress: (p) => progress.push(p) });
    assert.deepEqual(requests.map((r) => r.range), [null, `bytes=${32 * MiB}-`], "the second request starts at the third chunk");
    assert.ok(s.bytes(GGUF).equals(file));
    const fromCache = progress.filter((p) => p.fromCache);
    assert.ok(fromCache.length > 0 && fromCache.every((p) => p.loaded <= 32 * MiB && p.file === GGUF), JSON.stringify(fromCache));
    assert.ok(progress.some((p) => !p.fromCache && p.loaded > 32 * MiB));
    assert.equal(progress.at(-1).loaded, file.length);
    assert.equal(progress.at(-1).total, file.length);

    const [model, ...others] = await listModels();
    assert.equal(others.length, 0);
    assert.equal(model.url, url);
    assert.equal(model.bytes, file.length);
    assert.deepEqual(model.files, [{ name: GGUF, url, bytes: file.length, sha256: sha256(file) }]);
    assert.ok(Math.abs(model.storedAt - Date.now()) < 60_000);

    // Stored whole: no request at all, progress says so.
    progress.length = 0;
    s = sink();
    await collectFiles(s, url, { sha256: sha256(file), onProgress: (p) => progress.push(p) });
    assert.equal(requests.length, 2, JSON.stringify(requests));
    assert.ok(s.bytes(GGUF).equals(file));
    assert.ok(progress.every((p) => p.fromCache));
    assert.equal(progress.at(-1).text, "read from the cache");

    // `cache: false` goes to the network and stores nothing new.
    s = sink();
    await collectFiles(s, url, { cache: false });
    assert.equal(requests.length, 3);

    assert.equal(await hasModel(url), true);
    assert.equal(await deleteModel(url), true);
    assert.equal(cache.entries.size, 0, [...cache.entries.keys()].join("\n"));
    assert.deepEqual(await listModels(), []);
    assert.equal(await deleteModel(url), false);
  } finally {
    await server.close();
  }
});

test("a model folder is stored file by file; files it lacks are not asked for again; deleteModel removes a part download", async () => {
  installCache();
  const requests = [];
  let cutWeights = true;
  const server = await serve(0, {
    cutAfter: (req) => {
      requests.push(req.url);
      if (cutWeights && req.url.endsWith("model.safetensors")) {
        cutWeights = false;
        return 1_000_000;
      }
    },
  });
  const base = `${server.url}/models/tiny-llama/`;
  try {
    await assert.rejects(collectFiles(sink(), base), (e) => e.code === "Network" && /loading again starts over/.test(e.message));
    // The part download (records of config.json, tokenizer.json, the weights) goes with the model.
    const cache = globalThis.caches && (await globalThis.caches.open());
    assert.ok(cache.entries.size > 0);
    assert.equal(await deleteModel(base.slice(0, -1)), true, "the folder's URL without its slash names it too");
    assert.equal(cache.entries.size, 0);

    await collectFiles(sink(), base);
    const [model] = await listModels();
    assert.deepEqual(model.files.map((f) => f.name).sort(), ["config.json", "model.safetensors", "tokenizer.json"]);
    assert.equal(model.bytes, model.files.reduce((n, f) => n + f.bytes, 0));
    requests.length = 0;
    const s = sink();
    await collectFiles(s, base);
    assert.deepEqual(requests, [], "nothing is requested, not even the optional file it lacks");
    assert.ok(s.bytes("model.safetensors").equals(readFileSync(join(MODELS, "tiny-llama/model.safetensors"))));
  } finally {
    await server.close();
  }
});


test("a server that ignores ranges, and a file that changed, start the download over", async () => {
  installCache();
  const state = { data: randomBytes(40 * MiB + 123), etag: '"v1"', cut: 20 * MiB, ignoreRange: true };
  const server = await fileServer(state);
  try {
    await assert.rejects(collectFiles(sink(), server.url), (e) => e.code === "Network");
    let s = sink();
    await collectFiles(s, server.url);
    // The range was asked for, the whole file came (200) and was used as it came.
    assert.deepEqual(server.log, [null, `bytes=${16 * MiB}-`]);
    assert.ok(s.bytes("model.gguf").equals(state.data));
    assert.equal((await listModels())[0].bytes, state.data.length);

    // A new version of the file: the 206 says so by its ETag, and the file starts over.
    await deleteModel(server.url);
    server.log.length = 0;
    Object.assign(state, { ignoreRange: false, cut: 20 * MiB + 5 });
    await assert.rejects(collectFiles(sink(), server.url), (e) => e.code === "Network");
    Object.assign(state, { data: randomBytes(40 * MiB + 7), etag: '"v2"' });
    s = sink();
    await collectFiles(s, server.url);
    assert.deepEqual(server.log, [null, `bytes=${16 * MiB}-`, null]);
    assert.ok(s.bytes("model.gguf").equals(state.data));
  } finally {
    await server.close();
  }
});

test("a SHA-256 from the caller or the server's ETag is checked; a mismatch keeps nothing", async () => {
  const cache = installCache();
  const data = randomBytes(20 * MiB + 9);
  const state = { data, etag: `"${sha256(data)}"` };
  const server = await fileServer(state);
  try {
    await collectFiles(sink(), server.url);
    assert.equal((await listModels())[0].files[0].sha256, sha256(data), "the ETag's digest was checked");
    // Asked for another digest, the stored copy is hashed and refused.
    await assert.rejects(collectFiles(sink(), server.url, { sha256: "0".repeat(64) }), (e) => e instanceof InvalidModelError && e.code === "Integrity");
    await deleteModel(server.url);
    assert.equal(cache.entries.size, 0);

    // A damaged download (the ETag names other bytes).
    state.data = Buffer.from(data);
    state.data[12345] ^= 1;
    await assert.rejects(collectFiles(sink(), server.url), (e) => e instanceof InvalidModelError && e.code === "Integrity" && e.message.includes(sha256(data)));
    assert.equal(cache.entries.size, 0, "no chunk of a file that failed its check is kept");
    assert.deepEqual(await listModels(), []);
    await assert.rejects(collectFiles(sink(), server.url, { sha256: "xyz" }), TypeError);
    await assert.rejects(collectFiles(sink(), `${server.url.replace("model.gguf", "")}`, { sha256: sha256(data) }), /digests/);
  } finally {
    await server.close();
  }
});

test("a full quota is a QuotaExceededError, and the part stored is removed", async () => {
  const cache = installCache({ quota: 10 * MiB });
  const state = { data: randomBytes(40 * MiB) };
  const server = await fileServer(state);
  try {
    await assert.rejects(collectFiles(sink(), server.url), (e) => {
      assert.ok(e instanceof QuotaExceededError, e.stack);
      assert.equal(e.name, "QuotaExceededError");
      assert.equal(e.code, "QuotaExceeded");
      assert.equal(e.bytesNeeded, state.data.length);
      assert.match(e.message, /needs 41\.9 MB/);
      return true;
    });
    assert.equal(cache.entries.size, 0);
    assert.deepEqual(await listModels(), []);
  } finally {
    await server.close();
  }
});

test("without a Cache API (Node) a URL loads straight from the network", async () => {
  const state = { data: randomBytes(3 * MiB) };
  const server = await fileServer(state);
  try {
    const s = sink();
    await collectFiles(s, server.url, { sha256: sha256(state.data) });
    assert.ok(s.bytes("model.gguf").equals(state.data));
    await assert.rejects(collectFiles(sink(), server.url, { sha256: "1".repeat(64) }), (e) => e.code === "Integrity");
    assert.deepEqual(await listModels(), []);
    assert.equal(await deleteModel(server.url), false);
  } finally {
    await server.close();
  }
});

test("QuotaExceededError keeps its class, code and figures across the worker boundary", async () => {
  const { serialize, revive } = await import("../src/errors.js");
  const e = new QuotaExceededError("full", { bytesNeeded: 5, usage: 1, quota: 2 });
  const back = revive(structuredClone(serialize(e)));
  assert.ok(back instanceof QuotaExceededError && back instanceof TwinferError);
  assert.deepEqual({ name: back.name, code: back.code, message: back.message, bytesNeeded: back.bytesNeeded, usage: back.usage, quota: back.quota }, { name: "QuotaExceededError", code: "QuotaExceeded", message: "full", bytesNeeded: 5, usage: 1, quota: 2 });
  const other = revive(structuredClone(serialize(new TypeError("bad"))));
  assert.ok(other instanceof TwinferError);
  assert.equal(other.message, "bad");
});

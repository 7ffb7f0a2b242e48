// Model sources -> the wasm ModelFiles, streamed chunk by chunk so the page never holds a second
// full copy of the weights. Sources: a base URL (string or URL), a Map (or object) of file name
// -> ArrayBuffer | typed array | Blob | File | Response, a list of File objects (drag-and-drop),
// or the Response of a model's config.json (the other files come from the same folder). A GGUF
// file is a whole model: its URL, its Response, or a single .gguf among the files. In a browser a
// URL source goes through the model cache (cache.js): stored once, read back without a request.
import { InvalidModelError } from "./errors.js";
import { StoredFile, baseHref, headerDigest, isGguf, modelUrl, withModelCache } from "./cache.js";
import { Sha256 } from "./sha256.js";

const WEIGHTS = "model.safetensors";
const INDEX = "model.safetensors.index.json";
const OPTIONAL = ["sentence_bert_config.json"];
// Files the loader reads; anything else in a dropped folder (README, vocab.txt, .bin) is skipped.
const wanted = (name) => name.endsWith(".json") || name.endsWith(".safetensors") || isGguf(name);
// Each append passes through a temporary copy in wasm memory: 1 MiB keeps it small beside the model.
const SLICE = 1 << 20;

function invalid(message) {
  return new InvalidModelError(message, { code: "ModelFile" });
}

/**
 * Fills `files` (a wasm ModelFiles) from `source`, reporting download progress. `cache` (default
 * true) keeps a URL source's files in the browser's model cache where there is one; `sha256` (a
 * single .gguf) and `digests` (file name -> SHA-256 hex) are checked as the bytes stream in.
 */
export async function collectFiles(files, source, { onProgress, signal, cache = true, sha256, digests } = {}) {
  const progress = new Progress(onProgress);
  const isUrl = typeof source === "string" || source instanceof URL;
  const digestOf = digestTable(sha256, digests, isUrl && !isGguf(new URL(String(source), baseHref()).pathname));
  if (isUrl) {
    const url = modelUrl(source);
    const gguf = isGguf(new URL(url).pathname);
    const stored =
      cache !== false && /^https?:$/.test(new URL(url).protocol)
        ? await withModelCache(url, signal, async (session) => {
            const open = (name, fileUrl) => session.open(name, fileUrl, { signal, digest: digestOf(name) });
            if (gguf) await fromGguf(files, new URL(url), await open(ggufName(url), url), progress, signal, digestOf);
            else await fromUrl(files, new URL(url), null, progress, signal, digestOf, (name) => open(name, new URL(name, url)));
          })
        : null;
    if (!stored) {
      if (gguf) await fromGguf(files, new URL(url), await fetch(url, { signal }), progress, signal, digestOf);
      else await fromUrl(files, new URL(url), null, progress, signal, digestOf);
    }
  } else if (typeof Response !== "undefined" && source instanceof Response && source.url && isGguf(new URL(source.url).pathname)) {
    await fromGguf(files, new URL(source.url), source, progress, signal, digestOf);
  } else if (typeof Response !== "undefined" && source instanceof Response) {
    if (!source.url) throw invalid("a Response source must come from fetch() of the model's config.json (it has no URL)");
    await fromUrl(files, new URL(".", source.url), source, progress, signal, digestOf);
  } else if (source instanceof Map || isFileList(source) || isPlainObject(source)) {
    await fromEntries(files, entriesOf(source), progress, signal, digestOf);
  } else {
    throw new TypeError("loadModel(source): a base URL, a Map of file name -> bytes/Blob/File/Response, a File list, or a Response");
  }
  progress.done();
}

/** name -> the SHA-256 (lowercase hex) the caller gave for it, or null. */
function digestTable(sha256, digests, folder) {
  const hex = (v, what) => {
    if (typeof v !== "string" || !/^[0-9a-f]{64}$/i.test(v.trim())) throw new TypeError(`${what}: a SHA-256 as 64 hex digits`);
    return v.trim().toLowerCase();
  };
  const table = new Map();
  if (digests !== undefined && digests !== null) {
    if (typeof digests !== "object") throw new TypeError("options.digests: an object of file name -> SHA-256 hex");
    for (const [name, v] of digests instanceof Map ? digests : Object.entries(digests)) table.set(name, hex(v, `options.digests[${JSON.stringify(name)}]`));
  }
  let single = null;
  if (sha256 !== undefined && sha256 !== null) {
    if (folder) throw new TypeError("options.sha256 is the digest of a .gguf file; for a model folder give options.digests (file name -> SHA-256)");
    single = hex(sha256, "options.sha256");
  }
  return (name) => table.get(name) ?? (single && isGguf(name) ? single : null);
}

function ggufName(url) {
  return decodeURIComponent(new URL(url).pathname.split("/").pop());
}

function isFileList(s) {
  return (typeof FileList !== "undefined" && s instanceof FileList) || (Array.isArray(s) && s.every((f) => typeof File !== "undefined" && f instanceof File));
}

function isPlainObject(s) {
  return s !== null && typeof s === "object" && Object.getPrototypeOf(s) === Object.prototype;
}

/** [name, value] pairs; a common leading folder (a dropped directory) is stripped. */
function entriesOf(source) {
  let entries;
  if (source instanceof Map) entries = [...source.entries()];
  else if (isFileList(source)) entries = [...source].map((f) => [f.webkitRelativePath || f.name, f]);
  else entries = Object.entries(source);
  const names = entries.map(([n]) => String(n).replace(/^\.?\//, ""));
  const first = names[0]?.split("/")[0];
  const shared = names.length > 0 && names.every((n) => n.includes("/") && n.split("/")[0] === first);
  return entries
    .map(([, v], i) => [shared ? names[i].slice(first.length + 1) : names[i], v])
    .filter(([n]) => !n.includes("/") && wanted(n));
}

/** One GGUF file: the whole model. */
async function fromGguf(files, url, response, progress, signal, digestOf) {
  if (!response.ok) throw invalid(`${url}: HTTP ${response.status} ${response.statusText}`);
  const name = decodeURIComponent(url.pathname.split("/").pop());
  progress.expect(sizeOf(response) ?? 0);
  await write(files, name, response, progress, signal, digestOf(name));
}

async function fromEntries(files, entries, progress, signal, digestOf) {
  const byName = new Map(entries);
  const ggufs = [...byName.keys()].filter(isGguf);
  if (!byName.has("config.json") && ggufs.length === 1) {
    const value = byName.get(ggufs[0]);
    progress.expect(sizeOf(value) ?? 0);
    await write(files, ggufs[0], value, progress, signal, digestOf(ggufs[0]));
    return;
  }
  for (const need of ["config.json", "tokenizer.json"]) {
    if (!byName.has(need)) throw invalid(`the model files have no ${need} (got: ${[...byName.keys()].join(", ") || "nothing"})`);
  }
  if (!byName.has(WEIGHTS) && !byName.has(INDEX)) throw invalid(`the model files have no ${WEIGHTS} or ${INDEX}`);
  progress.expect([...byName.values()].reduce((sum, v) => sum + (sizeOf(v) ?? 0), 0));
  for (const [name, value] of byName) {
    signal?.throwIfAborted();
    await write(files, name, value, progress, signal, digestOf(name));
  }
}

function sizeOf(v) {
  if (v instanceof ArrayBuffer) return v.byteLength;
  if (ArrayBuffer.isView(v)) return v.byteLength;
  if (typeof Blob !== "undefined" && v instanceof Blob) return v.size;
  if (typeof Response !== "undefined" && v instanceof Response) return Number(v.headers.get("content-length")) || null;
  if (v instanceof StoredFile) return v.size;
  return null;
}

/** Streams one file into wasm memory; `digest` (SHA-256 hex) is checked on the way. */
async function write(files, name, value, progress, signal, digest = null) {
  let check = digest ? new Sha256() : null;
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
    const bytes = value instanceof ArrayBuffer ? new Uint8Array(value) : new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
    files.begin(name, bytes.byteLength);
    for (let at = 0; at < bytes.byteLength; at += SLICE) {
      const chunk = bytes.subarray(at, at + SLICE);
      files.append(name, chunk);
      check?.update(chunk);
      progress.add(chunk.byteLength, name, false);
    }
  } else if (typeof Blob !== "undefined" && value instanceof Blob) {
    files.begin(name, value.size);
    await pump(files, name, value.stream(), progress, signal, check);
  } else if (typeof Response !== "undefined" && value instanceof Response) {
    if (!value.ok) throw invalid(`${name}: HTTP ${value.status} ${value.statusText}`);
    files.begin(name, Number(value.headers.get("content-length")) || 0);
    // The server's digest (an ETag that is a SHA-256) when the caller gave none.
    digest ??= headerDigest(value);
    check ??= digest ? new Sha256() : null;
    await pump(files, name, value.body, progress, signal, check);
  } else if (value instanceof StoredFile) {
    // It checks its own digest (once: a copy checked when stored is not hashed again).
    files.begin(name, value.size ?? 0);
    for await (const { bytes, fromCache } of value.pieces(signal)) {
      files.append(name, bytes);
      progress.add(bytes.byteLength, name, fromCache);
    }
    return;
  } else {
    throw new TypeError(`model file ${name}: expected an ArrayBuffer, typed array, Blob, File or Response`);
  }
  if (check) {
    const actual = check.hex();
    if (actual !== digest) throw new InvalidModelError(`${name}: SHA-256 ${actual}, expected ${digest}`, { code: "Integrity" });
  }
}

async function pump(files, name, stream, progress, signal, check) {
  const reader = stream.getReader();
  try {
    for (;;) {
      signal?.throwIfAborted();
      const { done, value } = await reader.read();
      if (done) return;
      files.append(name, value);
      check?.update(value);
      progress.add(value.byteLength, name, false);
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * A model folder: config.json, tokenizer.json, and model.safetensors or its index and shards.
 * `get(name)` opens a file (a fetch, or the model cache's StoredFile).
 */
async function fromUrl(files, base, configResponse, progress, signal, digestOf, get = (name) => fetch(new URL(name, base), { signal })) {
  const config = configResponse ?? (await get("config.json"));
  const tokenizer = await get("tokenizer.json");
  for (const [name, r] of [["config.json", config], ["tokenizer.json", tokenizer]]) {
    if (!r.ok) throw invalid(`${new URL(name, base)}: HTTP ${r.status} ${r.statusText}`);
  }
  const optional = await Promise.all(OPTIONAL.map(async (name) => [name, await get(name).catch(() => null)]));
  let weights = [[WEIGHTS, await get(WEIGHTS)]];
  let index = null;
  if (!weights[0][1].ok) {
    index = await get(INDEX);
    if (!index.ok) throw invalid(`${base}: neither ${WEIGHTS} nor ${INDEX} (HTTP ${weights[0][1].status} / ${index.status})`);
    const text = await index.text();
    let shards;
    try {
      shards = [...new Set(Object.values(JSON.parse(text).weight_map ?? {}))];
    } catch (e) {
      throw invalid(`${INDEX}: not JSON (${e.message})`);
    }
    if (shards.length === 0) throw invalid(`${INDEX} names no shard`);
    // All requests at once: their sizes give the progress total before the bodies stream.
    weights = await Promise.all(shards.map(async (s) => [s, await get(s)]));
    index = new Blob([text]);
    for (const [s, r] of weights) if (!r.ok) throw invalid(`${new URL(s, base)}: HTTP ${r.status}`);
  }
  const all = [["config.json", config], ["tokenizer.json", tokenizer], ...optional.filter(([, r]) => r?.ok), ...weights];
  if (index) all.push([INDEX, index]);
  progress.expect(all.reduce((sum, [, r]) => sum + (sizeOf(r) ?? 0), 0));
  for (const [name, r] of all) await write(files, name, r, progress, signal, digestOf(name));
}

/**
 * Byte counts for onProgress({ phase: 'download', loaded, total, text, file, fromCache }):
 * `fromCache` says whether the bytes just counted came from the model cache or the network.
 */
class Progress {
  constructor(onProgress) {
    this.onProgress = onProgress;
    this.loaded = 0;
    this.total = 0;
    this.last = 0;
    this.file = undefined;
    this.fromCache = false;
    this.network = 0;
  }
  expect(total) {
    this.total = total;
  }
  add(n, name, fromCache) {
    this.loaded += n;
    if (!fromCache) this.network += n;
    const now = Date.now();
    // At most ~20 reports a second (and one when the source changes): each may repaint a page.
    if (this.onProgress && (now - this.last > 50 || name !== this.file || fromCache !== this.fromCache)) {
      this.last = now;
      this.file = name;
      this.fromCache = fromCache;
      this.report(fromCache ? `reading ${name} from the cache` : `downloading ${name}`);
    }
  }
  report(text) {
    this.onProgress?.({ phase: "download", loaded: this.loaded, total: Math.max(this.total, this.loaded), text, file: this.file, fromCache: this.fromCache });
  }
  done() {
    this.report(this.loaded > 0 && this.network === 0 ? "read from the cache" : "downloaded");
  }
}

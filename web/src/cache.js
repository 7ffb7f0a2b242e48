// The browser's model cache: `loadModel(url)` keeps each file it downloads in the Cache API, in
// chunks of 16 MiB, so that
//   - a later load (after a reload, in another tab or worker) reads the files back without a
//     single request, once the model's manifest says every file is stored and checked;
//   - a download cut short resumes at the first chunk not stored, with `Range: bytes=N-`; the
//     answer must be a 206 whose Content-Range starts there and whose total, ETag and
//     Last-Modified match the stored part's, else the file starts over (a server that ignores
//     ranges answers 200 with the whole file, which is used as is);
//   - the page holds at most one chunk beyond what streams into wasm memory.
// Entries, under made-up keys of the reserved domain `twinfer.invalid` (never fetched):
//   model?u=<model URL>       the manifest: files, sizes, digests; written last
//   file?u=<file URL>         a file's record: size, validators, chunks, checked digest
//   chunk?u=<file URL>&i=<n>  its bytes [n * 16 MiB, (n + 1) * 16 MiB)
import { InvalidModelError, QuotaExceededError, TwinferError } from "./errors.js";
import { Sha256 } from "./sha256.js";

/** The name of the Cache API cache that holds the models. */
export const CACHE_NAME = "twinfer-models";
const CHUNK_BYTES = 16 << 20;
const KEYS = "https://twinfer.invalid/";
const FORMAT = 1;

const keyOf = (kind, url, i) => `${KEYS}${kind}?u=${encodeURIComponent(url)}${i === undefined ? "" : `&i=${i}`}`;

export const isGguf = (name) => name.toLowerCase().endsWith(".gguf");

export function baseHref() {
  return globalThis.location?.href ?? "file:///";
}

/** A model source URL as the cache keys it: absolute; a folder's path ends with a slash. */
export function modelUrl(source) {
  const url = new URL(String(source), baseHref());
  if (!isGguf(url.pathname) && !url.pathname.endsWith("/")) url.pathname += "/";
  return url.href;
}

/** The models cache, or null where there is none (Node, an insecure context, a browser that refuses). */
async function openCache() {
  if (typeof caches === "undefined" || typeof caches?.open !== "function") return null;
  try {
    return await caches.open(CACHE_NAME);
  } catch {
    return null;
  }
}

/** Runs `fn` holding the model's lock, where the browser has Web Locks (two tabs, one download). */
function locked(url, signal, fn) {
  const locks = globalThis.navigator?.locks;
  if (typeof locks?.request !== "function") return fn();
  return locks.request(`twinfer-model ${url}`, signal ? { signal } : {}, fn);
}

/** Keys of the store by kind and URL: `{ kind, url, i }`. */
function parseKey(key) {
  if (!key.startsWith(KEYS)) return null;
  const u = new URL(key);
  return { kind: u.pathname.slice(1), url: u.searchParams.get("u"), i: Number(u.searchParams.get("i")) };
}

/** A Cache API write the browser refused for want of quota (turned into QuotaExceededError above). */
class QuotaFull extends Error {
  constructor(cause) {
    super(cause?.message ?? "quota exceeded");
    this.cause = cause;
  }
}

class Store {
  constructor(cache, keys) {
    this.cache = cache;
    this.keys = keys;
  }

  static async open() {
    const cache = await openCache();
    if (!cache) return null;
    return new Store(cache, new Set((await cache.keys()).map((r) => r.url)));
  }

  async json(key) {
    if (!this.keys.has(key)) return null;
    const r = await this.cache.match(key);
    return r ? r.json().catch(() => null) : null;
  }

  async put(key, body) {
    const response = typeof body === "string" ? new Response(body, { headers: { "content-type": "application/json" } }) : new Response(body);
    try {
      await this.cache.put(key, response);
    } catch (e) {
      if (e?.name === "QuotaExceededError") throw new QuotaFull(e);
      throw e;
    }
    this.keys.add(key);
  }

  async delete(key) {
    this.keys.delete(key);
    await this.cache.delete(key);
  }

  /** Deletes a file's record and chunks. */
  async forget(url) {
    const chunks = `${keyOf("chunk", url)}&i=`;
    const doomed = [...this.keys].filter((k) => k === keyOf("file", url) || k.startsWith(chunks));
    await Promise.all(doomed.map((k) => this.delete(k)));
    return doomed.length;
  }

  /** The complete manifests, by model URL. */
  async manifests() {
    const out = [];
    for (const key of this.keys) {
      if (parseKey(key)?.kind !== "model") continue;
      const m = await this.json(key);
      if (m?.format === FORMAT && m.complete) out.push(m);
    }
    return out;
  }
}

function networkError(url, e, detail) {
  return new TwinferError(`${url}: ${detail} (${e?.message ?? e})`, { code: "Network", cause: e });
}

async function get(url, signal, headers) {
  try {
    // `no-store`: the copy kept is this cache's; the HTTP cache would hold a second one.
    return await fetch(url, { signal, cache: "no-store", headers });
  } catch (e) {
    if (signal?.aborted) throw signal.reason;
    throw networkError(url, e, "the request failed");
  }
}

/** A digest the server gives: an ETag that is a SHA-256 (as the Hugging Face Hub's for large files). */
export function headerDigest(res) {
  for (const name of ["x-linked-etag", "etag"]) {
    const v = res.headers.get(name)?.trim().replace(/^W\//, "").replace(/^"|"$/g, "");
    if (v && /^[0-9a-f]{64}$/i.test(v)) return v.toLowerCase();
  }
  return null;
}

function isEncoded(res) {
  const enc = res.headers.get("content-encoding");
  return enc !== null && enc.trim().toLowerCase() !== "identity";
}

/** `{ start, end, total }` of a 206's Content-Range, or null. */
function contentRange(res) {
  const m = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(res.headers.get("content-range")?.trim() ?? "");
  return m && { start: Number(m[1]), end: Number(m[2]), total: Number(m[3]) };
}

/** The same version of the file as the record's: validators equal where both sides have them. */
function sameVersion(record, res) {
  const etag = res.headers.get("etag");
  if (record.etag && etag) return record.etag.replace(/^W\//, "") === etag.replace(/^W\//, "");
  const lastModified = res.headers.get("last-modified");
  if (record.lastModified && lastModified) return record.lastModified === lastModified;
  return true;
}

const chunkCount = (bytes) => Math.ceil(bytes / CHUNK_BYTES);

/**
 * One model file, read from the cache, the network, or both (the stored chunks, then the rest):
 * `ok`, `status`, `size`, `pieces()` (an async iterator of `{ bytes, fromCache }`), `text()`.
 */
export class StoredFile {
  #session;
  #record;
  #cached;
  #response;

  constructor(session, { url, name, record, cached = 0, response = null, digest = null, status = 200, statusText = "" }) {
    this.#session = session;
    this.url = url;
    this.name = name;
    this.#record = record;
    this.#cached = cached;
    this.#response = response;
    this.digest = digest;
    this.status = status;
    this.statusText = statusText;
  }

  get ok() {
    return this.status >= 200 && this.status < 300;
  }

  /** Bytes, when the record or the server says. */
  get size() {
    return this.#record?.bytes ?? null;
  }

  async text() {
    const parts = [];
    for await (const { bytes } of this.pieces()) parts.push(bytes);
    return new TextDecoder().decode(await new Blob(parts).arrayBuffer());
  }

  async *pieces(signal) {
    const store = this.#session.store;
    const record = this.#record;
    const { url, name } = this;
    // The digest to check these bytes against, unless they were checked against it when stored.
    const expected = this.digest ?? (this.#response ? headerDigest(this.#response) : null);
    const hash = expected && !(this.#response === null && record.sha256 === expected) ? new Sha256() : null;
    const damaged = async (what) => {
      await store.forget(url);
      return new InvalidModelError(`${url}: ${what}; the stored part was removed and loading again downloads the file`, { code: "Integrity" });
    };
    let at = 0;
    for (let i = 0; i < this.#cached; i++) {
      signal?.throwIfAborted();
      const r = await store.cache.match(keyOf("chunk", url, i));
      if (!r) throw await damaged(`stored chunk ${i} is missing`);
      const reader = r.body.getReader();
      let got = 0;
      try {
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          got += value.byteLength;
          hash?.update(value);
          yield { bytes: value, fromCache: true };
        }
      } finally {
        reader.releaseLock();
      }
      // A resumable file's chunks end at multiples of 16 MiB (the next one starts there).
      if (record.resumable && got !== Math.min(CHUNK_BYTES, record.bytes - i * CHUNK_BYTES)) throw await damaged(`stored chunk ${i} has ${got} bytes`);
      at += got;
    }
    let chunks = this.#cached;
    if (this.#response) {
      // Sizes known up front cut the file at the chunk boundaries that a resume relies on.
      let known = record.resumable;
      const length = (i) => (known ? Math.min(CHUNK_BYTES, record.bytes - i * CHUNK_BYTES) : CHUNK_BYTES);
      let buf = chunks < chunkCount(record.bytes ?? Infinity) ? new Uint8Array(length(chunks)) : null;
      let fill = 0;
      const reader = this.#response.body.getReader();
      let finished = false;
      try {
        for (;;) {
          let r;
          try {
            r = await reader.read();
          } catch (e) {
            if (signal?.aborted) throw signal.reason;
            const kept = known ? chunks * CHUNK_BYTES : 0;
            throw networkError(
              url,
              e,
              `the download stopped at byte ${at} of ${record.bytes ?? "?"}; ${kept ? `the first ${kept} bytes are stored and loading again resumes from there` : "loading again starts over"}`,
            );
          }
          if (r.done) break;
          const piece = r.value;
          hash?.update(piece);
          for (let off = 0; off < piece.byteLength; ) {
            if (buf === null) {
              // More bytes than the server announced: a body it compressed without saying so
              // where this page can see (the declared size was the compressed one). Its byte
              // ranges would count compressed bytes: this file cannot resume.
              known = false;
              record.resumable = false;
              await this.#session.put(keyOf("file", url), JSON.stringify(record));
              buf = new Uint8Array(CHUNK_BYTES);
            }
            const take = Math.min(buf.byteLength - fill, piece.byteLength - off);
            buf.set(piece.subarray(off, off + take), fill);
            fill += take;
            off += take;
            if (fill === buf.byteLength) {
              await this.#session.put(keyOf("chunk", url, chunks), buf);
              chunks += 1;
              fill = 0;
              buf = known && chunks >= chunkCount(record.bytes) ? null : new Uint8Array(length(chunks));
            }
          }
          at += piece.byteLength;
          signal?.throwIfAborted();
          yield { bytes: piece, fromCache: false };
        }
        finished = true;
      } finally {
        if (!finished) reader.cancel().catch(() => {});
        else reader.releaseLock();
      }
      if (fill > 0) {
        if (known) throw await damaged(`the server sent ${at} of the ${record.bytes} bytes it announced`);
        await this.#session.put(keyOf("chunk", url, chunks), buf.subarray(0, fill));
        chunks += 1;
      }
      if (known && at !== record.bytes) throw await damaged(`the server sent ${at} of the ${record.bytes} bytes it announced`);
    }
    if (record.complete && at !== record.bytes) throw await damaged(`the stored copy has ${at} bytes where ${record.bytes} were stored`);
    let sha256 = record.sha256 ?? null;
    if (hash) {
      const actual = hash.hex();
      if (actual !== expected) {
        await store.forget(url);
        throw new InvalidModelError(`${url}: SHA-256 ${actual}, expected ${expected}; the file was not kept`, { code: "Integrity" });
      }
      sha256 = expected;
    }
    if (this.#response || sha256 !== record.sha256) {
      this.#record = { ...record, bytes: at, chunks, complete: true, sha256 };
      await this.#session.put(keyOf("file", url), JSON.stringify(this.#record));
    }
    this.#session.finished(this, this.#record);
  }
}

/** One model load through the cache (holding the model's lock). */
class Session {
  constructor(store, url, manifest) {
    this.store = store;
    this.url = url;
    this.manifest = manifest;
    this.files = [];
    this.opened = new Map();
  }

  put(key, body) {
    return this.store.put(key, body);
  }

  finished(file, record) {
    this.files = this.files.filter((f) => f.name !== file.name);
    this.files.push({ name: file.name, url: file.url, bytes: record.bytes, sha256: record.sha256 ?? null });
  }

  /** Bytes of the files opened so far (what a quota error says the model needs). */
  bytes() {
    return [...this.opened.values()].reduce((sum, f) => sum + (f.size ?? 0), 0);
  }

  /**
   * Opens file `name` of the model at `url`: from the cache when it is stored whole; else a
   * request, for the part after the chunks stored. A file the manifest does not list (when there
   * is one) is a 404 without a request.
   */
  async open(name, url, { signal, digest = null } = {}) {
    url = String(url);
    if (this.manifest && !this.manifest.files.some((f) => f.url === url)) {
      return new StoredFile(this, { url, name, status: 404, statusText: "Not Found (not in the stored model)" });
    }
    const file = await this.#open(name, url, signal, digest);
    if (file.ok) this.opened.set(name, file);
    return file;
  }

  async #open(name, url, signal, digest) {
    const store = this.store;
    let record = await store.json(keyOf("file", url));
    if (record?.format !== FORMAT) record = null;
    let cached = 0;
    if (record?.complete) {
      while (cached < record.chunks && store.keys.has(keyOf("chunk", url, cached))) cached += 1;
      if (cached === record.chunks) return new StoredFile(this, { url, name, record, cached, digest });
    }
    if (record?.resumable) {
      if (!record.complete) while (store.keys.has(keyOf("chunk", url, cached))) cached += 1;
      cached = Math.min(cached, chunkCount(record.bytes) - 1);
    } else cached = 0;
    if (cached > 0) {
      const start = cached * CHUNK_BYTES;
      const res = await get(url, signal, { range: `bytes=${start}-` });
      const range = res.status === 206 ? contentRange(res) : null;
      if (range && range.start === start && range.end === record.bytes - 1 && range.total === record.bytes && sameVersion(record, res) && !isEncoded(res)) {
        return new StoredFile(this, { url, name, record: { ...record, complete: false }, cached, response: res, digest });
      }
      // The server ignored the range (200: the whole file, used as is), or the file changed.
      if (res.status === 200) return this.#fresh(name, url, res, digest);
      await res.body?.cancel().catch(() => {});
    }
    return this.#fresh(name, url, await get(url, signal), digest);
  }

  async #fresh(name, url, res, digest) {
    if (!res.ok) {
      await res.body?.cancel().catch(() => {});
      return new StoredFile(this, { url, name, status: res.status, statusText: res.statusText });
    }
    const declared = res.headers.get("content-length");
    const bytes = isEncoded(res) || declared === null || !/^\d+$/.test(declared.trim()) ? null : Number(declared);
    const record = {
      format: FORMAT,
      url,
      bytes,
      resumable: bytes !== null,
      etag: res.headers.get("etag"),
      lastModified: res.headers.get("last-modified"),
      complete: false,
      chunks: 0,
      sha256: null,
    };
    await this.store.forget(url);
    await this.put(keyOf("file", url), JSON.stringify(record));
    return new StoredFile(this, { url, name, record, response: res, digest });
  }

  /** Marks the model complete: every file read is stored and checked. */
  async commit() {
    const files = this.files;
    const manifest = {
      format: FORMAT,
      complete: true,
      url: this.url,
      files,
      bytes: files.reduce((sum, f) => sum + f.bytes, 0),
      storedAt: this.manifest?.storedAt ?? Date.now(),
    };
    const same = this.manifest && JSON.stringify(this.manifest.files) === JSON.stringify(files);
    if (!same) await this.put(keyOf("model", this.url), JSON.stringify(manifest));
  }
}

async function quotaError(bytesNeeded, cause) {
  let usage = null;
  let quota = null;
  try {
    const estimate = await globalThis.navigator?.storage?.estimate?.();
    usage = estimate?.usage ?? null;
    quota = estimate?.quota ?? null;
  } catch {
    // No figures: the message goes without them.
  }
  const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;
  const room = usage !== null && quota !== null ? ` (this origin now stores ${mb(usage)} of the ${mb(quota)} it may)` : "";
  return new QuotaExceededError(
    `storing the model needs ${mb(bytesNeeded)}, more room than the browser gives this origin${room}; the part stored was removed. Free space (deleteModel) or load with { cache: false }`,
    { bytesNeeded, usage, quota, cause },
  );
}

/**
 * Runs `load(session)` with the model at `url` through the cache; null when there is no cache
 * (the caller loads without one). The manifest is written only when `load` has read every file
 * it needs to the end; a quota error removes the part of the model stored so far.
 */
export async function withModelCache(url, signal, load) {
  const first = await Store.open();
  if (!first) return null;
  return locked(url, signal, async () => {
    // Keys listed under the lock: another tab may have stored the model meanwhile.
    const store = await Store.open();
    let manifest = await store.json(keyOf("model", url));
    if (manifest?.format !== FORMAT || !manifest.complete) manifest = null;
    const session = new Session(store, url, manifest);
    try {
      const result = await load(session);
      await session.commit();
      return { result };
    } catch (e) {
      if (!(e instanceof QuotaFull)) throw e;
      await store.delete(keyOf("model", url));
      for (const f of session.opened.values()) await store.forget(f.url);
      throw await quotaError(session.bytes(), e.cause);
    }
  });
}

/** The stored models: `{ url, files: [{ name, url, bytes, sha256 }], bytes, storedAt }`. */
export async function listModels() {
  const store = await Store.open();
  if (!store) return [];
  return (await store.manifests()).map(({ url, files, bytes, storedAt }) => ({ url, files, bytes, storedAt }));
}

/** Whether the model at `url` is stored whole (loading it makes no request). */
export async function hasModel(url) {
  const store = await Store.open();
  if (!store) return false;
  const m = await store.json(keyOf("model", modelUrl(url)));
  return m?.format === FORMAT && m.complete === true;
}

/**
 * Removes the model at `url` from the cache, whole or the part of a download that stopped;
 * true when something was removed.
 */
export async function deleteModel(url) {
  url = modelUrl(url);
  const first = await Store.open();
  if (!first) return false;
  return locked(url, undefined, async () => {
    const store = await Store.open();
    const manifests = await store.manifests();
    const own = manifests.find((m) => m.url === url);
    const others = new Set(manifests.filter((m) => m !== own).flatMap((m) => m.files.map((f) => f.url)));
    // Files of this model: the manifest's, and those of a download that never finished (for a
    // folder, files right in it; for a .gguf, the file itself).
    const folder = new URL(".", url).href;
    const mine = (u) => (isGguf(new URL(url).pathname) ? u === url : new URL(".", u).href === folder && !isGguf(new URL(u).pathname));
    const files = new Set(own?.files.map((f) => f.url) ?? []);
    for (const key of store.keys) {
      const k = parseKey(key);
      if (k && k.kind !== "model" && mine(k.url) && !others.has(k.url)) files.add(k.url);
    }
    let removed = 0;
    if (store.keys.has(keyOf("model", url))) {
      await store.delete(keyOf("model", url));
      removed += 1;
    }
    for (const f of files) removed += await store.forget(f);
    return removed > 0;
  });
}

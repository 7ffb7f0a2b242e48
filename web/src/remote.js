// `Twinfer.create({ worker: true })`: the same API, with the engine in a Web Worker so that the
// page's main thread stays free while the model runs.
import { FeatureMissingError, revive } from "./errors.js";

export class WorkerTwinfer {
  #worker;
  #info;
  #next = 0;
  #calls = new Map();

  constructor(worker) {
    this.#worker = worker;
    worker.onmessage = ({ data }) => this.#receive(data);
    worker.onerror = (e) => {
      const error = new FeatureMissingError(`the engine's worker failed: ${e.message ?? "unknown error"}`, { code: "Worker" });
      for (const call of this.#calls.values()) call.reject(error);
      this.#calls.clear();
    };
  }

  static async create(options = {}) {
    if (typeof Worker !== "function") {
      throw new FeatureMissingError("worker: true needs Web Workers (a browser)", { code: "FeatureMissing" });
    }
    const { onProgress, worker: _worker, ...args } = options;
    const remote = new WorkerTwinfer(new Worker(new URL("./worker.js", import.meta.url), { type: "module" }));
    try {
      remote.#info = await remote.#call("create", args, { onProgress });
    } catch (e) {
      remote.#worker.terminate();
      throw e;
    }
    return remote;
  }

  async loadModel(source, options = {}) {
    const { onProgress, signal, ...engine } = options;
    const transfer = [];
    // Bytes move to the worker rather than being copied.
    if (source instanceof Map) {
      for (const v of source.values()) if (v instanceof ArrayBuffer) transfer.push(v);
    }
    if (typeof Response !== "undefined" && source instanceof Response) source = source.url;
    // A relative URL means the page's, not the worker script's.
    if ((typeof source === "string" || source instanceof URL) && globalThis.location) source = new URL(String(source), location.href).href;
    this.#info = await this.#call("loadModel", { source, options: engine }, { onProgress, signal, transfer });
    return this.info();
  }

  embed(texts) {
    return this.#call("embed", { texts: typeof texts === "string" ? [texts] : [...texts] });
  }

  async *generate(prompt, options = {}) {
    const { signal, ...rest } = options;
    signal?.throwIfAborted();
    // Aborted by the caller's signal, or here when the consumer leaves the loop early.
    const stop = new AbortController();
    const forward = () => stop.abort(signal.reason);
    signal?.addEventListener("abort", forward, { once: true });
    const tokens = [];
    let wake = null;
    let finished = false;
    const done = this.#call("generate", { prompt, options: rest }, {
      signal: stop.signal,
      onToken: (t) => {
        tokens.push(t);
        wake?.();
      },
    });
    const settle = () => {
      finished = true;
      wake?.();
    };
    done.then(settle, settle);
    try {
      for (;;) {
        while (tokens.length) yield tokens.shift();
        if (finished) return await done;
        await new Promise((r) => {
          wake = r;
        });
        wake = null;
      }
    } finally {
      signal?.removeEventListener("abort", forward);
      if (!finished) stop.abort();
    }
  }

  metrics(options = {}) {
    return this.#call("metrics", options);
  }

  info() {
    return structuredClone(this.#info);
  }

  async dispose() {
    await this.#call("dispose", {});
    this.#worker.terminate();
  }

  #call(op, args, { onProgress, onToken, signal, transfer = [] } = {}) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      const onAbort = () => this.#worker.postMessage({ id: this.#next++, op: "abort", args: { target: id } });
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#calls.set(id, {
        onProgress,
        onToken,
        resolve: (v) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(v);
        },
        reject: (e) => {
          signal?.removeEventListener("abort", onAbort);
          reject(signal?.aborted ? signal.reason : e);
        },
      });
      this.#worker.postMessage({ id, op, args }, transfer);
    });
  }

  #receive({ id, result, error, token, progress }) {
    const call = this.#calls.get(id);
    if (!call) return;
    if (progress) return call.onProgress?.(progress);
    if (token) return call.onToken?.(token);
    this.#calls.delete(id);
    if (error) call.reject(revive(error));
    else call.resolve(result);
  }
}

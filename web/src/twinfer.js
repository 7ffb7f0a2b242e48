// The engine in this thread (page, worker or Node). Calls into wasm run one at a time through a
// queue; generation is continuous batching: every generate() adds a request and one loop steps
// the engine while any request runs, handing each step's tokens to their streams.
import { loadBindings, loadThreadedBindings } from "./loader.js";
import { planThreads } from "./threads.js";
import { collectFiles } from "./files.js";
import { KvCacheFullError, TwinferError, errorFor, fromWasm } from "./errors.js";

const NO_TEST_HOOKS = "this package was built without test hooks (scripts/build-web.sh --test-hooks)";

const BACKENDS = ["auto", "webgpu", "wasm"];
const GENERATE_OPTIONS = ["maxTokens", "temperature", "topK", "topP", "repetitionPenalty", "seed", "stop", "stopTokenIds", "ignoreEos"];

export class Twinfer {
  #rt;
  #bindings;
  #info;
  #adapter = null;
  #threadsReason = "";
  #chain = Promise.resolve();
  #crashed = null;
  #streams = new Map();
  #pending = 0;
  #pumping = false;

  /** Use Twinfer.create(). */
  constructor(bindings, runtime) {
    this.#bindings = bindings;
    this.#rt = runtime;
    this.#info = runtime.info();
  }

  /**
   * Opens the engine: `backend` 'auto' (WebGPU when it passes its self-test, else wasm SIMD),
   * 'webgpu' or 'wasm'. `worker: true` runs it in a Web Worker behind the same API.
   */
  static async create(options = {}) {
    const { backend = "auto", onProgress, worker = false, wasmUrl, threads = "auto" } = options;
    if (!BACKENDS.includes(backend)) throw new TypeError(`backend must be one of ${BACKENDS.join(", ")}`);
    if (worker) {
      const { WorkerTwinfer } = await import("./remote.js");
      return WorkerTwinfer.create(options);
    }
    onProgress?.({ phase: "init", loaded: 0, total: 1, text: "loading the engine" });
    let runtime;
    try {
      const adapter = await adapterReport();
      const plan = await planThreads(threads, backend, { wasmUrl, hasWebGpuAdapter: async () => adapter !== null });
      let bindings;
      let threadsReason = plan.reason;
      if (plan.threads > 1) {
        const pool = await loadThreadedBindings(plan.threads);
        bindings = pool.bindings;
        if (pool.workers < pool.threads - 1) {
          threadsReason = `${pool.workers} of ${pool.threads - 1} worker threads started; the engine's thread runs what the others leave`;
        } else if (pool.threads !== plan.threads) {
          threadsReason = `${pool.threads} threads: the pool this page made first`;
        }
      } else {
        bindings = await loadBindings(wasmUrl);
      }
      // The threaded build has no WebGPU: asking it for `auto` would only add a failed try.
      runtime = await bindings.Runtime.open(bindings.isThreadedBuild() ? "wasm" : backend);
      const tf = new Twinfer(bindings, runtime);
      tf.#adapter = adapter;
      tf.#threadsReason = threadsReason;
      onProgress?.({ phase: "init", loaded: 1, total: 1, text: `engine ready: ${tf.#info.backend}` });
      return tf;
    } catch (e) {
      runtime?.free();
      throw fromWasm(e);
    }
  }

  /**
   * Loads a model (replacing the one held): a base URL, a Map of file name -> ArrayBuffer / Blob /
   * File / Response, a File list, or the Response of its config.json. `options`: `{ onProgress,
   * signal, cache, sha256, digests, quantize, pageSize, kvMemoryBytes, kvDtype, maxBatchTokens,
   * maxRunning, prefixCache, activations }`. In a browser a URL source goes through the model
   * cache unless `cache: false`. `quantize` ('q8_0', 'q4_0', 'q4_1', 'q5_0' or 'q5_1') converts a
   * float model's projections as the safetensors bytes arrive, so only the quantized model is ever
   * held. `activations: 'int8'` quantizes the inputs of quantized projections to 8-bit codes
   * (faster on 4-bit weights in the relaxed-SIMD build, less accurate; default 'int16').
   */
  async loadModel(source, options = {}) {
    const { onProgress, signal, cache, sha256, digests, ...engine } = options;
    return this.#run(async () => {
      const files = new this.#bindings.ModelFiles();
      try {
        if (engine.quantize !== undefined) files.quantizeTo(String(engine.quantize));
        await collectFiles(files, source, { onProgress, signal, cache, sha256, digests });
        onProgress?.({ phase: "load", loaded: 0, total: 1, text: "building the model" });
        this.#rt.load(files, engine, (loaded, total) =>
          onProgress?.({ phase: "upload", loaded, total, text: "uploading the weights to the GPU" }),
        );
      } finally {
        files.free();
      }
      this.#info = this.#rt.info();
      onProgress?.({ phase: "load", loaded: 1, total: 1, text: this.#info.model.description });
      return this.info();
    });
  }

  /** One L2-normalised embedding per text (encoder models such as all-MiniLM-L6-v2). */
  async embed(texts) {
    const list = typeof texts === "string" ? [texts] : [...texts];
    if (!list.every((t) => typeof t === "string")) throw new TypeError("embed(texts): strings");
    const vectors = await this.#run(() => this.#rt.embed(list));
    await this.#refreshInfo();
    return vectors;
  }

  /**
   * Streams generated tokens: `for await (const { text, tokenId, t } of tf.generate(prompt, opts))`.
   * `prompt` is text, token ids, or `{ messages: [{ role, content }, ...] }`, which the model's
   * chat template renders (the answer ends at its end-of-turn token).
   * `t` is milliseconds since the call. Options: maxTokens, temperature, topK, topP,
   * repetitionPenalty, seed, stop, stopTokenIds, ignoreEos, signal. The iterator's return value
   * is `{ text, tokens, reason, metrics }`.
   */
  async *generate(prompt, options = {}) {
    // TTFT counts from this call, not from when the engine's queue reached the request.
    const arrivedAt = performance.now() / 1000;
    const { signal } = options;
    signal?.throwIfAborted();
    const request = {};
    for (const key of GENERATE_OPTIONS) if (options[key] !== undefined) request[key] = options[key];
    const chat = prompt !== null && typeof prompt === "object" && Array.isArray(prompt.messages);
    const input = chat ? await this.#run(() => this.#rt.chatTokens(prompt.messages)) : prompt;
    const id = await this.#run(() => this.#rt.add(input, request, arrivedAt));
    const stream = new EventStream();
    this.#streams.set(id, stream);
    this.#pending += 1;
    let finished = false;
    const cancel = () => this.#run(() => this.#rt.cancel(id)).catch(() => {});
    signal?.addEventListener("abort", cancel, { once: true });
    this.#pump();
    try {
      for (;;) {
        const ev = await stream.next();
        if (ev.kind === "token") {
          yield { text: ev.text, tokenId: ev.tokenId, t: ev.t * 1000 };
          continue;
        }
        finished = true;
        if (ev.reason === "cancelled" && signal?.aborted) throw signal.reason;
        if (ev.reason === "failed") throw new KvCacheFullError(ev.detail ?? "the request failed", { code: "KvPoolExhausted" });
        return { text: ev.text, tokens: ev.tokens, reason: ev.reason, metrics: requestMetricsMs(ev.metrics) };
      }
    } finally {
      signal?.removeEventListener("abort", cancel);
      this.#streams.delete(id);
      // The consumer left the loop early: stop the request so it frees its KV pages.
      if (!finished) cancel();
    }
  }

  /** TTFT, TPOT, ITL (milliseconds) and TPS over the requests finished so far. */
  async metrics({ reset = false } = {}) {
    return this.#run(() => runMetricsMs(this.#rt.metrics(reset)));
  }

  /** The backend chosen and why, the engines of each phase, the WebGPU adapter, and the model. */
  info() {
    return { ...structuredClone(this.#info), adapter: structuredClone(this.#adapter), threadsReason: this.#threadsReason };
  }

  /**
   * Makes the engine panic, as a bug would (tests of EngineCrashedError). Only in a package built
   * with `scripts/build-web.sh --test-hooks`; a release build has no such hook.
   */
  _crashForTest() {
    if (typeof this.#bindings.__panicForTest !== "function") throw new Error(NO_TEST_HOOKS);
    return this.#run(() => this.#bindings.__panicForTest());
  }

  /** Destroys the GPU device, as a browser reclaiming the GPU would (tests of the fallback). */
  _loseDeviceForTest() {
    if (typeof this.#rt.loseDeviceForTest !== "function") throw new Error(NO_TEST_HOOKS);
    return this.#rt.loseDeviceForTest();
  }

  /** Frees the engine's memory; the instance cannot be used afterwards. */
  async dispose() {
    await this.#run(() => {
      this.#rt.free();
      this.#crashed = new TwinferError("this Twinfer instance was disposed", { code: "Disposed" });
    });
  }

  /** A lost GPU moves the engines to the CPU mid-run: keeps info() current. */
  async #refreshInfo() {
    if (this.#info.backend === "webgpu") this.#info = await this.#run(() => this.#rt.info());
  }

  #run(fn) {
    const result = this.#chain.then(() => {
      if (this.#crashed) throw this.#crashed;
      return fn();
    });
    this.#chain = result.catch(() => {});
    return result.catch((e) => {
      throw fromWasm(e, () => {
        this.#crashed = errorFor("Crashed", "this engine stopped on an internal error earlier; create a new Twinfer instance");
      });
    });
  }

  /** Steps the engine while requests run; one loop per instance. */
  #pump() {
    if (this.#pumping) return;
    this.#pumping = true;
    (async () => {
      try {
        while (this.#pending > 0) {
          const events = await this.#run(() => this.#rt.step());
          await this.#refreshInfo();
          for (const ev of events) {
            if (ev.kind === "finished") this.#pending -= 1;
            this.#streams.get(ev.id)?.push(ev);
          }
          // Let the page paint and new requests join between steps.
          await yieldToEventLoop();
        }
      } catch (e) {
        this.#pending = 0;
        for (const s of this.#streams.values()) s.fail(e);
      } finally {
        this.#pumping = false;
      }
    })();
  }
}

/**
 * The WebGPU adapter as the browser describes it (vendor, architecture, features, limits), or
 * null where there is none.
 */
async function adapterReport() {
  const gpu = globalThis.navigator?.gpu;
  if (!gpu) return null;
  try {
    const adapter = await gpu.requestAdapter();
    if (!adapter) return null;
    const info = adapter.info ?? {};
    const limits = {};
    for (const key of ["maxStorageBufferBindingSize", "maxBufferSize", "maxComputeInvocationsPerWorkgroup", "maxComputeWorkgroupStorageSize", "maxStorageBuffersPerShaderStage", "maxComputeWorkgroupsPerDimension"]) {
      limits[key] = adapter.limits[key];
    }
    return {
      vendor: info.vendor ?? "",
      architecture: info.architecture ?? "",
      description: info.description ?? "",
      isFallbackAdapter: Boolean(info.isFallbackAdapter ?? adapter.isFallbackAdapter),
      features: [...adapter.features].sort(),
      limits,
    };
  } catch {
    return null;
  }
}

/** A queue of one request's events that a consumer awaits. */
class EventStream {
  #queue = [];
  #waiter = null;
  #error = null;
  push(ev) {
    if (this.#waiter) {
      this.#waiter.resolve(ev);
      this.#waiter = null;
    } else this.#queue.push(ev);
  }
  fail(e) {
    this.#error = e;
    this.#waiter?.reject(e);
    this.#waiter = null;
  }
  next() {
    if (this.#queue.length) return Promise.resolve(this.#queue.shift());
    if (this.#error) return Promise.reject(this.#error);
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
    });
  }
}

// A macrotask without setTimeout's 4 ms clamp.
const yieldToEventLoop =
  typeof setImmediate === "function"
    ? () => new Promise((r) => setImmediate(r))
    : typeof MessageChannel === "function"
      ? (() => {
          const channel = new MessageChannel();
          const waiting = [];
          channel.port1.onmessage = () => waiting.shift()?.();
          return () =>
            new Promise((r) => {
              waiting.push(r);
              channel.port2.postMessage(0);
            });
        })()
      : () => new Promise((r) => setTimeout(r, 0));

const ms = (d) =>
  d && { count: d.count, mean: d.mean * 1e3, std: d.std * 1e3, min: d.min * 1e3, p50: d.p50 * 1e3, p90: d.p90 * 1e3, p99: d.p99 * 1e3, max: d.max * 1e3 };

function runMetricsMs(m) {
  return {
    requests: m.requests,
    generatedTokens: m.generated_tokens,
    promptTokens: m.prompt_tokens,
    wallMs: m.wall_s * 1e3,
    tps: m.tps,
    requestsPerSecond: m.requests_per_s,
    ttft: ms(m.ttft),
    tpot: ms(m.tpot),
    itl: ms(m.itl),
    kvOccupancy: m.kv_occupancy,
    preemptions: m.preemptions,
  };
}

function requestMetricsMs(m) {
  return {
    promptTokens: m.prompt_tokens,
    generatedTokens: m.generated_tokens,
    ttft: m.ttft === null ? null : m.ttft * 1e3,
    tpot: m.tpot === null ? null : m.tpot * 1e3,
    e2e: m.e2e * 1e3,
    itl: ms(m.itl),
    tokenTimes: m.token_times.map((t) => t * 1e3),
    preemptions: m.preemptions,
    cachedTokens: m.cached_tokens,
  };
}

// The CPU engine on several threads: the threaded build (shared memory, relaxed SIMD, no WebGPU)
// runs each parallel region of a step on the engine's thread and on Web Workers that serve its
// pool. Browsers allow shared memory only to cross-origin isolated pages, and a page's main thread
// may not block, so the threaded build is taken only where both hold; elsewhere the engine runs
// one thread and `info().threadsReason` says why.
import { IS_NODE, hasRelaxedSimd } from "./loader.js";

/** How long the engine waits for its workers before it goes on with those that answered. */
const WORKER_START_MS = 15000;
/** At most this many threads by default: decode steps stop scaling with the read bandwidth. */
const DEFAULT_MAX_THREADS = 8;
/** Each worker's stack (the native default is 2 MiB; wasm-bindgen wants whole 64 KiB pages). */
const THREAD_STACK_BYTES = 2 * 1024 * 1024;

const inWorker = () =>
  typeof WorkerGlobalScope === "function" && typeof self === "object" && self instanceof WorkerGlobalScope;

/**
 * How many CPU threads this engine can run, and why not more: `{ threads, reason }`.
 * `requested` is `"auto"` (one per core, at most 8) or a count; `backend` is the create option.
 */
export async function planThreads(requested, backend, { wasmUrl, hasWebGpuAdapter }) {
  const one = (reason) => ({ threads: 1, reason });
  if (requested !== "auto" && !(Number.isInteger(requested) && requested >= 1)) {
    throw new TypeError(`threads must be "auto" or a positive integer, not ${requested}`);
  }
  if (requested === 1) return one("one thread was asked for");
  if (IS_NODE) return one("in Node the package runs the engine on one thread");
  if (backend === "webgpu") return one("WebGPU was asked for, and the threaded build runs the CPU engine only");
  if (wasmUrl !== undefined) return one("`wasmUrl` names the single-threaded module");
  if (!globalThis.crossOriginIsolated || typeof SharedArrayBuffer !== "function") {
    return one(
      "the page is not cross-origin isolated, so it has no shared memory: serve it with " +
        "`Cross-Origin-Opener-Policy: same-origin` and `Cross-Origin-Embedder-Policy: require-corp`",
    );
  }
  if (!inWorker()) {
    return one("the engine runs on the page's main thread, which may not wait for workers: create it with `worker: true`");
  }
  if (!hasRelaxedSimd()) return one("the threaded build needs relaxed SIMD, which this browser lacks");
  const cores = globalThis.navigator?.hardwareConcurrency ?? 1;
  const threads = requested === "auto" ? Math.min(cores, DEFAULT_MAX_THREADS) : requested;
  if (threads <= 1) return one(`this browser reports ${cores} core${cores === 1 ? "" : "s"}`);
  if (backend === "auto" && (await hasWebGpuAdapter())) {
    return one("a WebGPU adapter is present, so `auto` takes the single-threaded build, which has WebGPU");
  }
  return { threads, reason: `${threads} threads (${cores} cores reported), in the threaded build` };
}

/**
 * Starts `count` workers on the threaded build's module and shared memory. Resolves with how many
 * serve the pool within WORKER_START_MS; the pool's tasks run on the engine's thread until they do.
 */
export async function startWorkers(module, memory, count) {
  const started = await Promise.all(
    Array.from({ length: count }, () =>
      new Promise((resolve) => {
        let worker;
        const timer = setTimeout(() => {
          worker?.terminate();
          resolve(false);
        }, WORKER_START_MS);
        const settle = (ok) => {
          clearTimeout(timer);
          resolve(ok);
        };
        try {
          worker = new Worker(new URL("./thread-worker.js", import.meta.url), { type: "module", name: "twinfer-cpu" });
        } catch {
          settle(false);
          return;
        }
        worker.onmessage = ({ data }) => settle(data?.ready === true);
        worker.onerror = () => settle(false);
        worker.postMessage({ module, memory, threadStackBytes: THREAD_STACK_BYTES });
      }),
    ),
  );
  return started.filter(Boolean).length;
}

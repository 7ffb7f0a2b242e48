// One thread of the CPU engine's pool in the threaded build: it instantiates the module on the
// engine's shared memory, says so, then serves the pool until the page goes away (parked on the
// shared memory between steps, spinning briefly after each).
import init, { threadWorkerLoop } from "../pkg/threads/twinfer_web.js";

self.onmessage = async ({ data: { module, memory, threadStackBytes } }) => {
  self.onmessage = null;
  try {
    await init({ module_or_path: module, memory, thread_stack_size: threadStackBytes });
  } catch (e) {
    self.postMessage({ ready: false, error: String(e?.message ?? e) });
    return;
  }
  self.postMessage({ ready: true });
  threadWorkerLoop();
};

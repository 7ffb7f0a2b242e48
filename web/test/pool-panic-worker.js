// For the browser tests: the threaded build (with test hooks) on two threads, made to panic on a
// pool worker. The call must throw (the waiting thread sees the panic) instead of hanging.
import { loadThreadedBindings } from "../src/loader.js";

self.onmessage = async () => {
  try {
    const pool = await loadThreadedBindings(2);
    if (typeof pool.bindings.__panicInPoolForTest !== "function") throw new Error("built without test hooks");
    if (pool.workers !== 1) throw new Error(`${pool.workers} of 1 pool workers started`);
    const started = performance.now();
    try {
      pool.bindings.__panicInPoolForTest();
      self.postMessage({ threw: false });
    } catch (e) {
      self.postMessage({ threw: true, name: e.name, message: String(e.message), ms: performance.now() - started });
    }
  } catch (e) {
    self.postMessage({ error: String(e.message ?? e) });
  }
};

// The bench page's worker for `?threads=N`: the threaded build with its pool sized to N (N - 1
// extra workers), timing the same cases as the page does on one thread.
import { loadThreadedBindings } from "../src/loader.js";
import { timeCase } from "./timing.js";

self.onmessage = async ({ data: { specs, runs, threads } }) => {
  try {
    const pool = await loadThreadedBindings(threads);
    if (pool.workers !== threads - 1) throw new Error(`${pool.workers} of ${threads - 1} pool workers started`);
    for (const spec of specs) self.postMessage({ row: timeCase(pool.bindings.BenchCase, spec, runs) });
    self.postMessage({ done: true });
  } catch (e) {
    self.postMessage({ error: { name: e.name, message: e.message } });
  }
};

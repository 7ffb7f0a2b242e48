// Times the kernel cases in the page: a warm-up run, then `runs` timed runs of each, with
// performance.now(). Results go to the table and to window.benchResult.
import { kernels } from "../src/index.js";
import { timeCase } from "./timing.js";

const params = new URLSearchParams(location.search);
const specs = (params.get("cases") ?? "decode:1:8192,decode:8:8192,prefill:1024").split(",");
const runs = Number(params.get("runs") ?? 7);

async function main() {
  document.body.dataset.state = "running";
  // ?build=plain or ?build=relaxed pins a build; by default the loader picks (relaxed where the
  // browser has it).
  const build = params.get("build");
  const wasmUrl = build ? new URL(`../pkg/twinfer_web${build === "relaxed" ? "_relaxed" : ""}_bg.wasm`, import.meta.url) : undefined;
  // ?threads=N runs the cases in a worker on the threaded build (the page must be cross-origin
  // isolated); without it they run here, on one thread.
  const threads = params.has("threads") ? Number(params.get("threads")) : null;
  const rows = threads ? inWorker(threads) : onPage(await kernels({ wasmUrl }));
  const results = [];
  for await (const r of rows) {
    results.push(r);
    const row = document.createElement("tr");
    for (const text of [r.name, r.medianMs.toFixed(3), `${Math.min(...r.ms).toFixed(3)}..${Math.max(...r.ms).toFixed(3)}`, `${r.rate.toFixed(2)} ${r.unit}`]) {
      const td = document.createElement("td");
      td.textContent = text;
      row.append(td);
    }
    document.getElementById("rows").append(row);
  }
  window.benchResult = { userAgent: navigator.userAgent, runs, threads: threads ?? 1, build: threads ? "threads" : (build ?? "auto"), results };
  document.getElementById("status").textContent = "done";
  document.body.dataset.state = "done";
}

async function* onPage({ BenchCase }) {
  for (const spec of specs) {
    document.getElementById("status").textContent = `running ${spec}`;
    // Let the status paint before a long synchronous run.
    await new Promise((r) => setTimeout(r, 0));
    yield timeCase(BenchCase, spec, runs);
  }
}

async function* inWorker(threads) {
  const worker = new Worker(new URL("./bench-worker.js", import.meta.url), { type: "module" });
  const queue = [];
  let wake = null;
  worker.onmessage = ({ data }) => {
    queue.push(data);
    wake?.();
  };
  worker.onerror = (e) => {
    queue.push({ error: { name: "WorkerError", message: e.message } });
    wake?.();
  };
  worker.postMessage({ specs, runs, threads });
  try {
    for (;;) {
      while (queue.length === 0) await new Promise((r) => (wake = r));
      const m = queue.shift();
      if (m.error) throw Object.assign(new Error(m.error.message), { name: m.error.name });
      if (m.done) return;
      yield m.row;
    }
  } finally {
    worker.terminate();
  }
}

main().catch((e) => {
  window.benchError = { name: e.name, message: e.message };
  document.getElementById("status").textContent = `${e.name}: ${e.message}`;
  document.body.dataset.state = "error";
});

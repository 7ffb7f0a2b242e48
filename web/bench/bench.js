// Times the kernel cases in the page: a warm-up run, then `runs` timed runs of each, with
// performance.now(). Results go to the table and to window.benchResult.
import { kernels } from "../src/index.js";

const params = new URLSearchParams(location.search);
const specs = (params.get("cases") ?? "decode:1:8192,decode:8:8192,prefill:1024").split(",");
const runs = Number(params.get("runs") ?? 7);

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

async function main() {
  document.body.dataset.state = "running";
  // ?build=plain or ?build=relaxed pins a build; by default the loader picks (relaxed where the
  // browser has it).
  const build = params.get("build");
  const wasmUrl = build ? new URL(`../pkg/twinfer_web${build === "relaxed" ? "_relaxed" : ""}_bg.wasm`, import.meta.url) : undefined;
  const { BenchCase } = await kernels({ wasmUrl });
  const results = [];
  for (const spec of specs) {
    document.getElementById("status").textContent = `running ${spec}`;
    // Let the status paint before a long synchronous run.
    await new Promise((r) => setTimeout(r, 0));
    const c = new BenchCase(spec);
    // Warm up for a second (three runs at least): V8 first runs a module's functions as baseline
    // code and swaps in optimised code when its background compile is done, which took several
    // runs of a short case, so fewer warm-up runs left some timed runs on the slow tier.
    const warmUntil = performance.now() + 1000;
    for (let i = 0; i < 3 || performance.now() < warmUntil; i++) c.run();
    const ms = [];
    for (let i = 0; i < runs; i++) {
      const t = performance.now();
      c.run();
      ms.push(performance.now() - t);
    }
    const med = median(ms);
    const rate = c.work / (med / 1e3) / 1e9;
    const unit = c.bound === "memory" ? "GB/s" : "GFLOP/s";
    results.push({ spec, name: c.name, simd: c.simd, bound: c.bound, work: c.work, ms, medianMs: med, rate, unit });
    const row = document.createElement("tr");
    for (const text of [c.name, med.toFixed(3), `${Math.min(...ms).toFixed(3)}..${Math.max(...ms).toFixed(3)}`, `${rate.toFixed(2)} ${unit}`]) {
      const td = document.createElement("td");
      td.textContent = text;
      row.append(td);
    }
    document.getElementById("rows").append(row);
    c.free();
  }
  window.benchResult = { userAgent: navigator.userAgent, runs, results };
  document.getElementById("status").textContent = "done";
  document.body.dataset.state = "done";
}

main().catch((e) => {
  window.benchError = { name: e.name, message: e.message };
  document.getElementById("status").textContent = `${e.name}: ${e.message}`;
  document.body.dataset.state = "error";
});

// The page-level kernel benchmark: runs bench/index.html in headless Chromium (playwright-core),
// then the native `twinfer bench kernels` on the same cases (AVX2, one thread as the page has,
// and all threads), and prints wasm/native ratios. Writes test-artifacts/bench.json.
// Usage: node bench/run.mjs [--cli PATH] [--cases decode:1:8192,...] [--runs N] [--build plain|relaxed]
//        [--threads N]   (the threaded build in a worker, its pool sized to N, beside the page's one thread)
// The native binary should be a release build (cargo build --release -p twinfer-cli).
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync, existsSync } from "node:fs";
import { cpus } from "node:os";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

import { serve } from "../demo/serve.mjs";

const { values } = parseArgs({
  options: {
    cli: { type: "string", default: process.env.TWINFER_CLI ?? new URL("../../target/release/twinfer", import.meta.url).pathname },
    cases: { type: "string", default: "decode:1:8192,decode:8:8192,decode:8:1024,prefill:1024" },
    runs: { type: "string", default: "7" },
    simd: { type: "string", default: "avx2" },
    // The wasm build the page runs: plain simd128, relaxed SIMD, or the loader's pick.
    build: { type: "string", default: "auto" },
    // Also run the cases on the threaded build with this many threads (0: not).
    threads: { type: "string", default: "0" },
  },
});
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
if (!existsSync(values.cli)) throw new Error(`${values.cli} is missing: cargo build --release -p twinfer-cli (or pass --cli)`);

const server = await serve(0);
const threads = Number(values.threads);
async function runPage(query) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-first-run", "--disable-background-networking"] });
  try {
    const tab = await browser.newPage();
    await tab.goto(`${server.url}/bench/?cases=${values.cases}&runs=${values.runs}${query}`);
    await tab.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, { timeout: 600_000 });
    const error = await tab.evaluate(() => window.benchError ?? null);
    if (error) throw new Error(`the bench page failed: ${error.name}: ${error.message}`);
    return await tab.evaluate(() => window.benchResult);
  } finally {
    await browser.close();
  }
}
let page;
let threaded = null;
try {
  page = await runPage(values.build === "auto" ? "" : `&build=${values.build}`);
  if (threads > 0) threaded = await runPage(`&threads=${threads}`);
} finally {
  await server.close();
}

const caseArgs = values.cases.split(",").flatMap((c) => ["--case", c]);
const native = (threads) =>
  JSON.parse(
    execFileSync(values.cli, ["bench", "kernels", "--simd", values.simd, "--json", ...caseArgs], {
      encoding: "utf8",
      env: { ...process.env, TWINFER_THREADS: String(threads) },
    }),
  );
const single = native(1);
const all = native(cpus().length);

const rows = page.results.map((r) => {
  const one = single.cases.find((c) => c.name === r.name);
  const many = all.cases.find((c) => c.name === r.name);
  return {
    case: r.name,
    wasmMs: r.medianMs,
    wasmSpreadMs: [Math.min(...r.ms), Math.max(...r.ms)],
    nativeMs1: one.seconds.median * 1e3,
    nativeMsAll: many.seconds.median * 1e3,
    ratio1: r.medianMs / (one.seconds.median * 1e3),
    ratioAll: r.medianMs / (many.seconds.median * 1e3),
    unit: r.unit,
    wasmRate: r.rate,
  };
});
// The threaded build: its time against the page's one thread and native on as many threads.
const nativeN = threaded ? native(threads) : null;
const threadedRows = (threaded?.results ?? []).map((r) => {
  const one = rows.find((x) => x.case === r.name);
  const nat = nativeN.cases.find((c) => c.name === r.name);
  return {
    case: r.name,
    threads,
    wasmMs: r.medianMs,
    wasmSpreadMs: [Math.min(...r.ms), Math.max(...r.ms)],
    speedupOverOneThread: one.wasmMs / r.medianMs,
    nativeMs: nat.seconds.median * 1e3,
    ratioNative: r.medianMs / (nat.seconds.median * 1e3),
  };
});
const report = {
  date: new Date().toISOString(),
  machine: `${single.cpu}, ${cpus().length} threads`,
  browser: page.userAgent,
  simd: { wasm: page.results[0]?.simd, native: single.simd },
  nativeCeilings: { readGBs: single.read_gbps.median, fmaGflops: single.fma_gflops.median },
  runs: page.runs,
  rows,
  threadedRows,
};
mkdirSync(new URL("../test-artifacts/", import.meta.url), { recursive: true });
writeFileSync(new URL("../test-artifacts/bench.json", import.meta.url), JSON.stringify(report, null, 2));
console.log(`machine: ${report.machine} | ${report.browser}`);
console.log(`native ${single.simd}: read ceiling ${single.read_gbps.median.toFixed(1)} GB/s, FMA ${single.fma_gflops.median.toFixed(1)} GFLOP/s (1 thread)`);
console.log("case                               wasm ms (min..max)        native 1T ms  wasm/native 1T  native ${n}T ms  wasm/native ${n}T".replaceAll("${n}", cpus().length));
for (const r of rows) {
  console.log(
    `${r.case.padEnd(34)} ${r.wasmMs.toFixed(3).padStart(9)} (${r.wasmSpreadMs.map((x) => x.toFixed(2)).join("..")})`.padEnd(62) +
      `${r.nativeMs1.toFixed(3).padStart(10)}  ${r.ratio1.toFixed(2).padStart(12)}x  ${r.nativeMsAll.toFixed(3).padStart(12)}  ${r.ratioAll.toFixed(2).padStart(12)}x`,
  );
}
if (threadedRows.length) {
  console.log(`threaded build, ${threads} threads (a worker; the pool's other threads are workers too):`);
  console.log("case                               wasm ms (min..max)        vs 1 thread   native ${n}T ms  wasm/native ${n}T".replaceAll("${n}", threads));
  for (const r of threadedRows) {
    console.log(
      `${r.case.padEnd(34)} ${r.wasmMs.toFixed(3).padStart(9)} (${r.wasmSpreadMs.map((x) => x.toFixed(2)).join("..")})`.padEnd(62) +
        `${r.speedupOverOneThread.toFixed(2).padStart(9)}x  ${r.nativeMs.toFixed(3).padStart(14)}  ${r.ratioNative.toFixed(2).padStart(14)}x`,
    );
  }
}

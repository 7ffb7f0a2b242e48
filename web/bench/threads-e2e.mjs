// A real model on the wasm engine with 1 and N threads, in headless Chromium: SmolLM2-135M-Instruct
// Q4_1 (the GGUF file of scripts/fetch-models.sh) loaded in a Web Worker on a cross-origin isolated
// demo page, then a prompt of `--prompt` tokens and `--tokens` greedy tokens; TTFT, TPOT and
// tokens/s from the package's own metrics, each thread count in a fresh browser, alternating.
// Usage: node bench/threads-e2e.mjs [--threads 2] [--rounds 2] [--prompt 128] [--tokens 64]
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

import { serve } from "../demo/serve.mjs";

const { values } = parseArgs({
  options: {
    threads: { type: "string", default: "2" },
    rounds: { type: "string", default: "2" },
    prompt: { type: "string", default: "128" },
    tokens: { type: "string", default: "64" },
  },
});
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const MODEL = "/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

async function once(server, threads) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-first-run", "--disable-background-networking"] });
  try {
    const page = await browser.newPage();
    await page.goto(`${server.url}/demo/?backend=wasm&worker=1&threads=${threads}`);
    return await page.evaluate(
      async ({ model, promptLen, tokens }) => {
        const info = await window.demo.loadDecoder(model);
        const gen = window.demo.engines.gen;
        // Token ids 100.. as the prompt: the length is what is timed, not the text.
        const ids = Array.from({ length: promptLen }, (_, i) => 100 + (i % 1000));
        const it = gen.generate(ids, { maxTokens: tokens, ignoreEos: true });
        let r;
        while (!(r = await it.next()).done);
        const m = r.value.metrics;
        // Generated tokens per second of decode: the first token closes the prompt's time.
        const tps = (m.generatedTokens - 1) / ((m.e2e - m.ttft) / 1000);
        return { threads: info.decode.threads, why: info.threadsReason, ttftMs: m.ttft, tpotMs: m.tpot, itlP50: m.itl.p50, itlP99: m.itl.p99, tps };
      },
      { model: MODEL, promptLen: Number(values.prompt), tokens: Number(values.tokens) },
    );
  } finally {
    await browser.close();
  }
}

const server = await serve(0);
try {
  const rows = [];
  for (let round = 1; round <= Number(values.rounds); round++) {
    for (const threads of [1, Number(values.threads)]) {
      const r = await once(server, threads);
      rows.push({ round, ...r });
      console.log(
        `round ${round}: ${r.threads} thread(s): TTFT ${r.ttftMs.toFixed(1)} ms (${values.prompt} tokens), TPOT ${r.tpotMs.toFixed(2)} ms (ITL p50 ${r.itlP50.toFixed(2)}, p99 ${r.itlP99.toFixed(2)}), ${r.tps.toFixed(1)} tokens/s  [${r.why}]`,
      );
    }
  }
} finally {
  await server.close();
}

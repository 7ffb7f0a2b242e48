// Compiled with `tsc --noEmit` (npm run check:types): the README's example, against index.d.ts.
import { Twinfer, KvCacheFullError, type Info, type RunMetrics } from "twinfer";

export async function example(): Promise<void> {
  const tf = await Twinfer.create({ backend: "auto", onProgress: (p) => console.log(p.phase, p.loaded, p.total) });
  const info: Info = await tf.loadModel("/models/all-MiniLM-L6-v2/");
  console.log(info.backend, info.reason);
  const [a, b] = await tf.embed(["a cat", "a kitten"]);
  console.log(a.length === b.length);

  await tf.loadModel(new Map<string, ArrayBuffer>());
  const controller = new AbortController();
  try {
    const it = tf.generate("Hello", { maxTokens: 32, temperature: 0.7, topK: 40, topP: 0.9, seed: 1, stop: ["\n"], signal: controller.signal });
    for await (const { text, tokenId, t } of it) console.log(text, tokenId, t.toFixed(1));
  } catch (e) {
    if (e instanceof KvCacheFullError) console.log(e.code);
  }
  const m: RunMetrics = await tf.metrics({ reset: true });
  console.log(m.ttft.p50, m.tpot.p50, m.tps, m.itl.std);
  await tf.dispose();
}

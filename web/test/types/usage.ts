// Compiled with `tsc --noEmit` (npm run check:types): the README's example, against index.d.ts.
import { Twinfer, KvCacheFullError, QuotaExceededError, deleteModel, hasModel, listModels, type Info, type RunMetrics, type StoredModel } from "twinfer";

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

export async function cached(): Promise<void> {
  const tf = await Twinfer.create({ worker: true });
  const url = "/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
  try {
    await tf.loadModel(url, {
      sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
      onProgress: (p) => console.log(p.phase, p.loaded, p.total, p.file, p.fromCache),
    });
  } catch (e) {
    if (e instanceof QuotaExceededError) console.log(e.bytesNeeded, e.usage, e.quota);
  }
  await tf.loadModel("/models/tiny-llama/", { cache: false, digests: { "config.json": "0".repeat(64) } });
  const models: StoredModel[] = await listModels();
  for (const m of models) console.log(m.url, m.bytes, new Date(m.storedAt), m.files.map((f) => `${f.name} ${f.bytes} ${f.sha256 ?? ""}`));
  if (await hasModel(url)) console.log(await deleteModel(new URL(url, "https://example.com/")));
}

// A user's app: the package imported by name, bundled by Vite (which must carry the .wasm file
// and the worker along), the model fetched by URL. The test reads `window.result`.
import { Twinfer } from "twinfer";

const out = document.getElementById("out");
try {
  const sentences = await (await fetch("/models/all-MiniLM-L6-v2/golden.json")).json();
  const tf = await Twinfer.create({ backend: "wasm", worker: true });
  await tf.loadModel(new URL("/models/all-MiniLM-L6-v2/", location.href).href);
  const embeddings = await tf.embed(sentences.sentences.slice(0, 4));
  window.result = { backend: tf.info().backend, embeddings: embeddings.map((e) => Array.from(e)) };
  out.textContent = `ok: ${embeddings.length} embeddings on ${tf.info().backend}`;
} catch (e) {
  window.result = { error: `${e.name}: ${e.message}` };
  out.textContent = window.result.error;
}

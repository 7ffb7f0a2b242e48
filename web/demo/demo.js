// The demo: open an engine, load an embedding model and a decoder (URL or dropped files), rank
// sentences by meaning, stream generated text with live TTFT / TPOT and an ITL histogram.
// `?auto=1` runs all of it on the default models (the browser tests and the screenshot use it);
// `backend=`, `worker=1`, `threads=`, `promptIds=1,2,3`, `maxTokens=` adjust the run.
import { Twinfer } from "../src/index.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const engines = { embed: null, gen: null };
window.demoProgress = [];
let itl = [];

function status(text) {
  $("status").textContent = text;
}

function options() {
  const threads = params.has("threads") ? Number(params.get("threads")) : "auto";
  return { backend: $("backend").value, worker: $("worker").checked, threads };
}

function showInfo(info) {
  const rows = [
    ["backend", info.backend],
    ["why", info.reason],
    ["prefill", `${info.prefill.backend} · ${info.prefill.variant} · ${info.prefill.device}`],
    ["decode", `${info.decode.backend} · ${info.decode.variant} · ${info.decode.device}`],
    ["CPU SIMD", info.simd],
    ["CPU threads", `${info.decode.threads}: ${info.threadsReason}`],
  ];
  if (info.adapter) {
    const a = info.adapter;
    rows.push(["adapter", `${a.vendor} ${a.architecture} ${a.description}${a.isFallbackAdapter ? " (fallback)" : ""}`]);
    rows.push(["features", a.features.join(", ") || "none"]);
    rows.push(["limits", `storage binding ${(a.limits.maxStorageBufferBindingSize / 2 ** 20).toFixed(0)} MiB, workgroup ${a.limits.maxComputeInvocationsPerWorkgroup}`]);
  }
  $("info").replaceChildren(
    ...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v;
      return [dt, dd];
    }),
  );
}

async function open(which) {
  engines[which]?.dispose().catch(() => {});
  const tf = await Twinfer.create(options());
  engines[which] = tf;
  showInfo(tf.info());
  return tf;
}

async function load(which, source) {
  const bar = $(`${which}-progress`);
  const tf = engines[which] ?? (await open(which));
  // A float decoder can be quantized as it downloads (GGUF files keep their formats).
  const quantize = which === "gen" && $("quantize").value ? { quantize: $("quantize").value } : {};
  const info = await tf.loadModel(source, {
    ...quantize,
    onProgress: (p) => {
      window.demoProgress.push(p.phase);
      bar.max = p.total || 1;
      bar.value = p.loaded;
      status(p.text);
    },
  });
  bar.value = bar.max;
  status(`${which === "embed" ? "embedding model" : "decoder"}: ${info.model.description}`);
  showInfo(info);
  if (which === "gen") {
    // A model with a chat template chats by default; the conversation starts over.
    $("chat").disabled = !info.model.chat;
    $("chat").checked = info.model.chat;
    history = [];
    $("new-chat").disabled = !info.model.chat;
  }
  return info;
}

/** The conversation so far, when the decoder chats: `{ role, content }` messages. */
let history = [];

function cosine(a, b) {
  let dot = 0;
  for (let i = 0; i < a.length; i++) dot += a[i] * b[i];
  return dot;
}

async function rank() {
  const query = $("query").value;
  const sentences = $("corpus").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const [q, ...vectors] = await engines.embed.embed([query, ...sentences]);
  const ranked = sentences.map((s, i) => ({ s, score: cosine(q, vectors[i]) })).sort((a, b) => b.score - a.score);
  $("ranking").replaceChildren(
    ...ranked.map(({ s, score }) => {
      const li = document.createElement("li");
      const span = document.createElement("span");
      span.className = "score";
      span.textContent = score.toFixed(3);
      li.append(span, s);
      return li;
    }),
  );
  return ranked;
}

function drawHistogram() {
  const canvas = $("itl-chart");
  const g = canvas.getContext("2d");
  const { width: w, height: h } = canvas;
  g.clearRect(0, 0, w, h);
  g.fillStyle = "#59606b";
  g.font = "12px system-ui, sans-serif";
  if (itl.length === 0) {
    g.fillText("inter-token latency histogram (ms): generate to fill", 10, 20);
    return;
  }
  const sorted = [...itl].sort((a, b) => a - b);
  // Up to p99 keeps one slow outlier (a page fault, a GC) from flattening the rest.
  const hi = sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))] * 1.05 || 1;
  const bins = new Array(24).fill(0);
  for (const x of itl) bins[Math.min(bins.length - 1, Math.floor((x / hi) * bins.length))] += 1;
  const top = Math.max(...bins);
  const bw = (w - 40) / bins.length;
  g.fillStyle = "#2563eb";
  bins.forEach((n, i) => {
    const bh = ((h - 40) * n) / top;
    g.fillRect(30 + i * bw, h - 20 - bh, bw - 2, bh);
  });
  g.fillStyle = "#59606b";
  g.fillText("0", 26, h - 6);
  g.textAlign = "right";
  g.fillText(`${hi.toFixed(1)} ms`, w - 6, h - 6);
  g.textAlign = "left";
  g.fillText(`ITL histogram, ${itl.length} gaps (count max ${top})`, 34, 14);
}

const fmt = (x) => (x === null || x === undefined ? "-" : `${x.toFixed(1)} ms`);

/** Runs the prompt box (or `ids`: the page's `promptIds` parameter unless given) as one request. */
async function generate(signal, ids = params.get("promptIds")) {
  const chat = !ids && $("chat").checked;
  const text = $("prompt").value;
  // In a chat the template renders the whole conversation, and the engine's prefix cache finds
  // the earlier turns' KV pages.
  const prompt = ids ? ids.split(",").map(Number) : chat ? { messages: [...history, { role: "user", content: text }] } : text;
  const maxTokens = Number($("max-tokens").value);
  const temperature = Number($("temperature").value);
  if (chat) {
    $("output").textContent += `${history.length ? "\n\n" : ""}you: ${text}\nmodel: `;
  } else {
    $("output").textContent = "";
  }
  itl = [];
  let last = null;
  let first = null;
  const tokens = [];
  const it = engines.gen.generate(prompt, { maxTokens, temperature, seed: 1, ignoreEos: Boolean(ids), signal });
  let r;
  while (!(r = await it.next()).done) {
    const { text, tokenId, t } = r.value;
    tokens.push(tokenId);
    $("output").textContent += text;
    if (first === null) {
      first = t;
      $("ttft").textContent = fmt(t);
    } else {
      itl.push(t - last);
      $("tpot").textContent = fmt((t - first) / (tokens.length - 1));
      $("tps").textContent = (1000 / ((t - first) / (tokens.length - 1))).toFixed(1);
    }
    last = t;
    if (tokens.length % 4 === 0) requestAnimationFrame(drawHistogram);
  }
  const m = r.value.metrics;
  $("ttft").textContent = fmt(m.ttft);
  $("tpot").textContent = fmt(m.tpot);
  $("itl").textContent = `${fmt(m.itl.p50)} / ${fmt(m.itl.p90)} / ${fmt(m.itl.p99)} / ${fmt(m.itl.std)}`;
  $("cached").textContent = `${m.cachedTokens} of ${m.promptTokens}`;
  drawHistogram();
  if (chat) history.push({ role: "user", content: text }, { role: "assistant", content: r.value.text });
  return { tokens, text: r.value.text, reason: r.value.reason, metrics: m };
}

function dropZone(id, which) {
  const zone = $(id);
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    guard(load(which, [...e.dataTransfer.files]));
  });
}

function guard(promise) {
  return promise.catch((e) => {
    status(`${e.name}: ${e.message}`);
    throw e;
  });
}

$("open").onclick = () => guard(Promise.all([open("embed"), open("gen")]));
$("embed-load").onclick = () => guard(load("embed", $("embed-url").value));
$("gen-load").onclick = () => guard(load("gen", $("gen-url").value));
$("rank").onclick = () => guard(rank());
let controller = null;
$("run").onclick = () => {
  controller = new AbortController();
  $("stop").disabled = false;
  guard(generate(controller.signal)).finally(() => {
    $("stop").disabled = true;
  });
};
$("stop").onclick = () => controller?.abort();
$("new-chat").onclick = () => {
  history = [];
  $("output").textContent = "";
};
dropZone("embed-drop", "embed");
dropZone("gen-drop", "gen");
drawHistogram();

// The query's engine choices apply to the page's buttons too (the benchmarks drive them).
if (params.has("backend")) $("backend").value = params.get("backend");
if (params.has("worker")) $("worker").checked = params.get("worker") === "1";

// For the tests: the engines, and calls that return plain data.
window.demo = {
  engines,
  embed: async (texts) => (await engines.embed.embed(texts)).map((v) => [...v]),
  generateIds: async (ids, maxTokens) => {
    const out = [];
    for await (const t of engines.gen.generate(ids, { maxTokens, ignoreEos: true })) out.push(t.tokenId);
    return out;
  },
  /** Loads the decoder at `url`, as the page's button does. */
  loadDecoder: (url) => load("gen", url),
  /** Types `text` into the prompt box and runs it as the page's button does (a chat turn when chatting). */
  say: async (text) => {
    $("prompt").value = text;
    const r = await generate(undefined, null);
    return { text: r.text, reason: r.reason, promptTokens: r.metrics.promptTokens, cachedTokens: r.metrics.cachedTokens, output: $("output").textContent };
  },
};

async function autoRun() {
  document.body.dataset.state = "running";
  if (params.has("maxTokens")) $("max-tokens").value = params.get("maxTokens");
  if (params.has("genModel")) $("gen-url").value = params.get("genModel");
  if (params.has("quantize")) $("quantize").value = params.get("quantize");
  // Milliseconds per phase, for whoever wonders where a slow page's time went.
  const times = {};
  let mark = performance.now();
  const timed = async (name, work) => {
    const result = await work();
    const now = performance.now();
    times[name] = Math.round(now - mark);
    mark = now;
    return result;
  };
  try {
    await timed("open", () => Promise.all([open("embed"), open("gen")]));
    const embedInfo = await timed("loadEmbed", () => load("embed", $("embed-url").value));
    const ranking = await timed("rank", rank);
    const genInfo = await timed("loadGen", () => load("gen", $("gen-url").value));
    const generated = await timed("generate", () => generate());
    window.demoTimes = times;
    window.demoResult = { embedInfo, genInfo, ranking, generated, metrics: await engines.gen.metrics() };
    status("");
    document.body.dataset.state = "done";
  } catch (e) {
    window.demoError = { name: e.name, code: e.code, message: e.message };
    status(`${e.name}: ${e.message}`);
    document.body.dataset.state = "error";
  }
}

if (params.get("auto") === "1") autoRun();

// The attention kernels of the package (`kernels()`) against a plain JS reference of attention.
// Run: npm test (after scripts/build-web.sh has built ../pkg).
import { test } from "node:test";
import assert from "node:assert/strict";
import { kernels } from "../src/index.js";
import { hasRelaxedSimd } from "../src/loader.js";

const twinfer = await kernels();

/** Deterministic uniform numbers in [-1, 1) (mulberry32). */
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1;
  };
}

function randomArray(next, n, gain = 1) {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = next() * gain;
  return a;
}

/**
 * Softmax attention of one query row against `keys` / `values` (arrays of head_dim rows), in f64.
 * `visible` is how many leading keys the row sees.
 */
function attendRow(q, keys, values, visible, scale) {
  const d = q.length;
  const out = new Float64Array(d);
  if (visible === 0) return out;
  const s = new Float64Array(visible);
  let m = -Infinity;
  for (let j = 0; j < visible; j++) {
    let dot = 0;
    for (let c = 0; c < d; c++) dot += q[c] * keys[j][c];
    s[j] = dot * scale;
    m = Math.max(m, s[j]);
  }
  let sum = 0;
  for (let j = 0; j < visible; j++) {
    s[j] = Math.exp(s[j] - m);
    sum += s[j];
  }
  for (let j = 0; j < visible; j++) {
    const p = s[j] / sum;
    for (let c = 0; c < d; c++) out[c] += p * values[j][c];
  }
  return out;
}

/** Decode over a paged pool, NHD pages: [num_pages, page_size, num_kv_heads, head_dim]. */
function referenceDecode({ q, kPool, vPool, pageSize, numQoHeads, numKvHeads, headDim, indptr, indices, lastPageLen }) {
  const batch = indptr.length - 1;
  const group = numQoHeads / numKvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const out = new Float64Array(batch * numQoHeads * headDim);
  const row = (pool, page, slot, h) => {
    const at = ((page * pageSize + slot) * numKvHeads + h) * headDim;
    return pool.subarray(at, at + headDim);
  };
  for (let b = 0; b < batch; b++) {
    const pages = Array.from(indices.subarray(indptr[b], indptr[b + 1]));
    const kvLen = pages.length === 0 ? 0 : (pages.length - 1) * pageSize + lastPageLen[b];
    for (let h = 0; h < numQoHeads; h++) {
      const kvh = Math.floor(h / group);
      const keys = [];
      const values = [];
      for (let j = 0; j < kvLen; j++) {
        const page = pages[Math.floor(j / pageSize)];
        keys.push(row(kPool, page, j % pageSize, kvh));
        values.push(row(vPool, page, j % pageSize, kvh));
      }
      const at = (b * numQoHeads + h) * headDim;
      out.set(attendRow(q.subarray(at, at + headDim), keys, values, kvLen, scale), at);
    }
  }
  return out;
}

/** Prefill over ragged contiguous KV; the causal mask is aligned bottom-right. */
function referencePrefill({ q, k, v, qoIndptr, kvIndptr, numQoHeads, numKvHeads, headDim, causal }) {
  const group = numQoHeads / numKvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const out = new Float64Array(q.length);
  for (let b = 0; b + 1 < qoIndptr.length; b++) {
    const qoLen = qoIndptr[b + 1] - qoIndptr[b];
    const kvLen = kvIndptr[b + 1] - kvIndptr[b];
    for (let i = 0; i < qoLen; i++) {
      const visible = causal ? Math.min(kvLen, Math.max(0, i + kvLen - qoLen + 1)) : kvLen;
      for (let h = 0; h < numQoHeads; h++) {
        const kvh = Math.floor(h / group);
        const keys = [];
        const values = [];
        for (let j = 0; j < kvLen; j++) {
          const at = ((kvIndptr[b] + j) * numKvHeads + kvh) * headDim;
          keys.push(k.subarray(at, at + headDim));
          values.push(v.subarray(at, at + headDim));
        }
        const at = ((qoIndptr[b] + i) * numQoHeads + h) * headDim;
        out.set(attendRow(q.subarray(at, at + headDim), keys, values, visible, scale), at);
      }
    }
  }
  return out;
}

function assertClose(got, want, tol = 1e-4) {
  assert.equal(got.length, want.length, "output length");
  for (let i = 0; i < want.length; i++) {
    const err = Math.abs(got[i] - want[i]);
    if (!(err <= tol * (1 + Math.abs(want[i])))) {
      assert.fail(`element ${i}: got ${got[i]}, want ${want[i]} (|diff| ${err})`);
    }
  }
}

/** A paged decode problem: sequences' pages shuffled among unused (garbage) pages. */
function decodeProblem(seed) {
  const next = rng(seed);
  const pageSize = 5;
  const numQoHeads = 8;
  const numKvHeads = 2;
  const headDim = 40;
  const kvLens = [1, 7, 23, 10];
  const pagesPerSeq = kvLens.map((n) => Math.ceil(n / pageSize));
  const used = pagesPerSeq.reduce((a, b) => a + b, 0);
  const numPages = used + 3;
  const order = Array.from({ length: numPages }, (_, i) => i);
  for (let i = numPages - 1; i > 0; i--) {
    const j = Math.floor(((next() + 1) / 2) * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const indptr = new Uint32Array(kvLens.length + 1);
  pagesPerSeq.forEach((n, b) => (indptr[b + 1] = indptr[b] + n));
  const indices = Uint32Array.from(order.slice(0, used));
  const lastPageLen = Uint32Array.from(kvLens.map((n) => n - (Math.ceil(n / pageSize) - 1) * pageSize));
  const poolLen = numPages * pageSize * numKvHeads * headDim;
  return {
    q: randomArray(next, kvLens.length * numQoHeads * headDim, 3),
    kPool: randomArray(next, poolLen),
    vPool: randomArray(next, poolLen),
    pageSize,
    numQoHeads,
    numKvHeads,
    headDim,
    indptr,
    indices,
    lastPageLen,
  };
}

function runDecode(p) {
  return twinfer.decode(
    p.q,
    p.kPool,
    p.vPool,
    p.pageSize,
    p.numQoHeads,
    p.numKvHeads,
    p.headDim,
    p.indptr,
    p.indices,
    p.lastPageLen,
  );
}

/** Asserts that `call` throws a TwinferError with the given code and a message matching `pattern`. */
function assertTwinferError(call, code, pattern) {
  assert.throws(call, (e) => {
    assert.ok(e instanceof Error, `expected an Error, got ${e}`);
    assert.equal(e.name, "TwinferError");
    assert.equal(e.code, code);
    assert.match(e.message, pattern);
    return true;
  });
}

test("info reports the CPU backend on simd128 (the relaxed-SIMD build where the runtime has it)", () => {
  const info = twinfer.info();
  const level = hasRelaxedSimd() ? "simd128-relaxed" : "simd128";
  assert.equal(info.backend, "cpu");
  assert.equal(info.simd, level);
  assert.deepEqual(info.simdAvailable, ["scalar", level]);
  assert.equal(info.threads, 1);
  assert.equal(typeof info.reason, "string");
  assert.ok(info.reason.length > 0);
  assert.equal(typeof info.device, "string");
  assert.match(info.version, /^\d+\.\d+\.\d+/);
});

test("decode matches the JS reference", () => {
  const p = decodeProblem(1234);
  const o = runDecode(p);
  assert.ok(o instanceof Float32Array);
  assertClose(o, referenceDecode(p));
});

test("prefill (causal and not) matches the JS reference", () => {
  const next = rng(99);
  const numQoHeads = 4;
  const numKvHeads = 4;
  const headDim = 64;
  const qoIndptr = Uint32Array.from([0, 3, 3, 20]);
  const kvIndptr = Uint32Array.from([0, 9, 13, 30]);
  const q = randomArray(next, qoIndptr[3] * numQoHeads * headDim, 2);
  const k = randomArray(next, kvIndptr[3] * numKvHeads * headDim);
  const v = randomArray(next, kvIndptr[3] * numKvHeads * headDim);
  for (const causal of [false, true]) {
    const o = twinfer.prefill(q, k, v, qoIndptr, kvIndptr, numQoHeads, numKvHeads, headDim, causal);
    const want = referencePrefill({ q, k, v, qoIndptr, kvIndptr, numQoHeads, numKvHeads, headDim, causal });
    assertClose(o, want);
  }
});

test("bad calls throw a TwinferError and leave the module usable", () => {
  const p = decodeProblem(7);
  assertTwinferError(() => runDecode({ ...p, q: p.q.subarray(1) }), "ShapeMismatch", /^q .*expected \d+ elements, got \d+/);
  const badIndices = Uint32Array.from(p.indices);
  badIndices[2] = 1000;
  assertTwinferError(
    () => runDecode({ ...p, indices: badIndices }),
    "PageIndexOutOfRange",
    /page table entry 2 names page 1000, but the pool has \d+ pages/,
  );
  assertTwinferError(() => runDecode({ ...p, headDim: 12 }), "HeadDimUnsupported", /head_dim 12/);
  assertTwinferError(() => runDecode({ ...p, numQoHeads: 3 }), "HeadRatio", /num_qo_heads 3/);
  assertTwinferError(() => runDecode({ ...p, pageSize: 0 }), "PageSizeUnsupported", /page_size 0/);
  // usize is 32 bits in wasm: head counts whose element counts wrap are refused, not wrapped.
  assertTwinferError(() => runDecode({ ...p, numQoHeads: 2 ** 29 }), "InvalidParameter", /overflows the address space/);
  assertTwinferError(
    () => runDecode({ ...p, lastPageLen: Uint32Array.from([0, 2, 3, 5]) }),
    "LastPageLenOutOfRange",
    /sequence 0: last_page_len 0/,
  );
  assertTwinferError(
    () => twinfer.prefill(new Float32Array(8), new Float32Array(8), new Float32Array(8), [0, 1], [0, 2], 1, 1, 8, true),
    "ShapeMismatch",
    /^k /,
  );
  // The errors changed nothing: a good call still works.
  assertClose(runDecode(p), referenceDecode(p));
});

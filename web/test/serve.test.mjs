// The demo server serves the package folder and the model cache, and nothing else: a sibling
// folder that shares the package folder's name as a prefix, an encoded `..`, or a malformed URL
// is refused, and the server keeps serving afterwards. Files go whole or as one byte range.
import assert from "node:assert/strict";
import { test } from "node:test";

import { fileFor, rangeFor, serve } from "../demo/serve.mjs";

test("paths outside the served folders are refused, malformed URLs are a 400", () => {
  assert.match(fileFor("/demo/").path, /demo[/\\]index\.html$/);
  assert.match(fileFor("/package.json").path, /package\.json$/);
  // `web-evil` next to `web` starts with the same characters.
  assert.equal(fileFor("/..%2fweb-evil/x").status, 403);
  assert.equal(fileFor("/..%2f..%2fetc/passwd").status, 403);
  assert.equal(fileFor("/models/..%2f..%2fx").status, 403);
  assert.equal(fileFor("/%E0%A4%A").status, 400);
  assert.equal(fileFor("/a%00b").status, 400);
  assert.equal(fileFor("/no-such-file.js").status, 404);
});

test("the server answers a malformed URL and keeps serving", async () => {
  const { url, close } = await serve(0);
  try {
    const bad = await fetch(`${url}/%E0%A4%A`);
    assert.equal(bad.status, 400);
    const escape = await fetch(`${url}/..%2fweb-evil/x`);
    assert.equal(escape.status, 403);
    const good = await fetch(`${url}/package.json`);
    assert.equal(good.status, 200);
    assert.equal((await good.json()).name, "twinfer");
  } finally {
    await close();
  }
});

test("a Range header gets one byte range (206 and Content-Range), with an ETag and Last-Modified to resume by", async () => {
  const v = { etag: '"e"', lastModified: "Thu, 01 Jan 2026 00:00:00 GMT" };
  assert.equal(rangeFor({}, 100, v), null);
  assert.deepEqual(rangeFor({ range: "bytes=10-" }, 100, v), { start: 10, end: 99 });
  assert.deepEqual(rangeFor({ range: "bytes=10-19" }, 100, v), { start: 10, end: 19 });
  assert.deepEqual(rangeFor({ range: "bytes=90-200" }, 100, v), { start: 90, end: 99 });
  assert.deepEqual(rangeFor({ range: "bytes=-5" }, 100, v), { start: 95, end: 99 });
  assert.equal(rangeFor({ range: "bytes=100-" }, 100, v), "unsatisfiable");
  assert.equal(rangeFor({ range: "bytes=0-1,5-6" }, 100, v), null, "several ranges: the whole file");
  assert.equal(rangeFor({ range: "bytes=20-10" }, 100, v), null);
  assert.deepEqual(rangeFor({ range: "bytes=10-", "if-range": '"e"' }, 100, v), { start: 10, end: 99 });
  assert.equal(rangeFor({ range: "bytes=10-", "if-range": '"old"' }, 100, v), null, "a changed file: the whole of it");

  const { url, close } = await serve(0);
  try {
    const whole = await fetch(`${url}/package.json`);
    const bytes = Buffer.from(await whole.arrayBuffer());
    assert.equal(whole.status, 200);
    assert.equal(whole.headers.get("accept-ranges"), "bytes");
    assert.equal(Number(whole.headers.get("content-length")), bytes.length);
    const etag = whole.headers.get("etag");
    assert.match(etag, /^"[0-9a-f]+-[0-9a-f]+"$/);
    assert.ok(whole.headers.get("last-modified"));

    const part = await fetch(`${url}/package.json`, { headers: { range: "bytes=7-" } });
    assert.equal(part.status, 206);
    assert.equal(part.headers.get("content-range"), `bytes 7-${bytes.length - 1}/${bytes.length}`);
    assert.equal(Number(part.headers.get("content-length")), bytes.length - 7);
    assert.equal(part.headers.get("etag"), etag);
    assert.ok(Buffer.from(await part.arrayBuffer()).equals(bytes.subarray(7)));

    const stale = await fetch(`${url}/package.json`, { headers: { range: "bytes=7-", "if-range": '"old"' } });
    assert.equal(stale.status, 200);
    assert.equal((await stale.arrayBuffer()).byteLength, bytes.length);
    const past = await fetch(`${url}/package.json`, { headers: { range: `bytes=${bytes.length}-` } });
    assert.equal(past.status, 416);
    assert.equal(past.headers.get("content-range"), `bytes */${bytes.length}`);
    const head = await fetch(`${url}/package.json`, { method: "HEAD" });
    assert.equal(head.status, 200);
    assert.equal(Number(head.headers.get("content-length")), bytes.length);
  } finally {
    await close();
  }
});

test("cutAfter drops a response after that many bytes (a download interrupted on purpose)", async () => {
  const { url, close } = await serve(0, { cutAfter: (req) => (req.headers.range ? undefined : 100) });
  try {
    const cut = await fetch(`${url}/package.json`);
    await assert.rejects(cut.arrayBuffer());
    const rest = await fetch(`${url}/package.json`, { headers: { range: "bytes=100-" } });
    assert.equal(rest.status, 206);
    assert.ok((await rest.arrayBuffer()).byteLength > 0);
  } finally {
    await close();
  }
});

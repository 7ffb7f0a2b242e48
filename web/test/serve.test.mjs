// The demo server serves the package folder and the model cache, and nothing else: a sibling
// folder that shares the package folder's name as a prefix, an encoded `..`, or a malformed URL
// is refused, and the server keeps serving afterwards.
import assert from "node:assert/strict";
import { test } from "node:test";

import { fileFor, serve } from "../demo/serve.mjs";

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

// Run from a fresh folder where the packed tarball was installed (scripts/test-wasm.sh does it):
// the README's Node example, through the package name, as a new user would.
import { Twinfer } from "twinfer";
import { readFileSync } from "node:fs";
import assert from "node:assert/strict";

const dir = process.argv[2];
const tf = await Twinfer.create();
const files = new Map(["config.json", "tokenizer.json", "model.safetensors"].map((n) => [n, readFileSync(`${dir}/${n}`)]));
await tf.loadModel(files);
const [query, near, far] = await tf.embed(["How do I reset my password?", "Use the account recovery link.", "The store opens at nine."]);
const dot = (x, y) => x.reduce((s, v, i) => s + v * y[i], 0);
assert.equal(tf.info().backend, "wasm");
assert.ok(dot(query, near) > dot(query, far) + 0.2, `${dot(query, near)} vs ${dot(query, far)}`);
console.log(`packed package: ${tf.info().backend}, cosine ${dot(query, near).toFixed(3)} (near) vs ${dot(query, far).toFixed(3)} (far)`);

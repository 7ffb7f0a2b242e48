// The Vite app's check: serves the built app (dist/) and the models, opens it in headless
// Chromium, and compares its embeddings with the float64 reference.
// Usage: node run.mjs APP_DIR MODELS_DIR CHROMIUM_MODULES (the folder with playwright-core).
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join, extname, normalize } from "node:path";
import { createRequire } from "node:module";
import { checkEmbedding } from "../embedding-check.mjs";

const [app, models, modules] = process.argv.slice(2);
const { chromium } = createRequire(join(modules, "x.js"))("playwright-core");
const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };
const server = createServer(async (req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
  const file = path.startsWith("/models/") ? join(models, path.slice(8)) : join(app, "dist", path === "/" ? "index.html" : path);
  try {
    const body = await readFile(file);
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
    res.end(body);
  } catch {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!existsSync(chromiumPath)) throw new Error(`${chromiumPath} is missing`);
const browser = await chromium.launch({ executablePath: chromiumPath, headless: true, args: ["--no-first-run"] });
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction(() => window.result !== undefined, null, { timeout: 120_000 });
  const result = await page.evaluate(() => window.result);
  if (result.error) throw new Error(`the Vite app failed: ${result.error}`);
  const golden = JSON.parse(await readFile(join(models, "all-MiniLM-L6-v2/golden.json"), "utf8"));
  let worst = 0;
  result.embeddings.forEach((e, i) => (worst = Math.max(worst, checkEmbedding(e, golden.embeddings[i], `sentence ${i}`))));
  console.log(`Vite app: ${result.embeddings.length} embeddings on ${result.backend} in a worker, worst error ${worst.toExponential(2)}`);
} finally {
  await browser.close();
  server.close();
}

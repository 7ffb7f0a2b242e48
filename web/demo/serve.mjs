// A static server for the demo and the browser tests: the package folder at /, and the model
// cache (scripts/fetch-models.sh) at /models/. http://127.0.0.1 is a secure context, as WebGPU
// needs. Usage: node demo/serve.mjs [port]   (then open http://127.0.0.1:PORT/demo/)
import { createReadStream, existsSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { homedir } from "node:os";
import { extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(fileURLToPath(new URL("..", import.meta.url)));
const MODELS = resolve(process.env.TWINFER_MODELS || join(homedir(), ".cache/twinfer/models"));
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript",
  ".mjs": "text/javascript",
  ".css": "text/css",
  ".json": "application/json",
  ".wasm": "application/wasm",
  ".svg": "image/svg+xml",
};

/** Starts the server; resolves to { url, close }. */
export function serve(port = 0) {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const [base, rest] = path.startsWith("/models/") ? [MODELS, path.slice(8)] : [ROOT, path.slice(1)];
    let file = resolve(base, normalize(rest || "."));
    if (!file.startsWith(base)) return res.writeHead(403).end();
    if (existsSync(file) && statSync(file).isDirectory()) file = join(file, "index.html");
    if (!existsSync(file)) return res.writeHead(404).end();
    res.writeHead(200, {
      "content-type": TYPES[extname(file)] ?? "application/octet-stream",
      "content-length": statSync(file).size,
      "cache-control": "no-store",
    });
    createReadStream(file).pipe(res);
  });
  return new Promise((ready) =>
    server.listen(port, "127.0.0.1", () =>
      ready({ url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(r)) }),
    ),
  );
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { url } = await serve(Number(process.argv[2] ?? 8080));
  console.log(`twinfer demo: ${url}/demo/   (models from ${MODELS} at ${url}/models/)`);
}

// A static server for the demo and the browser tests: the package folder at /, and the model
// cache (scripts/fetch-models.sh) at /models/. http://127.0.0.1 is a secure context, as WebGPU
// needs. Usage: node demo/serve.mjs [port]   (then open http://127.0.0.1:PORT/demo/)
import { createReadStream, existsSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { homedir } from "node:os";
import { extname, isAbsolute, join, normalize, relative, resolve, sep } from "node:path";
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

/**
 * The file a request URL names, inside the package folder or the model cache: `{ path }`, or
 * `{ status }` for a malformed URL (400), a path outside both folders (403) or a missing file (404).
 */
export function fileFor(url) {
  let path;
  try {
    path = decodeURIComponent(new URL(url, "http://x").pathname);
  } catch {
    return { status: 400 };
  }
  if (path.includes("\0")) return { status: 400 };
  const [base, rest] = path.startsWith("/models/") ? [MODELS, path.slice(8)] : [ROOT, path.slice(1)];
  let file = resolve(base, normalize(rest || "."));
  // Inside means below `base`: a sibling such as `${base}-other` only shares a prefix.
  const inside = relative(base, file);
  if (inside === ".." || inside.startsWith(`..${sep}`) || isAbsolute(inside)) return { status: 403 };
  if (existsSync(file) && statSync(file).isDirectory()) file = join(file, "index.html");
  if (!existsSync(file) || !statSync(file).isFile()) return { status: 404 };
  return { path: file };
}

/** Starts the server; resolves to { url, close }. */
export function serve(port = 0) {
  const server = createServer((req, res) => {
    const file = fileFor(req.url);
    if (file.status) return res.writeHead(file.status).end();
    const stream = createReadStream(file.path);
    stream.on("error", () => (res.headersSent ? res.destroy() : res.writeHead(500).end()));
    stream.on("open", () => {
      res.writeHead(200, {
        "content-type": TYPES[extname(file.path)] ?? "application/octet-stream",
        "content-length": statSync(file.path).size,
        "cache-control": "no-store",
      });
      stream.pipe(res);
    });
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

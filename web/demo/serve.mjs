// A static server for the demo and the browser tests: the package folder at /, and the model
// cache (scripts/fetch-models.sh) at /models/, with byte ranges so that downloads resume, and the
// cross-origin isolation headers that shared memory needs. http://127.0.0.1 is a secure context,
// as WebGPU needs. Usage: node demo/serve.mjs [port]   (then open http://127.0.0.1:PORT/demo/)
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

/**
 * The byte range a `Range` header asks of a file of `size` bytes: `{ start, end }` (inclusive),
 * `null` to send the whole file (no header, a form this server does not serve such as several
 * ranges, or an `If-Range` that no longer matches), or `"unsatisfiable"` (416).
 */
export function rangeFor(headers, size, validators) {
  const header = headers.range;
  if (!header) return null;
  const ifRange = headers["if-range"];
  if (ifRange && ifRange !== validators.etag && ifRange !== validators.lastModified) return null;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "")) return null;
  let start;
  let end;
  if (m[1] === "") {
    // The last N bytes.
    const n = Number(m[2]);
    if (n === 0) return "unsatisfiable";
    start = Math.max(0, size - n);
    end = size - 1;
  } else {
    start = Number(m[1]);
    end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
    if (m[2] !== "" && Number(m[2]) < start) return null;
  }
  if (start >= size) return "unsatisfiable";
  return { start, end };
}

/**
 * Cross-origin isolation (the page gets shared memory, which the threaded wasm build needs): on
 * every response but those whose URL asks `isolation=0` (the tests of the one-thread fallback).
 * Everything here is same-origin, so `require-corp` blocks nothing.
 */
export function isolationHeaders(url) {
  let off = false;
  try {
    off = new URL(url, "http://x").searchParams.get("isolation") === "0";
  } catch {
    // fileFor answers a malformed URL with 400 before this runs.
  }
  return off
    ? {}
    : { "cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp", "cross-origin-resource-policy": "same-origin" };
}

/**
 * Starts the server; resolves to { url, close }. Files are sent whole or as one byte range
 * (`Range: bytes=N-`, answered 206 with `Content-Range`), with an `ETag` and `Last-Modified`, so
 * that a download cut short resumes. `cutAfter(req)`, for the tests: a byte count after which the
 * server drops the connection of that response (a download interrupted on purpose), or nothing.
 */
export function serve(port = 0, { cutAfter } = {}) {
  const server = createServer((req, res) => {
    const file = fileFor(req.url);
    if (file.status) return res.writeHead(file.status).end();
    if (req.method !== "GET" && req.method !== "HEAD") return res.writeHead(405, { allow: "GET, HEAD" }).end();
    const stat = statSync(file.path);
    const validators = {
      etag: `"${stat.size.toString(16)}-${Math.floor(stat.mtimeMs).toString(16)}"`,
      lastModified: stat.mtime.toUTCString(),
    };
    const headers = {
      "content-type": TYPES[extname(file.path)] ?? "application/octet-stream",
      "cache-control": "no-store",
      "accept-ranges": "bytes",
      etag: validators.etag,
      "last-modified": validators.lastModified,
      ...isolationHeaders(req.url),
    };
    const range = rangeFor(req.headers, stat.size, validators);
    if (range === "unsatisfiable") {
      return res.writeHead(416, { ...headers, "content-range": `bytes */${stat.size}` }).end();
    }
    const { start, end } = range ?? { start: 0, end: stat.size - 1 };
    const status = range ? 206 : 200;
    if (range) headers["content-range"] = `bytes ${start}-${end}/${stat.size}`;
    headers["content-length"] = Math.max(0, end - start + 1);
    if (req.method === "HEAD" || stat.size === 0) return res.writeHead(status, headers).end();
    const stream = createReadStream(file.path, { start, end });
    stream.on("error", () => (res.headersSent ? res.destroy() : res.writeHead(500).end()));
    const cut = cutAfter?.(req);
    stream.on("open", () => {
      res.writeHead(status, headers);
      if (cut === undefined || cut === null) return stream.pipe(res);
      let sent = 0;
      stream.on("data", (chunk) => {
        if (sent + chunk.length < cut) {
          sent += chunk.length;
          if (!res.write(chunk)) {
            stream.pause();
            res.once("drain", () => stream.resume());
          }
          return;
        }
        stream.destroy();
        res.write(chunk.subarray(0, cut - sent), () => res.destroy());
      });
      stream.on("end", () => res.end());
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

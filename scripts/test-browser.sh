#!/usr/bin/env bash
# The npm package in a real browser: headless Chromium (Debian's) driven by playwright-core.
#   1. the package's types (tsc --noEmit on web/src/index.d.ts and the README's example);
#   2. the demo page with WebGPU (SwiftShader), without it (wasm fallback), forced wasm, and in a
#      Web Worker (there on the threaded build, one thread per core), each against the reference
#      embeddings and tokens, and the threaded build's one-thread fallbacks (no isolation, the
#      main thread) with their reasons; screenshots go to web/test-artifacts/;
#   3. the model cache: a download cut short on purpose resumes with a Range request, a reload
#      loads the 98 MB GGUF with no request, a full quota is a typed error (about 12 s);
#   4. the page-level kernel benchmark once on a small case (a smoke run: the timed comparison
#      is `node web/bench/run.mjs` with a release build).
# Needs web/pkg (scripts/build-web.sh), the models (scripts/fetch-models.sh) and chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"

command -v chromium >/dev/null || { echo "chromium is missing: run scripts/setup-cross.sh" >&2; exit 1; }
# The tests destroy the GPU device through a test hook: the package built with them (quick when
# scripts/test-wasm.sh built it already).
scripts/build-web.sh --test-hooks

echo "== npm ci (playwright-core, typescript: pinned in web/package-lock.json)"
(cd web && npm ci --no-audit --no-fund)

echo "== types"
(cd web && npm run --silent check:types)

echo "== headless Chromium: the demo page on WebGPU, on the wasm fallback, forced wasm, in a worker"
(cd web && node --test test/browser.test.mjs)
ls -l web/test-artifacts/*.png

echo "== headless Chromium: the model cache (resume, reload with no request, quota)"
(cd web && node --test test/browser-cache.test.mjs)

echo "== page-level kernel benchmark (smoke: one small case, debug native build)"
cli="$target_dir/debug/twinfer"
[ -x "$cli" ] || RUSTFLAGS= cargo build -p twinfer-cli
cli="$(realpath "$cli")"
(cd web && node bench/run.mjs --cli "$cli" --cases decode:1:1024 --runs 2)

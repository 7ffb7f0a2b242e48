#!/usr/bin/env bash
# The npm package as it ships: built without the test hooks (checked), packed with `npm pack`,
# installed into an empty project and run there (web/test/pack-smoke.mjs on all-MiniLM-L6-v2),
# and imported by a minimal Vite app (web/test/vite-app/, Vite pinned by its lock file) that is
# built and run in headless Chromium (its wasm and worker bundled by Vite).
# Needs what scripts/setup-cross.sh installs, Node 20 or newer and the models
# (scripts/fetch-models.sh). Honours CARGO_TARGET_DIR and TWINFER_MODELS. Leaves web/pkg as the
# release build.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== the npm package as it ships (web/pkg: release, simd128, no test hooks)"
scripts/build-web.sh
if grep -q "ForTest" web/pkg/twinfer_web.js web/pkg/twinfer_web.d.ts web/pkg/threads/twinfer_web.js; then
    echo "the release package still exports a test hook" >&2
    exit 1
fi

echo "== npm pack: install the tarball into an empty project and run the README example"
repo="$(pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
(cd web && npm pack --pack-destination "$scratch" >/dev/null 2>&1)
models="${TWINFER_MODELS:-$HOME/.cache/twinfer/models}"
(cd "$scratch" && npm init -y >/dev/null && npm install --no-audit --no-fund ./twinfer-*.tgz >/dev/null &&
    cp "$repo/web/test/pack-smoke.mjs" . && node pack-smoke.mjs "$models/all-MiniLM-L6-v2")

echo "== a Vite app that imports the packed tarball: vite build, then the app in headless Chromium"
app="$scratch/vite-app"
mkdir -p "$app"
cp web/test/vite-app/{package.json,package-lock.json,index.html,main.js,vite.config.js} "$app"
[ -d web/node_modules/playwright-core ] || (cd web && npm ci --no-audit --no-fund)
(cd "$app" && npm ci --no-audit --no-fund >/dev/null && npm install --no-save --no-audit --no-fund "$scratch"/twinfer-*.tgz >/dev/null 2>&1 &&
    npx vite build --logLevel warn 2>&1 | tee build.log)
# A warning is a defect users would see in their own builds (a Node module pulled into the page).
if [ -s "$app/build.log" ]; then
    echo "vite build warned about the package (above)" >&2
    exit 1
fi
node web/test/vite-app/run.mjs "$app" "$models" "$repo/web/node_modules"

#!/usr/bin/env bash
# The npm package as it ships: built without the test hooks (checked), packed with `npm pack`,
# installed into an empty project and run there (web/test/pack-smoke.mjs on all-MiniLM-L6-v2).
# Needs what scripts/setup-cross.sh installs, Node 20 or newer and the models
# (scripts/fetch-models.sh). Honours CARGO_TARGET_DIR and TWINFER_MODELS. Leaves web/pkg as the
# release build.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== the npm package as it ships (web/pkg: release, simd128, no test hooks)"
scripts/build-web.sh
if grep -q "ForTest" web/pkg/twinfer_web.js web/pkg/twinfer_web.d.ts; then
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

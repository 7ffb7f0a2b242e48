#!/usr/bin/env bash
# The wasm32 checks, in Node, on the simd128 kernels:
#   1. the core crate's tests and the conformance suite under wasm-bindgen-test-runner;
#   2. the npm package's engine (scripts/build-web.sh -> web/pkg);
#   3. the npm package's Node tests (web/test/): the kernels against a JS reference, and the
#      package API on the real models against the numpy reference and the native build (the
#      relaxed-SIMD build is checked in Chromium, see scripts/test-browser.sh).
# The package as it ships (no test hooks) is packed and installed by scripts/test-pack.sh.
# Needs what scripts/setup-cross.sh installs, and Node 20 or newer.
# Honours CARGO_TARGET_DIR; TWINFER_TEST_CASES (default 8) sets the property cases per test.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }

target_dir="${CARGO_TARGET_DIR:-target}"
# pulp picks its wasm SIMD level at compile time: without +simd128 the kernels run scalar.
export RUSTFLAGS="-C target-feature=+simd128"
# Read at compile time by the property tests.
export TWINFER_TEST_CASES="${TWINFER_TEST_CASES:-8}"

echo "== cargo test (wasm32, simd128, node), TWINFER_TEST_CASES=$TWINFER_TEST_CASES"
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    cargo test --target wasm32-unknown-unknown -p twinfer -p twinfer-tests

echo "== the npm package (web/pkg: release, simd128, with the test hooks)"
scripts/build-web.sh --test-hooks

echo "== npm test (Node: the package API on real models, against the reference and the native build)"
# The native CLI is the comparison for embeddings and generated tokens.
cli="$target_dir/debug/twinfer"
[ -x "$cli" ] || RUSTFLAGS= cargo build -p twinfer-cli
# Resolved here: inside web/ a relative path would name nothing, and the comparison would skip.
cli="$(realpath "$cli")"
(cd web && TWINFER_CLI="$cli" npm test)

# The relaxed-SIMD build runs where relaxed SIMD is finished (Chromium: scripts/test-browser.sh
# checks it there). Node 20 has only a draft behind a flag, whose integer dot product differs
# (4 x 6 comes out 48): the loader must keep the plain build there rather than compute wrong
# 4-bit products. A Node with the finished proposal runs the package tests on the relaxed build.
echo "== relaxed SIMD in Node (with V8's flag): the loader's choice"
relaxed=$(cd web && node --experimental-wasm-relaxed-simd --input-type=module -e '
import { hasRelaxedSimd } from "./src/loader.js";
console.log(hasRelaxedSimd() ? "relaxed" : "plain");')
if [[ "$relaxed" == relaxed ]]; then
    echo "   finished relaxed SIMD: the kernels and the package API on the relaxed build"
    (cd web && TWINFER_CLI="$cli" node --experimental-wasm-relaxed-simd --test test/kernels.test.mjs test/runtime.test.mjs)
else
    echo "   $(node --version): relaxed SIMD missing or a draft; the plain build is kept"
fi

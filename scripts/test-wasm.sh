#!/usr/bin/env bash
# The wasm32 checks, in Node, on the simd128 kernels:
#   1. the core crate's tests and the conformance suite under wasm-bindgen-test-runner;
#   2. a release build of twinfer-web and its wasm-bindgen packages web/pkg (browsers, ES module)
#      and web/pkg-node (Node, CommonJS);
#   3. the npm package's Node test (web/test/node.test.mjs) against web/pkg-node.
# Needs what scripts/setup-cross.sh installs, and Node 18 or newer.
# Honours CARGO_TARGET_DIR; TWINFER_TEST_CASES (default 8) sets the property cases per test.
set -euo pipefail
cd "$(dirname "$0")/.."

WASM_BINDGEN_VERSION=0.2.130
if ! wasm-bindgen --version 2>/dev/null | grep -qF "$WASM_BINDGEN_VERSION"; then
    echo "wasm-bindgen $WASM_BINDGEN_VERSION is missing: run scripts/setup-cross.sh" >&2
    exit 1
fi
command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }

target_dir="${CARGO_TARGET_DIR:-target}"
# pulp picks its wasm SIMD level at compile time: without +simd128 the kernels run scalar.
export RUSTFLAGS="-C target-feature=+simd128"
# Read at compile time by the property tests.
export TWINFER_TEST_CASES="${TWINFER_TEST_CASES:-8}"

echo "== cargo test (wasm32, simd128, node), TWINFER_TEST_CASES=$TWINFER_TEST_CASES"
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    cargo test --target wasm32-unknown-unknown -p twinfer -p twinfer-tests

echo "== twinfer-web (release, simd128)"
cargo build --release --target wasm32-unknown-unknown -p twinfer-web
wasm="$target_dir/wasm32-unknown-unknown/release/twinfer_web.wasm"
wasm-bindgen --target web --out-dir web/pkg "$wasm"
wasm-bindgen --target nodejs --out-dir web/pkg-node "$wasm"
# web/package.json says "type": "module"; the Node build is CommonJS, so mark its folder as such.
printf '{\n  "type": "commonjs"\n}\n' >web/pkg-node/package.json
ls -l web/pkg/twinfer_web_bg.wasm web/pkg-node/twinfer_web_bg.wasm

echo "== node --test"
(cd web && node --test test/node.test.mjs)

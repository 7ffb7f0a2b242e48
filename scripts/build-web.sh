#!/usr/bin/env bash
# Builds the npm package's engine: twinfer-web for wasm32 with simd128 (release), through the
# pinned wasm-bindgen, into web/pkg (an ES module that browsers, workers and Node all load).
# Needs what scripts/setup-cross.sh installs. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

WASM_BINDGEN_VERSION=0.2.130
if ! wasm-bindgen --version 2>/dev/null | grep -qF "$WASM_BINDGEN_VERSION"; then
    echo "wasm-bindgen $WASM_BINDGEN_VERSION is missing: run scripts/setup-cross.sh" >&2
    exit 1
fi
target_dir="${CARGO_TARGET_DIR:-target}"
# pulp picks its wasm SIMD level at compile time: without +simd128 the kernels run scalar.
RUSTFLAGS="-C target-feature=+simd128" cargo build --release --target wasm32-unknown-unknown -p twinfer-web
wasm-bindgen --target web --out-dir web/pkg "$target_dir/wasm32-unknown-unknown/release/twinfer_web.wasm"
ls -l web/pkg/twinfer_web_bg.wasm >&2

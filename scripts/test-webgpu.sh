#!/usr/bin/env bash
# The WGSL engine in a real browser: tests/tests/webgpu_browser.rs under wasm-bindgen-test-runner
# in headless Chromium, whose WebGPU runs on SwiftShader (f32 K/V, no shader-f16). It checks
# prefill and paged decode against the oracle and the CPU engine, LlamaModel::forward_async, and
# the scheduler's CPU fallback after the device is destroyed.
#
# Needs, besides what scripts/setup-cross.sh installs (wasm32 target, wasm-bindgen-cli 0.2.130):
#   DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver
# Honours CARGO_TARGET_DIR, CHROMEDRIVER (default /usr/bin/chromedriver) and
# WASM_BINDGEN_TEST_TIMEOUT (seconds per test binary, default 300 here: SwiftShader is slow).
# Extra arguments go to cargo test (e.g. `-- --nocapture` prints the adapter and the reasons).
set -euo pipefail
cd "$(dirname "$0")/.."

WASM_BINDGEN_VERSION=0.2.130
if ! wasm-bindgen-test-runner --version 2>/dev/null | grep -qF "$WASM_BINDGEN_VERSION"; then
    echo "wasm-bindgen-test-runner $WASM_BINDGEN_VERSION is missing: run scripts/setup-cross.sh" >&2
    exit 1
fi
export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
for bin in "$CHROMEDRIVER" /usr/bin/chromium; do
    [ -x "$bin" ] || { echo "$bin is missing: apt-get install chromium chromium-driver" >&2; exit 1; }
done

# pulp picks its wasm SIMD level at compile time: without +simd128 the CPU kernels run scalar.
export RUSTFLAGS="-C target-feature=+simd128"
# The browser flags: WebGPU is behind --enable-unsafe-webgpu on Linux (without it there is no
# adapter, which is the "no WebGPU" case).
export WASM_BINDGEN_TEST_WEBDRIVER_JSON="$PWD/tests/webgpu-webdriver.json"
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-300}"
# Mesa's WSI prints noise without it.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg-$(id -u)}"
mkdir -p -m700 "$XDG_RUNTIME_DIR"

echo "== webgpu_browser (wasm32, simd128, headless Chromium + WebGPU)"
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    cargo test --target wasm32-unknown-unknown -p twinfer-tests --features webgpu-browser --test webgpu_browser "$@"

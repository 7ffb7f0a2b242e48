#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, the native tests (every SIMD level this
# CPU has), the criterion benches once each, the aarch64 suite under qemu (NEON) and the wasm32
# suite in Node (simd128), the WGSL engine in headless Chromium on WebGPU (scripts/test-webgpu.sh),
# the npm package's Node tests, and its browser tests (scripts/test-browser.sh). The WGSL kernels run on lavapipe
# (software Vulkan); a GPU test that finds no adapter fails here (TWINFER_REQUIRE_GPU=1).
# Installs the cross toolchains on first use (scripts/setup-cross.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# The elapsed time after each stage: CI has 90 minutes on 2 cores and we aim for half.
stage() { echo "-- $1 done, $SECONDS s since the start"; }

scripts/setup-cross.sh
stage "installs"

export WGPU_BACKEND=vulkan WGPU_ADAPTER_NAME=llvmpipe TWINFER_REQUIRE_GPU=1
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg}"
mkdir -p -m700 "$XDG_RUNTIME_DIR"

echo "== cargo fmt --check"
cargo fmt --all --check
stage "fmt"

echo "== cargo clippy (native, all targets)"
cargo clippy --workspace --all-targets -- -D warnings
stage "clippy"

echo "== cargo doc: the libraries' public API documented (missing_docs is denied in twinfer), no rustdoc warning"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet -p twinfer -p twinfer-shaders
stage "doc"

echo "== the published crates: publish --dry-run (packaging, metadata, dependency resolution; twinfer-shaders"
echo "   holds the WGSL, so the core crate needs no file outside itself), then the core crate built from its tarball"
cargo publish --dry-run --workspace --no-verify --allow-dirty --quiet
scripts/check-package.sh
stage "packaging"

echo "== real models: all-MiniLM-L6-v2 and the numpy reference goldens"
scripts/fetch-models.sh >/dev/null
stage "models"

echo "== cargo test (native)"
cargo test --workspace
stage "native tests"

echo "== examples: each checks its own results and exits non-zero on a mismatch (CPU, then the GPU engine)"
for example in crates/*/examples/*.rs; do
    crate=$(basename "$(dirname "$(dirname "$example")")")
    name=$(basename "$example" .rs)
    # The test profile: its libraries are the ones `cargo test` built above (the dev profile
    # would compile the workspace a second time, unoptimised, about two minutes on 2 cores).
    cargo run -q --profile test -p "$crate" --example "$name"
    TWINFER_BACKEND=gpu cargo run -q --profile test -p "$crate" --example "$name"
done
stage "examples"

echo "== benches: each runs once as a test (criterion's test mode), in the test profile already built"
# --workspace keeps the feature set of the build above, so nothing is compiled twice.
cargo test --workspace --benches

stage "native"
scripts/test-aarch64.sh
stage "aarch64"
scripts/test-wasm.sh
stage "wasm32"
scripts/test-webgpu.sh
stage "webgpu"
scripts/test-browser.sh
stage "browser"
scripts/test-pack.sh
stage "npm pack"
echo "== all tests passed"

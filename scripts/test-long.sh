#!/usr/bin/env bash
# The long tier, run before an issue is closed (not on every CI run): every fuzz target for 30
# minutes (scripts/fuzz.sh 1800), the engine stress test at ten times its CI size under three
# seeds, `twinfer serve` holding 200 connections opened and abandoned at random for 60 s, the
# suites that the quick tier runs natively only (under qemu too: engine, CLI, server) and the demo
# in a Web Worker on WebGPU (SwiftShader, about four minutes), SmolLM2 Q4_1 on WebGPU over every
# reference prompt (about five minutes), SmolLM2 over an int8 cache on the GPU's op-by-op path.
# Prints the figures a closing note quotes: executions per target, the stress and soak summaries.
# Usage: scripts/test-long.sh [FUZZ_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh >/dev/null
for seed in 1 2 3; do
    echo "== engine stress: 20000 requests, seed $seed"
    TWINFER_STRESS_REQUESTS=20000 TWINFER_STRESS_SEED=$seed \
        cargo test -q -p twinfer-tests --test engine_stress -- --nocapture 2>&1 | grep -E "requests, seed|stress:|test result"
done
echo "== twinfer serve: 200 connections opened and abandoned at random for 60 s"
TWINFER_SERVE_SOAK=60 cargo test -q --release -p twinfer-cli --test serve_openai -- --nocapture 2>&1 |
    grep -E "soak:|passed|FAILED|Error"
echo "== SmolLM2 over an int8 cache on the GPU's op-by-op path (lavapipe)"
mkdir -p -m700 "${XDG_RUNTIME_DIR:-/tmp/xdg}"
WGPU_BACKEND=vulkan WGPU_ADAPTER_NAME=llvmpipe TWINFER_REQUIRE_GPU=1 TWINFER_GGUF_OP_BY_OP=1 \
    XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg}" \
    cargo test -q -p twinfer-tests --test gguf_model an_int8_kv_cache_runs_on_the_gpu 2>&1 | grep -E "test result|panicked|SKIPPED"
echo "== aarch64 under qemu: every suite"
TWINFER_AARCH64_ALL=1 scripts/test-aarch64.sh
echo "== headless Chromium: the demo in a Web Worker on WebGPU"
scripts/build-web.sh --test-hooks
(cd web && npm ci --no-audit --no-fund && TWINFER_BROWSER_WORKER_GPU=1 node --test --test-name-pattern "Web Worker" test/browser.test.mjs)
echo "== headless Chromium: SmolLM2 Q4_1 on WebGPU, every reference prompt (about a minute each)"
(cd web && TWINFER_BROWSER_GGUF_ALL=1 node --test --test-name-pattern "Q4_1 GGUF" test/browser.test.mjs)
echo "== the CPU kernels' and the KV cache's unit tests under AddressSanitizer (nightly)"
# --target keeps the sanitizer off build scripts and proc macros.
RUSTFLAGS="-Zsanitizer=address" cargo "+${TWINFER_NIGHTLY:-nightly-2026-05-20}" test -q -p twinfer --lib --target x86_64-unknown-linux-gnu \
    --target-dir target/asan -- cpu:: quant:: kv:: attention::
scripts/fuzz.sh "${1:-1800}"

#!/usr/bin/env bash
# The aarch64 checks, under qemu user-mode emulation, on the NEON kernels:
#   1. the core crate's tests and the conformance suite (cargo test --target aarch64-unknown-linux-gnu):
#      the kernels, the model goldens and the error paths, that is everything NEON computes. The
#      engine, CLI and server suites test scheduling and protocols that no SIMD level changes; they
#      run natively on every CI run and under qemu in the long tier (TWINFER_AARCH64_ALL=1, about
#      seven more minutes);
#   2. the quantized products again on a CPU model without the dot-product extension;
#   3. in the long tier only, the CLI those tests built: `twinfer info` must pick neon, and
#      `twinfer bench kernels --quick` must finish (its timings are emulated, so meaningless: a
#      smoke test). The quick tier leaves the CLI out: its server and download stack (tokio,
#      axum, rustls, ring's C code) is 129 of the 272 crates the stage cross-built with it, and none
#      of it is NEON code; the facade test checks there that NEON is the default level.
# Needs what scripts/setup-cross.sh installs. qemu runs SIMD code ~12-38x slower than native, so
# the property tests run few cases: TWINFER_TEST_CASES (default 6). Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in aarch64-linux-gnu-gcc qemu-aarch64-static; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/setup-cross.sh" >&2; exit 1; }
done

target=aarch64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-target}"
runner="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$runner"
# Read at compile time by the property tests.
export TWINFER_TEST_CASES="${TWINFER_TEST_CASES:-6}"
# qemu has no Vulkan: the GPU tests skip loudly here (they run natively, on lavapipe).
unset TWINFER_REQUIRE_GPU

echo "== cargo test ($target, qemu), TWINFER_TEST_CASES=$TWINFER_TEST_CASES"
export TWINFER_CLI_RUNNER="$runner"
# The scalar level of the model tests runs natively; under qemu, NEON only, on fewer inputs
# (every other MiniLM sentence, the batching test's small pool only).
export TWINFER_TEST_LEVELS=widest TWINFER_TEST_EMULATED=1
# The stress test's full size is for native speed: under qemu, 60 requests check the same things.
export TWINFER_STRESS_REQUESTS="${TWINFER_STRESS_REQUESTS:-60}"
# So is the batch-invariance test's 64 requests: 24 still overflow its small pool (16 do not).
export TWINFER_BATCH_TEST_REQUESTS="${TWINFER_BATCH_TEST_REQUESTS:-24}"
all="${TWINFER_AARCH64_ALL:-0}"
# One selection of packages throughout a tier, so that features (and the build) are the same.
if [ "$all" = 1 ]; then
    packages=(-p twinfer -p twinfer-tests -p twinfer-cli)
    cargo test --target "$target" "${packages[@]}"
else
    packages=(-p twinfer -p twinfer-tests)
    cargo test --target "$target" "${packages[@]}" --lib \
        --test kv_cache --test shaders --test bf16_weights --test cpu_attention --test crafted_files_memory \
        --test decoder_model --test encoder_model --test errors --test facade --test fuzz_regressions \
        --test gguf_model --test merge_state --test model_errors --test weights_in_place
fi

# qemu's default CPU has the dot-product extension, so the runs above took the `sdot` kernels.
# A Cortex-A72 (a Raspberry Pi 4) has not: the quantized products' own tests again on one, where
# the widening-multiply kernels run; both must give the scalar level's bits.
echo "-- the quantized products on a CPU without the dot-product extension (QEMU_CPU=cortex-a72)"
QEMU_CPU=cortex-a72 cargo test --target "$target" "${packages[@]}" --lib -- linear_quant qdot

if [ "$all" != 1 ]; then
    echo "-- the CLI's smoke checks under qemu run in the long tier (TWINFER_AARCH64_ALL=1)"
    exit 0
fi

# The binary the CLI tests above ran (test profile, optimised): no second build of the workspace.
bin="$target_dir/$target/debug/twinfer"
[ -x "$bin" ] || { echo "$bin was not built by the tests above" >&2; exit 1; }

echo "-- twinfer info"
info=$($runner "$bin" info)
echo "$info"
if ! grep -Eq '^backend: .*\(neon,' <<<"$info"; then
    echo "twinfer info did not pick neon" >&2
    exit 1
fi

echo "-- twinfer bench kernels --quick (timings are emulated)"
start=$SECONDS
$runner "$bin" bench kernels --quick
echo "bench kernels --quick took $((SECONDS - start)) s under qemu"

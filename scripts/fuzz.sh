#!/usr/bin/env bash
# Fuzzing with cargo fuzz (libFuzzer and AddressSanitizer, on the nightly toolchain): every target
# in fuzz/ runs for SECONDS (default 60) from its seed corpus, and any crash, leak, timeout or
# out-of-bounds read fails the script, leaving the input under fuzz/artifacts/TARGET/.
# The seeds: the micro model's files (tests/reference/fuzz_seeds.py) plus the real config.json
# and tokenizer.json files of the test models. Corpora grow in fuzz/corpus/ between runs.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (scripts/test-long.sh: 1800 s each; .ci/run: 60 s,
# two at a time). TWINFER_FUZZ_JOBS runs that many targets at once (default 1).
# A crash is fixed and its input copied to tests/fuzz-regressions/TARGET/, which every test run
# replays on stable (tests/tests/fuzz_regressions.rs).
# Needs the models (scripts/fetch-models.sh) and the nightly toolchain; installs cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
all=(model_gguf model_safetensors model_config model_tokenizer page_table kv_cache kernels)
targets=("${@:-${all[@]}}")

CARGO_FUZZ_VERSION=0.13.2
# Pinned: libFuzzer's instrumentation needs nightly, and a moving nightly would change CI's build.
NIGHTLY="${TWINFER_NIGHTLY:-nightly-2026-05-20}"
jobs="${TWINFER_FUZZ_JOBS:-1}"
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1; then
    timeout 600 rustup toolchain install "$NIGHTLY" --profile minimal
fi

models="${TWINFER_MODELS:-$HOME/.cache/twinfer/models}"
"$models/.venv/bin/python" tests/reference/fuzz_seeds.py "$models/tiny-llama" fuzz/seeds
declare -A seeds=(
    [model_gguf]="fuzz/seeds/base/micro.gguf"
    [model_safetensors]="fuzz/seeds/base/model.safetensors"
    [model_config]="fuzz/seeds/base/config.json $models/tiny-llama/config.json $models/tiny-qwen2/config.json $models/all-MiniLM-L6-v2/config.json"
    [model_tokenizer]="fuzz/seeds/base/tokenizer.json $models/tiny-qwen2/tokenizer.json"
)
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    for f in ${seeds[$t]:-}; do
        cp "$f" "fuzz/corpus/$t/seed-$(basename "$(dirname "$f")")-$(basename "$f")"
    done
done

echo "== cargo fuzz build (nightly, AddressSanitizer, debug assertions)"
cargo "+$NIGHTLY" fuzz build --debug-assertions

# One target's run; its log names the crash when there is one.
fuzz_one() {
    local t=$1 log="fuzz/artifacts/$1/last-run.log" timeout=20
    # The kernels target runs the f64 oracle over every SIMD level under AddressSanitizer: its
    # largest cases take 10-20 s on a loaded 2-core machine, so it gets a longer timeout.
    [[ "$t" == kernels ]] && timeout=60
    if ! cargo "+$NIGHTLY" fuzz run --debug-assertions "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=4096 -max_len=262144 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz target $t failed: the input is in fuzz/artifacts/$t/" >&2
        return 1
    fi
}

# JOBS targets at a time (each fuzzer is one process on one core).
failed=0
for ((i = 0; i < ${#targets[@]}; i += jobs)); do
    batch=("${targets[@]:i:jobs}")
    echo "== fuzz ${batch[*]} for $seconds s"
    pids=()
    for t in "${batch[@]}"; do
        fuzz_one "$t" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    for t in "${batch[@]}"; do
        log="fuzz/artifacts/$t/last-run.log"
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
        corpus=$(ls "fuzz/corpus/$t" | wc -l)
        echo "   $t: $runs executions in $seconds s; corpus $corpus inputs"
    done
    ((failed == 0)) || exit 1
done
echo "== fuzzing: no crash, leak or timeout"

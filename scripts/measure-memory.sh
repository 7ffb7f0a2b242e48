#!/usr/bin/env bash
# Peak resident memory of `twinfer run` (GNU time's maximum RSS) against the bytes of the model's
# weight files: an f16 SmolLM-135M-shaped decoder (tests/reference/f16_decoder.py) and, when
# fetched, the SmolLM2-135M-Instruct Q4_1 GGUF file. CPU engines, so no GPU driver is loaded.
# Usage: scripts/measure-memory.sh [RUNS]   (release build; needs scripts/fetch-models.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
models="${TWINFER_MODELS:-$HOME/.cache/twinfer/models}"
cargo build -q --release -p twinfer-cli
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$models/.venv/bin/python" tests/reference/f16_decoder.py "$scratch/f16" "$models"

measure() {
    local what="$1" model="$2" weights="$3"
    shift 3
    for run in $(seq "$runs"); do
        /usr/bin/time -v target/release/twinfer run --model "$model" --max-tokens 32 \
            --prefill-backend cpu --decode-backend cpu "$@" >"$scratch/out" 2>"$scratch/time"
        local kib
        kib=$(grep -o 'Maximum resident set size (kbytes): [0-9]*' "$scratch/time" | grep -o '[0-9]*$')
        awk -v w="$what" -v r="$run" -v k="$kib" -v b="$weights" \
            'BEGIN { printf "%s, run %d: peak RSS %.1f MB, weights %.1f MB: %.3fx\n", w, r, k*1024/1e6, b/1e6, k*1024/b }'
    done
}
measure "f16 safetensors" "$scratch/f16" "$(stat -c %s "$scratch/f16/model.safetensors")" --prompt "The river runs"
gguf="$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -f "$gguf" ]]; then
    measure "Q4_1 GGUF" "$gguf" "$(stat -c %s "$gguf")" --chat --prompt "What is the capital of France?"
fi

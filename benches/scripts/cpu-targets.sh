#!/usr/bin/env bash
# The CPU and wasm targets measured together on this machine, so that every figure has its
# ceilings from the same run: decode and prefill attention against the read ceiling and the FMA
# peak (`bench kernels`, page 16 and page 1), the model's prompt and one-sequence decode rates
# (`plan` on smollm-135m f16, rounded to bf16, in q8_0 with 16- and 8-bit activation codes, and
# the SmolLM2 Q4_1 file; `bench serve`'s decode floor), the f16 and bf16 prompt products, the three
# serving scenarios at --quick, the embeddings against candle, and the wasm page against native
# AVX2 on one and two threads (web/bench/run.mjs). Two rounds where a round is short.
# Usage: benches/scripts/cpu-targets.sh [OUT_FILE]   (needs target/release/twinfer and, for the
# wasm rows, web/pkg built by scripts/build-web.sh and Chromium; skipped loudly without them)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${TWINFER_BIN:-target/release/twinfer}"
out="${1:-benches/results/cpu-targets-$(date -u +%F).txt}"
models="${TWINFER_MODELS:-$HOME/.cache/twinfer/models}"
gguf="$(find "$models" -name '*.gguf' -path '*mol*' | head -1)"
[ -x "$bin" ] || { echo "$bin is missing: cargo build --release -p twinfer-cli" >&2; exit 1; }

# The widest CPU level only: the scalar level and a software GPU adapter would take minutes.
level="$("$bin" info 2>/dev/null | sed -n 's/^backend: *cpu (\([a-z0-9]*\),.*/\1/p')"
plan() { "$bin" plan --out /tmp/twinfer-plan.json --page-sizes 16 --engines "cpu $level" "$@" 2>&1; }
{
    echo "# $(date -u '+%F %T UTC'); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); $(nproc) threads"
    "$bin" info
    for round in 1 2; do
        echo "## round $round: kernels (f16 KV; decode:BATCH:CTX[:PAGE])"
        "$bin" bench kernels --case decode:1:32768 --case decode:8:32768 --case decode:1:32768:1 \
            --case decode:8:32768:1 --case prefill:2048 --case prefill:8192 \
            --case linear:512:3072:576 --case linear-bf16:512:3072:576 --case linear:512:576:1536 \
            --case linear-bf16:512:576:1536
        echo "## round $round: smollm-135m f16, a 512-token prompt chunk and one sequence at ctx 128"
        plan --preset smollm-135m --prefill-tokens 512 --decode-batch 1 --decode-context 128
        echo "## round $round: smollm-135m rounded to bf16 at load (bf16 dot products where the CPU has them), the same shapes"
        plan --preset smollm-135m --quantize bf16 --prefill-tokens 512 --decode-batch 1 --decode-context 128
        echo "## round $round: smollm-135m with q8_0 projections (quantized at load), the same shapes"
        plan --preset smollm-135m --quantize q8_0 --prefill-tokens 512 --decode-batch 1 --decode-context 128
        echo "## round $round: the same q8_0 projections with 8-bit activation codes (--activations int8: one VNNI digit a product)"
        plan --preset smollm-135m --quantize q8_0 --activations int8 --prefill-tokens 512 --decode-batch 1 --decode-context 128
        if [ -n "$gguf" ]; then
            echo "## round $round: $(basename "$gguf"), the same shapes"
            plan --model "$gguf" --prefill-tokens 512 --decode-batch 1 --decode-context 128
        fi
    done
    for scenario in support high-concurrency long-context; do
        echo "## bench serve --scenario $scenario --quick"
        "$bin" bench serve --scenario "$scenario" --quick
    done
    echo "## bench serve --scenario support --quick, rounded to bf16"
    "$bin" bench serve --scenario support --quick --quantize bf16
    echo "## embeddings: candle's BERT against twinfer embed, 30 warm calls each, interleaved"
    benches/scripts/candle-minilm.sh "$bin" 2
    if [ -f web/pkg/twinfer_web_bg.wasm ] && [ -x /usr/bin/chromium ]; then
        echo "## wasm in headless Chromium against native AVX2 (relaxed build; threaded build on 2)"
        (cd web && node bench/run.mjs --cli "../$bin" --build relaxed --threads 2 \
            --cases decode:1:8192,decode:8:8192,decode-f32:1:8192,decode-f32:8:8192,prefill:1024,linear-q4_1:64:1536:576,linear:64:1536:576,linear:512:1536:576)
        cat web/test-artifacts/bench.json
    else
        echo "SKIPPED: the wasm rows (web/pkg or Chromium missing: scripts/build-web.sh, scripts/setup-cross.sh)"
    fi
} 2>&1 | tee "$out"

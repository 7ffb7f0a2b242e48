#!/usr/bin/env bash
# On a borrowed NVIDIA card (see the GPU notes for the loader packages): int8 against f16 KV on the
# GPU. First the decode kernel over device pools (`bench kernels --backend gpu`, the read ceiling
# of the same run), then the resident model's steps (`plan --kv-dtype`) at the shapes of the GPU
# issue. Usage: benches/scripts/gpu-int8-kv.sh TWINFER_BINARY [OUT_DIR]
set -u
bin="$1"
out="${2:-.}"
date
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
timeout 200 "$bin" bench kernels --backend gpu \
    --case decode:1:8192 --case decode-q8:1:8192 --case decode:1:32768 --case decode-q8:1:32768 \
    --case decode:8:8192 --case decode-q8:8:8192 --case decode:64:8192 --case decode-q8:64:8192 \
    2>&1 | tee "$out/kernels.txt" | tail -14
for spec in "1 1024" "64 1024" "64 4096" "1 16384"; do
    set -- $spec
    for kv in f16 q8; do
        echo "=== smollm-135m kv $kv decode batch $1 ctx $2"
        timeout 90 "$bin" plan --preset smollm-135m --kv-dtype "$kv" --decode-batch "$1" --decode-context "$2" \
            --prefill-tokens 512 --page-sizes 16 --engines "gpu subgroup, f16" --out /tmp/plan.json \
            >"$out/plan-$kv-$1-$2.txt" 2>&1
        grep -E "(decode|prefill) |kernels of .*decode" "$out/plan-$kv-$1-$2.txt" | cut -c1-220
    done
done
date

#!/usr/bin/env bash
# The long tier, run before an issue is closed (not on every CI run): every fuzz target for 30
# minutes (scripts/fuzz.sh 1800) and the engine stress test at ten times its CI size under three
# seeds. Prints the figures a closing note quotes: executions per target and the stress summary.
# Usage: scripts/test-long.sh [FUZZ_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh >/dev/null
for seed in 1 2 3; do
    echo "== engine stress: 20000 requests, seed $seed"
    TWINFER_STRESS_REQUESTS=20000 TWINFER_STRESS_SEED=$seed \
        cargo test -q -p twinfer-tests --test engine_stress -- --nocapture 2>&1 | grep -E "requests, seed|stress:|test result"
done
scripts/fuzz.sh "${1:-1800}"

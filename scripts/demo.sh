#!/usr/bin/env bash
# The main job on the embedded defaults: build the native binary, say which engine runs and why,
# run the quick-start example (prefill then paged decode, checked against the f64 oracle), and
# measure the kernels against this machine's own ceilings (quick shapes).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo is missing: install Rust with rustup first" >&2; exit 1; }
cargo build --release -p twinfer-cli -p twinfer --examples --bins
target_dir="${CARGO_TARGET_DIR:-target}"
"$target_dir/release/twinfer" info
"$target_dir/release/examples/quickstart"
"$target_dir/release/twinfer" bench kernels --quick

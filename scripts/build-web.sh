#!/usr/bin/env bash
# Builds the npm package's engine: twinfer-web for wasm32 with simd128 (release), through the
# pinned wasm-bindgen, into web/pkg (an ES module that browsers, workers and Node all load), and
# the same module with relaxed SIMD beside it (twinfer_web_relaxed_bg.wasm), and the threaded build
# (relaxed SIMD, shared memory, the CPU engine only) in web/pkg/threads.
# Needs what scripts/setup-cross.sh installs. Honours CARGO_TARGET_DIR.
# `--test-hooks` adds the hooks the package's own tests use (a deliberate panic, a destroyed GPU
# device); the package that ships is built without them.
set -euo pipefail
cd "$(dirname "$0")/.."

WASM_BINDGEN_VERSION=0.2.130
if ! wasm-bindgen --version 2>/dev/null | grep -qF "$WASM_BINDGEN_VERSION"; then
    echo "wasm-bindgen $WASM_BINDGEN_VERSION is missing: run scripts/setup-cross.sh" >&2
    exit 1
fi
target_dir="${CARGO_TARGET_DIR:-target}"
# The release profile keeps line tables for native profiles; wasm-bindgen drops DWARF from the
# package, so for these builds they would be compile and link time only.
export CARGO_PROFILE_RELEASE_DEBUG=false
# pulp picks its wasm SIMD level at compile time: without +simd128 the kernels run scalar.
features=()
case "${1:-}" in
    --test-hooks) features=(--features test-hooks) ;;
    "") ;;
    *) echo "usage: $0 [--test-hooks]" >&2; exit 2 ;;
esac
RUSTFLAGS="-C target-feature=+simd128" cargo build --release --target wasm32-unknown-unknown -p twinfer-web "${features[@]}"
wasm-bindgen --target web --out-dir web/pkg "$target_dir/wasm32-unknown-unknown/release/twinfer_web.wasm"

# The same module with relaxed SIMD (f32x4.relaxed_madd for every multiply-add), which the loader
# picks where the runtime validates it; a runtime without relaxed SIMD would refuse the whole
# module, so it ships beside the plain one. Its own target folder: other RUSTFLAGS would
# otherwise rebuild everything at each switch.
relaxed_dir="$target_dir/relaxed-simd"
RUSTFLAGS="-C target-feature=+simd128,+relaxed-simd" CARGO_TARGET_DIR="$relaxed_dir" \
    cargo build --release --target wasm32-unknown-unknown -p twinfer-web --features relaxed-simd "${features[@]}"
glue=$(mktemp -d)
trap 'rm -rf "$glue"' EXIT
wasm-bindgen --target web --out-dir "$glue" "$relaxed_dir/wasm32-unknown-unknown/release/twinfer_web.wasm"
# One JS glue serves both modules only if the bindings are the same.
if ! cmp -s "$glue/twinfer_web.js" web/pkg/twinfer_web.js; then
    echo "the relaxed-SIMD build's JS bindings differ from the plain build's" >&2
    exit 1
fi
cp "$glue/twinfer_web_bg.wasm" web/pkg/twinfer_web_relaxed_bg.wasm
ls -l web/pkg/twinfer_web_bg.wasm web/pkg/twinfer_web_relaxed_bg.wasm >&2

# The threaded build: atomics need a standard library built with them (-Zbuild-std, from the
# rust-src component; RUSTC_BOOTSTRAP lets the stable toolchain take the flag), and the memory is
# shared and imported so that the pool's Web Workers instantiate the module on the same bytes.
# wasm-bindgen sees the shared memory and writes glue that takes it; it has its own JS glue.
threads_dir="$target_dir/wasm-threads"
threads_flags=(
    -C target-feature=+atomics,+bulk-memory,+simd128,+relaxed-simd
    -C link-arg=--shared-memory -C link-arg=--import-memory -C link-arg=--max-memory=4294967296
    -C link-arg=--export=__wasm_init_tls -C link-arg=--export=__tls_size
    -C link-arg=--export=__tls_align -C link-arg=--export=__tls_base
)
RUSTFLAGS="${threads_flags[*]}" RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$threads_dir" \
    cargo build --release --target wasm32-unknown-unknown -p twinfer-web --features relaxed-simd "${features[@]}" \
    -Zbuild-std=std,panic_abort
rm -rf web/pkg/threads
wasm-bindgen --target web --out-dir web/pkg/threads "$threads_dir/wasm32-unknown-unknown/release/twinfer_web.wasm"
ls -l web/pkg/threads/twinfer_web_bg.wasm >&2

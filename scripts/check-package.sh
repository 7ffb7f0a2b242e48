#!/usr/bin/env bash
# The core crate as it would be published: package twinfer-shaders and twinfer, unpack both
# outside the workspace, and type-check the unpacked twinfer against the unpacked shaders
# (through a path patch). A file the package leaves out (a module, an included shader) breaks
# this check; code generation is what `cargo test` does to the same sources. (cargo package's own verification
# builds the shaders as a registry crate, which cargo never rebuilds when its contents change
# under the same version, so a local rerun could pass on a stale copy.)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo package -p twinfer-shaders -p twinfer --no-verify --allow-dirty --quiet
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
tar xzf "target/package/twinfer-shaders-$version.crate" -C "$dir"
tar xzf "target/package/twinfer-$version.crate" -C "$dir"
cargo check --quiet --lib --manifest-path "$dir/twinfer-$version/Cargo.toml" --target-dir "$PWD/target" \
    --config "patch.crates-io.twinfer-shaders.path='$dir/twinfer-shaders-$version'"
echo "twinfer $version compiles from its package (with twinfer-shaders $version from its package)"

#!/usr/bin/env bash
# Installs what the cross targets need, skipping whatever is already there:
#   - the Rust targets wasm32-unknown-unknown and aarch64-unknown-linux-gnu, and rust-src;
#   - the aarch64 linker, C library and qemu (Debian packages);
#   - wasm-bindgen-cli at the exact version the twinfer-web crate pins;
#   - lavapipe (Mesa's software Vulkan), on which the WGSL kernels are tested;
#   - Chromium and its WebDriver, in which the browser tests run (WebGPU on SwiftShader).
# Meant for a fresh Debian 12 machine running as root (CI) as well as a developer box.
# Never enables multiarch arm64: with libc6:arm64 installed, qemu's -L sysroot hangs thread spawns.
set -euo pipefail
cd "$(dirname "$0")/.."

WASM_BINDGEN_VERSION=0.2.130

echo "== Rust targets, and the standard library's sources (the threaded wasm build compiles std with atomics)"
timeout 300 rustup target add wasm32-unknown-unknown aarch64-unknown-linux-gnu
timeout 300 rustup component add rust-src

echo "== Debian packages"
missing=()
for pkg in gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static chromium chromium-driver; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "already installed: gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static chromium chromium-driver"
fi

echo "== lavapipe (software Vulkan for the GPU tests)"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg}"
mkdir -p -m700 "$XDG_RUNTIME_DIR"
if vulkaninfo --summary 2>/dev/null | grep -q llvmpipe; then
    echo "already installed: $(vulkaninfo --summary 2>/dev/null | grep -m1 llvmpipe | sed 's/^[[:space:]]*//')"
else
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1 vulkan-tools
    vulkaninfo --summary 2>/dev/null | grep llvmpipe
fi

echo "== wasm-bindgen-cli $WASM_BINDGEN_VERSION"
if wasm-bindgen --version 2>/dev/null | grep -qF "$WASM_BINDGEN_VERSION"; then
    wasm-bindgen --version
else
    # Not --locked: the lock file it ships can name versions the registry index lacks.
    cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
    wasm-bindgen --version
fi

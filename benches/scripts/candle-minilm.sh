#!/usr/bin/env bash
# all-MiniLM-L6-v2 embedding one 128-token text: candle's BERT (benches/peers/candle-bert, pinned
# 0.11.1) against `twinfer embed --repeat`, interleaved, on the same machine and threads; each
# prints the warm median and range of 30 calls after a cold one.
# Usage: benches/scripts/candle-minilm.sh [TWINFER_BINARY] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
twinfer="${1:-target/release/twinfer}"
rounds="${2:-3}"
model="${TWINFER_MODELS:-$HOME/.cache/twinfer/models}/all-MiniLM-L6-v2"
# 128 tokens with [CLS] and [SEP] under the model's tokenizer.
text="The quick brown fox jumps over the lazy dog while the engineers measure how fast a small sentence embedding model can turn a paragraph of ordinary English text into a vector, repeating the call many times so that the median and the spread of the warm runs can be compared fairly with another library on the same machine, with the same number of threads, the same model weights and the same input tokens, which is the only honest way to compare two implementations of the same network; anything else measures the machine, the load or the luck of the draw rather than the code itself, and that is not what we want at all here today."
(cd benches/peers/candle-bert && CARGO_TARGET_DIR=../../../target/peers cargo build --release --locked -q)
peer=target/peers/release/candle-bert-peer
for round in $(seq "$rounds"); do
    echo "round $round"
    "$peer" "$model" 30 "$text"
    "$twinfer" embed --model "$model" --repeat 30 "$text" 2>&1 | grep -E 'warm|->'
done

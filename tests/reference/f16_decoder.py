"""A SmolLM-135M-shaped Llama with seeded random f16 weights, for memory measurements.

Usage: python f16_decoder.py OUT_DIR [CACHE]

30 layers, hidden 576, 9 heads / 3 KV heads, SwiGLU 1536, as smollm-135m, but with tiny-llama's
512-id tokenizer (and so a 512-row embedding): 212 MB of f16 projections in one model.safetensors,
written in the tensor order Hugging Face uses. scripts/measure-memory.sh compares the peak
resident memory of `twinfer run` on it with the file's size.
"""

import json
import shutil
import sys
from pathlib import Path

import common  # noqa: F401  (first: it pins numpy to one thread)
import numpy as np
from safetensors.numpy import save_file

from common import cache_dir

LAYERS, HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 30, 576, 9, 3, 1536, 512


def main():
    out = Path(sys.argv[1])
    cache = cache_dir(sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(135)
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.self_attn.k_proj.weight"] = (KV_HEADS * head_dim, HIDDEN)
        shapes[f"{p}.self_attn.v_proj.weight"] = (KV_HEADS * head_dim, HIDDEN)
        shapes[f"{p}.self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}.mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}.mlp.down_proj.weight"] = (HIDDEN, INTER)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float16)
        else:
            tensors[name] = (rng.uniform(-0.035, 0.035, size=shape)).astype(np.float16)
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((cache / "tiny-llama" / "config.json").read_text())
    config.update(
        num_hidden_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=head_dim,
        intermediate_size=INTER,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        torch_dtype="float16",
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(cache / "tiny-llama" / "tokenizer.json", out / "tokenizer.json")


if __name__ == "__main__":
    main()

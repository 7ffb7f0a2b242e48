"""Seed corpora for the fuzz targets (fuzz/): a micro Llama small enough to load in microseconds,
written the two ways twinfer reads models.

Usage: python fuzz_seeds.py TINY_LLAMA_DIR OUT_DIR

Writes OUT_DIR/base/{config.json,tokenizer.json,model.safetensors} (a Hugging Face folder: one
layer, hidden 32, f32 weights, tiny-llama's 512-id tokenizer) and OUT_DIR/base/micro.gguf (the same
shapes as GGUF v3: F32 norms, a Q8_0 embedding, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/F16 projections, the byte-level BPE
and a ChatML template in the metadata). The fuzz targets mutate one of these files at a time and
keep the others valid, so every input reaches the code that reads that file.
"""

import json
import os
import sys

import common  # noqa: F401  (sets the BLAS thread count before numpy loads)
import gguf
import numpy as np
from safetensors.numpy import save_file

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 64, 2, 1, 16, 1
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def weights(vocab, rng):
    def lin(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    w = {"model.embed_tokens.weight": lin(vocab, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        w[p + "self_attn.q_proj.weight"] = lin(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = lin(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = lin(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = lin(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = lin(INTER, HIDDEN)
        w[p + "mlp.up_proj.weight"] = lin(INTER, HIDDEN)
        w[p + "mlp.down_proj.weight"] = lin(HIDDEN, INTER)
    return w


def write_hf(out, tiny, w, vocab):
    config = json.load(open(os.path.join(tiny, "config.json")))
    config.update(
        hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, num_hidden_layers=LAYERS, tie_word_embeddings=True, vocab_size=vocab,
        max_position_embeddings=256,
    )
    config.pop("rope_scaling", None)
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=1, sort_keys=True)
    save_file(w, os.path.join(out, "model.safetensors"))
    with open(os.path.join(tiny, "tokenizer.json"), "rb") as src, open(os.path.join(out, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())


def write_gguf(out, tiny, w):
    tok = json.load(open(os.path.join(tiny, "tokenizer.json")))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(os.path.join(out, "micro.gguf"), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in ("<s>", "</s>") else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(CHATML)
    # One of each block format twinfer reads, on rows of 32 (one block).
    kinds = {"attn_q": q.Q4_0, "attn_k": q.Q4_1, "attn_v": q.Q8_0, "attn_output": q.F16,
             "ffn_gate": q.Q5_0, "ffn_up": q.Q5_1, "ffn_down": q.Q8_0}
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}

    def add(name, data, kind):
        if kind == q.F32:
            writer.add_tensor(name, data)
        elif kind == q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    add("token_embd.weight", w["model.embed_tokens.weight"], q.Q8_0)
    add("output_norm.weight", w["model.norm.weight"], q.F32)
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        add(f"blk.{layer}.attn_norm.weight", w[p + "input_layernorm.weight"], q.F32)
        add(f"blk.{layer}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"], q.F32)
        for short, kind in kinds.items():
            add(f"blk.{layer}.{short}.weight", w[p + hf[short] + ".weight"], kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    tiny, out = sys.argv[1], os.path.join(sys.argv[2], "base")
    os.makedirs(out, exist_ok=True)
    vocab = json.load(open(os.path.join(tiny, "config.json")))["vocab_size"]
    w = weights(vocab, np.random.default_rng(7))
    write_hf(out, tiny, w, vocab)
    write_gguf(out, tiny, w)


if __name__ == "__main__":
    main()

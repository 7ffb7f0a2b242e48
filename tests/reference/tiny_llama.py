"""Tiny Llama-architecture models with seeded random weights, and their float64 numpy goldens.

Usage: python tiny_llama.py [CACHE]   (CACHE defaults to $TWINFER_MODELS, else ~/.cache/twinfer/models)

Writes two Hugging Face model folders, each with config.json, model.safetensors (f32),
tokenizer.json and golden.json:
  CACHE/tiny-llama/   "llama": 2 layers, hidden 256, 4 heads, 1 KV head, head_dim 64, SwiGLU 512,
                      rope_theta 500000 with Llama-3 rope scaling, untied lm_head
  CACHE/tiny-qwen2/   "qwen2": 2 layers, hidden 512, 8 heads, 2 KV heads, head_dim 64, SwiGLU 1024,
                      q/k/v biases, rope_theta 1e6, tied embeddings
Both share one byte-level BPE tokenizer (512 ids, <s> = 0, </s> = 1) trained on the text below.
Everything is deterministic: same bytes on every run.
"""

import json
import math
import sys

import common  # noqa: F401  (first: it pins numpy to one thread)
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from common import cache_dir, floats, write_json

VOCAB_SIZE = 512
BOS, EOS = "<s>", "</s>"

# The tokenizer's training text (written for this file).
CORPUS = """\
The river runs past the mill and under the stone bridge before it reaches the sea. In spring the
water is high and brown, full of snow from the mountains; in late summer it is clear and slow, and
children wade across it to the island where the herons nest. The miller's family has lived beside
it for six generations, and each of them has kept a notebook of floods, droughts and frozen winters.

A small engine turns text into numbers and numbers back into text. First a tokenizer splits the
words into pieces it has seen before; then a model reads the pieces one by one and predicts what
comes next. The model keeps a cache of everything it has read, so that each new word costs only a
little more work. When many people ask questions at the same time, a scheduler decides whose turn
it is, shares memory between them, and makes sure that nobody waits too long for an answer.

On Saturday morning the market opens at seven. Farmers bring apples, pears, cheese, bread, honey
and fresh eggs; a woman sells flowers from a wooden cart, and a man with a violin plays the same
three songs until noon. People come early for the best tomatoes and stay late for coffee. When it
rains, everyone crowds under the arches of the town hall and the prices go down a little.

Learning to cook is mostly learning to wait. Onions need time to soften, bread needs time to rise,
and a soup is better on the second day than on the first. Taste as you go, write down what you
changed, and do not be afraid of making the same dish ten times until it is right. The kitchen is
a good place to practise patience, and the reward is a warm meal shared with friends and family.

Numbers also have their stories: one, two, three, four, five, six, seven, eight, nine and ten.
The year has twelve months and four seasons; the week has seven days, from Monday to Sunday.
A clock counts sixty seconds in a minute and sixty minutes in an hour, and the moon takes about
twenty nine days to grow full and fade again. Sailors, farmers and astronomers have always watched
the sky to know when to travel, when to plant and when to harvest.

"Where are you going?" asked the fox. "To the other side of the forest," said the rabbit, "where
the grass is greener and the wind is softer." The fox laughed and said that every side of the
forest looks greener from far away. They walked together until evening, talking about the weather,
their families and the best places to hide from the rain, and by the time the stars came out they
had become friends.
"""

# (name, config overrides, init, seed). Linear weights are N(0, 1/fan_in) times a gain, so attention
# and the MLP change the residual stream at least as much as the token embedding does and greedy
# decoding depends on the whole context. With tied embeddings the embedding has to be small, else
# each token's own embedding wins the next logits and decoding repeats it; a larger final norm
# weight then spreads the logits again.
MODELS = [
    ("tiny-llama", {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }, {"embed": 1.0, "v_bias": 0.0, "final_norm": 1.0}, 20240601),
    ("tiny-qwen2", {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 2,
        "tie_word_embeddings": True,
    }, {"embed": 0.05, "v_bias": 0.1, "final_norm": 4.0}, 20240602),
]

# Non-ASCII on purpose: byte-level pieces of multi-byte characters.
PROMPT = "The miller's family kept a notebook of floods, and on Saturday the café by the market"
EXTRA_PROMPTS = [
    "",  # <s> alone: a one-token prompt
    "Where are you going? asked",
    "A small engine turns text into numbers. When many people ask questions at the same time, a "
    "scheduler decides whose turn it is, so that nobody waits too long. The river",
]
GREEDY_STEPS = 32
EXTRA_GREEDY_STEPS = 16


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    # encode(text, add_special_tokens=True) gives exactly the model's input: <s> then the text.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tok


def full_config(overrides):
    cfg = {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    cfg.update(overrides)
    return dict(sorted(cfg.items()))


def make_weights(cfg, init, seed):
    """HF tensor names and layouts: nn.Linear weights are [out_features, in_features]."""
    rng = np.random.default_rng(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    bias = cfg["model_type"] == "qwen2"

    def lin(out_f, in_f, gain):
        return rng.standard_normal((out_f, in_f)) * (gain / math.sqrt(in_f))

    def norm_w(n):
        # Not all ones, so a missing or misplaced norm weight shows.
        return 1.0 + 0.2 * rng.standard_normal(n)

    w = {"model.embed_tokens.weight": rng.standard_normal((VOCAB_SIZE, h)) * init["embed"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_w(h)
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, h, 2.0)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h, 2.0)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h, 1.0)
        w[p + "self_attn.o_proj.weight"] = lin(h, nh * hd, 1.0)
        if bias:
            w[p + "self_attn.q_proj.bias"] = 0.5 * rng.standard_normal(nh * hd)
            w[p + "self_attn.k_proj.bias"] = 0.5 * rng.standard_normal(nkv * hd)
            w[p + "self_attn.v_proj.bias"] = init["v_bias"] * rng.standard_normal(nkv * hd)
        w[p + "post_attention_layernorm.weight"] = norm_w(h)
        w[p + "mlp.gate_proj.weight"] = lin(inter, h, 1.0)
        w[p + "mlp.up_proj.weight"] = lin(inter, h, 1.0)
        w[p + "mlp.down_proj.weight"] = lin(h, inter, 1.0)
    w["model.norm.weight"] = init["final_norm"] * norm_w(h)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(VOCAB_SIZE, h, 4.0)
    # Stored as f32; the oracle computes in f64 on exactly these rounded values.
    return {k: v.astype(np.float32) for k, v in w.items()}


def rope_inv_freq(cfg):
    """Per-pair inverse frequencies theta^(-2i/d), with Llama-3 scaling applied when configured."""
    d = cfg["head_dim"]
    inv = cfg["rope_theta"] ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    sc = cfg.get("rope_scaling")
    if not sc:
        return inv
    assert sc["rope_type"] == "llama3"
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths (> old/lo) are slowed by `factor`, short ones (< old/hi) kept, and those in
    # between blended linearly in old/wavelen.
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return np.where(wavelen > old / lo, inv / factor, np.where(wavelen < old / hi, inv, blended))


def rope(x, positions, inv_freq):
    """x: [tokens, heads, head_dim]. HF's rotate_half convention: dimension j pairs with j + d/2."""
    ang = positions[:, None] * inv_freq[None, :]  # [tokens, d/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


class Decoder:
    def __init__(self, cfg, weights):
        self.cfg = cfg
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.inv_freq = rope_inv_freq(cfg)

    def lin(self, x, name):
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y if b is None else y + b

    def logits(self, ids):
        """Full causal forward over ids (one sequence). Returns logits [len(ids), vocab]."""
        cfg, w = self.cfg, self.w
        nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        eps = cfg["rms_norm_eps"]
        t = len(ids)
        pos = np.arange(t, dtype=np.float64)
        causal = np.triu(np.full((t, t), -np.inf), 1)
        x = w["model.embed_tokens.weight"][np.asarray(ids)]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = rope(self.lin(h, p + "self_attn.q_proj").reshape(t, nh, hd), pos, self.inv_freq)
            k = rope(self.lin(h, p + "self_attn.k_proj").reshape(t, nkv, hd), pos, self.inv_freq)
            v = self.lin(h, p + "self_attn.v_proj").reshape(t, nkv, hd)
            # GQA: query head j reads KV head j // (nh / nkv).
            kv_of = np.arange(nh) // (nh // nkv)
            k, v = k[:, kv_of], v[:, kv_of]
            s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = np.einsum("hqk,khd->qhd", s, v).reshape(t, nh * hd)
            x = x + self.lin(a, p + "self_attn.o_proj")
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            g = self.lin(h, p + "mlp.gate_proj")
            x = x + self.lin(g / (1 + np.exp(-g)) * self.lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        x = rms_norm(x, w["model.norm.weight"], eps)
        head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
        return x @ head.T

    def greedy(self, ids, steps):
        """Argmax decoding by full recompute; EOS is not special. Returns (prefill logits [prompt,
        vocab], the `steps` new ids, step logits [steps, vocab], the smallest top-1 minus top-2 gap
        among the rows an id was picked from). Step row n is the output at the position of new id
        n, so new id n + 1 is its argmax; the last row picks an id that is not returned."""
        ids = list(ids)
        prefill = self.logits(ids)
        last, out, step_logits, gap = prefill[-1], [], [], math.inf
        for _ in range(steps):
            top2 = np.sort(last)[-2:]
            gap = min(gap, top2[1] - top2[0])
            out.append(int(np.argmax(last)))
            ids.append(out[-1])
            last = self.logits(ids)[-1]
            step_logits.append(last)
        return prefill, out, np.array(step_logits), gap


def main():
    cache = cache_dir(sys.argv)
    tok = build_tokenizer()
    for name, overrides, init, seed in MODELS:
        cfg = full_config(overrides)
        out = cache / name
        out.mkdir(parents=True, exist_ok=True)
        weights = make_weights(cfg, init, seed)
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tok.save(str(out / "tokenizer.json"))
        model = Decoder(cfg, weights)

        ids = tok.encode(PROMPT).ids
        prefill, greedy, steps, gap = model.greedy(ids, GREEDY_STEPS)
        extras = []
        for text in EXTRA_PROMPTS:
            e_ids = tok.encode(text).ids
            _, e_greedy, _, e_gap = model.greedy(e_ids, EXTRA_GREEDY_STEPS)
            gap = min(gap, e_gap)
            extras.append({"prompt": text, "prompt_ids": e_ids, "greedy_ids": e_greedy})

        # The golden must be usable: f32 noise cannot flip an argmax, decoding does not collapse
        # onto one token, and the logits are spread but finite.
        assert gap > 1e-3, f"{name}: near-tie in greedy decoding ({gap})"
        for g in [greedy] + [e["greedy_ids"] for e in extras]:
            assert len(set(g)) >= len(g) // 4, f"{name}: degenerate greedy output {g}"
            # So an engine that stops at EOS still produces every golden token.
            assert 0 not in g and 1 not in g, f"{name}: greedy output has <s> or </s>"
        write_json(out / "golden.json", {
            "prompt": PROMPT,
            "prompt_ids": ids,
            "prefill_logits": floats(prefill),
            "greedy_ids": greedy,
            "step_logits": floats(steps),
            "extra_prompts": extras,
        })
        print(f"{name}: prompt {len(ids)} tokens, extras {[len(e['prompt_ids']) for e in extras]}, "
              f"logit std {prefill.std():.2f}, min top-2 gap {gap:.3f}, "
              f"{len(set(greedy))} distinct of {len(greedy)} greedy: {tok.decode(greedy)!r}")


if __name__ == "__main__":
    main()

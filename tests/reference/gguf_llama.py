"""The float64 reference for a quantized GGUF chat model (SmolLM2-135M-Instruct, Q4_1).

Usage: python gguf_llama.py MODEL.gguf OUT.json

Everything here is independent of twinfer's Rust code:
- the tensors are read and dequantized by `gguf`, llama.cpp's own Python package;
- the forward pass follows llama.cpp's layout: GGUF stores the Q and K rows permuted for a RoPE
  that rotates adjacent pairs (x[2i], x[2i+1]), and so this forward rotates adjacent pairs on the
  rows as stored (twinfer un-permutes the rows at load and rotates halves);
- the tokenizer is a byte-level BPE written out below from the GGUF metadata (the `regex`
  package for the pre-tokenizer's \\p{L} / \\p{N} classes), not the `tokenizers` library;
- the chat template is rendered by `jinja2`.

The output holds, per prompt: the rendered text, its token ids, the top logits after the prompt,
and greedy continuation ids with the top-2 logit margin at every step (a test compares tokens up
to the first near-tie). A corpus of hard strings and their ids checks the tokenizer alone.
"""

import sys

import common  # noqa: F401  (sets the BLAS thread count before numpy loads)
import gguf
import jinja2
import numpy as np
import regex

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me three tips for a good night's sleep.",
    "Explain in one sentence what a CPU does.",
]
GREEDY_STEPS = 24
TOP_LOGITS = 32

TOKENIZER_CORPUS = [
    "Hello world",
    "  leading spaces and   runs of    whitespace\n\n\ttabs\t\tand newlines\n",
    "Numbers: 1234567890, 3.14159, -42, 1e-9 and 2026-12-03.",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * i).collect();\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b=2):\n\treturn a**b  # comment\n",
    "Café, naïve, façade, Zürich, São Paulo, Ελληνικά, русский текст",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji 🚀🔥 and symbols ©®™ ∑∫√ ≠ ≤ ≥ → ←",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "It's we'll they're I'd you've HE'S SHOUTING",
    "",
    " ",
    "a\u00a0b\u2003c",
]


# --- GGUF ------------------------------------------------------------------------------------------
def field(reader, key):
    return reader.fields[key].contents()


def tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float64)


# --- tokenizer ---------------------------------------------------------------------------------------
def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# llama.cpp's pre-tokenizer for `pre = smollm`: every digit alone, then GPT-2's pattern.
SMOLLM_SPLITS = [
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
]


class ByteLevelBpe:
    def __init__(self, tokens, token_types, merges):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.special = sorted((t for t, ty in zip(tokens, token_types) if ty == 3), key=len, reverse=True)
        self.byte_map = bytes_to_unicode()
        self.cache = {}

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 60:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        self.cache[word] = parts
        return parts

    def pre_split(self, text):
        pieces = [text]
        for pattern in SMOLLM_SPLITS:
            out = []
            for p in pieces:
                # A split keeps every character: matches and the text between them.
                last = 0
                for m in regex.finditer(pattern, p):
                    if m.start() > last:
                        out.append(p[last:m.start()])
                    out.append(m.group())
                    last = m.end()
                if last < len(p):
                    out.append(p[last:])
            pieces = out
        return pieces

    def encode(self, text):
        ids = []
        # Special tokens are matched first and never merged with their neighbours.
        pattern = "(" + "|".join(regex.escape(s) for s in self.special) + ")"
        for chunk in regex.split(pattern, text):
            if not chunk:
                continue
            if chunk in self.special:
                ids.append(self.ids[chunk])
                continue
            for piece in self.pre_split(chunk):
                mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
                ids.extend(self.ids[p] for p in self.bpe(mapped))
        return ids


# --- the forward pass, in llama.cpp's layout --------------------------------------------------------------
def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_adjacent(x, positions, base):
    """Rotates the pairs (x[2i], x[2i+1]) of each head by position * base^(-2i/d)."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


class Llama:
    def __init__(self, reader):
        a = "llama"
        self.layers = int(field(reader, f"{a}.block_count"))
        self.heads = int(field(reader, f"{a}.attention.head_count"))
        self.kv_heads = int(field(reader, f"{a}.attention.head_count_kv"))
        self.eps = float(field(reader, f"{a}.attention.layer_norm_rms_epsilon"))
        self.base = float(field(reader, f"{a}.rope.freq_base"))
        self.embed = tensor(reader, "token_embd.weight")
        names = {t.name for t in reader.tensors}
        self.out = tensor(reader, "output.weight") if "output.weight" in names else self.embed
        self.norm = tensor(reader, "output_norm.weight")
        self.hidden = self.embed.shape[1]
        self.head_dim = self.hidden // self.heads
        self.w = [{n: tensor(reader, f"blk.{i}.{n}.weight")
                   for n in ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                             "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]}
                  for i in range(self.layers)]

    def forward(self, ids, cache, start):
        """Logits of `ids` at positions start.., extending `cache` (per layer K and V lists)."""
        d, hq, hk = self.head_dim, self.heads, self.kv_heads
        x = self.embed[ids]
        pos = np.arange(start, start + len(ids))
        for i, w in enumerate(self.w):
            h = rms_norm(x, w["attn_norm"], self.eps)
            q = rope_adjacent((h @ w["attn_q"].T).reshape(len(ids), hq, d), pos, self.base)
            k = rope_adjacent((h @ w["attn_k"].T).reshape(len(ids), hk, d), pos, self.base)
            v = (h @ w["attn_v"].T).reshape(len(ids), hk, d)
            cache[i][0].append(k)
            cache[i][1].append(v)
            ks, vs = np.concatenate(cache[i][0]), np.concatenate(cache[i][1])
            total = ks.shape[0]
            out = np.empty((len(ids), hq, d))
            for head in range(hq):
                kv = head // (hq // hk)
                s = q[:, head, :] @ ks[:, kv, :].T / np.sqrt(d)
                s[np.arange(total)[None, :] > pos[:, None]] = -np.inf
                p = np.exp(s - s.max(axis=1, keepdims=True))
                out[:, head, :] = (p / p.sum(axis=1, keepdims=True)) @ vs[:, kv, :]
            x = x + out.reshape(len(ids), hq * d) @ w["attn_output"].T
            h = rms_norm(x, w["ffn_norm"], self.eps)
            gate, up = h @ w["ffn_gate"].T, h @ w["ffn_up"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w["ffn_down"].T
        return rms_norm(x, self.norm, self.eps) @ self.out.T


def main():
    path, out_path = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(path)
    tok = ByteLevelBpe(field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type"),
                       field(reader, "tokenizer.ggml.merges"))
    # Hugging Face renders chat templates with these two settings.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(field(reader, "tokenizer.chat_template"))
    model = Llama(reader)
    prompts = []
    for text in PROMPTS:
        rendered = template.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True)
        ids = tok.encode(rendered)
        cache = [([], []) for _ in range(model.layers)]
        logits = model.forward(ids, cache, 0)[-1]
        top = np.argsort(-logits)[:TOP_LOGITS]
        top_logits = logits[top]
        generated, margins = [], []
        for step in range(GREEDY_STEPS):
            order = np.argsort(-logits)[:2]
            generated.append(int(order[0]))
            margins.append(float(logits[order[0]] - logits[order[1]]))
            if step + 1 < GREEDY_STEPS:
                logits = model.forward([int(order[0])], cache, len(ids) + step)[-1]
        print(f"gguf_llama: {text!r} -> {generated}", file=sys.stderr)
        prompts.append({
            "message": text,
            "rendered": rendered,
            "ids": ids,
            "top_ids": [int(t) for t in top],
            "top_logits": common.floats(top_logits),
            "greedy": generated,
            "margins": [common.round7(m) for m in margins],
        })
    common.write_json(out_path, {
        "model": path.rsplit("/", 1)[-1],
        "prompts": prompts,
        "tokenizer": [{"text": t, "ids": tok.encode(t)} for t in TOKENIZER_CORPUS],
    })


if __name__ == "__main__":
    main()

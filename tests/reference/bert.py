"""Independent float64 numpy reference of the BERT encoder behind all-MiniLM-L6-v2.

Usage: python bert.py [CACHE]   (CACHE defaults to $TWINFER_MODELS, else ~/.cache/twinfer/models)

Reads CACHE/all-MiniLM-L6-v2/{config.json, model.safetensors, tokenizer.json} and writes
CACHE/all-MiniLM-L6-v2/golden.json = {"sentences", "input_ids", "embeddings"}: the sentence
embeddings (mean pooling over the attention mask, then L2 normalisation) of the sentences below.

Tokenisation: the shipped tokenizer.json pads every input to 128 tokens and truncates at 128;
the sentence-transformers model (sentence_bert_config.json) uses max_seq_length 256 instead. So
padding is switched off and truncation set to 256 tokens, [CLS] and [SEP] included.
"""

import json
import math
import sys

import common  # noqa: F401  (first: it pins numpy to one thread)
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from common import cache_dir, floats, write_json

MAX_TOKENS = 256

LONG_1 = (
    "The old lighthouse on the northern cape was switched off decades ago, but the people of the "
    "village still climb its spiral stairs every summer. From the top you can see the fishing "
    "boats leave the harbour before dawn, the gulls circling behind them, and on clear days the "
    "faint outline of the islands far to the west. The keeper's logbook, kept in a glass case at "
    "the bottom of the tower, records storms, shipwrecks and the occasional visit of a whale."
)

LONG_2 = (
    "Building a reliable inference engine is mostly a matter of bookkeeping. Every request needs "
    "its own key and value cache, which grows by one entry per generated token and must be "
    "released the moment the request finishes or is cancelled. Pages of a fixed size make this "
    "cheap: a sequence owns a list of page numbers, a shared prompt prefix can point at the same "
    "pages, and when memory runs out the scheduler can preempt the newest sequence, free its "
    "pages, and recompute them later without disturbing anyone else. The attention kernels then "
    "read the cache through a small table of page indices instead of one contiguous buffer. "
    "Measuring all of this honestly means timing from the moment a request is submitted, not "
    "from the moment its prefill starts, and reporting the spread of the gaps between tokens as "
    "well as their mean, because users notice a stall far more than they notice a slightly "
    "slower average. Finally, every optimisation must be checked against a slow and simple "
    "reference, since a fast answer that is wrong is worth nothing to anyone."
)

# Longer than 256 tokens, so the golden also pins where truncation cuts.
LONG_3 = (
    "A recipe for a rainy afternoon: first, warm the oven to one hundred and eighty degrees and "
    "butter a round tin. Whisk three eggs with a cup of sugar until pale, fold in two cups of "
    "flour, a pinch of salt, a spoon of baking powder and the grated peel of a lemon. Melt a "
    "block of butter, let it cool a little, and stir it in with half a cup of milk. Pour the "
    "batter into the tin, scatter sliced apples over the top in overlapping circles, and sprinkle "
    "them with cinnamon and brown sugar. Bake for about forty minutes, until a skewer comes out "
    "clean and the apples are soft at the edges. While it bakes, make tea, read a chapter of a "
    "book you have been meaning to finish, and listen to the rain on the window. When the cake "
    "comes out, leave it in the tin for ten minutes before turning it onto a rack, because a warm "
    "cake breaks easily. Serve it with cream or yoghurt, and keep what is left under a cloth; it "
    "tastes even better the next morning, when the lemon and cinnamon have had time to settle. "
    "If you have no apples, pears or plums work just as well, and a handful of walnuts adds a "
    "pleasant crunch. Children enjoy arranging the fruit, so let them help, and do not worry if "
    "the circles are not perfect: nobody has ever complained about the shape of a good cake. "
    "Write down what you changed, so that next time you can do it again or do it differently."
)

SENTENCES = [
    "Hello world.",
    "cat",
    "",
    "A man is playing a guitar on the stage.",
    "Someone is performing music with a guitar in front of an audience.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "Le café est très chaud ce matin, fais attention à ne pas te brûler.",
    "Die Straßenbahn fährt über die Brücke, während es draußen schneit.",
    "東京は日本の首都で、人口がとても多い都市です。",
    "我喜欢在周末和朋友一起喝茶。",
    "Привет, как дела? Καλημέρα σε όλους!",
    "Great job everyone!!! 🎉🎉 See you tomorrow 😀👍",
    "Wait... what?! (Really?) — yes; 100% sure: $3.50 @ 5pm, #win & <done>.",
    "MiXeD CaSe WoRdS, hy-phen-ated words, and numbers like 3.14159 or 1,000,000.",
    'fn main() { println!("{}", 1 + 2); }',
    LONG_1,
    LONG_2,
    LONG_3,
]


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """The exact GELU, x * Phi(x) with the erf (BERT's "gelu"), not the tanh approximation."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


class Bert:
    def __init__(self, model_dir):
        cfg = json.loads((model_dir / "config.json").read_text())
        assert cfg["model_type"] == "bert" and cfg["hidden_act"] == "gelu"
        assert cfg.get("position_embedding_type", "absolute") == "absolute"
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]
        # float64 copies of the f32 weights: the oracle computes in f64 on exactly the stored values.
        self.w = {k: v.astype(np.float64) for k, v in load_file(model_dir / "model.safetensors").items()
                  if v.dtype == np.float32}

    def lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def forward(self, ids, mask):
        """ids, mask: [batch, seq] ints. Returns the last hidden states [batch, seq, hidden]."""
        w = self.w
        b, t = ids.shape
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][np.arange(t)][None]
             + w["embeddings.token_type_embeddings.weight"][0][None, None])
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        d = x.shape[-1] // self.heads
        # Padded keys get -inf-like scores; a padded query row still attends to the real keys.
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def split(y):
                return y.reshape(b, t, self.heads, d).transpose(0, 2, 1, 3)

            q = split(self.lin(x, p + "attention.self.query"))
            k = split(self.lin(x, p + "attention.self.key"))
            v = split(self.lin(x, p + "attention.self.value"))
            s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            a = (s / s.sum(-1, keepdims=True)) @ v
            a = a.transpose(0, 2, 1, 3).reshape(b, t, self.heads * d)
            x = layer_norm(x + self.lin(a, p + "attention.output.dense"),
                           w[p + "attention.output.LayerNorm.weight"],
                           w[p + "attention.output.LayerNorm.bias"], self.eps)
            h = gelu(self.lin(x, p + "intermediate.dense"))
            x = layer_norm(x + self.lin(h, p + "output.dense"),
                           w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps)
        return x

    def embed(self, ids, mask):
        """Mean of the hidden states over the real tokens, then L2-normalised."""
        h = self.forward(ids, mask)
        m = mask[..., None].astype(np.float64)
        e = (h * m).sum(1) / m.sum(1)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)


def load_tokenizer(model_dir):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


def main():
    model_dir = cache_dir(sys.argv) / "all-MiniLM-L6-v2"
    tok = load_tokenizer(model_dir)
    model = Bert(model_dir)

    encodings = tok.encode_batch(SENTENCES)
    ids = [e.ids for e in encodings]
    # One sentence at a time: no padding in the golden values themselves.
    emb = np.stack([model.embed(np.array([i]), np.ones((1, len(i)), np.int64))[0] for i in ids])

    # Sanity checks of the reference itself.
    assert max(len(i) for i in ids) == MAX_TOKENS, "the longest sentence should be truncated"
    assert all(len(i) <= MAX_TOKENS for i in ids)
    cos = emb @ emb.T
    s = {text: n for n, text in enumerate(SENTENCES)}
    guitar, music = s["A man is playing a guitar on the stage."], s[SENTENCES[4]]
    pw, login = s["How do I reset my password?"], s[SENTENCES[7]]
    stocks = s[SENTENCES[5]]
    assert cos[guitar, music] > 0.6 and cos[guitar, music] > cos[guitar, stocks] + 0.4, cos[guitar]
    assert cos[pw, login] > 0.5 and cos[pw, login] > cos[pw, guitar] + 0.4, cos[pw]
    # A padded batch must give the embeddings of the unpadded sentences (the mask works).
    pick = [1, 5, 17]
    t = max(len(ids[n]) for n in pick) + 3
    padded = np.zeros((len(pick), t), np.int64)
    mask = np.zeros((len(pick), t), np.int64)
    for row, n in enumerate(pick):
        padded[row, :len(ids[n])] = ids[n]
        mask[row, :len(ids[n])] = 1
    assert np.abs(model.embed(padded, mask) - emb[pick]).max() < 1e-12

    write_json(model_dir / "golden.json", {
        "sentences": SENTENCES,
        "input_ids": ids,
        "embeddings": floats(emb),
    })
    lens = [len(i) for i in ids]
    print(f"bert: {len(SENTENCES)} sentences, {min(lens)}..{max(lens)} tokens, "
          f"cos(similar)={cos[guitar, music]:.3f}/{cos[pw, login]:.3f}, "
          f"cos(unrelated)={cos[guitar, stocks]:.3f}/{cos[pw, guitar]:.3f} -> {model_dir / 'golden.json'}")


if __name__ == "__main__":
    main()

"""Optional: checks the numpy goldens against Hugging Face's own implementations.

Not part of scripts/fetch-models.sh (it needs torch, transformers and sentence-transformers, some
gigabytes); run it by hand in a separate venv after changing the reference code:

    python -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers sentence-transformers
    HF_HUB_OFFLINE=1 /tmp/hf/bin/python tests/reference/crosscheck_hf.py [CACHE]

It exits non-zero on any disagreement.
"""

import json
import sys

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from common import cache_dir


def check_bert(cache):
    d = cache / "all-MiniLM-L6-v2"
    g = json.loads((d / "golden.json").read_text())
    st = SentenceTransformer(str(d), device="cpu").double()
    assert st.max_seq_length == 256
    for text, ids in zip(g["sentences"], g["input_ids"]):
        assert st.tokenizer(text, truncation=True, max_length=256)["input_ids"] == ids, text
    got = st.encode(g["sentences"], convert_to_numpy=True)
    ref = np.array(g["embeddings"])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"all-MiniLM-L6-v2: ids equal, min cosine {cos.min():.15f}")
    assert cos.min() > 1 - 1e-9


def check_decoder(cache, name):
    d = cache / name
    g = json.loads((d / "golden.json").read_text())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    prompts = [g] + g["extra_prompts"]
    for p in prompts:
        assert tok(p["prompt"])["input_ids"] == p["prompt_ids"], p["prompt"]
    ref = np.concatenate([np.array(g["prefill_logits"]), np.array(g["step_logits"])])
    ids = torch.tensor([g["prompt_ids"] + g["greedy_ids"]])
    for dtype in (torch.float64, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval()
        with torch.no_grad():
            got = model(ids).logits[0].double().numpy()
        # Error relative to each row's largest logit: elementwise relative error is meaningless
        # for logits near zero.
        err = (np.abs(got - ref) / np.abs(ref).max(1, keepdims=True)).max()
        print(f"{name} {dtype}: logits max error / row max {err:.2e}")
        assert err < (1e-5 if dtype == torch.float64 else 1e-4)
        for p in prompts:
            steps = len(p["greedy_ids"])
            out = model.generate(torch.tensor([p["prompt_ids"]]), max_new_tokens=steps, do_sample=False)
            assert out[0, len(p["prompt_ids"]):].tolist() == p["greedy_ids"], (name, dtype, p["prompt"])
        print(f"{name} {dtype}: greedy ids equal for {len(prompts)} prompts")


def main():
    cache = cache_dir(sys.argv)
    check_bert(cache)
    for name in ("tiny-llama", "tiny-qwen2"):
        check_decoder(cache, name)


if __name__ == "__main__":
    main()

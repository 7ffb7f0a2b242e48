"""The peer for `twinfer bench kernels --backend gpu`: torch's scaled_dot_product_attention on the
same shapes (GQA 32/8, head_dim 128, fp16), timed with CUDA events on the same card.

Decode uses contiguous KV (torch has no paged cache); its bytes are counted like ours: K and V of
every KV head, batch * ctx rows, 2 bytes each. Prefill FLOPs count the causal half.
"""
import sys
import torch
import torch.nn.functional as F

QO, KV, D = 32, 8, 128


def timed(fn, runs=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end) / 1e3
    iters = max(1, min(200, int(0.2 / max(once, 1e-6))))
    samples = []
    for _ in range(runs):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
    samples.sort()
    return samples[len(samples) // 2], samples[0], samples[-1]


def main():
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    print(f"{'case':<34} {'median ms':>11} {'rate':>16}")
    for L in (1024, 4096, 16384):
        q = torch.randn(1, QO, L, D, device=dev, dtype=torch.float16)
        k = torch.randn(1, KV, L, D, device=dev, dtype=torch.float16)
        v = torch.randn(1, KV, L, D, device=dev, dtype=torch.float16)
        med, lo, hi = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        flops = 4.0 * (L * (L + 1) / 2) * QO * D
        print(f"{'prefill causal L=' + str(L):<34} {med * 1e3:>11.3f} {flops / med / 1e12:>9.1f} TFLOP/s")
    for batch, ctx in ((1, 8192), (1, 32768), (8, 8192), (64, 8192)):
        q = torch.randn(batch, QO, 1, D, device=dev, dtype=torch.float16)
        k = torch.randn(batch, KV, ctx, D, device=dev, dtype=torch.float16)
        v = torch.randn(batch, KV, ctx, D, device=dev, dtype=torch.float16)
        med, lo, hi = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        nbytes = batch * ctx * KV * D * 2 * 2
        name = f"decode f16 contiguous batch={batch} ctx={ctx // 1024}K"
        print(f"{name:<34} {med * 1e3:>11.3f} {nbytes / med / 1e12:>9.2f} TB/s")
        del q, k, v
        torch.cuda.empty_cache()
    sys.stdout.flush()


if __name__ == "__main__":
    main()

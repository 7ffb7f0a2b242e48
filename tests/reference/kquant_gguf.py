"""A GGUF with the K-quants and the 5-bit formats made from a real model, for the tests of
twinfer's Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 support.

Usage: python kquant_gguf.py SRC.gguf DST.gguf

SmolLM2-135M has a hidden size of 576, which is not a multiple of the K-quants' 256-weight
blocks; llama.cpp's own Q4_K_M of it therefore keeps legacy types for most tensors and uses the
K-quants where rows allow, as here. Every tensor is copied as stored, except:
- `ffn_down` (rows of 1536), decoded by `gguf` (llama.cpp's Python package) and quantized again
  to Q4_K, Q5_K and Q6_K in turn, layer by layer;
- `attn_v` (rows of 576), quantized again to Q5_0 in even layers and Q5_1 in odd ones, by gguf's
  own quantizers, so that the fused q/k/v projection mixes Q4_1 with a 5-bit format.
The K-quant quantizers below are plain numpy (gguf ships decoders for the K-quants, not
encoders): per sub-block min/max (Q4_K, Q5_K) or signed absolute maximum (Q6_K) scales, then
6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) sub-block scales relative to an f16 block scale, as
llama.cpp's reference quantizers lay them out. Decoding the written file goes through `gguf`
again in gguf_llama.py, so the goldens never use this file's encoder as the decoder.
"""

import sys

import gguf
import numpy as np

QK_K = 256
T = gguf.GGMLQuantizationType
DOWN_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]
# Relative RMS error beyond which a quantizer is broken (about 0.1 for 4 bits).
MAX_ERROR = {T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.04, T.Q5_0: 0.08, T.Q5_1: 0.08}


def f16(x):
    return np.asarray(x, dtype=np.float16)


def safe_div(a, b):
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape, dtype=np.float32), where=b != 0)


def quantize_q45_k(w, bits):
    """[n, k] float32 -> [n, k / 256 * (144 or 176)] uint8 Q4_K (bits 4) or Q5_K (bits 5) blocks."""
    top = (1 << bits) - 1
    x = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    scale, minimum = (hi - lo) / top, -lo
    d = f16(scale.max(axis=1) / 63.0)
    dmin = f16(minimum.max(axis=1) / 63.0)
    sc = np.clip(np.rint(safe_div(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(safe_div(minimum, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint(safe_div(x + offset[..., None], step[..., None])), 0, top).astype(np.uint8)
    scales = np.zeros((x.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    # Bit j of qh[l]: the fifth bit of weight l of sub-block j (Q5_K).
    qh = np.bitwise_or.reduce((q >> 4).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    # qs[32c + l] holds weight 64c + l (low nibble) and 64c + 32 + l (high nibble).
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    parts = [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales]
    blocks = np.concatenate(parts + ([qh] if bits == 5 else []) + [qs], axis=1)
    return blocks.reshape(w.shape[0], -1)


def quantize_q6_k(w):
    """[n, k] float32 -> [n, k / 256 * 210] uint8 blocks."""
    x = w.reshape(-1, 16, 16).astype(np.float32)
    at = np.abs(x).argmax(axis=-1)
    signed_max = np.take_along_axis(x, at[..., None], axis=-1)[..., 0]
    # The largest magnitude of a sub-block maps to -32, the end of the 6-bit range with room.
    scale = signed_max / -32.0
    d = f16(np.abs(scale).max(axis=1) / 127.0)
    sc = np.clip(np.rint(safe_div(scale, d.astype(np.float32)[:, None])), -128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    q = (np.clip(np.rint(safe_div(x, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    low, high = q & 0x0F, q >> 4
    # Per half of 128: ql[l] = quadrants 0 | 2 << 4, ql[32 + l] = quadrants 1 | 3 << 4, and
    # qh[l] holds the high 2 bits of quadrant i at bit 2i.
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    blocks = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1
    )
    return blocks.reshape(w.shape[0], -1)


def requantized(tensor, errors):
    """The new (type, uint8 rows) for a tensor that is quantized again, else None; its relative
    RMS error goes into `errors` by type."""
    parts = tensor.name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in ("ffn_down", "attn_v"):
        return None
    layer = int(parts[1])
    w = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    if parts[2] == "ffn_down":
        assert w.shape[1] % QK_K == 0, f"{tensor.name}: rows of {w.shape[1]}"
        qtype = DOWN_TYPES[layer % 3]
        blocks = quantize_q6_k(w) if qtype == T.Q6_K else quantize_q45_k(w, 4 if qtype == T.Q4_K else 5)
    else:
        qtype = T.Q5_0 if layer % 2 == 0 else T.Q5_1
        blocks = gguf.quantize(w, qtype)
    back = gguf.dequantize(blocks, qtype)
    err = np.sqrt(np.mean((back - w) ** 2) / np.mean(w**2))
    errors.setdefault(qtype.name, []).append(err)
    assert err < MAX_ERROR[qtype], f"{tensor.name}: {qtype.name} error {err}"
    return qtype, blocks


def main():
    src, dst = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    tensors, errors = [], {}
    for t in reader.tensors:
        new = requantized(t, errors)
        qtype, data = new if new else (t.tensor_type, t.data)
        tensors.append((t.name, qtype, data))
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, data in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    for name, errs in errors.items():
        print(f"kquant_gguf: {len(errs)} tensors in {name}, relative RMS error {min(errs):.4f}-{max(errs):.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()

// A Llama-shaped safetensors file with small seeded weights and norms at 1, written in JS so that
// the memory tests can size a model to what they measure without a download.

/** f32 -> f16 bits (round to nearest even); the values used here are far from f16's subnormals. */
function f16Bits(x) {
  const u = new Uint32Array(new Float32Array([x]).buffer)[0];
  const sign = (u >>> 16) & 0x8000;
  const exp = ((u >>> 23) & 0xff) - 127 + 15;
  const mant = u & 0x7fffff;
  if (exp <= 0) return sign;
  let h = sign | (exp << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && h & 1)) h += 1;
  return h;
}

/** f32 -> bf16 bits (round to nearest even). */
function bf16Bits(x) {
  const u = new Uint32Array(new Float32Array([x]).buffer)[0];
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/**
 * The tensors of a decoder with these sizes, Hugging Face's names, `dtype` "F16" or "BF16";
 * `tied` leaves out lm_head.weight; `qkvBias` adds Qwen2's q/k/v biases. Returns an ArrayBuffer.
 */
export function syntheticSafetensors({ layers, hidden, kvDim, inter, vocab, dtype = "F16", tied = false, qkvBias = false }) {
  const tensors = [["model.embed_tokens.weight", [vocab, hidden]]];
  if (!tied) tensors.push(["lm_head.weight", [vocab, hidden]]);
  tensors.push(["model.norm.weight", [hidden]]);
  for (let i = 0; i < layers; i++) {
    const l = `model.layers.${i}`;
    tensors.push(
      [`${l}.input_layernorm.weight`, [hidden]],
      [`${l}.post_attention_layernorm.weight`, [hidden]],
      [`${l}.self_attn.q_proj.weight`, [hidden, hidden]],
      [`${l}.self_attn.k_proj.weight`, [kvDim, hidden]],
      [`${l}.self_attn.v_proj.weight`, [kvDim, hidden]],
      [`${l}.self_attn.o_proj.weight`, [hidden, hidden]],
      [`${l}.mlp.gate_proj.weight`, [inter, hidden]],
      [`${l}.mlp.up_proj.weight`, [inter, hidden]],
      [`${l}.mlp.down_proj.weight`, [hidden, inter]],
    );
    if (qkvBias) {
      tensors.push(
        [`${l}.self_attn.q_proj.bias`, [hidden]],
        [`${l}.self_attn.k_proj.bias`, [kvDim]],
        [`${l}.self_attn.v_proj.bias`, [kvDim]],
      );
    }
  }
  const header = {};
  let offset = 0;
  for (const [name, shape] of tensors) {
    const bytes = shape.reduce((a, b) => a * b, 1) * 2;
    header[name] = { dtype, shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  while (json.length % 8) json += " ";
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(new TextEncoder().encode(json), 8);
  const data = new Uint16Array(out.buffer, 8 + json.length, offset / 2);
  const bits = dtype === "BF16" ? bf16Bits : f16Bits;
  const one = bits(1);
  // 2001 distinct values in ±0.035 (std about 0.02), as bits computed once.
  const table = Uint16Array.from({ length: 2001 }, (_, v) => bits((v / 2000) * 0.07 - 0.035));
  let at = 0;
  for (const [name, shape] of tensors) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (name.endsWith("norm.weight")) {
      data.fill(one, at, at + n);
      at += n;
      continue;
    }
    for (let i = 0; i < n; i++, at++) data[at] = table[(i * 7919 + at) % 2001];
  }
  return out.buffer;
}

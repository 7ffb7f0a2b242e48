// rope_append.wgsl: splits the fused q/k/v projection rows, rotates q and k (RoPE, the Hugging Face
// `rotate_half` layout: dimension i pairs with i + head_dim / 2) and appends k and v to their
// pages of the device-resident pool, in one pass over the rows. With no_rotation, q and k are only
// split and stored (an encoder's attention over a temporary pool).
//
// Algorithm: one workgroup per row; a thread owns one head and one vec4 j of the first half of
// head_dim, and with it the vec4 j + head_dim / 8 of the second half, so both halves of a pair are
// in registers. Heads 0..Hq are queries (rotated, written to q_out as f32), the next Hk are keys
// (rotated, stored in the pool as kv4), the last Hk are values (copied to the pool). cos and sin
// come from a table the host computes in f64 once per position ([positions, head_dim / 2]).
// With Q8 the pool holds int8 codes and a scale per (row, KV head), which needs the whole head:
// a thread per K or V head rotates it twice (for the maximum, then for the codes).
// Tiling: WG threads per row, walking (Hq + 2 Hk) * head_dim / 8 items (Q8: Hq * head_dim / 8,
//   then the 2 Hk heads).
// Bindings (group 0): 0 uniform RopeParams; 1 qkv [rows, q_width] vec4<f32> (q | k | v);
//   2 cos_sin [positions, head_dim / 2] vec2<f32>; 3 rows_info [rows, 3] u32 (position, page,
//   slot in page); 4 q_out [rows, Hq, head_dim] vec4<f32>; 5 k_pool, 6 v_pool
//   [pages, page_size, Hk, head_dim] kv4 (Q8: u32 words, the scales of the buffer's rows, then
//   from word kv_codes_at the codes, as append_kv.wgsl writes them).
// head_dim is a multiple of 8 (the host checks). Dispatch: (min(rows, 32768), ceil(rows / 32768), 1).
// Knobs: override WG; kv4 from the prelude (f32, or f16 under SHADER_F16).

override WG: u32 = 64u;

// Mirrored by `RopeParams` in crates/twinfer/src/gpu/params.rs.
struct RopeParams {
    rows: u32,
    num_qo_heads: u32,
    num_kv_heads: u32,
    head_dim: u32,
    page_size: u32,
    q_width: u32,   // vec4s per row of qkv
    no_rotation: u32, // 1: q and k are copied as they are (BERT's learned positions)
    kv_codes_at: u32, // Q8: the word where the codes start
}

@group(0) @binding(0) var<uniform> R: RopeParams;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> cos_sin: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> rows_info: array<u32>;
@group(0) @binding(4) var<storage, read_write> q_out: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> k_pool: array<kv4>;
@group(0) @binding(6) var<storage, read_write> v_pool: array<kv4>;

fn rotate(lo: vec4<f32>, hi: vec4<f32>, cs: array<vec2<f32>, 4>) -> array<vec4<f32>, 2> {
    let c = vec4<f32>(cs[0].x, cs[1].x, cs[2].x, cs[3].x);
    let s = vec4<f32>(cs[0].y, cs[1].y, cs[2].y, cs[3].y);
    return array<vec4<f32>, 2>(lo * c - hi * s, hi * c + lo * s);
}

// Both halves of vec4 pair j of head `head` of row r: rotated unless the head is a value head
// (or rotation is off).
fn head_pair(r: u32, head: u32, j: u32, pos: u32, rotated: bool) -> array<vec4<f32>, 2> {
    let src = r * R.q_width + head * (R.head_dim / 4u) + j;
    let lo = qkv[src];
    let hi = qkv[src + R.head_dim / 8u];
    if (!rotated || R.no_rotation != 0u) {
        return array<vec4<f32>, 2>(lo, hi);
    }
    let t = pos * (R.head_dim / 2u) + 4u * j;
    let cs = array<vec2<f32>, 4>(cos_sin[t], cos_sin[t + 1u], cos_sin[t + 2u], cos_sin[t + 3u]);
    return rotate(lo, hi, cs);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x + wid.y * 32768u;
    if (r >= R.rows) {
        return;
    }
    let pos = rows_info[3u * r];
    let page = rows_info[3u * r + 1u];
    let slot = rows_info[3u * r + 2u];
    let d4 = R.head_dim / 4u;
    let h8 = R.head_dim / 8u;           // vec4s per half head
    let half = R.head_dim / 2u;
    let hk = R.num_kv_heads;
    let kv_row = (page * R.page_size + slot) * hk * d4;
// #if Q8
    let items = R.num_qo_heads * h8;
// #else
    let items = (R.num_qo_heads + 2u * hk) * h8;
// #endif
    for (var i = lid; i < items; i += WG) {
        let head = i / h8;
        let j = i % h8;
        let src = r * R.q_width + head * d4 + j;
        let lo = qkv[src];
        let hi = qkv[src + h8];
// #if Q8
// #else
        if (head >= R.num_qo_heads + hk) {
            let dst = kv_row + (head - R.num_qo_heads - hk) * d4 + j;
            v_pool[dst] = kv4(lo);
            v_pool[dst + h8] = kv4(hi);
            continue;
        }
// #endif
        var rot = array<vec4<f32>, 2>(lo, hi);
        if (R.no_rotation == 0u) {
            let t = pos * half + 4u * j;
            let cs = array<vec2<f32>, 4>(cos_sin[t], cos_sin[t + 1u], cos_sin[t + 2u], cos_sin[t + 3u]);
            rot = rotate(lo, hi, cs);
        }
        if (head < R.num_qo_heads) {
            let dst = (r * R.num_qo_heads + head) * d4 + j;
            q_out[dst] = rot[0];
            q_out[dst + h8] = rot[1];
        } else {
// #if Q8
// #else
            let dst = kv_row + (head - R.num_qo_heads) * d4 + j;
            k_pool[dst] = kv4(rot[0]);
            k_pool[dst + h8] = kv4(rot[1]);
// #endif
        }
    }
// #if Q8
    let first = (page * R.page_size + slot) * hk;
    for (var i = lid; i < 2u * hk; i += WG) {
        let is_v = i >= hk;
        let head = R.num_qo_heads + i;
        var amax = 0.0;
        for (var j = 0u; j < h8; j++) {
            let x = head_pair(r, head, j, pos, !is_v);
            amax = max(amax, max(q8_amax(x[0]), q8_amax(x[1])));
        }
        let scale = amax / 127.0;
        let inv = select(0.0, 1.0 / scale, scale > 0.0);
        let row = first + i % hk;
        let dst = R.kv_codes_at + row * d4;
        if (is_v) {
            v_pool[row] = bitcast<u32>(scale);
        } else {
            k_pool[row] = bitcast<u32>(scale);
        }
        for (var j = 0u; j < h8; j++) {
            let x = head_pair(r, head, j, pos, !is_v);
            let lo = q8_pack(x[0] * inv);
            let hi = q8_pack(x[1] * inv);
            if (is_v) {
                v_pool[dst + j] = lo;
                v_pool[dst + j + h8] = hi;
            } else {
                k_pool[dst + j] = lo;
                k_pool[dst + j + h8] = hi;
            }
        }
    }
// #endif
}

// append_kv.wgsl: writes new K/V rows into their pages of the device-resident pool.
//
// Algorithm: a plain scatter. New row r (of a ragged batch of new tokens) goes to
// (page, slot) = slots[2r], slots[2r + 1], computed on the host from the page table, for every KV
// head. Values arrive as f32 and are stored as kv4 (f32, or f16 under SHADER_F16).
//
// Tiling: one workgroup per new row, threads over (KV head, vec4 column).
// Bindings (group 0): 0 uniform AppendParams; 1 k_new, 2 v_new [rows, Hk, D] f32; 3 slots u32
//   [rows, 2]; 4 k_pool, 5 v_pool [pages, page_size, Hk, D] kv4; with Q8, u32 words: the scales
//   of every row of the buffer, then from word kv_codes_at the codes [pages, page_size, Hk, D / 4].
// Dispatch: (min(rows, 32768), ceil(rows / 32768), 1).
// Knobs: override WG; kv4 from the prelude.

override WG: u32 = 64u;

// Mirrored by `AppendParams` in crates/twinfer/src/gpu/params.rs.
struct AppendParams {
    rows: u32,
    num_kv_heads: u32,
    head_dim: u32,
    page_size: u32,
    kv_codes_at: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> A: AppendParams;
@group(0) @binding(1) var<storage, read> k_new: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> v_new: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<storage, read_write> k_pool: array<kv4>;
@group(0) @binding(5) var<storage, read_write> v_pool: array<kv4>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x + wid.y * 32768u;
    if (r >= A.rows) {
        return;
    }
    let row_vec4 = A.num_kv_heads * A.head_dim / 4u;
// #if Q8
    let d4 = A.head_dim / 4u;
    let first = (slots[2u * r] * A.page_size + slots[2u * r + 1u]) * A.num_kv_heads;
    for (var i = lid; i < 2u * A.num_kv_heads; i += WG) {
        let h = i % A.num_kv_heads;
        let src = r * row_vec4 + h * d4;
        let is_v = i >= A.num_kv_heads;
        var amax = 0.0;
        for (var c = 0u; c < d4; c++) {
            amax = max(amax, q8_amax(select(k_new[src + c], v_new[src + c], is_v)));
        }
        let scale = amax / 127.0;
        let inv = select(0.0, 1.0 / scale, scale > 0.0);
        let row = first + h;
        let dst = A.kv_codes_at + row * d4;
        if (is_v) {
            v_pool[row] = bitcast<u32>(scale);
            for (var c = 0u; c < d4; c++) {
                v_pool[dst + c] = q8_pack(v_new[src + c] * inv);
            }
        } else {
            k_pool[row] = bitcast<u32>(scale);
            for (var c = 0u; c < d4; c++) {
                k_pool[dst + c] = q8_pack(k_new[src + c] * inv);
            }
        }
    }
// #else
    let dst = (slots[2u * r] * A.page_size + slots[2u * r + 1u]) * row_vec4;
    for (var i = lid; i < row_vec4; i += WG) {
        k_pool[dst + i] = kv4(k_new[r * row_vec4 + i]);
        v_pool[dst + i] = kv4(v_new[r * row_vec4 + i]);
    }
// #endif
}

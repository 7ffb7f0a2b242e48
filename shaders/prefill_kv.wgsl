// prefill_kv.wgsl: how both prefill kernels find and read K/V rows, assembled into each after its
// bindings' names are known (`P: AttnParams`, `tbl`, `k`, `v`). A row is one (token, KV head) of a
// ragged [kv_tokens, Hk, D] buffer or of a paged pool [pages, page_size, Hk, D]; float rows are
// kv4 vectors, int8 rows (Q8) have their scale at word `row` of the buffer and their codes from
// word kv_codes_at, as append_kv.wgsl and rope_append.wgsl write them.

// The row (token, KV head) of key j of sequence b, for KV head h: its vec4s start at row * dv.
fn kv_row(b: u32, j: u32, h: u32, dv: u32, kv_base: u32) -> u32 {
    if (P.paged != 0u) {
        let page = tbl[P.off_indices + kv_base + j / P.page_size];
        return (page * P.page_size + j % P.page_size) * P.num_kv_heads + h;
    }
    return (kv_base + j) * P.num_kv_heads + h;
}

// vec4 c of K (V) row `row`. An int8 row has its scale at word `row` of the buffer and its codes
// from word kv_codes_at.
// #if Q8
fn k_at(row: u32, c: u32) -> vec4<f32> {
    return q8_codes(k[P.kv_codes_at + row * (P.head_dim / 4u) + c]) * bitcast<f32>(k[row]);
}
fn v_at(row: u32, c: u32) -> vec4<f32> {
    return q8_codes(v[P.kv_codes_at + row * (P.head_dim / 4u) + c]) * bitcast<f32>(v[row]);
}
// #else
fn k_at(row: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(k[row * (P.head_dim / 4u) + c]);
}
fn v_at(row: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(v[row * (P.head_dim / 4u) + c]);
}
// #endif

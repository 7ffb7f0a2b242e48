// prefill_kv.wgsl: how the prefill kernels find and read K/V rows, and a query row's facts;
// assembled into each after its bindings' names are known (`P: AttnParams`, `tbl`, `k`, `v`). A
// row is one (token, KV head) of a ragged [kv_tokens, Hk, D] buffer or of a paged pool
// [pages, page_size, Hk, D]; float rows are kv4 vectors, int8 rows (Q8) have their scale at word
// `row` of the buffer and their codes from word kv_codes_at, as append_kv.wgsl and
// rope_append.wgsl write them.

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

// Scores of the prefill kernels are in log2 units (exp2 is the hardware's exponential).
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

// Query row r of the tile: visible keys, position, slope; rows past the tile see nothing.
struct RowInfo {
    lo: i32,
    hi: i32,
    pos: i32,
    slope: f32,
}

fn row_info(r: u32, rows: u32, row0: u32, G: u32, h: u32, kv_len: i32, qo_len: i32) -> RowInfo {
    let rr = row0 + r;
    var out = RowInfo(0, 0, i32(rr / G) + kv_len - qo_len, 0.0);
    if (r < rows) {
        let vis = visible_range(P, out.pos, kv_len);
        out.lo = vis.x;
        out.hi = vis.y;
        if (P.has_alibi != 0u) {
            out.slope = bitcast<f32>(tbl[P.off_alibi + h * G + rr % G]);
        }
    }
    return out;
}

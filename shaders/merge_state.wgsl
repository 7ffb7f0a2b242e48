// merge_state.wgsl: combines split-K partial attention states into final rows.
//
// Algorithm: for each output row, the partial LSEs of its chunks give weights exp(lse_c - max);
// o = sum_c w_c o_c / sum_c w_c and lse = max + ln(sum_c w_c). Chunks that saw no key (lse bits of
// -inf) weigh nothing; a row whose every chunk is empty gives o = 0 and lse = -inf.
//
// Tiling: one workgroup per output row, one thread per vec4 column (WG >= head_dim / 4).
// Bindings (group 0): 0 uniform MergeParams; 1 o_part [rows_out * num_chunks... ordered as
//   (sequence, chunk, head)] f32; 2 lse_part; 3 o [rows_out, D] f32; 4 lse [rows_out] f32.
// Dispatch: (min(rows, 32768), ceil(rows / 32768), 1).
// Knobs: override WG.

override WG: u32 = 64u;

// Mirrored by `MergeParams` in crates/twinfer/src/gpu/params.rs.
struct MergeParams {
    rows: u32,        // batch * num_qo_heads
    num_heads: u32,
    num_chunks: u32,
    head_dim: u32,
}

@group(0) @binding(0) var<uniform> M: MergeParams;
@group(0) @binding(1) var<storage, read> o_part: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> lse_part: array<f32>;
@group(0) @binding(3) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * 32768u;
    if (row >= M.rows) {
        return;
    }
    let b = row / M.num_heads;
    let head = row % M.num_heads;
    let dv = M.head_dim / 4u;
    var mx = -BIG;
    for (var c = 0u; c < M.num_chunks; c++) {
        let l = lse_part[(b * M.num_chunks + c) * M.num_heads + head];
        if (!lse_is_empty(l)) {
            mx = max(mx, l);
        }
    }
    var wsum = 0.0;
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < M.num_chunks; c++) {
        let prow = (b * M.num_chunks + c) * M.num_heads + head;
        let l = lse_part[prow];
        if (!lse_is_empty(l)) {
            let w = exp(l - mx);
            wsum += w;
            if (lid < dv) {
                acc += w * o_part[prow * dv + lid];
            }
        }
    }
    if (lid < dv) {
        o[row * dv + lid] = acc * select(0.0, 1.0 / wsum, wsum > 0.0);
    }
    if (lid == 0u) {
        lse[row] = finish_lse(mx, wsum);
    }
}

// silu_mul.wgsl: act[r] = silu(gate[r]) * up[r], SwiGLU's gating, from the fused gate/up projection.
//
// Algorithm: element-wise, one vec4 per thread. Row r of gate_up is gate (width vec4s) then up.
// Bindings (group 0): 0 uniform RowParams (rows, width in vec4s); 1 gate_up [rows, 2 width]
//   vec4<f32>; 2 act [rows, width] vec4<f32>.
// Dispatch: (min(groups, 32768), ceil(groups / 32768), 1), groups = ceil(rows * width / WG).
// Knobs: override WG.

override WG: u32 = 256u;

// Mirrored by `RowParams` in crates/twinfer/src/gpu/params.rs (eps and gather unused).
struct RowParams {
    rows: u32,
    width: u32,
    eps: f32,
    gather: u32,
}

@group(0) @binding(0) var<uniform> P: RowParams;
@group(0) @binding(1) var<storage, read> gate_up: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> act: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * 32768u) * WG + lid;
    if (i >= P.rows * P.width) {
        return;
    }
    let r = i / P.width;
    let c = i % P.width;
    let g = gate_up[r * 2u * P.width + c];
    let u = gate_up[r * 2u * P.width + P.width + c];
    act[i] = g / (1.0 + exp(-g)) * u;
}

// layer_norm.wgsl: x[r] = (x[r] - mean) / sqrt(var + eps) * gamma + beta, in place: the post-norm
// of BERT's blocks on the residual stream, after a projection's epilogue added into it.
//
// Algorithm: one workgroup per row. Two passes over the row (it is short and in cache): the mean
// from a tree of the threads' partial sums, then the variance as the mean of (x - mean)^2, which
// keeps f32 accurate where E[x^2] - mean^2 would cancel. Sums are f32.
// Tiling: WG threads per row, the row walked in steps of WG.
// Bindings (group 0): 0 uniform RowParams (gather unused); 1 x [rows, width] f32, read and
//   written; 2 gamma [width] f32; 3 beta [width] f32.
// Dispatch: (min(rows, 32768), ceil(rows / 32768), 1).
// Knobs: override WG (a power of two, at most WG_MAX).

override WG: u32 = 256u;
const WG_MAX: u32 = 256u;

// Mirrored by `RowParams` in crates/twinfer/src/gpu/params.rs.
struct RowParams {
    rows: u32,
    width: u32,
    eps: f32,
    gather: u32,
}

@group(0) @binding(0) var<uniform> P: RowParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;

var<workgroup> red: array<f32, WG_MAX>;

// The sum of every thread's `v`, returned to all of them.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red[lid] += red[lid + s];
        }
    }
    workgroupBarrier();
    let total = red[0];
    // Nobody overwrites red[0] for the next sum before every thread has read it.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x + wid.y * 32768u;
    if (r >= P.rows) {
        return;
    }
    let xs = r * P.width;
    var acc = 0.0;
    for (var i = lid; i < P.width; i += WG) {
        acc += x[xs + i];
    }
    let mean = workgroup_sum(lid, acc) / f32(P.width);
    var acc2 = 0.0;
    for (var i = lid; i < P.width; i += WG) {
        let d = x[xs + i] - mean;
        acc2 = fma(d, d, acc2);
    }
    let inv = inverseSqrt(workgroup_sum(lid, acc2) / f32(P.width) + P.eps);
    for (var i = lid; i < P.width; i += WG) {
        x[xs + i] = (x[xs + i] - mean) * inv * gamma[i] + beta[i];
    }
}

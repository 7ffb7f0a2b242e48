// rms_norm.wgsl: y[r] = x[src(r)] / rms(x[src(r)]) * w, the RMSNorm of the resident forward pass.
//
// Algorithm: one workgroup per output row. Each thread sums the squares of a strided share of the
// row, a tree in workgroup memory adds the WG partials (f32), and every thread scales its share.
// With `gather` set, output row r reads input row rows_map[r]: the final norm runs only on the
// rows whose logits are read back.
// Tiling: WG threads per row, the row walked in steps of WG.
// Bindings (group 0): 0 uniform RowParams; 1 x [*, width] f32; 2 w [width] f32; 3 rows_map
//   [rows] u32 (read only when gather != 0); 4 y [rows, width] f32.
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
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> rows_map: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, WG_MAX>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x + wid.y * 32768u;
    if (r >= P.rows) {
        return;
    }
    var src = r;
    if (P.gather != 0u) {
        src = rows_map[r];
    }
    let xs = src * P.width;
    var acc = 0.0;
    for (var i = lid; i < P.width; i += WG) {
        let v = x[xs + i];
        acc = fma(v, v, acc);
    }
    red[lid] = acc;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red[lid] += red[lid + s];
        }
    }
    workgroupBarrier();
    let inv = inverseSqrt(red[0] / f32(P.width) + P.eps);
    let ys = r * P.width;
    for (var i = lid; i < P.width; i += WG) {
        y[ys + i] = x[xs + i] * inv * w[i];
    }
}

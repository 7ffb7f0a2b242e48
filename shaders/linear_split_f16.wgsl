// linear_split_f16.wgsl: the input rows of a tensor-core projection (linear_matmul_coop.wgsl),
// each as two f16 parts and a power-of-two scale.
//
// Tensor cores multiply f16s. One f16 keeps 11 bits of an activation; two keep about 22: row r's
// inputs v are scaled by 2^s (s puts the row's largest magnitude in [2^13, 2^14), so the parts of
// every input within 2^27 of it are normal f16s, and the scaling is exact), hi is v with its
// mantissa cut to f16's 10 bits (a bit mask, exact in f16), and lo = (v - hi) * 2^11 (exact in
// f32, then rounded once to f16). The products then sum hi and lo separately and join them as
// (c_hi + c_lo / 2^11) / 2^s: the split's error is at most about 2^-22 of sum |x w|, plus, for
// inputs more than 2^27 below the row's largest (subnormal parts), 2^-25 of it times sum |w|. The cut is a mask rather than a round trip
// through f16 so that no compiler can fold hi back into v (the low part of a first version that
// did that contributed nothing on an H100).
// Fused as in linear_matmul.wgsl: RMSNorm (norm), SwiGLU of [gate | up] rows or GELU (act).
// Bindings (group 0): 0 uniform LinearParams; 1 x [rows, k4 (2 k4 with SwiGLU)] vec4<f32>;
//   2 xs, written: hi [rows_p, 4 k4], then lo [rows_p, 4 k4], then each row's -s as an f16
//   integer [rows_p]; 3 norm_w [k] f32 (read only with norm).
// rows_p = rows rounded up to ROW_PAD (mirrored in linear_matmul_coop.wgsl and on the host);
// rows past `rows` are zeros, so the matmul's last row tile reads zeros.
// Dispatch: (rows_p, 1, 1), one workgroup per row.

const ROW_PAD: u32 = 128u;
const LO_SCALE: f32 = 2048.0;

// Mirrored by `LinearParams` in crates/twinfer/src/gpu/params.rs.
struct LinearParams {
    rows: u32,
    n: u32,
    k4: u32,
    n0: u32,
    ldy: u32,
    accumulate: u32,
    norm: u32,
    eps: f32,
    act: u32,
    group_shift: u32,
    scales_at: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> P: LinearParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> xs: array<f16>;
@group(0) @binding(3) var<storage, read> norm_w: array<f32>;

var<workgroup> red: array<f32, 256>;

// erfc(z) for z >= 0, to 1.2e-7 relative (a Chebyshev fit: Numerical Recipes' erfcc).
fn erfc_pos(z: vec4<f32>) -> vec4<f32> {
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = t * (-0.82215223 + t * 0.17087277);
    let q = t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + p)));
    let s = t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + q))));
    return t * exp(-z * z - 1.26551223 + s);
}

// The exact (erf) GELU, as 0.5 v erfc(-v / sqrt 2).
fn gelu(v: vec4<f32>) -> vec4<f32> {
    let z = v * -0.70710678118654752;
    let e = erfc_pos(abs(z));
    return 0.5 * v * select(e, 2.0 - e, z < vec4<f32>(0.0));
}

// Input vec4 i of row r: x itself, SwiGLU's silu(gate) * up of a fused gate/up row, or GELU(x).
fn load_x(r: u32, i: u32) -> vec4<f32> {
    if (P.act == 1u) {
        let g = x[r * 2u * P.k4 + i];
        let u = x[r * 2u * P.k4 + P.k4 + i];
        return g / (1.0 + exp(-g)) * u;
    }
    let v = x[r * P.k4 + i];
    if (P.act == 2u) {
        return gelu(v);
    }
    return v;
}

// The input as the projection takes it: normed where asked.
fn input(r: u32, i: u32, inv_rms: f32) -> vec4<f32> {
    let v = load_x(r, i);
    if (P.norm != 0u) {
        return v * vec4<f32>(norm_w[4u * i], norm_w[4u * i + 1u], norm_w[4u * i + 2u], norm_w[4u * i + 3u]) * inv_rms;
    }
    return v;
}

// The workgroup's sum (max_not_sum false) or maximum of `v`.
fn reduce(lid: u32, v: f32, max_not_sum: bool) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = select(red[lid] + red[lid + s], max(red[lid], red[lid + s]), max_not_sum);
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x;
    let live = r < P.rows;
    var inv_rms = 1.0;
    if (P.norm != 0u) {
        var sq = 0.0;
        if (live) {
            for (var i = lid; i < P.k4; i += 256u) {
                let v = load_x(r, i);
                sq += dot(v, v);
            }
        }
        inv_rms = inverseSqrt(reduce(lid, sq, false) / f32(4u * P.k4) + P.eps);
    }
    var big = 0.0;
    if (live) {
        for (var i = lid; i < P.k4; i += 256u) {
            let a = abs(input(r, i, inv_rms));
            big = max(big, max(max(a.x, a.y), max(a.z, a.w)));
        }
    }
    let amax = reduce(lid, big, true);
    // A row of zeros, or one with an infinity, keeps scale 1; a NaN input stays NaN whatever the
    // scale (the device's max may drop it). Either way the outputs it reaches are NaN (inf - inf
    // in lo), not silently finite.
    var shift = 0;
    if (amax > 0.0 && (bitcast<u32>(amax) & 0x7f800000u) != 0x7f800000u) {
        shift = clamp(14 - frexp(amax).exp, -126, 127);
    }
    let scale = ldexp(1.0, shift);
    let rows_p = (P.rows + ROW_PAD - 1u) / ROW_PAD * ROW_PAD;
    let kp = 4u * P.k4;
    let lo_at = rows_p * kp;
    for (var i = lid; i < P.k4; i += 256u) {
        var v = vec4<f32>(0.0);
        if (live) {
            v = input(r, i, inv_rms) * scale;
        }
        let hi = bitcast<vec4<f32>>(bitcast<vec4<u32>>(v) & vec4<u32>(0xFFFFE000u));
        let hh = vec4<f16>(hi);
        let ll = vec4<f16>((v - hi) * LO_SCALE);
        let at = r * kp + 4u * i;
        xs[at] = hh.x;
        xs[at + 1u] = hh.y;
        xs[at + 2u] = hh.z;
        xs[at + 3u] = hh.w;
        xs[lo_at + at] = ll.x;
        xs[lo_at + at + 1u] = ll.y;
        xs[lo_at + at + 2u] = ll.z;
        xs[lo_at + at + 3u] = ll.w;
    }
    if (lid == 0u) {
        xs[2u * lo_at + r] = f16(f32(-shift));
    }
}

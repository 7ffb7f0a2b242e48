// linear_matmul.wgsl: y[rows, n] = x[rows, k] · W[n, k]ᵀ + bias for prompt chunks (many rows).
//
// Algorithm: a classic shared-memory tiled matmul. A 16 x 16 workgroup owns a BM x BN tile of y
// (BM = 16 TM rows, BN = 16 TN features) and walks k in steps of BK = 16: it stages the x tile
// [BM, BK] and the W tile [BN, BK] in workgroup memory (W widened to f32 once, on the way in),
// then each thread accumulates its TM x TN outputs from registers, f32 throughout. Thread (tx, ty)
// owns rows ty + 16 i and features tx + 16 j: consecutive threads read consecutive workgroup
// words and write consecutive features of y. Tiles are stored k-major so the inner loop reads one
// word per row and per feature.
// Tiling: BM x BN outputs per workgroup, TM x TN per thread (at most 4 x 4), BK = 16.
// Bindings (group 0): 0 uniform LinearParams; 1 x [rows, k4] vec4<f32>; 2 w [n, k4] w4 (this
//   buffer's features only); 3 bias [all features] f32 (zeros when the layer has none);
//   4 y [rows, ldy] f32, written (or added to, with accumulate) at columns n0 .. n0 + n;
//   5 norm_w [k] f32, the RMSNorm weights (read only with norm).
// Fused on load (the resident forward pass): RMSNorm of x rows (norm: the tile's rows' sums of
// squares first, then x * g / rms as the x tile is staged), SwiGLU of gate/up rows or
// GELU (act).
// k is padded with zeros to k4 vec4s in both x and W on the host; rows and n need no padding.
// Dispatch: (ceil(n / BN), ceil(rows / BM), 1).
// Knobs: override TM, TN (1..=4). The prelude gives W's element type w4 and load_w(feature, i),
// W's vec4 i of a feature as f32 (float W, or block-quantized W decoded in registers, see
// gpu/shaders.rs).

override TM: u32 = 4u;
override TN: u32 = 4u;
const T_MAX: u32 = 4u;
const BK: u32 = 16u;
const TILE_MAX: u32 = 1024u;   // 16 * T_MAX * BK

// Mirrored by `LinearParams` in crates/twinfer/src/gpu/params.rs.
struct LinearParams {
    rows: u32,
    n: u32,        // features in this weight buffer
    k4: u32,       // vec4s per row of x and W
    n0: u32,       // first feature of this buffer among all of the layer's
    ldy: u32,      // row stride of y: all features of the layer
    accumulate: u32, // 1: y += product (a residual add in the epilogue)
    norm: u32,     // 1: x rows are RMS-normed on load (weights norm_w, epsilon eps)
    eps: f32,
    act: u32,      // 1: x is [rows, 2 k4] gate | up, and the input is silu(gate) * up (SwiGLU);
                   // 2: the input is GELU(x) (BERT's feed-forward)
    group_shift: u32, // block-quantized W: log2 of the vec4s of a row that share one scale
    scales_at: u32,   // block-quantized W: the word where the scales start in w
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> P: LinearParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<w4>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> norm_w: array<f32>;

var<workgroup> xs: array<f32, TILE_MAX>;   // [BK, BM]
var<workgroup> ws: array<f32, TILE_MAX>;   // [BK, BN]
var<workgroup> sq: array<f32, 256>;        // partial sums of squares: [parts, BM]
var<workgroup> inv_rms: array<f32, 64>;    // [BM] (T_MAX * 16)

// erfc(z) for z >= 0, to 1.2e-7 relative (a Chebyshev fit: Numerical Recipes' erfcc).
fn erfc_pos(z: vec4<f32>) -> vec4<f32> {
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = t * (-0.82215223 + t * 0.17087277);
    let q = t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + p)));
    let s = t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + q))));
    return t * exp(-z * z - 1.26551223 + s);
}

// The exact (erf) GELU, as 0.5 v erfc(-v / sqrt 2): relative accuracy holds for negative v too.
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

// The norm's weights for input vec4 i (ones without a norm).
fn norm_scale(i: u32) -> vec4<f32> {
    if (P.norm != 0u) {
        return vec4<f32>(norm_w[4u * i], norm_w[4u * i + 1u], norm_w[4u * i + 2u], norm_w[4u * i + 3u]);
    }
    return vec4<f32>(1.0);
}

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let bm = 16u * TM;
    let bn = 16u * TN;
    let m0 = wid.y * bm;
    let f0 = wid.x * bn;
    let tx = lid3.x;
    let ty = lid3.y;
    // acc_i: row ty + 16 i, features tx + 16 j in lane j. Four named vectors rather than an
    // indexed array, and the loops over them written out: a compiler that does not unroll
    // (SwiftShader's Subzero, some mobile drivers) keeps them in registers then.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // RMSNorm fused on load: 256 / BM threads per row of the tile sum its squares first.
    if (P.norm != 0u) {
        let parts = 256u / bm;
        let r = lid % bm;
        let part = lid / bm;
        var acc_sq = 0.0;
        if (m0 + r < P.rows) {
            for (var i = part; i < P.k4; i += parts) {
                let v = load_x(m0 + r, i);
                acc_sq += dot(v, v);
            }
        }
        sq[lid] = acc_sq;
        workgroupBarrier();
        if (lid < bm) {
            var total = 0.0;
            for (var p = 0u; p < parts; p++) {
                total += sq[p * bm + lid];
            }
            inv_rms[lid] = inverseSqrt(total / f32(4u * P.k4) + P.eps);
        }
        workgroupBarrier();
    }
    let bk4 = BK / 4u;
    for (var k0 = 0u; k0 < P.k4; k0 += bk4) {
        // Stage: one vec4 of x and of W per thread and step, zeros beyond the edges.
        for (var t = lid; t < bm * bk4; t += 256u) {
            let r = t / bk4;
            let c = t % bk4;
            var v = vec4<f32>(0.0);
            if (m0 + r < P.rows && k0 + c < P.k4) {
                v = load_x(m0 + r, k0 + c);
                if (P.norm != 0u) {
                    v *= norm_scale(k0 + c) * inv_rms[r];
                }
            }
            xs[c * 4u * bm + r] = v.x;
            xs[(c * 4u + 1u) * bm + r] = v.y;
            xs[(c * 4u + 2u) * bm + r] = v.z;
            xs[(c * 4u + 3u) * bm + r] = v.w;
        }
        for (var t = lid; t < bn * bk4; t += 256u) {
            let r = t / bk4;
            let c = t % bk4;
            var v = vec4<f32>(0.0);
            if (f0 + r < P.n && k0 + c < P.k4) {
                v = load_w(f0 + r, k0 + c);
            }
            ws[c * 4u * bn + r] = v.x;
            ws[(c * 4u + 1u) * bn + r] = v.y;
            ws[(c * 4u + 2u) * bn + r] = v.z;
            ws[(c * 4u + 3u) * bn + r] = v.w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            // Lanes past TN read other words of the tile (in bounds: BK x 64 words); their
            // sums are never written.
            let wb = kk * bn + tx;
            let b = vec4<f32>(ws[wb], ws[wb + 16u], ws[wb + 32u], ws[wb + 48u]);
            let xa = kk * bm + ty;
            acc0 = fma(vec4<f32>(xs[xa]), b, acc0);
            if (TM > 1u) {
                acc1 = fma(vec4<f32>(xs[xa + 16u]), b, acc1);
            }
            if (TM > 2u) {
                acc2 = fma(vec4<f32>(xs[xa + 32u]), b, acc2);
                acc3 = fma(vec4<f32>(xs[xa + 48u]), b, acc3);
            }
        }
        workgroupBarrier();
    }
    let acc = array<vec4<f32>, T_MAX>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < TM; i++) {
        let r = m0 + ty + 16u * i;
        for (var j = 0u; j < TN; j++) {
            let f = f0 + tx + 16u * j;
            if (r < P.rows && f < P.n) {
                let v = acc[i][j] + bias[P.n0 + f];
                let at = r * P.ldy + P.n0 + f;
                if (P.accumulate != 0u) {
                    y[at] += v;
                } else {
                    y[at] = v;
                }
            }
        }
    }
}

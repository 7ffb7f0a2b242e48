// linear_gemv.wgsl: y[rows, n] = x[rows, k] · W[n, k]ᵀ + bias for decode rows (a batch of them).
//
// Algorithm: TPF threads share one output feature; each walks the row of W in steps of W_STEP
// vec4s (one vec4 of float or 8-bit W, one word of 4-bit codes; consecutive threads read
// consecutive steps, so a feature's TPF threads stream one contiguous span) and keeps one partial
// dot per row of x, MAXR at most. The TPF partials are summed by subgroup shuffles (variant
// SUBGROUP, subgroups of SG lanes) or a tree in workgroup memory (baseline). Rows come in groups
// of MAXR (grid z): each group reads W once, from L2 after the first, and a row's arithmetic does
// not depend on the group it is in or how many rows there are (a sequence's logits are the same
// alone or batched). Accumulation is f32 whatever W is stored in.
// Tiling: WG threads per workgroup = WG / TPF feature slots of FPT consecutive features each;
// workgroup g takes features [g * FPT * WG / TPF, (g + 1) * FPT * WG / TPF) of this weight
// buffer. With FPT > 1 (batches) a thread loads each x vec4 once for FPT features, cutting the
// loads per FMA; every (row, feature) sum keeps the same order, so the result is the same bits.
// Bindings (group 0): 0 uniform LinearParams; 1 x [rows, k4] vec4<f32>; 2 w [n, k4] w4 (this
//   buffer's features only); 3 bias [all features] f32 (zeros when the layer has none);
//   4 y [rows, ldy] f32, written (or added to, with accumulate) at columns n0 .. n0 + n;
//   5 norm_w [k] f32, the RMSNorm weights (read only with norm).
// Fused on load (the resident forward pass): RMSNorm of x (norm), SwiGLU of a gate/up row or
// GELU (act).
// k is padded with zeros to k4 vec4s in both x and W on the host.
// Dispatch: (min(groups, 32768), ceil(groups / 32768), ceil(rows / MAXR)),
// groups = ceil(n / (FPT * WG / TPF)).
// Knobs: override WG, TPF (powers of two, TPF <= WG), FPT, SG. The prelude gives W's element
// type w4, W_STEP and load_w_step(feature, s), W's vec4s s * W_STEP .. of a feature as f32: float W
// (f32, or f16 under SHADER_F16), or block-quantized W decoded in registers (u32 words of 4- or
// 8-bit codes, then the scales; see gpu/shaders.rs).

override WG: u32 = 256u;
override TPF: u32 = 32u;
const MAXR: u32 = 4u;
override FPT: u32 = 1u;   // features per thread, 1..=FPT_MAX
override SG: u32 = 32u;   // the subgroup size (subgroup variant only)
const FPT_MAX: u32 = 4u;
const WG_MAX: u32 = 256u;

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

var<workgroup> red: array<vec4<f32>, WG_MAX>;   // [WG] partial dots, one lane per row of x

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

// Row r0 + r's input vec4 i, normed, or zeros past the batch's rows.
fn x_row(r0: u32, r: u32, nrows: u32, i: u32, ns: vec4<f32>) -> vec4<f32> {
    if (r < nrows) {
        return load_x(r0 + r, i) * ns;
    }
    return vec4<f32>(0.0);
}

// w's dot product with each row of x (the columns of xr), lane r for row r; lanes past the
// batch's rows stay 0. Each lane is one dot() whatever the row count (batch invariance).
fn row_dots(w: vec4<f32>, xr: mat4x4<f32>, nrows: u32) -> vec4<f32> {
    var d = vec4<f32>(dot(w, xr[0]), 0.0, 0.0, 0.0);
    if (nrows > 1u) {
        d.y = dot(w, xr[1]);
    }
    if (nrows > 2u) {
        d.z = dot(w, xr[2]);
    }
    if (nrows > 3u) {
        d.w = dot(w, xr[3]);
    }
    return d;
}

// acc plus feature f's products at step s: first with the step's first vec4s (a), then with its
// second (b, 4-bit words), in that order for every batch.
fn feature_dots(acc: vec4<f32>, f: u32, s: u32, a: mat4x4<f32>, b: mat4x4<f32>, nrows: u32) -> vec4<f32> {
    let wv = load_w_step(f, s);
    var t = acc + row_dots(wv[0], a, nrows);
    if (W_STEP > 1u) {
        t += row_dots(wv[W_STEP - 1u], b, nrows);
    }
    return t;
}

// The sum of v over this thread's feature slot (TPF lanes), on every lane of the slot.
// Subgroup variant: xor shuffles inside the subgroup, then (when a slot spans several subgroups,
// TPF > SG) each subgroup's sum through workgroup memory, added in subgroup order. Baseline: a
// tree in workgroup memory. Either way the order depends on the lane only, not on the rows.
// Called in uniform control flow (it holds barriers).
fn slot_sum(v: vec4<f32>, lid: u32, lane: u32, sg_lane: u32, sg_id: u32) -> vec4<f32> {
// #if SUBGROUP
    var t = v;
    for (var off = 1u; off < min(TPF, SG); off <<= 1u) {
        t += subgroupShuffleXor(t, off);
    }
    if (TPF > SG) {
        workgroupBarrier();
        if (sg_lane == 0u) {
            red[sg_id] = t;
        }
        workgroupBarrier();
        let parts = max(TPF / SG, 1u);   // a constant; 0 would be a division by zero to naga
        let first = sg_id / parts * parts;
        t = red[first];
        for (var q = 1u; q < parts; q++) {
            t += red[first + q];
        }
    }
    return t;
// #else
    workgroupBarrier();
    red[lid] = v;
    for (var s = TPF / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lane < s) {
            red[lid] += red[lid + s];
        }
    }
    workgroupBarrier();
    return red[lid - lane];
// #endif
}

// The sum of v over the whole workgroup, on every thread (the RMSNorm's sums of squares).
fn workgroup_sum(v: vec4<f32>, lid: u32, sg_lane: u32, sg_id: u32) -> vec4<f32> {
// #if SUBGROUP
    let t = subgroupAdd(v);
    workgroupBarrier();
    if (sg_lane == 0u) {
        red[sg_id] = t;
    }
    workgroupBarrier();
    var total = red[0];
    for (var q = 1u; q < WG / SG; q++) {
        total += red[q];
    }
    return total;
// #else
    workgroupBarrier();
    red[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red[lid] += red[lid + s];
        }
    }
    workgroupBarrier();
    return red[0];
// #endif
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
// #if SUBGROUP
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
// #endif
) {
// #if SUBGROUP
    // Threads in subgroup order: a slot is TPF lanes of one subgroup or TPF / SG whole ones (the
    // host checks that the subgroups are full and of size SG).
    let t = sg_id * SG + sg_lane;
// #else
    let t = lid;
    let sg_lane = 0u;
    let sg_id = 0u;
// #endif
    let per_wg = WG / TPF;
    // This thread's FPT features: consecutive, one W row each.
    let f0 = ((wid.x + wid.y * 32768u) * per_wg + t / TPF) * FPT;
    let lane = t % TPF;
    let r0 = wid.z * MAXR;
    let nrows = min(MAXR, P.rows - r0);
    // RMSNorm fused on load: every workgroup sums its rows' squares (k is short next to the
    // weights each workgroup streams), then scales the dot products by 1 / rms at the end.
    var inv = vec4<f32>(1.0);
    if (P.norm != 0u) {
        var sq = vec4<f32>(0.0);
        for (var i = lid; i < P.k4; i += WG) {
            for (var r = 0u; r < nrows; r++) {
                let v = load_x(r0 + r, i);
                sq[r] += dot(v, v);
            }
        }
        inv = inverseSqrt(workgroup_sum(sq, lid, sg_lane, sg_id) / f32(4u * P.k4) + P.eps);
    }
    // acc_j: feature f0 + j, row r0 + r in lane r. Each x vec4 is loaded once for the FPT
    // features. A lane takes W_STEP consecutive vec4s at a time: one whole word of 4-bit codes.
    // Named vectors and written-out loops rather than indexed arrays: a compiler that does not
    // unroll (SwiftShader's Subzero, some mobile drivers) keeps them in registers then.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let steps = P.k4 / W_STEP;
    for (var s = lane; s < steps; s += TPF) {
        // a: the step's first vec4 of rows r0 .. r0 + 3; b: its second (4-bit words).
        let i = s * W_STEP;
        let ns = norm_scale(i);
        let a = mat4x4<f32>(x_row(r0, 0u, nrows, i, ns), x_row(r0, 1u, nrows, i, ns),
                            x_row(r0, 2u, nrows, i, ns), x_row(r0, 3u, nrows, i, ns));
        var b = mat4x4<f32>();
        if (W_STEP > 1u) {
            let nb = norm_scale(i + 1u);
            b = mat4x4<f32>(x_row(r0, 0u, nrows, i + 1u, nb), x_row(r0, 1u, nrows, i + 1u, nb),
                            x_row(r0, 2u, nrows, i + 1u, nb), x_row(r0, 3u, nrows, i + 1u, nb));
        }
        if (f0 < P.n) {
            acc0 = feature_dots(acc0, f0, s, a, b, nrows);
        }
        if (FPT > 1u && f0 + 1u < P.n) {
            acc1 = feature_dots(acc1, f0 + 1u, s, a, b, nrows);
        }
        if (FPT > 2u && f0 + 2u < P.n) {
            acc2 = feature_dots(acc2, f0 + 2u, s, a, b, nrows);
        }
        if (FPT > 3u && f0 + 3u < P.n) {
            acc3 = feature_dots(acc3, f0 + 3u, s, a, b, nrows);
        }
    }
    let acc = array<vec4<f32>, FPT_MAX>(acc0, acc1, acc2, acc3);
    for (var j = 0u; j < FPT; j++) {
        let sum = slot_sum(acc[j], lid, lane, sg_lane, sg_id);
        let f = f0 + j;
        if (f < P.n) {
            // Lane r writes row r; with fewer than MAXR lanes (TPF < 4) a lane writes several.
            let col = P.n0 + f;
            for (var r = lane; r < nrows; r += TPF) {
                let v = sum[r] * inv[r] + bias[col];
                let at = (r0 + r) * P.ldy + col;
                if (P.accumulate != 0u) {
                    y[at] += v;
                } else {
                    y[at] = v;
                }
            }
        }
    }
}

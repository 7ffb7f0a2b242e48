// linear_matmul_coop.wgsl: y[rows, n] = x[rows, k] · W[n, k]ᵀ + bias for prompt chunks on
// cooperative matrices (tensor cores): f16 weights, activations as two f16 parts
// (linear_split_f16.wgsl), f32 accumulators.
//
// Algorithm: a 128-thread workgroup (four subgroups of exactly 32 threads, checked on the host)
// owns a 64 x 128 tile of y; each subgroup owns 32 rows by 64 features, 2 x 4 products of
// 16 x 16 matrices for each part of x, and walks k 16 at a time. Fragments load straight from
// the buffers (x's parts row-major, W's rows as the columns of a k x n matrix): no workgroup
// staging and no barrier in the loop, so a subgroup waits on its own loads only and the
// scheduler hides them behind the other subgroups (a first version that staged x and W through
// workgroup memory ran at 11-13 TFLOP/s on an H100, below the FMA matmul).
// Precision: the hi and lo parts of x have their own accumulators; the epilogue joins them as
// (c_hi + c_lo / 2^11) * 2^-s (see linear_split_f16.wgsl), through workgroup memory, in scalar
// f32 arithmetic. Each row's sums are over k in the same order whatever rows share the tile, so a
// row's outputs do not depend on the batch.
// Bindings (group 0): 0 uniform LinearParams; 1 xs, linear_split_f16.wgsl's output; 2 W [n, k]
//   f16, k a multiple of 16 (checked on the host); 3 bias [all features] f32; 4 y [rows, ldy]
//   f32, written (or added to, with accumulate) at columns n0 .. n0 + n.
// W fragments past n read zero rows: on devices with tensor cores the host pads each f16 weight
// buffer to a whole number of 128-row tiles (robust buffer access does not cover cooperative
// loads), and those columns of y are never stored.
// Workgroup memory (`scr`) passes values between invocations across `workgroupBarrier`s only.
// Dispatch: (ceil(n / 128), ceil(rows / 64), 1). Needs `enable f16;` and the cooperative-matrix
// extension, both added by the host with the prelude.

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
@group(0) @binding(1) var<storage, read> xs: array<f16>;
@group(0) @binding(2) var<storage, read> w: array<f16>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Per subgroup: one fragment of each accumulator set at a time, for the epilogue; the first 256
// words are zeros at the start, to load the accumulators from.
var<workgroup> scr: array<f32, 2048>;

// Stores the fragment pair in `scr[base ..]` (the hi sums, then the lo sums; rows m, features f)
// to y.
fn store_fragment(base: u32, lane: u32, m: u32, f: u32, exp_at: u32) {
    for (var e = lane; e < 256u; e += 32u) {
        let r = m + e / 16u;
        let j = f + e % 16u;
        if (r < P.rows && j < P.n) {
            // ldexp, not exp2: exact whatever the device's exp2.
            let v = ldexp(scr[base + e] + scr[base + 256u + e] * (1.0 / LO_SCALE), i32(xs[exp_at + r]))
                + bias[P.n0 + j];
            let at = r * P.ldy + P.n0 + j;
            if (P.accumulate != 0u) {
                y[at] += v;
            } else {
                y[at] = v;
            }
        }
    }
}

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    for (var t = lid; t < 256u; t += 128u) {
        scr[t] = 0.0;
    }
    workgroupBarrier();
    let zero = coopLoadT<coop_mat16x16<f32, C>>(&scr[0], 16u);
    var c00 = zero;
    var c01 = zero;
    var c02 = zero;
    var c03 = zero;
    var c10 = zero;
    var c11 = zero;
    var c12 = zero;
    var c13 = zero;
    var d00 = zero;
    var d01 = zero;
    var d02 = zero;
    var d03 = zero;
    var d10 = zero;
    var d11 = zero;
    var d12 = zero;
    var d13 = zero;
    workgroupBarrier();
    let m0 = wid.y * 64u + (sg / 2u) * 32u;
    let f0 = wid.x * 128u + (sg % 2u) * 64u;
    let ld = 4u * P.k4;
    let rows_p = (P.rows + ROW_PAD - 1u) / ROW_PAD * ROW_PAD;
    let lo_at = rows_p * ld;
    let a0 = m0 * ld;
    let a1 = (m0 + 16u) * ld;
    let b0 = f0 * ld;
    for (var k = 0u; k < ld; k += 16u) {
        let ah0 = coopLoadT<coop_mat16x16<f16, A>>(&xs[a0 + k], ld);
        let ah1 = coopLoadT<coop_mat16x16<f16, A>>(&xs[a1 + k], ld);
        let al0 = coopLoadT<coop_mat16x16<f16, A>>(&xs[lo_at + a0 + k], ld);
        let al1 = coopLoadT<coop_mat16x16<f16, A>>(&xs[lo_at + a1 + k], ld);
        let w0 = coopLoad<coop_mat16x16<f16, B>>(&w[b0 + k], ld);
        let w1 = coopLoad<coop_mat16x16<f16, B>>(&w[b0 + 16u * ld + k], ld);
        let w2 = coopLoad<coop_mat16x16<f16, B>>(&w[b0 + 32u * ld + k], ld);
        let w3 = coopLoad<coop_mat16x16<f16, B>>(&w[b0 + 48u * ld + k], ld);
        c00 = coopMultiplyAdd(ah0, w0, c00);
        c01 = coopMultiplyAdd(ah0, w1, c01);
        c02 = coopMultiplyAdd(ah0, w2, c02);
        c03 = coopMultiplyAdd(ah0, w3, c03);
        c10 = coopMultiplyAdd(ah1, w0, c10);
        c11 = coopMultiplyAdd(ah1, w1, c11);
        c12 = coopMultiplyAdd(ah1, w2, c12);
        c13 = coopMultiplyAdd(ah1, w3, c13);
        d00 = coopMultiplyAdd(al0, w0, d00);
        d01 = coopMultiplyAdd(al0, w1, d01);
        d02 = coopMultiplyAdd(al0, w2, d02);
        d03 = coopMultiplyAdd(al0, w3, d03);
        d10 = coopMultiplyAdd(al1, w0, d10);
        d11 = coopMultiplyAdd(al1, w1, d11);
        d12 = coopMultiplyAdd(al1, w2, d12);
        d13 = coopMultiplyAdd(al1, w3, d13);
    }
    // Epilogue: each subgroup passes its fragments through its own 512 words of `scr`.
    let base = sg * 512u;
    let exp_at = 2u * lo_at;
    coopStoreT(c00, &scr[base], 16u);
    coopStoreT(d00, &scr[base + 256u], 16u);
    workgroupBarrier();
    store_fragment(base, lane, m0, f0, exp_at);
    workgroupBarrier();
    coopStoreT(c01, &scr[base], 16u);
    coopStoreT(d01, &scr[base + 256u], 16u);
    workgroupBarrier();
    store_fragment(base, lane, m0, f0 + 16u, exp_at);
    workgroupBarrier();
    coopStoreT(c02, &scr[base], 16u);
    coopStoreT(d02, &scr[base + 256u], 16u);
    workgroupBarrier();
    store_fragment(base, lane, m0, f0 + 32u, exp_at);
    workgroupBarrier();
    coopStoreT(c03, &scr[base], 16u);
    coopStoreT(d03, &scr[base + 256u], 16u);
    workgroupBarrier();
    store_fragment(base, lane, m0, f0 + 48u, exp_at);
    workgroupBarrier();
    coopStoreT(c10, &scr[base], 16u);
    coopStoreT(d10, &scr[base + 256u], 16u);
    workgroupBarrier();
    store_fragment(base, lane, m0 + 16u, f0, exp_at);
    workgroupBarrier();
    coopStoreT(c11, &scr[base], 16u);
    coopStoreT(d11, &scr[base + 256u], 16u);
    workgroupBarrier();
    store_fragment(base, lane, m0 + 16u, f0 + 16u, exp_at);
    workgroupBarrier();
    coopStoreT(c12, &scr[base], 16u);
    coopStoreT(d12, &scr[base + 256u], 16u);
    workgroupBarrier();
    store_fragment(base, lane, m0 + 16u, f0 + 32u, exp_at);
    workgroupBarrier();
    coopStoreT(c13, &scr[base], 16u);
    coopStoreT(d13, &scr[base + 256u], 16u);
    workgroupBarrier();
    store_fragment(base, lane, m0 + 16u, f0 + 48u, exp_at);
}

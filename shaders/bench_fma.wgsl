// bench_fma.wgsl: the f32 FMA ceiling of `twinfer bench kernels --backend gpu`.
//
// Algorithm: every thread runs ITERS rounds of 8 independent vec4 fused multiply-adds (enough
// independent chains to hide the FMA latency), then writes the sum so nothing is dead code.
// FLOPs per thread: ITERS * 8 chains * 4 lanes * 2.
// Tiling: WG threads (override); ITERS (override).
// Bindings (group 0): 0 seed [1] vec4<f32>; 1 dst [threads] vec4<f32>.
// Dispatch: (workgroups, 1, 1).
// Knobs: overrides WG, ITERS.

override WG: u32 = 256u;
override ITERS: u32 = 4096u;

@group(0) @binding(0) var<storage, read> seed: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = seed[0];
    let c = seed[1];
    var a: array<vec4<f32>, 8>;
    for (var k = 0u; k < 8u; k++) {
        a[k] = b * f32(gid.x + k);
    }
    for (var i = 0u; i < ITERS; i++) {
        a[0] = fma(a[0], b, c);
        a[1] = fma(a[1], b, c);
        a[2] = fma(a[2], b, c);
        a[3] = fma(a[3], b, c);
        a[4] = fma(a[4], b, c);
        a[5] = fma(a[5], b, c);
        a[6] = fma(a[6], b, c);
        a[7] = fma(a[7], b, c);
    }
    dst[gid.x] = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

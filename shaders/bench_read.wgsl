// bench_read.wgsl: the read-bandwidth ceiling of `twinfer bench kernels --backend gpu`.
//
// Algorithm: every thread sums vec4s of the input in a grid-stride loop (consecutive threads read
// consecutive vec4s, so each pass over the grid streams one contiguous span) and writes its sum,
// so that the reads cannot be optimised away.
// Tiling: WG threads per workgroup (override); the grid covers a fixed number of workgroups.
// Bindings (group 0): 0 src [n] vec4<f32>; 1 dst [threads] vec4<f32>.
// Dispatch: (workgroups, 1, 1).
// Knobs: override WG.

override WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let threads = nwg.x * WG;
    let n = arrayLength(&src);
    var acc = vec4<f32>(0.0);
    for (var i = gid.x; i < n; i += threads) {
        acc += src[i];
    }
    dst[gid.x] = acc;
}

// argmax_rows.wgsl: ids[r] = argmax(logits[r, :]), greedy sampling on the device, so that a step
// whose rows are all greedy reads back one u32 per row instead of a vocabulary of f32 logits.
//
// The pick equals the host's `argmax`: the largest value, the lowest index on ties, NaN never
// wins over a number (a row of NaN only gives its last index). NaN is tested on the bits: WGSL
// lets a compiler assume that `v != v` is false.
// Algorithm: one workgroup per row. Each thread scans a strided share of the row keeping its best
// (value, index); a tree in workgroup memory combines the WG candidates with the same rule, which
// is associative and commutative, so the result does not depend on WG or the share.
// Tiling: WG threads per row (1024 where the adapter allows: one row is a whole vocabulary and
// a decode step of one sequence has one row), the row walked in steps of 4 WG with the four
// loads issued before any is compared, so a thread keeps four reads in flight.
// Bindings (group 0): 0 uniform RowParams (rows, width; eps and gather unused); 1 logits
//   [rows, width] f32; 2 ids [rows] u32.
// Dispatch: (min(rows, 32768), ceil(rows / 32768), 1).
// Knobs: override WG (a power of two, at most WG_MAX).

override WG: u32 = 256u;
const WG_MAX: u32 = 1024u;

// Mirrored by `RowParams` in crates/twinfer/src/gpu/params.rs.
struct RowParams {
    rows: u32,
    width: u32,
    eps: f32,
    gather: u32,
}

@group(0) @binding(0) var<uniform> P: RowParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;

var<workgroup> best_v: array<f32, WG_MAX>;
var<workgroup> best_i: array<u32, WG_MAX>;

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// A thread that saw no element holds index EMPTY, which every candidate beats. (Not a NaN
// constant: a constant expression that evaluates to NaN is a WGSL error in browsers.)
const EMPTY: u32 = 0xffffffffu;

// Whether candidate (v, i) beats (bv, bi) under the host's rule.
fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    if (i == EMPTY) {
        return false;
    }
    if (bi == EMPTY) {
        return true;
    }
    let vn = is_nan(v);
    let bn = is_nan(bv);
    if (vn || bn) {
        // A number beats NaN; between two NaN the later index, as the host's scan ends there.
        return (bn && !vn) || (vn && bn && i > bi);
    }
    return v > bv || (v == bv && i < bi);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x + wid.y * 32768u;
    if (r >= P.rows) {
        return;
    }
    let base = r * P.width;
    var bv = 0.0;
    var bi = EMPTY;
    var i = lid;
    for (; i + 3u * WG < P.width; i += 4u * WG) {
        let v0 = logits[base + i];
        let v1 = logits[base + i + WG];
        let v2 = logits[base + i + 2u * WG];
        let v3 = logits[base + i + 3u * WG];
        if (beats(v0, i, bv, bi)) {
            bv = v0;
            bi = i;
        }
        if (beats(v1, i + WG, bv, bi)) {
            bv = v1;
            bi = i + WG;
        }
        if (beats(v2, i + 2u * WG, bv, bi)) {
            bv = v2;
            bi = i + 2u * WG;
        }
        if (beats(v3, i + 3u * WG, bv, bi)) {
            bv = v3;
            bi = i + 3u * WG;
        }
    }
    for (; i < P.width; i += WG) {
        let v = logits[base + i];
        if (beats(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s && beats(best_v[lid + s], best_i[lid + s], best_v[lid], best_i[lid])) {
            best_v[lid] = best_v[lid + s];
            best_i[lid] = best_i[lid + s];
        }
    }
    if (lid == 0u) {
        ids[r] = best_i[0];
    }
}

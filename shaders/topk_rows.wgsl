// topk_rows.wgsl: the k largest logits of each row with their token ids, so that a step whose
// rows sample with top-k reads back k (id, logit) pairs per row instead of a vocabulary of logits;
// the host then samples from them exactly as from the whole row.
//
// Order: larger logit first, the lower id on ties (the host sampler's order); NaN below every
// number, as argmax_rows.wgsl treats it, so a NaN is a candidate only in a row with fewer than k
// numbers. Logits compare through a u32 key that orders like the floats (negative values
// bit-inverted, positive ones with the sign bit set), so the selection is exact integer work.
// Algorithm: one workgroup per row. A radix select finds the k-th largest key in four rounds of
// 8 bits: each round counts, in a 256-bin histogram in workgroup memory, the keys that share the
// bits chosen so far, and picks the digit where the count from the top reaches k. Then one pass
// in index order writes the keys above the k-th largest, and the first keys equal to it (lowest
// ids) until k are written; a workgroup prefix sum per block of WG elements keeps index order.
// Output slots: [0, k - e) the larger keys (in index order), [k - e, k) the e equal ones.
// Tiling: WG threads per row (a power of two, at most WG_MAX); five passes over the row.
// Bindings (group 0): 0 uniform TopkParams (rows, width, k); 1 logits [rows, width] f32;
//   2 out [rows, k] vec2<u32> (id, logit bits).
// Dispatch: (min(rows, 32768), ceil(rows / 32768), 1). k <= width (the host checks).
// Knobs: override WG.

override WG: u32 = 256u;
const WG_MAX: u32 = 1024u;

// Mirrored by `TopkParams` in crates/twinfer/src/gpu/params.rs.
struct TopkParams {
    rows: u32,
    width: u32,
    k: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> P: TopkParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec2<u32>>;

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> pick: vec2<u32>;                 // (digit, keys still needed) of a round
var<workgroup> scan: array<u32, WG_MAX>;        // per thread: larger keys | equal keys << 16

fn key(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    // NaN is tested on the bits: WGSL lets a compiler assume that `v != v` is false.
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return 0u;
    }
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x + wid.y * 32768u;
    if (r >= P.rows) {
        return;
    }
    let base = r * P.width;
    let k = P.k;

    // Radix select of the k-th largest key, 8 bits a round from the top.
    var prefix = 0u;
    var needed = k;
    for (var round = 0u; round < 4u; round++) {
        let shift = 24u - 8u * round;
        // The bits above this round's digit, chosen by the earlier rounds (none in round 0).
        let high = select(0xffffffffu << (shift + 8u), 0u, round == 0u);
        for (var d = lid; d < 256u; d += WG) {
            atomicStore(&hist[d], 0u);
        }
        workgroupBarrier();
        for (var i = lid; i < P.width; i += WG) {
            let kk = key(logits[base + i]);
            if ((kk & high) == prefix) {
                atomicAdd(&hist[(kk >> shift) & 0xffu], 1u);
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            var above = 0u;
            var d = 255u;
            loop {
                let h = atomicLoad(&hist[d]);
                if (above + h >= needed || d == 0u) {
                    pick = vec2<u32>(d, needed - above);
                    break;
                }
                above += h;
                d -= 1u;
            }
        }
        workgroupBarrier();
        let p = pick;
        prefix |= p.x << shift;
        needed = p.y;
        // Everyone has read `pick` before the next round's thread 0 writes it.
        workgroupBarrier();
    }
    let kth = prefix;
    let equal_wanted = needed;
    let first_equal_slot = k - equal_wanted;

    // Collect in index order: keys above the k-th, then the lowest ids of those equal to it.
    var above_seen = 0u;
    var equal_seen = 0u;
    for (var block = 0u; block < P.width; block += WG) {
        let i = block + lid;
        var kk = 0u;
        if (i < P.width) {
            kk = key(logits[base + i]);
        }
        let is_above = i < P.width && kk > kth;
        let is_equal = i < P.width && kk == kth;
        let mine = u32(is_above) | (u32(is_equal) << 16u);
        scan[lid] = mine;
        workgroupBarrier();
        // Inclusive prefix sum (Hillis-Steele); both counters fit 16 bits (WG <= 1024).
        for (var s = 1u; s < WG; s <<= 1u) {
            var add = 0u;
            if (lid >= s) {
                add = scan[lid - s];
            }
            workgroupBarrier();
            scan[lid] += add;
            workgroupBarrier();
        }
        let before = scan[lid] - mine;
        let total = scan[WG - 1u];
        if (is_above) {
            let slot = above_seen + (before & 0xffffu);
            out[r * k + slot] = vec2<u32>(i, bitcast<u32>(logits[base + i]));
        }
        if (is_equal) {
            let e = equal_seen + (before >> 16u);
            if (e < equal_wanted) {
                out[r * k + first_equal_slot + e] = vec2<u32>(i, bitcast<u32>(logits[base + i]));
            }
        }
        above_seen += total & 0xffffu;
        equal_seen += total >> 16u;
        // Everyone has read `scan` before the next block overwrites it.
        workgroupBarrier();
    }
}

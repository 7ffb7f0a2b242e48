// decode_attention_paged.wgsl: batch decode (one query token per sequence) over the paged KV pool.
//
// Algorithm: flash-decoding. A workgroup owns (sequence, KV head, block of up to GMAX query heads
// of that KV head's group, chunk of keys). It walks the chunk through the CSR page table in tiles
// of WG keys: the tile's page ids are resolved to row offsets in workgroup memory first; thread t then reads key t
// once and scores it against every query head of the block (so a KV head's pages are read once for
// its query group); the block's (m, d) states are updated with two workgroup reductions per head
// (max, then sum); finally each thread accumulates p * V for its (head, vec4 column) pairs; when
// the block has fewer pairs than threads, the keys are dealt to several key groups whose sums
// are folded at the end. Loads are unrolled by 8 so that each thread has several in flight.
// With several chunks (split-K, for small batches) each workgroup writes a partial (o, lse) row
// that merge_state.wgsl combines; with one chunk the partial row is the final row. A pool split
// into several buffers (each within the binding limit) runs one pass per buffer, each seeing only
// its own pages, and their partial rows are merged the same way.
//
// Tiling: WG keys per tile (override, power of two, 64..=256); head_dim <= 256; GMAX = 8.
// Bindings (group 0): 0 uniform AttnParams; 1 q [batch, Hq, D] f32; 2 k, 3 v: pool
//   [pages, page_size, Hk, D] as kv4; 4 tbl u32 (kv_indptr[batch+1] at 0, page ids at
//   off_indices, last_page_len at off_last_len, ALiBi bits at off_alibi); 5 o
//   [batch * num_chunks, Hq, D] f32; 6 lse [batch * num_chunks, Hq] f32.
// Dispatch: (num_chunks, Hk * ceil(group / GMAX), batch).
// Knobs: override WG; variant SUBGROUP (reductions with subgroupMax/Add, any subgroup size);
//   kv4 = vec4<f32> or vec4<f16> (SHADER_F16) from the prelude.

override WG: u32 = 64u;
const WG_MAX: u32 = 256u;
const GMAX: u32 = 8u;
const DV_MAX: u32 = 64u;
// Accumulator pairs per thread: GMAX * DV_MAX / smallest WG (64).
const NACC: u32 = 8u;

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<kv4>;
@group(0) @binding(3) var<storage, read> v: array<kv4>;
@group(0) @binding(4) var<storage, read> tbl: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

var<workgroup> q_sh: array<vec4<f32>, 512>;    // [GMAX, DV_MAX]
var<workgroup> p_sh: array<f32, 2048>;         // [GMAX, WG_MAX] scores, then probabilities
var<workgroup> red_sh: array<f32, 2048>;       // [GMAX, WG_MAX] reduction scratch
var<workgroup> comb_sh: array<vec4<f32>, 128>;  // a key group's partial values
var<workgroup> pg_sh: array<u32, WG_MAX>;      // row offset (kv4 units) of each key of the tile

// Reduces vals[g] over the workgroup, max (is_max) or sum, for every g < GMAX; every thread gets
// the results. Called in uniform control flow.
// #if SUBGROUP
fn wg_reduce(vals: array<f32, GMAX>, is_max: bool, lid: u32, sg_lane: u32, sg_id: u32, n_sg: u32) -> array<f32, GMAX> {
    for (var g = 0u; g < GMAX; g++) {
        var r: f32;
        if (is_max) { r = subgroupMax(vals[g]); } else { r = subgroupAdd(vals[g]); }
        if (sg_lane == 0u) { red_sh[g * WG_MAX + sg_id] = r; }
    }
    workgroupBarrier();
    var out: array<f32, GMAX>;
    for (var g = 0u; g < GMAX; g++) {
        var acc = red_sh[g * WG_MAX];
        for (var i = 1u; i < n_sg; i++) {
            let x = red_sh[g * WG_MAX + i];
            if (is_max) { acc = max(acc, x); } else { acc += x; }
        }
        out[g] = acc;
    }
    workgroupBarrier();
    return out;
}
// #else
fn wg_reduce(vals: array<f32, GMAX>, is_max: bool, lid: u32) -> array<f32, GMAX> {
    for (var g = 0u; g < GMAX; g++) { red_sh[g * WG_MAX + lid] = vals[g]; }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var g = 0u; g < GMAX; g++) {
                let a = red_sh[g * WG_MAX + lid];
                let b = red_sh[g * WG_MAX + lid + s];
                red_sh[g * WG_MAX + lid] = select(a + b, max(a, b), is_max);
            }
        }
        workgroupBarrier();
    }
    var out: array<f32, GMAX>;
    for (var g = 0u; g < GMAX; g++) { out[g] = red_sh[g * WG_MAX]; }
    workgroupBarrier();
    return out;
}
// #endif

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
// #if SUBGROUP
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
// #endif
) {
    let chunk = wid.x;
    let b = wid.z;
    let n_gblk = (P.group + GMAX - 1u) / GMAX;
    let h = wid.y / n_gblk;
    let g0 = (wid.y % n_gblk) * GMAX;
    let gn = min(GMAX, P.group - g0);
    let dv = P.head_dim / 4u;
    let hk = P.num_kv_heads;
    let ps = P.page_size;

    let page0 = tbl[b];
    let n_pages = tbl[b + 1u] - page0;
    var kv_len = 0;
    if (n_pages > 0u) {
        kv_len = i32((n_pages - 1u) * ps + tbl[P.off_last_len + b]);
    }
    let pos = kv_len - 1;
    let vis = visible_range(P, pos, kv_len);
    let c_lo = i32(chunk * P.chunk_len);
    let start = max(vis.x, c_lo);
    let end = min(vis.y, c_lo + i32(P.chunk_len));

    // Stage the block's query rows.
    for (var i = lid; i < gn * dv; i += WG) {
        let g = i / dv;
        let qo_head = h * P.group + g0 + g;
        q_sh[g * DV_MAX + i % dv] = q[(b * P.num_qo_heads + qo_head) * dv + i % dv];
    }
    var slope: array<f32, GMAX>;
    var m: array<f32, GMAX>;
    var d: array<f32, GMAX>;
    for (var g = 0u; g < GMAX; g++) {
        slope[g] = 0.0;
        if (P.has_alibi != 0u && g < gn) {
            slope[g] = bitcast<f32>(tbl[P.off_alibi + h * P.group + g0 + g]);
        }
        m[g] = -BIG;
        d[g] = 0.0;
    }
    var acc: array<vec4<f32>, NACC>;
    for (var a = 0u; a < NACC; a++) { acc[a] = vec4<f32>(0.0); }
    // The value pass splits the keys among R groups of `lanes` threads when the block has fewer
    // (head, column) pairs than threads, so that every thread has loads in flight; with R > 1 a
    // thread owns one pair (np <= WG / 2 <= 128).
    let np = gn * dv;
    let R = max(1u, WG / np);
    let lanes = WG / R;
    let grp = lid / lanes;
    let lane = lid % lanes;
    workgroupBarrier();

    for (var t0 = start; t0 < end; t0 += i32(WG)) {
        let j = t0 + i32(lid);
        var valid = j < end;
        var row = 0u;
        if (valid) {
            // The key's row offset, so that the value pass does no division. Keys whose page
            // lives in another buffer of a split pool are another pass's: they read row 0 with
            // weight 0.
            let page = tbl[P.off_indices + page0 + u32(j) / ps];
            valid = page / P.pages_per_buffer == P.kv_buffer;
            row = select(0u, (((page % P.pages_per_buffer) * ps + u32(j) % ps) * hk + h) * dv, valid);
        }
        pg_sh[lid] = row;
        workgroupBarrier();
        // Scores: key j against every head of the block, each K vec4 read once.
        var s: array<f32, GMAX>;
        for (var g = 0u; g < GMAX; g++) { s[g] = 0.0; }
        if (valid) {
            let base = row;
            // Eight loads issued before they are used: a thread's reads are otherwise one
            // memory latency each, which is what bounds this loop on a GPU.
            var c = 0u;
            for (; c + 8u <= dv; c += 8u) {
                let k0 = vec4<f32>(k[base + c]);
                let k1 = vec4<f32>(k[base + c + 1u]);
                let k2 = vec4<f32>(k[base + c + 2u]);
                let k3 = vec4<f32>(k[base + c + 3u]);
                let k4 = vec4<f32>(k[base + c + 4u]);
                let k5 = vec4<f32>(k[base + c + 5u]);
                let k6 = vec4<f32>(k[base + c + 6u]);
                let k7 = vec4<f32>(k[base + c + 7u]);
                for (var g = 0u; g < GMAX; g++) {
                    let qb = g * DV_MAX + c;
                    s[g] += dot(q_sh[qb], k0) + dot(q_sh[qb + 1u], k1) + dot(q_sh[qb + 2u], k2) + dot(q_sh[qb + 3u], k3)
                        + dot(q_sh[qb + 4u], k4) + dot(q_sh[qb + 5u], k5) + dot(q_sh[qb + 6u], k6)
                        + dot(q_sh[qb + 7u], k7);
                }
            }
            for (; c < dv; c++) {
                let kc = vec4<f32>(k[base + c]);
                for (var g = 0u; g < GMAX; g++) {
                    s[g] += dot(q_sh[g * DV_MAX + c], kc);
                }
            }
        }
        for (var g = 0u; g < GMAX; g++) {
            s[g] = select(-BIG, transform_score(P, s[g], slope[g], j, pos), valid && g < gn);
        }
// #if SUBGROUP
        let m_tile = wg_reduce(s, true, lid, sg_lane, sg_id, n_sg);
// #else
        let m_tile = wg_reduce(s, true, lid);
// #endif
        var pr: array<f32, GMAX>;
        var scale: array<f32, GMAX>;
        for (var g = 0u; g < GMAX; g++) {
            let m_new = max(m[g], m_tile[g]);
            scale[g] = rescale(m[g], m_new);
            m[g] = m_new;
            pr[g] = select(0.0, exp(s[g] - m_new), valid);
            p_sh[g * WG_MAX + lid] = pr[g];
        }
// #if SUBGROUP
        let sum_tile = wg_reduce(pr, false, lid, sg_lane, sg_id, n_sg);
// #else
        let sum_tile = wg_reduce(pr, false, lid);
// #endif
        for (var g = 0u; g < GMAX; g++) { d[g] = d[g] * scale[g] + sum_tile[g]; }
        // Values: this thread's (head, column) pairs, over its key group's keys of the tile.
        let n = u32(min(i32(WG), end - t0));
        for (var a = 0u; a < NACC; a++) {
            let pi = lane + a * lanes;
            if (grp < R && pi < np) {
                let g = pi / dv;
                let c = pi % dv;
                var sum = acc[a] * scale[g];
                let pb = g * WG_MAX;
                var jj = grp;
                // Eight independent loads in flight per thread (see the score loop).
                for (; jj + 7u * R < n; jj += 8u * R) {
                    let v0 = vec4<f32>(v[pg_sh[jj] + c]);
                    let v1 = vec4<f32>(v[pg_sh[jj + R] + c]);
                    let v2 = vec4<f32>(v[pg_sh[jj + 2u * R] + c]);
                    let v3 = vec4<f32>(v[pg_sh[jj + 3u * R] + c]);
                    let v4 = vec4<f32>(v[pg_sh[jj + 4u * R] + c]);
                    let v5 = vec4<f32>(v[pg_sh[jj + 5u * R] + c]);
                    let v6 = vec4<f32>(v[pg_sh[jj + 6u * R] + c]);
                    let v7 = vec4<f32>(v[pg_sh[jj + 7u * R] + c]);
                    sum += p_sh[pb + jj] * v0 + p_sh[pb + jj + R] * v1 + p_sh[pb + jj + 2u * R] * v2
                        + p_sh[pb + jj + 3u * R] * v3 + p_sh[pb + jj + 4u * R] * v4
                        + p_sh[pb + jj + 5u * R] * v5 + p_sh[pb + jj + 6u * R] * v6
                        + p_sh[pb + jj + 7u * R] * v7;
                }
                for (; jj < n; jj += R) {
                    sum += p_sh[pb + jj] * vec4<f32>(v[pg_sh[jj] + c]);
                }
                acc[a] = sum;
            }
        }
        workgroupBarrier();
    }

    // Fold the key groups into group 0 (they share every rescaling, so plain sums combine).
    for (var r = 1u; r < R; r++) {
        if (grp == r && lane < np) {
            comb_sh[lane] = acc[0];
        }
        workgroupBarrier();
        if (grp == 0u && lane < np) {
            acc[0] += comb_sh[lane];
        }
        workgroupBarrier();
    }

    // Partial rows are (sequence, buffer pass, chunk); one buffer and one chunk is the final row.
    let out_chunk = b * P.num_chunks + P.kv_buffer * nwg.x + chunk;
    let out_row0 = out_chunk * P.num_qo_heads + h * P.group + g0;
    for (var a = 0u; a < NACC; a++) {
        let pi = lane + a * lanes;
        if (grp == 0u && pi < np) {
            let g = pi / dv;
            let inv = select(0.0, 1.0 / d[g], d[g] > 0.0);
            o[(out_row0 + g) * dv + pi % dv] = acc[a] * inv;
        }
    }
    if (lid < gn) {
        lse[out_row0 + lid] = finish_lse(m[lid], d[lid]);
    }
}

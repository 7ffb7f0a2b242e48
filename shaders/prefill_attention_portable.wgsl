// prefill_attention_portable.wgsl: ragged batch prefill against ragged contiguous KV or the paged
// pool, in the simplest form: one score per thread, online softmax one thread per row, 16 KiB of
// workgroup memory. prefill_attention.wgsl (register-tiled) is the fast one; this one runs where
// that does not: SwiftShader's WebGPU in browsers loses the device on the register-tiled kernel.
//
// Algorithm: FlashAttention-2 style. A workgroup owns BR query rows of one sequence and one KV
// head, where rows run over (token, query head of the group), so the whole GQA group shares each
// K/V tile. It walks only the keys some row of the tile can see (causal and window tiles that are
// fully masked are never visited), BC keys at a time: the tile's page ids are staged in workgroup
// memory, K is staged, the BR x BC scores are computed (masked entries dropped), one thread per
// row updates the row's online-softmax state (m, d), then V is staged over K's storage and each
// thread accumulates p * V for its (row, vec4 column) pairs.
//
// Tiling: BR rows (override, <= 32), BC keys (override, BC * (head_dim / 4 + 1) <= 1024, BC <= 64),
//   WG threads (override, >= BR, BR * head_dim / 4 <= 16 * WG).
// Bindings (group 0): 0 uniform AttnParams; 1 q [tokens, Hq, D] f32; 2 k, 3 v: ragged
//   [kv_tokens, Hk, D] or pool [pages, page_size, Hk, D] as kv4 (or int8 codes after the rows' scales, Q8); 4 tbl u32 (kv_indptr[batch+1]
//   at 0 in tokens (ragged) or pages (paged), page ids at off_indices, last_page_len at
//   off_last_len, qo_indptr at off_qo_indptr, ALiBi bits at off_alibi, work list at off_work);
//   5 o [tokens, Hq, D] f32; 6 lse [tokens, Hq] f32.
// Dispatch: (Hk, num_work, 1); work item i is (sequence, first row) at tbl[off_work + 2i], longest
//   first, so that the heads of one item run together and the last wave holds the short items.
// Knobs: overrides WG, BR, BC; kv4 = vec4<f32> or vec4<f16> (SHADER_F16) from the prelude.

override WG: u32 = 128u;
override BR: u32 = 32u;
override BC: u32 = 32u;
const BR_MAX: u32 = 32u;
const BC_MAX: u32 = 64u;
const KV_SH: u32 = 1024u;
const NACC: u32 = 16u;

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<kv4>;
@group(0) @binding(3) var<storage, read> v: array<kv4>;
@group(0) @binding(4) var<storage, read> tbl: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

var<workgroup> kv_sh: array<vec4<f32>, KV_SH>;   // [BC, D/4 + 1]: K, then V
var<workgroup> s_sh: array<f32, 2048>;           // [BR_MAX, BC_MAX]: scores, then probabilities
var<workgroup> pg_sh: array<u32, BC_MAX>;        // row index of each key of the tile
var<workgroup> scale_sh: array<f32, BR_MAX>;

// kv_row, k_at and v_at (the paged or ragged K/V rows, float or int8) come from prefill_kv.wgsl.

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = tbl[P.off_work + 2u * wid.y];
    let row0 = tbl[P.off_work + 2u * wid.y + 1u];
    let h = wid.x;
    let G = P.group;
    let dv = P.head_dim / 4u;
    // Tile rows are padded by one vec4 so that threads reading different keys' rows at the same
    // column hit different banks.
    let ks = dv + 1u;
    let q_start = tbl[P.off_qo_indptr + b];
    let qo_len = i32(tbl[P.off_qo_indptr + b + 1u] - q_start);
    let kv_base = tbl[b];
    var kv_len: i32;
    if (P.paged != 0u) {
        let n_pages = tbl[b + 1u] - kv_base;
        kv_len = select(0, i32((n_pages - 1u) * P.page_size + tbl[P.off_last_len + b]), n_pages > 0u);
    } else {
        kv_len = i32(tbl[b + 1u] - kv_base);
    }
    let rows = min(BR, u32(qo_len) * G - row0);

    // Keys any row of the tile sees: rows are in token order, and the visible range is monotone.
    let first_pos = i32(row0 / G) + kv_len - qo_len;
    let last_pos = i32((row0 + rows - 1u) / G) + kv_len - qo_len;
    let lo = visible_range(P, first_pos, kv_len).x;
    let hi = visible_range(P, last_pos, kv_len).y;

    // Per-row state lives with thread r < rows: (m, d) and the row's visible range and slope.
    var m = -BIG;
    var d = 0.0;
    var my_vis = vec2<i32>(0, 0);
    var my_slope = 0.0;
    var my_pos = 0;
    if (lid < rows) {
        my_pos = i32((row0 + lid) / G) + kv_len - qo_len;
        my_vis = visible_range(P, my_pos, kv_len);
        if (P.has_alibi != 0u) {
            my_slope = bitcast<f32>(tbl[P.off_alibi + h * G + (row0 + lid) % G]);
        }
    }
    var acc: array<vec4<f32>, NACC>;
    for (var a = 0u; a < NACC; a++) { acc[a] = vec4<f32>(0.0); }

    for (var t0 = lo; t0 < hi; t0 += i32(BC)) {
        let n = u32(min(i32(BC), hi - t0));
        if (lid < n) {
            pg_sh[lid] = kv_row(b, u32(t0) + lid, h, dv, kv_base);
        }
        workgroupBarrier();
        for (var i = lid; i < n * dv; i += WG) {
            kv_sh[(i / dv) * ks + i % dv] = k_at(pg_sh[i / dv], i % dv);
        }
        workgroupBarrier();
        // Scores of every (row, key) pair of the tile.
        for (var i = lid; i < rows * BC; i += WG) {
            let r = i / BC;
            let jj = i % BC;
            if (jj < n) {
                let rr = row0 + r;
                let qo_head = h * G + rr % G;
                let qbase = ((q_start + rr / G) * P.num_qo_heads + qo_head) * dv;
                var dot_qk = 0.0;
                // Two q loads in flight (head_dim is a multiple of 8, so dv is even).
                for (var c = 0u; c < dv; c += 2u) {
                    let q0 = q[qbase + c];
                    let q1 = q[qbase + c + 1u];
                    dot_qk += dot(q0, kv_sh[jj * ks + c]) + dot(q1, kv_sh[jj * ks + c + 1u]);
                }
                s_sh[r * BC_MAX + jj] = dot_qk;
            }
        }
        workgroupBarrier();
        // One thread per row: mask, transform, online-softmax update; scores become probabilities.
        if (lid < rows) {
            var m_tile = -BIG;
            for (var jj = 0u; jj < n; jj++) {
                let j = t0 + i32(jj);
                if (j >= my_vis.x && j < my_vis.y) {
                    let s = transform_score(P, s_sh[lid * BC_MAX + jj], my_slope, j, my_pos);
                    s_sh[lid * BC_MAX + jj] = s;
                    m_tile = max(m_tile, s);
                }
            }
            let m_new = max(m, m_tile);
            let scale = rescale(m, m_new);
            var sum = 0.0;
            for (var jj = 0u; jj < n; jj++) {
                let j = t0 + i32(jj);
                var p = 0.0;
                if (j >= my_vis.x && j < my_vis.y) {
                    p = exp(s_sh[lid * BC_MAX + jj] - m_new);
                }
                s_sh[lid * BC_MAX + jj] = p;
                sum += p;
            }
            d = d * scale + sum;
            m = m_new;
            scale_sh[lid] = scale;
        }
        for (var i = lid; i < n * dv; i += WG) {
            kv_sh[(i / dv) * ks + i % dv] = v_at(pg_sh[i / dv], i % dv);
        }
        workgroupBarrier();
        for (var a = 0u; a < NACC; a++) {
            let pi = lid + a * WG;
            if (pi < rows * dv) {
                let r = pi / dv;
                let c = pi % dv;
                var sum = acc[a] * scale_sh[r];
                for (var jj = 0u; jj < n; jj++) {
                    sum += s_sh[r * BC_MAX + jj] * kv_sh[jj * ks + c];
                }
                acc[a] = sum;
            }
        }
        workgroupBarrier();
    }

    // Row states travel to the threads that own the row's columns.
    if (lid < rows) {
        scale_sh[lid] = select(0.0, 1.0 / d, d > 0.0);
    }
    workgroupBarrier();
    for (var a = 0u; a < NACC; a++) {
        let pi = lid + a * WG;
        if (pi < rows * dv) {
            let rr = row0 + pi / dv;
            let out_row = (q_start + rr / G) * P.num_qo_heads + h * G + rr % G;
            o[out_row * dv + pi % dv] = acc[a] * scale_sh[pi / dv];
        }
    }
    if (lid < rows) {
        let rr = row0 + lid;
        lse[(q_start + rr / G) * P.num_qo_heads + h * G + rr % G] = finish_lse(m, d);
    }
}

// prefill_attention.wgsl: ragged batch prefill against ragged contiguous KV or the paged pool.
//
// Algorithm: FlashAttention-2 style with register tiling. A workgroup owns BR = 32 query rows of
// one sequence and one KV head, where rows run over (token, query head of the group), so the whole
// GQA group shares each K/V tile. It walks only the keys some row of the tile can see (causal and
// window tiles that are fully masked are never visited), BC = 64 keys at a time. Thread
// (ty, tx) = (lid / 16, lid % 16) owns rows 4ty..4ty+3: of the score block it owns keys
// 4tx..4tx+3 (a 4 x 4 register tile), of O the 8-column units tx and tx + 16 (4 x 16 registers).
// Scores: Q and K are staged transposed in chunks of DK = 32 head-dim columns (f32 in workgroup
// memory, K widened from f16), and each thread does 16 FMAs per two vec4 loads. Softmax: the
// row maxima are reduced across the 16 threads of a row through workgroup memory; each thread
// keeps its part of the row sum, rescaled with the row, and those parts are summed once at the
// end. P goes to workgroup memory transposed; V is staged in row chunks of VK keys and each
// thread does 32 FMAs (one column unit) per three vec4 loads.
//
// Tiling: WG = 128 threads, BR = 32 rows, BC = 64 keys, DK = 32; head_dim a multiple of 8, <= 256.
//   Workgroup memory: 27.3 KiB. Per-thread state lives in vectors and matrices indexed by
//   constants only (rows and keys unrolled by hand): a private array indexed in a loop can end up
//   in local memory, which costs more than the arithmetic.
// Bindings (group 0): 0 uniform AttnParams; 1 q [tokens, Hq, D] f32; 2 k, 3 v: ragged
//   [kv_tokens, Hk, D] or pool [pages, page_size, Hk, D] as kv4; 4 tbl u32 (kv_indptr[batch+1]
//   at 0 in tokens (ragged) or pages (paged), page ids at off_indices, last_page_len at
//   off_last_len, qo_indptr at off_qo_indptr, ALiBi bits at off_alibi, work list at off_work);
//   5 o [tokens, Hq, D] f32; 6 lse [tokens, Hq] f32.
// Dispatch: (num_work, Hk, 1); work item i is (sequence, first row) at tbl[off_work + 2i].
// Knobs: override WG (must be 128: the thread mapping above); kv4 = vec4<f32> or vec4<f16>
//   (SHADER_F16) from the prelude.

override WG: u32 = 128u;
const BR: u32 = 32u;
const BC: u32 = 64u;
const DK: u32 = 32u;
const STAGE: u32 = 1024u;   // vec4s of the staging area
const K_OFF: u32 = 256u;    // K^T chunk after Q^T's [DK, BR / 4] vec4s
const PSV: u32 = 9u;        // vec4s per key row of p_sh: BR / 4 + 1 (padding against conflicts)

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<kv4>;
@group(0) @binding(3) var<storage, read> v: array<kv4>;
@group(0) @binding(4) var<storage, read> tbl: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

// Q^T [DK, BR] and K^T [DK, BC] chunks, then V rows [VK, D]: never live at the same time.
var<workgroup> stage_sh: array<vec4<f32>, STAGE>;
var<workgroup> p_sh: array<vec4<f32>, 576>;      // [BC, PSV]: probabilities, 4 rows per vec4
var<workgroup> red_sh: array<vec4<f32>, 128>;    // [16 tx, BR / 4]: row maxima, then row sums
var<workgroup> pg_sh: array<u32, BC>;            // row (kv4 units) of each key of the tile

// Flat row (in kv4 units) of key j of sequence b, for KV head h.
fn kv_row(b: u32, j: u32, h: u32, dv: u32, kv_base: u32) -> u32 {
    if (P.paged != 0u) {
        let page = tbl[P.off_indices + kv_base + j / P.page_size];
        return ((page * P.page_size + j % P.page_size) * P.num_kv_heads + h) * dv;
    }
    return ((kv_base + j) * P.num_kv_heads + h) * dv;
}

// A score of key jk (tile column jj) for a row that sees [lo, hi), or -BIG when masked.
fn mask1(x: f32, jj: u32, n: u32, jk: i32, lo: i32, hi: i32, slope: f32, pos: i32) -> f32 {
    if (jj < n && jk >= lo && jk < hi) {
        return transform_score(P, x, slope, jk, pos);
    }
    return -BIG;
}

fn mask_row(x: vec4<f32>, jj: u32, n: u32, jk: i32, lo: i32, hi: i32, slope: f32, pos: i32) -> vec4<f32> {
    return vec4<f32>(mask1(x.x, jj, n, jk, lo, hi, slope, pos), mask1(x.y, jj + 1u, n, jk + 1, lo, hi, slope, pos),
                     mask1(x.z, jj + 2u, n, jk + 2, lo, hi, slope, pos), mask1(x.w, jj + 3u, n, jk + 3, lo, hi, slope, pos));
}

fn max4(x: vec4<f32>) -> f32 {
    return max(max(x.x, x.y), max(x.z, x.w));
}

fn probs(x: vec4<f32>, m: f32) -> vec4<f32> {
    return select(vec4<f32>(0.0), exp(x - vec4<f32>(m)), x > vec4<f32>(-BIG));
}

fn sum4(x: vec4<f32>) -> f32 {
    return (x.x + x.y) + (x.z + x.w);
}

// Query row r of the tile: visible keys, position, slope; rows past the tile see nothing.
struct RowInfo {
    lo: i32,
    hi: i32,
    pos: i32,
    slope: f32,
}

fn row_info(r: u32, rows: u32, row0: u32, G: u32, h: u32, kv_len: i32, qo_len: i32) -> RowInfo {
    let rr = row0 + r;
    var out = RowInfo(0, 0, i32(rr / G) + kv_len - qo_len, 0.0);
    if (r < rows) {
        let vis = visible_range(P, out.pos, kv_len);
        out.lo = vis.x;
        out.hi = vis.y;
        if (P.has_alibi != 0u) {
            out.slope = bitcast<f32>(tbl[P.off_alibi + h * G + rr % G]);
        }
    }
    return out;
}

fn write_row(r: u32, rows: u32, acc: mat4x4<f32>, m: f32, d: f32, row0: u32, G: u32, h: u32, q_start: u32,
             tx: u32, nu: u32) {
    if (r >= rows) {
        return;
    }
    let dv = P.head_dim / 4u;
    let rr = row0 + r;
    let out_row = (q_start + rr / G) * P.num_qo_heads + h * G + rr % G;
    let inv = select(0.0, 1.0 / d, d > 0.0);
    if (tx < nu) {
        o[out_row * dv + 2u * tx] = acc[0] * inv;
        o[out_row * dv + 2u * tx + 1u] = acc[1] * inv;
    }
    if (tx + 16u < nu) {
        o[out_row * dv + 2u * tx + 32u] = acc[2] * inv;
        o[out_row * dv + 2u * tx + 33u] = acc[3] * inv;
    }
    if (tx == 0u) {
        lse[out_row] = finish_lse(m, d);
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = tbl[P.off_work + 2u * wid.x];
    let row0 = tbl[P.off_work + 2u * wid.x + 1u];
    let h = wid.y;
    let G = P.group;
    let D = P.head_dim;
    let dv = D / 4u;
    let nu = D / 8u;      // 8-column units of a row
    let tx = lid % 16u;
    let ty = lid / 16u;
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

    // This thread's four rows; (m, d) per row, d over this thread's keys only.
    let ri0 = row_info(4u * ty, rows, row0, G, h, kv_len, qo_len);
    let ri1 = row_info(4u * ty + 1u, rows, row0, G, h, kv_len, qo_len);
    let ri2 = row_info(4u * ty + 2u, rows, row0, G, h, kv_len, qo_len);
    let ri3 = row_info(4u * ty + 3u, rows, row0, G, h, kv_len, qo_len);
    var m = vec4<f32>(-BIG);
    var dpart = vec4<f32>(0.0);
    // O of row i: columns (unit tx: lo, hi; unit tx + 16: lo, hi).
    var or0 = mat4x4<f32>();
    var or1 = mat4x4<f32>();
    var or2 = mat4x4<f32>();
    var or3 = mat4x4<f32>();
    // Rows of V staged per round, so that [VK, D] fits the staging area.
    let vk = min(BC, 4u * STAGE / D);
    let u0 = tx < nu;
    let u1 = tx + 16u < nu;

    for (var t0 = lo; t0 < hi; t0 += i32(BC)) {
        let n = u32(min(i32(BC), hi - t0));
        if (lid < n) {
            pg_sh[lid] = kv_row(b, u32(t0) + lid, h, dv, kv_base);
        }
        workgroupBarrier();

        // Scores: s_i holds row 4ty+i against keys 4tx..4tx+3.
        var s0 = vec4<f32>(0.0);
        var s1 = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        var s3 = vec4<f32>(0.0);
        for (var d0 = 0u; d0 < D; d0 += DK) {
            // Q^T chunk: thread reads 4 columns of one row, stores them down the column; rows
            // are consecutive across threads, so the stores hit distinct banks.
            for (var idx = lid; idx < BR * DK / 4u; idx += WG) {
                let r = idx % BR;
                let c4 = idx / BR;
                var x = vec4<f32>(0.0);
                if (r < rows && d0 + 4u * c4 < D) {
                    let rr = row0 + r;
                    x = q[((q_start + rr / G) * P.num_qo_heads + h * G + rr % G) * dv + d0 / 4u + c4];
                }
                let at = 4u * c4 * (BR / 4u) + r / 4u;
                stage_sh[at][r % 4u] = x.x;
                stage_sh[at + BR / 4u][r % 4u] = x.y;
                stage_sh[at + 2u * (BR / 4u)][r % 4u] = x.z;
                stage_sh[at + 3u * (BR / 4u)][r % 4u] = x.w;
            }
            for (var idx = lid; idx < BC * DK / 4u; idx += WG) {
                let jj = idx % BC;
                let c4 = idx / BC;
                var x = vec4<f32>(0.0);
                if (jj < n && d0 + 4u * c4 < D) {
                    x = vec4<f32>(k[pg_sh[jj] + d0 / 4u + c4]);
                }
                let at = K_OFF + 4u * c4 * (BC / 4u) + jj / 4u;
                stage_sh[at][jj % 4u] = x.x;
                stage_sh[at + BC / 4u][jj % 4u] = x.y;
                stage_sh[at + 2u * (BC / 4u)][jj % 4u] = x.z;
                stage_sh[at + 3u * (BC / 4u)][jj % 4u] = x.w;
            }
            workgroupBarrier();
            for (var dd = 0u; dd < DK; dd++) {
                let a = stage_sh[dd * (BR / 4u) + ty];
                let kk = stage_sh[K_OFF + dd * (BC / 4u) + tx];
                s0 += a.x * kk;
                s1 += a.y * kk;
                s2 += a.z * kk;
                s3 += a.w * kk;
            }
            workgroupBarrier();
        }

        // Mask and transform; row maxima across the row's 16 threads.
        let jj0 = 4u * tx;
        let jk0 = t0 + i32(jj0);
        s0 = mask_row(s0, jj0, n, jk0, ri0.lo, ri0.hi, ri0.slope, ri0.pos);
        s1 = mask_row(s1, jj0, n, jk0, ri1.lo, ri1.hi, ri1.slope, ri1.pos);
        s2 = mask_row(s2, jj0, n, jk0, ri2.lo, ri2.hi, ri2.slope, ri2.pos);
        s3 = mask_row(s3, jj0, n, jk0, ri3.lo, ri3.hi, ri3.slope, ri3.pos);
        red_sh[tx * (BR / 4u) + ty] = vec4<f32>(max4(s0), max4(s1), max4(s2), max4(s3));
        workgroupBarrier();
        var mt = red_sh[ty];
        for (var t = 1u; t < 16u; t++) {
            mt = max(mt, red_sh[t * (BR / 4u) + ty]);
        }
        let m_new = max(m, mt);
        let scale = exp(m - m_new);
        m = m_new;
        let p0 = probs(s0, m_new.x);
        let p1 = probs(s1, m_new.y);
        let p2 = probs(s2, m_new.z);
        let p3 = probs(s3, m_new.w);
        dpart = dpart * scale + vec4<f32>(sum4(p0), sum4(p1), sum4(p2), sum4(p3));
        or0 *= scale.x;
        or1 *= scale.y;
        or2 *= scale.z;
        or3 *= scale.w;
        // P transposed: key 4tx+j holds rows 4ty..4ty+3 in one vec4.
        p_sh[jj0 * PSV + ty] = vec4<f32>(p0.x, p1.x, p2.x, p3.x);
        p_sh[(jj0 + 1u) * PSV + ty] = vec4<f32>(p0.y, p1.y, p2.y, p3.y);
        p_sh[(jj0 + 2u) * PSV + ty] = vec4<f32>(p0.z, p1.z, p2.z, p3.z);
        p_sh[(jj0 + 3u) * PSV + ty] = vec4<f32>(p0.w, p1.w, p2.w, p3.w);

        // Values: rounds of vk keys staged as rows; thread accumulates its units.
        for (var kc = 0u; kc < n; kc += vk) {
            let nk = min(vk, n - kc);
            for (var idx = lid; idx < nk * dv; idx += WG) {
                let kk = idx / dv;
                let c4 = idx % dv;
                stage_sh[idx] = vec4<f32>(v[pg_sh[kc + kk] + c4]);
            }
            workgroupBarrier();
            for (var kk = 0u; kk < nk; kk++) {
                let p4 = p_sh[(kc + kk) * PSV + ty];
                if (u0) {
                    let va = stage_sh[kk * dv + 2u * tx];
                    let vb = stage_sh[kk * dv + 2u * tx + 1u];
                    or0[0] += p4.x * va;
                    or0[1] += p4.x * vb;
                    or1[0] += p4.y * va;
                    or1[1] += p4.y * vb;
                    or2[0] += p4.z * va;
                    or2[1] += p4.z * vb;
                    or3[0] += p4.w * va;
                    or3[1] += p4.w * vb;
                }
                if (u1) {
                    let va = stage_sh[kk * dv + 2u * tx + 32u];
                    let vb = stage_sh[kk * dv + 2u * tx + 33u];
                    or0[2] += p4.x * va;
                    or0[3] += p4.x * vb;
                    or1[2] += p4.y * va;
                    or1[3] += p4.y * vb;
                    or2[2] += p4.z * va;
                    or2[3] += p4.z * vb;
                    or3[2] += p4.w * va;
                    or3[3] += p4.w * vb;
                }
            }
            workgroupBarrier();
        }
    }

    // Row sums from the 16 threads of each row, then the output.
    red_sh[tx * (BR / 4u) + ty] = dpart;
    workgroupBarrier();
    var dt = red_sh[ty];
    for (var t = 1u; t < 16u; t++) {
        dt += red_sh[t * (BR / 4u) + ty];
    }
    write_row(4u * ty, rows, or0, m.x, dt.x, row0, G, h, q_start, tx, nu);
    write_row(4u * ty + 1u, rows, or1, m.y, dt.y, row0, G, h, q_start, tx, nu);
    write_row(4u * ty + 2u, rows, or2, m.z, dt.z, row0, G, h, q_start, tx, nu);
    write_row(4u * ty + 3u, rows, or3, m.w, dt.w, row0, G, h, q_start, tx, nu);
}

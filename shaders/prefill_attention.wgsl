// prefill_attention.wgsl: ragged batch prefill against ragged contiguous KV or the paged pool.
//
// Algorithm: FlashAttention-2 style with register tiling. A workgroup owns BR = 64 query rows of
// one sequence and one KV head, where rows run over (token, query head of the group), so the whole
// GQA group shares each K/V tile. It walks only the keys some row of the tile can see (causal and
// window tiles that are fully masked are never visited), BC = 64 keys at a time. Thread
// (ty, tx) = (lid / 16, lid % 16) owns rows 4ty..4ty+3: of the score block it owns keys
// 4tx..4tx+3 (a 4 x 4 register tile), of O the vec4 columns tx + 16g (g < 2, or < 4 when WIDE).
// Scores: Q (pre-scaled by sm_scale * log2(e): scores are in log2 units and the softmax uses
// exp2, the hardware's exponential) and K are staged transposed in chunks of DK head-dim
// columns, f32 in workgroup memory, double-buffered: the next chunk's global loads are in flight
// while the current chunk is multiplied, one barrier per chunk, and each thread does 16 FMAs per
// two vec4 loads. Tiles that every row sees whole skip the mask. Softmax: row maxima are reduced
// across the 16 threads of a row (workgroup memory, or shuffles: SUBGROUP); each thread keeps its part of the row
// sum, rescaled with the row, and the parts are summed once at the end. P goes to workgroup memory
// transposed (four rows per vec4, slots swizzled by key quad so that the stores do not collide);
// V is staged in rounds of VK = min(BC, STAGE / (head_dim / 4)) keys, a multiple of 4 (at most
// STAGE / WG vec4s per thread, the next round loaded into registers while the current one is
// multiplied), and read in quads of keys; each thread does 4 FMAs per vec4 of V per row quad. Row facts (visible keys, position, slope) are
// recomputed in the tiles that need them instead of living in registers through the loop.
//
// Tiling: WG = 256 threads, BR = 64 rows, BC = 64 keys, DK = 16 or 32; head_dim a multiple of 8,
//   <= 256. Workgroup memory: 32 KiB with DK = 16, 48 KiB with DK = 32 (the staging area, 16 or
//   32 KiB, holds the two Q/K chunk buffers, then the row maxima, then V; P takes 16 KiB). The
//   wider chunks halve the barriers of the score loop and, at head_dim 128, stage all 64 keys of V
//   in one round. Per-thread state lives in named vectors and matrices indexed by constants only:
//   a private array indexed in a loop can end up in local memory, which costs more than the
//   arithmetic.
// Bindings (group 0): 0 uniform AttnParams; 1 q [tokens, Hq, D] f32; 2 k, 3 v: ragged
//   [kv_tokens, Hk, D] or pool [pages, page_size, Hk, D] as kv4 (or int8 codes after the rows' scales, Q8); 4 tbl u32 (kv_indptr[batch+1]
//   at 0 in tokens (ragged) or pages (paged), page ids at off_indices, last_page_len at
//   off_last_len, qo_indptr at off_qo_indptr, ALiBi bits at off_alibi, work list at off_work);
//   5 o [tokens, Hq, D] f32; 6 lse [tokens, Hq] f32.
// Dispatch: (Hk, num_work, 1); work item i is (sequence, first row) at tbl[off_work + 2i], longest
//   first, so that the heads of one item run together and the last wave holds the short items.
// Variant SUBGROUP: the row maxima are reduced with subgroupShuffleXor; with subgroups of 16
//   lanes or more that replaces workgroup memory and two barriers per tile, with narrower ones
//   (8 on lavapipe, 4 on SwiftShader) workgroup memory joins the subgroups' parts. Assumes, as
//   the decode kernel does, that lanes follow local_invocation_index.
// Knobs: override DK (16 or 32; the host picks 32 where the adapter allows 48 KiB of workgroup
//   memory); WG (must be 256: the thread mapping above); WIDE (head_dim > 128: four column
//   groups per thread, otherwise two, so narrow heads do not carry dead accumulators);
//   kv4 = vec4<f32> or vec4<f16> (SHADER_F16) from the prelude.

override WG: u32 = 256u;
override WIDE: bool = false;
const BR: u32 = 64u;
const BC: u32 = 64u;
override DK: u32 = 16u;             // head-dim columns per Q/K chunk: 16, or 32 (48 KiB)
override STAGE: u32 = DK * 64u;     // vec4s of the staging area: two chunk buffers
override CHUNK: u32 = DK * 32u;     // vec4s of one Q^T [DK, BR / 4] + K^T [DK, BC / 4] buffer
override K_OFF: u32 = DK * 16u;     // K^T after Q^T within a chunk buffer
override TWO: bool = DK > 16u;      // each thread stages two vec4 columns per chunk, eight of V

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<kv4>;
@group(0) @binding(3) var<storage, read> v: array<kv4>;
@group(0) @binding(4) var<storage, read> tbl: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

// Two Q^T/K^T chunk buffers, then row maxima [16 tx, 16 row quads], then V rows [VK, D].
var<workgroup> stage: array<vec4<f32>, STAGE>;
// P^T: key j's four-row vec4 for row quad r at j * 16 + (r ^ (j / 4)).
var<workgroup> ps: array<vec4<f32>, 1024>;

// kv_row, k_at and v_at (the paged or ragged K/V rows, float or int8) come from prefill_kv.wgsl.

// Key sr of the tile at t0: its row, and its chunk 0 columns sc (and sc + 4 with TWO) in
// `first` and `second` (zeros past the end).
fn load_k_first(t0: i32, hi: i32, b: u32, h: u32, dv: u32, kv_base: u32, sr: u32, sc: u32,
                first: ptr<function, vec4<f32>>, second: ptr<function, vec4<f32>>) -> u32 {
    *first = vec4<f32>(0.0);
    *second = vec4<f32>(0.0);
    if (i32(sr) >= hi - t0) {
        return 0u;
    }
    let row = kv_row(b, u32(t0) + sr, h, dv, kv_base);
    if (sc < dv) {
        *first = k_at(row, sc);
    }
    if (TWO && sc + 4u < dv) {
        *second = k_at(row, sc + 4u);
    }
    return row;
}

// Stores one staged vec4 column (4 head-dim columns of row or key sr) transposed at `at`.
fn put_column(at: u32, sr: u32, x: vec4<f32>) {
    stage[at][sr % 4u] = x.x;
    stage[at + 16u][sr % 4u] = x.y;
    stage[at + 32u][sr % 4u] = x.z;
    stage[at + 48u][sr % 4u] = x.w;
}

// Element lid + i * WG (vec4 units) of a round of V rows starting at key key0, or zeros past
// `fill`. `vs` is (lid / dv, lid % dv, WG / dv), with WG / dv = 0 where dv does not divide WG:
// then the element's key and column take a division (by a value the compiler does not know).
fn load_v(i: u32, lid: u32, vs: vec3<u32>, fill: u32, key0: u32, b: u32, h: u32, dv: u32, kv_base: u32) -> vec4<f32> {
    let idx = lid + i * WG;
    if (idx >= fill) {
        return vec4<f32>(0.0);
    }
    var key = vs.x + i * vs.z;
    var col = vs.y;
    if (vs.z == 0u) {
        key = idx / dv;
        col = idx % dv;
    }
    return v_at(kv_row(b, key0 + key, h, dv, kv_base), col);
}

// Soft-cap and ALiBi of four pre-scaled scores (log2 units) of one row against keys jk .. jk + 3.
fn post(x: vec4<f32>, slope: f32, jk: i32, pos: i32) -> vec4<f32> {
    var s = x;
    if (P.soft_cap > 0.0) {
        let cap = P.soft_cap * LOG2E;
        s = cap * tanh(s / cap);
    }
    return s + (slope * LOG2E) * vec4<f32>(vec4<i32>(jk, jk + 1, jk + 2, jk + 3) - vec4<i32>(pos));
}

// `post`, with keys outside [lo, hi) or past the tile's n keys set to -BIG.
fn masked(x: vec4<f32>, jj: u32, n: u32, jk: i32, ri: RowInfo) -> vec4<f32> {
    let keys = vec4<i32>(jk, jk + 1, jk + 2, jk + 3);
    let cols = vec4<u32>(jj, jj + 1u, jj + 2u, jj + 3u);
    let seen = (cols < vec4<u32>(n)) & (keys >= vec4<i32>(ri.lo)) & (keys < vec4<i32>(ri.hi));
    return select(vec4<f32>(-BIG), post(x, ri.slope, jk, ri.pos), seen);
}

fn max4(x: vec4<f32>) -> f32 {
    return max(max(x.x, x.y), max(x.z, x.w));
}

fn probs(x: vec4<f32>, m: f32) -> vec4<f32> {
    return select(vec4<f32>(0.0), exp2(x - vec4<f32>(m)), x > vec4<f32>(-BIG));
}

fn sum4(x: vec4<f32>) -> f32 {
    return (x.x + x.y) + (x.z + x.w);
}

// O of one thread, one matrix per column group g (vec4 columns tx + 16g): column r of the
// matrix is row 4ty + r.
fn mac(g: mat4x4<f32>, p: vec4<f32>, v: vec4<f32>) -> mat4x4<f32> {
    return g + mat4x4<f32>(p.x * v, p.y * v, p.z * v, p.w * v);
}

fn scale_rows(g: mat4x4<f32>, s: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(g[0] * s.x, g[1] * s.y, g[2] * s.z, g[3] * s.w);
}

fn write_row(r: u32, rows: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, e: vec4<f32>, m: f32, d: f32, row0: u32,
             G: u32, h: u32, q_start: u32, tx: u32) {
    if (r >= rows) {
        return;
    }
    let dv = P.head_dim / 4u;
    let rr = row0 + r;
    let base = ((q_start + rr / G) * P.num_qo_heads + h * G + rr % G) * dv;
    let inv = select(0.0, 1.0 / d, d > 0.0);
    if (tx < dv) {
        o[base + tx] = a * inv;
    }
    if (tx + 16u < dv) {
        o[base + tx + 16u] = b * inv;
    }
    if (WIDE) {
        if (tx + 32u < dv) {
            o[base + tx + 32u] = c * inv;
        }
        if (tx + 48u < dv) {
            o[base + tx + 48u] = e * inv;
        }
    }
    if (tx == 0u) {
        lse[base / dv] = finish_lse(m * LN2, d);
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
// #if SUBGROUP
    @builtin(subgroup_size) sg_size: u32,
// #endif
) {
// #if SUBGROUP
    let shuffle_only = sg_size >= 16u;
// #else
    let shuffle_only = false;
// #endif
    let b = tbl[P.off_work + 2u * wid.y];
    let row0 = tbl[P.off_work + 2u * wid.y + 1u];
    let h = wid.x;
    let G = P.group;
    let D = P.head_dim;
    let dv = D / 4u;
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
    // Keys every row sees: tiles inside [lo_all, hi_all) need no mask.
    let lo_all = visible_range(P, last_pos, kv_len).x;
    let hi_all = select(visible_range(P, first_pos, kv_len).y, 0, rows < BR);

    var m = vec4<f32>(-BIG);
    var dpart = vec4<f32>(0.0);
    var ga = mat4x4<f32>();
    var gb = mat4x4<f32>();
    var gc = mat4x4<f32>();
    var gd = mat4x4<f32>();

    // Staging roles: thread lid stages row / key (lid % 64) and vec4 column (lid / 64) of each
    // chunk, so that its transposed stores hit consecutive words.
    let sr = lid % 64u;
    let sc = lid / 64u;
    let q_ok = sr < rows;
    let q_row = ((q_start + (row0 + sr) / G) * P.num_qo_heads + h * G + (row0 + sr) % G) * dv;
    let n_chunks = (D + DK - 1u) / DK;
    let vk = min(BC, STAGE / dv) / 4u * 4u;
    // Scores live in log2 units (exp2 is the hardware's exponential): Q carries log2(e).
    let q_scale = P.sm_scale * LOG2E;
    let vs = vec3<u32>(lid / dv, lid % dv, select(0u, WG / dv, WG % dv == 0u));
    // Which of this thread's column groups exist at this head dim.
    let has_a = tx < dv;
    let has_b = tx + 16u < dv;
    let has_c = tx + 32u < dv;
    let has_d = tx + 48u < dv;

    // Chunk 0 of Q is the same for every tile; chunk 0 of K is loaded a tile ahead.
    var q_first = vec4<f32>(0.0);
    var q_first2 = vec4<f32>(0.0);
    if (q_ok && sc < dv) {
        q_first = q[q_row + sc] * q_scale;
    }
    if (TWO && q_ok && sc + 4u < dv) {
        q_first2 = q[q_row + sc + 4u] * q_scale;
    }
    var next_row = 0u;
    var next_k = vec4<f32>(0.0);
    var next_k2 = vec4<f32>(0.0);
    if (lo < hi) {
        next_row = load_k_first(lo, hi, b, h, dv, kv_base, sr, sc, &next_k, &next_k2);
    }

    for (var t0 = lo; t0 < hi; t0 += i32(BC)) {
        let n = u32(min(i32(BC), hi - t0));
        let k_ok = sr < n;
        let k_row = next_row;

        // Scores: s_i holds row 4ty+i against keys 4tx..4tx+3.
        var s0 = vec4<f32>(0.0);
        var s1 = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        var s3 = vec4<f32>(0.0);
        var qx = q_first;
        var kx = next_k;
        var qx2 = q_first2;
        var kx2 = next_k2;
        for (var c = 0u; c < n_chunks; c++) {
            let buf = (c % 2u) * CHUNK;
            // Q^T: column dd of row r at word dd * BR + r, i.e. vec4 dd * 16 + r / 4, lane r % 4
            // (BR = BC = 64: a column is 16 vec4s).
            let qa = buf + 64u * sc + sr / 4u;
            put_column(qa, sr, qx);
            put_column(qa + K_OFF, sr, kx);
            if (TWO) {
                put_column(qa + 256u, sr, qx2);
                put_column(qa + 256u + K_OFF, sr, kx2);
            }
            workgroupBarrier();
            // The next chunk's loads fly while this one is multiplied.
            let col = (c + 1u) * (DK / 4u) + sc;
            qx = vec4<f32>(0.0);
            kx = vec4<f32>(0.0);
            qx2 = vec4<f32>(0.0);
            kx2 = vec4<f32>(0.0);
            if (c + 1u < n_chunks && col < dv) {
                if (q_ok) {
                    qx = q[q_row + col] * q_scale;
                }
                if (k_ok) {
                    kx = k_at(k_row, col);
                }
            }
            if (TWO && c + 1u < n_chunks && col + 4u < dv) {
                if (q_ok) {
                    qx2 = q[q_row + col + 4u] * q_scale;
                }
                if (k_ok) {
                    kx2 = k_at(k_row, col + 4u);
                }
            }
            for (var dd = 0u; dd < DK; dd++) {
                let a = stage[buf + dd * (BR / 4u) + ty];
                let kk = stage[buf + K_OFF + dd * (BC / 4u) + tx];
                s0 += a.x * kk;
                s1 += a.y * kk;
                s2 += a.z * kk;
                s3 += a.w * kk;
            }
        }
        // Every thread is done with the chunk buffers before they hold the row maxima or V.
        workgroupBarrier();

        let jj0 = 4u * tx;
        let jk0 = t0 + i32(jj0);
        // Row facts are recomputed where a tile needs them rather than kept in registers
        // through the loop: interior tiles without soft-cap or ALiBi need none.
        let interior = t0 >= lo_all && t0 + i32(BC) <= hi_all;
        if (!interior || P.soft_cap > 0.0 || P.has_alibi != 0u) {
            let ri0 = row_info(4u * ty, rows, row0, G, h, kv_len, qo_len);
            let ri1 = row_info(4u * ty + 1u, rows, row0, G, h, kv_len, qo_len);
            let ri2 = row_info(4u * ty + 2u, rows, row0, G, h, kv_len, qo_len);
            let ri3 = row_info(4u * ty + 3u, rows, row0, G, h, kv_len, qo_len);
            if (interior) {
                s0 = post(s0, ri0.slope, jk0, ri0.pos);
                s1 = post(s1, ri1.slope, jk0, ri1.pos);
                s2 = post(s2, ri2.slope, jk0, ri2.pos);
                s3 = post(s3, ri3.slope, jk0, ri3.pos);
            } else {
                s0 = masked(s0, jj0, n, jk0, ri0);
                s1 = masked(s1, jj0, n, jk0, ri1);
                s2 = masked(s2, jj0, n, jk0, ri2);
                s3 = masked(s3, jj0, n, jk0, ri3);
            }
        }
        var mt = vec4<f32>(max4(s0), max4(s1), max4(s2), max4(s3));
// #if SUBGROUP
        // A row quad's 16 threads are 16 aligned lanes: shuffles reduce within the subgroup, and
        // workgroup memory joins the parts where subgroups are narrower than 16 lanes.
        for (var off = 1u; off < min(sg_size, 16u); off *= 2u) {
            mt = max(mt, subgroupShuffleXor(mt, off));
        }
        if (!shuffle_only) {
            stage[tx * 16u + ty] = mt;
            workgroupBarrier();
            for (var t = 0u; t < 16u; t += sg_size) {
                mt = max(mt, stage[t * 16u + ty]);
            }
        }
// #else
        stage[tx * 16u + ty] = mt;
        workgroupBarrier();
        mt = stage[ty];
        for (var t = 1u; t < 16u; t++) {
            mt = max(mt, stage[t * 16u + ty]);
        }
// #endif
        let m_new = max(m, mt);
        let scale = exp2(m - m_new);
        m = m_new;
        let p0 = probs(s0, m_new.x);
        let p1 = probs(s1, m_new.y);
        let p2 = probs(s2, m_new.z);
        let p3 = probs(s3, m_new.w);
        dpart = dpart * scale + vec4<f32>(sum4(p0), sum4(p1), sum4(p2), sum4(p3));
        ga = scale_rows(ga, scale);
        gb = scale_rows(gb, scale);
        if (WIDE) {
            gc = scale_rows(gc, scale);
            gd = scale_rows(gd, scale);
        }
        let slot = (ty ^ tx);
        ps[jj0 * 16u + slot] = vec4<f32>(p0.x, p1.x, p2.x, p3.x);
        ps[(jj0 + 1u) * 16u + slot] = vec4<f32>(p0.y, p1.y, p2.y, p3.y);
        ps[(jj0 + 2u) * 16u + slot] = vec4<f32>(p0.z, p1.z, p2.z, p3.z);
        ps[(jj0 + 3u) * 16u + slot] = vec4<f32>(p0.w, p1.w, p2.w, p3.w);

        // The first round of V.
        let fill0 = min(vk, n) * dv;
        var vr0 = load_v(0u, lid, vs, fill0, u32(t0), b, h, dv, kv_base);
        var vr1 = load_v(1u, lid, vs, fill0, u32(t0), b, h, dv, kv_base);
        var vr2 = load_v(2u, lid, vs, fill0, u32(t0), b, h, dv, kv_base);
        var vr3 = load_v(3u, lid, vs, fill0, u32(t0), b, h, dv, kv_base);
        var vr4 = vec4<f32>(0.0);
        var vr5 = vec4<f32>(0.0);
        var vr6 = vec4<f32>(0.0);
        var vr7 = vec4<f32>(0.0);
        if (TWO) {
            vr4 = load_v(4u, lid, vs, fill0, u32(t0), b, h, dv, kv_base);
            vr5 = load_v(5u, lid, vs, fill0, u32(t0), b, h, dv, kv_base);
            vr6 = load_v(6u, lid, vs, fill0, u32(t0), b, h, dv, kv_base);
            vr7 = load_v(7u, lid, vs, fill0, u32(t0), b, h, dv, kv_base);
        }
        // Values: rounds of vk keys staged as rows; thread accumulates its column groups.
        for (var kc = 0u; kc < n; kc += vk) {
            let nk = min(vk, n - kc);
            // Every thread is done with the row maxima (first round, baseline) or the previous
            // round's V before V overwrites them.
            if (kc > 0u || !shuffle_only) {
                workgroupBarrier();
            }
            // Stored up to a whole quad of keys: the loads past nk * dv are zeros.
            let fill = (nk + 3u) / 4u * 4u * dv;
            stage[lid] = vr0;
            if (lid + WG < fill) {
                stage[lid + WG] = vr1;
            }
            if (lid + 2u * WG < fill) {
                stage[lid + 2u * WG] = vr2;
            }
            if (lid + 3u * WG < fill) {
                stage[lid + 3u * WG] = vr3;
            }
            if (TWO) {
                if (lid + 4u * WG < fill) {
                    stage[lid + 4u * WG] = vr4;
                }
                if (lid + 5u * WG < fill) {
                    stage[lid + 5u * WG] = vr5;
                }
                if (lid + 6u * WG < fill) {
                    stage[lid + 6u * WG] = vr6;
                }
                if (lid + 7u * WG < fill) {
                    stage[lid + 7u * WG] = vr7;
                }
            }
            workgroupBarrier();
            // The next round's loads (or the next tile's first K chunk) fly while this one is
            // multiplied.
            if (kc + vk >= n && t0 + i32(BC) < hi) {
                next_row = load_k_first(t0 + i32(BC), hi, b, h, dv, kv_base, sr, sc, &next_k, &next_k2);
            }
            if (kc + vk < n) {
                let next = min(vk, n - kc - vk) * dv;
                let key0 = u32(t0) + kc + vk;
                vr0 = load_v(0u, lid, vs, next, key0, b, h, dv, kv_base);
                vr1 = load_v(1u, lid, vs, next, key0, b, h, dv, kv_base);
                vr2 = load_v(2u, lid, vs, next, key0, b, h, dv, kv_base);
                vr3 = load_v(3u, lid, vs, next, key0, b, h, dv, kv_base);
                if (TWO) {
                    vr4 = load_v(4u, lid, vs, next, key0, b, h, dv, kv_base);
                    vr5 = load_v(5u, lid, vs, next, key0, b, h, dv, kv_base);
                    vr6 = load_v(6u, lid, vs, next, key0, b, h, dv, kv_base);
                    vr7 = load_v(7u, lid, vs, next, key0, b, h, dv, kv_base);
                }
            }
            // Keys in fours: a quad's P slots share one swizzle, and rows past nk are zeros.
            for (var kq = 0u; kq < nk; kq += 4u) {
                let slot = ty ^ ((kc + kq) / 4u);
                for (var u = 0u; u < 4u; u++) {
                    let p4 = ps[(kc + kq + u) * 16u + slot];
                    let row = (kq + u) * dv + tx;
                    if (has_a) {
                        ga = mac(ga, p4, stage[row]);
                    }
                    if (has_b) {
                        gb = mac(gb, p4, stage[row + 16u]);
                    }
                    if (WIDE && has_c) {
                        gc = mac(gc, p4, stage[row + 32u]);
                    }
                    if (WIDE && has_d) {
                        gd = mac(gd, p4, stage[row + 48u]);
                    }
                }
            }
        }
        // The last round's V is read before the next tile's chunks overwrite it.
        workgroupBarrier();
    }

    // Row sums from the 16 threads of each row, then the output.
    stage[tx * 16u + ty] = dpart;
    workgroupBarrier();
    var dt = stage[ty];
    for (var t = 1u; t < 16u; t++) {
        dt += stage[t * 16u + ty];
    }
    write_row(4u * ty, rows, ga[0], gb[0], gc[0], gd[0], m.x, dt.x, row0, G, h, q_start, tx);
    write_row(4u * ty + 1u, rows, ga[1], gb[1], gc[1], gd[1], m.y, dt.y, row0, G, h, q_start, tx);
    write_row(4u * ty + 2u, rows, ga[2], gb[2], gc[2], gd[2], m.z, dt.z, row0, G, h, q_start, tx);
    write_row(4u * ty + 3u, rows, ga[3], gb[3], gc[3], gd[3], m.w, dt.w, row0, G, h, q_start, tx);
}

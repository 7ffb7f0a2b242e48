// decode_attention_paged.wgsl: batch decode (one query token per sequence) over the paged KV pool.
//
// Algorithm: flash-decoding with wide coalesced loads. A workgroup owns (sequence, KV head, block
// of GQ query heads of that KV head's group, chunk of keys). Its threads form teams of
// LPK = head_dim / 8 lanes; lane l of a team owns columns [8l, 8l + 8) of a key row, so one team
// reads a whole K (and V) row with one 16-byte load per lane (8 f16 unpacked with
// unpack2x16float, or two loads of 4 f32), and a warp's loads cover whole 128-byte lines. Each
// team takes U = 4 consecutive keys per step and keeps its own online-softmax state (m, d, o)
// for its keys. K and V of a step are loaded together (V does not wait for the scores) and one
// step ahead (software pipelined); each lane forms partial dots of its 8 columns with the GQ
// query rows it holds in registers, the partial dots are summed across the team's lanes
// (workgroup memory and two barriers, or subgroup shuffles), and every lane updates its state
// from the U x GQ scores. No workgroup-wide reduction happens per step; the teams' states are
// merged once at the end. With several chunks (split-K) each workgroup writes a partial (o, lse)
// row that merge_state.wgsl combines; with one chunk the partial row is the final row. A pool
// split into several buffers (each within the binding limit) runs one pass per buffer, each
// seeing only its own pages, and their partial rows are merged the same way.
//
// Tiling: WG threads (override, 64..=256); teams KT = min(WG / LPK, 32); GQ query heads per
//   workgroup (override, <= 4); U = 4 keys per team and step; head_dim a multiple of 8, <= 256.
//   A step covers KT * U keys. Per-thread state is held in named variables indexed by constants
//   only (heads 0..3, keys 0..3 unrolled by hand): a private array indexed in a loop can end up
//   in local memory, which costs more than the whole kernel.
// Page table: the page ids of the chunk are staged in workgroup memory (PG = 256 at a time,
//   restaged with two barriers when the next step runs past them) before the K/V reads, so a
//   key's address costs a workgroup-memory read, not a dependent global one.
// Bindings (group 0): 0 uniform AttnParams; 1 q [batch, Hq, D] f32; 2 k, 3 v: pool
//   [pages, page_size, Hk, D] f16 or f32 (KV_HALF), read as vec4<u32>; or int8 (Q8), read as
//   vec2<u32>: the scales of the buffer's rows, then from word kv_codes_at the codes; 4 tbl u32 (kv_indptr[batch+1]
//   at 0, page ids at off_indices, last_page_len at off_last_len, ALiBi bits at off_alibi);
//   5 o [batch * num_chunks, Hq, D] f32; 6 lse [batch * num_chunks, Hq] f32.
// Dispatch: (Hk * ceil(group / GQ), num_chunks, batch): the KV heads of one chunk are neighbours
//   in launch order (their rows share [slot, Hk, D] lines); on the H100 this measured the same as
//   chunk-major order.
// Knobs: overrides WG, GQ; KV_HALF and unpack8 (8 elements from 16-byte words) from the
//   prelude; variant SUBGROUP: teams are groups of lanes of one subgroup and sum their partial
//   dots with subgroupShuffleXor instead of workgroup memory and two barriers per step (chosen
//   by the host only when head_dim / 8 divides every subgroup size). The baseline needs neither
//   shader-f16 nor subgroups and assumes no subgroup size.

override WG: u32 = 64u;
override GQ: u32 = 4u;
const PSTRIDE: u32 = 17u;     // 16 (head, key) partials of one lane, padded against bank conflicts
const KT_MAX: u32 = 32u;
const NONE: u32 = 0xffffffffu;
const PG: u32 = 256u;         // page ids staged at once: more than two steps' pages at page size 1

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
// #if Q8
// Int8 pools: 8-byte words (a lane's 8 codes); a row's scale is word `row` of the buffer.
@group(0) @binding(2) var<storage, read> k: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> v: array<vec2<u32>>;
// #else
@group(0) @binding(2) var<storage, read> k: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<u32>>;
// #endif
@group(0) @binding(4) var<storage, read> tbl: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

var<workgroup> part_sh: array<f32, 4352>;      // [WG, PSTRIDE] partial dots; at the end [KT, D] o rows
var<workgroup> s_sh: array<vec4<f32>, 128>;    // [KT_MAX, head] dots of the team's 4 keys
var<workgroup> m_sh: array<vec4<f32>, KT_MAX>; // team maxima, one vec4 over the heads
var<workgroup> d_sh: array<vec4<f32>, KT_MAX>; // team sums
var<workgroup> pg_sh: array<u32, PG>;          // page ids of the chunk's pages [pb, pb + PG)
var<private> q8_lane: u32;                     // Q8: this lane's 8-byte word of a row

// Running softmax state of one query head in one team: this lane's 8 columns of o.
struct St {
    m: f32,
    d: f32,
    o: mat2x4<f32>,
}

// Stages the page ids of the sequence's pages [first, first + PG) (past its last page: 0).
fn stage_pages(first: u32, page0: u32, n_pages: u32, lid: u32) {
    for (var i = lid; i < PG; i += WG) {
        let p = first + i;
        var id = 0u;
        if (p < n_pages) {
            id = tbl[P.off_indices + page0 + p];
        }
        pg_sh[i] = id;
    }
}

// Where one lane's 8 elements of key j live (16-byte words), or NONE for a key this pass skips.
// The key's page is among the staged ones, which start at the sequence's page pb.
fn key_word(j: i32, end: i32, ok: bool, pb: u32, h: u32, row_words: u32, lane_word: u32) -> u32 {
    if (!ok || j >= end) {
        return NONE;
    }
    let ps = P.page_size;
    // Keys whose page lives in another buffer of a split pool are another pass's.
    let page = pg_sh[u32(j) / ps - pb];
    if (page / P.pages_per_buffer != P.kv_buffer) {
        return NONE;
    }
    return (((page % P.pages_per_buffer) * ps + u32(j) % ps) * P.num_kv_heads + h) * row_words + lane_word;
}

// One lane's 16-byte words of a K or V row: `b` is used by f32 storage only.
struct Raw {
    a: vec4<u32>,
    b: vec4<u32>,
}

// With Q8, `w` is the key's row (token, KV head) in its buffer: the lane's two code words and the
// row's scale bits go in `a`.
fn raw_k(w: u32) -> Raw {
    var r = Raw(vec4<u32>(0u), vec4<u32>(0u));
    if (w != NONE) {
// #if Q8
        r.a = vec4<u32>(k[P.kv_codes_at / 2u + w * (P.head_dim / 8u) + q8_lane], k[w / 2u][w % 2u], 0u);
// #else
        r.a = k[w];
        if (!KV_HALF) {
            r.b = k[w + 1u];
        }
// #endif
    }
    return r;
}

fn raw_v(w: u32) -> Raw {
    var r = Raw(vec4<u32>(0u), vec4<u32>(0u));
    if (w != NONE) {
// #if Q8
        r.a = vec4<u32>(v[P.kv_codes_at / 2u + w * (P.head_dim / 8u) + q8_lane], v[w / 2u][w % 2u], 0u);
// #else
        r.a = v[w];
        if (!KV_HALF) {
            r.b = v[w + 1u];
        }
// #endif
    }
    return r;
}

fn unraw(r: Raw) -> mat2x4<f32> {
    return unpack8(r.a, r.b);
}

// Words of the team's 4 keys from j0 (NONE past the chunk or outside this pass's buffer). When
// the 4 keys share a page (page size a multiple of 4, j0 aligned) the page is looked up once:
// the divisions of the lookup cost as much as a step's dot products.
fn words4(j0: i32, end: i32, ok: bool, pb: u32, h: u32, row_words: u32, lane_word: u32) -> vec4<u32> {
    let ps = P.page_size;
    if (ok && j0 < end && ps % 4u == 0u && u32(j0) % 4u == 0u) {
        let page = pg_sh[u32(j0) / ps - pb];
        if (page / P.pages_per_buffer != P.kv_buffer) {
            return vec4<u32>(NONE);
        }
        let w0 = (((page % P.pages_per_buffer) * ps + u32(j0) % ps) * P.num_kv_heads + h) * row_words + lane_word;
        let stride = P.num_kv_heads * row_words;
        return vec4<u32>(w0, select(NONE, w0 + stride, j0 + 1 < end), select(NONE, w0 + 2u * stride, j0 + 2 < end),
                         select(NONE, w0 + 3u * stride, j0 + 3 < end));
    }
    return vec4<u32>(key_word(j0, end, ok, pb, h, row_words, lane_word),
                     key_word(j0 + 1, end, ok, pb, h, row_words, lane_word),
                     key_word(j0 + 2, end, ok, pb, h, row_words, lane_word),
                     key_word(j0 + 3, end, ok, pb, h, row_words, lane_word));
}

fn dot8(a: mat2x4<f32>, b: mat2x4<f32>) -> f32 {
    return dot(a[0], b[0]) + dot(a[1], b[1]);
}

// Partial dots of this lane's columns: one head against the team's 4 keys.
fn put_head(i: u32, qh: mat2x4<f32>, k0: mat2x4<f32>, k1: mat2x4<f32>, k2: mat2x4<f32>, k3: mat2x4<f32>) {
    part_sh[i] = dot8(qh, k0);
    part_sh[i + 1u] = dot8(qh, k1);
    part_sh[i + 2u] = dot8(qh, k2);
    part_sh[i + 3u] = dot8(qh, k3);
}

fn score(x: f32, ok: bool, slope: f32, j: i32, pos: i32) -> f32 {
    return select(-BIG, transform_score(P, x, slope, j, pos), ok);
}

// Online-softmax update of one head's state with the team's 4 keys (dots `x`).
fn update(st: St, x: vec4<f32>, ok: vec4<bool>, slope: f32, j0: i32, pos: i32,
          v0: mat2x4<f32>, v1: mat2x4<f32>, v2: mat2x4<f32>, v3: mat2x4<f32>) -> St {
    let s = vec4<f32>(score(x.x, ok.x, slope, j0, pos), score(x.y, ok.y, slope, j0 + 1, pos),
                      score(x.z, ok.z, slope, j0 + 2, pos), score(x.w, ok.w, slope, j0 + 3, pos));
    let m_new = max(st.m, max(max(s.x, s.y), max(s.z, s.w)));
    let scale = rescale(st.m, m_new);
    let p = select(vec4<f32>(0.0), exp(s - vec4<f32>(m_new)), ok);
    var out: St;
    out.m = m_new;
    out.d = st.d * scale + (p.x + p.y) + (p.z + p.w);
    out.o = st.o * scale + v0 * p.x + v1 * p.y + v2 * p.z + v3 * p.w;
    return out;
}

fn load_q(b: u32, qo_head: u32, lane: u32, live: bool) -> mat2x4<f32> {
    if (!live) {
        return mat2x4<f32>();
    }
    let qb = (b * P.num_qo_heads + qo_head) * (P.head_dim / 4u) + 2u * lane;
    return mat2x4<f32>(q[qb], q[qb + 1u]);
}

fn slope_of(qo_head: u32, live: bool) -> f32 {
    if (live && P.has_alibi != 0u) {
        return bitcast<f32>(tbl[P.off_alibi + qo_head]);
    }
    return 0.0;
}

// One head's o row: the teams' rescaled rows summed in workgroup memory. Uniform control flow.
fn finish_head(g: u32, st: St, mg: f32, dg: f32, live: bool, team: u32, lane: u32, kt: u32,
               lid: u32, row: u32) {
    if (live) {
        let a = st.o * rescale(st.m, mg);
        let base = team * P.head_dim + 8u * lane;
        part_sh[base] = a[0].x;
        part_sh[base + 1u] = a[0].y;
        part_sh[base + 2u] = a[0].z;
        part_sh[base + 3u] = a[0].w;
        part_sh[base + 4u] = a[1].x;
        part_sh[base + 5u] = a[1].y;
        part_sh[base + 6u] = a[1].z;
        part_sh[base + 7u] = a[1].w;
    }
    workgroupBarrier();
    if (g < GQ) {
        let dv = P.head_dim / 4u;
        let inv = select(0.0, 1.0 / dg, dg > 0.0);
        for (var c4 = lid; c4 < dv; c4 += WG) {
            var s = vec4<f32>(0.0);
            for (var t = 0u; t < kt; t++) {
                let i = t * P.head_dim + 4u * c4;
                s += vec4<f32>(part_sh[i], part_sh[i + 1u], part_sh[i + 2u], part_sh[i + 3u]);
            }
            if (row != NONE) {
                o[row * dv + c4] = s * inv;
            }
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
// #if SUBGROUP
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(subgroup_size) sg_size: u32,
// #endif
) {
    let chunk = wid.y;
    let b = wid.z;
    let n_gblk = (P.group + GQ - 1u) / GQ;
    let h = wid.x / n_gblk;
    let g0 = (wid.x % n_gblk) * GQ;
    let gn = min(GQ, P.group - g0);
    let lpk = P.head_dim / 8u;
    let kt = min(WG / lpk, KT_MAX);
// #if SUBGROUP
    // Teams are aligned groups of lpk lanes of one subgroup (the host checks that lpk divides
    // every subgroup size and the subgroups are full), so a team reduces with shuffles.
    let team = sg_id * (sg_size / lpk) + sg_lane / lpk;
    let lane = sg_lane % lpk;
// #else
    let team = lid / lpk;
    let lane = lid % lpk;
// #endif
    let in_team = team < kt;
// #if Q8
    // Keys are addressed by row: raw_k finds the lane's codes and the row's scale from it.
    let row_words = 1u;
    let lw = 0u;
    q8_lane = lane;
// #else
    let words = select(2u, 1u, KV_HALF);          // 16-byte words per 8 elements
    let row_words = lpk * words;
    let lw = lane * words;
// #endif

    let page0 = tbl[b];
    let n_pages = tbl[b + 1u] - page0;
    var kv_len = 0;
    if (n_pages > 0u) {
        kv_len = i32((n_pages - 1u) * P.page_size + tbl[P.off_last_len + b]);
    }
    let pos = kv_len - 1;
    let vis = visible_range(P, pos, kv_len);
    let c_lo = i32(chunk * P.chunk_len);
    let start = max(vis.x, c_lo);
    let end = min(vis.y, c_lo + i32(P.chunk_len));

    // This lane's 8 columns of each query head of the block (heads past gn are zero).
    let hq0 = h * P.group + g0;
    let q0 = load_q(b, hq0, lane, in_team);
    let q1 = load_q(b, hq0 + 1u, lane, in_team && gn > 1u);
    let q2 = load_q(b, hq0 + 2u, lane, in_team && gn > 2u);
    let q3 = load_q(b, hq0 + 3u, lane, in_team && gn > 3u);
    let sl = vec4<f32>(slope_of(hq0, true), slope_of(hq0 + 1u, gn > 1u), slope_of(hq0 + 2u, gn > 2u),
                       slope_of(hq0 + 3u, gn > 3u));
    let empty = St(-BIG, 0.0, mat2x4<f32>());
    var st0 = empty;
    var st1 = empty;
    var st2 = empty;
    var st3 = empty;

    // Software pipelined: the next step's K and V words are loaded before this step's barriers
    // and arithmetic, so that every thread has loads in flight while it computes.
    let step = i32(kt * 4u);
    var j0 = start + i32(team * 4u);
    // The chunk's page ids are staged in workgroup memory before any K/V read, PG at a time.
    let ps = P.page_size;
    var pb = u32(max(start, 0)) / ps;
    var staged_end = i32((pb + PG) * ps);   // first key past the staged pages
    stage_pages(pb, page0, n_pages, lid);
    workgroupBarrier();
    var w = words4(j0, end, in_team, pb, h, row_words, lw);
    var rk0 = raw_k(w.x);
    var rk1 = raw_k(w.y);
    var rk2 = raw_k(w.z);
    var rk3 = raw_k(w.w);
    var rv0 = raw_v(w.x);
    var rv1 = raw_v(w.y);
    var rv2 = raw_v(w.z);
    var rv3 = raw_v(w.w);
    for (var t0 = start; t0 < end; t0 += step) {
        let jn = j0 + step;
        // The next step's pages, restaged when they run past the staged ones (a step spans at
        // most KT_MAX * 4 / page_size + 2 < PG pages; the condition is the same for every thread).
        let next_lo = t0 + step;
        if (next_lo < end && min(next_lo + step, end) > staged_end) {
            workgroupBarrier();
            pb = u32(next_lo) / ps;
            staged_end = i32((pb + PG) * ps);
            stage_pages(pb, page0, n_pages, lid);
            workgroupBarrier();
        }
        let wn = words4(jn, end, in_team, pb, h, row_words, lw);
        let nk0 = raw_k(wn.x);
        let nk1 = raw_k(wn.y);
        let nk2 = raw_k(wn.z);
        let nk3 = raw_k(wn.w);
        let nv0 = raw_v(wn.x);
        let nv1 = raw_v(wn.y);
        let nv2 = raw_v(wn.z);
        let nv3 = raw_v(wn.w);
        let k0 = unraw(rk0);
        let k1 = unraw(rk1);
        let k2 = unraw(rk2);
        let k3 = unraw(rk3);
// #if SUBGROUP
        // Dots of each head against the 4 keys, summed over the team's lanes by xor shuffles
        // (no barrier: teams run independently).
        var x0 = vec4<f32>(dot8(q0, k0), dot8(q0, k1), dot8(q0, k2), dot8(q0, k3));
        var x1 = vec4<f32>(dot8(q1, k0), dot8(q1, k1), dot8(q1, k2), dot8(q1, k3));
        var x2 = vec4<f32>(dot8(q2, k0), dot8(q2, k1), dot8(q2, k2), dot8(q2, k3));
        var x3 = vec4<f32>(dot8(q3, k0), dot8(q3, k1), dot8(q3, k2), dot8(q3, k3));
        for (var off = 1u; off < lpk; off <<= 1u) {
            x0 += subgroupShuffleXor(x0, off);
            x1 += subgroupShuffleXor(x1, off);
            x2 += subgroupShuffleXor(x2, off);
            x3 += subgroupShuffleXor(x3, off);
        }
// #else
        // Partial dots, [lane][head * 4 + key], summed over the team's lanes.
        let pb = lid * PSTRIDE;
        put_head(pb, q0, k0, k1, k2, k3);
        put_head(pb + 4u, q1, k0, k1, k2, k3);
        put_head(pb + 8u, q2, k0, k1, k2, k3);
        put_head(pb + 12u, q3, k0, k1, k2, k3);
        workgroupBarrier();
        if (in_team) {
            for (var p = lane; p < 16u; p += lpk) {
                var s = 0.0;
                for (var i = 0u; i < lpk; i++) {
                    s += part_sh[(team * lpk + i) * PSTRIDE + p];
                }
                s_sh[team * 4u + p / 4u][p % 4u] = s;
            }
        }
        workgroupBarrier();
        let sb = min(team, KT_MAX - 1u) * 4u;
        let x0 = s_sh[sb];
        let x1 = s_sh[sb + 1u];
        let x2 = s_sh[sb + 2u];
        let x3 = s_sh[sb + 3u];
// #endif
        let ok = w != vec4<u32>(NONE);
        let v0 = unraw(rv0);
        let v1 = unraw(rv1);
        let v2 = unraw(rv2);
        let v3 = unraw(rv3);
        st0 = update(st0, x0, ok, sl.x, j0, pos, v0, v1, v2, v3);
        st1 = update(st1, x1, ok, sl.y, j0, pos, v0, v1, v2, v3);
        st2 = update(st2, x2, ok, sl.z, j0, pos, v0, v1, v2, v3);
        st3 = update(st3, x3, ok, sl.w, j0, pos, v0, v1, v2, v3);
        j0 = jn;
        w = wn;
        rk0 = nk0;
        rk1 = nk1;
        rk2 = nk2;
        rk3 = nk3;
        rv0 = nv0;
        rv1 = nv1;
        rv2 = nv2;
        rv3 = nv3;
    }

    // Merge the teams' states: global max, rescaled sums, then the o rows summed over teams.
    if (in_team && lane == 0u) {
        m_sh[team] = vec4<f32>(st0.m, st1.m, st2.m, st3.m);
        d_sh[team] = vec4<f32>(st0.d, st1.d, st2.d, st3.d);
    }
    workgroupBarrier();
    var mg = vec4<f32>(-BIG);
    for (var t = 0u; t < kt; t++) { mg = max(mg, m_sh[t]); }
    var dg = vec4<f32>(0.0);
    for (var t = 0u; t < kt; t++) { dg += d_sh[t] * exp(m_sh[t] - mg); }
    // Partial rows are (sequence, buffer pass, chunk); one buffer and one chunk is the final row.
    let out_chunk = b * P.num_chunks + P.kv_buffer * nwg.y + chunk;
    let out_row0 = out_chunk * P.num_qo_heads + h * P.group + g0;
    finish_head(0u, st0, mg.x, dg.x, in_team, team, lane, kt, lid, out_row0);
    finish_head(1u, st1, mg.y, dg.y, in_team, team, lane, kt, lid, select(NONE, out_row0 + 1u, gn > 1u));
    finish_head(2u, st2, mg.z, dg.z, in_team, team, lane, kt, lid, select(NONE, out_row0 + 2u, gn > 2u));
    finish_head(3u, st3, mg.w, dg.w, in_team, team, lane, kt, lid, select(NONE, out_row0 + 3u, gn > 3u));
    if (lid < gn) {
        lse[out_row0 + lid] = finish_lse(mg[lid], dg[lid]);
    }
}

// prefill_attention_coop.wgsl: ragged batch prefill on cooperative matrices (tensor cores), for
// f16 K/V (ragged or paged) and head dims that are multiples of 16 up to 128.
//
// Algorithm: FlashAttention-2. A 128-thread workgroup (four subgroups of exactly 32 threads,
// checked on the host) owns BR = 64 query rows of one sequence and one KV head, rows running over
// (token, query head of the group) as in prefill_attention.wgsl, so the GQA group shares each K/V
// tile; each subgroup owns 16 rows. Per tile of BC = 64 keys: S = Q K^T on the tensor cores
// (16 x 64 per subgroup), the online softmax in scalar code (each row's two lanes take 32 keys
// each), then O += P V on the tensor cores. K and V are staged in workgroup memory as f16 rows;
// the next tile's K and this tile's V are loaded into registers while the tensor cores work.
// Precision: Q (pre-scaled by sm_scale * log2(e): scores are in log2 units) and P each go in as
// two f16 parts, hi cut by a mantissa mask and lo = x - hi, multiplied into the same f32
// accumulators, so a product carries about 21 bits of each factor instead of f16's 11 (K and V
// are f16 already). Each Q row is first scaled by a power of two that puts its largest element in
// [2^13, 2^14): the lo parts stay normal f16 numbers down to 2^-16 of that element, and the
// scores are unscaled exactly (times 2^-e). P's row maximum is updated lazily (as FlashAttention-4
// does): a row keeps its old maximum until a tile's scores pass it by more than LAZY (log2
// units), so P stays below 2^LAZY and the accumulators of O are rescaled (through workgroup
// memory: a cooperative matrix has no per-row scale) only in the rare tiles where a row's maximum
// jumps.
// Each row's result depends only on its own query, its keys and the tile walk (which starts at
// the first key the tile's first row sees, as in prefill_attention.wgsl).
// Workgroup memory (44 KiB, every variable a multiple of 16 bytes): kt holds Q's hi parts at the start, then each tile's K, then that
// tile's P (hi and lo, 16 x 64 of each per subgroup); vt holds Q's lo parts, then V; scr passes
// each subgroup's scores to its lanes' registers 16 x 32 at a time, and O's fragments when they
// are rescaled or written. Even regions that only one subgroup touches are ordered with
// workgroupBarrier: WGSL's subgroupBarrier orders subgroup memory only, and the driver may move
// workgroup-memory accesses across it (results were wrong with it). Whether any row of the
// workgroup must rescale is made uniform with workgroupUniformLoad, since cooperative operations
// must run in uniform control flow, every barrier too.
// Rows are padded (KS, PS, SS) so that the 8 rows of a fragment load or
// store fall in different banks: unpadded rows of 128 or 256 bytes put all 8 in the same ones.
// Bindings: as prefill_attention.wgsl (o and lse f32; K/V f16 rows). Dispatch: (Hk, num_work, 1).
// Needs `enable f16;` and the cooperative-matrix extension, both added by the host.

override HD: u32 = 128u;            // head dim: a multiple of 16, at most 128
override QF: u32 = HD / 16u;        // 16-column fragments of a row
override KS: u32 = HD + 8u;         // halves per K, V or Q row in kt / vt
const BR: u32 = 64u;
const BC: u32 = 64u;
const LAZY: f32 = 8.0;
const PS: u32 = 72u;                // halves per P row
const SS: u32 = 36u;                // floats per row of scr

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<kv4>;
@group(0) @binding(3) var<storage, read> v: array<kv4>;
@group(0) @binding(4) var<storage, read> tbl: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

var<workgroup> kt: array<f16, 9216>;
var<workgroup> vt: array<f16, 8704>;
var<workgroup> scr: array<f32, 2304>;
// Set (.x) when a row of this tile rescales O; read back uniformly. A vec4, so that every
// workgroup variable is a multiple of 16 bytes: cooperative loads and stores need 16-byte
// aligned addresses, and the driver places the variables in an order of its own, so a 4-byte
// flag placed first would put the arrays after it off by 4 bytes.
var<workgroup> jump: vec4<u32>;

// vec4 i of this thread's share of a 64-key tile of K or V starting at key t0 (zeros from key
// hi): the tile's vec4 number g = lid + 128 i is key g / (HD / 4), column g % (HD / 4).
fn tile_row(i: u32, lid: u32, t0: i32, hi: i32, b: u32, h: u32, kv_base: u32) -> i32 {
    let key = (lid + 128u * i) / (HD / 4u);
    if (t0 + i32(key) >= hi) {
        return -1;
    }
    return i32(kv_row(b, u32(t0) + key, h, HD / 4u, kv_base));
}

fn tile_col(i: u32, lid: u32) -> u32 {
    return (lid + 128u * i) % (HD / 4u);
}

fn load_k(i: u32, lid: u32, t0: i32, hi: i32, b: u32, h: u32, kv_base: u32) -> vec4<f16> {
    let row = tile_row(i, lid, t0, hi, b, h, kv_base);
    if (row < 0) {
        return vec4<f16>(0.0h);
    }
    return vec4<f16>(k[u32(row) * (HD / 4u) + tile_col(i, lid)]);
}

fn load_v(i: u32, lid: u32, t0: i32, hi: i32, b: u32, h: u32, kv_base: u32) -> vec4<f16> {
    let row = tile_row(i, lid, t0, hi, b, h, kv_base);
    if (row < 0) {
        return vec4<f16>(0.0h);
    }
    return vec4<f16>(v[u32(row) * (HD / 4u) + tile_col(i, lid)]);
}

// Where vec4 i of this thread's share of a tile goes in kt or vt (rows of KS halves).
fn tile_at(i: u32, lid: u32) -> u32 {
    let g = lid + 128u * i;
    return (g / (HD / 4u)) * KS + 4u * (g % (HD / 4u));
}

fn put_k(i: u32, lid: u32, x: vec4<f16>) {
    let at = tile_at(i, lid);
    kt[at] = x.x;
    kt[at + 1u] = x.y;
    kt[at + 2u] = x.z;
    kt[at + 3u] = x.w;
}

fn put_v(i: u32, lid: u32, x: vec4<f16>) {
    let at = tile_at(i, lid);
    vt[at] = x.x;
    vt[at + 1u] = x.y;
    vt[at + 2u] = x.z;
    vt[at + 3u] = x.w;
}

// The high part of x: sign, exponent and the top 10 mantissa bits, exact in f16 (for normal
// f16 magnitudes); x - hi is exact in f32.
fn hi_part(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) & 0xffffe000u);
}

// Column i of the 16 a lane takes in its row of a 16 x 32 block (lane = 2 r + half; rows of SS
// floats): rotated by the row, so that the 32 lanes of a step read 32 different banks.
fn own_col(i: u32, lane: u32) -> u32 {
    return ((i + lane / 2u) % 16u) + 16u * (lane % 2u);
}

// A score (accumulated with the row's scale: `unscale` undoes it exactly) in log2 units, with
// soft-cap and ALiBi, or -BIG where the key is past the tile's n keys or outside the row's
// visible range.
fn score(acc: f32, c: u32, n: u32, t0: i32, unscale: f32, ri: RowInfo) -> f32 {
    let key = t0 + i32(c);
    if (c >= n || key < ri.lo || key >= ri.hi) {
        return -BIG;
    }
    var s = acc * unscale;
    if (P.soft_cap > 0.0) {
        let cap = P.soft_cap * LOG2E;
        s = cap * tanh(s / cap);
    }
    return s + (ri.slope * LOG2E) * f32(key - ri.pos);
}

// Scales the lane's half of its row of the 16 x 32 block at scr[ob ..].
fn scale_own_row(ob: u32, lane: u32, factor: f32) {
    let at = ob + (lane / 2u) * SS;
    for (var i = 0u; i < 16u; i++) {
        scr[at + own_col(i, lane)] *= factor;
    }
}

// Writes the lane's half of its row of the 16 x 32 block at scr[ob ..] (head-dim columns
// d0 .. d0 + 31) to o, times inv.
fn write_own_row(ob: u32, lane: u32, d0: u32, out_at: u32, ok: bool, inv: f32) {
    let at = ob + (lane / 2u) * SS;
    for (var i = 0u; i < 16u; i++) {
        let c = own_col(i, lane);
        if (ok && d0 + c < HD) {
            o[out_at + d0 + c] = scr[at + c] * inv;
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
    let b = tbl[P.off_work + 2u * wid.y];
    let row0 = tbl[P.off_work + 2u * wid.y + 1u];
    let h = wid.x;
    let G = P.group;
    let dv = HD / 4u;
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

    // Keys any row of the tile sees, and keys every row sees (tiles inside need no mask).
    let first_pos = i32(row0 / G) + kv_len - qo_len;
    let last_pos = i32((row0 + rows - 1u) / G) + kv_len - qo_len;
    let lo = visible_range(P, first_pos, kv_len).x;
    let hi = visible_range(P, last_pos, kv_len).y;
    let lo_all = visible_range(P, last_pos, kv_len).x;
    let hi_all = select(visible_range(P, first_pos, kv_len).y, 0, rows < BR);

    // This lane's row: row r of the subgroup's 16, tile row tr; it takes half of each tile's keys.
    let r = lane / 2u;
    let tr = sg * 16u + r;
    let ri = row_info(tr, rows, row0, G, h, kv_len, qo_len);
    let q_ok = tr < rows;
    let rr = row0 + tr;
    let q_row = ((q_start + rr / G) * P.num_qo_heads + h * G + rr % G) * dv;

    // Q: scaled rows, split into f16 parts (hi into kt, lo into vt, rows of KS).
    let q_scale = P.sm_scale * LOG2E;
    var amax = 0.0;
    if (q_ok) {
        for (var c = lane % 2u; c < dv; c += 2u) {
            let x = abs(q[q_row + c] * q_scale);
            amax = max(amax, max(max(x.x, x.y), max(x.z, x.w)));
        }
    }
    amax = max(amax, subgroupShuffleXor(amax, 1u));
    let e = 14 - frexp(amax).exp;
    let unscale = ldexp(1.0, -e);
    let qa = sg * 16u * KS;
    for (var c = lane % 2u; c < dv; c += 2u) {
        var x = vec4<f32>(0.0);
        if (q_ok) {
            x = ldexp(q[q_row + c] * q_scale, vec4<i32>(e));
        }
        let xh = vec4<f32>(hi_part(x.x), hi_part(x.y), hi_part(x.z), hi_part(x.w));
        let xl = x - xh;
        let at = qa + r * KS + 4u * c;
        kt[at] = f16(xh.x);
        kt[at + 1u] = f16(xh.y);
        kt[at + 2u] = f16(xh.z);
        kt[at + 3u] = f16(xh.w);
        vt[at] = f16(xl.x);
        vt[at + 1u] = f16(xl.y);
        vt[at + 2u] = f16(xl.z);
        vt[at + 3u] = f16(xl.w);
    }
    // Zeros to load the accumulators from.
    let ob = sg * 16u * SS;
    for (var t = lane; t < 256u; t += 32u) {
        scr[ob + t] = 0.0;
    }
    workgroupBarrier();
    let qh0 = coopLoadT<coop_mat16x16<f16, A>>(&kt[qa], KS);
    let ql0 = coopLoadT<coop_mat16x16<f16, A>>(&vt[qa], KS);
    let qh1 = coopLoadT<coop_mat16x16<f16, A>>(&kt[qa + 16u * min(1u, QF - 1u)], KS);
    let ql1 = coopLoadT<coop_mat16x16<f16, A>>(&vt[qa + 16u * min(1u, QF - 1u)], KS);
    let qh2 = coopLoadT<coop_mat16x16<f16, A>>(&kt[qa + 16u * min(2u, QF - 1u)], KS);
    let ql2 = coopLoadT<coop_mat16x16<f16, A>>(&vt[qa + 16u * min(2u, QF - 1u)], KS);
    let qh3 = coopLoadT<coop_mat16x16<f16, A>>(&kt[qa + 16u * min(3u, QF - 1u)], KS);
    let ql3 = coopLoadT<coop_mat16x16<f16, A>>(&vt[qa + 16u * min(3u, QF - 1u)], KS);
    let qh4 = coopLoadT<coop_mat16x16<f16, A>>(&kt[qa + 16u * min(4u, QF - 1u)], KS);
    let ql4 = coopLoadT<coop_mat16x16<f16, A>>(&vt[qa + 16u * min(4u, QF - 1u)], KS);
    let qh5 = coopLoadT<coop_mat16x16<f16, A>>(&kt[qa + 16u * min(5u, QF - 1u)], KS);
    let ql5 = coopLoadT<coop_mat16x16<f16, A>>(&vt[qa + 16u * min(5u, QF - 1u)], KS);
    let qh6 = coopLoadT<coop_mat16x16<f16, A>>(&kt[qa + 16u * min(6u, QF - 1u)], KS);
    let ql6 = coopLoadT<coop_mat16x16<f16, A>>(&vt[qa + 16u * min(6u, QF - 1u)], KS);
    let qh7 = coopLoadT<coop_mat16x16<f16, A>>(&kt[qa + 16u * min(7u, QF - 1u)], KS);
    let ql7 = coopLoadT<coop_mat16x16<f16, A>>(&vt[qa + 16u * min(7u, QF - 1u)], KS);
    let zero = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob], 16u);
    var o0 = zero;
    var o1 = zero;
    var o2 = zero;
    var o3 = zero;
    var o4 = zero;
    var o5 = zero;
    var o6 = zero;
    var o7 = zero;
    var m = -BIG;
    var l = 0.0;
    if (lid == 0u) {
        jump = vec4<u32>(0u);
    }
    // Every subgroup holds its Q before kt takes the first tile's K.
    workgroupBarrier();

    var kr: array<vec4<f16>, 16>;
    var vr: array<vec4<f16>, 16>;
    for (var i = 0u; i < HD / 8u; i++) {
        kr[i] = load_k(i, lid, lo, hi, b, h, kv_base);
    }
    for (var i = 0u; i < HD / 8u; i++) {
        put_k(i, lid, kr[i]);
    }
    workgroupBarrier();

    for (var t0 = lo; t0 < hi; t0 += i32(BC)) {
        let n = u32(min(i32(BC), hi - t0));
        // This tile's V is loaded while the scores are multiplied.
        for (var i = 0u; i < HD / 8u; i++) {
            vr[i] = load_v(i, lid, t0, hi, b, h, kv_base);
        }
        var s0 = zero;
        var s1 = zero;
        var s2 = zero;
        var s3 = zero;
        if (QF > 0u) {
            let k0 = coopLoad<coop_mat16x16<f16, B>>(&kt[0u * KS + 0u], KS);
            let k1 = coopLoad<coop_mat16x16<f16, B>>(&kt[16u * KS + 0u], KS);
            let k2 = coopLoad<coop_mat16x16<f16, B>>(&kt[32u * KS + 0u], KS);
            let k3 = coopLoad<coop_mat16x16<f16, B>>(&kt[48u * KS + 0u], KS);
            s0 = coopMultiplyAdd(ql0, k0, coopMultiplyAdd(qh0, k0, s0));
            s1 = coopMultiplyAdd(ql0, k1, coopMultiplyAdd(qh0, k1, s1));
            s2 = coopMultiplyAdd(ql0, k2, coopMultiplyAdd(qh0, k2, s2));
            s3 = coopMultiplyAdd(ql0, k3, coopMultiplyAdd(qh0, k3, s3));
        }
        if (QF > 1u) {
            let k0 = coopLoad<coop_mat16x16<f16, B>>(&kt[0u * KS + 16u], KS);
            let k1 = coopLoad<coop_mat16x16<f16, B>>(&kt[16u * KS + 16u], KS);
            let k2 = coopLoad<coop_mat16x16<f16, B>>(&kt[32u * KS + 16u], KS);
            let k3 = coopLoad<coop_mat16x16<f16, B>>(&kt[48u * KS + 16u], KS);
            s0 = coopMultiplyAdd(ql1, k0, coopMultiplyAdd(qh1, k0, s0));
            s1 = coopMultiplyAdd(ql1, k1, coopMultiplyAdd(qh1, k1, s1));
            s2 = coopMultiplyAdd(ql1, k2, coopMultiplyAdd(qh1, k2, s2));
            s3 = coopMultiplyAdd(ql1, k3, coopMultiplyAdd(qh1, k3, s3));
        }
        if (QF > 2u) {
            let k0 = coopLoad<coop_mat16x16<f16, B>>(&kt[0u * KS + 32u], KS);
            let k1 = coopLoad<coop_mat16x16<f16, B>>(&kt[16u * KS + 32u], KS);
            let k2 = coopLoad<coop_mat16x16<f16, B>>(&kt[32u * KS + 32u], KS);
            let k3 = coopLoad<coop_mat16x16<f16, B>>(&kt[48u * KS + 32u], KS);
            s0 = coopMultiplyAdd(ql2, k0, coopMultiplyAdd(qh2, k0, s0));
            s1 = coopMultiplyAdd(ql2, k1, coopMultiplyAdd(qh2, k1, s1));
            s2 = coopMultiplyAdd(ql2, k2, coopMultiplyAdd(qh2, k2, s2));
            s3 = coopMultiplyAdd(ql2, k3, coopMultiplyAdd(qh2, k3, s3));
        }
        if (QF > 3u) {
            let k0 = coopLoad<coop_mat16x16<f16, B>>(&kt[0u * KS + 48u], KS);
            let k1 = coopLoad<coop_mat16x16<f16, B>>(&kt[16u * KS + 48u], KS);
            let k2 = coopLoad<coop_mat16x16<f16, B>>(&kt[32u * KS + 48u], KS);
            let k3 = coopLoad<coop_mat16x16<f16, B>>(&kt[48u * KS + 48u], KS);
            s0 = coopMultiplyAdd(ql3, k0, coopMultiplyAdd(qh3, k0, s0));
            s1 = coopMultiplyAdd(ql3, k1, coopMultiplyAdd(qh3, k1, s1));
            s2 = coopMultiplyAdd(ql3, k2, coopMultiplyAdd(qh3, k2, s2));
            s3 = coopMultiplyAdd(ql3, k3, coopMultiplyAdd(qh3, k3, s3));
        }
        if (QF > 4u) {
            let k0 = coopLoad<coop_mat16x16<f16, B>>(&kt[0u * KS + 64u], KS);
            let k1 = coopLoad<coop_mat16x16<f16, B>>(&kt[16u * KS + 64u], KS);
            let k2 = coopLoad<coop_mat16x16<f16, B>>(&kt[32u * KS + 64u], KS);
            let k3 = coopLoad<coop_mat16x16<f16, B>>(&kt[48u * KS + 64u], KS);
            s0 = coopMultiplyAdd(ql4, k0, coopMultiplyAdd(qh4, k0, s0));
            s1 = coopMultiplyAdd(ql4, k1, coopMultiplyAdd(qh4, k1, s1));
            s2 = coopMultiplyAdd(ql4, k2, coopMultiplyAdd(qh4, k2, s2));
            s3 = coopMultiplyAdd(ql4, k3, coopMultiplyAdd(qh4, k3, s3));
        }
        if (QF > 5u) {
            let k0 = coopLoad<coop_mat16x16<f16, B>>(&kt[0u * KS + 80u], KS);
            let k1 = coopLoad<coop_mat16x16<f16, B>>(&kt[16u * KS + 80u], KS);
            let k2 = coopLoad<coop_mat16x16<f16, B>>(&kt[32u * KS + 80u], KS);
            let k3 = coopLoad<coop_mat16x16<f16, B>>(&kt[48u * KS + 80u], KS);
            s0 = coopMultiplyAdd(ql5, k0, coopMultiplyAdd(qh5, k0, s0));
            s1 = coopMultiplyAdd(ql5, k1, coopMultiplyAdd(qh5, k1, s1));
            s2 = coopMultiplyAdd(ql5, k2, coopMultiplyAdd(qh5, k2, s2));
            s3 = coopMultiplyAdd(ql5, k3, coopMultiplyAdd(qh5, k3, s3));
        }
        if (QF > 6u) {
            let k0 = coopLoad<coop_mat16x16<f16, B>>(&kt[0u * KS + 96u], KS);
            let k1 = coopLoad<coop_mat16x16<f16, B>>(&kt[16u * KS + 96u], KS);
            let k2 = coopLoad<coop_mat16x16<f16, B>>(&kt[32u * KS + 96u], KS);
            let k3 = coopLoad<coop_mat16x16<f16, B>>(&kt[48u * KS + 96u], KS);
            s0 = coopMultiplyAdd(ql6, k0, coopMultiplyAdd(qh6, k0, s0));
            s1 = coopMultiplyAdd(ql6, k1, coopMultiplyAdd(qh6, k1, s1));
            s2 = coopMultiplyAdd(ql6, k2, coopMultiplyAdd(qh6, k2, s2));
            s3 = coopMultiplyAdd(ql6, k3, coopMultiplyAdd(qh6, k3, s3));
        }
        if (QF > 7u) {
            let k0 = coopLoad<coop_mat16x16<f16, B>>(&kt[0u * KS + 112u], KS);
            let k1 = coopLoad<coop_mat16x16<f16, B>>(&kt[16u * KS + 112u], KS);
            let k2 = coopLoad<coop_mat16x16<f16, B>>(&kt[32u * KS + 112u], KS);
            let k3 = coopLoad<coop_mat16x16<f16, B>>(&kt[48u * KS + 112u], KS);
            s0 = coopMultiplyAdd(ql7, k0, coopMultiplyAdd(qh7, k0, s0));
            s1 = coopMultiplyAdd(ql7, k1, coopMultiplyAdd(qh7, k1, s1));
            s2 = coopMultiplyAdd(ql7, k2, coopMultiplyAdd(qh7, k2, s2));
            s3 = coopMultiplyAdd(ql7, k3, coopMultiplyAdd(qh7, k3, s3));
        }
        for (var i = 0u; i < HD / 8u; i++) {
            put_v(i, lid, vr[i]);
        }
        // Every subgroup is done with K (kt takes P next) and V is in vt.
        workgroupBarrier();

        // The lane's 32 scores into registers, through scr 32 keys at a time: keys own_col(i)
        // and 32 + own_col(i).
        var sv: array<f32, 32>;
        let sr = ob + r * SS;
        coopStoreT(s0, &scr[ob], SS);
        coopStoreT(s1, &scr[ob + 16u], SS);
        workgroupBarrier();
        for (var i = 0u; i < 16u; i++) {
            sv[i] = scr[sr + own_col(i, lane)];
        }
        workgroupBarrier();
        coopStoreT(s2, &scr[ob], SS);
        coopStoreT(s3, &scr[ob + 16u], SS);
        workgroupBarrier();
        for (var i = 0u; i < 16u; i++) {
            sv[16u + i] = scr[sr + own_col(i, lane)];
        }

        // Online softmax: the row maximum, then P into kt. Interior tiles without soft-cap or
        // ALiBi only unscale (an exact power of two).
        let plain = t0 >= lo_all && t0 + i32(BC) <= hi_all && P.soft_cap == 0.0 && P.has_alibi == 0u;
        var mx = -BIG;
        if (plain) {
            for (var i = 0u; i < 32u; i++) {
                sv[i] *= unscale;
                mx = max(mx, sv[i]);
            }
        } else {
            for (var i = 0u; i < 32u; i++) {
                let c = own_col(i % 16u, lane) + 32u * (i / 16u);
                sv[i] = score(sv[i], c, n, t0, unscale, ri);
                mx = max(mx, sv[i]);
            }
        }
        mx = max(mx, subgroupShuffleXor(mx, 1u));
        var factor = 1.0;
        if (mx > m + LAZY) {
            if (m > -BIG) {
                factor = exp2(m - mx);
                jump.x = 1u;
            }
            m = mx;
        }
        l *= factor;
        let pr = sg * 2304u + r * PS;
        var lsum = 0.0;
        for (var i = 0u; i < 32u; i++) {
            let c = own_col(i % 16u, lane) + 32u * (i / 16u);
            let p = select(0.0, exp2(sv[i] - m), sv[i] > -BIG);
            lsum += p;
            let ph = hi_part(p);
            kt[pr + c] = f16(ph);
            kt[pr + 16u * PS + c] = f16(p - ph);
        }
        l += lsum;
        // The next tile's K is loaded while P V is multiplied.
        let next = t0 + i32(BC);
        if (next < hi) {
            for (var i = 0u; i < HD / 8u; i++) {
                kr[i] = load_k(i, lid, next, hi, b, h, kv_base);
            }
        }
        // Any row's jump is every subgroup's business: the rescale's cooperative loads and
        // stores must run in uniform control flow. P is in kt and V in vt after this barrier.
        if (workgroupUniformLoad(&jump).x != 0u) {
            if (QF > 0u) {
                workgroupBarrier();
                if (QF > 0u) {
                    coopStoreT(o0, &scr[ob + 0u], SS);
                }
                if (QF > 1u) {
                    coopStoreT(o1, &scr[ob + 16u], SS);
                }
                workgroupBarrier();
                scale_own_row(ob, lane, factor);
                workgroupBarrier();
                if (QF > 0u) {
                    o0 = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob + 0u], SS);
                }
                if (QF > 1u) {
                    o1 = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob + 16u], SS);
                }
            }
            if (QF > 2u) {
                workgroupBarrier();
                if (QF > 2u) {
                    coopStoreT(o2, &scr[ob + 0u], SS);
                }
                if (QF > 3u) {
                    coopStoreT(o3, &scr[ob + 16u], SS);
                }
                workgroupBarrier();
                scale_own_row(ob, lane, factor);
                workgroupBarrier();
                if (QF > 2u) {
                    o2 = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob + 0u], SS);
                }
                if (QF > 3u) {
                    o3 = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob + 16u], SS);
                }
            }
            if (QF > 4u) {
                workgroupBarrier();
                if (QF > 4u) {
                    coopStoreT(o4, &scr[ob + 0u], SS);
                }
                if (QF > 5u) {
                    coopStoreT(o5, &scr[ob + 16u], SS);
                }
                workgroupBarrier();
                scale_own_row(ob, lane, factor);
                workgroupBarrier();
                if (QF > 4u) {
                    o4 = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob + 0u], SS);
                }
                if (QF > 5u) {
                    o5 = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob + 16u], SS);
                }
            }
            if (QF > 6u) {
                workgroupBarrier();
                if (QF > 6u) {
                    coopStoreT(o6, &scr[ob + 0u], SS);
                }
                if (QF > 7u) {
                    coopStoreT(o7, &scr[ob + 16u], SS);
                }
                workgroupBarrier();
                scale_own_row(ob, lane, factor);
                workgroupBarrier();
                if (QF > 6u) {
                    o6 = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob + 0u], SS);
                }
                if (QF > 7u) {
                    o7 = coopLoadT<coop_mat16x16<f32, C>>(&scr[ob + 16u], SS);
                }
            }
        }
        // Key fragments past the tile's n keys are skipped (their P and V are zeros).
        for (var kk = 0u; kk < (n + 15u) / 16u; kk++) {
            let ph = coopLoadT<coop_mat16x16<f16, A>>(&kt[sg * 2304u + 16u * kk], PS);
            let pl = coopLoadT<coop_mat16x16<f16, A>>(&kt[sg * 2304u + 16u * PS + 16u * kk], PS);
            let vb = 16u * kk * KS;
            if (QF > 0u) {
                let w = coopLoadT<coop_mat16x16<f16, B>>(&vt[vb + 0u], KS);
                o0 = coopMultiplyAdd(pl, w, coopMultiplyAdd(ph, w, o0));
            }
            if (QF > 1u) {
                let w = coopLoadT<coop_mat16x16<f16, B>>(&vt[vb + 16u], KS);
                o1 = coopMultiplyAdd(pl, w, coopMultiplyAdd(ph, w, o1));
            }
            if (QF > 2u) {
                let w = coopLoadT<coop_mat16x16<f16, B>>(&vt[vb + 32u], KS);
                o2 = coopMultiplyAdd(pl, w, coopMultiplyAdd(ph, w, o2));
            }
            if (QF > 3u) {
                let w = coopLoadT<coop_mat16x16<f16, B>>(&vt[vb + 48u], KS);
                o3 = coopMultiplyAdd(pl, w, coopMultiplyAdd(ph, w, o3));
            }
            if (QF > 4u) {
                let w = coopLoadT<coop_mat16x16<f16, B>>(&vt[vb + 64u], KS);
                o4 = coopMultiplyAdd(pl, w, coopMultiplyAdd(ph, w, o4));
            }
            if (QF > 5u) {
                let w = coopLoadT<coop_mat16x16<f16, B>>(&vt[vb + 80u], KS);
                o5 = coopMultiplyAdd(pl, w, coopMultiplyAdd(ph, w, o5));
            }
            if (QF > 6u) {
                let w = coopLoadT<coop_mat16x16<f16, B>>(&vt[vb + 96u], KS);
                o6 = coopMultiplyAdd(pl, w, coopMultiplyAdd(ph, w, o6));
            }
            if (QF > 7u) {
                let w = coopLoadT<coop_mat16x16<f16, B>>(&vt[vb + 112u], KS);
                o7 = coopMultiplyAdd(pl, w, coopMultiplyAdd(ph, w, o7));
            }
        }
        // Every subgroup is done with P and V (and has read `jump`) before kt takes the next K.
        if (lid == 0u) {
            jump = vec4<u32>(0u);
        }
        workgroupBarrier();
        if (next < hi) {
            for (var i = 0u; i < HD / 8u; i++) {
                put_k(i, lid, kr[i]);
            }
        }
        workgroupBarrier();
    }

    // The row's sum from its two lanes, then O / l through scr, 32 columns at a time.
    l += subgroupShuffleXor(l, 1u);
    let inv = select(0.0, 1.0 / l, l > 0.0);
    let out_at = q_row * 4u;
    if (QF > 0u) {
        workgroupBarrier();
        if (QF > 0u) {
            coopStoreT(o0, &scr[ob + 0u], SS);
        }
        if (QF > 1u) {
            coopStoreT(o1, &scr[ob + 16u], SS);
        }
        workgroupBarrier();
        write_own_row(ob, lane, 0u, out_at, q_ok, inv);
    }
    if (QF > 2u) {
        workgroupBarrier();
        if (QF > 2u) {
            coopStoreT(o2, &scr[ob + 0u], SS);
        }
        if (QF > 3u) {
            coopStoreT(o3, &scr[ob + 16u], SS);
        }
        workgroupBarrier();
        write_own_row(ob, lane, 32u, out_at, q_ok, inv);
    }
    if (QF > 4u) {
        workgroupBarrier();
        if (QF > 4u) {
            coopStoreT(o4, &scr[ob + 0u], SS);
        }
        if (QF > 5u) {
            coopStoreT(o5, &scr[ob + 16u], SS);
        }
        workgroupBarrier();
        write_own_row(ob, lane, 64u, out_at, q_ok, inv);
    }
    if (QF > 6u) {
        workgroupBarrier();
        if (QF > 6u) {
            coopStoreT(o6, &scr[ob + 0u], SS);
        }
        if (QF > 7u) {
            coopStoreT(o7, &scr[ob + 16u], SS);
        }
        workgroupBarrier();
        write_own_row(ob, lane, 96u, out_at, q_ok, inv);
    }
    if (q_ok && lane % 2u == 0u) {
        lse[q_row / dv] = finish_lse(m * LN2, l);
    }
}

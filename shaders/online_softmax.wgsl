// online_softmax.wgsl: shared by every attention kernel (prepended at build time, never compiled alone).
//
// Algorithm: the running softmax state of one query row is (m, d, o): the largest score seen, the
// sum of exp(s - m) and the unnormalised weighted sum of values. A tile of scores updates it by
// rescaling with exp(m_old - m_new); two states over disjoint keys merge the same way. LSEs are
// natural logs, as in the Rust API; a row that sees no key has d = 0 and reports o = 0, lse = -inf.
//
// Knobs: none. The variant prelude before this file defines `kv4` (vec4 of f32 or f16).
//
// `AttnParams` is mirrored by `AttnParams` in crates/twinfer/src/gpu/params.rs (a test checks the
// layouts agree). -inf never appears as a WGSL value (implementations may assume finite floats):
// the running max starts at -BIG and an empty row's LSE is written as the bits of -inf.

const BIG: f32 = 3.0e38;
const NEG_INF_BITS: u32 = 0xff800000u;
const NO_WINDOW: u32 = 0xffffffffu;

struct AttnParams {
    num_qo_heads: u32,
    num_kv_heads: u32,
    head_dim: u32,
    group: u32,
    page_size: u32,
    batch: u32,
    causal: u32,
    window_left: u32,     // NO_WINDOW: no sliding window
    sm_scale: f32,
    soft_cap: f32,        // 0: no soft-cap
    has_alibi: u32,
    paged: u32,           // 1: K/V are the page pool, 0: ragged contiguous rows
    num_chunks: u32,      // split-K chunks per sequence (decode)
    chunk_len: u32,       // keys per chunk (decode)
    off_indices: u32,     // offsets into `tbl`: page ids,
    off_last_len: u32,    //   last_page_len,
    off_qo_indptr: u32,   //   qo_indptr (prefill),
    off_alibi: u32,       //   ALiBi slopes as f32 bits,
    off_work: u32,        //   prefill work list: (sequence, first row) pairs
    num_work: u32,
    kv_buffer: u32,       // decode: which buffer of a split pool this pass reads
    pages_per_buffer: u32,// pages per pool buffer (page p lives in buffer p / pages_per_buffer)
    kv_codes_at: u32,     // int8 pool: the word where each buffer's codes start (scales first)
    _pad1: u32,
}

// The score transform of the API, in its order: scale, soft-cap, ALiBi.
fn transform_score(p: AttnParams, dot_qk: f32, slope: f32, j: i32, pos: i32) -> f32 {
    var s = dot_qk * p.sm_scale;
    if (p.soft_cap > 0.0) {
        s = p.soft_cap * tanh(s / p.soft_cap);
    }
    return s + slope * f32(j - pos);
}

// Visible keys [lo, hi) of a query at absolute position `pos` (bottom-right aligned).
fn visible_range(p: AttnParams, pos: i32, kv_len: i32) -> vec2<i32> {
    var hi = kv_len;
    if (p.causal != 0u) {
        hi = clamp(pos + 1, 0, kv_len);
    }
    var lo = 0;
    if (p.window_left != NO_WINDOW) {
        lo = clamp(pos - i32(p.window_left), 0, kv_len); // the host sends widths < 2^30 only
    }
    return vec2<i32>(lo, max(hi, lo));
}

// Rescale factor for a running state moving from max `m_old` to `m_new`.
fn rescale(m_old: f32, m_new: f32) -> f32 {
    return exp(m_old - m_new);
}

// The LSE of a finished state, with an empty row reported as -inf.
fn finish_lse(m: f32, d: f32) -> f32 {
    if (d > 0.0) {
        return m + log(d);
    }
    return bitcast<f32>(select(0u, NEG_INF_BITS, d <= 0.0));
}

fn lse_is_empty(x: f32) -> bool {
    return bitcast<u32>(x) == NEG_INF_BITS;
}

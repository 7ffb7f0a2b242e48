//! One work item of the CPU engine: a block of query tokens (with all query heads of one GQA
//! group) against a range of keys of one KV head, by blocked online softmax.
//!
//! Keys are processed in tiles of `KV_TILE` rows, converted to f32 into scratch once and shared by
//! every query row of the block (GQA: the group's heads are rows of the same block). A tile is
//! only visited if some row of the block can see it, so causal and sliding-window masks skip
//! whole tiles. No `[Lq, Lkv]` score matrix exists: only a `[rows, KV_TILE]` tile.

use pulp::Simd;

use crate::attention::problem::Problem;
use crate::cpu::convert::{load_f32, prefetch};
use crate::cpu::math::scale_in_place;
use crate::cpu::microkernel::{scores_t, values_t};
use crate::cpu::softmax::{HeadRows, Tile, finish_rows, softmax_tile, transform_tile};

/// Key rows per tile for one KV head: K and V tiles of 64 x 128 f32 are 32 KiB each (L1/L2).
pub(crate) const KV_TILE: usize = 64;
/// Elements of one K (or V) tile over all heads of an item; decode reads every head of a row at
/// once, so that whole pages stream from memory in order instead of one head's slice per row.
const TILE_ELEMS: usize = KV_TILE * 128 * 4;

/// A block of work: tokens `[tok0, tok1)` of sequence `b` (relative to its first query row), KV
/// heads `[head0, head1)`, restricted to keys `[kv0, kv1)` (the whole sequence unless split-K).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkItem {
    pub b: usize,
    pub head0: usize,
    pub head1: usize,
    pub tok0: usize,
    pub tok1: usize,
    pub kv0: usize,
    pub kv1: usize,
}

/// Per-thread scratch, reused across work items. Query rows are head-major: row
/// `r = (kv_head - head0) * tokens * group + t * group + g`.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// Decode: `[rows, dp]` queries, pre-multiplied by sm_scale. Prompt blocks: one query row as
    /// read, before it is scaled into `qt`.
    pub q: Vec<f32>,
    /// `[tile_rows, heads, dp]` keys of the current tile.
    pub k: Vec<f32>,
    /// `[tile_rows, heads, dp]` values of the current tile.
    pub v: Vec<f32>,
    /// Scores, then probabilities, of the current tile: `[rows, tile_rows]` (decode), or
    /// key-major `[tile_rows, rp]` for one head (prompt blocks).
    pub s: Vec<f32>,
    /// `[rows, dp]` unnormalised output; normalised at the end of `run_item`.
    pub acc: Vec<f32>,
    /// `[rows]` running max, then (at the end) the natural-log LSE.
    pub m: Vec<f32>,
    /// `[rows]` running denominator.
    pub l: Vec<f32>,
    /// `[tokens]` visible key range per token.
    pub range: Vec<(usize, usize)>,
    pub dp: usize,
    /// Prompt blocks: `[heads, dp, rp]` queries transposed (scaled, zero past the block's rows).
    pub qt: Vec<f32>,
    /// Prompt blocks: `[heads, rp]` running max and denominator of the padded rows.
    pub mt: Vec<f32>,
    pub lt: Vec<f32>,
    /// Prompt blocks: `[rp]` the current tile's rescale factor of each row.
    pub alpha: Vec<f32>,
    /// The other blocks of a group ([`run_group`]): their own rows, this scratch's tiles.
    pub others: Vec<Scratch>,
    /// Prompt blocks over bf16 K/V with bf16 dot products (see [`BlockPlan::bf16`]): the
    /// transposed queries rounded to bf16 in pairs of dimensions (`[heads, dp / 2, rp, 2]`), and
    /// a tile's probabilities in pairs of keys (`[tile_rows / 2, rp, 2]`).
    pub qt2: Vec<u16>,
    pub pt2: Vec<u16>,
    /// The K tile's bf16 rows as stored (`[tile_rows, row_stride]`) and the V tile's in pairs of
    /// keys (`[tile_rows / 2, row_stride, 2]`).
    pub k16: Vec<u16>,
    pub v2: Vec<u16>,
}

impl Scratch {
    pub(crate) fn prepare(&mut self, rows: usize, tokens: usize, dp: usize, tile_elems: usize, tile_rows: usize) {
        // Padding columns must be zero; a stride change would expose stale data, so reset then.
        if self.dp != dp {
            self.q.clear();
            self.k.clear();
            self.v.clear();
            self.dp = dp;
        }
        self.q.resize(rows * dp, 0.0);
        if self.k.len() < tile_elems {
            self.k.resize(tile_elems, 0.0);
            self.v.resize(tile_elems, 0.0);
        }
        self.s.resize(rows * tile_rows, 0.0);
        self.acc.clear();
        self.acc.resize(rows * dp, 0.0);
        self.m.clear();
        self.m.resize(rows, f32::NEG_INFINITY);
        self.l.clear();
        self.l.resize(rows, 0.0);
        self.range.clear();
        self.range.resize(tokens, (0, 0));
    }

    /// Sizes the transposed prompt-block buffers: `heads` heads of `rp` padded rows, `dp` columns,
    /// score tiles of `tile_rows` keys.
    fn prepare_transposed(&mut self, heads: usize, dp: usize, rp: usize, tile_rows: usize) {
        self.qt.clear();
        self.qt.resize(heads * dp * rp, 0.0);
        self.mt.clear();
        self.mt.resize(heads * rp, f32::NEG_INFINITY);
        self.lt.clear();
        self.lt.resize(heads * rp, 0.0);
        self.alpha.resize(rp, 1.0);
        self.s.resize(self.s.len().max(tile_rows * rp), 0.0);
    }
}

/// Runs one work item; on return `scratch.acc` holds the normalised output rows (head-major, see
/// [`Scratch`]) and `scratch.m` their LSE (natural log), `-inf` and 0 for rows with no key.
///
/// The block's query rows are held transposed (`[dp, rows]`), so that a tile's scores come out
/// key-major with rows along the vector lanes (`scores_t`): the online softmax then runs on
/// whole vectors of rows (one max, one rescale factor, one denominator per lane) instead of a
/// pass of scalar bookkeeping per row, and no score needs a horizontal sum.
#[inline(always)]
pub(crate) fn run_item<S: Simd>(simd: S, p: &Problem<'_>, item: WorkItem, sc: &mut Scratch) {
    let plan = begin_block::<S>(p, item, sc, true);
    let mut tiles = Tiles::take(sc);
    let mut j0 = plan.lo_all;
    while j0 < plan.hi_all {
        let cols = plan.tile_rows.min(plan.hi_all - j0);
        tiles.load::<S>(p, &plan, j0, cols, plan.hi_all);
        tile_step(simd, p, &plan, sc, &tiles, j0, cols);
        j0 += cols;
    }
    tiles.put_back(sc);
    finish_block(simd, &plan, sc);
}

/// Items of one sequence and KV head (consecutive blocks of tokens) that share each widened K/V
/// tile, so that the widening is paid once per group instead of once per block. Each block
/// visits exactly the tiles it would alone, in the same order, so every result is bit for bit
/// that of [`run_item`]; when the blocks' tiles do not all start at the same key (a sliding
/// window), they run apart. On return `sc` holds the first item's results and `sc.others[i]`
/// those of item `i + 1`.
#[inline(always)]
pub(crate) fn run_group<S: Simd>(simd: S, p: &Problem<'_>, items: &[WorkItem], sc: &mut Scratch) {
    let mut others = std::mem::take(&mut sc.others);
    others.resize_with(items.len().saturating_sub(1), Scratch::default);
    let mut plans = Vec::with_capacity(items.len());
    for (i, &item) in items.iter().enumerate() {
        let block = if i == 0 { &mut *sc } else { &mut others[i - 1] };
        // Only the first block's scratch holds the shared tiles.
        plans.push(begin_block::<S>(p, item, block, i == 0));
    }
    if plans.iter().any(|plan| plan.lo_all != plans[0].lo_all) {
        run_item(simd, p, items[0], sc);
        for (&item, block) in items[1..].iter().zip(&mut others) {
            run_item(simd, p, item, block);
        }
        sc.others = others;
        return;
    }
    let mut tiles = Tiles::take(sc);
    let (lo, tile_rows) = (plans[0].lo_all, plans[0].tile_rows);
    let hi = plans.iter().map(|plan| plan.hi_all).max().unwrap_or(lo);
    let mut j0 = lo;
    while j0 < hi {
        tiles.load::<S>(p, &plans[0], j0, tile_rows.min(hi - j0), hi);
        for (i, plan) in plans.iter().enumerate() {
            if j0 < plan.hi_all {
                let block = if i == 0 { &mut *sc } else { &mut others[i - 1] };
                tile_step(simd, p, plan, block, &tiles, j0, tile_rows.min(plan.hi_all - j0));
            }
        }
        j0 += tile_rows.min(hi - j0);
    }
    tiles.put_back(sc);
    for (i, plan) in plans.iter().enumerate() {
        let block = if i == 0 { &mut *sc } else { &mut others[i - 1] };
        finish_block(simd, plan, block);
    }
    sc.others = others;
}

/// A prompt block's shape and key range, fixed before its first tile.
struct BlockPlan {
    item: WorkItem,
    heads: usize,
    head_rows: usize,
    /// Rows of one head padded to whole vectors.
    rp: usize,
    dp: usize,
    tile_rows: usize,
    /// Elements between consecutive keys of a widened tile (all the item's heads).
    row_stride: usize,
    qo_len: usize,
    kv_len: usize,
    /// Keys some row sees: the tiles run from `lo_all` to `hi_all`.
    lo_all: usize,
    hi_all: usize,
    /// Keys every row sees: tiles inside need no mask.
    lo_max: usize,
    hi_min: usize,
    /// K and V are bf16 and the CPU has bf16 dot products (x86-64 with AVX512-BF16): the tiles
    /// stay bf16, and the queries and probabilities are rounded to bf16 for the products.
    bf16: bool,
}

/// Whether a prompt block of `p` on `S` takes the bf16 dot products: bf16 K and V, AVX-512
/// with AVX512-BF16, and unpadded heads whose dimensions pair into whole vectors.
#[inline(always)]
fn bf16_products<S: Simd>(p: &Problem<'_>, d: usize, dp: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dtype::TensorRef::BF16;
        std::any::TypeId::of::<S>() == std::any::TypeId::of::<pulp::x86::V4>()
            && matches!((p.kv.k(), p.kv.v()), (BF16(_), BF16(_)))
            && dp == d
            && d.is_multiple_of(32)
            && crate::cpu::microkernel_bf16::detected()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, d, dp);
        false
    }
}

/// Sizes the scratch (its K/V tiles too where `tiles`), transposes the block's queries (scaled)
/// into `sc.qt` and finds the key range of every token.
#[inline(always)]
fn begin_block<S: Simd>(p: &Problem<'_>, item: WorkItem, sc: &mut Scratch, tiles: bool) -> BlockPlan {
    let prm = p.params;
    let (d, group, h_qo) = (prm.head_dim, prm.group_size(), prm.num_qo_heads);
    let lanes = S::F32_LANES;
    let dp = d.div_ceil(lanes) * lanes;
    let heads = item.head1 - item.head0;
    let tokens = item.tok1 - item.tok0;
    let head_rows = tokens * group;
    let rp = head_rows.div_ceil(lanes) * lanes;
    let rows = heads * head_rows;
    let tile_rows = (TILE_ELEMS / (heads * dp)).clamp(1, KV_TILE);
    let row_stride = heads * dp;
    sc.prepare(rows, tokens, dp, if tiles { tile_rows * row_stride } else { 0 }, tile_rows);
    sc.prepare_transposed(heads, dp, rp, tile_rows);

    let (q_start, q_end) = p.qo.range(item.b);
    let qo_len = q_end - q_start;
    let kv_len = p.kv.kv_len(item.b);
    let scale = prm.resolved_sm_scale();
    let Scratch { q, qt, .. } = sc;
    for hh in 0..heads {
        let qt = &mut qt[hh * dp * rp..(hh + 1) * dp * rp];
        for t in 0..tokens {
            let q_off = ((q_start + item.tok0 + t) * h_qo + (item.head0 + hh) * group) * d;
            for g in 0..group {
                let r = t * group + g;
                let q = &mut q[..d];
                p.q.read_f32(q_off + g * d, q);
                for (dst, &v) in qt[r..].iter_mut().step_by(rp).zip(q.iter()) {
                    *dst = v * scale;
                }
            }
        }
    }
    let bf16 = bf16_products::<S>(p, d, dp);
    #[cfg(target_arch = "x86_64")]
    if bf16 {
        let (qt, qt2) = (&sc.qt, &mut sc.qt2);
        qt2.resize(heads * dp * rp, 0);
        for (i, pair) in qt2.chunks_exact_mut(2 * rp).enumerate() {
            let row = |i: usize| &qt[i * rp..(i + 1) * rp];
            // SAFETY: `bf16` means AVX-512 with AVX512-BF16 (checked above).
            unsafe { crate::cpu::microkernel_bf16::pair_f32_rows(row(2 * i), Some(row(2 * i + 1)), pair) };
        }
    }

    // Visible keys per token, clipped to this item's key range; their union bounds the tiles,
    // and a tile inside every token's range needs no mask.
    let (mut lo_all, mut hi_all) = (usize::MAX, 0);
    let (mut lo_max, mut hi_min) = (0, usize::MAX);
    for t in 0..tokens {
        let (lo, hi) = prm.visible_range(item.tok0 + t, qo_len, kv_len);
        let (lo, hi) = (lo.max(item.kv0), hi.min(item.kv1));
        sc.range[t] = (lo, hi.max(lo));
        (lo_max, hi_min) = (lo_max.max(lo), hi_min.min(hi.max(lo)));
        if hi > lo {
            lo_all = lo_all.min(lo);
            hi_all = hi_all.max(hi);
        }
    }
    BlockPlan {
        item,
        heads,
        head_rows,
        rp,
        dp,
        tile_rows,
        row_stride,
        qo_len,
        kv_len,
        lo_all,
        hi_all,
        lo_max,
        hi_min,
        bf16,
    }
}

/// The widened K and V tiles (or the bf16 ones), taken out of the scratch while blocks use them.
struct Tiles {
    k: Vec<f32>,
    v: Vec<f32>,
    k16: Vec<u16>,
    v2: Vec<u16>,
}

impl Tiles {
    fn take(sc: &mut Scratch) -> Self {
        use std::mem::take;
        Self { k: take(&mut sc.k), v: take(&mut sc.v), k16: take(&mut sc.k16), v2: take(&mut sc.v2) }
    }

    fn put_back(self, sc: &mut Scratch) {
        (sc.k, sc.v, sc.k16, sc.v2) = (self.k, self.v, self.k16, self.v2);
    }

    /// Widens keys `[j0, j0 + cols)` of the plan's heads into the tiles, and prefetches the next
    /// tile's rows (up to key `hi`).
    #[inline(always)]
    fn load<S: Simd>(&mut self, p: &Problem<'_>, plan: &BlockPlan, j0: usize, cols: usize, hi: usize) {
        let (item, d, dp, row_stride) = (plan.item, p.params.head_dim, plan.dp, plan.row_stride);
        let (k_src, v_src) = (p.kv.k(), p.kv.v());
        let heads = plan.heads;
        // With unpadded heads a row of all the item's heads is one contiguous run in memory.
        let whole_rows = dp == d;
        #[cfg(target_arch = "x86_64")]
        if let (true, crate::dtype::TensorRef::BF16(k), crate::dtype::TensorRef::BF16(v)) = (plan.bf16, k_src, v_src) {
            self.load_bf16(p, plan, (k, v), j0, cols);
            return self.prefetch_next(p, plan, j0 + cols, hi);
        }
        for c in 0..cols {
            let off = p.kv.row_offset(item.b, j0 + c, item.head0);
            let dst = c * row_stride;
            if whole_rows {
                load_f32::<S>(k_src, off, &mut self.k[dst..dst + heads * d]);
                load_f32::<S>(v_src, off, &mut self.v[dst..dst + heads * d]);
            } else {
                for hh in 0..heads {
                    load_f32::<S>(k_src, off + hh * d, &mut self.k[dst + hh * dp..dst + hh * dp + d]);
                    load_f32::<S>(v_src, off + hh * d, &mut self.v[dst + hh * dp..dst + hh * dp + d]);
                }
            }
        }
        self.prefetch_next(p, plan, j0 + cols, hi);
    }

    /// Prefetches the rows of the tile from key `next` (up to key `hi`).
    #[inline(always)]
    fn prefetch_next(&self, p: &Problem<'_>, plan: &BlockPlan, next: usize, hi: usize) {
        let len = plan.heads * p.params.head_dim;
        for c in 0..plan.tile_rows.min(hi.saturating_sub(next)) {
            let off = p.kv.row_offset(plan.item.b, next + c, plan.item.head0);
            prefetch(p.kv.k(), off, len);
            prefetch(p.kv.v(), off, len);
        }
    }

    /// [`Tiles::load`] for bf16 K/V with bf16 dot products: K rows copied as stored, V rows
    /// interleaved in pairs of keys (an odd last key paired with zeros).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn load_bf16(
        &mut self,
        p: &Problem<'_>,
        plan: &BlockPlan,
        (k, v): (&[half::bf16], &[half::bf16]),
        j0: usize,
        cols: usize,
    ) {
        let (item, row_stride) = (plan.item, plan.row_stride);
        let (k, v): (&[u16], &[u16]) = (bytemuck::cast_slice(k), bytemuck::cast_slice(v));
        self.k16.resize(plan.tile_rows * row_stride, 0);
        self.v2.resize(plan.tile_rows.div_ceil(2) * 2 * row_stride, 0);
        // Where key `c` of the tile starts in the pool.
        let at = |c: usize| p.kv.row_offset(item.b, j0 + c, item.head0);
        for c in 0..cols {
            self.k16[c * row_stride..(c + 1) * row_stride].copy_from_slice(&k[at(c)..at(c) + row_stride]);
        }
        for (pair, out) in self.v2.chunks_exact_mut(2 * row_stride).take(cols.div_ceil(2)).enumerate() {
            let first = &v[at(2 * pair)..at(2 * pair) + row_stride];
            let second = (2 * pair + 1 < cols).then(|| &v[at(2 * pair + 1)..at(2 * pair + 1) + row_stride]);
            // SAFETY: `plan.bf16` means AVX-512 (F and BW) is present.
            unsafe { crate::cpu::microkernel_bf16::pair_bf16_rows(first, second, out) };
        }
    }
}

/// Keys `[j0, j0 + cols)` (widened in `tiles`) for every head of the block: scores, the variant
/// and mask, the online-softmax step and the values.
#[inline(always)]
fn tile_step<S: Simd>(
    simd: S,
    p: &Problem<'_>,
    plan: &BlockPlan,
    sc: &mut Scratch,
    tiles: &Tiles,
    j0: usize,
    cols: usize,
) {
    let prm = p.params;
    let (d, group) = (prm.head_dim, prm.group_size());
    let (rp, dp, head_rows, row_stride) = (plan.rp, plan.dp, plan.head_rows, plan.row_stride);
    let tile = Tile { j0, cols, masked: !(plan.lo_max <= j0 && j0 + cols <= plan.hi_min) };
    for hh in 0..plan.heads {
        let st = &mut sc.s[..cols * rp];
        if plan.bf16 {
            bf16_scores(&sc.qt2[hh * dp * rp..(hh + 1) * dp * rp], rp, d, (&tiles.k16, row_stride, hh * dp), cols, st);
        } else {
            let qt = &sc.qt[hh * dp * rp..(hh + 1) * dp * rp];
            scores_t(simd, qt, rp, d, (&tiles.k, row_stride, hh * dp), cols, st);
        }
        let rows_of = HeadRows {
            qo_head0: (plan.item.head0 + hh) * group,
            group,
            tok0: plan.item.tok0,
            qo_len: plan.qo_len,
            kv_len: plan.kv_len,
        };
        transform_tile(prm, rows_of, tile, &sc.range, st, rp);
        let (mt, lt) = (&mut sc.mt[hh * rp..(hh + 1) * rp], &mut sc.lt[hh * rp..(hh + 1) * rp]);
        softmax_tile(simd, st, rp, mt, lt, &mut sc.alpha);
        let acc_head = &mut sc.acc[hh * head_rows * dp..(hh + 1) * head_rows * dp];
        for (r, &a) in sc.alpha[..head_rows].iter().enumerate() {
            if a != 1.0 {
                scale_in_place(simd, &mut acc_head[r * dp..(r + 1) * dp], a);
            }
        }
        if plan.bf16 {
            bf16_values(&sc.s[..cols * rp], &mut sc.pt2, rp, (&tiles.v2, row_stride, hh * dp), cols, dp, acc_head);
        } else {
            values_t(simd, &sc.s[..cols * rp], rp, (&tiles.v, row_stride, hh * dp), cols, dp, acc_head);
        }
    }
}

/// `scores_t` in bf16 dot products (only reached where [`bf16_products`] holds).
#[inline(always)]
fn bf16_scores(q2: &[u16], rp: usize, len: usize, k: (&[u16], usize, usize), cols: usize, st: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a bf16 plan means AVX-512 with AVX512-BF16.
    unsafe {
        crate::cpu::microkernel_bf16::scores(q2, rp, len, k, cols, st)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 prompt blocks are x86-64 only {:?}", (q2.len(), rp, len, k.1, cols, st.len()))
}

/// `values_t` in bf16 dot products: the probabilities `pt` (key-major f32) rounded into pairs
/// of keys in `pt2` first (only reached where [`bf16_products`] holds).
#[inline(always)]
fn bf16_values(
    pt: &[f32],
    pt2: &mut Vec<u16>,
    rp: usize,
    v2: (&[u16], usize, usize),
    cols: usize,
    len: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let pairs = cols.div_ceil(2);
        pt2.resize(pairs * 2 * rp, 0);
        for (pair, out) in pt2.chunks_exact_mut(2 * rp).take(pairs).enumerate() {
            let row = |c: usize| &pt[c * rp..(c + 1) * rp];
            let second = (2 * pair + 1 < cols).then(|| row(2 * pair + 1));
            // SAFETY: a bf16 plan means AVX-512 with AVX512-BF16.
            unsafe { crate::cpu::microkernel_bf16::pair_f32_rows(row(2 * pair), second, out) };
        }
        // SAFETY: as above.
        unsafe { crate::cpu::microkernel_bf16::values(pt2, rp, v2, pairs, len, acc) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 prompt blocks are x86-64 only {:?}", (pt.len(), pt2.len(), rp, v2.1, cols, len, acc.len()))
}

/// Moves the padded rows' max and denominator into `m` and `l`, then normalises.
#[inline(always)]
fn finish_block<S: Simd>(simd: S, plan: &BlockPlan, sc: &mut Scratch) {
    let (rp, head_rows) = (plan.rp, plan.head_rows);
    for hh in 0..plan.heads {
        for r in 0..head_rows {
            sc.m[hh * head_rows + r] = sc.mt[hh * rp + r];
            sc.l[hh * head_rows + r] = sc.lt[hh * rp + r];
        }
    }
    finish_rows(simd, sc, plan.heads * head_rows, plan.dp);
}

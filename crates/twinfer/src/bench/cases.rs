//! The kernel benchmark cases: causal prefill and paged f16 decode on realistic shapes.

use half::f16;

use super::timing::{Stats, time_runs};
use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, KvInput, PrefillInput};
use crate::cpu::CpuEngine;
use crate::error::Result;
use crate::kv::{KvLayout, PageTable, PagedKv};

/// Llama-3-8B-like heads: 32 query heads, 8 KV heads, head_dim 128.
pub const QO_HEADS: usize = 32;
pub const KV_HEADS: usize = 8;
pub const HEAD_DIM: usize = 128;
pub const PAGE_SIZE: usize = 16;

/// What a case is limited by, and so which ceiling it is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// FLOPs / FMA peak.
    Compute,
    /// Bytes / read bandwidth.
    Memory,
}

/// One measured case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub seconds: Stats,
    pub bound: Bound,
    /// FLOPs (compute-bound) or bytes (memory-bound) per run.
    pub work: f64,
}

impl CaseResult {
    /// GFLOP/s or GB/s (median, and the slowest and fastest runs).
    pub fn rate(&self) -> Stats {
        let w = self.work;
        self.seconds.map(|t| w / t / 1e9)
    }
}

fn pseudo_random(n: usize, seed: u64) -> Vec<f16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// Causal single-sequence prefill of `len` tokens, f16 Q/K/V, f32 output.
pub fn prefill_causal(engine: &CpuEngine, len: usize, runs: usize) -> Result<CaseResult> {
    let params = AttentionParams::new(QO_HEADS, KV_HEADS, HEAD_DIM).causal(true);
    let q = pseudo_random(len * QO_HEADS * HEAD_DIM, 1);
    let k = pseudo_random(len * KV_HEADS * HEAD_DIM, 2);
    let v = pseudo_random(len * KV_HEADS * HEAD_DIM, 3);
    let indptr = [0, len as u32];
    let mut o = vec![0f32; len * QO_HEADS * HEAD_DIM];
    let input = PrefillInput {
        q: (&q[..]).into(),
        qo_indptr: &indptr,
        kv: KvInput::Ragged { k: (&k[..]).into(), v: (&v[..]).into(), kv_indptr: &indptr },
    };
    let mut err = None;
    let seconds = time_runs(runs, || {
        if let Err(e) = engine.prefill(&params, &input, &mut AttentionOutput::new(&mut o[..])) {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    // QK^T and PV over the visible (lower-triangular) half, 2 FLOPs per FMA.
    let visible = (len * (len + 1) / 2) as f64;
    let work = 4.0 * visible * (QO_HEADS * HEAD_DIM) as f64;
    Ok(CaseResult { name: format!("prefill causal L={len}"), seconds, bound: Bound::Compute, work })
}

/// Paged decode, f16 KV, page size 16, `batch` sequences of `ctx` tokens on shuffled pages.
pub fn decode_paged(engine: &CpuEngine, batch: usize, ctx: usize, runs: usize) -> Result<CaseResult> {
    let params = AttentionParams::new(QO_HEADS, KV_HEADS, HEAD_DIM);
    let layout = KvLayout::new(PAGE_SIZE, KV_HEADS, HEAD_DIM)?;
    let pages_per_seq = ctx.div_ceil(PAGE_SIZE);
    let num_pages = batch * pages_per_seq;
    let k = pseudo_random(num_pages * layout.page_elems(), 4);
    let v = pseudo_random(num_pages * layout.page_elems(), 5);
    // Pages in a scrambled order, as a long-running cache hands them out.
    let mut indices: Vec<u32> = (0..num_pages as u32).collect();
    let mut s = 0x2545F4914F6CDD1Du64;
    for i in (1..indices.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        indices.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let indptr: Vec<u32> = (0..=batch).map(|b| (b * pages_per_seq) as u32).collect();
    let last = vec![((ctx - 1) % PAGE_SIZE + 1) as u32; batch];
    let q = pseudo_random(batch * QO_HEADS * HEAD_DIM, 6);
    let mut o = vec![f16::ZERO; batch * QO_HEADS * HEAD_DIM];
    let input = DecodeInput {
        q: (&q[..]).into(),
        kv: PagedKv::new((&k[..]).into(), (&v[..]).into(), layout)?,
        table: PageTable::new(&indptr, &indices, &last),
    };
    let mut err = None;
    let seconds = time_runs(runs, || {
        if let Err(e) = engine.decode(&params, &input, &mut AttentionOutput::new(&mut o[..])) {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    let work = (batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2) as f64; // K and V, 2 bytes each
    Ok(CaseResult {
        name: format!("decode f16 page16 batch={batch} ctx={}K", ctx / 1024),
        seconds,
        bound: Bound::Memory,
        work,
    })
}

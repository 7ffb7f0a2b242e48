//! The kernel benchmark cases: causal prefill and paged f16 decode on realistic shapes.

use half::f16;
use std::fmt;

use super::timing::{Stats, time_runs};
use crate::attention::{AttentionOutput, AttentionParams, DecodeInput, KvInput, PrefillInput};
use crate::cpu::CpuEngine;
use crate::dtype::{DType, TensorRef};
use crate::error::{Result, TwinferError};
use crate::kv::{KvLayout, PageTable, PagedKv};

/// Llama-3-8B-like heads: 32 query heads, 8 KV heads, head_dim 128.
pub const QO_HEADS: usize = 32;
/// Llama-3-8B-like KV heads of the cases.
pub const KV_HEADS: usize = 8;
/// Elements per head of the cases.
pub const HEAD_DIM: usize = 128;
/// KV page size of the decode cases, in tokens.
pub const PAGE_SIZE: usize = 16;
/// Bytes of one token's K (or V) row in the decode cases: every KV head's slice, in f16.
pub const ROW_BYTES: usize = KV_HEADS * HEAD_DIM * 2;

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
    /// The case's name, as printed.
    pub name: String,
    /// Seconds per run.
    pub seconds: Stats,
    /// GPU cases timed with timestamp queries: the submit-to-completion wall time per run, as a
    /// cross-check of `seconds`.
    pub wall: Option<Stats>,
    /// Whether FLOPs or bytes limit the case.
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

pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<f16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// FLOPs of one causal prefill of `len` tokens with the case's heads: QK^T and PV over the
/// visible (lower-triangular) half of the score matrix, 2 FLOPs per multiply-add.
pub fn prefill_causal_flops(len: usize) -> f64 {
    let visible = (len * (len + 1) / 2) as f64;
    4.0 * visible * (QO_HEADS * HEAD_DIM) as f64
}

/// A context length as case names print it: `8K` for multiples of 1024, else the token count.
pub fn context_name(ctx: usize) -> String {
    if ctx.is_multiple_of(1024) { format!("{}K", ctx / 1024) } else { ctx.to_string() }
}

/// Bytes of K and V (f16) one paged decode step reads: `batch * ctx` rows of every KV head.
pub fn decode_paged_bytes(batch: usize, ctx: usize) -> f64 {
    (batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2) as f64 // K and V, 2 bytes each
}

/// The KV pool of a decode case, in its storage dtype.
#[derive(Clone)]
enum Pool {
    F16(Vec<f16>),
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    /// int8 codes and a scale per row of a head.
    Q8(Vec<i8>, Vec<f32>),
}

impl Pool {
    /// The pool in memory advised as the engine's own pool is (2-MiB pages where Linux grants them).
    fn new(values: Vec<f16>, dtype: DType) -> Result<Self> {
        use crate::huge_pages::vec_from;
        match dtype {
            DType::F16 => Ok(Pool::F16(vec_from(values.len(), |i| values[i]))),
            DType::F32 => Ok(Pool::F32(vec_from(values.len(), |i| values[i].to_f32()))),
            DType::BF16 => Ok(Pool::BF16(vec_from(values.len(), |i| half::bf16::from_f32(values[i].to_f32())))),
            DType::Q8 => {
                let f: Vec<f32> = values.iter().map(|x| x.to_f32()).collect();
                let (mut codes, mut scales) = (vec_from(f.len(), |_| 0i8), vec_from(f.len() / HEAD_DIM, |_| 0f32));
                crate::dtype::quantize_q8(&f, HEAD_DIM, &mut codes, &mut scales);
                Ok(Pool::Q8(codes, scales))
            }
        }
    }
    fn tensor(&self) -> TensorRef<'_> {
        match self {
            Pool::F16(v) => v[..].into(),
            Pool::F32(v) => v[..].into(),
            Pool::BF16(v) => v[..].into(),
            Pool::Q8(codes, scales) => TensorRef::Q8(crate::dtype::Q8Ref { codes, scales, group: HEAD_DIM }),
        }
    }
}

/// The inputs of a causal single-sequence prefill of `len` tokens: f16 Q/K/V, f32 output.
/// Built once; [`PrefillCausal::run`] is what a harness times.
#[derive(Clone)]
pub struct PrefillCausal {
    /// Tokens in the sequence.
    pub len: usize,
    /// Heads and causal mask of the case.
    pub params: AttentionParams,
    /// `[len, QO_HEADS, HEAD_DIM]`
    q: Vec<f16>,
    /// `[len, KV_HEADS, HEAD_DIM]`
    k: Vec<f16>,
    /// `[len, KV_HEADS, HEAD_DIM]`
    v: Vec<f16>,
    /// K and V rounded to bf16, for the case over a bf16 cache (`None`: f16 K/V).
    kv_bf16: Option<(Vec<half::bf16>, Vec<half::bf16>)>,
    indptr: [u32; 2],
    /// `[len, QO_HEADS, HEAD_DIM]`
    o: Vec<f32>,
}

impl PrefillCausal {
    /// Builds the case's seeded pseudo-random inputs for `len` tokens.
    pub fn new(len: usize) -> Self {
        Self {
            len,
            params: AttentionParams::new(QO_HEADS, KV_HEADS, HEAD_DIM).causal(true),
            q: pseudo_random(len * QO_HEADS * HEAD_DIM, 1),
            k: pseudo_random(len * KV_HEADS * HEAD_DIM, 2),
            v: pseudo_random(len * KV_HEADS * HEAD_DIM, 3),
            kv_bf16: None,
            indptr: [0, len as u32],
            o: vec![0f32; len * QO_HEADS * HEAD_DIM],
        }
    }

    /// The same case over bf16 K/V (the f16 values rounded), which CPUs with bf16 dot products
    /// multiply in them.
    pub fn with_bf16_kv(mut self) -> Self {
        let round = |x: &[f16]| x.iter().map(|v| half::bf16::from_f32(v.to_f32())).collect();
        self.kv_bf16 = Some((round(&self.k), round(&self.v)));
        self
    }

    /// One prefill into the case's own output buffer.
    pub fn run(&mut self, engine: &CpuEngine) -> Result<()> {
        let (k, v) = match &self.kv_bf16 {
            Some((k, v)) => ((&k[..]).into(), (&v[..]).into()),
            None => ((&self.k[..]).into(), (&self.v[..]).into()),
        };
        let input = PrefillInput {
            q: (&self.q[..]).into(),
            qo_indptr: &self.indptr,
            kv: KvInput::Ragged { k, v, kv_indptr: &self.indptr },
        };
        engine.prefill(&self.params, &input, &mut AttentionOutput::new(&mut self.o[..]))
    }

    /// The last run's output.
    pub fn output(&self) -> &[f32] {
        &self.o
    }

    /// FLOPs of one run (see [`prefill_causal_flops`]).
    pub fn flops(&self) -> f64 {
        prefill_causal_flops(self.len)
    }

    /// The case's name, such as `prefill causal L=4096`.
    pub fn name(&self) -> String {
        let kv = if self.kv_bf16.is_some() { " bf16 KV" } else { "" };
        format!("prefill causal L={}{kv}", self.len)
    }
}

/// The inputs of a paged decode step: f16 (or f32) KV, page size 16, `batch` sequences of `ctx`
/// tokens on pages in a scrambled order, f16 output. Built once; [`DecodePaged::run`] is what a
/// harness times.
#[derive(Clone)]
pub struct DecodePaged {
    /// Sequences in the step.
    pub batch: usize,
    /// Tokens of context per sequence.
    pub ctx: usize,
    /// Heads of the case (no mask).
    pub params: AttentionParams,
    /// Page layout of the KV pool.
    pub layout: KvLayout,
    /// `[num_pages, page_size, KV_HEADS, HEAD_DIM]`
    k: Pool,
    /// `[num_pages, page_size, KV_HEADS, HEAD_DIM]`
    v: Pool,
    indptr: Vec<u32>,
    indices: Vec<u32>,
    last_page_len: Vec<u32>,
    /// `[batch, QO_HEADS, HEAD_DIM]`
    q: Vec<f16>,
    /// `[batch, QO_HEADS, HEAD_DIM]`
    o: Vec<f16>,
}

impl DecodePaged {
    /// The case with an f16 KV pool (see [`with_kv_dtype`](Self::with_kv_dtype)).
    pub fn new(batch: usize, ctx: usize) -> Result<Self> {
        Self::with_kv_dtype(batch, ctx, DType::F16)
    }

    /// The same case with the KV pool stored as `dtype` (f16, f32, bf16, or q8 quantized from them).
    pub fn with_kv_dtype(batch: usize, ctx: usize, dtype: DType) -> Result<Self> {
        Self::with_pages(batch, ctx, dtype, PAGE_SIZE)
    }

    /// The same case with `page_size` tokens per page.
    pub fn with_pages(batch: usize, ctx: usize, dtype: DType, page_size: usize) -> Result<Self> {
        let params = AttentionParams::new(QO_HEADS, KV_HEADS, HEAD_DIM);
        let layout = KvLayout::new(page_size, KV_HEADS, HEAD_DIM)?;
        let pages_per_seq = ctx.div_ceil(page_size);
        let num_pages = batch * pages_per_seq;
        let k = Pool::new(pseudo_random(num_pages * layout.page_elems(), 4), dtype)?;
        let v = Pool::new(pseudo_random(num_pages * layout.page_elems(), 5), dtype)?;
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
        let last_page_len = vec![if ctx == 0 { 0 } else { ((ctx - 1) % page_size + 1) as u32 }; batch];
        let q = pseudo_random(batch * QO_HEADS * HEAD_DIM, 6);
        let o = vec![f16::ZERO; batch * QO_HEADS * HEAD_DIM];
        Ok(Self { batch, ctx, params, layout, k, v, indptr, indices, last_page_len, q, o })
    }

    /// One decode step into the case's own output buffer.
    pub fn run(&mut self, engine: &CpuEngine) -> Result<()> {
        let input = DecodeInput {
            q: (&self.q[..]).into(),
            kv: PagedKv::new(self.k.tensor(), self.v.tensor(), self.layout)?,
            table: PageTable::new(&self.indptr, &self.indices, &self.last_page_len),
        };
        engine.decode(&self.params, &input, &mut AttentionOutput::new(&mut self.o[..]))
    }

    /// The last run's output.
    pub fn output(&self) -> &[f16] {
        &self.o
    }

    /// Storage type of the KV pool.
    pub fn kv_dtype(&self) -> DType {
        self.k.tensor().dtype()
    }

    /// Bytes of K and V the step reads (int8: the codes and a 4-byte scale per row of a head).
    pub fn bytes(&self) -> f64 {
        let per_row = self.layout.page_bytes(self.kv_dtype()) as f64 / self.layout.page_size as f64;
        2.0 * (self.batch * self.ctx) as f64 * per_row
    }

    /// The case's name, such as `decode f16 page16 batch=8 ctx=4K`.
    pub fn name(&self) -> String {
        let page = self.layout.page_size;
        format!("decode {} page{page} batch={} ctx={}", self.kv_dtype(), self.batch, context_name(self.ctx))
    }
}

/// The name only: the tensors are megabytes of numbers nobody wants in a log.
impl fmt::Debug for PrefillCausal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl fmt::Debug for DecodePaged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Times `runs` runs of `run` (after one warm-up), stopping at the first error.
fn time_case(runs: usize, mut run: impl FnMut() -> Result<()>) -> Result<Stats> {
    let mut err = None;
    let seconds = time_runs(runs, || {
        if err.is_none()
            && let Err(e) = run()
        {
            err = Some(e);
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(seconds),
    }
}

/// Causal single-sequence prefill of `len` tokens, f16 Q/K/V, f32 output.
pub fn prefill_causal(engine: &CpuEngine, len: usize, bf16_kv: bool, runs: usize) -> Result<CaseResult> {
    let mut case = if bf16_kv { PrefillCausal::new(len).with_bf16_kv() } else { PrefillCausal::new(len) };
    let seconds = time_case(runs, || case.run(engine))?;
    Ok(CaseResult { name: case.name(), seconds, wall: None, bound: Bound::Compute, work: case.flops() })
}

/// Paged decode, `dtype` KV, page size 16, `batch` sequences of `ctx` tokens on shuffled pages.
pub fn decode_paged(
    engine: &CpuEngine,
    batch: usize,
    ctx: usize,
    dtype: DType,
    page: usize,
    runs: usize,
) -> Result<CaseResult> {
    let mut case = DecodePaged::with_pages(batch, ctx, dtype, page)?;
    let seconds = time_case(runs, || case.run(engine))?;
    Ok(CaseResult { name: case.name(), seconds, wall: None, bound: Bound::Memory, work: case.bytes() })
}

/// How a projection case stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearWeights {
    /// f32.
    F32,
    /// f16, widened in registers (the float kernel).
    F16,
    /// bf16, multiplied with the activations rounded to bf16 (in bf16 dot products where the CPU
    /// has them).
    BF16,
    /// A block format, multiplied in integers with activations quantized to these codes.
    Quant(crate::quant::QuantFormat, crate::cpu::ActivationCodes),
}

impl LinearWeights {
    /// `f32`, `f16`, `bf16`, or a format that float weights quantize into (`q8_0`, `q4_1`, ...),
    /// with 16-bit activation codes, or 8-bit ones after `-i8` (`q8_0-i8`).
    pub fn parse(name: &str) -> Result<Self> {
        use crate::cpu::ActivationCodes;
        Ok(match name.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            other => {
                let (other, codes) = match other.strip_suffix("-i8") {
                    Some(format) => (format, ActivationCodes::Int8),
                    None => (other, ActivationCodes::Int16),
                };
                let format = crate::quant::QuantFormat::parse(other)?;
                if !format.can_quantize() {
                    return Err(TwinferError::InvalidParameter(format!(
                        "linear-{other}: the benchmark quantizes random weights, which {other} (read from files only) cannot be"
                    )));
                }
                Self::Quant(format, codes)
            }
        })
    }

    fn name(self) -> String {
        match self {
            Self::F32 => "f32".into(),
            Self::F16 => "f16".into(),
            Self::BF16 => "bf16".into(),
            Self::Quant(format, crate::cpu::ActivationCodes::Int16) => format.name().into(),
            Self::Quant(format, crate::cpu::ActivationCodes::Int8) => format!("{}-i8", format.name()),
        }
    }
}

/// A projection of `rows` activation rows through an `[n, k]` weight matrix stored as `weights`,
/// its inputs built once (block formats quantized from the same random floats).
#[derive(Debug)]
pub struct LinearCase {
    rows: usize,
    n: usize,
    k: usize,
    weights: LinearWeights,
    x: Vec<f32>,
    w16: Vec<half::f16>,
    w32: Vec<f32>,
    wb16: Vec<half::bf16>,
    packed: Option<crate::quant::PackedQuant>,
    /// bf16 weights' panels, made on the first run (`Some(None)`: the level takes none).
    bf16_panels: Option<Option<crate::cpu::Bf16Panels>>,
    y: Vec<f32>,
}

impl LinearCase {
    /// The case's inputs.
    pub fn new(rows: usize, n: usize, k: usize, weights: LinearWeights) -> Result<Self> {
        use crate::quant::{PackedQuant, QuantRows};
        let x: Vec<f32> = pseudo_random(rows * k, 11).iter().map(|v| v.to_f32()).collect();
        let w16 = pseudo_random(n * k, 12);
        let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let wb16: Vec<half::bf16> = w32.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let packed = match weights {
            LinearWeights::Quant(format, _) => Some(PackedQuant::from_rows(&QuantRows::quantize(format, &w32, n, k)?)?),
            _ => None,
        };
        Ok(Self { rows, n, k, weights, x, w16, w32, wb16, packed, bf16_panels: None, y: vec![f32::NAN; rows * n] })
    }

    /// The report's name: `linear FORMAT ROWSxNxK`.
    pub fn name(&self) -> String {
        format!("linear {} {}x{}x{}", self.weights.name(), self.rows, self.n, self.k)
    }

    /// 2 FLOPs per multiply-add.
    pub fn flops(&self) -> f64 {
        2.0 * (self.rows * self.n * self.k) as f64
    }

    /// One product on the engine's threads.
    pub fn run(&mut self, engine: &CpuEngine) -> Result<()> {
        let (level, rows, n, k) = (engine.level(), self.rows, self.n, self.k);
        match (&self.packed, self.weights) {
            // `new` packs every block format.
            (Some(p), LinearWeights::Quant(_, codes)) => {
                crate::cpu::linear_quant(level, codes, &self.x, rows, p, None, &mut self.y)
            }
            (_, LinearWeights::F32) => {
                crate::cpu::linear(level, &self.x, rows, TensorRef::F32(&self.w32), n, k, None, &mut self.y)
            }
            (_, LinearWeights::BF16) => {
                // Packed once, as a model keeps its bf16 weights where the level has bf16 dot
                // products (the first run, a warm-up, makes them).
                let w = [TensorRef::BF16(&self.wb16)];
                if self.bf16_panels.is_none() {
                    self.bf16_panels = Some(crate::cpu::Bf16Panels::pack(level, &w, k));
                }
                let panels = self.bf16_panels.as_ref().and_then(|p| p.as_ref());
                crate::cpu::linear_parts_packed(level, &self.x, rows, &w, panels, k, None, &mut self.y)
            }
            _ => crate::cpu::linear(level, &self.x, rows, TensorRef::F16(&self.w16), n, k, None, &mut self.y),
        }
    }
}

/// Times [`LinearCase`] on the engine's threads, compared with the f32 FMA peak (integer dot
/// products can pass it).
pub fn linear(
    engine: &CpuEngine,
    rows: usize,
    n: usize,
    k: usize,
    weights: LinearWeights,
    runs: usize,
) -> Result<CaseResult> {
    let mut case = LinearCase::new(rows, n, k, weights)?;
    let seconds = time_case(runs, || case.run(engine))?;
    Ok(CaseResult { name: case.name(), seconds, wall: None, bound: Bound::Compute, work: case.flops() })
}

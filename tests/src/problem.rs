//! Random attention problems and how to check a backend's answer against the oracle.

use proptest::prelude::*;
use twinfer::kv::{KvLayout, PageTable, PagedKv};
use twinfer::reference::{self, RefOutput};
use twinfer::{
    AttentionOutput, AttentionParams, DType, DecodeInput, KvInput, PrefillInput, Result, TensorMut, TensorRef, bf16,
    f16,
};

use crate::rng::Rng;

/// Which operation a case exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Prefill,
    Decode,
}

/// Where a prefill reads its keys from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    Ragged,
    Paged,
}

/// One generated problem. Every field is printed when a property fails.
#[derive(Debug, Clone)]
pub struct Case {
    pub mode: Mode,
    pub kv_kind: KvKind,
    pub qo_lens: Vec<usize>,
    pub kv_lens: Vec<usize>,
    pub page_size: usize,
    pub num_kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub window_left: Option<usize>,
    pub soft_cap: Option<f32>,
    pub alibi: bool,
    pub sm_scale: Option<f32>,
    pub q_dtype: DType,
    pub kv_dtype: DType,
    pub o_dtype: DType,
    pub want_lse: bool,
    /// Multiplies q so that some cases have peaked, some flat softmax rows.
    pub q_gain: f32,
    pub seed: u64,
}

impl Case {
    /// A hand-written case: page size 16, 2 KV heads, group 4, head_dim 64, f32 Q and output, f16
    /// K/V, lse, gain 4, no mask or score variant; tests override fields with struct update syntax.
    pub fn pinned(mode: Mode, kv_kind: KvKind, qo_lens: Vec<usize>, kv_lens: Vec<usize>) -> Self {
        Case {
            mode,
            kv_kind,
            qo_lens,
            kv_lens,
            page_size: 16,
            num_kv_heads: 2,
            group: 4,
            head_dim: 64,
            causal: false,
            window_left: None,
            soft_cap: None,
            alibi: false,
            sm_scale: None,
            q_dtype: DType::F32,
            kv_dtype: DType::F16,
            o_dtype: DType::F32,
            want_lse: true,
            q_gain: 4.0,
            seed: 1,
        }
    }
}

/// Lengths that break kernels: 1, odd primes, page multiples and one past, tile edges.
fn nasty_len(rng: &mut Rng, page_size: usize, max: usize) -> usize {
    let k = 1 + rng.below(3);
    let picks = [1, 54, 97, page_size * k, page_size * k + 1, 63, 64, 65, 1 + rng.below(max)];
    picks[rng.below(picks.len())].clamp(1, max)
}

fn dtype_strategy(allow_bf16: bool) -> BoxedStrategy<DType> {
    if allow_bf16 {
        prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)].boxed()
    } else {
        prop_oneof![Just(DType::F32), Just(DType::F16)].boxed()
    }
}

/// K/V storage: the float types, and on the CPU engine (`allow_bf16`) also bf16 and int8.
fn kv_dtype_strategy(cpu: bool) -> BoxedStrategy<DType> {
    if cpu {
        prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16), Just(DType::Q8)].boxed()
    } else {
        dtype_strategy(false)
    }
}

/// Random cases: batch 1..=max_batch, page sizes 1/3/16/64, GQA 1/2/4/8, head_dim 64/72/128/256
/// (plus small ones), every variant, f32/f16 (and bf16 and int8 KV where `allow_bf16`).
pub fn case_strategy(mode: Mode, max_batch: usize, max_len: usize, allow_bf16: bool) -> impl Strategy<Value = Case> {
    let shape = (
        1..=max_batch,
        prop_oneof![Just(1usize), Just(3), Just(16), Just(64)],
        1..=2usize,
        prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        prop_oneof![Just(64usize), Just(72), Just(128), Just(256), Just(8), Just(24)],
        any::<u64>(),
    );
    let variant = (
        any::<bool>(),
        prop_oneof![3 => Just(None), 1 => (0..80usize).prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => prop_oneof![Just(5.0f32), Just(30.0)].prop_map(Some)],
        prop_oneof![3 => Just(false), 1 => Just(true)],
        prop_oneof![3 => Just(None), 1 => (0.01f32..0.5).prop_map(Some)],
        prop_oneof![Just(1.0f32), Just(4.0), Just(12.0)],
    );
    let dtypes =
        (dtype_strategy(false), kv_dtype_strategy(allow_bf16), dtype_strategy(false), any::<bool>(), any::<bool>());
    (shape, variant, dtypes).prop_map(move |(shape, variant, dtypes)| {
        let (batch, page_size, num_kv_heads, group, head_dim, seed) = shape;
        let (causal, window_left, soft_cap, alibi, sm_scale, q_gain) = variant;
        let (q_dtype, kv_dtype, o_dtype, want_lse, ragged) = dtypes;
        let mut rng = Rng::new(seed);
        let kv_lens: Vec<usize> = (0..batch).map(|_| nasty_len(&mut rng, page_size, max_len)).collect();
        let qo_lens = match mode {
            Mode::Decode => vec![1; batch],
            // Mostly a chunk at the end of the keys; sometimes more queries than keys.
            Mode::Prefill => kv_lens
                .iter()
                .map(|&kv| if rng.below(8) == 0 { kv + 1 + rng.below(8) } else { 1 + rng.below(kv.min(72)) })
                .collect(),
        };
        let kv_kind = if mode == Mode::Prefill && ragged { KvKind::Ragged } else { KvKind::Paged };
        Case {
            mode,
            kv_kind,
            qo_lens,
            kv_lens,
            page_size,
            num_kv_heads,
            group,
            head_dim,
            causal: causal && mode == Mode::Prefill,
            window_left,
            soft_cap,
            alibi,
            sm_scale,
            q_dtype,
            kv_dtype,
            o_dtype,
            want_lse,
            q_gain,
            seed,
        }
    })
}

/// An owned buffer in one of the storage dtypes.
#[derive(Debug, Clone)]
pub enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// int8 codes, one scale per `group` codes.
    Q8(Vec<i8>, Vec<f32>, usize),
}

impl Buf {
    /// `xs` in a float dtype (Q8 needs its group: [`Buf::from_f32_grouped`]).
    pub fn from_f32(dtype: DType, xs: &[f32]) -> Self {
        Self::from_f32_grouped(dtype, xs, 0)
    }
    /// `xs` in `dtype`; Q8 quantizes each run of `group` values with its own scale.
    pub fn from_f32_grouped(dtype: DType, xs: &[f32], group: usize) -> Self {
        match dtype {
            DType::F32 => Buf::F32(xs.to_vec()),
            DType::F16 => Buf::F16(xs.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => Buf::BF16(xs.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::Q8 => {
                assert!(group > 0 && xs.len().is_multiple_of(group), "Q8 needs whole groups");
                let (mut codes, mut scales) = (vec![0i8; xs.len()], vec![0f32; xs.len() / group]);
                twinfer::quantize_q8(xs, group, &mut codes, &mut scales);
                Buf::Q8(codes, scales, group)
            }
        }
    }
    pub fn zeros(dtype: DType, n: usize) -> Self {
        Self::from_f32(dtype, &vec![0.0; n])
    }
    pub fn view(&self) -> TensorRef<'_> {
        match self {
            Buf::F32(v) => TensorRef::F32(v),
            Buf::F16(v) => TensorRef::F16(v),
            Buf::BF16(v) => TensorRef::BF16(v),
            Buf::Q8(c, s, g) => TensorRef::Q8(twinfer::Q8Ref { codes: c, scales: s, group: *g }),
        }
    }
    pub fn view_mut(&mut self) -> TensorMut<'_> {
        match self {
            Buf::F32(v) => TensorMut::F32(v),
            Buf::F16(v) => TensorMut::F16(v),
            Buf::BF16(v) => TensorMut::BF16(v),
            Buf::Q8(c, s, g) => TensorMut::Q8(twinfer::Q8Mut { codes: c, scales: s, group: *g }),
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Buf::F32(v) => v.clone(),
            Buf::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Buf::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Buf::Q8(..) => {
                let mut out = vec![0f32; self.view().len()];
                self.view().read_f32(0, &mut out);
                out
            }
        }
    }
}

/// Error bound `atol + rtol * |ref| + SCORE_ROUNDING * eps(f32) * score_abs * v_abs` for one
/// output dtype (lse: `lse_atol * max(|ref|, 1) + SCORE_ROUNDING * eps(f32) * score_abs`).
///
/// The last term is the f32 forward error of the scores: a dot product whose terms cancel loses
/// digits relative to `sum |q_c k_c|`, not to the result, and `exp` turns an absolute score error
/// into a relative weight error. It matters only for large logits (q gain 12, head_dim 256: a few
/// 1e-5), where a fixed bound would fail a kernel that is exact to f32's own rounding.
///
/// Where the kernel multiplies bf16 K/V in bf16 dot products (`bf16_products`), the queries and
/// the probabilities are rounded to bf16 too (relative error at most [`BF16_UNIT`] each): a
/// score moves by at most `BF16_UNIT * score_abs`, which moves an output by at most twice that
/// times `v_abs` (and the LSE by that), and a probability's rounding moves it by `BF16_UNIT *
/// v_abs`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
    pub lse_atol: f64,
    pub bf16_products: bool,
}

/// bf16's unit roundoff: 8 significant bits, half a unit in the last place relative.
pub const BF16_UNIT: f64 = 1.0 / 256.0;

/// Multiples of f32's epsilon allowed per unit of score magnitude (see [`Tolerance`]).
pub const SCORE_ROUNDING: f64 = 4.0;

impl Tolerance {
    /// The bound for output element `r` of a row with the given score and value magnitudes.
    pub fn o_bound(&self, r: f64, score_abs: f64, v_abs: f64) -> f64 {
        let bf16 = if self.bf16_products { BF16_UNIT * v_abs * (1.0 + 2.0 * score_abs) } else { 0.0 };
        self.atol + self.rtol * r.abs() + SCORE_ROUNDING * f32::EPSILON as f64 * score_abs * v_abs + bf16
    }

    /// The bound for an lse whose oracle value is `r`.
    pub fn lse_bound(&self, r: f64, score_abs: f64) -> f64 {
        let bf16 = if self.bf16_products { BF16_UNIT * score_abs } else { 0.0 };
        self.lse_atol * r.abs().max(1.0) + SCORE_ROUNDING * f32::EPSILON as f64 * score_abs + bf16
    }

    pub fn for_output(dtype: DType) -> Self {
        match dtype {
            DType::F32 => Tolerance { atol: 2e-5, rtol: 2e-5, lse_atol: 5e-5, bf16_products: false },
            DType::F16 => Tolerance { atol: 1e-3, rtol: 2e-3, lse_atol: 5e-5, bf16_products: false },
            DType::BF16 => Tolerance { atol: 8e-3, rtol: 8e-3, lse_atol: 5e-5, bf16_products: false },
            DType::Q8 => unreachable!("outputs are float"),
        }
    }
}

/// The tensors of one case, with the paged pool shuffled and padded with garbage pages.
#[derive(Debug, Clone)]
pub struct CaseData {
    pub case: Case,
    pub params: AttentionParams,
    pub q: Buf,
    pub qo_indptr: Vec<u32>,
    /// Ragged KV `[total_kv, num_kv_heads, head_dim]`: the keys in order.
    pub k: Buf,
    pub v: Buf,
    pub kv_indptr: Vec<u32>,
    /// Paged pools and their table: the same keys, scattered over shuffled pages.
    pub k_pool: Buf,
    pub v_pool: Buf,
    pub layout: KvLayout,
    pub page_indptr: Vec<u32>,
    pub page_indices: Vec<u32>,
    pub last_page_len: Vec<u32>,
}

impl CaseData {
    /// The case with its pages shuffled among garbage pages.
    pub fn new(case: &Case) -> Self {
        Self::build(case, true)
    }

    /// The same tensors with every sequence's pages in order and no spare pages: the gathered KV.
    pub fn contiguous(case: &Case) -> Self {
        Self::build(case, false)
    }

    fn build(case: &Case, shuffled: bool) -> Self {
        let mut rng = Rng::new(case.seed.rotate_left(17));
        let (hk, d) = (case.num_kv_heads, case.head_dim);
        let hq = hk * case.group;
        let total_q: usize = case.qo_lens.iter().sum();
        let total_kv: usize = case.kv_lens.iter().sum();
        let q: Vec<f32> = (0..total_q * hq * d).map(|_| rng.uniform() * case.q_gain).collect();
        let k: Vec<f32> = (0..total_kv * hk * d).map(|_| rng.uniform()).collect();
        let v: Vec<f32> = (0..total_kv * hk * d).map(|_| rng.uniform()).collect();
        let alibi = case.alibi.then(|| (0..hq).map(|h| 0.5f32.powi(h as i32 % 8 + 1)).collect());
        let params = AttentionParams::new(hq, hk, d)
            .causal(case.causal)
            .window_left(case.window_left)
            .logits_soft_cap(case.soft_cap)
            .alibi_slopes(alibi)
            .sm_scale(case.sm_scale);
        let ps = case.page_size;
        let layout = KvLayout::new(ps, hk, d).expect("generated layout is valid");
        let pages_per_seq: Vec<usize> = case.kv_lens.iter().map(|l| l.div_ceil(ps)).collect();
        let used: usize = pages_per_seq.iter().sum();
        let num_pages = if shuffled { used + 1 + rng.below(4) } else { used.max(1) };
        let mut ids: Vec<u32> = (0..num_pages as u32).collect();
        if shuffled {
            rng.shuffle(&mut ids);
        }
        // Unused pages hold garbage that must never leak into a result.
        let row = hk * d;
        let mut k_pool: Vec<f32> = (0..num_pages * ps * row).map(|_| 100.0 + rng.uniform()).collect();
        let mut v_pool: Vec<f32> = (0..num_pages * ps * row).map(|_| -100.0 + rng.uniform()).collect();
        let (mut page_indptr, mut page_indices, mut last_page_len) = (vec![0u32], Vec::new(), Vec::new());
        let mut next = 0;
        let mut kv_row = 0;
        for (b, &len) in case.kv_lens.iter().enumerate() {
            let pages = &ids[next..next + pages_per_seq[b]];
            next += pages_per_seq[b];
            for j in 0..len {
                let dst = (pages[j / ps] as usize * ps + j % ps) * row;
                k_pool[dst..dst + row].copy_from_slice(&k[(kv_row + j) * row..(kv_row + j + 1) * row]);
                v_pool[dst..dst + row].copy_from_slice(&v[(kv_row + j) * row..(kv_row + j + 1) * row]);
            }
            kv_row += len;
            page_indices.extend_from_slice(pages);
            page_indptr.push(page_indices.len() as u32);
            last_page_len.push(if len == 0 { 0 } else { ((len - 1) % ps + 1) as u32 });
        }
        let indptr = |lens: &[usize]| {
            std::iter::once(0)
                .chain(lens.iter().scan(0u32, |acc, &l| {
                    *acc += l as u32;
                    Some(*acc)
                }))
                .collect()
        };
        CaseData {
            params,
            q: Buf::from_f32(case.q_dtype, &q),
            qo_indptr: indptr(&case.qo_lens),
            k: Buf::from_f32_grouped(case.kv_dtype, &k, case.head_dim),
            v: Buf::from_f32_grouped(case.kv_dtype, &v, case.head_dim),
            kv_indptr: indptr(&case.kv_lens),
            k_pool: Buf::from_f32_grouped(case.kv_dtype, &k_pool, case.head_dim),
            v_pool: Buf::from_f32_grouped(case.kv_dtype, &v_pool, case.head_dim),
            layout,
            page_indptr,
            page_indices,
            last_page_len,
            case: case.clone(),
        }
    }

    pub fn table(&self) -> PageTable<'_> {
        PageTable::new(&self.page_indptr, &self.page_indices, &self.last_page_len)
    }

    pub fn paged(&self) -> PagedKv<'_> {
        PagedKv::new(self.k_pool.view(), self.v_pool.view(), self.layout).expect("generated pool is valid")
    }

    pub fn prefill_input(&self, kind: KvKind) -> PrefillInput<'_> {
        let kv = match kind {
            KvKind::Ragged => KvInput::Ragged { k: self.k.view(), v: self.v.view(), kv_indptr: &self.kv_indptr },
            KvKind::Paged => KvInput::Paged { kv: self.paged(), table: self.table() },
        };
        PrefillInput { q: self.q.view(), qo_indptr: &self.qo_indptr, kv }
    }

    pub fn decode_input(&self) -> DecodeInput<'_> {
        DecodeInput { q: self.q.view(), kv: self.paged(), table: self.table() }
    }

    /// The oracle's answer for this case.
    pub fn reference(&self) -> RefOutput {
        match self.case.mode {
            Mode::Prefill => reference::prefill(&self.params, &self.prefill_input(self.case.kv_kind)),
            Mode::Decode => reference::decode(&self.params, &self.decode_input()),
        }
        .expect("the oracle accepts generated cases")
    }

    /// Runs a kernel on poisoned outputs and returns `(o as f32, lse)`.
    pub fn run(
        &self,
        kernel: impl FnOnce(&AttentionParams, &CaseData, &mut AttentionOutput<'_>) -> Result<()>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let rows: usize = self.case.qo_lens.iter().sum::<usize>() * self.params.num_qo_heads;
        let mut o = Buf::zeros(self.case.o_dtype, rows * self.params.head_dim);
        o.view_mut().poison();
        let mut lse = self.case.want_lse.then(|| vec![f32::NAN; rows]);
        let mut out = AttentionOutput { o: o.view_mut(), lse: lse.as_deref_mut() };
        kernel(&self.params, self, &mut out)?;
        Ok((o.to_f32(), lse))
    }

    /// Compares a result with the oracle; the error names the first offending element.
    pub fn check(&self, o: &[f32], lse: Option<&[f32]>, want: &RefOutput) -> std::result::Result<(), String> {
        self.check_within(o, lse, want, Tolerance::for_output(self.case.o_dtype))
    }

    /// [`CaseData::check`] for a kernel that may multiply bf16 K/V in bf16 dot products (see
    /// [`Tolerance`]): the wider bound applies only where the case's K/V are bf16.
    pub fn check_bf16_products(
        &self,
        o: &[f32],
        lse: Option<&[f32]>,
        want: &RefOutput,
    ) -> std::result::Result<(), String> {
        let tol =
            Tolerance { bf16_products: self.case.kv_dtype == DType::BF16, ..Tolerance::for_output(self.case.o_dtype) };
        self.check_within(o, lse, want, tol)
    }

    fn check_within(
        &self,
        o: &[f32],
        lse: Option<&[f32]>,
        want: &RefOutput,
        tol: Tolerance,
    ) -> std::result::Result<(), String> {
        let d = self.params.head_dim;
        for (i, (&got, &r)) in o.iter().zip(&want.o).enumerate() {
            let bound = tol.o_bound(r, want.score_abs[i / d], want.v_abs[i / d]);
            if !(got as f64 - r).abs().le(&bound) {
                return Err(format!(
                    "o[row {}, col {}] = {got}, oracle {r} (bound {bound:.3e}, {tol:?})",
                    i / d,
                    i % d
                ));
            }
        }
        if o.len() != want.o.len() {
            return Err(format!("o has {} elements, oracle {}", o.len(), want.o.len()));
        }
        if let Some(lse) = lse {
            for (i, (&got, &r)) in lse.iter().zip(&want.lse).enumerate() {
                let ok = if r == f64::NEG_INFINITY {
                    got == f32::NEG_INFINITY
                } else {
                    (got as f64 - r).abs() <= tol.lse_bound(r, want.score_abs[i])
                };
                if !ok {
                    return Err(format!("lse[row {i}] = {got}, oracle {r}"));
                }
            }
        }
        Ok(())
    }
}

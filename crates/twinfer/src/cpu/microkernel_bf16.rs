//! The prompt-block micro-kernels of [`crate::cpu::microkernel`] in bf16 dot products
//! (AVX512-BF16's `vdpbf16ps`: per f32 lane, the products of two bf16 pairs, exact, added in
//! turn), for K and V stored in bf16: the queries and the probabilities are rounded to bf16 once,
//! as FlashAttention's bf16 kernels do, and every sum stays f32.
//!
//! A dot product needs its two reduction elements side by side in each 32-bit lane, so the
//! operand that fills whole vectors is stored in pairs along the reduction axis: the transposed
//! queries as `[d / 2][rp][2]` (two head dimensions of one row), the value tile as
//! `[keys / 2][row_stride][2]` (one dimension of two keys); the other operand's pair is one
//! 32-bit broadcast (two dimensions of one key; two keys' probabilities of one row).

use core::arch::x86_64::*;

/// Whether the CPU has AVX512-BF16 (AVX-512 F and BW come with the level that asks).
pub(crate) fn detected() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
}

/// A word-permutation index vector: word `w` takes word `from(w)` (of a two-source permute,
/// from 32 on the second source).
#[inline(always)]
unsafe fn word_index(from: impl Fn(usize) -> usize) -> __m512i {
    let idx: [u16; 32] = core::array::from_fn(|w| from(w) as u16);
    // SAFETY: 32 u16 are 64 bytes, read unaligned.
    unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) }
}

/// `out[2j] = round(a[j])`, `out[2j + 1] = round(b[j])` for `j < a.len()` (a multiple of 16),
/// rounded to bf16 as `vcvtne2ps2bf16` rounds; a missing `b` pairs `a` with zeros.
///
/// # Safety
/// AVX-512 F, BW and BF16 must be present.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pair_f32_rows(a: &[f32], b: Option<&[f32]>, out: &mut [u16]) {
    let n = a.len();
    assert!(n.is_multiple_of(16) && b.is_none_or(|b| b.len() == n) && out.len() == 2 * n);
    // SAFETY: every access is inside the lengths asserted above.
    unsafe {
        // The conversion leaves a's 16 words low and b's high: word 2j from j, 2j + 1 from 16 + j.
        let idx = word_index(|w| w / 2 + if w % 2 == 1 { 16 } else { 0 });
        for j in (0..n).step_by(16) {
            let va = _mm512_loadu_ps(a.as_ptr().add(j));
            let vb = b.map_or(_mm512_setzero_ps(), |b| _mm512_loadu_ps(b.as_ptr().add(j)));
            let both: __m512i = core::mem::transmute(_mm512_cvtne2ps_pbh(vb, va));
            _mm512_storeu_si512(out.as_mut_ptr().add(2 * j) as *mut __m512i, _mm512_permutexvar_epi16(idx, both));
        }
    }
}

/// `out[2j] = a[j]`, `out[2j + 1] = b[j]` for bf16 bits (`a.len()` a multiple of 32); a missing
/// `b` pairs `a` with zeros.
///
/// # Safety
/// AVX-512 F and BW must be present.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn pair_bf16_rows(a: &[u16], b: Option<&[u16]>, out: &mut [u16]) {
    let n = a.len();
    assert!(n.is_multiple_of(32) && b.is_none_or(|b| b.len() == n) && out.len() == 2 * n);
    // SAFETY: every access is inside the lengths asserted above.
    unsafe {
        let lo = word_index(|w| w / 2 + if w % 2 == 1 { 32 } else { 0 });
        let hi = word_index(|w| 16 + w / 2 + if w % 2 == 1 { 32 } else { 0 });
        for j in (0..n).step_by(32) {
            let va = _mm512_loadu_si512(a.as_ptr().add(j) as *const __m512i);
            let vb = b.map_or(_mm512_setzero_si512(), |b| _mm512_loadu_si512(b.as_ptr().add(j) as *const __m512i));
            let o = out.as_mut_ptr().add(2 * j) as *mut __m512i;
            _mm512_storeu_si512(o, _mm512_permutex2var_epi16(va, lo, vb));
            _mm512_storeu_si512(o.add(1), _mm512_permutex2var_epi16(va, hi, vb));
        }
    }
}

/// [`crate::cpu::microkernel::scores_t`] in bf16: `st[c * rp + r] = Σ_i q[i][r] * k[c][i]` for
/// keys `c < cols` and rows `r < rp` (a multiple of 16), the queries in pairs (`q2[(i / 2 * rp +
/// r) * 2 + i % 2]`) and key `c` at `k[c * k_stride + k_off..][..len]` (`len` even). A score is
/// one lane's running sum over the pairs in order, whatever the blocking.
///
/// # Safety
/// AVX-512 F, BW and BF16 must be present.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn scores(
    q2: &[u16],
    rp: usize,
    len: usize,
    (k, k_stride, k_off): (&[u16], usize, usize),
    cols: usize,
    st: &mut [f32],
) {
    assert!(rp.is_multiple_of(16) && len.is_multiple_of(2) && len > 0 && q2.len() >= len * rp);
    assert!(cols == 0 || ((cols - 1) * k_stride + k_off + len <= k.len() && cols * rp <= st.len()));
    let vectors = rp / 16;
    let mut v = 0;
    while v < vectors {
        let nv = (vectors - v).min(4);
        let mut c = 0;
        while c < cols {
            let nc = match cols - c {
                n if n >= 6 => 6,
                n if n >= 4 => 4,
                n if n >= 2 => 2,
                _ => 1,
            };
            let at = ScoreBlock { q2, rp, len, k, k_stride, k_off, c0: c, v0: v };
            // SAFETY: the block lies inside the bounds asserted above; features as promised.
            unsafe {
                match (nc, nv) {
                    (6, 4) => score_block::<6, 4>(&at, st),
                    (6, 3) => score_block::<6, 3>(&at, st),
                    (6, 2) => score_block::<6, 2>(&at, st),
                    (6, 1) => score_block::<6, 1>(&at, st),
                    (4, 4) => score_block::<4, 4>(&at, st),
                    (4, 3) => score_block::<4, 3>(&at, st),
                    (4, 2) => score_block::<4, 2>(&at, st),
                    (4, 1) => score_block::<4, 1>(&at, st),
                    (2, 4) => score_block::<2, 4>(&at, st),
                    (2, 3) => score_block::<2, 3>(&at, st),
                    (2, 2) => score_block::<2, 2>(&at, st),
                    (2, 1) => score_block::<2, 1>(&at, st),
                    (1, 4) => score_block::<1, 4>(&at, st),
                    (1, 3) => score_block::<1, 3>(&at, st),
                    (1, 2) => score_block::<1, 2>(&at, st),
                    _ => score_block::<1, 1>(&at, st),
                }
            }
            c += nc;
        }
        v += nv;
    }
}

struct ScoreBlock<'a> {
    q2: &'a [u16],
    rp: usize,
    len: usize,
    k: &'a [u16],
    k_stride: usize,
    k_off: usize,
    c0: usize,
    v0: usize,
}

/// `NC` keys x `NV` vectors of 16 rows of [`scores`].
///
/// # Safety
/// As [`scores`], with the block inside its bounds.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn score_block<const NC: usize, const NV: usize>(at: &ScoreBlock<'_>, st: &mut [f32]) {
    let mut acc = [[_mm512_setzero_ps(); NV]; NC];
    // SAFETY: inside the bounds the caller checked.
    unsafe {
        let kp = at.k.as_ptr();
        let mut qp = at.q2.as_ptr().add(at.v0 * 32);
        for i in (0..at.len).step_by(2) {
            let mut qv = [_mm512_setzero_si512(); NV];
            for (v, q) in qv.iter_mut().enumerate() {
                *q = _mm512_loadu_si512(qp.add(v * 32) as *const __m512i);
            }
            qp = qp.add(2 * at.rp);
            for (c, row) in acc.iter_mut().enumerate() {
                let pair = (kp.add((at.c0 + c) * at.k_stride + at.k_off + i) as *const i32).read_unaligned();
                let kb: __m512bh = core::mem::transmute(_mm512_set1_epi32(pair));
                for (v, a) in row.iter_mut().enumerate() {
                    *a = _mm512_dpbf16_ps(*a, core::mem::transmute::<__m512i, __m512bh>(qv[v]), kb);
                }
            }
        }
        for (c, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                _mm512_storeu_ps(st.as_mut_ptr().add((at.c0 + c) * at.rp + (at.v0 + v) * 16), *a);
            }
        }
    }
}

/// [`crate::cpu::microkernel::values_t`] in bf16: `acc[r * len + i] += Σ_c p[c][r] * v[c][i]`
/// for rows `r < acc.len() / len` and `i < len` (a multiple of 16), over `pairs` pairs of keys:
/// the probabilities in pairs of keys (`p2[(c / 2 * rp + r) * 2 + c % 2]`), the values too
/// (`v2[(c / 2 * v_stride + v_off + i) * 2 + c % 2]`). Each output element sums the pairs in
/// order, whatever the blocking.
///
/// # Safety
/// AVX-512 F, BW and BF16 must be present.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn values(
    p2: &[u16],
    rp: usize,
    (v2, v_stride, v_off): (&[u16], usize, usize),
    pairs: usize,
    len: usize,
    acc: &mut [f32],
) {
    let rows = acc.len() / len;
    assert!(len.is_multiple_of(16) && rows <= rp);
    assert!(
        pairs == 0
            || (((pairs - 1) * rp + rows) * 2 <= p2.len() && ((pairs - 1) * v_stride + v_off + len) * 2 <= v2.len())
    );
    let nvec = len / 16;
    let mut r = 0;
    while r < rows {
        let mr = match rows - r {
            n if n >= 4 => 4,
            n if n >= 2 => 2,
            _ => 1,
        };
        let mut c = 0;
        while c < nvec {
            let nv = (nvec - c).min(4);
            let at = ValueBlock { p2, rp, v2, v_stride, v_off, pairs, len, r0: r, c0: c };
            // SAFETY: the block lies inside the bounds asserted above; features as promised.
            unsafe {
                match (mr, nv) {
                    (4, 4) => value_block::<4, 4>(&at, acc),
                    (4, 3) => value_block::<4, 3>(&at, acc),
                    (4, 2) => value_block::<4, 2>(&at, acc),
                    (4, 1) => value_block::<4, 1>(&at, acc),
                    (2, 4) => value_block::<2, 4>(&at, acc),
                    (2, 3) => value_block::<2, 3>(&at, acc),
                    (2, 2) => value_block::<2, 2>(&at, acc),
                    (2, 1) => value_block::<2, 1>(&at, acc),
                    (1, 4) => value_block::<1, 4>(&at, acc),
                    (1, 3) => value_block::<1, 3>(&at, acc),
                    (1, 2) => value_block::<1, 2>(&at, acc),
                    _ => value_block::<1, 1>(&at, acc),
                }
            }
            c += nv;
        }
        r += mr;
    }
}

struct ValueBlock<'a> {
    p2: &'a [u16],
    rp: usize,
    v2: &'a [u16],
    v_stride: usize,
    v_off: usize,
    pairs: usize,
    len: usize,
    r0: usize,
    c0: usize,
}

/// `MR` rows x `NV` vectors of 16 elements of [`values`].
///
/// # Safety
/// As [`values`], with the block inside its bounds.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn value_block<const MR: usize, const NV: usize>(at: &ValueBlock<'_>, acc: &mut [f32]) {
    // SAFETY: inside the bounds the caller checked.
    unsafe {
        let ap = acc.as_mut_ptr().add(at.c0 * 16);
        let mut regs = [[_mm512_setzero_ps(); NV]; MR];
        for (r, row) in regs.iter_mut().enumerate() {
            for (v, reg) in row.iter_mut().enumerate() {
                *reg = _mm512_loadu_ps(ap.add((at.r0 + r) * at.len + v * 16));
            }
        }
        let mut vp = at.v2.as_ptr().add((at.v_off + at.c0 * 16) * 2);
        let mut pp = at.p2.as_ptr().add(at.r0 * 2);
        for _ in 0..at.pairs {
            let mut vv = [_mm512_setzero_si512(); NV];
            for (v, x) in vv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(vp.add(v * 32) as *const __m512i);
            }
            for (r, row) in regs.iter_mut().enumerate() {
                let pb: __m512bh =
                    core::mem::transmute(_mm512_set1_epi32((pp.add(2 * r) as *const i32).read_unaligned()));
                for (v, reg) in row.iter_mut().enumerate() {
                    *reg = _mm512_dpbf16_ps(*reg, pb, core::mem::transmute::<__m512i, __m512bh>(vv[v]));
                }
            }
            vp = vp.add(2 * at.v_stride);
            pp = pp.add(2 * at.rp);
        }
        for (r, row) in regs.iter().enumerate() {
            for (v, reg) in row.iter().enumerate() {
                _mm512_storeu_ps(ap.add((at.r0 + r) * at.len + v * 16), *reg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::linear::bf16::{round_bits, widen};

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The pairing helpers against their definition, an odd last row included.
    #[test]
    fn pairs_interleave_two_rows() {
        if !detected() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (a, b) = (data(64, 1), data(64, 2));
        let mut out = vec![0u16; 128];
        // SAFETY: detected above (AVX-512 F and BW come with AVX512-BF16 on every CPU that has it).
        unsafe { pair_f32_rows(&a, Some(&b), &mut out) };
        for j in 0..64 {
            assert_eq!((out[2 * j], out[2 * j + 1]), (round_bits(a[j]), round_bits(b[j])), "{j}");
        }
        unsafe { pair_f32_rows(&a, None, &mut out) };
        assert!((0..64).all(|j| out[2 * j] == round_bits(a[j]) && out[2 * j + 1] == 0));
        let (a16, b16): (Vec<u16>, Vec<u16>) =
            (a.iter().map(|&x| round_bits(x)).collect(), b.iter().map(|&x| round_bits(x)).collect());
        unsafe { pair_bf16_rows(&a16, Some(&b16), &mut out) };
        assert!((0..64).all(|j| out[2 * j] == a16[j] && out[2 * j + 1] == b16[j]));
        unsafe { pair_bf16_rows(&a16, None, &mut out) };
        assert!((0..64).all(|j| out[2 * j] == a16[j] && out[2 * j + 1] == 0));
    }

    /// Scores and values against a float64 reference of the same bf16 values on shapes that
    /// reach every block size: only the f32 sums round (relative 1e-5 of Σ|terms|).
    #[test]
    fn scores_and_values_match_the_f64_reference_of_their_bf16_inputs() {
        if !detected() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for &(rp, len, cols, stride_extra) in &[(16, 64, 1, 0), (48, 128, 13, 32), (80, 64, 64, 64), (64, 32, 7, 0)] {
            let stride = len + stride_extra;
            let q: Vec<f32> = data(len * rp, 3); // [len][rp]
            let k: Vec<u16> = data(cols * stride, 4).iter().map(|&x| round_bits(x)).collect();
            let mut q2 = vec![0u16; len * rp];
            for (i, out) in q2.chunks_exact_mut(2 * rp).enumerate() {
                // SAFETY: detected above.
                unsafe {
                    pair_f32_rows(&q[2 * i * rp..(2 * i + 1) * rp], Some(&q[(2 * i + 1) * rp..(2 * i + 2) * rp]), out)
                };
            }
            let mut st = vec![f32::NAN; cols * rp];
            unsafe { scores(&q2, rp, len, (&k, stride, stride_extra), cols, &mut st) };
            for c in 0..cols {
                for r in 0..rp {
                    let terms = (0..len).map(|i| {
                        widen(round_bits(q[i * rp + r])) as f64 * widen(k[c * stride + stride_extra + i]) as f64
                    });
                    let (want, mag) = terms.fold((0.0, 0.0), |(s, m): (f64, f64), t| (s + t, m + t.abs()));
                    let got = st[c * rp + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-30,
                        "scores {rp} {len} {cols}: {c},{r}: {got} vs {want}"
                    );
                }
            }
            // Values: probabilities [cols][rp], V rows [cols][stride] at offset stride_extra.
            let rows = rp - 5;
            let p: Vec<f32> = data(cols * rp, 5).iter().map(|x| x + 0.5).collect();
            let v: Vec<u16> = data(cols * stride, 6).iter().map(|&x| round_bits(x)).collect();
            let pairs = cols.div_ceil(2);
            let (mut p2, mut v2) = (vec![0u16; pairs * 2 * rp], vec![0u16; pairs * 2 * stride]);
            for c in (0..cols).step_by(2) {
                let second = (c + 1 < cols).then(|| &p[(c + 1) * rp..(c + 2) * rp]);
                unsafe { pair_f32_rows(&p[c * rp..(c + 1) * rp], second, &mut p2[c * rp..(c + 2) * rp]) };
                let second = (c + 1 < cols).then(|| &v[(c + 1) * stride..(c + 2) * stride]);
                unsafe {
                    pair_bf16_rows(&v[c * stride..(c + 1) * stride], second, &mut v2[c * stride..(c + 2) * stride])
                };
            }
            let start = data(rows * len, 7);
            let mut acc = start.clone();
            unsafe { values(&p2, rp, (&v2, stride, stride_extra), pairs, len, &mut acc) };
            for r in 0..rows {
                for i in 0..len {
                    let terms = (0..cols).map(|c| {
                        widen(round_bits(p[c * rp + r])) as f64 * widen(v[c * stride + stride_extra + i]) as f64
                    });
                    let (sum, mag) = terms.fold((0.0, 0.0), |(s, m): (f64, f64), t| (s + t, m + t.abs()));
                    let want = start[r * len + i] as f64 + sum;
                    let got = acc[r * len + i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (mag + start[r * len + i].abs() as f64),
                        "values {rp} {len} {cols}: {r},{i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

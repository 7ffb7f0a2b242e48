//! bf16 products on AVX512-BF16 with the weights packed per task, so that no output ends in a
//! horizontal sum: a task's weight rows (64 features) are transposed into a panel whose vector
//! `i` holds pair `i` (elements `2i`, `2i + 1`) of 16 features side by side, and each
//! `vdpbf16ps` multiplies it by one activation pair broadcast to every lane. An output is then one
//! lane walked over the pairs in order and stored as it stands, whatever the block around it, so
//! a row gets the same bits alone or in a batch.
//!
//! A model packs its weights once ([`super::Bf16Panels`]); other callers pack per call, which
//! costs more than a decode row's product (a 1 x 1536 x 576 product took 0.052 ms so, 0.013-0.014
//! from kept panels) and little beside a prompt chunk's.

use core::arch::x86_64::*;

use half::bf16;

/// Features per panel vector, and per transposed tile.
const LANES: usize = 16;
/// Panel vectors per task: the task's 64 features (fewer in a part's last task: the rest of the
/// panel is zeros, whose sums are never stored).
pub(super) const VECTORS: usize = 4;
/// Rows per register block: 6 x 4 sums, 4 weight vectors and a broadcast fill 29 of the 32
/// registers.
const ROWS: usize = 6;

/// Where a task's product goes: output row 0, its row stride, and the task's first column.
pub(super) struct Out {
    pub ptr: *mut f32,
    pub n: usize,
    pub col: usize,
}

/// Whether the packed kernels take a part with rows of `k`: activation pairs are read as one
/// 32-bit word, so `k` must be even (every model's is); odd widths keep [`super::bf16_dot`] for
/// every row count alike.
pub(super) fn applies(k: usize) -> bool {
    k.is_multiple_of(2)
}

/// Words of one task's panel: `k / 2` pairs of 64 features.
pub(super) fn panel_words(k: usize) -> usize {
    k / 2 * VECTORS * LANES
}

/// `y[r][c] = x[r] · w[c] (+ bias[c])` for the `cols` (at most 64) features of a task, from
/// their `panel` ([`pack`]) and `rows` activation rows `x` (bf16 bits, `[rows, k]`).
///
/// # Safety
/// AVX-512 F and BW and AVX512-BF16 must be present; `out` must be valid for writing
/// `rows` rows of stride `out.n` at columns `out.col..out.col + cols`, which nothing else touches.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn product(
    x: &[u16],
    rows: usize,
    panel: &[u32],
    k: usize,
    cols: usize,
    bias: Option<&[f32]>,
    out: &Out,
) {
    assert!(applies(k) && cols <= VECTORS * LANES && x.len() == rows * k && panel.len() == panel_words(k));
    if let Some(b) = bias {
        assert_eq!(b.len(), cols);
    }
    let mut r0 = 0;
    while r0 < rows {
        let mr = (rows - r0).min(ROWS);
        // SAFETY: the features are present; rows r0..r0 + mr lie inside x and the output.
        unsafe {
            match mr {
                6 => block::<6>(x, k, r0, panel, cols, bias, out),
                5 => block::<5>(x, k, r0, panel, cols, bias, out),
                4 => block::<4>(x, k, r0, panel, cols, bias, out),
                3 => block::<3>(x, k, r0, panel, cols, bias, out),
                2 => block::<2>(x, k, r0, panel, cols, bias, out),
                _ => block::<1>(x, k, r0, panel, cols, bias, out),
            }
        }
        r0 += mr;
    }
}

/// Transposes a task's weight rows `w` (`[cols, k]`, at most 64 rows) into `panel`
/// ([`panel_words`] long): word `i * 64 + f` is pair `i` of feature `f`, zero past `cols`.
///
/// # Safety
/// AVX-512 F and BW must be present.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack(w: &[bf16], k: usize, panel: &mut [u32]) {
    let cols = w.len() / k;
    assert!(applies(k) && cols <= VECTORS * LANES && w.len() == cols * k && panel.len() == panel_words(k));
    panel.fill(0);
    let pairs = k / 2;
    let wp = w.as_ptr() as *const u32;
    for g in 0..cols.div_ceil(LANES) {
        let features = (cols - g * LANES).min(LANES);
        let mut i0 = 0;
        while i0 < pairs {
            let n = (pairs - i0).min(LANES);
            let mask: __mmask16 = if n == LANES { !0 } else { (1u16 << n) - 1 };
            // SAFETY: each load reads pairs i0..i0 + n of a present feature's row (masked past
            // them), inside `w`; missing features are zeros.
            let tile: [__m512i; LANES] = core::array::from_fn(|f| {
                if f < features {
                    unsafe { _mm512_maskz_loadu_epi32(mask, wp.add((g * LANES + f) * pairs + i0) as *const i32) }
                } else {
                    _mm512_setzero_si512()
                }
            });
            let t = transpose16(tile);
            for (j, v) in t.iter().enumerate().take(n) {
                // SAFETY: row i0 + j < pairs of the panel, vector g < VECTORS.
                unsafe {
                    _mm512_storeu_si512(
                        panel.as_mut_ptr().add((i0 + j) * VECTORS * LANES + g * LANES) as *mut __m512i,
                        *v,
                    )
                };
            }
            i0 += n;
        }
    }
}

/// A 16 x 16 transpose of 32-bit words: `out[j]` lane `f` is `rows[f]` lane `j`. Words, then
/// pairs of words, within 128-bit lanes, then the 128-bit lanes themselves: 64 shuffles.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512i; LANES]) -> [__m512i; LANES] {
    let mut t = r;
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + e], 128-bit lane L: element 4L + e of rows 4i..4i + 4.
    let mut u = t;
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut out = u;
    for e in 0..4 {
        let (a, b, c, d) = (u[e], u[4 + e], u[8 + e], u[12 + e]);
        let s0 = _mm512_shuffle_i32x4::<0x44>(a, b);
        let s1 = _mm512_shuffle_i32x4::<0xEE>(a, b);
        let s2 = _mm512_shuffle_i32x4::<0x44>(c, d);
        let s3 = _mm512_shuffle_i32x4::<0xEE>(c, d);
        out[e] = _mm512_shuffle_i32x4::<0x88>(s0, s2);
        out[4 + e] = _mm512_shuffle_i32x4::<0xDD>(s0, s2);
        out[8 + e] = _mm512_shuffle_i32x4::<0x88>(s1, s3);
        out[12 + e] = _mm512_shuffle_i32x4::<0xDD>(s1, s3);
    }
    out
}

/// Rows `r0..r0 + R` times the whole panel: `R x 4` sums of 16 features, stored with the bias.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn block<const R: usize>(
    x: &[u16],
    k: usize,
    r0: usize,
    panel: &[u32],
    cols: usize,
    bias: Option<&[f32]>,
    out: &Out,
) {
    let pairs = k / 2;
    assert!((r0 + R) * k <= x.len() && panel.len() >= pairs * VECTORS * LANES);
    let (xp, pp) = (x.as_ptr() as *const u32, panel.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
    for i in 0..pairs {
        // SAFETY: pair i of rows r0..r0 + R (k even: each row starts on a word) and panel row i.
        unsafe {
            let wv: [__m512bh; VECTORS] = core::array::from_fn(|c| {
                core::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    pp.add(i * VECTORS * LANES + c * LANES) as *const __m512i
                ))
            });
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let pair = core::ptr::read_unaligned(xp.add((r0 + r) * pairs + i)) as i32;
                let xv = core::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                for (a, &wc) in acc_r.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, wc);
                }
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, &sum) in acc_r.iter().enumerate() {
            let f0 = c * LANES;
            if f0 >= cols {
                break;
            }
            let n = (cols - f0).min(LANES);
            let mask: __mmask16 = if n == LANES { !0 } else { (1u16 << n) - 1 };
            // SAFETY: features f0..f0 + n are inside the bias and the task's output columns.
            unsafe {
                let v = match bias {
                    Some(b) => _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, b.as_ptr().add(f0))),
                    None => sum,
                };
                _mm512_mask_storeu_ps(out.ptr.add((r0 + r) * out.n + out.col + f0), mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transpose_moves_every_word() {
        if !super::super::bf16_dot::detected() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        #[target_feature(enable = "avx512f")]
        fn run(words: &[u32; 256]) -> [u32; 256] {
            // SAFETY: 16 rows of 16 words in and out.
            unsafe {
                let rows: [__m512i; LANES] =
                    core::array::from_fn(|f| _mm512_loadu_si512(words.as_ptr().add(f * LANES) as *const __m512i));
                let t = transpose16(rows);
                let mut out = [0u32; 256];
                for (j, v) in t.iter().enumerate() {
                    _mm512_storeu_si512(out.as_mut_ptr().add(j * LANES) as *mut __m512i, *v);
                }
                out
            }
        }
        let words: [u32; 256] = core::array::from_fn(|i| i as u32 * 7 + 1);
        // SAFETY: detected above (AVX-512 F comes with AVX512-BF16).
        let got = unsafe { run(&words) };
        for j in 0..LANES {
            for f in 0..LANES {
                assert_eq!(got[j * LANES + f], words[f * LANES + j], "out[{j}] lane {f}");
            }
        }
    }
}

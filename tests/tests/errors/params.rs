//! Parameters: checked first, whatever the input.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use super::*;
use twinfer::TwinferError;

#[test]
fn head_ratio_not_integer_or_zero_heads() {
    for d in all_fixtures() {
        for (qo, kv) in [(6, 4), (0, 2), (4, 0), (0, 0), (3, 2)] {
            let mut p = d.params.clone();
            (p.num_qo_heads, p.num_kv_heads) = (qo, kv);
            assert_all_err!(
                call_with(&d, &p),
                TwinferError::HeadRatio { num_qo_heads, num_kv_heads } if (*num_qo_heads, *num_kv_heads) == (qo, kv)
            );
        }
    }
}

#[test]
fn unsupported_head_dim() {
    for d in all_fixtures() {
        for head_dim in [0, 12, 264, 4, 257] {
            let mut p = d.params.clone();
            p.head_dim = head_dim;
            assert_all_err!(call_with(&d, &p), TwinferError::HeadDimUnsupported { head_dim: h } if *h == head_dim);
        }
    }
}

#[test]
fn soft_cap_must_be_finite_and_positive() {
    for d in all_fixtures() {
        for cap in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let p = d.params.clone().logits_soft_cap(Some(cap));
            assert_all_err!(call_with(&d, &p), TwinferError::InvalidParameter(msg) if msg.contains("logits_soft_cap"));
        }
    }
}

#[test]
fn sm_scale_must_be_finite() {
    for d in all_fixtures() {
        for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let p = d.params.clone().sm_scale(Some(scale));
            assert_all_err!(call_with(&d, &p), TwinferError::InvalidParameter(msg) if msg.contains("sm_scale"));
        }
    }
}

#[test]
fn alibi_slopes_wrong_length_or_not_finite() {
    for d in all_fixtures() {
        let h = d.params.num_qo_heads;
        for n in [0, 1, h - 1, h + 1, d.params.num_kv_heads] {
            let p = d.params.clone().alibi_slopes(Some(vec![0.25; n]));
            assert_all_err!(
                call_with(&d, &p),
                TwinferError::ShapeMismatch { what: "alibi_slopes", expected, got } if *expected == h && *got == n
            );
        }
        let mut slopes = vec![0.25; h];
        slopes[h - 1] = f32::NAN;
        let p = d.params.clone().alibi_slopes(Some(slopes));
        assert_all_err!(call_with(&d, &p), TwinferError::InvalidParameter(msg) if msg.contains("alibi"));
    }
}

/// Pinned: head counts whose row size overflows `usize` must be rejected, not wrap or panic.
#[test]
fn pinned_absurd_head_counts_are_errors() {
    for d in all_fixtures() {
        let quarter = usize::MAX / 4;
        for (qo, kv, head_dim) in [(quarter, quarter, 16), (usize::MAX, 1, 256), (usize::MAX / 8 + 1, 1, 8)] {
            let mut p = d.params.clone();
            (p.num_qo_heads, p.num_kv_heads, p.head_dim) = (qo, kv, head_dim);
            assert_all_err!(call_with(&d, &p), TwinferError::InvalidParameter(_) | TwinferError::ShapeMismatch { .. });
        }
    }
}

/// Pinned: a window wider than any position (`usize::MAX` as "unbounded") must behave like no window,
/// not wrap around to a negative width.
#[test]
fn pinned_huge_window_equals_no_window() {
    for d in all_fixtures() {
        let facade = Attention::cpu(SimdLevel::detect());
        let run = |params: &AttentionParams| {
            let mut o = vec![f32::NAN; rows(&d) * d.params.head_dim];
            let mut lse = vec![f32::NAN; rows(&d)];
            let mut out = AttentionOutput::with_lse(&mut o[..], &mut lse[..]);
            match input(&d) {
                Input::Prefill(i) => facade.prefill(params, &i, &mut out),
                Input::Decode(i) => facade.decode(params, &i, &mut out),
            }
            .unwrap();
            let want = match input(&d) {
                Input::Prefill(i) => reference::prefill(params, &i),
                Input::Decode(i) => reference::decode(params, &i),
            }
            .unwrap();
            (o, lse, want)
        };
        let (o_none, lse_none, want_none) = run(&d.params);
        for w in [usize::MAX, usize::MAX / 2 + 1, usize::MAX / 2 + 6, u32::MAX as usize] {
            let (o, lse, want) = run(&d.params.clone().window_left(Some(w)));
            assert_eq!(want, want_none, "oracle, window {w}");
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o), bits(&o_none), "window {w}");
            assert_eq!(bits(&lse), bits(&lse_none), "window {w}");
        }
    }
}

//! Attention parameters: head configuration and the variant (mask, window, soft-cap, ALiBi, scale).
//!
//! Variants are plain data, as in FlashInfer's split of masks and logits transforms. The score of
//! query row `i` against key `j` is, in this order:
//! 1. `s = (q_i . k_j) * sm_scale` (`sm_scale` defaults to `1 / sqrt(head_dim)`);
//! 2. with a soft-cap `c`: `s = c * tanh(s / c)`;
//! 3. with ALiBi slopes: `s += slope[qo_head] * (j - pos_i)`;
//! 4. masked keys are dropped (not set to a large negative number).
//!
//! `pos_i = i + kv_len - qo_len` aligns the queries bottom-right against the keys, so that a
//! chunk of new tokens sees the whole cached prefix. Key `j` is visible to row `i` when
//! `(!causal || j <= pos_i) && (window_left is None || j + window_left >= pos_i)`.
//!
//! The log-sum-exp output (LSE) is in **natural log**: `lse_i = ln(sum_j exp(s_ij))` over the visible
//! keys, and `-inf` for a row that sees no key (whose output is 0). [`crate::merge_state`] uses
//! the same base, so partial results from any backend compose.

use crate::error::{Result, TwinferError};
use crate::kv::check_head_dim;

/// Heads and variant of an attention call.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionParams {
    /// Query (and output) heads; a positive multiple of `num_kv_heads`.
    pub num_qo_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_qo_heads`).
    pub num_kv_heads: usize,
    /// Elements per head: a multiple of 8 in `8..=256`.
    pub head_dim: usize,
    /// Causal mask, aligned bottom-right.
    pub causal: bool,
    /// Keys further than this many positions to the left of the query are masked (sliding window).
    pub window_left: Option<usize>,
    /// Logits soft-cap `c` (Gemma 2, Grok): `c * tanh(s / c)`; must be positive.
    pub logits_soft_cap: Option<f32>,
    /// ALiBi slope per query head, `[num_qo_heads]`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
}

impl AttentionParams {
    /// Plain attention with the default scale, no mask and no transform.
    pub fn new(num_qo_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            num_qo_heads,
            num_kv_heads,
            head_dim,
            causal: false,
            window_left: None,
            logits_soft_cap: None,
            alibi_slopes: None,
            sm_scale: None,
        }
    }
    /// Sets the `causal` field (builder).
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Sets the `window_left` field (builder).
    pub fn window_left(mut self, window_left: Option<usize>) -> Self {
        self.window_left = window_left;
        self
    }
    /// Sets the `logits_soft_cap` field (builder).
    pub fn logits_soft_cap(mut self, cap: Option<f32>) -> Self {
        self.logits_soft_cap = cap;
        self
    }
    /// Sets the `alibi_slopes` field (builder).
    pub fn alibi_slopes(mut self, slopes: Option<Vec<f32>>) -> Self {
        self.alibi_slopes = slopes;
        self
    }
    /// Sets the `sm_scale` field (builder).
    pub fn sm_scale(mut self, scale: Option<f32>) -> Self {
        self.sm_scale = scale;
        self
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_qo_heads / self.num_kv_heads
    }
    /// The softmax scale actually used.
    pub fn resolved_sm_scale(&self) -> f32 {
        self.sm_scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }
    /// ALiBi slope of query head `h` (0 without ALiBi).
    #[inline(always)]
    pub fn alibi_slope(&self, h: usize) -> f32 {
        self.alibi_slopes.as_ref().map_or(0.0, |s| s[h])
    }

    /// Checks head counts, head_dim and variant values.
    pub fn validate(&self) -> Result<()> {
        if self.num_kv_heads == 0 || self.num_qo_heads == 0 || !self.num_qo_heads.is_multiple_of(self.num_kv_heads) {
            return Err(TwinferError::HeadRatio { num_qo_heads: self.num_qo_heads, num_kv_heads: self.num_kv_heads });
        }
        check_head_dim(self.head_dim)?;
        if self.num_qo_heads.checked_mul(self.head_dim).is_none() {
            return Err(TwinferError::InvalidParameter(format!(
                "num_qo_heads {} x head_dim {} overflows the address space",
                self.num_qo_heads, self.head_dim
            )));
        }
        if let Some(cap) = self.logits_soft_cap
            && !(cap.is_finite() && cap > 0.0)
        {
            return Err(TwinferError::InvalidParameter(format!("logits_soft_cap must be finite and > 0, got {cap}")));
        }
        if let Some(scale) = self.sm_scale
            && !scale.is_finite()
        {
            return Err(TwinferError::InvalidParameter(format!("sm_scale must be finite, got {scale}")));
        }
        if let Some(slopes) = &self.alibi_slopes {
            crate::error::check_len("alibi_slopes", self.num_qo_heads, slopes.len())?;
            if slopes.iter().any(|s| !s.is_finite()) {
                return Err(TwinferError::InvalidParameter("alibi_slopes must be finite".into()));
            }
        }
        Ok(())
    }

    /// The range of keys `[lo, hi)` that row `i` may see, before per-key masking (which the
    /// range already captures exactly: causal and window masks are both intervals).
    #[inline(always)]
    pub fn visible_range(&self, i: usize, qo_len: usize, kv_len: usize) -> (usize, usize) {
        let pos = i as i64 + kv_len as i64 - qo_len as i64;
        let hi = if self.causal { (pos + 1).clamp(0, kv_len as i64) } else { kv_len as i64 };
        let lo = match self.window_left {
            Some(w) => pos.saturating_sub(Self::window_i64(w)).clamp(0, kv_len as i64),
            None => 0,
        };
        (lo as usize, hi.max(lo) as usize)
    }

    /// A window width as i64, saturating: a width beyond any position (`usize::MAX` for
    /// "unbounded") must not wrap to a negative one.
    #[inline(always)]
    pub(crate) fn window_i64(window_left: usize) -> i64 {
        i64::try_from(window_left).unwrap_or(i64::MAX)
    }

    /// The absolute position of query row `i` (may be negative when `qo_len > kv_len`).
    #[inline(always)]
    pub fn query_position(i: usize, qo_len: usize, kv_len: usize) -> i64 {
        i as i64 + kv_len as i64 - qo_len as i64
    }
}

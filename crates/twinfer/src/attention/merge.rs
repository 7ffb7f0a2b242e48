//! `merge_state`: combine two partial attention results computed over disjoint key sets.
//!
//! This is how split-K decode combines its chunks and how shared-prefix (cascade) attention
//! composes a prefix pass with a suffix pass. LSEs are natural logs, as everywhere in twinfer.

use crate::dtype::{TensorMut, TensorRef};
use crate::error::{Result, TwinferError, check_len};

/// Merges `(o_b, lse_b)` into `(o_a, lse_a)` for one row, all f32.
#[inline(always)]
pub(crate) fn merge_row(o_a: &mut [f32], lse_a: &mut f32, o_b: &[f32], lse_b: f32) {
    let m = lse_a.max(lse_b);
    if m == f32::NEG_INFINITY {
        o_a.fill(0.0);
        *lse_a = f32::NEG_INFINITY;
        return;
    }
    let wa = (*lse_a - m).exp();
    let wb = (lse_b - m).exp();
    let inv = 1.0 / (wa + wb);
    let (ca, cb) = (wa * inv, wb * inv);
    for (a, b) in o_a.iter_mut().zip(o_b) {
        *a = *a * ca + *b * cb;
    }
    *lse_a = m + (wa + wb).ln();
}

/// Merges two attention states. `o_*` are `[rows, heads, head_dim]` in any dtype, `lse_*`
/// `[rows, heads]` (natural log). Rows where both LSEs are `-inf` (no visible key) yield 0 and
/// `-inf`, never NaN. `o_out` may have any dtype; `lse_out` is f32.
pub fn merge_state(
    o_a: TensorRef<'_>,
    lse_a: &[f32],
    o_b: TensorRef<'_>,
    lse_b: &[f32],
    mut o_out: TensorMut<'_>,
    lse_out: &mut [f32],
) -> Result<()> {
    let rows = lse_a.len();
    check_len("lse_b", rows, lse_b.len())?;
    check_len("lse_out", rows, lse_out.len())?;
    if rows == 0 {
        check_len("o_a", 0, o_a.len())?;
        check_len("o_b", 0, o_b.len())?;
        return check_len("o_out", 0, o_out.len());
    }
    let d = o_a.len() / rows;
    check_len("o_a ([rows, heads, head_dim])", rows * d, o_a.len())?;
    check_len("o_b", o_a.len(), o_b.len())?;
    check_len("o_out", o_a.len(), o_out.len())?;
    if d == 0 {
        return Err(TwinferError::InvalidParameter("merge_state: head_dim is 0".into()));
    }
    let mut a = vec![0.0f32; d];
    let mut b = vec![0.0f32; d];
    for r in 0..rows {
        o_a.read_f32(r * d, &mut a);
        o_b.read_f32(r * d, &mut b);
        let mut lse = lse_a[r];
        merge_row(&mut a, &mut lse, &b, lse_b[r]);
        o_out.write_f32(r * d, &a);
        lse_out[r] = lse;
    }
    Ok(())
}

/// In-place form: `(o, lse) <- merge((o, lse), (o_other, lse_other))`, all f32.
pub fn merge_state_in_place(o: &mut [f32], lse: &mut [f32], o_other: &[f32], lse_other: &[f32]) -> Result<()> {
    let rows = lse.len();
    check_len("lse_other", rows, lse_other.len())?;
    check_len("o_other", o.len(), o_other.len())?;
    if rows == 0 {
        return check_len("o", 0, o.len());
    }
    let d = o.len() / rows;
    check_len("o ([rows, heads, head_dim])", rows * d, o.len())?;
    if d == 0 {
        return Err(TwinferError::InvalidParameter("merge_state_in_place: head_dim is 0".into()));
    }
    for r in 0..rows {
        merge_row(&mut o[r * d..(r + 1) * d], &mut lse[r], &o_other[r * d..(r + 1) * d], lse_other[r]);
    }
    Ok(())
}

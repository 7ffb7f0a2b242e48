// How the tests compare an embedding with the float64 reference. Cosine similarity is quadratic
// in the error (a 1% error still scores 0.9999), so each element is checked against a bound that
// f32 arithmetic meets, and the L2 norm must be 1 (an embedding that lost its normalisation fails).
import assert from "node:assert/strict";

/** `max |e - ref| / max |ref|`; the same bound as the native test (tests/tests/encoder_model.rs). */
export const EMBEDDING_RTOL = 1e-5;
export const NORM_TOL = 1e-5;

/** Asserts `got` is `want` within the bounds; returns the relative error. */
export function checkEmbedding(got, want, label) {
  assert.equal(got.length, want.length, `${label}: length`);
  let diff = 0;
  let scale = 0;
  let norm = 0;
  for (let i = 0; i < got.length; i++) {
    diff = Math.max(diff, Math.abs(got[i] - want[i]));
    scale = Math.max(scale, Math.abs(want[i]));
    norm += got[i] * got[i];
  }
  const err = diff / scale;
  assert.ok(err <= EMBEDDING_RTOL, `${label}: error ${err.toExponential(2)} > ${EMBEDDING_RTOL}`);
  assert.ok(Math.abs(Math.sqrt(norm) - 1) <= NORM_TOL, `${label}: L2 norm ${Math.sqrt(norm)}`);
  return err;
}

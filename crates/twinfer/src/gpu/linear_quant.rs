//! Block-quantized projection weights on the device: the codes stay 4 or 8 bits wide and the
//! kernels decode them in registers (`load_w` in `gpu/shaders.rs`), as WebLLM's q4f16 and
//! llama.cpp's GPU backends do, instead of holding an f16 copy four times the size.
//!
//! Each weight buffer holds, per feature, its codes as u32 words, then per feature and group of
//! 32 inputs (16 for Q6_K) the f32 scale (and offset, where the format has one). The products
//! that make the scales are exact in f32 (see `quant::kquant`), so a weight decodes to the
//! reference's value bit for bit: 6 bits per weight for the 4-bit formats, 9 for Q8_0 and Q5_0,
//! 10 for Q5_1, Q5_K and Q6_K.

use super::engine::GpuEngine;
use super::linear::{ChunkPlan, GpuLinear, Stored, split_rows};
use super::shaders::KvStorage;
use crate::error::{Result, TwinferError};
use crate::quant::PackedQuant;

impl GpuLinear {
    /// Uploads the block-quantized row blocks `parts` (each `[n_i, k]`, stacked in order) and
    /// `bias` (`[Σ n_i]`), keeping them quantized, in buffers of at most `max_buffer` bytes. Each
    /// part keeps its own format, so a stack of Q4_K and Q6_K parts (llama.cpp's Q4_K_M) works.
    pub fn upload_quant(
        engine: &GpuEngine,
        parts: &[&PackedQuant],
        bias: Option<&[f32]>,
        max_buffer: u64,
    ) -> Result<Self> {
        let k = parts.first().map_or(0, |p| p.k);
        if let Some(p) = parts.iter().find(|p| p.k != k) {
            return Err(TwinferError::InvalidParameter(format!(
                "quantized projection: parts of {k} and {} inputs",
                p.k
            )));
        }
        let n: usize = parts.iter().map(|p| p.n).sum();
        let ctx = engine.context();
        // (plans, the part each plan's first feature belongs to, that part's first feature)
        let mut plans = Vec::new();
        let mut owners = Vec::new();
        let mut n0 = 0;
        for (i, p) in parts.iter().enumerate() {
            let nibbles = p.format.code_bits() == 4;
            let stored = match (nibbles, p.gpu_offsets()) {
                (true, _) => Stored::Nibbles,
                (false, true) => Stored::BytesOffset,
                (false, false) => Stored::Bytes,
            };
            let group = p.gpu_group();
            let code_words = if nibbles { k / 8 } else { k / 4 };
            let scale_words = k / group * if stored == Stored::Bytes { 1 } else { 2 };
            let row_bytes = ((code_words + scale_words) * 4) as u64;
            let part = split_rows(ctx, n0, p.n, row_bytes, max_buffer, |first, rows| ChunkPlan {
                n0: first,
                n: rows,
                bytes: rows as u64 * row_bytes,
                alloc: rows as u64 * row_bytes,
                stored,
                group_shift: (group / 4).trailing_zeros(),
                scales_at: (rows * code_words) as u32,
            })?;
            owners.extend(std::iter::repeat_n((i, n0), part.len()));
            plans.extend(part);
            n0 += p.n;
        }
        let fill = |plan: &ChunkPlan| {
            let i = plans.iter().position(|p| p.n0 == plan.n0).expect("a plan of this upload");
            let (part, part_n0) = (parts[owners[i].0], owners[i].1);
            let (mut codes, mut scales) = (Vec::new(), Vec::new());
            for c in plan.n0 - part_n0..plan.n0 - part_n0 + plan.n {
                part.gpu_row(c, &mut codes, &mut scales);
            }
            let mut bytes = bytemuck::cast_slice::<u32, u8>(&codes).to_vec();
            bytes.extend_from_slice(bytemuck::cast_slice(&scales));
            bytes
        };
        let formats: Vec<&str> = parts.iter().map(|p| p.format.name()).collect();
        let what = format!("projection weights [{n}, {k}] in {}", formats.join("+"));
        Self::create(engine, (n, k), bias, KvStorage::F32, plans.clone(), &what, fill)
    }
}

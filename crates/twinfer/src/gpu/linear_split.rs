//! The tensor cores' input split (`linear_split_f16.wgsl`): its pipeline and sizes, and the
//! split on its own for tests: it runs on any device with shader-f16, so its fused norm and
//! activations are checked where the matmul that consumes it cannot run (software adapters,
//! browsers).

use super::engine::GpuEngine;
use super::params::LinearParams;
use super::pending::{Readback, Scopes};
use super::resources::{Bind, PipelineKey, Slot, Tile};
use super::shaders::{Kernel, KvStorage, Variant};
use crate::error::{Result, TwinferError, check_len};
use crate::wait::blocking;

/// Rows of the split input are padded to this (`ROW_PAD` in `linear_split_f16.wgsl` and
/// `linear_matmul_coop.wgsl`).
pub(super) const SPLIT_ROW_PAD: usize = 128;

/// Bytes of `linear_split_f16.wgsl`'s output for `rows` input rows of width `k`: two f16 parts
/// per input and one f16 exponent per row, rows padded.
pub(super) fn split_bytes(rows: usize, k: usize) -> usize {
    let rows_p = rows.next_multiple_of(SPLIT_ROW_PAD);
    (2 * (2 * rows_p * k + rows_p)).next_multiple_of(16)
}

/// The split's pipeline (one 256-thread workgroup per row).
pub(super) fn split_key() -> PipelineKey {
    PipelineKey {
        kernel: Kernel::LinearSplitF16,
        variant: Variant::Baseline,
        kv: KvStorage::F16,
        tile: Tile { wg: 256, br: 0, bc: 0, chunk: 0 },
    }
}

/// Ids of the test's own uniform and norm buffers in the bind-group cache.
const PARAMS_ID: u64 = 0x5_0000_0001;
const NORM_ID: u64 = 0x5_0000_0002;

impl GpuEngine {
    /// Splits `x` (`[rows, k]`, or `[rows, 2k]` gate | up rows with `act` = SwiGLU) as a
    /// tensor-core projection's pre-pass does, with the RMSNorm `norm` (weights, epsilon) fused
    /// where given, and returns the output's f16 bits: hi `[rows_p, k]`, lo `[rows_p, k]`, then
    /// each row's exponent `[rows_p]` (rows_p = rows rounded up to 128).
    #[doc(hidden)]
    pub fn split_input_for_test(
        &self,
        x: &[f32],
        rows: usize,
        k: usize,
        norm: Option<(&[f32], f32)>,
        act: u32,
    ) -> Result<Vec<u16>> {
        let ctx = self.context();
        if !ctx.summary.shader_f16 {
            return Err(TwinferError::GpuUnavailable(format!("{} has no shader-f16", ctx.summary.name)));
        }
        if rows == 0 || k == 0 || !k.is_multiple_of(4) {
            return Err(TwinferError::InvalidParameter(format!("split input: {rows} rows of {k} (a multiple of 4)")));
        }
        let width = if act == super::params::ACT_SWIGLU { 2 * k } else { k };
        check_len("split input ([rows, k])", rows * width, x.len())?;
        if let Some((g, _)) = norm {
            check_len("split norm weights ([k])", k, g.len())?;
        }
        let prm = LinearParams {
            rows: rows as u32,
            k4: (k / 4) as u32,
            norm: norm.is_some() as u32,
            eps: norm.map_or(0.0, |(_, e)| e),
            act,
            ..Default::default()
        };
        use wgpu::util::DeviceExt;
        let make = |bytes: &[u8], usage| {
            ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("split test"),
                contents: bytes,
                usage,
            })
        };
        let params = make(bytemuck::bytes_of(&prm), wgpu::BufferUsages::UNIFORM);
        let ones = vec![1f32; k];
        let norm_w = make(bytemuck::cast_slice(norm.map_or(&ones[..], |(g, _)| g)), wgpu::BufferUsages::STORAGE);
        let bytes = split_bytes(rows, k);
        let pending = {
            let mut res = self.lock()?;
            let scope = Scopes::push(ctx);
            self.write(&mut res, Slot::LinX, bytemuck::cast_slice(x))?;
            res.buffer(ctx, Slot::LinSplit, bytes as u64)?;
            let binds = vec![
                Bind::External(PARAMS_ID, &params),
                Bind::Slot(Slot::LinX),
                Bind::Slot(Slot::LinSplit),
                Bind::External(NORM_ID, &norm_w),
            ];
            self.run_passes(&mut res, &[(split_key(), binds, [rows.next_multiple_of(SPLIT_ROW_PAD), 1, 1])])?;
            let readback = Readback::queue_slot(ctx, &mut res, Slot::LinSplit, bytes / 4)?;
            // The test's buffers go with this call: forget their bind group.
            res.forget_external(|id| id == PARAMS_ID || id == NORM_ID);
            self.submitted(scope, Some(readback))
        };
        let words = blocking("GpuEngine::split_input_for_test", pending.wait_async())??.into_values();
        Ok(words
            .iter()
            .flat_map(|w| {
                let b = w.to_bits();
                [b as u16, (b >> 16) as u16]
            })
            .collect())
    }
}

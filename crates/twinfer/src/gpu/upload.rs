//! Host-side staging of a call: the KV pool in the device's storage type (compacted to the pages
//! the call reads when the whole pool would exceed one binding), and the `meta` u32 array that
//! carries page tables, indptrs, ALiBi slopes and the prefill work list.

use half::slice::HalfFloatSliceExt;

use super::shaders::KvStorage;
use crate::dtype::TensorRef;
use crate::error::{Result, TwinferError};

/// K and V as bytes for the device, with the page ids the kernels must use.
#[derive(Debug)]
pub struct KvBytes {
    pub k: Vec<u8>,
    pub v: Vec<u8>,
    /// Page ids after compaction (the caller's ids when the pool went up whole).
    pub indices: Vec<u32>,
}

/// Converts `t[range]` to the device storage type.
pub fn tensor_bytes(t: TensorRef<'_>, start: usize, len: usize, storage: KvStorage) -> Result<Vec<u8>> {
    Ok(match (storage, t) {
        (KvStorage::F16, TensorRef::F16(s)) => bytemuck::cast_slice(s[start..start + len].reinterpret_cast()).to_vec(),
        (KvStorage::F16, _) => {
            let mut f = vec![0f32; len];
            t.read_f32(start, &mut f);
            let h: Vec<half::f16> = f.iter().map(|&x| half::f16::from_f32(x)).collect();
            bytemuck::cast_slice(h.reinterpret_cast()).to_vec()
        }
        (KvStorage::F32, _) => {
            let mut f = vec![0f32; len];
            t.read_f32(start, &mut f);
            bytemuck::cast_slice(&f).to_vec()
        }
        // Int8 pools keep a scale per row beside the codes: `GpuKvCache::write_pages` lays them out.
        (KvStorage::Q8, _) => {
            return Err(TwinferError::InvalidParameter(
                "an int8 device pool is written by GpuKvCache::write_pages, not staged as a float tensor".into(),
            ));
        }
    })
}

/// The paged pool as device bytes. `limit` is the largest binding: a bigger pool is compacted to
/// the pages in `indices` (renumbered in first-use order).
pub fn paged_kv(
    k: TensorRef<'_>,
    v: TensorRef<'_>,
    page_elems: usize,
    indices: &[u32],
    storage: KvStorage,
    limit: u64,
) -> Result<KvBytes> {
    let whole = (k.len() * storage.bytes()) as u64;
    if whole <= limit {
        return Ok(KvBytes {
            k: tensor_bytes(k, 0, k.len(), storage)?,
            v: tensor_bytes(v, 0, v.len(), storage)?,
            indices: indices.to_vec(),
        });
    }
    let mut map = std::collections::HashMap::new();
    let mut order = Vec::new();
    let renumbered = indices
        .iter()
        .map(|&p| {
            *map.entry(p).or_insert_with(|| {
                order.push(p);
                (order.len() - 1) as u32
            })
        })
        .collect();
    let (mut kb, mut vb) = (Vec::new(), Vec::new());
    for &p in &order {
        let start = p as usize * page_elems;
        kb.extend(tensor_bytes(k, start, page_elems, storage)?);
        vb.extend(tensor_bytes(v, start, page_elems, storage)?);
    }
    Ok(KvBytes { k: kb, v: vb, indices: renumbered })
}

/// Builds the `meta` array section by section, recording offsets.
#[derive(Debug, Default)]
pub struct Meta {
    pub data: Vec<u32>,
}

impl Meta {
    /// Appends a section and returns its offset.
    pub fn push(&mut self, xs: &[u32]) -> u32 {
        let off = self.data.len() as u32;
        self.data.extend_from_slice(xs);
        off
    }
    pub fn push_f32(&mut self, xs: &[f32]) -> u32 {
        let off = self.data.len() as u32;
        self.data.extend(xs.iter().map(|x| x.to_bits()));
        off
    }
}

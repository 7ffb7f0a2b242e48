//! Page tables as a caller hands them to decode attention: any CSR arrays, pages and last-page
//! lengths. A table that `PageTable::validate` accepts must decode (to finite values: the K/V
//! pool is finite); one it refuses must be refused by the kernel too, and nothing may read outside
//! the pool (AddressSanitizer watches).
#![no_main]

use arbitrary::Arbitrary;
use twinfer::cpu::SimdLevel;
use twinfer::{Attention, AttentionOutput, AttentionParams, DecodeInput, KvLayout, PageTable, PagedKv};

#[derive(Debug, Arbitrary)]
struct Input {
    page_size: u8,
    num_pages: u8,
    kv_heads: u8,
    group: u8,
    head_dim: u8,
    scalar: bool,
    indptr: Vec<u32>,
    indices: Vec<u32>,
    last_page_len: Vec<u32>,
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    let page_size = 1 + input.page_size as usize % 32;
    let num_pages = 1 + input.num_pages as usize % 16;
    let kv_heads = 1 + input.kv_heads as usize % 4;
    let heads = kv_heads * (1 + input.group as usize % 4);
    let head_dim = [8, 16, 64, 128][input.head_dim as usize % 4];
    let table = PageTable::new(&input.indptr, &input.indices, &input.last_page_len);
    let valid = table.validate(page_size, num_pages).is_ok();
    let batch = input.indptr.len().saturating_sub(1).min(64);
    if input.indptr.len() > 65 {
        return;
    }
    let layout = KvLayout::new(page_size, kv_heads, head_dim).expect("a valid layout");
    let pool: Vec<f32> = (0..num_pages * layout.page_elems()).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
    let kv = PagedKv::new(pool.as_slice().into(), pool.as_slice().into(), layout).expect("a matching pool");
    let q: Vec<f32> = (0..batch * heads * head_dim).map(|i| ((i * 31) % 13) as f32 / 13.0).collect();
    let mut o = vec![f32::NAN; batch * heads * head_dim];
    let level = if input.scalar { SimdLevel::Scalar } else { SimdLevel::detect() };
    let attention = Attention::cpu(level);
    let params = AttentionParams::new(heads, kv_heads, head_dim);
    let decoded = attention.decode(
        &params,
        &DecodeInput { q: q.as_slice().into(), kv, table },
        &mut AttentionOutput::new(o.as_mut_slice()),
    );
    match (valid, decoded) {
        (true, Ok(())) => {
            // An empty sequence has no keys: its output is defined as zeros.
            assert!(o.iter().all(|x| x.is_finite()), "non-finite output from a valid table: {input:?}");
        }
        (false, Err(_)) => {}
        (true, Err(e)) => panic!("a valid table was refused: {e}: {input:?}"),
        (false, Ok(())) => panic!("an invalid table was decoded: {input:?}"),
    }
});

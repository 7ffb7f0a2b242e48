//! The paged KV cache driven by any sequence of operations: add, fork, fork a prefix, free (stale
//! handles included), reserve and append. After each one the bookkeeping must hold
//! (`PagedKvCache::audit`), a failed reserve must change nothing, and the page table of the live
//! sequences must pass the kernels' validation. The cache is f32 or int8 (codes with a scale per
//! row, whose copy-on-write and appends move two arrays).
#![no_main]

use arbitrary::Arbitrary;
use twinfer::{DType, KvCacheConfig, KvLayout, PagedKvCache, Q8Ref, SeqId, TensorRef};

#[derive(Debug, Arbitrary)]
enum Op {
    Add,
    Fork(u8),
    ForkPrefix(u8, u16),
    Free(u8),
    Reserve(Vec<(u8, u8)>),
    Append { layer: u8, seqs: Vec<u8>, counts: Vec<u8> },
}

#[derive(Debug, Arbitrary)]
struct Input {
    page_size: u8,
    num_pages: u8,
    q8: bool,
    ops: Vec<Op>,
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    let page_size = 1 + input.page_size as usize % 16;
    let num_pages = 1 + input.num_pages as usize % 32;
    let layout = KvLayout::new(page_size, 1, 8).expect("a valid layout");
    let dtype = if input.q8 { DType::Q8 } else { DType::F32 };
    let config = KvCacheConfig { num_layers: 2, num_pages, layout, dtype };
    let mut cache = PagedKvCache::new(config).expect("a small cache");
    // Every handle ever made, freed ones too: a stale handle must be an error, not a panic.
    let mut handles: Vec<SeqId> = Vec::new();
    let pick = |handles: &[SeqId], i: u8| (!handles.is_empty()).then(|| handles[i as usize % handles.len()]);
    for op in input.ops.iter().take(64) {
        match op {
            Op::Add => handles.push(cache.add_sequence()),
            Op::Fork(i) => {
                if let Some(s) = pick(&handles, *i)
                    && let Ok(child) = cache.fork(s)
                {
                    handles.push(child);
                }
            }
            Op::ForkPrefix(i, len) => {
                if let Some(s) = pick(&handles, *i)
                    && let Ok(child) = cache.fork_prefix(s, *len as usize)
                {
                    handles.push(child);
                }
            }
            Op::Free(i) => {
                if let Some(s) = pick(&handles, *i) {
                    let _ = cache.free(s);
                }
            }
            Op::Reserve(items) => {
                let seqs: Vec<SeqId> = items.iter().filter_map(|&(i, _)| pick(&handles, i)).collect();
                let counts: Vec<usize> = items.iter().take(seqs.len()).map(|&(_, n)| n as usize % 40).collect();
                let before: Vec<(SeqId, usize)> =
                    cache.sequences().map(|s| (s, cache.seq_len(s).unwrap())).collect::<Vec<_>>();
                let free = cache.free_pages();
                if cache.reserve(&seqs, &counts).is_err() {
                    let after: Vec<(SeqId, usize)> =
                        cache.sequences().map(|s| (s, cache.seq_len(s).unwrap())).collect();
                    assert_eq!(before, after, "a failed reserve changed sequence lengths");
                    assert_eq!(free, cache.free_pages(), "a failed reserve changed the pool");
                }
            }
            Op::Append { layer, seqs, counts } => {
                let seqs: Vec<SeqId> = seqs.iter().filter_map(|&i| pick(&handles, i)).take(8).collect();
                let mut indptr = vec![0u32];
                for (k, _) in seqs.iter().enumerate() {
                    let n = counts.get(k).copied().unwrap_or(0) as u32 % 20;
                    indptr.push(indptr[k] + n);
                }
                let rows = *indptr.last().unwrap() as usize;
                let k = vec![0.5f32; rows * 8];
                let (mut codes, mut scales) = (vec![0i8; rows * 8], vec![0f32; rows]);
                twinfer::quantize_q8(&k, 8, &mut codes, &mut scales);
                let view = match dtype {
                    DType::Q8 => TensorRef::Q8(Q8Ref { codes: &codes, scales: &scales, group: 8 }),
                    _ => k.as_slice().into(),
                };
                let _ = cache.append(*layer as usize % 3, &seqs, &indptr, view, view);
            }
        }
        if let Err(e) = cache.audit() {
            panic!("after {op:?}: {e}");
        }
        let live: Vec<SeqId> = cache.sequences().collect();
        let table = cache.page_table(&live).expect("the live sequences' table");
        table.as_table().validate(page_size, num_pages).expect("the cache's own table is valid");
    }
});

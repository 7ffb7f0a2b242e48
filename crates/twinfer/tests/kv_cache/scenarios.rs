//! Error reporting and hand-picked scenarios of the paged KV cache (part of the `kv_cache` test).

use twinfer::{
    DType, KvCacheConfig, KvLayout, PageAllocator, PageTable, PagedKvCache, SeqId, TensorMut, TensorRef, TwinferError,
    append_paged_kv, f16,
};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn small_cache(page_size: usize, num_pages: usize, num_layers: usize, dtype: DType) -> PagedKvCache {
    let layout = KvLayout::new(page_size, 2, 8).unwrap();
    PagedKvCache::new(KvCacheConfig { num_layers, num_pages, layout, dtype }).unwrap()
}

/// `n` rows of 16 elements (2 heads x 8), every element distinct and tagged by `tag`.
fn rows(tag: f32, n: usize) -> Vec<f32> {
    (0..n * 16).map(|i| tag + i as f32 / 64.0).collect()
}

fn append_one(cache: &mut PagedKvCache, layer: usize, seq: SeqId, k: &[f32], v: &[f32]) -> twinfer::Result<()> {
    let n = (k.len() / 16) as u32;
    cache.append(layer, &[seq], &[0, n], TensorRef::F32(k), TensorRef::F32(v))
}

#[test]
fn config_is_validated() {
    let layout = KvLayout::new(4, 1, 8).unwrap();
    let bad_layers = KvCacheConfig { num_layers: 0, num_pages: 4, layout, dtype: DType::F32 };
    assert!(matches!(PagedKvCache::new(bad_layers), Err(TwinferError::InvalidParameter(_))));
    let bad_pages = KvCacheConfig { num_layers: 1, num_pages: 0, layout, dtype: DType::F32 };
    assert!(matches!(PagedKvCache::new(bad_pages), Err(TwinferError::InvalidParameter(_))));
    let bad_layout =
        KvCacheConfig { layout: KvLayout { page_size: 0, ..layout }, num_layers: 1, num_pages: 1, dtype: DType::F32 };
    assert_eq!(PagedKvCache::new(bad_layout).unwrap_err(), TwinferError::PageSizeUnsupported { page_size: 0 });
}

#[test]
fn unknown_sequence_is_reported_everywhere() {
    let mut cache = small_cache(4, 4, 1, DType::F32);
    let gone = cache.add_sequence();
    cache.free(gone).unwrap();
    let err = TwinferError::UnknownSequence { seq: gone.0 };
    assert_eq!(cache.fork(gone).unwrap_err(), err);
    assert_eq!(cache.free(gone).unwrap_err(), err);
    assert_eq!(cache.seq_len(gone).unwrap_err(), err);
    assert_eq!(cache.reserve(&[gone], &[1]).unwrap_err(), err);
    assert_eq!(cache.page_table(&[gone]).unwrap_err(), err);
    assert_eq!(cache.read_rows(0, gone, 0, 0).unwrap_err(), err);
    assert_eq!(cache.append(0, &[gone], &[0, 0], TensorRef::F32(&[]), TensorRef::F32(&[])).unwrap_err(), err);
    // Ids are never reused: a new sequence does not revive the freed handle.
    assert_ne!(cache.add_sequence(), gone);
    assert_eq!(cache.seq_len(gone).unwrap_err(), err);
}

#[test]
fn layer_out_of_range() {
    let mut cache = small_cache(4, 4, 2, DType::F32);
    let s = cache.add_sequence();
    cache.reserve(&[s], &[1]).unwrap();
    let err = TwinferError::LayerOutOfRange { layer: 2, num_layers: 2 };
    assert_eq!(append_one(&mut cache, 2, s, &rows(1.0, 1), &rows(2.0, 1)), Err(err.clone()));
    assert_eq!(cache.layer(2).unwrap_err(), err);
    assert_eq!(cache.read_rows(2, s, 0, 1).unwrap_err(), err);
    assert!(cache.layer(1).is_ok());
}

#[test]
fn append_longer_than_reserved_is_refused() {
    let mut cache = small_cache(4, 4, 1, DType::F32);
    let s = cache.add_sequence();
    cache.reserve(&[s], &[2]).unwrap();
    let result = append_one(&mut cache, 0, s, &rows(1.0, 3), &rows(2.0, 3));
    assert!(matches!(result, Err(TwinferError::InvalidParameter(_))), "{result:?}");
    append_one(&mut cache, 0, s, &rows(1.0, 2), &rows(2.0, 2)).unwrap();
    assert!(matches!(cache.read_rows(0, s, 1, 2), Err(TwinferError::InvalidParameter(_))));
}

#[test]
fn append_dtype_mismatch_is_refused() {
    let mut cache = small_cache(4, 4, 1, DType::F16);
    let s = cache.add_sequence();
    cache.reserve(&[s], &[1]).unwrap();
    let err = TwinferError::DtypeMismatch { what: "appended K", expected: DType::F16, got: DType::F32 };
    assert_eq!(append_one(&mut cache, 0, s, &rows(1.0, 1), &rows(2.0, 1)), Err(err));
    assert_eq!(cache.read_rows(0, s, 0, 1).unwrap().0, vec![0.0; 16], "a refused append wrote");

    // The free function refuses pools of different dtypes too.
    let layout = KvLayout::new(4, 2, 8).unwrap();
    let (mut kp, mut vp) = (vec![0.0f32; 64], vec![f16::ZERO; 64]);
    let table = PageTable::new(&[0, 1], &[0], &[1]);
    let (k, v) = (rows(1.0, 1), rows(2.0, 1));
    let result = append_paged_kv(
        TensorMut::F32(&mut kp),
        TensorMut::F16(&mut vp),
        layout,
        &table,
        &[0, 1],
        TensorRef::F32(&k),
        TensorRef::F32(&v),
    );
    assert!(matches!(result, Err(TwinferError::DtypeMismatch { .. })), "{result:?}");
}

/// Calls `append_paged_kv` on a 2-page f32 pool (page_size 4, 2 heads x 8) with one new row per sequence.
fn raw_append(pool: &mut [f32], table: PageTable<'_>) -> twinfer::Result<()> {
    let layout = KvLayout::new(4, 2, 8).unwrap();
    let batch = table.batch_size();
    let indptr: Vec<u32> = (0..=batch as u32).collect();
    let (k, v) = (rows(1.0, batch), rows(2.0, batch));
    let mut vpool = vec![0.0f32; pool.len()];
    append_paged_kv(
        TensorMut::F32(pool),
        TensorMut::F32(&mut vpool),
        layout,
        &table,
        &indptr,
        TensorRef::F32(&k),
        TensorRef::F32(&v),
    )
}

#[test]
fn append_paged_kv_rejects_bad_tables() {
    let mut pool = vec![0.0f32; 2 * 4 * 16];
    let err = raw_append(&mut pool, PageTable::new(&[0, 1], &[2], &[1]));
    assert_eq!(err, Err(TwinferError::PageIndexOutOfRange { position: 0, page: 2, num_pages: 2 }));
    let err = raw_append(&mut pool, PageTable::new(&[0, 1], &[1], &[5]));
    assert_eq!(err, Err(TwinferError::LastPageLenOutOfRange { seq: 0, value: 5, page_size: 4 }));
    let err = raw_append(&mut pool, PageTable::new(&[0, 1], &[1], &[0]));
    assert_eq!(err, Err(TwinferError::LastPageLenOutOfRange { seq: 0, value: 0, page_size: 4 }));
    // A sequence with no pages cannot take a row.
    let err = raw_append(&mut pool, PageTable::new(&[0, 0], &[], &[0]));
    assert!(matches!(err, Err(TwinferError::InvalidParameter(_))), "{err:?}");
    assert!(pool.iter().all(|&x| x == 0.0), "a refused append wrote");
}

#[test]
fn append_paged_kv_writes_last_positions() {
    // Sequence 0: pages [1, 0], 6 tokens -> its 2 new rows are positions 4, 5 = page 0 slots 0, 1.
    // Sequence 1: page [2], 3 tokens -> its 1 new row is position 2 = page 2 slot 2.
    let layout = KvLayout::new(4, 2, 8).unwrap();
    let mut kp = vec![0.0f32; 3 * 4 * 16];
    let mut vp = kp.clone();
    let table = PageTable::new(&[0, 2, 3], &[1, 0, 2], &[2, 3]);
    let (k, v) = (rows(1.0, 3), rows(-1.0, 3));
    append_paged_kv(
        TensorMut::F32(&mut kp),
        TensorMut::F32(&mut vp),
        layout,
        &table,
        &[0, 2, 3],
        TensorRef::F32(&k),
        TensorRef::F32(&v),
    )
    .unwrap();
    let at = |page: usize, slot: usize| layout.offset(page, slot, 0);
    assert_eq!(&kp[at(0, 0)..at(0, 2)], &k[..32]);
    assert_eq!(&vp[at(0, 0)..at(0, 2)], &v[..32]);
    assert_eq!(&kp[at(2, 2)..at(2, 3)], &k[32..]);
    let written = [at(0, 0)..at(0, 2), at(2, 2)..at(2, 3)];
    for (i, &x) in kp.iter().enumerate() {
        assert_eq!(x != 0.0, written.iter().any(|r| r.contains(&i)), "element {i}");
    }
}

#[test]
fn pool_exhausted_changes_nothing() {
    let mut cache = small_cache(4, 3, 1, DType::F32);
    let (a, b) = (cache.add_sequence(), cache.add_sequence());
    cache.reserve(&[a], &[5]).unwrap();
    let before = cache.page_table(&[a, b]).unwrap();
    // a needs 1 more page (5 -> 9 tokens), b needs 1: 2 > 1 free.
    assert_eq!(cache.reserve(&[a, b], &[4, 1]), Err(TwinferError::KvPoolExhausted { needed: 2, free: 1 }));
    assert_eq!(cache.page_table(&[a, b]).unwrap(), before);
    assert_eq!((cache.seq_len(a), cache.seq_len(b), cache.free_pages()), (Ok(5), Ok(0), 1));
    cache.reserve(&[a, b], &[3, 0]).unwrap();
    assert_eq!(cache.free_pages(), 1);
}

#[test]
fn duplicate_sequence_in_reserve_is_refused() {
    let mut cache = small_cache(4, 4, 1, DType::F32);
    let a = cache.add_sequence();
    assert!(matches!(cache.reserve(&[a, a], &[1, 1]), Err(TwinferError::InvalidParameter(_))));
    assert_eq!((cache.seq_len(a), cache.free_pages()), (Ok(0), 4));
    assert!(matches!(cache.reserve(&[a], &[1, 1]), Err(TwinferError::ShapeMismatch { .. })));
}

#[test]
fn fork_shares_then_copies_partial_page_in_every_layer() {
    let mut cache = small_cache(4, 8, 2, DType::F32);
    let parent = cache.add_sequence();
    cache.reserve(&[parent], &[6]).unwrap();
    for layer in 0..2 {
        append_one(&mut cache, layer, parent, &rows(layer as f32 + 1.0, 6), &rows(layer as f32 - 9.0, 6)).unwrap();
    }
    let child = cache.fork(parent).unwrap();
    let shared = cache.page_table(&[parent]).unwrap().indices;
    assert_eq!(cache.page_table(&[child]).unwrap().indices, shared);
    assert!(shared.iter().all(|&p| cache.allocator().refcount(p) == 2));
    // Writing into the shared partial page before un-sharing it is refused.
    let result = cache.append(0, &[child], &[0, 1], TensorRef::F32(&rows(7.0, 1)), TensorRef::F32(&rows(7.0, 1)));
    assert!(matches!(result, Err(TwinferError::InvalidParameter(_))), "{result:?}");

    cache.reserve(&[child], &[1]).unwrap();
    let child_pages = cache.page_table(&[child]).unwrap().indices;
    assert_eq!(child_pages[0], shared[0], "the full page stays shared");
    assert_ne!(child_pages[1], shared[1], "the partial page is copied");
    assert_eq!((cache.allocator().refcount(shared[0]), cache.allocator().refcount(shared[1])), (2, 1));
    for layer in 0..2 {
        append_one(&mut cache, layer, child, &rows(50.0, 1), &rows(60.0, 1)).unwrap();
        let (pk, pv) = cache.read_rows(layer, parent, 0, 6).unwrap();
        let (ck, cv) = cache.read_rows(layer, child, 0, 7).unwrap();
        assert_eq!((&ck[..96], &cv[..96]), (&pk[..], &pv[..]), "copied rows of layer {layer}");
        assert_eq!((&ck[96..], &cv[96..]), (&rows(50.0, 1)[..], &rows(60.0, 1)[..]));
    }
}

#[test]
fn reserve_counts_copy_on_write_exactly() {
    // Parent and child share a partial page; with one free page both can grow: the first copies
    // the page, the second is then its only holder and keeps it.
    let mut cache = small_cache(4, 2, 1, DType::F32);
    let parent = cache.add_sequence();
    cache.reserve(&[parent], &[2]).unwrap();
    append_one(&mut cache, 0, parent, &rows(1.0, 2), &rows(2.0, 2)).unwrap();
    let child = cache.fork(parent).unwrap();
    cache.reserve(&[parent, child], &[1, 1]).unwrap();
    assert_eq!(cache.free_pages(), 0);
    let pages = cache.page_table(&[parent, child]).unwrap().indices;
    assert_ne!(pages[0], pages[1]);
    for s in [parent, child] {
        assert_eq!(cache.read_rows(0, s, 0, 2).unwrap(), (rows(1.0, 2), rows(2.0, 2)));
    }
    // A third holder would need a second copy, which the empty pool cannot give.
    let grand = cache.fork(child).unwrap();
    assert_eq!(cache.reserve(&[child, grand], &[1, 1]), Err(TwinferError::KvPoolExhausted { needed: 1, free: 0 }));
}

#[test]
fn free_returns_pages_only_when_unshared() {
    let mut cache = small_cache(4, 4, 1, DType::F32);
    let a = cache.add_sequence();
    cache.reserve(&[a], &[8]).unwrap();
    let b = cache.fork(a).unwrap();
    assert_eq!(cache.free_pages(), 2);
    cache.free(a).unwrap();
    assert_eq!(cache.free_pages(), 2);
    assert_eq!(cache.sequences().collect::<Vec<_>>(), vec![b]);
    cache.free(b).unwrap();
    assert_eq!(cache.free_pages(), 4);
}

#[test]
fn page_table_of_empty_and_partial_sequences() {
    let mut cache = small_cache(4, 4, 1, DType::F32);
    let (a, b) = (cache.add_sequence(), cache.add_sequence());
    cache.reserve(&[b], &[5]).unwrap();
    let t = cache.page_table(&[a, b]).unwrap();
    assert_eq!((t.indptr, t.indices, t.last_page_len), (vec![0, 0, 2], vec![0, 1], vec![0, 1]));
}

#[test]
fn allocator_is_all_or_nothing() {
    let mut alloc = PageAllocator::new(3);
    assert_eq!(alloc.alloc(), Some(0));
    assert_eq!(alloc.alloc_many(3), Err(TwinferError::KvPoolExhausted { needed: 3, free: 2 }));
    assert_eq!(alloc.free_pages(), 2);
    assert_eq!(alloc.alloc_many(2).unwrap(), vec![1, 2]);
    assert_eq!(alloc.alloc(), None);
    alloc.retain(1).unwrap();
    assert_eq!((alloc.refcount(1), alloc.release(1), alloc.release(1)), (2, Ok(false), Ok(true)));
    assert!(matches!(alloc.release(1), Err(TwinferError::InvalidParameter(_))), "double release");
    assert!(matches!(alloc.retain(7), Err(TwinferError::InvalidParameter(_))));
    assert_eq!((alloc.free_pages(), alloc.num_pages(), alloc.refcount(1)), (1, 3, 0));
    assert_eq!(alloc.alloc(), Some(1));
}

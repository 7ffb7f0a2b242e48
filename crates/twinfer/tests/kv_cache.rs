//! The paged KV cache against a model that keeps every sequence's rows in plain vectors.
//!
//! The property test drives random add / fork / reserve / append / free sequences on small pools
//! (so exhaustion and copy-on-write happen) and after every step checks the read-back rows, the
//! reference counts, page accounting and that failed calls changed nothing. f32, f16 and int8
//! caches (whose copy-on-write copies must carry each row's scale with its codes).

use std::collections::{BTreeMap, HashMap};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use proptest::prelude::*;
use twinfer::{DType, KvCacheConfig, KvLayout, PageTableBuf, PagedKvCache, SeqId, TensorRef, TwinferError, f16};

// Error cases and hand-picked scenarios; kept apart so that each file stays readable.
#[path = "kv_cache/scenarios.rs"]
mod scenarios;

type Row = Vec<f32>;
/// `[layer][position]`: the (K, V) row last appended there, `None` if reserved but never written.
type SeqModel = Vec<Vec<Option<(Row, Row)>>>;

/// A nonzero value that f16 holds exactly (a multiple of 1/64 below 32 in magnitude), so that f16
/// and f32 caches can both be compared exactly. Mixing every coordinate makes rows distinct.
fn value(key: [u64; 6]) -> f32 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for k in key {
        h = (h ^ k).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    let magnitude = (h % 2047 + 1) as f32 / 64.0;
    if h & (1 << 40) != 0 { -magnitude } else { magnitude }
}

/// Rows in the cache's dtype.
enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// int8 codes and one scale per head's row (`head_dim` values).
    Q8(Vec<i8>, Vec<f32>, usize),
}

impl Rows {
    fn new(dtype: DType, data: &[f32], head_dim: usize) -> Self {
        match dtype {
            DType::F16 => Rows::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Q8 => {
                let (mut codes, mut scales) = (vec![0i8; data.len()], vec![0f32; data.len() / head_dim]);
                twinfer::quantize_q8(data, head_dim, &mut codes, &mut scales);
                Rows::Q8(codes, scales, head_dim)
            }
            _ => Rows::F32(data.to_vec()),
        }
    }
    fn view(&self) -> TensorRef<'_> {
        match self {
            Rows::F32(s) => TensorRef::F32(s),
            Rows::F16(s) => TensorRef::F16(s),
            Rows::Q8(c, s, g) => TensorRef::Q8(twinfer::Q8Ref { codes: c, scales: s, group: *g }),
        }
    }
    /// The values the cache must read back: exact for f32 and f16 (every `value` is an f16),
    /// the dequantized codes for Q8.
    fn values(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.view().len()];
        self.view().read_f32(0, &mut out);
        out
    }
}

#[derive(Debug, Clone, Copy)]
enum AppendLen {
    /// Every trailing row not written yet in that layer.
    Pending,
    Fixed(usize),
    /// One more than the sequence holds: must be refused.
    TooMany,
}

#[derive(Debug, Clone)]
enum Op {
    Add,
    Fork(usize),
    Free(usize),
    Reserve(Vec<(usize, usize)>),
    /// `layer == u8::MAX` asks for a layer past the end.
    Append {
        layer: u8,
        rows: Vec<(usize, AppendLen)>,
    },
}

/// Everything observable about page ownership; a failed call must leave it as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    seqs: Vec<SeqId>,
    table: PageTableBuf,
    free: usize,
}

struct Harness {
    cache: PagedKvCache,
    model: BTreeMap<SeqId, SeqModel>,
    issued: Vec<SeqId>,
    writes: u64,
}

impl Harness {
    fn new(config: KvCacheConfig) -> Self {
        Self { cache: PagedKvCache::new(config).unwrap(), model: BTreeMap::new(), issued: Vec::new(), writes: 0 }
    }

    fn page_size(&self) -> usize {
        self.cache.layout().page_size
    }

    /// Mostly a live sequence; one pick in sixteen may be a freed one (or a never-issued id).
    fn pick(&self, i: usize) -> SeqId {
        let live: Vec<SeqId> = self.model.keys().copied().collect();
        if i % 16 == 15 && !self.issued.is_empty() {
            return self.issued[(i / 16) % self.issued.len()];
        }
        if live.is_empty() { SeqId(u64::MAX) } else { live[i % live.len()] }
    }

    fn snapshot(&self) -> Snapshot {
        let seqs: Vec<SeqId> = self.cache.sequences().collect();
        Snapshot { table: self.cache.page_table(&seqs).unwrap(), seqs, free: self.cache.free_pages() }
    }

    fn pages_of(&self, id: SeqId) -> Vec<u32> {
        self.cache.page_table(&[id]).unwrap().indices
    }

    /// How many live sequences list each page, from the page tables alone.
    fn holders(&self) -> HashMap<u32, usize> {
        let mut holders = HashMap::new();
        for &id in self.model.keys() {
            for page in self.pages_of(id) {
                *holders.entry(page).or_insert(0) += 1;
            }
        }
        holders
    }

    fn first_unknown(&self, ids: &[SeqId]) -> Option<SeqId> {
        ids.iter().copied().find(|id| !self.model.contains_key(id))
    }

    fn apply(&mut self, op: &Op) {
        let before = self.snapshot();
        let failed = match op {
            Op::Add => {
                let id = self.cache.add_sequence();
                assert!(!self.issued.contains(&id), "id {id} reused");
                self.issued.push(id);
                self.model.insert(id, vec![Vec::new(); self.cache.num_layers()]);
                false
            }
            Op::Fork(i) => self.fork(self.pick(*i)),
            Op::Free(i) => self.free(self.pick(*i)),
            Op::Reserve(list) => {
                let (ids, counts): (Vec<SeqId>, Vec<usize>) = list.iter().map(|&(i, n)| (self.pick(i), n)).unzip();
                self.reserve(&ids, &counts)
            }
            Op::Append { layer, rows } => self.append(*layer, rows),
        };
        if failed {
            assert_eq!(self.snapshot(), before, "a failed {op:?} changed the cache");
        }
        self.check();
    }

    /// Returns whether the call failed (as the model predicted).
    fn fork(&mut self, parent: SeqId) -> bool {
        let result = self.cache.fork(parent);
        match self.model.get(&parent).cloned() {
            None => {
                assert_eq!(result, Err(TwinferError::UnknownSequence { seq: parent.0 }));
                true
            }
            Some(rows) => {
                let child = result.unwrap();
                assert!(!self.issued.contains(&child), "id {child} reused");
                self.issued.push(child);
                self.model.insert(child, rows);
                false
            }
        }
    }

    fn free(&mut self, id: SeqId) -> bool {
        let result = self.cache.free(id);
        if self.model.remove(&id).is_some() {
            result.unwrap();
            false
        } else {
            assert_eq!(result, Err(TwinferError::UnknownSequence { seq: id.0 }));
            true
        }
    }

    /// Pages a reserve must take: new tail pages, plus a copy for each shared partial last page
    /// except where the last holder to grow is left as its only holder.
    fn expected_pages(&self, ids: &[SeqId], counts: &[usize]) -> usize {
        let ps = self.page_size();
        let holders = self.holders();
        let mut left: HashMap<u32, usize> = HashMap::new();
        let mut needed = 0;
        for (&id, &n) in ids.iter().zip(counts) {
            let len = self.model[&id][0].len();
            if n == 0 {
                continue;
            }
            needed += (len + n).div_ceil(ps) - len.div_ceil(ps);
            if !len.is_multiple_of(ps) {
                let last = *self.pages_of(id).last().unwrap();
                let l = left.entry(last).or_insert(holders[&last]);
                if *l > 1 {
                    *l -= 1;
                    needed += 1;
                }
            }
        }
        needed
    }

    fn reserve(&mut self, ids: &[SeqId], counts: &[usize]) -> bool {
        let expected = if let Some(id) = self.first_unknown(ids) {
            Err(TwinferError::UnknownSequence { seq: id.0 })
        } else if (1..ids.len()).any(|i| ids[..i].contains(&ids[i])) {
            Err(TwinferError::InvalidParameter(String::new()))
        } else {
            let needed = self.expected_pages(ids, counts);
            let free = self.cache.free_pages();
            if needed > free { Err(TwinferError::KvPoolExhausted { needed, free }) } else { Ok(free - needed) }
        };
        let result = self.cache.reserve(ids, counts);
        match (expected, result) {
            (Ok(free_after), Ok(())) => {
                assert_eq!(self.cache.free_pages(), free_after, "reserve took the wrong number of pages");
                for (id, &n) in ids.iter().zip(counts) {
                    for layer in self.model.get_mut(id).unwrap() {
                        layer.resize(layer.len() + n, None);
                    }
                }
                false
            }
            (Err(TwinferError::InvalidParameter(_)), Err(TwinferError::InvalidParameter(_))) => true,
            (Err(want), Err(got)) => {
                assert_eq!(got, want);
                true
            }
            (want, got) => panic!("reserve {ids:?} {counts:?}: expected {want:?}, got {got:?}"),
        }
    }

    fn append_len(&self, id: SeqId, layer: usize, len: AppendLen) -> usize {
        let Some(rows) = self.model.get(&id) else { return 0 };
        let layer_rows = &rows[layer.min(rows.len() - 1)];
        match len {
            AppendLen::Pending => layer_rows.iter().rev().take_while(|r| r.is_none()).count(),
            AppendLen::Fixed(n) => n.min(layer_rows.len()),
            AppendLen::TooMany => layer_rows.len() + 1,
        }
    }

    /// Whether writing the last `n` rows of `id` would touch a page another live sequence lists.
    fn touches_shared(&self, id: SeqId, n: usize, holders: &HashMap<u32, usize>) -> bool {
        let ps = self.page_size();
        let len = self.model[&id][0].len();
        let pages = self.pages_of(id);
        n > 0 && pages[(len - n) / ps..len.div_ceil(ps)].iter().any(|p| holders[p] > 1)
    }

    fn append(&mut self, layer: u8, list: &[(usize, AppendLen)]) -> bool {
        let num_layers = self.cache.num_layers();
        let layer = if layer == u8::MAX { num_layers } else { layer as usize % num_layers };
        let ids: Vec<SeqId> = list.iter().map(|&(i, _)| self.pick(i)).collect();
        let counts: Vec<usize> = ids.iter().zip(list).map(|(&id, &(_, len))| self.append_len(id, layer, len)).collect();
        let row = self.cache.layout().row_elems();
        self.writes += 1;
        let mut indptr = vec![0u32];
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (&id, &n) in ids.iter().zip(&counts) {
            for i in 0..n {
                for e in 0..row {
                    k.push(value([self.writes, id.0, i as u64, layer as u64, 0, e as u64]));
                    v.push(value([self.writes, id.0, i as u64, layer as u64, 1, e as u64]));
                }
            }
            indptr.push(indptr.last().unwrap() + n as u32);
        }
        let head_dim = self.cache.layout().head_dim;
        let (kt, vt) = (Rows::new(self.cache.dtype(), &k, head_dim), Rows::new(self.cache.dtype(), &v, head_dim));
        let result = self.cache.append(layer, &ids, &indptr, kt.view(), vt.view());
        let (k, v) = (kt.values(), vt.values());

        if layer >= num_layers {
            assert_eq!(result, Err(TwinferError::LayerOutOfRange { layer, num_layers }));
            return true;
        }
        if let Some(id) = self.first_unknown(&ids) {
            assert_eq!(result, Err(TwinferError::UnknownSequence { seq: id.0 }));
            return true;
        }
        let holders = self.holders();
        let too_long = ids.iter().zip(&counts).any(|(id, &n)| n > self.model[id][0].len());
        if too_long || ids.iter().zip(&counts).any(|(&id, &n)| self.touches_shared(id, n, &holders)) {
            assert!(matches!(result, Err(TwinferError::InvalidParameter(_))), "expected a refusal, got {result:?}");
            return true;
        }
        result.unwrap();
        let mut src = 0;
        for (id, &n) in ids.iter().zip(&counts) {
            let rows = &mut self.model.get_mut(id).unwrap()[layer];
            let start = rows.len() - n;
            for slot in &mut rows[start..] {
                *slot = Some((k[src * row..(src + 1) * row].to_vec(), v[src * row..(src + 1) * row].to_vec()));
                src += 1;
            }
        }
        false
    }

    fn check(&self) {
        let ps = self.page_size();
        let seqs: Vec<SeqId> = self.cache.sequences().collect();
        assert_eq!(seqs, self.model.keys().copied().collect::<Vec<_>>());
        let table = self.cache.page_table(&seqs).unwrap();
        table.as_table().validate(ps, self.cache.num_pages()).unwrap();

        // Where each page sits in each holder: shared pages come from forks, so the same index.
        let mut holders: HashMap<u32, Vec<usize>> = HashMap::new();
        for (b, (&id, rows)) in self.model.iter().enumerate() {
            assert_eq!(self.cache.seq_len(id).unwrap(), rows[0].len());
            assert_eq!(table.as_table().kv_len(b, ps), rows[0].len(), "table length of {id}");
            for (index, &page) in table.as_table().pages(b).iter().enumerate() {
                holders.entry(page).or_default().push(index);
            }
            self.check_rows(id, rows);
        }
        for page in 0..self.cache.num_pages() as u32 {
            let held = holders.get(&page).map_or(0, Vec::len);
            assert_eq!(self.cache.allocator().refcount(page) as usize, held, "refcount of page {page}");
        }
        for (page, at) in &holders {
            assert!(at.iter().all(|&i| i == at[0]), "page {page} sits at different indices {at:?}");
        }
        assert_eq!(self.cache.free_pages() + holders.len(), self.cache.num_pages(), "pages leaked");
    }

    fn check_rows(&self, id: SeqId, rows: &SeqModel) {
        let row = self.cache.layout().row_elems();
        for (layer, expected) in rows.iter().enumerate() {
            let (k, v) = self.cache.read_rows(layer, id, 0, expected.len()).unwrap();
            for (pos, want) in expected.iter().enumerate() {
                if let Some((wk, wv)) = want {
                    assert_eq!(&k[pos * row..(pos + 1) * row], &wk[..], "K of {id} layer {layer} position {pos}");
                    assert_eq!(&v[pos * row..(pos + 1) * row], &wv[..], "V of {id} layer {layer} position {pos}");
                }
            }
        }
    }
}

fn config_strategy() -> impl Strategy<Value = KvCacheConfig> {
    let page_size = prop_oneof![3 => Just(1usize), 3 => Just(3), 3 => Just(16), 2 => Just(64), 1 => 1..=256usize];
    let dtype = prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::Q8)];
    (page_size, 1..=16usize, 1..=2usize, 1..=2usize, prop_oneof![Just(8usize), Just(16)], dtype).prop_map(
        |(page_size, num_pages, num_layers, heads, head_dim, dtype)| KvCacheConfig {
            num_layers,
            num_pages,
            layout: KvLayout::new(page_size, heads, head_dim).unwrap(),
            dtype,
        },
    )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let count = prop_oneof![2 => Just(0usize), 4 => 1..=4usize, 3 => 0..=40usize, 1 => Just(200)];
    let append_len = prop_oneof![
        12 => Just(AppendLen::Pending),
        7 => (0..=6usize).prop_map(AppendLen::Fixed),
        1 => Just(AppendLen::TooMany),
    ];
    let layer = prop_oneof![19 => any::<u8>().prop_map(|l| l % 2), 1 => Just(u8::MAX)];
    prop_oneof![
        3 => Just(Op::Add),
        2 => any::<usize>().prop_map(Op::Fork),
        1 => any::<usize>().prop_map(Op::Free),
        3 => prop::collection::vec((any::<usize>(), count), 0..4).prop_map(Op::Reserve),
        4 => (layer, prop::collection::vec((any::<usize>(), append_len), 1..4))
            .prop_map(|(layer, rows)| Op::Append { layer, rows }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]
    #[test]
    fn cache_matches_model(config in config_strategy(), ops in prop::collection::vec(op_strategy(), 1..60)) {
        let mut h = Harness::new(config);
        h.check();
        for op in &ops {
            h.apply(op);
        }
    }
}

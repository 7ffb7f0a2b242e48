//! Hostile model files cost at most their own size plus a bounded overhead to refuse: a shape, a
//! count or a length that claims terabytes must be caught before anything that size is allocated.
//! A counting allocator measures the peak of live heap bytes during each load; this binary holds
//! one test, so nothing else allocates meanwhile.
#![cfg(not(target_arch = "wasm32"))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use twinfer::model::{Model, ModelSource};
use twinfer_tests::models::model_dir;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: the caller's layout is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Beyond the input's own bytes: parsing the tokenizer and config, error messages.
const OVERHEAD: usize = 64 << 20;

/// Loads `files` (which must fail) and returns the peak heap growth during the load.
fn peak_growth(files: HashMap<String, Vec<u8>>) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let err = Model::load(ModelSource::Files(files)).expect_err("a hostile file loaded");
    let peak = PEAK.load(Ordering::SeqCst) - base;
    eprintln!("refused ({err}) with a peak of {} KiB", peak >> 10);
    peak
}

/// A GGUF file: header, one string key, the given tensor table entries, no data.
fn gguf(tensor_count: u64, kv: &[(&str, Vec<u8>)], tensors: &[(&str, &[u64])]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&tensor_count.to_le_bytes());
    out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (key, value) in kv {
        out.extend_from_slice(&(key.len() as u64).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(value);
    }
    for (name, dims) in tensors {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&0u32.to_le_bytes()); // F32
        out.extend_from_slice(&0u64.to_le_bytes());
    }
    out.resize(out.len().div_ceil(32) * 32 + 64, 0);
    out
}

/// A metadata value: an array of `count` u32 with only one element present.
fn huge_array(count: u64) -> Vec<u8> {
    let mut v = 9u32.to_le_bytes().to_vec();
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&7u32.to_le_bytes());
    v
}

#[test]
fn hostile_files_are_refused_within_their_size_plus_a_bound() {
    let arch = {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend_from_slice(&5u64.to_le_bytes());
        v.extend_from_slice(b"llama");
        v
    };
    let ggufs = [
        ("a tensor count of 2^40", gguf(1 << 40, &[("general.architecture", arch.clone())], &[])),
        ("an array of 2^60 items", gguf(0, &[("general.architecture", arch.clone()), ("a", huge_array(1 << 60))], &[])),
        ("a 2^62-element tensor", gguf(1, &[("general.architecture", arch.clone())], &[("w", &[1 << 31, 1 << 31])])),
        ("a 2^40-byte string", {
            let mut v = 8u32.to_le_bytes().to_vec();
            v.extend_from_slice(&(1u64 << 40).to_le_bytes());
            gguf(0, &[("general.architecture", v)], &[])
        }),
    ];
    for (what, bytes) in ggufs {
        let bound = bytes.len() + OVERHEAD;
        let peak = peak_growth([("model.gguf".to_string(), bytes)].into_iter().collect());
        assert!(peak <= bound, "GGUF with {what}: peak heap growth {peak} bytes > {bound}");
    }

    // The tiny Llama with a tensor whose shape claims 2^80 elements.
    let dir = model_dir("tiny-llama");
    let mut files: HashMap<String, Vec<u8>> = ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect();
    let w = &files["model.safetensors"];
    let n = u64::from_le_bytes(w[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&w[8..8 + n]).unwrap();
    let q = "\"model.layers.0.self_attn.q_proj.weight\":{\"dtype\":\"F32\",\"shape\":[";
    let at = header.find(q).expect("the q projection's header entry") + q.len();
    let end = at + header[at..].find(']').unwrap();
    let mut hostile = header[..at].to_string() + "1099511627776,1099511627776" + &header[end..];
    while hostile.len() < n {
        hostile.push(' ');
    }
    let mut bytes = (hostile.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(hostile.as_bytes());
    bytes.extend_from_slice(&w[8 + n..]);
    let total: usize = files.values().map(Vec::len).sum::<usize>() - w.len() + bytes.len();
    files.insert("model.safetensors".into(), bytes);
    let bound = total + OVERHEAD;
    let peak = peak_growth(files);
    assert!(peak <= bound, "safetensors with a 2^80-element shape: peak heap growth {peak} bytes > {bound}");
}

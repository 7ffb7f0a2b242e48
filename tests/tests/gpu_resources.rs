//! The device-resident path: a decode loop (and a projection loop) that creates no GPU object
//! after warm-up, appends through the kernel equal to host appends, typed errors over the
//! adapter's limits, a real out-of-memory (under a process memory limit) that leaves nothing
//! behind, and a lost device that leaves the CPU engine to carry on.

#![cfg(not(target_arch = "wasm32"))]

use twinfer::cpu::CpuEngine;
use twinfer::gpu::{GpuEngine, GpuKvCache, GpuLinear, KvStorage, pool_page_bytes};
use twinfer::kv::{KvLayout, PageTable, PagedKv};
use twinfer::{AttentionOutput, AttentionParams, DecodeInput, TensorRef, TwinferError};

fn engine() -> Option<GpuEngine> {
    match GpuEngine::new() {
        Ok(e) => Some(e),
        Err(e) => {
            assert!(std::env::var("TWINFER_REQUIRE_GPU").as_deref() != Ok("1"), "TWINFER_REQUIRE_GPU=1: {e}");
            eprintln!("SKIPPED: no usable GPU ({e}); the device-resident path is NOT tested here");
            None
        }
    }
}

fn wave(i: usize, f: f32) -> f32 {
    (i as f32 * f).sin()
}

/// 4 sequences grow by one token a step for 103 steps: append on the device, decode on the
/// device, read back. After 3 warm-up steps no buffer, bind group or pipeline is created, and
/// the last step equals the CPU engine over a host mirror of the pool.
#[test]
fn decode_loop_creates_nothing_after_warm_up() {
    decode_loop(None, false);
}

/// The same loop over a pool split into buffers of 3 pages (14 buffers): pages map to
/// (buffer, slot), decode runs one pass per buffer and merges them.
#[test]
fn decode_loop_over_a_split_pool() {
    decode_loop(Some(3), false);
}

/// The loop over int8 pools, whole and split: the append kernel quantizes each (token, KV head)
/// row as the CPU's quantizer does (the host mirror holds the CPU's codes times scales, and the
/// outputs agree at the float pools' bound), and decode reads codes and scales.
#[test]
fn decode_loop_over_an_int8_pool() {
    decode_loop(None, true);
    decode_loop(Some(3), true);
}

fn decode_loop(pages_per_buffer: Option<usize>, q8: bool) {
    let Some(gpu) = engine() else { return };
    let (hq, hk, d, ps, batch, pages_per_seq) = (8, 2, 64, 16, 4, 10);
    let layout = KvLayout::new(ps, hk, d).unwrap();
    let num_pages = batch * pages_per_seq;
    let storage = match (q8, gpu.options().f16_kv) {
        (true, _) => KvStorage::Q8,
        (false, true) => KvStorage::F16,
        (false, false) => KvStorage::F32,
    };
    // An int8 buffer pads its scales to 16 bytes.
    let pad = if q8 { 16 } else { 0 };
    let max_buffer = pages_per_buffer.map_or(u64::MAX, |n| (n * pool_page_bytes(layout, storage) + pad) as u64);
    let cache = GpuKvCache::new(&gpu, layout, num_pages, storage, max_buffer).unwrap();
    assert_eq!(cache.num_buffers(), pages_per_buffer.map_or(1, |n| num_pages.div_ceil(n)));
    // Host mirror, rounded like the device storage (int8: per row, once the row is complete).
    let round = |x: f32| if storage == KvStorage::F16 { twinfer::f16::from_f32(x).to_f32() } else { x };
    let mut k_host = vec![0f32; num_pages * layout.page_elems()];
    let mut v_host = k_host.clone();
    // Sequence b owns pages b, b + batch, b + 2 batch, ... (interleaved, as a real pool ends up).
    let page_of = |b: usize, j: usize| (b + (j / ps) * batch) as u32;
    let params = AttentionParams::new(hq, hk, d).alibi_slopes(Some((0..hq).map(|h| 0.01 * h as f32).collect()));
    let mut lens = [5usize, 17, 1, 30];
    let row = layout.row_elems();
    let (mut o, mut lse) = (vec![0f32; batch * hq * d], vec![0f32; batch * hq]);
    let mut warm = None;
    for step in 0..103 {
        let mut slots = Vec::new();
        let (mut k_new, mut v_new) = (Vec::new(), Vec::new());
        for (b, len) in lens.iter_mut().enumerate() {
            let rows = if step == 0 { *len } else { 1 };
            for j in *len + 1 - rows..=*len {
                let (page, slot) = (page_of(b, j - 1), (j - 1) % ps);
                slots.push((page, slot as u32));
                let base = (page as usize * ps + slot) * row;
                for e in 0..row {
                    let (kv, vv) = (wave(base + e + step, 0.31), wave(base + e + 7 * step, 0.17));
                    k_new.push(kv);
                    v_new.push(vv);
                    k_host[base + e] = round(kv);
                    v_host[base + e] = round(vv);
                }
                if q8 {
                    for host in [&mut k_host, &mut v_host] {
                        quantized_in_place(&mut host[base..base + row], d);
                    }
                }
            }
            if step > 0 {
                *len += 1;
            }
        }
        // Step 0 appended the prefixes; later steps one token each, whose slot is the new last.
        cache.append(&gpu, &k_new, &v_new, &slots).unwrap();
        let mut indptr = vec![0u32];
        let (mut indices, mut last) = (Vec::new(), Vec::new());
        for (b, &len) in lens.iter().enumerate() {
            indices.extend((0..len.div_ceil(ps)).map(|p| page_of(b, p * ps)));
            indptr.push(indices.len() as u32);
            last.push(((len - 1) % ps + 1) as u32);
        }
        let table = PageTable::new(&indptr, &indices, &last);
        let q: Vec<f32> = (0..batch * hq * d).map(|i| wave(i + step, 0.9)).collect();
        o.fill(f32::NAN);
        lse.fill(f32::NAN);
        let mut out = AttentionOutput::with_lse(o.as_mut_slice(), &mut lse);
        gpu.decode_resident(&params, q.as_slice().into(), &cache, table, Some(&mut out)).unwrap();
        if step == 2 {
            warm = Some(gpu.counts());
        }
        if step == 102 {
            let kv = PagedKv::new(k_host.as_slice().into(), v_host.as_slice().into(), layout).unwrap();
            let input = DecodeInput { q: q.as_slice().into(), kv, table };
            let (mut oc, mut lc) = (vec![0f32; o.len()], vec![0f32; lse.len()]);
            CpuEngine::new()
                .decode(&params, &input, &mut AttentionOutput::with_lse(oc.as_mut_slice(), &mut lc))
                .unwrap();
            for (i, (g, c)) in o.iter().zip(&oc).enumerate() {
                assert!((g - c).abs() <= 5e-5 + 5e-5 * c.abs(), "o[{i}]: gpu {g}, cpu {c}");
            }
            for (i, (g, c)) in lse.iter().zip(&lc).enumerate() {
                assert!((g - c).abs() <= 1e-4 * c.abs().max(1.0), "lse[{i}]: gpu {g}, cpu {c}");
            }
        }
    }
    let (warm, end) = (warm.unwrap(), gpu.counts());
    eprintln!("after warm-up: {warm:?}; after 100 more steps: {end:?}");
    assert_eq!(end.buffers, warm.buffers, "buffers created during the loop");
    assert_eq!(end.bind_groups, warm.bind_groups, "bind groups created during the loop");
    assert_eq!(end.pipelines, warm.pipelines, "pipelines created during the loop");
    assert!(end.submits >= warm.submits + 200, "the loop must have run on the device");
}

/// Rows of `head_dim` values replaced by their int8 codes times scales, as the CPU cache stores them.
fn quantized_in_place(x: &mut [f32], head_dim: usize) {
    let (mut codes, mut scales) = (vec![0i8; x.len()], vec![0f32; x.len() / head_dim]);
    twinfer::quantize_q8(x, head_dim, &mut codes, &mut scales);
    for (i, v) in x.iter_mut().enumerate() {
        *v = codes[i] as f32 * scales[i / head_dim];
    }
}

#[test]
fn requests_over_the_limits_are_typed_errors() {
    let Some(gpu) = engine() else { return };
    let layout = KvLayout::new(16, 8, 128).unwrap();
    // 128 MiB default cap: 1024 pages of 16 x 8 x 128 f32 (64 KiB each) fit one buffer, 4096
    // pages take two; a page larger than the cap is over the limit.
    let cap = twinfer::gpu::DEFAULT_MAX_KV_BUFFER;
    assert_eq!(GpuKvCache::new(&gpu, layout, 1024, KvStorage::F32, cap).unwrap().num_buffers(), 1);
    assert_eq!(GpuKvCache::new(&gpu, layout, 4096, KvStorage::F32, cap).unwrap().num_buffers(), 2);
    match GpuKvCache::new(&gpu, layout, 4, KvStorage::F32, 32 << 10) {
        Err(TwinferError::OverLimit { requested, limit, .. }) => assert!(requested > limit),
        other => panic!("expected OverLimit, got {other:?}"),
    }
    let cache = GpuKvCache::new(&gpu, layout, 4, KvStorage::F32, u64::MAX).unwrap();
    let bad = cache.append(&gpu, &[0.0; 1024], &[0.0; 1024], &[(9, 0)]);
    assert!(matches!(bad, Err(TwinferError::PageIndexOutOfRange { page: 9, .. })), "{bad:?}");
    let params = AttentionParams::new(8, 8, 128);
    let q = vec![0f32; 8 * 128];
    let table = PageTable::new(&[0, 1], &[7], &[1]);
    let bad = gpu.decode_resident(&params, q.as_slice().into(), &cache, table, None);
    assert!(matches!(bad, Err(TwinferError::PageIndexOutOfRange { page: 7, .. })), "{bad:?}");
}

/// A lost device gives `DeviceLost`, never a panic, and the CPU engine answers the same call.
#[test]
fn lost_device_leaves_the_cpu_engine_working() {
    let Some(gpu) = engine() else { return };
    let (hq, hk, d) = (4, 2, 32);
    let layout = KvLayout::new(4, hk, d).unwrap();
    let k: Vec<f32> = (0..2 * layout.page_elems()).map(|i| wave(i, 0.3)).collect();
    let kv = PagedKv::new(k.as_slice().into(), k.as_slice().into(), layout).unwrap();
    let table = PageTable::new(&[0, 2], &[1, 0], &[3]);
    let q: Vec<f32> = (0..hq * d).map(|i| wave(i, 0.7)).collect();
    let input = DecodeInput { q: q.as_slice().into(), kv, table };
    let params = AttentionParams::new(hq, hk, d);
    let mut o = vec![0f32; hq * d];
    gpu.decode(&params, &input, &mut AttentionOutput::new(o.as_mut_slice())).unwrap();
    gpu.context().destroy_for_test();
    let err = gpu.decode(&params, &input, &mut AttentionOutput::new(o.as_mut_slice()));
    assert!(matches!(err, Err(TwinferError::DeviceLost(_))), "{err:?}");
    let mut oc = vec![f32::NAN; hq * d];
    CpuEngine::new().decode(&params, &input, &mut AttentionOutput::new(oc.as_mut_slice())).unwrap();
    assert!(oc.iter().all(|x| x.is_finite()));
}

/// Projections: decode-sized (GEMV) and prompt-sized (matmul) calls over two layers' resident
/// weights, one split in three buffers. After one round no buffer, bind group or pipeline is
/// created.
#[test]
fn warm_projection_loop_creates_nothing() {
    let Some(gpu) = engine() else { return };
    let (n, k) = (96, 70);
    let w: Vec<f32> = (0..n * k).map(|i| wave(i, 0.13)).collect();
    let a = GpuLinear::upload(&gpu, TensorRef::F32(&w), n, k, None, KvStorage::F32, u64::MAX).unwrap();
    // 40 rows of 18 vec4s per buffer.
    let b = GpuLinear::upload(&gpu, TensorRef::F32(&w), n, k, Some(&w[..n]), KvStorage::F32, 40 * 72 * 4).unwrap();
    assert_eq!(b.num_buffers(), 3);
    let x: Vec<f32> = (0..48 * k).map(|i| wave(i, 0.29)).collect();
    let mut y = vec![0f32; 48 * n];
    let round = |y: &mut Vec<f32>| {
        for rows in [1, 3, 4, 48, 20, 2] {
            for lin in [&a, &b] {
                gpu.linear(lin, &x[..rows * k], rows, &mut y[..rows * n]).unwrap();
            }
        }
    };
    round(&mut y);
    let warm = gpu.counts();
    for _ in 0..5 {
        round(&mut y);
    }
    let after = gpu.counts();
    assert_eq!((after.buffers, after.bind_groups, after.pipelines), (warm.buffers, warm.bind_groups, warm.pipelines));
    // The op-by-op path submits the product, then the copy it reads back: two per call, and one
    // readback (the resident path of the model test does one of each per whole step).
    assert_eq!(after.submits - warm.submits, 5 * 12 * 2, "two submissions per call");
    assert_eq!(after.readbacks - warm.readbacks, 5 * 12, "one readback per call");
}

/// A real out-of-memory, not a simulated one: the test runs itself again under an address-space
/// limit (`prlimit --as`), where a software adapter's device memory (host memory) runs out the
/// way a card's does. KV pools are allocated until the device refuses one: the refusal is a
/// typed `GpuOutOfMemory` that leaves no buffer behind, and once the pools are freed the same
/// engine allocates and computes again. On a hardware adapter the process limit does not bound
/// device memory, so the test says so and skips.
#[test]
fn device_out_of_memory_is_a_typed_error_that_leaves_nothing_behind() {
    if std::env::var("TWINFER_OOM_CHILD").is_ok() {
        return out_of_memory_child();
    }
    let Some(gpu) = engine() else { return };
    if gpu.context().summary.device_type != "Cpu" {
        eprintln!("SKIPPED: device memory of a hardware adapter does not follow the process limit");
        return;
    }
    drop(gpu);
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("prlimit")
        .arg(format!("--as={}", OOM_ADDRESS_SPACE))
        .arg("--")
        .arg(exe)
        .args(["device_out_of_memory_is_a_typed_error_that_leaves_nothing_behind", "--exact", "--nocapture"])
        .env("TWINFER_OOM_CHILD", "1")
        .output()
        .expect("prlimit (util-linux) runs the test under a memory limit");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the limited run failed:\n{log}");
    assert!(log.contains("out of memory after"), "the limited run never ran out of memory:\n{log}");
}

/// The address space of the limited run: the engine's own mappings (the driver, its JIT and
/// threads) take about 1 GiB, so a few hundred MiB of pools exhaust it.
const OOM_ADDRESS_SPACE: u64 = 3 << 30;

fn out_of_memory_child() {
    let gpu = GpuEngine::new().expect("the engine opens under the limit");
    // 64 KiB pages; 2048 of them are 128 MiB for each of K and V.
    let layout = KvLayout::new(16, 8, 128).unwrap();
    let cap = twinfer::gpu::DEFAULT_MAX_KV_BUFFER;
    let mut pools = Vec::new();
    let err = loop {
        let before = gpu.counts().buffers;
        match GpuKvCache::new(&gpu, layout, 2048, KvStorage::F32, cap) {
            Ok(pool) => pools.push(pool),
            Err(e) => {
                assert_eq!(gpu.counts().buffers, before, "a refused pool left buffers behind");
                break e;
            }
        }
        assert!(pools.len() < 64, "8 GiB of pools under a 3 GiB limit: the limit does not bind");
    };
    assert!(matches!(err, TwinferError::GpuOutOfMemory(_)), "{err:?}");
    println!("out of memory after {} pools of 256 MiB: {err}", pools.len());
    drop(pools);
    // The engine carries on: a pool fits again, and an append and a decode on it are right.
    let cache = GpuKvCache::new(&gpu, layout, 2048, KvStorage::F32, cap).expect("a pool after the others are freed");
    let row: Vec<f32> = (0..layout.row_elems()).map(|i| wave(i, 0.37)).collect();
    cache.append(&gpu, &row, &row, &[(0, 0)]).unwrap();
    let params = AttentionParams::new(8, 8, 128);
    let q: Vec<f32> = (0..8 * 128).map(|i| wave(i, 0.11)).collect();
    let table = PageTable::new(&[0, 1], &[0], &[1]);
    let mut o = vec![f32::NAN; 8 * 128];
    gpu.decode_resident(&params, q.as_slice().into(), &cache, table, Some(&mut AttentionOutput::new(o.as_mut_slice())))
        .unwrap();
    // One key: the output is its value row.
    for (i, (g, v)) in o.iter().zip(&row).enumerate() {
        assert!((g - v).abs() <= 1e-6, "o[{i}] = {g}, value {v}");
    }
}

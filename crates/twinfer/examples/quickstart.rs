//! Quick start: a paged KV cache, a chunked prefill, then decode steps, each checked against the
//! f64 oracle: the example fails (exit status 1) when an output is further from it than
//! `TOLERANCE`, or not a number. Run with `cargo run --release -p twinfer --example quickstart`
//! (`TWINFER_BACKEND=gpu` for the GPU engine).

use twinfer::kv::{KvCacheConfig, KvLayout, PagedKvCache};
use twinfer::{
    Attention, AttentionOutput, AttentionParams, Backend, DType, DecodeInput, KvInput, PrefillInput, reference,
};

/// The outputs average V rows in [-1, 1); f32 accumulation puts them about 2e-7 from the
/// oracle on the CPU and GPU engines alike. A wrong mask, page or scale is off by 1e-2 or more.
const TOLERANCE: f64 = 1e-5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let attention = Attention::new(Backend::Auto)?;
    let info = attention.info();
    println!(
        "engine: {} ({}, {} threads) on {}: {}",
        info.backend, info.variant, info.threads, info.device, info.reason
    );

    // Llama-3-8B heads (32 query heads sharing 8 KV heads), f16 KV in pages of 16 tokens.
    let (qo_heads, kv_heads, head_dim) = (32, 8, 128);
    let params = AttentionParams::new(qo_heads, kv_heads, head_dim).causal(true);
    let layout = KvLayout::new(16, kv_heads, head_dim)?;
    let mut cache = PagedKvCache::new(KvCacheConfig { num_layers: 1, num_pages: 64, layout, dtype: DType::F16 })?;

    // Prefill: a 100-token prompt is written into the cache and attends to itself causally.
    let seq = cache.add_sequence();
    let prompt = 100;
    cache.reserve(&[seq], &[prompt])?;
    let k = values(prompt * kv_heads * head_dim, 1);
    let v = values(prompt * kv_heads * head_dim, 2);
    let (k16, v16) = (to_f16(&k), to_f16(&v));
    cache.append(0, &[seq], &[0, prompt as u32], (&k16[..]).into(), (&v16[..]).into())?;
    let q = values(prompt * qo_heads * head_dim, 3);
    let table = cache.page_table(&[seq])?;
    let qo_indptr = [0, prompt as u32];
    let input = PrefillInput {
        q: (&q[..]).into(),
        qo_indptr: &qo_indptr,
        kv: KvInput::Paged { kv: cache.layer(0)?, table: table.as_table() },
    };
    // Poisoned: an output the kernel never writes fails the check.
    let mut o = vec![f32::NAN; q.len()];
    let mut lse = vec![0f32; prompt * qo_heads];
    attention.prefill(&params, &input, &mut AttentionOutput::with_lse(&mut o[..], &mut lse))?;
    let want = reference::prefill(&params, &input)?;
    check(&format!("prefill {prompt} tokens"), &o, &want.o)?;

    // Decode: one token at a time, appended to the same pages.
    for step in 0..3 {
        cache.reserve(&[seq], &[1])?;
        let (k1, v1) =
            (to_f16(&values(kv_heads * head_dim, 10 + step)), to_f16(&values(kv_heads * head_dim, 20 + step)));
        cache.append(0, &[seq], &[0, 1], (&k1[..]).into(), (&v1[..]).into())?;
        let q1 = values(qo_heads * head_dim, 30 + step);
        let table = cache.page_table(&[seq])?;
        let input = DecodeInput { q: (&q1[..]).into(), kv: cache.layer(0)?, table: table.as_table() };
        let mut o1 = vec![f32::NAN; q1.len()];
        attention.decode(&params, &input, &mut AttentionOutput::new(&mut o1[..]))?;
        let want = reference::decode(&params, &input)?;
        check(&format!("decode at length {}", cache.seq_len(seq)?), &o1, &want.o)?;
    }
    println!("pages in use: {} of {}", cache.num_pages() - cache.free_pages(), cache.num_pages());
    Ok(())
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn to_f16(x: &[f32]) -> Vec<twinfer::f16> {
    x.iter().map(|&v| twinfer::f16::from_f32(v)).collect()
}

/// Prints the largest difference from the oracle; an error past [`TOLERANCE`] or on a NaN.
fn check(what: &str, got: &[f32], want: &[f64]) -> Result<(), String> {
    assert_eq!(got.len(), want.len());
    // NaN compares false everywhere, so it is looked for, not folded into a maximum.
    let worst = got
        .iter()
        .zip(want)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, |m: f64, d| if d.is_nan() { f64::INFINITY } else { m.max(d) });
    println!("{what}: max |o - oracle| = {worst:.2e} (tolerance {TOLERANCE:.0e})");
    if worst <= TOLERANCE {
        Ok(())
    } else {
        Err(format!("{what}: the output is {worst:.2e} from the oracle, past {TOLERANCE:.0e}"))
    }
}

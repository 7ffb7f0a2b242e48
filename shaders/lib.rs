//! The WGSL kernels of twinfer, one file per kernel, embedded as `(file name, source)` pairs.
//! The core crate assembles each kernel's variants from them (`gpu/shaders.rs`); `README.md` in
//! this folder describes the files.

#![deny(missing_docs)]

/// The shared online-softmax state (`(m, d, o)` and its merge), prepended to every kernel.
pub const ONLINE_SOFTMAX: (&str, &str) = ("online_softmax.wgsl", include_str!("online_softmax.wgsl"));

/// How the prefill kernels find and read K/V rows (float or int8) and a query row's facts, appended
/// to each of them.
pub const PREFILL_KV: (&str, &str) = ("prefill_kv.wgsl", include_str!("prefill_kv.wgsl"));

/// Every kernel file, by name.
pub const KERNELS: [(&str, &str); 17] = [
    ("prefill_attention.wgsl", include_str!("prefill_attention.wgsl")),
    ("decode_attention_paged.wgsl", include_str!("decode_attention_paged.wgsl")),
    ("merge_state.wgsl", include_str!("merge_state.wgsl")),
    ("append_kv.wgsl", include_str!("append_kv.wgsl")),
    ("bench_read.wgsl", include_str!("bench_read.wgsl")),
    ("bench_fma.wgsl", include_str!("bench_fma.wgsl")),
    ("linear_gemv.wgsl", include_str!("linear_gemv.wgsl")),
    ("linear_matmul.wgsl", include_str!("linear_matmul.wgsl")),
    ("prefill_attention_portable.wgsl", include_str!("prefill_attention_portable.wgsl")),
    ("rms_norm.wgsl", include_str!("rms_norm.wgsl")),
    ("rope_append.wgsl", include_str!("rope_append.wgsl")),
    ("argmax_rows.wgsl", include_str!("argmax_rows.wgsl")),
    ("layer_norm.wgsl", include_str!("layer_norm.wgsl")),
    ("topk_rows.wgsl", include_str!("topk_rows.wgsl")),
    ("linear_matmul_coop.wgsl", include_str!("linear_matmul_coop.wgsl")),
    ("linear_split_f16.wgsl", include_str!("linear_split_f16.wgsl")),
    ("prefill_attention_coop.wgsl", include_str!("prefill_attention_coop.wgsl")),
];

#[cfg(test)]
mod tests {
    /// No `.wgsl` file of the folder is left out of the lists above.
    #[test]
    fn every_wgsl_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".wgsl") {
                let listed = [&super::ONLINE_SOFTMAX, &super::PREFILL_KV]
                    .into_iter()
                    .chain(&super::KERNELS)
                    .any(|(n, _)| *n == name);
                assert!(listed, "{name} is not embedded in shaders/lib.rs");
            }
        }
    }
}

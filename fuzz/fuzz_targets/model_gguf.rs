//! A GGUF file, mutated from the micro model's (common.rs): header, metadata, tensor table and
//! quantized blocks.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::exercise([("micro.gguf".to_string(), data.to_vec())].into_iter().collect())
});

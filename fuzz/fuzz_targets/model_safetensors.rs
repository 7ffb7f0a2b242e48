//! `model.safetensors` of a model folder, mutated; the folder's other files are valid (common.rs).
//! Each input is loaded whole, then streamed through the quantizing loader.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::exercise(common::folder_with("model.safetensors", data));
    common::exercise_streamed(common::folder_with("model.safetensors", data), "model.safetensors");
});

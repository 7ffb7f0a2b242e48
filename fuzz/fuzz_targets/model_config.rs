//! `config.json` of a model folder, mutated; the folder's other files are valid (common.rs).
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::exercise(common::folder_with("config.json", data)));

//! Every input a fuzz target (fuzz/) ever crashed on, replayed on the stable toolchain: each one
//! must now load or fail with a typed error. `tests/fuzz-regressions/TARGET/` holds them; a new
//! crash is copied there from `fuzz/artifacts/TARGET/` along with its fix.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashMap;
use std::path::Path;

use twinfer::model::{Model, ModelSource};
use twinfer_tests::models::model_dir;

/// The tiny Llama's folder with `name` replaced by `data`.
fn folder_with(name: &str, data: Vec<u8>) -> HashMap<String, Vec<u8>> {
    let dir = model_dir("tiny-llama");
    let mut files: HashMap<String, Vec<u8>> = ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect();
    files.insert(name.into(), data);
    files
}

#[test]
fn every_input_that_once_crashed_a_fuzz_target_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-regressions");
    let mut replayed = 0;
    for (target, file) in [
        ("model_tokenizer", Some("tokenizer.json")),
        ("model_config", Some("config.json")),
        ("model_safetensors", Some("model.safetensors")),
        ("model_gguf", None),
    ] {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let files = match file {
                Some(name) => folder_with(name, data),
                None => [("model.gguf".to_string(), data)].into_iter().collect(),
            };
            // Ok or a typed error; a panic fails the test. A model that loads must also
            // tokenize, as the fuzz targets check.
            match Model::load(ModelSource::Files(files)) {
                Ok(model) => {
                    if let Err(e) = model.tokenizer.encode("Hi there, 42 apples!\n\tcafé 日本", true) {
                        eprintln!("{}: loads, then {e}", path.display());
                    }
                }
                Err(e) => eprintln!("{}: {e}", path.display()),
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no regression inputs found under {}", root.display());
}

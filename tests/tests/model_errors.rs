//! Bad model folders give typed errors that name the file and the tensor, never a panic.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashMap;

use twinfer::TwinferError;
use twinfer::model::{Model, ModelSource};
use twinfer_tests::models::model_dir;

fn files(name: &str) -> HashMap<String, Vec<u8>> {
    let dir = model_dir(name);
    ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect()
}

fn load(files: HashMap<String, Vec<u8>>) -> TwinferError {
    Model::load(ModelSource::Files(files)).expect_err("a broken model loaded")
}

/// Rewrites the safetensors header (a JSON object after an 8-byte length) with `edit`.
fn edit_header(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn missing_files_are_io_errors_naming_the_file() {
    for missing in ["config.json", "tokenizer.json", "model.safetensors"] {
        let mut f = files("tiny-llama");
        f.remove(missing);
        let e = load(f);
        assert!(matches!(&e, TwinferError::Io { path, .. } if path == missing), "{missing}: {e}");
    }
}

#[test]
fn corrupt_files_name_the_file() {
    let mut f = files("tiny-llama");
    let w = f.get_mut("model.safetensors").unwrap();
    w.truncate(w.len() - 100);
    assert!(matches!(load(f), TwinferError::ModelFile { file, .. } if file == "model.safetensors"));

    let mut f = files("tiny-llama");
    f.insert("model.safetensors".into(), vec![0xff; 7]);
    assert!(matches!(load(f), TwinferError::ModelFile { .. }));

    let mut f = files("tiny-llama");
    f.insert("tokenizer.json".into(), b"{\"model\": 3}".to_vec());
    assert!(matches!(load(f), TwinferError::Tokenizer { file, .. } if file == "tokenizer.json"));

    let mut f = files("tiny-llama");
    f.insert("config.json".into(), b"{\"model_type\": \"mamba\"}".to_vec());
    assert!(matches!(load(f), TwinferError::UnsupportedArchitecture { .. }));
}

#[test]
fn missing_tensors_wrong_shapes_and_dtypes_name_the_tensor() {
    const Q: &str = "model.layers.1.self_attn.q_proj.weight";
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: [(&str, Edit, &str); 3] = [
        (
            "missing",
            Box::new(|h| {
                let info = h.as_object_mut().unwrap().remove(Q).unwrap();
                h.as_object_mut().unwrap().insert("renamed".into(), info);
            }),
            "missing",
        ),
        ("shape", Box::new(|h| h[Q]["shape"] = serde_json::json!([64, 1024])), "shape"),
        (
            "dtype",
            Box::new(|h| {
                // Same byte size, an integer type.
                h[Q]["dtype"] = serde_json::json!("I32");
            }),
            "dtype",
        ),
    ];
    for (what, edit, reason_word) in cases {
        let mut f = files("tiny-llama");
        let w = edit_header(&f["model.safetensors"], edit);
        f.insert("model.safetensors".into(), w);
        match load(f) {
            TwinferError::ModelTensor { tensor, reason, .. } => {
                assert_eq!(tensor, Q, "{what}");
                assert!(reason.contains(reason_word), "{what}: {reason}");
            }
            other => panic!("{what}: {other}"),
        }
    }
}

/// Hostile safetensors headers: each is a typed error naming the file, never a panic or a read
/// outside the data.
#[test]
fn crafted_safetensors_headers_are_typed_errors() {
    const Q: &str = "model.layers.1.self_attn.q_proj.weight";
    const K: &str = "model.layers.1.self_attn.k_proj.weight";
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("a huge shape", Box::new(|h| h[Q]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]))),
        ("offsets past the end", Box::new(|h| h[Q]["data_offsets"] = serde_json::json!([0, 1u64 << 40]))),
        ("reversed offsets", Box::new(|h| h[Q]["data_offsets"] = serde_json::json!([64, 0]))),
        ("overlapping tensors", Box::new(|h| h[K]["data_offsets"] = h[Q]["data_offsets"].clone())),
        ("an unknown dtype", Box::new(|h| h[Q]["dtype"] = serde_json::json!("F128"))),
    ];
    for (what, edit) in cases {
        let mut f = files("tiny-llama");
        let w = edit_header(&f["model.safetensors"], edit);
        f.insert("model.safetensors".into(), w);
        match load(f) {
            TwinferError::ModelFile { file, .. } | TwinferError::ModelTensor { file, .. } => {
                assert_eq!(file, "model.safetensors", "{what}")
            }
            other => panic!("{what}: {other}"),
        }
    }
    // A header that is not UTF-8, and one naming a tensor twice (serde_json keeps the last; the
    // file is refused either way because the offsets no longer cover the data exactly).
    let original = files("tiny-llama")["model.safetensors"].clone();
    let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&original[8..8 + n]).unwrap();
    let mut not_utf8 = original.clone();
    let at = 8 + header.find(Q).unwrap();
    not_utf8[at] = 0xff;
    let twice = header.replacen(K, Q, 1);
    let mut dup = original[..8].to_vec();
    dup.extend_from_slice(twice.as_bytes());
    dup.extend_from_slice(&original[8 + n..]);
    for (what, bytes) in [("not UTF-8", not_utf8), ("a name twice", dup)] {
        let mut f = files("tiny-llama");
        f.insert("model.safetensors".into(), bytes);
        match load(f) {
            TwinferError::ModelFile { file, .. } | TwinferError::ModelTensor { file, .. } => {
                assert_eq!(file, "model.safetensors", "{what}")
            }
            other => panic!("{what}: {other}"),
        }
    }
}

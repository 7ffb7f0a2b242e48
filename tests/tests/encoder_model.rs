//! all-MiniLM-L6-v2 sentence embeddings against the independent numpy reference: cosine
//! similarity >= 0.9999 for every sentence (short, long up to 256 tokens, non-ASCII), on every
//! SIMD level and on the GPU engine, with the tokenizer giving the reference's ids.
#![cfg(not(target_arch = "wasm32"))]

use twinfer::model::{Model, ModelSource, Network};
use twinfer_tests::models::{cosine, engines, floats, golden, ids, model_dir};

const NAME: &str = "all-MiniLM-L6-v2";

#[test]
fn minilm_embeddings_match_the_reference() {
    let model = Model::load(ModelSource::dir(model_dir(NAME))).unwrap();
    let Network::Encoder(bert) = &model.network else { panic!("{NAME} is not an encoder") };
    let g = golden(NAME);
    let sentences: Vec<&str> = g["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(sentences.len() >= 16);
    let want_ids: Vec<Vec<u32>> = g["input_ids"].as_array().unwrap().iter().map(ids).collect();
    let batch: Vec<Vec<u32>> = sentences.iter().map(|s| model.tokenizer.encode(s, true).unwrap()).collect();
    for (i, (got, want)) in batch.iter().zip(&want_ids).enumerate() {
        // Both cut at the model's 256-token window (sentence_bert_config.json), keeping [SEP].
        assert_eq!(got, want, "sentence {i}: token ids");
    }
    for (level, simd, attention) in engines() {
        let got = bert.embed(simd, &attention, &batch).unwrap();
        for (i, (e, want)) in got.iter().zip(g["embeddings"].as_array().unwrap()).enumerate() {
            let c = cosine(e, &floats(want));
            assert!(c >= 0.9999, "{level}: sentence {i} ({:?}): cosine {c}", sentences[i]);
        }
    }
}

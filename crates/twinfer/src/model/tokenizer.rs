//! `tokenizer.json` through the `tokenizers` crate, plus the incremental detokenizer that turns a
//! token stream into text pieces without splitting a character.

use crate::error::{Result, TwinferError};

/// A model's tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    file: String,
}

impl Tokenizer {
    /// Parses the bytes of a `tokenizer.json`; `file` names it in errors. Padding is turned off
    /// (batches are ragged here) and truncation too: the caller decides what is too long.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        // `tokenizers` 0.22 panics on some malformed JSON (an `expect` in its decoder
        // deserializer) instead of returning an error; a document that parses as JSON cannot
        // reach it. Found by the `model_tokenizer` fuzz target.
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| TwinferError::Tokenizer { file: file.into(), reason: format!("not valid JSON: {e}") })?;
        let mut inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TwinferError::Tokenizer { file: file.into(), reason: e.to_string() })?;
        if let Some(processor) = inner.get_post_processor() {
            let value = serde_json::to_value(processor)
                .map_err(|e| TwinferError::Tokenizer { file: file.into(), reason: e.to_string() })?;
            check_templates(&value).map_err(|reason| TwinferError::Tokenizer { file: file.into(), reason })?;
        }
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TwinferError::Tokenizer { file: file.into(), reason: e.to_string() })?;
        Ok(Self { inner, file: file.into() })
    }

    /// Cuts encodings to `max_length` tokens, keeping the special tokens (an encoder's window).
    pub fn truncate_to(&mut self, max_length: usize) -> Result<()> {
        let params = tokenizers::TruncationParams { max_length, ..Default::default() };
        self.inner
            .with_truncation(Some(params))
            .map_err(|e| TwinferError::Tokenizer { file: self.file.clone(), reason: e.to_string() })?;
        Ok(())
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds
    /// (`[CLS] .. [SEP]` for BERT, `<s>` for Llama).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TwinferError::Tokenizer { file: self.file.clone(), reason: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, with special tokens dropped when `skip_special_tokens`. Errors with `Tokenizer`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TwinferError::Tokenizer { file: self.file.clone(), reason: e.to_string() })
    }

    /// The id of a token string (such as `</s>`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id`, if it is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// A `TemplateProcessing` post-processor (alone or inside a `Sequence`) must define every special
/// token its templates name: `tokenizers` 0.22 checks that when a template is built in code but
/// not when one is read from JSON, and then panics on the first encode (found by the
/// `model_tokenizer` fuzz target).
fn check_templates(processor: &serde_json::Value) -> std::result::Result<(), String> {
    match processor.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for p in processor.get("processors").and_then(|p| p.as_array()).into_iter().flatten() {
                check_templates(p)?;
            }
        }
        Some("TemplateProcessing") => {
            let defined = processor.get("special_tokens");
            for which in ["single", "pair"] {
                for piece in processor.get(which).and_then(|t| t.as_array()).into_iter().flatten() {
                    if let Some(id) = piece.get("SpecialToken").and_then(|s| s.get("id")).and_then(|i| i.as_str())
                        && defined.and_then(|d| d.get(id)).is_none()
                    {
                        return Err(format!(
                            "the post-processor's {which} template names the special token {id:?}, which it does not define"
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Turns generated token ids into text as they come: a piece is released once it decodes to
/// whole characters, so a multi-byte character split over tokens is never shown half-made.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Tokens before this one are already shown; decoding restarts a little earlier than the
    /// unread tokens so that tokenizers which merge across tokens (leading spaces) stay correct.
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    /// Adds one token and returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let shown = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let all = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if all.len() > shown.len() && all.is_char_boundary(shown.len()) && !all.ends_with('\u{FFFD}') {
            let piece = all[shown.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// Whatever is left when generation ends (a dangling partial character included).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let shown = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let all = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok((all.len() > shown.len() && all.is_char_boundary(shown.len())).then(|| all[shown.len()..].to_string()))
    }
}

//! Options objects from JS: checked field by field, with a message naming the bad one.

use twinfer::TwinferError;
use twinfer::engine::{GenerateRequest, Prompt, SamplingParams};
use wasm_bindgen::{JsCast, JsValue};

type Result<T> = std::result::Result<T, TwinferError>;

/// A JS options object (or `undefined`, which has no fields).
pub(crate) struct Options<'a> {
    obj: &'a JsValue,
    what: &'static str,
}

impl<'a> Options<'a> {
    pub(crate) fn new(obj: &'a JsValue, what: &'static str) -> Result<Self> {
        if !(obj.is_undefined() || obj.is_null() || obj.is_object()) {
            return Err(TwinferError::InvalidParameter(format!("{what} must be an object")));
        }
        Ok(Self { obj, what })
    }

    fn get(&self, key: &str) -> Option<JsValue> {
        if !self.obj.is_object() {
            return None;
        }
        js_sys::Reflect::get(self.obj, &JsValue::from_str(key)).ok().filter(|v| !v.is_undefined() && !v.is_null())
    }

    fn bad(&self, key: &str, want: &str) -> TwinferError {
        TwinferError::InvalidParameter(format!("{}.{key} must be {want}", self.what))
    }

    pub(crate) fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| self.bad(key, "a finite number")),
        }
    }

    /// A whole number in 0..=max.
    pub(crate) fn count(&self, key: &str, max: f64) -> Result<Option<usize>> {
        match self.number(key)? {
            Some(x) if x >= 0.0 && x.fract() == 0.0 && x <= max => Ok(Some(x as usize)),
            Some(_) => Err(self.bad(key, &format!("a whole number in 0..={max}"))),
            None => Ok(None),
        }
    }

    pub(crate) fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_string().map(Some).ok_or_else(|| self.bad(key, "a string")),
        }
    }

    /// A string or an array of strings.
    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>> {
        let Some(v) = self.get(key) else { return Ok(Vec::new()) };
        if let Some(s) = v.as_string() {
            return Ok(vec![s]);
        }
        if !js_sys::Array::is_array(&v) {
            return Err(self.bad(key, "a string or an array of strings"));
        }
        js_sys::Array::from(&v)
            .iter()
            .map(|x| x.as_string().ok_or_else(|| self.bad(key, "a string or an array of strings")))
            .collect()
    }

    /// An array of token ids.
    pub(crate) fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let Some(v) = self.get(key) else { return Ok(Vec::new()) };
        token_ids(&v).ok_or_else(|| self.bad(key, "an array of token ids"))
    }
}

/// An array (or typed array) of whole numbers in u32 range.
pub(crate) fn token_ids(v: &JsValue) -> Option<Vec<u32>> {
    if !(js_sys::Array::is_array(v) || v.is_instance_of::<js_sys::Uint32Array>()) {
        return None;
    }
    js_sys::Array::from(v)
        .iter()
        .map(|x| x.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f <= u32::MAX as f64).map(|f| f as u32))
        .collect()
}

/// A request from a prompt (text or token ids) and `{ maxTokens, temperature, topK, topP,
/// repetitionPenalty, seed, stop, stopTokenIds, ignoreEos }`.
pub(crate) fn generate_request(prompt: &JsValue, options: &JsValue) -> Result<GenerateRequest> {
    let prompt = match prompt.as_string() {
        Some(text) => Prompt::Text(text),
        None => Prompt::Tokens(token_ids(prompt).ok_or_else(|| {
            TwinferError::InvalidParameter("the prompt must be a string or an array of token ids".into())
        })?),
    };
    let o = Options::new(options, "options")?;
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: o.number("temperature")?.map_or(defaults.temperature, |x| x as f32),
        top_k: o.count("topK", u32::MAX as f64)?.unwrap_or(defaults.top_k),
        top_p: o.number("topP")?.map_or(defaults.top_p, |x| x as f32),
        repetition_penalty: o.number("repetitionPenalty")?.map_or(defaults.repetition_penalty, |x| x as f32),
        // Seeds above 2^53 cannot come from a JS number exactly; that range is enough.
        seed: o.count("seed", 9_007_199_254_740_991.0)?.map_or(defaults.seed, |s| s as u64),
    };
    sampling.validate()?;
    let request = match prompt {
        Prompt::Text(t) => GenerateRequest::new(t),
        Prompt::Tokens(ids) => GenerateRequest::tokens(ids),
    };
    let max_tokens = o.count("maxTokens", 1e9)?.unwrap_or(request.max_tokens);
    if max_tokens == 0 {
        return Err(TwinferError::InvalidParameter("options.maxTokens must be at least 1".into()));
    }
    Ok(GenerateRequest {
        max_tokens,
        sampling,
        stop: o.strings("stop")?,
        stop_token_ids: o.token_ids("stopTokenIds")?,
        ignore_eos: o.boolean("ignoreEos")?.unwrap_or(false),
        ..request
    })
}

//! Rust errors as JS `Error`s: `name` is `"TwinferError"`, `message` the Rust message and `code`
//! the variant, which the package's JS layer maps onto its error classes.

use twinfer::TwinferError;
use wasm_bindgen::prelude::*;

/// A JS `Error` named `TwinferError`, with the Rust message and the variant as `code`.
pub(crate) fn to_js_error(e: TwinferError) -> js_sys::Error {
    let err = js_sys::Error::new(&e.to_string());
    err.set_name("TwinferError");
    // Setting a property on a fresh Error object cannot fail.
    let _ = js_sys::Reflect::set(&err, &JsValue::from_str("code"), &JsValue::from_str(error_code(&e)));
    err
}

/// The variant name of an error (`"ShapeMismatch"`, ...), stable across messages.
pub(crate) fn error_code(e: &TwinferError) -> &'static str {
    match e {
        TwinferError::ShapeMismatch { .. } => "ShapeMismatch",
        TwinferError::DtypeMismatch { .. } => "DtypeMismatch",
        TwinferError::DtypeUnsupported { .. } => "DtypeUnsupported",
        TwinferError::IndptrInvalid { .. } => "IndptrInvalid",
        TwinferError::PageIndexOutOfRange { .. } => "PageIndexOutOfRange",
        TwinferError::LastPageLenOutOfRange { .. } => "LastPageLenOutOfRange",
        TwinferError::HeadRatio { .. } => "HeadRatio",
        TwinferError::HeadDimUnsupported { .. } => "HeadDimUnsupported",
        TwinferError::PageSizeUnsupported { .. } => "PageSizeUnsupported",
        TwinferError::KvPoolExhausted { .. } => "KvPoolExhausted",
        TwinferError::UnknownSequence { .. } => "UnknownSequence",
        TwinferError::LayerOutOfRange { .. } => "LayerOutOfRange",
        TwinferError::Io { .. } => "Io",
        TwinferError::ModelFile { .. } => "ModelFile",
        TwinferError::ModelTensor { .. } => "ModelTensor",
        TwinferError::UnsupportedArchitecture { .. } => "UnsupportedArchitecture",
        TwinferError::Tokenizer { .. } => "Tokenizer",
        TwinferError::ChatTemplate(_) => "ChatTemplate",
        TwinferError::RequestTooLarge { .. } => "RequestTooLarge",
        TwinferError::InvalidParameter(_) => "InvalidParameter",
        TwinferError::BackendUnavailable { .. } => "BackendUnavailable",
        TwinferError::GpuUnavailable(_) => "GpuUnavailable",
        TwinferError::DeviceLost(_) => "DeviceLost",
        TwinferError::OverLimit { .. } => "OverLimit",
        TwinferError::GpuOutOfMemory(_) => "GpuOutOfMemory",
        TwinferError::GpuValidation(_) => "GpuValidation",
        TwinferError::WouldBlock { .. } => "WouldBlock",
        _ => "Other",
    }
}

/// An error raised here rather than in the core, with its `code`.
pub(crate) fn js_error(code: &str, message: &str) -> js_sys::Error {
    let err = js_sys::Error::new(message);
    err.set_name("TwinferError");
    let _ = js_sys::Reflect::set(&err, &JsValue::from_str("code"), &JsValue::from_str(code));
    err
}

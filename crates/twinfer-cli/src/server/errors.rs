//! Errors as the OpenAI API writes them: a status code and
//! `{"error": {"message", "type", "param", "code"}}`, so that client libraries raise their own
//! typed exceptions (`BadRequestError`, `AuthenticationError`, ...).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use twinfer::TwinferError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        Self { param: Some(param), ..Self::bad_request(message) }
    }
    pub fn unsupported(param: &'static str, message: impl Into<String>) -> Self {
        Self { code: Some("unsupported_parameter"), ..Self::bad_param(param, message) }
    }
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect API key provided: send `Authorization: Bearer <key>` with the server's --api-key"
                .into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }
    pub fn model_not_found(model: &str, served: &[String]) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist; this server has: {}", served.join(", ")),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }
    pub fn not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no route {path}"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, ..Self::server(message) }
    }
    /// The body of the error, also sent as an SSE event when a stream fails after it started.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// An engine error: the request's fault (400) unless the engine or the device failed.
impl From<TwinferError> for ApiError {
    fn from(e: TwinferError) -> Self {
        match &e {
            TwinferError::RequestTooLarge { .. } => {
                Self { code: Some("context_length_exceeded"), ..Self::bad_param("messages", e.to_string()) }
            }
            TwinferError::InvalidParameter(_) | TwinferError::ChatTemplate(_) | TwinferError::OverLimit { .. } => {
                Self::bad_request(e.to_string())
            }
            TwinferError::DeviceLost(_) | TwinferError::GpuOutOfMemory(_) | TwinferError::KvPoolExhausted { .. } => {
                Self::unavailable(e.to_string())
            }
            _ => Self::server(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

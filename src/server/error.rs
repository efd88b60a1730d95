//! OpenAI-style JSON errors with stable codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::provider::{GenerationError, ProviderError};

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 500 with a code.
    pub fn internal(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, code, message)
    }

    /// The OpenAI error `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            404 => "not_found_error",
            409 => "conflict_error",
            503 => "service_unavailable_error",
            s if s < 500 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": null,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> Self {
        let status = match &e {
            ProviderError::Policy(_) => StatusCode::BAD_REQUEST,
            ProviderError::UnknownAdapter(_) => StatusCode::NOT_FOUND,
            ProviderError::CacheBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProviderError::TooLarge { .. }
            | ProviderError::Generation(GenerationError::Failed(_))
            | ProviderError::Generation(GenerationError::NonFinite(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::PolicyError;

    #[test]
    fn provider_errors_map_to_statuses_and_codes() {
        let cases = [
            (
                ProviderError::Policy(PolicyError::BlankPrompt(0)),
                400,
                "blank_prompt",
            ),
            (
                ProviderError::UnknownAdapter("x".into()),
                404,
                "adapter_not_found",
            ),
            (
                ProviderError::CacheBusy(Duration::from_secs(1)),
                503,
                "adapter_cache_busy",
            ),
            (
                ProviderError::Generation(GenerationError::NonFinite("nan".into())),
                500,
                "adapter_not_finite",
            ),
        ];
        for (err, status, code) in cases {
            let api = ApiError::from(err);
            assert_eq!(api.status.as_u16(), status);
            assert_eq!(api.body()["error"]["code"], code);
        }
        let e = ApiError::bad_request("invalid_json", "bad");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }
}

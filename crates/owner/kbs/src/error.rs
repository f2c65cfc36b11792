//! Errors as RFC 9457 problem documents. CoCo clients read the `type` and
//! `detail` members (their `ErrorInformation`), which a problem document has.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// A refused request: the HTTP status, the check that failed, and a detail
/// that never contains resource contents or secrets.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub check: &'static str,
    pub detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, check: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            check,
            detail: detail.into(),
        }
    }

    pub fn unauthorized(check: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::UNAUTHORIZED, check, detail)
    }

    pub fn bad_request(check: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, check, detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.check,
            self.detail
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": format!("https://kabuto.dev/kbs/problems/{}", self.check),
            "title": self.check,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Self {
        Problem::internal(format!("store: {e}"))
    }
}

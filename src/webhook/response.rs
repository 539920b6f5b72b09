//! Answers to AdmissionReviews, serialised the way the API server's Go types expect (`patch`
//! as base64, a `metav1.Status` on denial).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::review::{ADMISSION_API_VERSION, ADMISSION_REVIEW_KIND, Rejected};

/// The `response` of an AdmissionReview; as an axum response, the whole review with HTTP 200.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponse {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<ResponseStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct ResponseStatus {
    status: &'static str,
    code: u16,
    reason: &'static str,
    message: String,
}

impl ReviewResponse {
    pub fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            status: None,
            patch: None,
            patch_type: None,
        }
    }

    /// A refusal with the HTTP `code` and `reason` of a `metav1.Status`.
    pub fn refuse(uid: &str, code: StatusCode, message: String) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: false,
            status: Some(ResponseStatus {
                status: "Failure",
                code: code.as_u16(),
                reason: status_reason(code),
                message,
            }),
            patch: None,
            patch_type: None,
        }
    }

    /// A policy refusal, shown to the requester.
    pub fn deny(uid: &str, message: String) -> Self {
        Self::refuse(uid, StatusCode::FORBIDDEN, message)
    }

    /// Allow with `patch`, a serialised JSON patch.
    pub fn with_patch(uid: &str, patch: &[u8]) -> Self {
        use base64::Engine as _;
        Self {
            patch: Some(base64::engine::general_purpose::STANDARD.encode(patch)),
            patch_type: Some("JSONPatch"),
            ..Self::allow(uid)
        }
    }

    /// The whole AdmissionReview with this response, with HTTP `status`.
    fn into_review(self, status: StatusCode) -> Response {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Review {
            api_version: &'static str,
            kind: &'static str,
            response: ReviewResponse,
        }
        let review = Review {
            api_version: ADMISSION_API_VERSION,
            kind: ADMISSION_REVIEW_KIND,
            response: self,
        };
        (status, axum::Json(review)).into_response()
    }
}

impl IntoResponse for ReviewResponse {
    fn into_response(self) -> Response {
        self.into_review(StatusCode::OK)
    }
}

/// The `metav1.Status` reason of an HTTP status, as the API server names it.
fn status_reason(code: StatusCode) -> &'static str {
    match code {
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLarge",
        StatusCode::REQUEST_TIMEOUT => "Timeout",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        _ => "BadRequest",
    }
}

impl IntoResponse for Rejected {
    fn into_response(self) -> Response {
        let message = self.error.to_string();
        let status = self.error.status();
        if self.error.is_overload() {
            // The server, not the review, is at fault: a non-200 answer makes the API server
            // report a webhook failure (and the client retry) rather than a denial.
            let uid = self.uid.as_deref().unwrap_or_default();
            let mut response = ReviewResponse::refuse(uid, status, message).into_review(status);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        match self.uid {
            // With the uid the API server accepts the answer and shows the message.
            Some(uid) => {
                ReviewResponse::refuse(&uid, StatusCode::BAD_REQUEST, message).into_response()
            }
            None => ReviewResponse::refuse("", status, message).into_review(status),
        }
    }
}

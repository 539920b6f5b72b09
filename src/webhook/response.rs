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
    /// The serialised JSON patch; written as base64 with `patchType` by [`Self::into_review`].
    #[serde(skip)]
    patch: Option<Vec<u8>>,
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
        }
    }

    /// A policy refusal, shown to the requester.
    pub fn deny(uid: &str, message: String) -> Self {
        Self::refuse(uid, StatusCode::FORBIDDEN, message)
    }

    /// Allow with `patch`, a serialised JSON patch.
    pub fn with_patch(uid: &str, patch: &[u8]) -> Self {
        Self {
            patch: Some(patch.to_vec()),
            ..Self::allow(uid)
        }
    }

    /// The whole AdmissionReview with this response, with HTTP `status`.
    fn into_review(self, status: StatusCode) -> Response {
        if let Some(patch) = &self.patch {
            return (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                patched_review(&self.uid, patch),
            )
                .into_response();
        }
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

/// An allowing AdmissionReview carrying `patch` as base64, written directly: the base64 text
/// (4–5 kB for a sandbox with 20 secrets) needs no escaping, and a serializer would scan it
/// for escapes and copy it once more.
fn patched_review(uid: &str, patch: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    const HEAD: &[u8] =
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#;
    const MIDDLE: &[u8] = br#","allowed":true,"patch":""#;
    const TAIL: &[u8] = br#"","patchType":"JSONPatch"}}"#;
    let encoded_len = patch.len().div_ceil(3) * 4;
    let mut body =
        Vec::with_capacity(HEAD.len() + uid.len() + 2 + MIDDLE.len() + encoded_len + TAIL.len());
    body.extend_from_slice(HEAD);
    // The uid comes from the request: escaped as any JSON string.
    if serde_json::to_writer(&mut body, uid).is_err() {
        body.extend_from_slice(b"\"\"");
    }
    body.extend_from_slice(MIDDLE);
    let start = body.len();
    body.resize(start + encoded_len, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(patch, &mut body[start..])
        .unwrap_or(0);
    body.truncate(start + written);
    body.extend_from_slice(TAIL);
    body
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_patched_answer_is_the_review_the_api_server_expects() {
        use base64::Engine as _;
        let patch = br#"[{"op":"add","path":"/metadata/annotations","value":{"a":"b"}}]"#;
        for uid in ["705ab4f5-6393-11e8-b7cc-42010a800002", "odd\"uid\n<>", ""] {
            let response = ReviewResponse::with_patch(uid, patch).into_response();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                review,
                serde_json::json!({
                    "apiVersion": ADMISSION_API_VERSION,
                    "kind": ADMISSION_REVIEW_KIND,
                    "response": {
                        "uid": uid,
                        "allowed": true,
                        "patch": base64::engine::general_purpose::STANDARD.encode(patch),
                        "patchType": "JSONPatch",
                    }
                })
            );
        }
    }
}

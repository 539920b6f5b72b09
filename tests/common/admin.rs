//! Requests to the admin router (probes, metrics), without a listener.

use agent_secrets::webhook::server::{self, AppState};
use http_body_util::BodyExt as _;

/// GET `path` from the admin router over `state`: `(status, content type, body)`.
pub async fn admin_get(state: &AppState, path: &str) -> (u16, String, String) {
    use tower::ServiceExt as _;
    let request = hyper::Request::get(path)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = server::admin_router(state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

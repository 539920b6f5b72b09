//! Static files, embedded in the binary: nothing is fetched or built at run time.

use axum::http::header;
use axum::response::IntoResponse;

/// Progressive enhancement only: the eye toggle and live name validation.
pub const SCRIPT: &str = include_str!("static/app.js");
/// Light and dark themes, narrow screens.
pub const STYLESHEET: &str = include_str!("static/app.css");

/// `GET /static/app.js`.
pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

/// `GET /static/app.css`.
pub async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
}

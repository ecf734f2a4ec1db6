//! The web console: one page (`/`) and its script and style (`/console/…`), built into the
//! binary with `include_str!`, so the console loads nothing from anywhere else and works
//! offline. It is a client of the management API like any other (`console/console.js`); the
//! page itself needs no credentials, every API call it makes does.
//!
//! Responses forbid framing and loading from other origins (`Content-Security-Policy`), and are
//! revalidated on each load (`Cache-Control: no-cache`) so an upgraded broker serves its own
//! console.

use crate::AppState;
use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");

/// Only this origin, for everything the page loads or connects to (`blob:` for the definitions
/// download, `data:` for nothing but harmless inline icons a browser may add).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
        .route("/console/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
        // Browsers ask for it on their own; there is none, and saying so without a 404 keeps the
        // page's console free of errors.
        .route("/favicon.ico", get(|| async { axum::http::StatusCode::NO_CONTENT }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

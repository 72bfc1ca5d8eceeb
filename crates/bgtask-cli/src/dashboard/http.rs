//! The dashboard's HTTP side: the page and its assets, the JSON endpoints, the event stream,
//! the one write (lifting a blacklisted value), and the checks in front of them (token, CSRF).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State as Shared};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bgtask::Blacklist;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::watch;

use super::snapshot::Snapshot;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// What every handler shares.
pub(super) struct State {
    /// The namespace's blacklist, for the one write.
    blacklist: Blacklist,
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// Required on every request when set.
    token: Option<String>,
    writes: bool,
    /// The CSRF token: in the page, and required on every write.
    csrf: String,
    page: String,
}

impl State {
    pub(super) fn new(
        blacklist: Blacklist,
        snapshots: watch::Sender<Arc<Snapshot>>,
        token: Option<String>,
        writes: bool,
    ) -> State {
        let csrf = format!("{:032x}", rand::random::<u128>());
        State {
            page: PAGE.replace("{{CSRF}}", &csrf),
            blacklist,
            snapshots,
            token,
            writes,
            csrf,
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }
}

pub(super) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/assets/app.js", get(script))
        .route("/assets/style.css", get(style))
        .route("/favicon.ico", get(no_icon))
        .route("/api/overview", get(overview))
        .route("/api/workers", get(workers))
        .route("/api/tasks", get(tasks))
        .route("/api/keys", get(keys))
        .route("/api/blacklist", get(blacklist))
        .route("/api/events", get(events))
        .route("/api/blacklist/lift", post(lift))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Equal in time whatever the inputs (for tokens).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request carries the token: `Bearer TOKEN`, or Basic with TOKEN as password.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(bearer) = value.strip_prefix("Bearer ") {
        return same(bearer.trim().as_bytes(), token.as_bytes());
    }
    let Some(basic) = value.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else {
        return false;
    };
    let password = decoded
        .iter()
        .position(|&b| b == b':')
        .map_or(&decoded[..0], |i| &decoded[i + 1..]);
    same(password, token.as_bytes())
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

/// In front of everything: the token (401 to read, 403 to write), then for writes the switch
/// and the CSRF token (and, when the browser sends one, an `Origin` of this very host); and
/// the headers every response carries.
async fn guard(Shared(state): Shared<Arc<State>>, request: Request, next: Next) -> Response {
    let write = request.method() != Method::GET && request.method() != Method::HEAD;
    if let Some(token) = &state.token {
        if !authorized(request.headers(), token) {
            if write {
                return error(StatusCode::FORBIDDEN, "a write needs the dashboard's token");
            }
            let mut response = error(StatusCode::UNAUTHORIZED, "the dashboard needs its token");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"bgtask dashboard\""),
            );
            return response;
        }
    }
    if write {
        if !state.writes {
            return error(
                StatusCode::FORBIDDEN,
                "writes are off: start the dashboard with --allow-writes",
            );
        }
        let headers = request.headers();
        let csrf = headers
            .get("x-csrf-token")
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if !same(csrf, state.csrf.as_bytes()) {
            return error(
                StatusCode::FORBIDDEN,
                "a write needs the page's CSRF token (X-CSRF-Token)",
            );
        }
        if let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST))
        {
            let expected = format!("http://{}", host.to_str().unwrap_or_default());
            if origin.as_bytes() != expected.as_bytes() {
                return error(StatusCode::FORBIDDEN, "a write from another origin");
            }
        }
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn page(Shared(state): Shared<Arc<State>>) -> Html<String> {
    Html(state.page.clone())
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// Browsers ask for it whatever the page says; there is none.
async fn no_icon() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such page")
}

async fn overview(Shared(state): Shared<Arc<State>>) -> Response {
    Json(state.snapshot().overview.clone()).into_response()
}

async fn workers(Shared(state): Shared<Arc<State>>) -> Response {
    Json(state.snapshot().workers.clone()).into_response()
}

async fn tasks(Shared(state): Shared<Arc<State>>) -> Response {
    Json(state.snapshot().tasks.clone()).into_response()
}

async fn keys(Shared(state): Shared<Arc<State>>) -> Response {
    Json(state.snapshot().keys.clone()).into_response()
}

async fn blacklist(Shared(state): Shared<Arc<State>>) -> Response {
    Json(state.snapshot().blacklist.clone()).into_response()
}

/// Every snapshot as it is taken, as `snapshot` events; the latest one first.
async fn events(
    Shared(state): Shared<Arc<State>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.snapshots.subscribe();
    let stream = futures::stream::unfold((receiver, true), |(mut receiver, first)| async move {
        if !first && receiver.changed().await.is_err() {
            return None;
        }
        let snapshot = receiver.borrow_and_update().clone();
        let data = serde_json::to_string(&*snapshot).unwrap_or_default();
        Some((
            Ok(Event::default().event("snapshot").data(data)),
            (receiver, false),
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Lift {
    task: String,
    value: String,
}

/// `POST /api/blacklist/lift` `{"task": ..., "value": ...}`: end a blacklisting now.
async fn lift(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let lift: Lift = match serde_json::from_slice(&body) {
        Ok(lift) => lift,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"task\": ..., \"value\": ...}}: {e}"),
            )
        }
    };
    let names = bgtask::names::validate_name("task name", &lift.task)
        .and_then(|()| bgtask::names::validate_name("key value", &lift.value));
    if let Err(e) = names {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    match state.blacklist.lift(&lift.task, &lift.value).await {
        Ok(lifted) => Json(serde_json::json!({ "lifted": lifted })).into_response(),
        Err(e) if crate::exit::code_of(e.kind()) == crate::exit::USAGE => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_as_bearer_or_as_the_basic_password() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            authorized(&headers, "s3cret")
        };
        assert!(with("Bearer s3cret"));
        // "anyone:s3cret" and ":s3cret"
        assert!(with("Basic YW55b25lOnMzY3JldA=="));
        assert!(with("Basic OnMzY3JldA=="));
        assert!(!with("Bearer s3cre"));
        assert!(!with("Basic czNjcmV0")); // "s3cret" with no colon: no password
        assert!(!with("Basic !!!"));
        assert!(!with("s3cret"));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
    }
}

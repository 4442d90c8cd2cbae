//! The HTTP endpoints of SPEC §4: `/`, `/alive`, `/alwayshappy`, `/ready`, `/livez`, `/metrics`.
//!
//! Handlers only read shared state; the router is testable without a socket. Large answers
//! are shared, not copied per request: `/metrics` serves one render to concurrent requests,
//! and `/alive` renders a round's results once and sends them after the few bytes that are
//! particular to the request, so clients that ask and never read pin no copies of their own.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use serde::Serialize;
use tokio::sync::watch;

use crate::discovery::{Discovery, Neighbour};
use crate::incoming::{IncomingChecks, Recorded};
use crate::listener::RemoteAddr;
use crate::liveness::Heartbeat;
use crate::metrics::Metrics;
use crate::probe::ORIGIN_HEADER;
use crate::scheduler::RoundReport;

/// What the handlers read.
pub struct AppState {
    /// Reported as `hostname` in `/alive`.
    pub hostname: String,
    pub reports: watch::Receiver<Option<Arc<RoundReport>>>,
    /// Set at the first shutdown signal.
    pub draining: Arc<AtomicBool>,
    /// When the last round finished, for `/livez`.
    pub heartbeat: Arc<Heartbeat>,
    pub discovery: Discovery,
    pub incoming: Arc<IncomingChecks>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Ready: the first round is done, the agent is not draining, its node is schedulable.
    pub fn is_ready(&self) -> bool {
        self.reports.borrow().is_some()
            && !self.draining.load(Ordering::SeqCst)
            && self.discovery.own_node_schedulable()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { (StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, "/alive")]) }))
        .route("/alive", get(alive))
        .route("/alwayshappy", get(always_happy))
        .route("/ready", get(ready))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .layer(Extension(Arc::new(RenderedResults::default())))
        .with_state(state)
}

async fn always_happy(State(state): State<Arc<AppState>>, headers: HeaderMap) -> StatusCode {
    // Only agent pods that discovery knows count, so a made-up header cannot hide a node
    // that nobody probes.
    if let Some(origin) = headers.get(ORIGIN_HEADER).and_then(|v| v.to_str().ok()) {
        if state.discovery.knows_pod(origin) && state.incoming.record(origin, Instant::now()) == Recorded::Full {
            tracing::debug!("incoming origin record is full; origin not recorded");
        }
    }
    StatusCode::OK
}

async fn ready(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// 200 while rounds finish; 503 once none has for the heartbeat's limit, whatever the
/// probes found and whether the agent drains: the liveness probe restarts a stalled prober,
/// not an agent that reports a broken network or a cordoned node.
async fn livez(State(state): State<Arc<AppState>>) -> Response {
    let now = Instant::now();
    if state.heartbeat.is_alive(now) {
        return StatusCode::OK.into_response();
    }
    let body = format!(
        "no probe round finished for {} (limit {})\n",
        humantime::format_duration(Duration::from_secs(state.heartbeat.silent_for(now).as_secs())),
        humantime::format_duration(state.heartbeat.limit())
    );
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render_shared() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot render /metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The `/alive` document, field for field as the Go agent writes it.
#[derive(Serialize)]
struct Alive<'a> {
    hostname: &'a str,
    headers: BTreeMap<String, Vec<String>>,
    user_agent: &'a str,
    request_uri: &'a str,
    remote_addr: String,
    last_check_result: BTreeMap<String, serde_json::Value>,
}

async fn alive(
    State(state): State<Arc<AppState>>,
    Extension(rendered): Extension<Arc<RenderedResults>>,
    remote: Option<Extension<RemoteAddr>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(report) = state.reports.borrow().clone() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut header_map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &headers {
        header_map
            .entry(canonical_header(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let user_agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let head = Alive {
        hostname: &state.hostname,
        headers: header_map,
        user_agent,
        request_uri: uri.path_and_query().map_or("/alive", |p| p.as_str()),
        remote_addr: remote.map(|Extension(RemoteAddr(a))| a.to_string()).unwrap_or_default(),
        last_check_result: BTreeMap::new(),
    };
    let (Some(head), Some(results)) = (alive_head(&head), rendered.of(&report)) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let status = if report.healthy() { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR };
    let body = Body::new(Chunks([head, results, Bytes::from_static(b"\n}\n")].into()));
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The `/alive` document up to the value of `last_check_result`, which `alive` left empty.
fn alive_head(alive: &Alive<'_>) -> Option<Bytes> {
    let mut out = Vec::with_capacity(1024);
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b" "));
    alive.serialize(&mut serializer).ok()?;
    let head = out.strip_suffix(b"{}\n}")?.len();
    out.truncate(head);
    Some(out.into())
}

/// `last_check_result` of the latest report, rendered once per report as the value of a
/// top-level field of the pretty `/alive` document.
#[derive(Default)]
struct RenderedResults {
    latest: Mutex<Option<(Arc<RoundReport>, Bytes)>>,
}

impl RenderedResults {
    fn of(&self, report: &Arc<RoundReport>) -> Option<Bytes> {
        let mut latest = crate::sync::lock(&self.latest);
        if let Some((rendered, text)) = latest.as_ref() {
            if Arc::ptr_eq(rendered, report) {
                return Some(text.clone());
            }
        }
        let text = nested_json(&check_results(report))?;
        *latest = Some((report.clone(), text.clone()));
        Some(text)
    }
}

/// `value` as pretty JSON for a top-level field of a pretty document.
fn nested_json(value: &impl Serialize) -> Option<Bytes> {
    let mut out = Vec::with_capacity(4096);
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b" "));
    value.serialize(&mut serializer).ok()?;
    // One level deeper: JSON strings hold no raw newlines, so every newline is layout.
    Some(String::from_utf8(out).ok()?.replace('\n', "\n ").into())
}

/// A body of a few shared buffers, sent one after the other without copying them together.
struct Chunks(VecDeque<Bytes>);

impl HttpBody for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(hyper::body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0.iter().map(|chunk| chunk.len() as u64).sum())
    }
}

fn check_results(report: &RoundReport) -> BTreeMap<String, serde_json::Value> {
    let mut results = BTreeMap::new();
    for skipped in &report.skipped {
        results.insert(skipped.kind.clone(), "skipped".into());
    }
    for result in &report.results {
        results.insert(result.target.kind.clone(), result.summary().into());
    }
    results.insert("neighbourhood_state".into(), report.neighbourhood.state.clone().into());
    let neighbours: &[Neighbour] = &report.neighbourhood.neighbours;
    results.insert("neighbourhood".into(), serde_json::to_value(neighbours).unwrap_or_default());
    results
}

/// `user-agent` → `User-Agent`, as Go prints header names.
fn canonical_header(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| first.to_ascii_uppercase().to_string() + chars.as_str())
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alive_document_in_pieces_is_the_document_in_one() {
        let results: BTreeMap<String, serde_json::Value> = [
            ("me_ingress".to_owned(), "skipped".into()),
            ("neighbourhood".to_owned(), serde_json::json!([{"PodName": "a", "PodIP": "10.0.0.1"}, {"PodName": "b"}])),
            ("neighbourhood_state".to_owned(), "ok".into()),
            ("path_x".to_owned(), "Get \"http://x\": line\nbreak".into()),
        ]
        .into();
        let headers: BTreeMap<String, Vec<String>> =
            [("User-Agent".to_owned(), vec!["probe/1".to_owned()]), ("X-Empty".to_owned(), vec![])].into();
        let document = |last_check_result| Alive {
            hostname: "kubenurse-a",
            headers: headers.clone(),
            user_agent: "probe/1",
            request_uri: "/alive?x=1",
            remote_addr: "127.0.0.1:1234".to_owned(),
            last_check_result,
        };
        let mut whole = Vec::new();
        let mut serializer =
            serde_json::Serializer::with_formatter(&mut whole, serde_json::ser::PrettyFormatter::with_indent(b" "));
        document(results.clone()).serialize(&mut serializer).expect("serialize");
        whole.push(b'\n');

        let head = alive_head(&document(BTreeMap::new())).expect("head");
        let pieces = [&head[..], &nested_json(&results).expect("results")[..], b"\n}\n"].concat();
        assert_eq!(String::from_utf8_lossy(&pieces), String::from_utf8_lossy(&whole));
    }

    #[test]
    fn header_names_are_printed_like_go() {
        assert_eq!(canonical_header("user-agent"), "User-Agent");
        assert_eq!(canonical_header("kubenurse-neighbour-origin"), "Kubenurse-Neighbour-Origin");
        assert_eq!(canonical_header("x"), "X");
    }
}

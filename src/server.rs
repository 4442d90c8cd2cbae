//! The HTTP endpoints of SPEC §4: `/`, `/alive`, `/alwayshappy`, `/ready`, `/metrics`.
//!
//! Handlers only read shared state; the router is testable without a socket.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn always_happy(State(state): State<Arc<AppState>>, headers: HeaderMap) -> StatusCode {
    if let Some(origin) = headers.get(ORIGIN_HEADER).and_then(|v| v.to_str().ok()) {
        if state.incoming.record(origin, Instant::now()) == Recorded::Full {
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

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render() {
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
    let body = Alive {
        hostname: &state.hostname,
        headers: header_map,
        user_agent,
        request_uri: uri.path_and_query().map_or("/alive", |p| p.as_str()),
        remote_addr: remote.map(|Extension(RemoteAddr(a))| a.to_string()).unwrap_or_default(),
        last_check_result: check_results(&report),
    };
    let mut out = Vec::with_capacity(4096);
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b" "));
    if body.serialize(&mut serializer).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    out.push(b'\n');
    let status = if report.healthy() { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR };
    (status, [(header::CONTENT_TYPE, "application/json")], out).into_response()
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
    fn header_names_are_printed_like_go() {
        assert_eq!(canonical_header("user-agent"), "User-Agent");
        assert_eq!(canonical_header("kubenurse-neighbour-origin"), "Kubenurse-Neighbour-Origin");
        assert_eq!(canonical_header("x"), "X");
    }
}

//! The request and its answer: one GET on a connection, up to the response head
//! (`wrote_request`, `got_first_resp_byte`), within the probe's deadline.

use std::time::Instant as StdInstant;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONNECTION, HOST, USER_AGENT};
use http_body_util::{BodyExt, Empty, Limited};
use tokio::time::{timeout_at, Instant};

use super::connection::Connection;
use super::model::{Event, FailedPhase, Target};
use super::recorder::Recorder;
use super::Failure;
use crate::error_text::chain;

/// The header that tells a neighbour who probed it.
pub const ORIGIN_HEADER: &str = "kubenurse-neighbour-origin";

/// How much of a response body is read to keep a pooled connection usable.
const MAX_DRAINED_BODY: usize = 64 * 1024;

/// The headers every request carries, and those some do.
pub(super) struct Headers {
    pub(super) user_agent: HeaderValue,
    /// `ORIGIN_HEADER` on neighbour probes.
    pub(super) origin: HeaderValue,
    /// Ask the peer to close: the connection is not reused.
    pub(super) close: bool,
}

impl Headers {
    /// The GET for `target`, with the bearer token when given.
    pub(super) fn request(
        &self,
        target: &Target,
        token: Option<&HeaderValue>,
    ) -> Result<http::Request<Empty<Bytes>>, Failure> {
        let path = target.url.path_and_query().map_or("/", |p| p.as_str());
        let authority = target.url.authority().map_or("", |a| a.as_str());
        let mut builder = http::Request::get(path).header(HOST, authority).header(USER_AGENT, self.user_agent.clone());
        if target.peer.is_some() {
            builder = builder.header(ORIGIN_HEADER, self.origin.clone());
        }
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, token.clone());
        }
        if self.close {
            builder = builder.header(CONNECTION, HeaderValue::from_static("close"));
        }
        builder.body(Empty::new()).map_err(|e| Failure::new(FailedPhase::WriteRequest, e))
    }
}

/// Sends `request` on `conn` and waits for the response head until `deadline`. Returns the
/// status and, when `keep` asks for it, whether the connection can serve the next round.
pub(super) async fn exchange(
    conn: &mut Connection,
    request: http::Request<Empty<Bytes>>,
    rec: &mut Recorder,
    deadline: Instant,
    keep: bool,
) -> Result<(u16, bool), Failure> {
    let sent = timeout_at(deadline, conn.send(request)).await;
    let io = conn.times();
    let response = match sent {
        // Still writing when time ran out is the write phase; written and unanswered is the
        // round trip.
        Err(_) => {
            let phase = if io.last_write.is_some() { FailedPhase::RoundTrip } else { FailedPhase::WriteRequest };
            return Err(Failure::timed_out(phase));
        }
        Ok(Err(e)) => {
            let phase = if io.write_error || io.last_write.is_none() {
                FailedPhase::WriteRequest
            } else {
                FailedPhase::RoundTrip
            };
            return Err(Failure::new(phase, chain(&e)));
        }
        Ok(Ok(response)) => response,
    };
    let headers_at = StdInstant::now();
    if let Some(at) = io.last_write {
        rec.mark_at(Event::WroteRequest, at);
    }
    rec.mark_at(Event::GotFirstRespByte, io.first_read.unwrap_or(headers_at));
    rec.headers_at(headers_at);
    let status = response.status().as_u16();
    if !keep {
        return Ok((status, false));
    }
    // Drain a small body so the connection can serve the next round; a body that does not
    // come in time only costs the reuse, the probe has its answer.
    let body = Limited::new(response.into_body(), MAX_DRAINED_BODY).collect();
    let drained = matches!(timeout_at(deadline, body).await, Ok(Ok(_)));
    Ok((status, drained && conn.is_open()))
}

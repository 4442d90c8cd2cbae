//! The probe: one HTTP GET, timed phase by phase, failing at the phase that failed; or, for
//! the `tcp://` and `dns://` extra checks, a connection or a DNS lookup alone.
//!
//! A probe first reads its credentials, then starts its clock. Within one deadline it takes
//! an idle connection (with reuse on) or dials a fresh one — resolve the name, connect, TLS
//! handshake — and exchanges one request for a response head. Every step ends at the
//! deadline, so a probe that runs out of time is counted at the phase still open: a dead node
//! at `connect_done`, a silent DNS server at `dns_done`, a peer that never finishes the
//! handshake at `tls_handshake_done`, and only a written request left unanswered at
//! `round_trip_error`.
//!
//! A TCP check takes the same path up to `connect_done` and closes the connection; a DNS
//! check only has `dns_start` and `dns_done` (see [`dns_check`]).
//!
//! By default every probe opens a fresh connection (measuring DNS + TCP + TLS each time).
//! With connection reuse on, one idle connection per target is kept between rounds.

mod connection;
mod dial;
mod dns_check;
mod exchange;
pub mod model;
mod pool;
mod recorder;
mod resolve;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::error_text::chain;
use connection::{Connection, Io};
use exchange::{exchange, Headers};
use pool::Pool;
use recorder::Recorder;

pub use dns_check::DnsCheckError;
pub use exchange::ORIGIN_HEADER;
pub use model::{Check, DnsQuery, Event, FailedPhase, Outcome, Peer, ProbeResult, Target, UNKNOWN_ZONE};
pub use resolve::{LookupError, Resolver, ResolverError};

/// Settings of the probe client.
pub struct ProberSettings {
    pub tls: crate::tls::ProbeTls,
    pub resolver: Resolver,
    pub timeout: Duration,
    pub token_file: PathBuf,
    pub own_pod: String,
    pub reuse_connections: bool,
}

/// Runs probes; cheap to share between tasks.
pub struct Prober {
    resolver: Resolver,
    /// Always verifies: for the targets that carry the token.
    verified_tls: TlsConnector,
    /// Verifies unless `KUBENURSE_INSECURE`: for every other target.
    tls: TlsConnector,
    timeout: Duration,
    token_file: PathBuf,
    headers: Headers,
    pool: Option<Pool>,
}

impl Prober {
    pub fn new(settings: ProberSettings) -> Self {
        let origin = HeaderValue::from_str(&settings.own_pod).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            resolver: settings.resolver,
            verified_tls: TlsConnector::from(Arc::new(settings.tls.verified)),
            tls: TlsConnector::from(Arc::new(settings.tls.general)),
            timeout: settings.timeout,
            token_file: settings.token_file,
            headers: Headers {
                user_agent: HeaderValue::from_static(concat!("kubenurse/", env!("CARGO_PKG_VERSION"))),
                origin,
                close: !settings.reuse_connections,
            },
            pool: settings.reuse_connections.then(Pool::default),
        }
    }

    /// Probes `target` once, within the deadline. Never fails: failures are in the result.
    pub async fn probe(&self, target: Arc<Target>) -> ProbeResult {
        // Before the clock starts: reading a file is not network time.
        let token = match self.token(&target).await {
            Ok(token) => token,
            Err(f) => {
                let error = f.describe(&target, self.timeout);
                return ProbeResult::unobserved(target, f.phase, error);
            }
        };
        let mut rec = Recorder::start();
        let deadline = Instant::from_std(rec.started()) + self.timeout;
        let outcome = match &target.check {
            Check::Http => {
                self.run(&target, token.as_ref(), &mut rec, deadline).await.map(|status| Outcome::Response { status })
            }
            Check::Tcp => self.connect(&target, &mut rec, deadline).await,
            Check::Dns(query) => self.lookup(query, &mut rec, deadline).await,
        };
        let outcome = outcome.unwrap_or_else(|f| Outcome::Failed {
            phase: f.phase,
            error: f.describe(&target, self.timeout),
            cause: f.cause,
        });
        rec.finish(target, outcome)
    }

    /// A TCP check: resolve and connect as an HTTP probe does, then close at once.
    async fn connect(&self, target: &Target, rec: &mut Recorder, deadline: Instant) -> Result<Outcome, Failure> {
        drop(dial::connect(&self.resolver, &target.url, rec, deadline).await?);
        rec.reached();
        Ok(Outcome::Reached)
    }

    /// A DNS check: its lookup is the `dns_start`–`dns_done` phase.
    async fn lookup(&self, query: &DnsQuery, rec: &mut Recorder, deadline: Instant) -> Result<Outcome, Failure> {
        rec.mark(Event::DnsStart);
        match self.resolver.check_name(query, deadline, self.timeout).await {
            Ok(_) => {
                rec.mark(Event::DnsDone);
                rec.reached();
                Ok(Outcome::Reached)
            }
            Err(e) => Err(Failure::new(FailedPhase::Dns, &e).with_cause(e.cause)),
        }
    }

    async fn run(
        &self,
        target: &Target,
        token: Option<&HeaderValue>,
        rec: &mut Recorder,
        deadline: Instant,
    ) -> Result<u16, Failure> {
        if let Some(mut conn) = self.pool.as_ref().and_then(|pool| pool.take(target)) {
            rec.mark(Event::GotConn);
            match exchange(&mut conn, self.headers.request(target, token)?, rec, deadline, true).await {
                Ok((status, reusable)) => {
                    self.keep(target, conn, reusable);
                    return Ok(status);
                }
                // The peer closed the pooled connection meanwhile: once more on a fresh one.
                Err(f) if Instant::now() < deadline => {
                    tracing::debug!(probe = %target.kind, error = %f.describe(target, self.timeout), "pooled connection failed, retrying on a fresh one");
                    rec.forget_events();
                }
                Err(f) => return Err(f),
            }
        }
        let mut conn = self.dial(target, rec, deadline).await?;
        let request = self.headers.request(target, token)?;
        let (status, reusable) = exchange(&mut conn, request, rec, deadline, self.pool.is_some()).await?;
        self.keep(target, conn, reusable);
        Ok(status)
    }

    /// A fresh connection: resolved, connected and, for `https`, with TLS.
    async fn dial(&self, target: &Target, rec: &mut Recorder, deadline: Instant) -> Result<Connection, Failure> {
        let tcp = dial::connect(&self.resolver, &target.url, rec, deadline).await?;
        let io: Box<dyn Io> = if target.url.scheme_str() == Some("https") {
            let (host, _) = dial::host_port(&target.url);
            Box::new(dial::handshake(self.tls_for(target), tcp, host, rec, deadline).await?)
        } else {
            Box::new(tcp)
        };
        rec.mark(Event::GotConn);
        Connection::open(io, self.pool.is_some()).await.map_err(|e| Failure::new(FailedPhase::RoundTrip, chain(&e)))
    }

    /// The token never travels unverified: a target that carries it is verified against the
    /// trusted CAs whatever `KUBENURSE_INSECURE` says.
    fn tls_for(&self, target: &Target) -> &TlsConnector {
        if target.bearer_token {
            &self.verified_tls
        } else {
            &self.tls
        }
    }

    /// The bearer token for `target`, read at each use: bound service-account tokens rotate.
    async fn token(&self, target: &Target) -> Result<Option<HeaderValue>, Failure> {
        if !target.bearer_token {
            return Ok(None);
        }
        let path = self.token_file.display();
        // A hung volume must not hang the round: the read gets the probe's deadline too.
        let read = tokio::time::timeout(self.timeout, tokio::fs::read_to_string(&self.token_file));
        let token = read
            .await
            .map_err(|_| {
                Failure::new(FailedPhase::RoundTrip, format!("reading service-account token {path} timed out"))
            })?
            .map_err(|e| {
                Failure::new(FailedPhase::RoundTrip, format!("cannot read service-account token {path}: {e}"))
            })?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
            Failure::new(FailedPhase::RoundTrip, format!("service-account token {path} is not a valid header value"))
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    fn keep(&self, target: &Target, conn: Connection, reusable: bool) {
        if let (Some(pool), true) = (&self.pool, reusable) {
            pool.put(target, conn);
        }
    }

    /// Drops idle connections of targets that are no longer probed.
    pub fn retain_idle(&self, targets: &[Arc<Target>]) {
        if let Some(pool) = &self.pool {
            pool.retain(targets);
        }
    }
}

/// Why a probe failed: the phase, and an error or the deadline.
struct Failure {
    phase: FailedPhase,
    /// `None`: the deadline passed while `phase` was open.
    error: Option<String>,
    /// The class of the error, when known (the span's `error.type`).
    cause: Option<&'static str>,
}

impl Failure {
    fn new(phase: FailedPhase, error: impl std::fmt::Display) -> Self {
        Self { phase, error: Some(error.to_string()), cause: None }
    }

    fn timed_out(phase: FailedPhase) -> Self {
        Self { phase, error: None, cause: Some("timeout") }
    }

    fn with_cause(self, cause: Option<&'static str>) -> Self {
        Self { cause, ..self }
    }

    /// The text for `/alive` and the logs: what was done to which target, and what failed.
    fn describe(&self, target: &Target, timeout: Duration) -> String {
        let what = target.operation();
        match &self.error {
            Some(error) => format!("{what}: {error}"),
            None => {
                let during = match self.phase {
                    FailedPhase::Dns => "resolving the name",
                    FailedPhase::Connect => "connecting",
                    FailedPhase::Tls => "in the TLS handshake",
                    FailedPhase::WriteRequest => "writing the request",
                    FailedPhase::RoundTrip => "waiting for the response",
                };
                format!("{what}: timed out after {timeout:?} {during}")
            }
        }
    }
}

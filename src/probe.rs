//! The probe client: one HTTP GET with true per-phase timing.
//!
//! Resolution, TCP connect and the TLS handshake are done here, step by step, so each phase
//! gets its own instant and a failure is pinned to the phase it happened in; hyper's
//! connection API then speaks HTTP/1.1 over the result. A wrapper around the connection notes
//! when the request was written and when the first response byte arrived.
//!
//! By default every probe opens a fresh connection (measuring DNS + TCP + TLS each time).
//! With connection reuse on, one idle connection per target is kept between rounds.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONNECTION, HOST, USER_AGENT};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::phase::{Event, FailedPhase, Outcome, ProbeResult, Target};

/// The header that tells a neighbour who probed it.
pub const ORIGIN_HEADER: &str = "kubenurse-neighbour-origin";

/// How much of a response body is read to keep a pooled connection usable.
const MAX_DRAINED_BODY: usize = 64 * 1024;

/// Settings of the probe client.
pub struct ProberSettings {
    pub tls: rustls::ClientConfig,
    pub timeout: Duration,
    pub token_file: PathBuf,
    pub own_pod: String,
    pub reuse_connections: bool,
}

/// Runs probes; cheap to share between tasks.
pub struct Prober {
    tls: TlsConnector,
    timeout: Duration,
    token_file: PathBuf,
    origin: HeaderValue,
    user_agent: HeaderValue,
    /// Idle connections by `scheme://authority`, when reuse is on.
    pool: Option<Mutex<HashMap<String, Connection>>>,
}

struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    io: Arc<Mutex<IoTimes>>,
    driver: Driver,
}

type ConnectionFuture = hyper::client::conn::http1::Connection<TokioIo<TimedIo>, Empty<Bytes>>;

/// What drives a connection's I/O. A fresh connection is driven inside the probe's own task,
/// so a probe costs no task hand-offs (they added about 100 µs at p50 in the fidelity
/// benchmark); a connection kept for reuse gets a task of its own, which keeps it alive
/// between rounds.
enum Driver {
    Inline(Pin<Box<ConnectionFuture>>),
    Spawned(AbortOnDrop),
}

impl Driver {
    fn is_finished(&self) -> bool {
        match self {
            Driver::Inline(_) => false,
            Driver::Spawned(task) => task.0.is_finished(),
        }
    }
}

/// Aborts the task that drives a connection when the connection is dropped, so a peer that
/// never answers cannot keep a task and a socket alive.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A probe failure: the phase and a message for `/alive` and the logs.
struct Failure {
    phase: FailedPhase,
    error: String,
}

impl Failure {
    fn new(phase: FailedPhase, error: impl std::fmt::Display) -> Self {
        Self { phase, error: error.to_string() }
    }
}

/// Collects event instants during one probe.
struct Recorder {
    started: Instant,
    events: Vec<(Event, Duration)>,
    /// When the response headers arrived.
    headers: Option<Duration>,
}

impl Recorder {
    fn mark(&mut self, event: Event) {
        self.mark_at(event, Instant::now());
    }

    fn headers_at(&mut self, at: Instant) {
        self.headers = Some(at.saturating_duration_since(self.started));
    }

    fn mark_at(&mut self, event: Event, at: Instant) {
        self.events.push((event, at.saturating_duration_since(self.started)));
    }
}

impl Prober {
    pub fn new(settings: ProberSettings) -> Self {
        let origin = HeaderValue::from_str(&settings.own_pod).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            tls: TlsConnector::from(Arc::new(settings.tls)),
            timeout: settings.timeout,
            token_file: settings.token_file,
            origin,
            user_agent: HeaderValue::from_static(concat!("kubenurse/", env!("CARGO_PKG_VERSION"))),
            pool: settings.reuse_connections.then(Default::default),
        }
    }

    /// Probes `target` once, within the deadline. Never fails: failures are in the result.
    pub async fn probe(&self, target: Arc<Target>) -> ProbeResult {
        let started_at = SystemTime::now();
        let mut rec = Recorder { started: Instant::now(), events: Vec::with_capacity(Event::ALL.len()), headers: None };
        let outcome = match tokio::time::timeout(self.timeout, self.run(&target, &mut rec)).await {
            Ok(Ok(status)) => Outcome::Response { status },
            Ok(Err(f)) => Outcome::Failed { phase: f.phase, error: format!("GET {}: {}", target.url, f.error) },
            Err(_) => {
                let during = rec.events.last().map_or("start", |(e, _)| e.label());
                Outcome::Failed {
                    phase: FailedPhase::RoundTrip,
                    error: format!("GET {}: timed out after {:?} (last event: {during})", target.url, self.timeout),
                }
            }
        };
        let response_after = match outcome {
            Outcome::Response { .. } => rec.headers,
            Outcome::Failed { .. } => None,
        };
        ProbeResult {
            elapsed: response_after.unwrap_or_else(|| rec.started.elapsed()),
            started: rec.started,
            started_at,
            events: rec.events,
            response_after,
            outcome,
            target,
        }
    }

    async fn run(&self, target: &Target, rec: &mut Recorder) -> Result<u16, Failure> {
        let token = if target.bearer_token { Some(self.read_token().await?) } else { None };
        let key = pool_key(&target.url);
        let reused = self.take_idle(&key);
        let from_pool = reused.is_some();
        let mut conn = match reused {
            Some(conn) => {
                rec.mark(Event::GotConn);
                conn
            }
            None => self.connect(&target.url, rec).await?,
        };
        let result = self.exchange(&mut conn, target, token.as_ref(), rec).await;
        let (status, reusable) = match result {
            // A pooled connection the peer closed in between: retry once on a fresh one.
            Err(f) if from_pool => {
                tracing::debug!(target = %target.kind, error = %f.error, "pooled connection failed, retrying on a fresh one");
                rec.events.clear();
                conn = self.connect(&target.url, rec).await?;
                self.exchange(&mut conn, target, token.as_ref(), rec).await?
            }
            other => other?,
        };
        if reusable {
            self.put_idle(key, conn);
        }
        Ok(status)
    }

    /// Sends the request on `conn` and waits for the response headers. Returns the status and
    /// whether the connection may be reused.
    async fn exchange(
        &self,
        conn: &mut Connection,
        target: &Target,
        token: Option<&HeaderValue>,
        rec: &mut Recorder,
    ) -> Result<(u16, bool), Failure> {
        lock(&conn.io).reset();
        let request = self.request(target, token)?;
        let sender = &mut conn.sender;
        let send = async move {
            sender.ready().await?;
            sender.send_request(request).await
        };
        let sent = match &mut conn.driver {
            Driver::Inline(io) => {
                tokio::pin!(send);
                tokio::select! {
                    biased;
                    sent = &mut send => sent,
                    // The connection ended first: the request then fails with the reason.
                    _ = io.as_mut() => send.await,
                }
            }
            Driver::Spawned(_) => send.await,
        };
        let io = lock(&conn.io).clone();
        let response = sent.map_err(|e| {
            let phase = if io.write_error || io.last_write.is_none() {
                FailedPhase::WriteRequest
            } else {
                FailedPhase::RoundTrip
            };
            Failure::new(phase, error_chain(&e))
        })?;
        let headers_at = Instant::now();
        if let Some(at) = io.last_write {
            rec.mark_at(Event::WroteRequest, at);
        }
        rec.mark_at(Event::GotFirstRespByte, io.first_read.unwrap_or(headers_at));
        rec.headers_at(headers_at);
        let status = response.status().as_u16();
        if self.pool.is_none() {
            return Ok((status, false));
        }
        // Drain a small body so the connection can serve the next round.
        let drained = Limited::new(response.into_body(), MAX_DRAINED_BODY).collect().await.is_ok();
        Ok((status, drained && !conn.sender.is_closed()))
    }

    fn request(&self, target: &Target, token: Option<&HeaderValue>) -> Result<http::Request<Empty<Bytes>>, Failure> {
        let path = target.url.path_and_query().map_or("/", |p| p.as_str());
        let authority = target.url.authority().map_or("", |a| a.as_str());
        let mut builder = http::Request::get(path).header(HOST, authority).header(USER_AGENT, self.user_agent.clone());
        if target.peer.is_some() {
            builder = builder.header(ORIGIN_HEADER, self.origin.clone());
        }
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, token.clone());
        }
        if self.pool.is_none() {
            builder = builder.header(CONNECTION, HeaderValue::from_static("close"));
        }
        builder.body(Empty::new()).map_err(|e| Failure::new(FailedPhase::WriteRequest, e))
    }

    /// The bearer token, read at each use: bound service-account tokens rotate.
    async fn read_token(&self) -> Result<HeaderValue, Failure> {
        let token = tokio::fs::read_to_string(&self.token_file).await.map_err(|e| {
            Failure::new(
                FailedPhase::RoundTrip,
                format!("cannot read service-account token {}: {e}", self.token_file.display()),
            )
        })?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| Failure::new(FailedPhase::RoundTrip, "service-account token is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// Opens a fresh connection, marking DNS, connect and TLS events.
    async fn connect(&self, url: &http::Uri, rec: &mut Recorder) -> Result<Connection, Failure> {
        let https = url.scheme_str() == Some("https");
        let host = url.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });

        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                rec.mark(Event::DnsStart);
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                    .await
                    .map_err(|e| Failure::new(FailedPhase::Dns, format!("lookup {host}: {e}")))?
                    .collect();
                if addrs.is_empty() {
                    return Err(Failure::new(FailedPhase::Dns, format!("lookup {host}: no addresses")));
                }
                rec.mark(Event::DnsDone);
                addrs
            }
        };

        rec.mark(Event::ConnectStart);
        let mut last_error = None;
        let mut stream = None;
        for addr in addrs.iter().take(4) {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = Some(format!("connect {addr}: {e}")),
            }
        }
        let stream = stream.ok_or_else(|| Failure::new(FailedPhase::Connect, last_error.unwrap_or_default()))?;
        rec.mark(Event::ConnectDone);
        let _ = stream.set_nodelay(true);

        let io: Box<dyn Io> = if https {
            rec.mark(Event::TlsHandshakeStart);
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| Failure::new(FailedPhase::Tls, format!("invalid server name {host}: {e}")))?;
            let tls = self
                .tls
                .connect(name, stream)
                .await
                .map_err(|e| Failure::new(FailedPhase::Tls, format!("tls handshake: {e}")))?;
            rec.mark(Event::TlsHandshakeDone);
            Box::new(tls)
        } else {
            Box::new(stream)
        };
        rec.mark(Event::GotConn);

        let times = Arc::new(Mutex::new(IoTimes::default()));
        let timed = TimedIo { inner: io, times: times.clone() };
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(timed))
            .await
            .map_err(|e| Failure::new(FailedPhase::RoundTrip, error_chain(&e)))?;
        let driver = if self.pool.is_some() {
            Driver::Spawned(AbortOnDrop(tokio::spawn(async move {
                let _ = driver.await;
            })))
        } else {
            Driver::Inline(Box::pin(driver))
        };
        Ok(Connection { sender, io: times, driver })
    }

    fn take_idle(&self, key: &str) -> Option<Connection> {
        let conn = lock(self.pool.as_ref()?).remove(key)?;
        (!conn.sender.is_closed() && !conn.driver.is_finished()).then_some(conn)
    }

    fn put_idle(&self, key: String, conn: Connection) {
        if let Some(pool) = &self.pool {
            lock(pool).insert(key, conn);
        }
    }

    /// Drops idle connections to targets that are no longer probed.
    pub fn retain_idle(&self, keep: impl Fn(&str) -> bool) {
        if let Some(pool) = &self.pool {
            lock(pool).retain(|key, _| keep(key));
        }
    }
}

/// The pool key of a URL: scheme and authority.
pub fn pool_key(url: &http::Uri) -> String {
    format!("{}://{}", url.scheme_str().unwrap_or("http"), url.authority().map_or("", |a| a.as_str()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An error with its causes, `a: b: c`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A byte stream: plain TCP or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// When the current request was last written and when its answer started to arrive.
#[derive(Debug, Default, Clone)]
struct IoTimes {
    last_write: Option<Instant>,
    first_read: Option<Instant>,
    write_error: bool,
}

impl IoTimes {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Notes write and first-read instants of the request in flight.
struct TimedIo {
    inner: Box<dyn Io>,
    times: Arc<Mutex<IoTimes>>,
}

impl TimedIo {
    fn wrote<T>(&self, result: &Poll<io::Result<T>>) {
        match result {
            Poll::Ready(Ok(_)) => {
                let mut t = lock(&self.times);
                if t.first_read.is_none() {
                    t.last_write = Some(Instant::now());
                }
            }
            Poll::Ready(Err(_)) => lock(&self.times).write_error = true,
            Poll::Pending => {}
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut t = lock(&self.times);
            if t.first_read.is_none() {
                t.first_read = Some(Instant::now());
            }
        }
        result
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(&result);
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

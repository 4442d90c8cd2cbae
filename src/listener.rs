//! Accepting connections, plain or TLS, so that hostile clients can neither wedge the agent
//! nor push it into the OOM killer, and a graceful drain on shutdown.
//!
//! - Slots: both listeners share one table of [`MAX_CONNECTIONS`] slots, fair by source
//!   address ([`Connections`]), so the kubelet's and the neighbours' probes get in whatever a
//!   few hostile addresses do.
//! - Time: request headers (and a TLS handshake) must arrive within [`HEADER_TIMEOUT`], which
//!   also bounds an idle keep-alive connection; a write that makes no progress for
//!   [`WRITE_TIMEOUT`] ends the connection; after [`CONNECTION_LIFETIME`] a connection
//!   finishes its request and closes, and is cut [`CLOSE_GRACE`] later if it has not.
//! - Memory: a request head is at most [`MAX_HEAD_BYTES`], TLS buffers are capped per
//!   connection, and the kernel's socket buffers are fixed (no autotuning) so that a client
//!   that does not read pins a known amount; connections cut for not reading close with a
//!   reset, so nothing lingers in the kernel after them.
//!
//! Worst case, all slots held by clients that fill every buffer, per connection: hyper's read
//! buffer (the head limit, 16 KiB), its header write buffer (8 KiB) and ~8 KiB of connection
//! state; with TLS up to 64 KiB more while rustls joins a handshake message (within the
//! header deadline), then its record buffer (~18 KiB), received plaintext (16 KiB) and
//! [`TLS_BUFFER`]; in the kernel, the send and receive buffers as accounted (twice the sizes
//! set here). About 250 KiB, 16 MiB for [`MAX_CONNECTIONS`]. Response bodies are shared
//! between connections, not copied per connection.

mod slots;
mod stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::Layer;

use crate::ratelimit::FailureStreak;
pub use slots::{Admission, Connections, Slot, SlotId};
use stream::GuardedStream;

/// Open connections, plain and TLS together.
pub const MAX_CONNECTIONS: usize = 64;
/// Open connections from one source address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 32;
/// Time a client gets to send its request headers, to finish a TLS handshake, and to send
/// the next request on a keep-alive connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a write may wait for a client that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Age after which a connection closes once its current request is answered.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a connection past its lifetime (or open at shutdown) may take to finish.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Largest request head accepted (431 beyond): what Node.js allows, enough for browsers
/// with cookies looking at `/alive` through an ingress.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Ciphertext rustls may queue per TLS connection.
pub const TLS_BUFFER: usize = 16 * 1024;
/// Kernel send buffer of accepted connections, as set (the kernel doubles it). Smaller than
/// one loopback segment, a reader's delayed ACK stalls every large answer by 40 ms.
pub const SEND_BUFFER: u32 = 64 * 1024;
/// Kernel receive buffer of accepted connections, as set: requests are small.
pub const RECEIVE_BUFFER: u32 = 8 * 1024;
/// How long a drain waits for open requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pending connections the kernel queues before the accept loop takes them.
const BACKLOG: u32 = 1024;
/// Reminders while the slots stay full.
const FULL_REMINDER: Duration = Duration::from_secs(300);

/// The peer address of a request's connection, for handlers that report it.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub SocketAddr);

/// Binds `addr`; an unavailable IPv6 wildcard falls back to the IPv4 one.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match listen(addr) {
        Ok(listener) => Ok(listener),
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() && e.kind() != std::io::ErrorKind::AddrInUse => {
            tracing::info!(%addr, error = %e, "IPv6 unavailable, listening on IPv4 only");
            listen(SocketAddr::from(([0, 0, 0, 0], addr.port())))
        }
        Err(e) => Err(e),
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    // Accepted connections inherit both sizes.
    socket.set_send_buffer_size(SEND_BUFFER)?;
    socket.set_recv_buffer_size(RECEIVE_BUFFER)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The time limits of a listener; tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_timeout: Duration,
    write_timeout: Duration,
    lifetime: Duration,
    close_grace: Duration,
    drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: HEADER_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            lifetime: CONNECTION_LIFETIME,
            close_grace: CLOSE_GRACE,
            drain_timeout: DRAIN_TIMEOUT,
        }
    }
}

/// Serves `router` on `listener`, taking slots from `connections`, until `stop` turns true;
/// then drains open connections.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    connections: Arc<Connections>,
    stop: watch::Receiver<bool>,
) {
    serve_with(listener, tls, router, connections, Limits::default(), stop).await;
}

async fn serve_with(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    connections: Arc<Connections>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    let http = Arc::new(http);
    let mut tasks = JoinSet::new();
    let mut full = FailureStreak::new(FULL_REMINDER);
    let mut accept_errors = FailureStreak::new(FULL_REMINDER);

    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    if let Some(recovery) = accept_errors.succeeded(std::time::Instant::now()) {
                        tracing::info!(failures = recovery.failures, "accepting connections again");
                    }
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    if let Some(report) = accept_errors.failed(std::time::Instant::now()) {
                        tracing::warn!(error = %e, failures = report.failures, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = crate::shutdown::stopped(&mut stop) => break,
        };
        let slot = match connections.admit(remote.ip()) {
            Admission::Free(slot) => {
                // Under attack slots free up and fill again all the time: only half empty
                // counts as over.
                if full.is_failing() && connections.open() <= connections.capacity() / 2 {
                    if let Some(recovery) = full.succeeded(std::time::Instant::now()) {
                        tracing::info!(pushed_out = recovery.failures, "connection slots available again");
                    }
                }
                slot
            }
            Admission::Took { slot, pushed_out } => {
                if let Some(report) = full.failed(std::time::Instant::now()) {
                    tracing::warn!(
                        client = %remote.ip(),
                        %pushed_out,
                        suppressed = report.suppressed,
                        "connection slots taken: closing the oldest connection of the busiest client"
                    );
                }
                slot
            }
            Admission::Refused => {
                tracing::debug!(client = %remote.ip(), "connection slots taken by lighter clients; connection refused");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = slot.id();
        let task = tasks.spawn(connection(
            stream,
            remote,
            tls.clone(),
            http.clone(),
            router.clone(),
            slot,
            limits,
            stop.clone(),
        ));
        if !connections.attach(id, task.clone()) {
            // Pushed out by the other listener before it could be attached.
            task.abort();
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.drain_timeout, async { while tasks.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::info!("drain timed out; closing remaining connections");
        tasks.shutdown().await;
    }
}

/// Serves one connection in its slot.
#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    http: Arc<http1::Builder>,
    router: Router,
    slot: Slot,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    let born = Instant::now();
    let reset = slot.reset.clone();
    let stream = GuardedStream::new(stream, limits.write_timeout, reset.clone());
    let service = TowerToHyperService::new(Extension(RemoteAddr(remote)).layer(router));
    match tls {
        None => drive(http.serve_connection(TokioIo::new(stream), service), born, &reset, limits, stop).await,
        Some(acceptor) => {
            let handshake = acceptor.accept_with(stream, |conn| conn.set_buffer_limit(Some(TLS_BUFFER)));
            match tokio::time::timeout(limits.header_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    drive(http.serve_connection(TokioIo::new(stream), service), born, &reset, limits, stop).await;
                }
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "tls handshake failed"),
                Err(_) => tracing::debug!(%remote, "tls handshake timed out"),
            }
        }
    }
    drop(slot);
}

/// Runs `conn` until it ends, its lifetime is over or the listener stops; then lets it finish
/// its request within the grace, and cuts it (with a reset) if it does not.
async fn drive<I, S, B>(
    conn: http1::Connection<I, S>,
    born: Instant,
    reset: &AtomicBool,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep_until(born + limits.lifetime) => {}
        _ = crate::shutdown::stopped(&mut stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(limits.close_grace, conn).await.is_err() {
        reset.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const BIG: usize = 8 * 1024 * 1024;

    struct Server {
        addr: SocketAddr,
        connections: Arc<Connections>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn server(limits: Limits) -> Server {
        let big = Bytes::from(vec![b'x'; BIG]);
        let router = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route("/big", get(move || std::future::ready(big.clone())))
            .route(
                "/wait/{ms}",
                get(|axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    "waited"
                }),
            );
        let listener = bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Connections::new(16, 16);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve_with(listener, None, router, connections.clone(), limits, stopped));
        Server { addr, connections, stop, task }
    }

    /// A client with a small receive buffer, so that a large answer fills it at once.
    async fn small_client(addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        socket.connect(addr).await.expect("connect")
    }

    /// Waits (bounded) until `open` connections are open.
    async fn until_open(connections: &Connections, open: usize) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while connections.open() != open {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{open} connections open in time"));
    }

    /// Reads until the end of the stream or an error; what was read, and whether it was reset.
    async fn read_all(stream: &mut TcpStream) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let result = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out)).await;
        let reset =
            matches!(result.expect("closed in time"), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        (out, reset)
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off_with_a_reset() {
        let limits = Limits { write_timeout: Duration::from_millis(300), ..Limits::default() };
        let server = server(limits).await;
        let mut client = small_client(server.addr).await;
        client.write_all(b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n").await.expect("request");
        until_open(&server.connections, 1).await;
        until_open(&server.connections, 0).await;
        let (answer, reset) = read_all(&mut client).await;
        assert!(answer.len() < BIG, "the answer was cut off: {} bytes, reset {reset}", answer.len());
        assert!(reset, "closed with a reset, after {} bytes", answer.len());
    }

    #[tokio::test]
    async fn a_slow_but_steady_reader_gets_the_whole_answer() {
        let limits = Limits { write_timeout: Duration::from_millis(500), ..Limits::default() };
        let server = server(limits).await;
        let mut client = small_client(server.addr).await;
        client.write_all(b"GET /big HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await.expect("request");
        // Far longer in total than the write timeout, but never a pause near it.
        let mut received = 0;
        let mut buf = vec![0; 256 * 1024];
        let started = Instant::now();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), client.read(&mut buf))
                .await
                .expect("read in time")
                .expect("not cut off");
            if n == 0 {
                break;
            }
            received += n;
            if started.elapsed() < limits.write_timeout * 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(received > BIG, "the whole answer: {received} bytes");
    }

    #[tokio::test]
    async fn past_its_lifetime_a_connection_finishes_its_request_then_closes() {
        let limits = Limits { lifetime: Duration::from_millis(100), ..Limits::default() };
        let server = server(limits).await;
        let mut client = TcpStream::connect(server.addr).await.expect("connect");
        // The lifetime ends while the handler waits.
        client.write_all(b"GET /wait/1000 HTTP/1.1\r\nhost: a\r\n\r\n").await.expect("request");
        let (answer, reset) = read_all(&mut client).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
        assert!(answer.ends_with("waited") && !reset, "{answer}");
    }

    #[tokio::test]
    async fn past_the_grace_a_request_is_cut() {
        let limits = Limits {
            lifetime: Duration::from_millis(100),
            close_grace: Duration::from_millis(100),
            ..Limits::default()
        };
        let server = server(limits).await;
        let mut client = TcpStream::connect(server.addr).await.expect("connect");
        client.write_all(b"GET /wait/60000 HTTP/1.1\r\nhost: a\r\n\r\n").await.expect("request");
        let (answer, _) = read_all(&mut client).await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        until_open(&server.connections, 0).await;
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_at_the_header_deadline() {
        let limits = Limits { header_timeout: Duration::from_millis(200), ..Limits::default() };
        let server = server(limits).await;
        let mut client = TcpStream::connect(server.addr).await.expect("connect");
        client.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n").await.expect("request");
        let (answer, _) = read_all(&mut client).await;
        assert!(String::from_utf8_lossy(&answer).ends_with("ok"), "answered, then closed while idle");
        until_open(&server.connections, 0).await;
    }

    #[tokio::test]
    async fn stopping_lets_a_request_in_flight_finish() {
        let server = server(Limits::default()).await;
        let mut client = TcpStream::connect(server.addr).await.expect("connect");
        client.write_all(b"GET /wait/300 HTTP/1.1\r\nhost: a\r\n\r\n").await.expect("request");
        until_open(&server.connections, 1).await;
        server.stop.send(true).expect("stop");
        let (answer, _) = read_all(&mut client).await;
        assert!(String::from_utf8_lossy(&answer).ends_with("waited"));
        tokio::time::timeout(Duration::from_secs(10), server.task).await.expect("drained").expect("join");
        assert!(TcpStream::connect(server.addr).await.is_err(), "no longer listening");
    }
}

//! Opening a connection, phase by phase: name resolution (`dns_start`, `dns_done`), the TCP
//! connection (`connect_start`, `connect_done`) and the TLS handshake
//! (`tls_handshake_start`, `tls_handshake_done`). Each step ends at the probe's deadline, so
//! a step that is still open then is the phase the probe failed in.

use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tower::ServiceExt as _;

use super::model::{Event, FailedPhase};
use super::recorder::Recorder;
use super::resolve::Resolver;
use super::Failure;
use crate::error_text::chain;

/// How long the first address family has before the other one is raced (RFC 8305), as Go's
/// dialer waits.
const FALLBACK_DELAY: Duration = Duration::from_millis(300);

/// The host and port a URL points at; the host without IPv6 brackets.
pub(super) fn host_port(url: &http::Uri) -> (&str, u16) {
    let https = url.scheme_str() == Some("https");
    let host = url.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    (host, url.port_u16().unwrap_or(if https { 443 } else { 80 }))
}

/// Resolves the host of `url` (unless it is an address) and connects to it.
///
/// The connection itself is hyper-util's `HttpConnector`, which dials as Go's dialer does:
/// the addresses of the first family in turn, each with an equal share of the time left, and
/// the other family raced after [`FALLBACK_DELAY`]. (Go gives each address what is left
/// divided by the addresses left, at least 2 s; the two differ only after an early failure.)
/// The connector is built per probe, after the lookup, so its shares divide the time actually
/// left; that is why the lookup is not done through its resolver hook, which only hands over
/// the addresses found here.
pub(super) async fn connect(
    resolver: &Resolver,
    url: &http::Uri,
    rec: &mut Recorder,
    deadline: Instant,
) -> Result<TcpStream, Failure> {
    let (host, port) = host_port(url);
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            rec.mark(Event::DnsStart);
            let ips = match timeout_at(deadline, resolver.lookup(host)).await {
                Err(_) => return Err(Failure::timed_out(FailedPhase::Dns)),
                Ok(Err(e)) => {
                    let cause = e.cause();
                    return Err(Failure::new(FailedPhase::Dns, e).with_cause(cause));
                }
                Ok(Ok(ips)) => ips,
            };
            rec.mark(Event::DnsDone);
            ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect()
        }
    };

    rec.mark(Event::ConnectStart);
    let mut connector = HttpConnector::new_with_resolver(Resolved(addrs));
    connector.enforce_http(false);
    connector.set_nodelay(true);
    connector.set_happy_eyeballs_timeout(Some(FALLBACK_DELAY));
    connector.set_connect_timeout(Some(deadline.saturating_duration_since(Instant::now())));
    let stream = match timeout_at(deadline, connector.oneshot(url.clone())).await {
        // The connector's own timeout is the deadline too, and may fire first.
        Err(_) => return Err(Failure::timed_out(FailedPhase::Connect)),
        Ok(Err(_)) if Instant::now() >= deadline => return Err(Failure::timed_out(FailedPhase::Connect)),
        Ok(Err(e)) => {
            let error = format!("connect {host}:{port}: {}", chain(&e));
            return Err(Failure::new(FailedPhase::Connect, error).with_cause(connect_cause(&e)));
        }
        Ok(Ok(stream)) => stream.into_inner(),
    };
    rec.mark(Event::ConnectDone);
    Ok(stream)
}

/// The TLS handshake over `tcp`, verifying the certificate for `host` as `tls` says.
pub(super) async fn handshake(
    tls: &TlsConnector,
    tcp: TcpStream,
    host: &str,
    rec: &mut Recorder,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, Failure> {
    rec.mark(Event::TlsHandshakeStart);
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| Failure::new(FailedPhase::Tls, format!("invalid server name {host}: {e}")))?;
    let stream = match timeout_at(deadline, tls.connect(name, tcp)).await {
        Err(_) => return Err(Failure::timed_out(FailedPhase::Tls)),
        Ok(Err(e)) => return Err(Failure::new(FailedPhase::Tls, format!("tls handshake: {e}"))),
        Ok(Ok(stream)) => stream,
    };
    rec.mark(Event::TlsHandshakeDone);
    Ok(stream)
}

/// The class of a failed connection: `refused` (nothing listens) or `unreachable` (no route).
fn connect_cause(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut source = Some(e);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => Some("refused"),
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => Some("unreachable"),
                _ => None,
            };
        }
        source = error.source();
    }
    None
}

/// The connector's resolver: the addresses found before it was built.
#[derive(Clone)]
struct Resolved(Vec<SocketAddr>);

impl tower::Service<Name> for Resolved {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(self.0.clone().into_iter()))
    }
}

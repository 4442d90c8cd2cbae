//! In-process OTLP receivers (gRPC and HTTP/protobuf) that record what arrives: the decoded
//! requests, their headers and whether they were compressed. They can be told to reject.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;

/// One export as it arrived.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub signal: &'static str,
    pub headers: BTreeMap<String, String>,
    pub compressed: bool,
}

#[derive(Default)]
struct Recorded {
    metrics: Vec<ExportMetricsServiceRequest>,
    traces: Vec<ExportTraceServiceRequest>,
    arrivals: Vec<Arrival>,
}

#[derive(Clone, Default)]
struct Shared {
    recorded: Arc<Mutex<Recorded>>,
    reject: Arc<AtomicBool>,
    /// Milliseconds the HTTP receiver waits before answering.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Metric exports that arrived at the HTTP receiver, answered or not.
    received: Arc<std::sync::atomic::AtomicUsize>,
    /// TLS receivers: handshakes begun, and those that failed.
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
    failed_handshakes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers.iter().map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect()
}

impl Shared {
    /// Records a gRPC export's arrival, or refuses it while rejecting.
    fn arrive<T>(
        &self,
        signal: &'static str,
        request: &tonic::Request<T>,
    ) -> Result<std::sync::MutexGuard<'_, Recorded>, tonic::Status> {
        if self.reject.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("receiver rejects"));
        }
        let headers = header_map(&request.metadata().clone().into_headers());
        let compressed = headers.get("grpc-encoding").is_some_and(|e| e == "gzip");
        let mut r = self.lock();
        r.arrivals.push(Arrival { signal, headers, compressed });
        Ok(r)
    }
}

#[tonic::async_trait]
impl MetricsService for Shared {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.arrive("metrics", &request)?.metrics.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Shared {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.arrive("traces", &request)?.traces.push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn decompress(headers: &HeaderMap, body: &[u8]) -> Option<Vec<u8>> {
    if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out).ok()?;
        Some(out)
    } else {
        Some(body.to_vec())
    }
}

/// A TLS connection as the gRPC server takes it.
struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Shared {
    /// The TLS handshake of an accepted connection, counted.
    async fn handshake(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        tcp: tokio::net::TcpStream,
    ) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
        match handshake {
            Ok(Ok(tls)) => Some(tls),
            _ => {
                self.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                None
            }
        }
    }
}

impl OtlpReceiver {
    /// gRPC receiver on `addr` (port 0 for any).
    pub async fn grpc(addr: SocketAddr) -> OtlpReceiver {
        Self::grpc_with(addr, None).await
    }

    /// gRPC receiver on `addr` behind TLS with `tls` (ALPN `h2` is added).
    pub async fn grpc_tls(addr: SocketAddr, mut tls: rustls::ServerConfig) -> OtlpReceiver {
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Self::grpc_with(addr, Some(tls)).await
    }

    async fn grpc_with(addr: SocketAddr, tls: Option<rustls::ServerConfig>) -> OtlpReceiver {
        use tonic::codec::CompressionEncoding::Gzip;
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind grpc receiver");
        let addr = listener.local_addr().expect("addr");
        let shared = Shared::default();
        let server = tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(shared.clone()).accept_compressed(Gzip))
            .add_service(TraceServiceServer::new(shared.clone()).accept_compressed(Gzip));
        let task = match tls {
            None => {
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                tokio::spawn(async move {
                    let _ = server.serve_with_incoming(incoming).await;
                })
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
                let state = (listener, acceptor, shared.clone());
                let incoming = futures::stream::unfold(state, |(listener, acceptor, shared)| async move {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else { continue };
                        if let Some(tls) = shared.handshake(&acceptor, tcp).await {
                            return Some((Ok::<_, std::io::Error>(TlsIo(tls)), (listener, acceptor, shared)));
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = server.serve_with_incoming(incoming).await;
                })
            }
        };
        OtlpReceiver { addr, shared, task }
    }

    /// HTTP/protobuf receiver on `addr` (`/v1/metrics`, `/v1/traces`).
    pub async fn http(addr: SocketAddr) -> OtlpReceiver {
        Self::http_with(addr, None).await
    }

    /// HTTP/protobuf receiver on `addr` behind TLS with `tls`.
    pub async fn http_tls(addr: SocketAddr, tls: rustls::ServerConfig) -> OtlpReceiver {
        Self::http_with(addr, Some(tls)).await
    }

    async fn http_with(addr: SocketAddr, tls: Option<rustls::ServerConfig>) -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind http receiver");
        let addr = listener.local_addr().expect("addr");
        let shared = Shared::default();
        let metrics = shared.clone();
        let traces = shared.clone();
        let router = axum::Router::new()
            .route(
                "/v1/metrics",
                post(move |headers: HeaderMap, body: Bytes| async move {
                    metrics.received.fetch_add(1, Ordering::SeqCst);
                    let delay = metrics.delay_ms.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    if metrics.reject.load(Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let Some(raw) = decompress(&headers, &body) else { return StatusCode::BAD_REQUEST };
                    let Ok(request) = ExportMetricsServiceRequest::decode(raw.as_slice()) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let compressed = headers.get("content-encoding").is_some_and(|v| v == "gzip");
                    let mut r = metrics.lock();
                    r.arrivals.push(Arrival { signal: "metrics", headers: header_map(&headers), compressed });
                    r.metrics.push(request);
                    StatusCode::OK
                }),
            )
            .route(
                "/v1/traces",
                post(move |headers: HeaderMap, body: Bytes| async move {
                    if traces.reject.load(Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let Some(raw) = decompress(&headers, &body) else { return StatusCode::BAD_REQUEST };
                    let Ok(request) = ExportTraceServiceRequest::decode(raw.as_slice()) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let compressed = headers.get("content-encoding").is_some_and(|v| v == "gzip");
                    let mut r = traces.lock();
                    r.arrivals.push(Arrival { signal: "traces", headers: header_map(&headers), compressed });
                    r.traces.push(request);
                    StatusCode::OK
                }),
            );
        let acceptor = tls.map(|tls| tokio_rustls::TlsAcceptor::from(Arc::new(tls)));
        let accepting = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let acceptor = acceptor.clone();
                let shared = accepting.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            if let Some(tls) = shared.handshake(&acceptor, stream).await {
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
                            }
                        }
                    }
                });
            }
        });
        OtlpReceiver { addr, shared, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `https://` endpoint, by `host` (the certificate's name) and the receiver's port.
    pub fn tls_endpoint(&self, host: &str) -> String {
        format!("https://{host}:{}", self.addr.port())
    }

    /// TLS handshakes begun so far, and how many of them failed.
    pub fn handshakes(&self) -> (usize, usize) {
        (self.shared.handshakes.load(Ordering::SeqCst), self.shared.failed_handshakes.load(Ordering::SeqCst))
    }

    pub fn set_rejecting(&self, reject: bool) {
        self.shared.reject.store(reject, Ordering::SeqCst);
    }

    /// Metric exports that reached the HTTP receiver so far, including those it still holds.
    pub fn received(&self) -> usize {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// Makes the HTTP receiver answer metric exports only after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn metrics(&self) -> Vec<ExportMetricsServiceRequest> {
        self.shared.lock().metrics.clone()
    }

    pub fn traces(&self) -> Vec<ExportTraceServiceRequest> {
        self.shared.lock().traces.clone()
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.lock().arrivals.clone()
    }

    /// Waits (bounded) until `check` holds for what was received.
    pub async fn wait_for(&self, what: &str, limit: Duration, check: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !check(self) {
            assert!(tokio::time::Instant::now() < deadline, "OTLP receiver: timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

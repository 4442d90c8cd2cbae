//! Probe targets on loopback: plain HTTP answering by path, an HTTPS server with a
//! certificate from a test CA, and a port that refuses connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Paths: `/ok` 200, `/version` 200, `/status/{code}` that code, `/delay/{ms}` 200 after that long,
/// `/slow` 200 after 3 s, `/alwayshappy` 200.
/// `hits` counts requests; `with_token` those that carried an `Authorization` header.
pub fn routes(hits: Arc<AtomicUsize>, with_token: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route("/ok", get(|| async { StatusCode::OK }))
        .route("/alwayshappy", get(|| async { StatusCode::OK }))
        .route("/version", get(|| async { StatusCode::OK }))
        .route(
            "/status/{code}",
            get(|axum::extract::Path(code): axum::extract::Path<u16>| async move {
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
            }),
        )
        .route(
            "/delay/{ms}",
            get(|axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
                StatusCode::OK
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                StatusCode::OK
            }),
        )
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            hits.fetch_add(1, Ordering::SeqCst);
            if req.headers().contains_key(axum::http::header::AUTHORIZATION) {
                with_token.fetch_add(1, Ordering::SeqCst);
            }
            next.run(req)
        }))
}

/// A running target server.
pub struct Target {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Requests that carried an `Authorization` header.
    pub with_token: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Target {
    /// Plain HTTP on `ip`:0.
    pub async fn http(ip: &str) -> Target {
        Self::start(ip, 0, None).await
    }

    /// Plain HTTP on exactly `addr` (several loopback IPs can share one port).
    pub async fn http_at(addr: SocketAddr) -> Target {
        Self::start(&addr.ip().to_string(), addr.port(), None).await
    }

    /// HTTPS on `ip`:0 with a certificate for `127.0.0.1` and `localhost` signed by `ca`.
    pub async fn https(ip: &str, ca: &TestCa) -> Target {
        Self::start(ip, 0, Some(ca.server_config(&["127.0.0.1", "localhost"]))).await
    }

    /// HTTPS on `ip`:0 with a certificate for `names` signed by `ca`.
    pub async fn https_for(ip: &str, ca: &TestCa, names: &[&str]) -> Target {
        Self::start(ip, 0, Some(ca.server_config(names))).await
    }

    async fn start(ip: &str, port: u16, tls: Option<rustls::ServerConfig>) -> Target {
        let listener = TcpListener::bind((ip, port)).await.expect("bind target");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let with_token = Arc::new(AtomicUsize::new(0));
        let router = routes(hits.clone(), with_token.clone());
        let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = TowerToHyperService::new(router.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.timer(TokioTimer::new());
                    match acceptor {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        Target { addr, hits, with_token, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn https_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.addr.port())
    }
}

/// An address on `ip` where nothing listens: connections are refused.
pub async fn refused_addr(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind");
    listener.local_addr().expect("addr")
}

/// A certificate authority for tests.
pub struct TestCa {
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("ca cert");
        TestCa { cert_pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) }
    }

    /// A leaf certificate and key (PEM) for `names`.
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// A server configuration for `names` that requires a client certificate signed by
    /// `clients`.
    pub fn server_config_requiring_clients(&self, names: &[&str], clients: &TestCa) -> rustls::ServerConfig {
        use rustls::pki_types::pem::PemObject;
        let (cert, key) = self.leaf_pem(names);
        let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(clients.cert_pem.as_bytes()).expect("ca"))
            .expect("root");
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().expect("verifier");
        rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .expect("server config")
    }

    pub fn server_config(&self, names: &[&str]) -> rustls::ServerConfig {
        use rustls::pki_types::pem::PemObject;
        let (cert, key) = self.leaf_pem(names);
        let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).expect("server config")
    }
}

/// A peer that accepts connections and never says a word (connections are held until
/// drop): a request sent there, or a TLS handshake begun there, waits forever.
pub struct SilentPeer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SilentPeer {
    pub async fn start(ip: &str) -> SilentPeer {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        SilentPeer { addr, task }
    }
}

/// An address where connecting hangs, as with a dead node whose packets are dropped: a
/// listener with backlog 0 that never accepts, its accept queue filled by connections held
/// here, so the kernel drops every further SYN. Checked at start: it panics if a connection
/// still gets through.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _held: Vec<tokio::net::TcpStream>,
}

impl BlackHole {
    pub async fn start(ip: &str) -> BlackHole {
        Self::start_at(SocketAddr::new(ip.parse().expect("ip"), 0)).await
    }

    /// A black hole on exactly `addr` (port 0: any).
    pub async fn start_at(addr: SocketAddr) -> BlackHole {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
            .expect("socket");
        socket.bind(addr).expect("bind black hole");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut held = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => held.push(stream),
                Ok(Err(e)) => panic!("filling the black hole's queue: {e}"),
                // A connect that hangs: the queue is full and SYNs are dropped.
                Err(_) => return BlackHole { addr, _listener: listener, _held: held },
            }
        }
        panic!("connections to {addr} still get through after {} held ones: no black hole here", held.len());
    }
}

/// A peer that reads the request, sends half a status line and resets the connection.
pub async fn resetting_peer(ip: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(b"HTTP/1.1 200 O").await;
            #[allow(deprecated)] // linger 0 closes at once with a reset, which is the point here
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
    });
    (addr, task)
}

//! Sending one OTLP export request to the collector, over gRPC or HTTP/protobuf, in plain
//! text or TLS, with exactly the settings the agent resolved.
//!
//! The agent sends with its own clients rather than the `opentelemetry-otlp` exporters:
//! those read `OTEL_EXPORTER_OTLP_*` variables again behind the agent's configuration (and
//! merge the headers of both), and their HTTP client honours `HTTP(S)_PROXY`. Here nothing
//! comes from the environment: no proxy is used, the trust is the agent's (rustls, re-read
//! when the files change), and the request carries the configured headers and nothing else.
//! A failed export is not retried; the next interval sends the cumulative state again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, USER_AGENT};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use rustls::ClientConfig;

use crate::config::otel::{Compression, Protocol, SignalExport};
use crate::error_text::chain;

const AGENT: &str = concat!("kubenurse/", env!("CARGO_PKG_VERSION"));

/// The largest collector answer read (its body is not used beyond the status).
const MAX_ANSWER: usize = 64 * 1024;

/// One export request.
pub enum Payload {
    Metrics(ExportMetricsServiceRequest),
    Traces(ExportTraceServiceRequest),
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid endpoint: {0}")]
    Endpoint(String),
    #[error("header {0:?} is not a valid header")]
    Header(String),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
}

/// Sends requests to one collector endpoint; cheap to clone.
#[derive(Clone)]
pub struct Client(Arc<Inner>);

struct Inner {
    transport: Transport,
    headers: HeaderMap,
    gzip: bool,
    timeout: Duration,
    /// Exports are driven by the SDK's own threads; the I/O runs on the agent's runtime.
    runtime: tokio::runtime::Handle,
}

enum Transport {
    Grpc(tonic::transport::Channel),
    Http { client: Box<HttpClient>, uri: http::Uri },
}

type HttpClient = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

impl Client {
    /// A client for `export`; `tls` for an `https://` endpoint. Must run inside the Tokio
    /// runtime, which then carries every export.
    pub fn new(export: &SignalExport, tls: Option<ClientConfig>) -> Result<Self, BuildError> {
        let mut connect = HttpConnector::new();
        connect.enforce_http(false);
        connect.set_nodelay(true);
        connect.set_connect_timeout(Some(export.timeout));
        // An `http://` endpoint never reaches the TLS half, which then needs no trust.
        let tls = match tls {
            Some(tls) => tls,
            None => ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        };
        let connector = HttpsConnector::from((connect, tls));
        let transport = match export.protocol {
            Protocol::Grpc => {
                let endpoint = tonic::transport::Endpoint::from_shared(export.endpoint.clone())
                    .and_then(|e| e.user_agent(AGENT))
                    .map_err(|e| BuildError::Endpoint(e.to_string()))?
                    .timeout(export.timeout);
                Transport::Grpc(endpoint.connect_with_connector_lazy(connector))
            }
            Protocol::HttpProtobuf => {
                let uri =
                    export.endpoint.parse().map_err(|e: http::uri::InvalidUri| BuildError::Endpoint(e.to_string()))?;
                let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build(connector);
                Transport::Http { client: Box::new(client), uri }
            }
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &export.headers {
            // Checked when the configuration was validated.
            let invalid = || BuildError::Header(name.clone());
            let value = HeaderValue::from_str(value).map_err(|_| invalid())?;
            headers.insert(HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| invalid())?, value);
        }
        Ok(Self(Arc::new(Inner {
            transport,
            headers,
            gzip: export.compression == Compression::Gzip,
            timeout: export.timeout,
            runtime: tokio::runtime::Handle::current(),
        })))
    }

    /// Sends `payload` within the export deadline.
    pub async fn send(&self, payload: Payload) -> Result<(), String> {
        let inner = self.0.clone();
        let timeout = inner.timeout;
        let sent = self.0.runtime.spawn(async move {
            match tokio::time::timeout(timeout, inner.send(payload)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        });
        sent.await.map_err(|e| format!("export task failed: {e}"))?
    }
}

impl Inner {
    async fn send(&self, payload: Payload) -> Result<(), String> {
        match &self.transport {
            Transport::Grpc(channel) => self.grpc(channel.clone(), payload).await,
            Transport::Http { client, uri } => self.http(client, uri, payload).await,
        }
    }

    async fn grpc(&self, channel: tonic::transport::Channel, payload: Payload) -> Result<(), String> {
        use tonic::codec::CompressionEncoding::Gzip;
        let metadata = tonic::metadata::MetadataMap::from_headers(self.headers.clone());
        let result = match payload {
            Payload::Metrics(message) => {
                let mut client = MetricsServiceClient::new(channel);
                if self.gzip {
                    client = client.send_compressed(Gzip);
                }
                client.export(self.request(message, metadata)).await.map(drop)
            }
            Payload::Traces(message) => {
                let mut client = TraceServiceClient::new(channel);
                if self.gzip {
                    client = client.send_compressed(Gzip);
                }
                client.export(self.request(message, metadata)).await.map(drop)
            }
        };
        result.map_err(|status| {
            // A transport failure's message already names its cause.
            let cause = match std::error::Error::source(&status) {
                Some(source) if status.message().is_empty() => chain(source),
                _ => status.message().to_owned(),
            };
            explain(format!("gRPC status {:?}: {cause}", status.code()))
        })
    }

    fn request<T>(&self, message: T, metadata: tonic::metadata::MetadataMap) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = metadata;
        request.set_timeout(self.timeout);
        request
    }

    async fn http(&self, client: &HttpClient, uri: &http::Uri, payload: Payload) -> Result<(), String> {
        let mut body = match payload {
            Payload::Metrics(message) => message.encode_to_vec(),
            Payload::Traces(message) => message.encode_to_vec(),
        };
        let mut request = http::Request::post(uri.clone());
        if let Some(headers) = request.headers_mut() {
            headers.extend(self.headers.clone());
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
            headers.entry(USER_AGENT).or_insert(HeaderValue::from_static(AGENT));
            if self.gzip {
                headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
        }
        if self.gzip {
            body = gzip(&body).map_err(|e| format!("compressing the export: {e}"))?;
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
        let answer = client.request(request).await.map_err(|e| explain(chain(&e)))?;
        let status = answer.status();
        // Read the (small) answer so that the connection can be reused.
        let _ = Limited::new(answer.into_body(), MAX_ANSWER).collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("collector answered HTTP {status}"))
        }
    }
}

/// Adds what to check to the TLS failures an operator can fix.
fn explain(mut error: String) -> String {
    if error.contains("UnknownIssuer") || error.contains("BadSignature") {
        error.push_str(" (the collector's certificate is not signed by a CA in OTEL_EXPORTER_OTLP_CERTIFICATE, or in the system roots when that is unset)");
    } else if error.contains("NotValidForName") {
        error.push_str(" (the endpoint's host name is not in the collector's certificate)");
    } else if error.contains("CertificateRequired") || error.contains("certificate required") {
        error.push_str(" (the collector requires a client certificate: OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY)");
    }
    error
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data)?;
    encoder.finish()
}

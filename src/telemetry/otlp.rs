//! OTLP exporters for metrics and traces, built from the resolved configuration, wrapped so
//! that a collector that is down, slow or rejecting is reported in a few log lines, not one
//! per interval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, Temporality};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData};
use opentelemetry_sdk::Resource;

use crate::config::otel::{Compression, OtelConfig, Protocol, Signal, SignalExport, TemporalityPreference};
use crate::ratelimit::FailureStreak;
use crate::sync::lock;

/// The reader that pushes metrics.
pub type PushReader = PeriodicReader<Logged<MetricExporter>>;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP {signal} exporter for {endpoint}: {source}")]
    Build { signal: &'static str, endpoint: String, source: opentelemetry_otlp::ExporterBuildError },
    #[error("OTLP header {0:?} is not a valid header")]
    Header(String),
}

/// Builds an OTLP exporter (metric or span builder) for `export`'s protocol, endpoint,
/// deadline, headers and compression.
macro_rules! build_exporter {
    ($builder:expr, $export:expr) => {{
        let export: &SignalExport = $export;
        let gzip = export.compression == Compression::Gzip;
        match export.protocol {
            Protocol::Grpc => {
                let b = $builder.with_tonic().with_endpoint(&export.endpoint).with_timeout(export.timeout);
                let b = b.with_metadata(metadata(export)?);
                if gzip {
                    b.with_compression(opentelemetry_otlp::Compression::Gzip).build()
                } else {
                    b.build()
                }
            }
            Protocol::HttpProtobuf => {
                let b = $builder
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(&export.endpoint)
                    .with_timeout(export.timeout)
                    .with_headers(headers(export));
                if gzip {
                    b.with_compression(opentelemetry_otlp::Compression::Gzip).build()
                } else {
                    b.build()
                }
            }
        }
    }};
}

/// The metric push reader, when metrics are pushed. Must run inside the Tokio runtime (gRPC).
pub fn metric_reader(config: &OtelConfig) -> Result<Option<PushReader>, TelemetryError> {
    let Some(export) = config.signal(Signal::Metrics) else { return Ok(None) };
    let temporality = match config.temporality {
        TemporalityPreference::Cumulative => Temporality::Cumulative,
        TemporalityPreference::Delta => Temporality::Delta,
        TemporalityPreference::LowMemory => Temporality::LowMemory,
    };
    let built = build_exporter!(MetricExporter::builder().with_temporality(temporality), &export);
    let exporter = built.map_err(|source| TelemetryError::Build {
        signal: "metrics",
        endpoint: export.endpoint.clone(),
        source,
    })?;
    tracing::info!(endpoint = %export.endpoint, protocol = ?export.protocol, interval = ?config.metric_export_interval, "pushing metrics over OTLP");
    let exporter = Logged::new(exporter, "metrics");
    Ok(Some(PeriodicReader::builder(exporter).with_interval(config.metric_export_interval).build()))
}

/// The tracer provider for slow-probe spans, when traces are exported.
pub fn tracer_provider(config: &OtelConfig, resource: Resource) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(export) = config.signal(Signal::Traces) else { return Ok(None) };
    let built = build_exporter!(SpanExporter::builder(), &export);
    let exporter = built.map_err(|source| TelemetryError::Build {
        signal: "traces",
        endpoint: export.endpoint.clone(),
        source,
    })?;
    tracing::info!(endpoint = %export.endpoint, protocol = ?export.protocol, "exporting slow-probe spans over OTLP");
    // The batch processor's queue is bounded (2,048 spans): a collector that is away drops
    // spans instead of growing memory.
    let processor = BatchSpanProcessor::builder(Logged::new(exporter, "traces")).build();
    Ok(Some(SdkTracerProvider::builder().with_resource(resource).with_span_processor(processor).build()))
}

fn headers(export: &SignalExport) -> HashMap<String, String> {
    export.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn metadata(export: &SignalExport) -> Result<opentelemetry_otlp::tonic_types::metadata::MetadataMap, TelemetryError> {
    let mut map = http::HeaderMap::new();
    for (k, v) in &export.headers {
        let name = http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
            .map_err(|_| TelemetryError::Header(k.clone()))?;
        let value = http::HeaderValue::from_str(v).map_err(|_| TelemetryError::Header(k.clone()))?;
        map.insert(name, value);
    }
    Ok(opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(map))
}

/// How often a continuing export failure is reported again.
const REPEAT_EVERY: Duration = Duration::from_secs(300);

/// Wraps an exporter and reports failures: the first of a streak at once, then a summary at
/// most every five minutes, and the recovery.
pub struct Logged<E> {
    inner: E,
    signal: &'static str,
    streak: Mutex<FailureStreak>,
}

impl<E> Logged<E> {
    fn new(inner: E, signal: &'static str) -> Self {
        Self { inner, signal, streak: Mutex::new(FailureStreak::new(REPEAT_EVERY)) }
    }

    fn note(&self, result: &OTelSdkResult) {
        let now = Instant::now();
        let mut streak = lock(&self.streak);
        match result {
            Ok(()) => {
                if let Some(recovery) = streak.succeeded(now) {
                    tracing::info!(signal = self.signal, failed_exports = recovery.failures, after = ?recovery.after, "OTLP export recovered");
                }
            }
            Err(e) => {
                if let Some(report) = streak.failed(now) {
                    tracing::warn!(
                        signal = self.signal,
                        failed_exports = report.failures,
                        error = %e,
                        "OTLP export failed; probing and /metrics are unaffected, retrying every interval (next report in 5 minutes at most)"
                    );
                }
            }
        }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Logged<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        self.note(&result);
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter for Logged<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.note(&result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E> std::fmt::Debug for Logged<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logged").field("signal", &self.signal).finish()
    }
}

//! OTLP exporters for metrics and traces, built from the resolved configuration, wrapped so
//! that a collector that is down, slow or rejecting is reported in a few log lines, not one
//! per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, Temporality};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanLimits,
};
use opentelemetry_sdk::Resource;

use crate::config::otel::{Compression, OtelConfig, Protocol, Signal, SignalExport, TemporalityPreference};
use crate::ratelimit::FailureStreak;
use crate::sync::lock;

/// The reader that pushes metrics.
pub type PushReader = PeriodicReader<SharedExporter<Logged<MetricExporter>>>;

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

/// Makes the metric push readers: one per metrics generation (see `metrics`), so that the
/// series of departed neighbours leave the push too. They share one exporter, and so one
/// connection to the collector and one failure log, for the agent's whole life.
pub struct MetricPush {
    exporter: Arc<Logged<MetricExporter>>,
    interval: Duration,
}

impl MetricPush {
    /// A new reader on the shared exporter.
    pub fn reader(&self) -> PushReader {
        PeriodicReader::builder(SharedExporter(self.exporter.clone())).with_interval(self.interval).build()
    }
}

/// The metric push, when metrics are pushed. Must run inside the Tokio runtime (gRPC).
pub fn metric_push(config: &OtelConfig) -> Result<Option<MetricPush>, TelemetryError> {
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
    let exporter = Arc::new(Logged::new(exporter, "metrics"));
    Ok(Some(MetricPush { exporter, interval: config.metric_export_interval }))
}

/// The exporter as one generation's reader holds it. When that reader shuts down (its
/// generation replaced, or the agent stopping) it pushes its last interval; the exporter
/// stays open for the next generation and goes with the process.
#[derive(Debug)]
pub struct SharedExporter<E>(Arc<E>);

impl<E: PushMetricExporter> PushMetricExporter for SharedExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        self.0.export(metrics).await
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        self.0.temporality()
    }
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
    // Every setting is given here, so the SDK's own reading of OTEL_BSP_* and
    // OTEL_TRACES_SAMPLER cannot change what the agent's configuration says.
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(2_048)
        .with_max_export_batch_size(512)
        .with_scheduled_delay(Duration::from_secs(5))
        .build();
    let processor = BatchSpanProcessor::builder(Logged::new(exporter, "traces")).with_batch_config(batch).build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOn)
            .with_span_limits(SpanLimits::default())
            .with_resource(resource)
            .with_span_processor(processor)
            .build(),
    ))
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

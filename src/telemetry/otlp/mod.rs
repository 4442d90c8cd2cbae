//! OTLP exporters for metrics and traces, built from the resolved configuration alone, wrapped so
//! that a collector that is down, slow or rejecting is reported in a few log lines, not one
//! per interval.

mod transport;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, Temporality};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanLimits,
};
use opentelemetry_sdk::Resource;

use crate::config::otel::{OtelConfig, Protocol, Signal, SignalExport, TemporalityPreference};
use crate::config::ConfigError;
use crate::ratelimit::FailureStreak;
use crate::sync::lock;
use crate::tls::Reloader;
use transport::{Client, Payload};

/// The reader that pushes metrics.
pub type PushReader = PeriodicReader<SharedExporter<Logged<MetricExporter>>>;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP {signal} exporter for {endpoint}: {source}")]
    Build { signal: &'static str, endpoint: String, source: transport::BuildError },
    /// Operator input is at fault: a value or a file.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The OTLP client of `signal`, when it is exported: its TLS files are loaded (and watched by
/// `reloader`) here.
fn client(
    config: &OtelConfig,
    signal: Signal,
    reloader: &mut Reloader,
) -> Result<Option<(SignalExport, Client)>, TelemetryError> {
    let Some(export) = config.signal(signal)? else { return Ok(None) };
    let tls = match &export.tls {
        Some(tls) => {
            let alpn: &[u8] = if export.protocol == Protocol::Grpc { b"h2" } else { b"http/1.1" };
            let config = crate::tls::otlp_client_config(&format!("OTLP {}", signal.name()), tls, alpn, reloader)
                .map_err(|e| {
                    // Name the variable of the file at fault.
                    let files = tls.certificate.iter().chain(tls.client.iter().flat_map(|(c, k)| [c, k]));
                    let file = files.clone().find(|f| Some(f.path.as_path()) == e.path()).or(files.clone().next());
                    match file {
                        Some(f) => ConfigError::new(&f.variable, f.path.display().to_string(), e.to_string()),
                        None => ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", export.endpoint.clone(), e.to_string()),
                    }
                })?;
            Some(config)
        }
        None => None,
    };
    let client = Client::new(&export, tls).map_err(|source| TelemetryError::Build {
        signal: signal.name(),
        endpoint: export.endpoint.clone(),
        source,
    })?;
    Ok(Some((export, client)))
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

/// The metric push, when metrics are pushed. Must run inside the Tokio runtime, which then
/// carries every export.
pub fn metric_push(config: &OtelConfig, reloader: &mut Reloader) -> Result<Option<MetricPush>, TelemetryError> {
    let Some((export, client)) = client(config, Signal::Metrics, reloader)? else { return Ok(None) };
    let temporality = match config.temporality {
        TemporalityPreference::Cumulative => Temporality::Cumulative,
        TemporalityPreference::Delta => Temporality::Delta,
        TemporalityPreference::LowMemory => Temporality::LowMemory,
    };
    tracing::info!(endpoint = %export.endpoint, protocol = ?export.protocol, interval = ?config.metric_export_interval, "pushing metrics over OTLP");
    let exporter = Arc::new(Logged::new(MetricExporter { client, temporality }, "metrics"));
    Ok(Some(MetricPush { exporter, interval: config.metric_export_interval }))
}

/// Sends metric exports to the collector.
pub struct MetricExporter {
    client: Client,
    temporality: Temporality,
}

impl PushMetricExporter for MetricExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let request = ExportMetricsServiceRequest::from(metrics);
        self.client.send(Payload::Metrics(request)).await.map_err(OTelSdkError::InternalFailure)
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        self.temporality
    }
}

/// Sends span batches to the collector.
struct SpanExporter {
    client: Client,
    resource: ResourceAttributesWithSchema,
}

impl opentelemetry_sdk::trace::SpanExporter for SpanExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let request =
            ExportTraceServiceRequest { resource_spans: group_spans_by_resource_and_scope(batch, &self.resource) };
        self.client.send(Payload::Traces(request)).await.map_err(OTelSdkError::InternalFailure)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.into();
    }
}

impl std::fmt::Debug for SpanExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanExporter").finish()
    }
}

impl std::fmt::Debug for MetricExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricExporter").field("temporality", &self.temporality).finish()
    }
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
pub fn tracer_provider(
    config: &OtelConfig,
    resource: Resource,
    reloader: &mut Reloader,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some((export, client)) = client(config, Signal::Traces, reloader)? else { return Ok(None) };
    tracing::info!(endpoint = %export.endpoint, protocol = ?export.protocol, "exporting slow-probe spans over OTLP");
    let exporter = SpanExporter { client, resource: (&resource).into() };
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

//! Every instrument the agent records, created once on one meter provider.
//!
//! Instrument names and units are chosen so that the standard OpenTelemetry → Prometheus
//! translation (unit suffix, `_total` on counters) yields exactly the Go agent's names.
//! The Prometheus reader renders `/metrics` from the same provider that pushes over OTLP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _, ObservableGauge};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, TextEncoder};

use crate::incoming::IncomingChecks;
use crate::phase::ProbeResult;

/// OpenTelemetry instrument names; the Prometheus names are these plus the unit suffix.
pub mod names {
    pub const REQUEST_DURATION: &str = "kubenurse_httpclient_request_duration";
    pub const TRACE_REQUEST_DURATION: &str = "kubenurse_httpclient_trace_request_duration";
    pub const REQUESTS: &str = "kubenurse_httpclient_requests";
    pub const ERRORS: &str = "kubenurse_errors";
    pub const INCOMING_CHECKS: &str = "kubenurse_neighbourhood_incoming_checks";
    pub const ROUND_LATENESS: &str = "kubenurse_round_lateness";
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot build the prometheus reader: {0}")]
    Reader(String),
    #[error("cannot render metrics: {0}")]
    Render(#[from] prometheus::Error),
}

/// The agent's instruments and its Prometheus registry.
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    request_duration: Histogram<f64>,
    trace_duration: Histogram<f64>,
    requests: Counter<u64>,
    errors: Counter<u64>,
    round_lateness: Histogram<f64>,
    _incoming: ObservableGauge<u64>,
}

impl Metrics {
    /// Builds the meter provider with the Prometheus reader and creates every instrument.
    pub fn new(buckets: Vec<f64>, resource: Resource, incoming: Arc<IncomingChecks>) -> Result<Self, MetricsError> {
        let registry = prometheus::Registry::new();
        let reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| MetricsError::Reader(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_resource(resource).with_reader(reader).build();
        let meter = provider.meter("kubenurse");

        let request_duration = meter
            .f64_histogram(names::REQUEST_DURATION)
            .with_unit("s")
            .with_description("duration of the whole request, from start to the response headers")
            .with_boundaries(buckets.clone())
            .build();
        let trace_duration = meter
            .f64_histogram(names::TRACE_REQUEST_DURATION)
            .with_unit("s")
            .with_description("time from the request start until each request event")
            .with_boundaries(buckets.clone())
            .build();
        let requests = meter
            .u64_counter(names::REQUESTS)
            .with_description("probe requests by probe type and HTTP status (or round_trip_error)")
            .build();
        let errors = meter
            .u64_counter(names::ERRORS)
            .with_description("failed probes by probe type and the phase that failed")
            .build();
        let round_lateness = meter
            .f64_histogram(names::ROUND_LATENESS)
            .with_unit("s")
            .with_description("how late a probe round started against its schedule")
            .with_boundaries(buckets)
            .build();
        let incoming = meter
            .u64_observable_gauge(names::INCOMING_CHECKS)
            .with_description("distinct neighbours that probed this agent in the last 60 seconds")
            .with_callback(move |gauge| gauge.observe(incoming.count(Instant::now()) as u64, &[]))
            .build();

        Ok(Self {
            provider,
            registry,
            request_duration,
            trace_duration,
            requests,
            errors,
            round_lateness,
            _incoming: incoming,
        })
    }

    /// Records one probe: its events, its duration, its status and, if it failed, the phase.
    pub fn record_probe(&self, result: &ProbeResult) {
        let kind = KeyValue::new("type", result.target.kind.clone());
        for (event, offset) in &result.events {
            self.trace_duration.record(offset.as_secs_f64(), &[kind.clone(), KeyValue::new("event", event.label())]);
        }
        if let Some(duration) = result.response_after {
            self.request_duration.record(duration.as_secs_f64(), std::slice::from_ref(&kind));
        }
        self.requests.add(1, &[kind.clone(), KeyValue::new("code", result.code_label())]);
        if let Some(event) = result.error_event() {
            self.errors.add(1, &[kind, KeyValue::new("event", event)]);
        }
    }

    /// Records how late a round started.
    pub fn record_round_lateness(&self, lateness: Duration) {
        self.round_lateness.record(lateness.as_secs_f64(), &[]);
    }

    /// The Prometheus text exposition of every instrument.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The meter provider, for readers added by the telemetry set-up.
    pub fn provider(&self) -> &SdkMeterProvider {
        &self.provider
    }

    /// Flushes and stops every reader.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "meter provider shutdown");
        }
    }
}

//! Slow-path spans: a probe slower than the threshold, or failed, becomes one span that
//! starts and ends at the probe's own instants, with one event per phase. Fast healthy probes
//! produce nothing, so a healthy cluster sends no trace volume.

use std::time::Duration;

use opentelemetry::trace::{Span, SpanKind, Status, Tracer, TracerProvider};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::phase::{Outcome, ProbeResult};

pub struct ProbeSpans {
    tracer: SdkTracer,
    threshold: Duration,
}

impl ProbeSpans {
    pub fn new(provider: &SdkTracerProvider, threshold: Duration) -> Self {
        Self { tracer: provider.tracer("kubenurse"), threshold }
    }

    /// Exports `result` as a span if it was slow or failed.
    pub fn record(&self, result: &ProbeResult) {
        if result.is_ok() && result.elapsed <= self.threshold {
            return;
        }
        let target = &result.target;
        let mut attributes = vec![
            KeyValue::new("kubenurse.probe.type", target.kind.clone()),
            KeyValue::new("server.address", target.url.host().unwrap_or_default().to_owned()),
            KeyValue::new("url.full", target.url.to_string()),
            KeyValue::new("http.request.method", "GET"),
        ];
        if let Some(port) = target.url.port_u16() {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        if let Some(peer) = &target.peer {
            attributes.push(KeyValue::new("kubenurse.peer.node", peer.node.clone()));
            attributes.push(KeyValue::new("kubenurse.peer.pod", peer.pod.clone()));
        }
        match &result.outcome {
            Outcome::Response { status } => {
                attributes.push(KeyValue::new("http.response.status_code", i64::from(*status)))
            }
            Outcome::Failed { phase, .. } => {
                attributes.push(KeyValue::new("kubenurse.failed_phase", phase.label()));
                attributes.push(KeyValue::new("error.type", phase.label()));
            }
        }
        if let Some(event) = result.error_event() {
            attributes.push(KeyValue::new("kubenurse.error_event", event));
        }
        let start = result.started_at;
        let mut span = self
            .tracer
            .span_builder(format!("probe {}", target.kind))
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attributes)
            .start(&self.tracer);
        for (event, offset) in &result.events {
            span.add_event_with_timestamp(event.label(), start + *offset, Vec::new());
        }
        if !result.is_ok() {
            span.set_status(Status::error(result.summary()));
        }
        span.end_with_timestamp(start + result.elapsed);
    }
}

//! Every instrument the agent records, created once on one meter provider.
//!
//! Instrument names and units are chosen so that the standard OpenTelemetry → Prometheus
//! translation (unit suffix, `_total` on counters) yields exactly the Go agent's names.
//! The Prometheus reader renders `/metrics` from the same provider that pushes over OTLP.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _, ObservableGauge};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{Aggregation, Instrument, InstrumentKind, SdkMeterProvider, Stream};
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, TextEncoder};

use crate::incoming::IncomingChecks;
use crate::probe::ProbeResult;
use crate::telemetry::PushReader;

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
///
/// Normally one meter provider carries both readers (Prometheus pull, OTLP push). When OTLP
/// histograms are exponential, a second provider with that view feeds the push reader, since
/// views apply to a whole provider and the Prometheus reader drops exponential histograms;
/// every measurement is then recorded twice.
pub struct Metrics {
    providers: Vec<SdkMeterProvider>,
    registry: prometheus::Registry,
    instruments: Vec<Instruments>,
    /// Bumped by every recording, so a cached `/metrics` text is known to be current.
    recorded: AtomicU64,
    rendered: Mutex<Option<Rendered>>,
    /// Rendered texts still referenced (by the cache or by responses being written).
    live_renders: Arc<AtomicUsize>,
}

/// A `/metrics` text shared by every request that asks while it is current.
struct Rendered {
    recorded: u64,
    at: Instant,
    text: Bytes,
}

/// How long a rendered text is served again when nothing was recorded since.
const RENDER_REUSE: Duration = Duration::from_secs(1);

/// Rendered texts that may be alive at once. Clients that do not read pin the text they
/// asked for until the write timeout; beyond this many, requests get the latest text even
/// if it is not current, so such clients cannot multiply the memory of large expositions.
const MAX_LIVE_RENDERS: usize = 4;

struct Instruments {
    request_duration: Histogram<f64>,
    trace_duration: Histogram<f64>,
    requests: Counter<u64>,
    errors: Counter<u64>,
    round_lateness: Histogram<f64>,
    _incoming: ObservableGauge<u64>,
}

/// OTLP push settings for [`Metrics::new`].
pub struct Push {
    pub reader: PushReader,
    pub exponential_histograms: bool,
}

impl Metrics {
    /// Builds the meter provider(s) with their readers, then every instrument.
    pub fn new(
        buckets: Vec<f64>,
        resource: Resource,
        incoming: Arc<IncomingChecks>,
        push: Option<Push>,
    ) -> Result<Self, MetricsError> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| MetricsError::Reader(e.to_string()))?;
        let mut main = SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(prometheus);
        let mut providers = Vec::new();
        match push {
            Some(Push { reader, exponential_histograms: false }) => main = main.with_reader(reader),
            Some(Push { reader, exponential_histograms: true }) => providers.push(
                SdkMeterProvider::builder().with_resource(resource).with_reader(reader).with_view(exponential).build(),
            ),
            None => {}
        }
        providers.insert(0, main.build());
        let instruments =
            providers.iter().map(|p| Instruments::new(&p.meter("kubenurse"), &buckets, incoming.clone())).collect();
        Ok(Self {
            providers,
            registry,
            instruments,
            recorded: AtomicU64::new(0),
            rendered: Mutex::default(),
            live_renders: Arc::default(),
        })
    }

    /// Records one probe: its events, its duration, its status and, if it failed, the phase.
    pub fn record_probe(&self, result: &ProbeResult) {
        self.recorded.fetch_add(1, Ordering::SeqCst);
        let kind = KeyValue::new("type", result.target.kind.clone());
        let code = KeyValue::new("code", result.code_label());
        let error = result.error_event().map(|e| KeyValue::new("event", e));
        for i in &self.instruments {
            for (event, offset) in &result.events {
                i.trace_duration.record(offset.as_secs_f64(), &[kind.clone(), KeyValue::new("event", event.label())]);
            }
            if let Some(duration) = result.response_after {
                i.request_duration.record(duration.as_secs_f64(), std::slice::from_ref(&kind));
            }
            i.requests.add(1, &[kind.clone(), code.clone()]);
            if let Some(event) = &error {
                i.errors.add(1, &[kind.clone(), event.clone()]);
            }
        }
    }

    /// Records how late a round started.
    pub fn record_round_lateness(&self, lateness: Duration) {
        self.recorded.fetch_add(1, Ordering::SeqCst);
        for i in &self.instruments {
            i.round_lateness.record(lateness.as_secs_f64(), &[]);
        }
    }

    /// The Prometheus text exposition of every instrument.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The Prometheus text exposition for `/metrics`: rendered once and shared by concurrent
    /// requests while nothing new is recorded (for at most [`RENDER_REUSE`]), and never more
    /// than [`MAX_LIVE_RENDERS`] distinct texts alive at once.
    pub fn render_shared(&self) -> Result<Bytes, MetricsError> {
        // Rendering under the lock makes concurrent requests wait for one render instead of
        // each making its own.
        let mut rendered = crate::sync::lock(&self.rendered);
        let recorded = self.recorded.load(Ordering::SeqCst);
        if let Some(r) = rendered.as_ref() {
            let current = r.recorded == recorded && r.at.elapsed() < RENDER_REUSE;
            if current || self.live_renders.load(Ordering::SeqCst) >= MAX_LIVE_RENDERS {
                return Ok(r.text.clone());
            }
        }
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        self.live_renders.fetch_add(1, Ordering::SeqCst);
        let text = Bytes::from_owner(Counted { bytes: out, live: self.live_renders.clone() });
        *rendered = Some(Rendered { recorded, at: Instant::now(), text: text.clone() });
        Ok(text)
    }

    /// Pushes what has been recorded and stops every reader (blocking, bounded by the
    /// exporters' timeouts).
    pub fn shutdown(&self) {
        for provider in &self.providers {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "final metric export failed");
            }
        }
    }
}

/// A rendered text that counts itself among the live ones until its last reference goes.
struct Counted {
    bytes: Vec<u8>,
    live: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The view of the push-only provider: histograms become base-2 exponential.
fn exponential(instrument: &Instrument) -> Option<Stream> {
    if instrument.kind() != InstrumentKind::Histogram {
        return None;
    }
    let aggregation = Aggregation::Base2ExponentialHistogram { max_size: 160, max_scale: 20, record_min_max: true };
    Stream::builder().with_aggregation(aggregation).build().ok()
}

impl Instruments {
    fn new(meter: &Meter, buckets: &[f64], incoming: Arc<IncomingChecks>) -> Self {
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        Self {
            request_duration: histogram(
                names::REQUEST_DURATION,
                "duration of the whole request, from start to the response headers",
            ),
            trace_duration: histogram(
                names::TRACE_REQUEST_DURATION,
                "time from the request start until each request event",
            ),
            round_lateness: histogram(names::ROUND_LATENESS, "how late a probe round started against its schedule"),
            requests: meter
                .u64_counter(names::REQUESTS)
                .with_description("probe requests by probe type and HTTP status (or round_trip_error)")
                .build(),
            errors: meter
                .u64_counter(names::ERRORS)
                .with_description("failed probes by probe type and the phase that failed")
                .build(),
            _incoming: meter
                .u64_observable_gauge(names::INCOMING_CHECKS)
                .with_description("distinct neighbours that probed this agent in the last 60 seconds")
                .with_callback(move |gauge| gauge.observe(incoming.count(Instant::now()) as u64, &[]))
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        let resource = Resource::builder_empty().build();
        Metrics::new(crate::config::DEFAULT_BUCKETS.to_vec(), resource, Arc::default(), None).expect("metrics")
    }

    #[test]
    fn concurrent_requests_share_one_render_until_something_is_recorded() {
        let metrics = metrics();
        metrics.record_round_lateness(Duration::from_millis(1));
        let first = metrics.render_shared().expect("render");
        let again = metrics.render_shared().expect("render");
        assert_eq!(first.as_ptr(), again.as_ptr(), "the same buffer, not a copy");
        metrics.record_round_lateness(Duration::from_millis(2));
        let fresh = metrics.render_shared().expect("render");
        assert_ne!(fresh.as_ptr(), first.as_ptr(), "a recording makes the next render current");
        assert!(String::from_utf8_lossy(&fresh).contains("kubenurse_round_lateness_seconds_count 2"));
    }

    #[test]
    fn clients_holding_renders_cannot_multiply_them() {
        let metrics = metrics();
        let mut held = Vec::new();
        for i in 0..10 {
            metrics.record_round_lateness(Duration::from_millis(i));
            held.push(metrics.render_shared().expect("render"));
        }
        let distinct: std::collections::BTreeSet<_> = held.iter().map(|b| b.as_ptr()).collect();
        assert_eq!(distinct.len(), MAX_LIVE_RENDERS, "beyond the bound, the latest text is shared");
        // Once the clients let go, renders are current again.
        held.clear();
        metrics.record_round_lateness(Duration::from_millis(11));
        let text = metrics.render_shared().expect("render");
        assert!(String::from_utf8_lossy(&text).contains("kubenurse_round_lateness_seconds_count 11"));
    }
}

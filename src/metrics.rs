//! Every instrument the agent records, on one meter provider that feeds both readers.
//!
//! Instrument names and units are chosen so that the standard OpenTelemetry → Prometheus
//! translation (unit suffix, `_total` on counters) yields exactly the Go agent's names.
//! The Prometheus reader renders `/metrics` from the same provider that pushes over OTLP.
//!
//! **Departed series.** The OpenTelemetry SDK cannot forget one attribute set of a
//! synchronous instrument, histograms have no asynchronous form, and the `/metrics` reader is
//! cumulative, so the series of a neighbour that left would stay until the agent restarts.
//! The instruments therefore live in a generation (providers, readers, registry): when
//! probe types recorded in the current one are no longer probed and it is at least
//! `KUBENURSE_SERIES_RESET_INTERVAL` old, a fresh generation takes its place. Every series
//! then restarts, as after an agent restart (which `rate()`, `increase()` and OTLP start
//! times handle), and the old generation is shut down, its last push flushed, on a blocking
//! thread. A neighbour still probed, even failing, is not departed.
//!
//! **Overflow.** The SDK folds attribute sets beyond [`SERIES_LIMIT`] per instrument into one
//! `otel_metric_overflow="true"` series without a word; the agent counts the sets itself,
//! logs once per instrument and generation, and counts what overflows in
//! `kubenurse_metric_overflow_total`.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _, ObservableGauge};
use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::metrics::{Aggregation, Instrument, InstrumentKind, SdkMeterProvider, Stream};
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, TextEncoder};

use crate::config::MetricsDetail;
use crate::incoming::IncomingChecks;
use crate::probe::ProbeResult;
use crate::sync::lock;
use crate::telemetry::PushReader;

/// OpenTelemetry instrument names; the Prometheus names are these plus the unit suffix.
pub mod names {
    pub const REQUEST_DURATION: &str = "kubenurse_httpclient_request_duration";
    pub const TRACE_REQUEST_DURATION: &str = "kubenurse_httpclient_trace_request_duration";
    pub const REQUESTS: &str = "kubenurse_httpclient_requests";
    pub const ERRORS: &str = "kubenurse_errors";
    pub const INCOMING_CHECKS: &str = "kubenurse_neighbourhood_incoming_checks";
    pub const BUILD_INFO: &str = "kubenurse_build_info";
    pub const ROUND_LATENESS: &str = "kubenurse_round_lateness";
    pub const METRIC_OVERFLOW: &str = "kubenurse_metric_overflow";
    pub const ZONE_REQUEST_DURATION: &str = "kubenurse_zone_request_duration";
    pub const ZONE_REQUESTS: &str = "kubenurse_zone_requests";
    pub const ZONE_ERRORS: &str = "kubenurse_zone_errors";
}

/// The resource attribute of the own zone (OpenTelemetry semantic conventions).
pub const ZONE_ATTRIBUTE: &str = "cloud.availability_zone";

/// Attribute sets the SDK keeps per instrument (its default cardinality limit, see
/// `opentelemetry_sdk` `DEFAULT_CARDINALITY_LIMIT`); later sets fold into the overflow series.
pub const SERIES_LIMIT: usize = 2000;

/// How long a generation lives at least before departed series are dropped, by default.
pub const DEFAULT_SERIES_RESET: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot build the prometheus reader: {0}")]
    Reader(String),
    #[error("cannot render metrics: {0}")]
    Render(#[from] prometheus::Error),
    #[error("cannot register the process metrics: {0}")]
    Process(prometheus::Error),
}

/// The `revision` label of `kubenurse_build_info`: `KUBENURSE_REVISION` when the binary was
/// built (the image build passes the commit), `unknown` otherwise.
pub const REVISION: &str = match option_env!("KUBENURSE_REVISION") {
    Some(revision) if !revision.is_empty() => revision,
    _ => "unknown",
};

/// The agent's instruments, in their current generation, and the shared `/metrics` text.
pub struct Metrics {
    build: Build,
    detail: MetricsDetail,
    /// The own zone goes on the resource when discovery reads it (unless configured there).
    zone_from_discovery: bool,
    /// `None`: series stay until the agent restarts.
    reset_after: Option<Duration>,
    current: Mutex<Arc<Generation>>,
    /// The current generation may not be replaced before this.
    renewable_at: Mutex<Instant>,
    /// Bumped by every recording and every new generation, so a cached `/metrics` text is
    /// known to be current.
    recorded: AtomicU64,
    rendered: Mutex<Option<Rendered>>,
    /// Rendered texts still referenced (by the cache or by responses being written).
    live_renders: Arc<AtomicUsize>,
}

/// What every generation is built from.
struct Build {
    buckets: Vec<f64>,
    /// Gains the own zone once discovery reads it (see [`Metrics::set_own_zone`]).
    resource: Mutex<Resource>,
    incoming: Arc<IncomingChecks>,
    push: Option<Push>,
}

/// OTLP push settings for [`Metrics::new`].
pub struct Push {
    /// Builds a push reader; called once per generation.
    pub readers: Box<dyn Fn() -> PushReader + Send + Sync>,
    pub exponential_histograms: bool,
}

/// One set of meter providers, readers and instruments.
///
/// Normally one meter provider carries both readers (Prometheus pull, OTLP push). When OTLP
/// histograms are exponential, a second provider with that view feeds the push reader, since
/// views apply to a whole provider and the Prometheus reader drops exponential histograms;
/// every measurement is then recorded twice.
struct Generation {
    providers: Vec<SdkMeterProvider>,
    registry: prometheus::Registry,
    instruments: Vec<Instruments>,
    _build_info: Vec<ObservableGauge<u64>>,
    book: Mutex<Book>,
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
    overflow: Counter<u64>,
    zone_duration: Histogram<f64>,
    zone_requests: Counter<u64>,
    zone_errors: Counter<u64>,
    _incoming: ObservableGauge<u64>,
}

/// The instruments whose attribute sets come from probes, and so could reach the limit.
#[derive(Debug, Clone, Copy)]
enum Tracked {
    RequestDuration,
    TraceDuration,
    Requests,
    Errors,
}

impl Tracked {
    const ALL: [Tracked; 4] = [Tracked::RequestDuration, Tracked::TraceDuration, Tracked::Requests, Tracked::Errors];

    /// The `metric` label of the overflow counter: the name a Prometheus user queries.
    fn prometheus_name(self) -> &'static str {
        match self {
            Tracked::RequestDuration => "kubenurse_httpclient_request_duration_seconds",
            Tracked::TraceDuration => "kubenurse_httpclient_trace_request_duration_seconds",
            Tracked::Requests => "kubenurse_httpclient_requests_total",
            Tracked::Errors => "kubenurse_errors_total",
        }
    }
}

/// What a generation has recorded: its probe types and, per tracked instrument, its
/// attribute sets (as hashes).
#[derive(Default)]
struct Book {
    types: HashSet<String>,
    series: [Series; Tracked::ALL.len()],
}

#[derive(Default)]
struct Series {
    sets: HashSet<u64>,
    /// Reaching the limit has been logged.
    logged: bool,
}

impl Book {
    /// Notes a measurement of `metric` with the attribute values `kind` and `label`; false
    /// when its set is new and beyond the limit (the SDK folds it into the overflow series).
    fn admit(&mut self, metric: Tracked, kind: &str, label: &str) -> bool {
        let series = &mut self.series[metric as usize];
        let mut hasher = DefaultHasher::new();
        (kind, label).hash(&mut hasher);
        let set = hasher.finish();
        if series.sets.len() < SERIES_LIMIT || series.sets.contains(&set) {
            series.sets.insert(set);
            return true;
        }
        if !series.logged {
            series.logged = true;
            tracing::warn!(
                metric = metric.prometheus_name(),
                limit = SERIES_LIMIT,
                "metric series limit reached: further series fold into otel_metric_overflow=\"true\" and are \
                 counted in kubenurse_metric_overflow_total; lower KUBENURSE_NEIGHBOUR_LIMIT or set \
                 KUBENURSE_METRICS_DETAIL=lean"
            );
        }
        false
    }

    /// Probe types recorded in this generation that `round` does not probe.
    fn departed<'a>(&self, round: impl IntoIterator<Item = &'a str>) -> usize {
        let round: HashSet<&str> = round.into_iter().collect();
        self.types.iter().filter(|t| !round.contains(t.as_str())).count()
    }
}

impl Metrics {
    /// Builds the first generation: meter provider(s) with their readers, then every
    /// instrument. Every probe records every instrument and departed series are dropped after
    /// [`DEFAULT_SERIES_RESET`]; see [`Self::with_detail`] and [`Self::with_series_reset`].
    pub fn new(
        buckets: Vec<f64>,
        resource: Resource,
        incoming: Arc<IncomingChecks>,
        push: Option<Push>,
    ) -> Result<Self, MetricsError> {
        let build = Build { buckets, resource: Mutex::new(resource), incoming, push };
        let first = Generation::new(&build)?;
        Ok(Self {
            build,
            detail: MetricsDetail::Full,
            zone_from_discovery: true,
            reset_after: Some(DEFAULT_SERIES_RESET),
            current: Mutex::new(Arc::new(first)),
            renewable_at: Mutex::new(Instant::now() + DEFAULT_SERIES_RESET),
            recorded: AtomicU64::new(0),
            rendered: Mutex::default(),
            live_renders: Arc::default(),
        })
    }

    /// With [`MetricsDetail::Lean`], neighbour probes do not record per-event durations.
    pub fn with_detail(mut self, detail: MetricsDetail) -> Self {
        self.detail = detail;
        self
    }

    /// With `false`, [`Self::set_own_zone`] leaves the resource as configured.
    pub fn with_zone_from_discovery(mut self, enabled: bool) -> Self {
        self.zone_from_discovery = enabled;
        self
    }

    /// Departed series are dropped once the generation is at least `interval` old; zero keeps
    /// them until the agent restarts.
    pub fn with_series_reset(mut self, interval: Duration) -> Self {
        self.reset_after = (!interval.is_zero()).then_some(interval);
        *lock(&self.renewable_at) = Instant::now() + interval;
        self
    }

    fn generation(&self) -> Arc<Generation> {
        lock(&self.current).clone()
    }

    /// Tells which probe types this round probes, before any of its results are recorded.
    /// When types recorded earlier are no longer among them and the generation is old
    /// enough, every series restarts in a fresh generation.
    pub fn start_round<'a>(&self, kinds: impl IntoIterator<Item = &'a str>) {
        let Some(after) = self.reset_after else { return };
        let departed = self.generation().book().departed(kinds);
        if departed == 0 {
            return;
        }
        let now = Instant::now();
        {
            let mut renewable_at = lock(&self.renewable_at);
            if now < *renewable_at {
                return;
            }
            // Also after a failure: the next attempt waits a whole interval.
            *renewable_at = now + after;
        }
        match self.renew() {
            Ok(()) => tracing::info!(departed, "probe types no longer probed: every series restarts, without theirs"),
            Err(e) => tracing::warn!(error = %e, "cannot restart the metrics; departed series stay until the next try"),
        }
    }

    /// Replaces the current generation with a fresh one; the old one pushes its last interval
    /// and goes.
    fn renew(&self) -> Result<(), MetricsError> {
        let fresh = Generation::new(&self.build)?;
        let old = std::mem::replace(&mut *lock(&self.current), Arc::new(fresh));
        self.recorded.fetch_add(1, Ordering::SeqCst);
        retire(old);
        Ok(())
    }

    /// Puts the own zone on the resource as `cloud.availability_zone` when discovery reads it
    /// (a pod cannot read its node's labels, so it is known only from the agent's endpoint or
    /// node). A resource cannot change under a meter provider: the first time the zone is
    /// known, and whenever it changes, every series restarts in a new generation: once, soon
    /// after start (discovery starts after its random delay, while the first rounds, which
    /// have no neighbours yet, already ran), as after a restart.
    pub fn set_own_zone(&self, zone: Option<&str>) {
        let Some(zone) = zone.filter(|_| self.zone_from_discovery) else { return };
        {
            let mut resource = lock(&self.build.resource);
            let current = resource.get(&Key::from_static_str(ZONE_ATTRIBUTE));
            if current.is_some_and(|v| v.as_str() == zone) {
                return;
            }
            let kept = resource.iter().filter(|(k, _)| k.as_str() != ZONE_ATTRIBUTE);
            let attributes: Vec<KeyValue> = kept.map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
            *resource = Resource::builder_empty()
                .with_attributes(attributes)
                .with_attribute(KeyValue::new(ZONE_ATTRIBUTE, zone.to_owned()))
                .build();
        }
        match self.renew() {
            Ok(()) => tracing::info!(zone, "own zone known: on the metrics resource as {ZONE_ATTRIBUTE}"),
            Err(e) => tracing::warn!(error = %e, "cannot put the own zone on the metrics resource"),
        }
    }

    /// Records one probe: its events, its duration, its status and, if it failed, the phase.
    pub fn record_probe(&self, result: &ProbeResult) {
        self.recorded.fetch_add(1, Ordering::SeqCst);
        let g = self.generation();
        let kind_name = result.target.kind.as_str();
        let code = result.code_label();
        let error = result.error_event();
        let lean = self.detail == MetricsDetail::Lean && result.target.peer.is_some();
        let events = if lean { &[][..] } else { &result.events[..] };

        let mut overflowed = [0u64; Tracked::ALL.len()];
        {
            let mut book = g.book();
            if self.reset_after.is_some() && !book.types.contains(kind_name) {
                book.types.insert(kind_name.to_owned());
            }
            let mut admit = |metric: Tracked, label: &str| {
                if !book.admit(metric, kind_name, label) {
                    overflowed[metric as usize] += 1;
                }
            };
            for (event, _) in events {
                admit(Tracked::TraceDuration, event.label());
            }
            if result.response_after.is_some() {
                admit(Tracked::RequestDuration, "");
            }
            admit(Tracked::Requests, &code);
            if let Some(event) = &error {
                admit(Tracked::Errors, event);
            }
        }

        let kind = KeyValue::new("type", result.target.kind.clone());
        let code = KeyValue::new("code", code);
        let error = error.map(|e| KeyValue::new("event", e));
        // Neighbour probes, in both profiles: a zone × zone view whose size does not grow with
        // the number of nodes (zones from Kubernetes, not from peers).
        let zones = result.target.peer.as_ref().map(|p| {
            [KeyValue::new("source_zone", p.source_zone.clone()), KeyValue::new("target_zone", p.target_zone.clone())]
        });
        for i in &g.instruments {
            for (event, offset) in events {
                i.trace_duration.record(offset.as_secs_f64(), &[kind.clone(), KeyValue::new("event", event.label())]);
            }
            if let Some(duration) = result.response_after {
                i.request_duration.record(duration.as_secs_f64(), std::slice::from_ref(&kind));
            }
            i.requests.add(1, &[kind.clone(), code.clone()]);
            if let Some(event) = &error {
                i.errors.add(1, &[kind.clone(), event.clone()]);
            }
            for (metric, n) in Tracked::ALL.iter().zip(overflowed).filter(|(_, n)| *n > 0) {
                i.overflow.add(n, &[KeyValue::new("metric", metric.prometheus_name())]);
            }
            if let Some(zones) = &zones {
                if let Some(duration) = result.response_after {
                    i.zone_duration.record(duration.as_secs_f64(), zones);
                }
                i.zone_requests.add(1, zones);
                if !result.is_ok() {
                    i.zone_errors.add(1, zones);
                }
            }
        }
    }

    /// Records how late a round started.
    pub fn record_round_lateness(&self, lateness: Duration) {
        self.recorded.fetch_add(1, Ordering::SeqCst);
        for i in &self.generation().instruments {
            i.round_lateness.record(lateness.as_secs_f64(), &[]);
        }
    }

    /// The Prometheus text exposition of every instrument.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.generation().registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The Prometheus text exposition for `/metrics`: rendered once and shared by concurrent
    /// requests while nothing new is recorded (for at most [`RENDER_REUSE`]), and never more
    /// than [`MAX_LIVE_RENDERS`] distinct texts alive at once.
    pub fn render_shared(&self) -> Result<Bytes, MetricsError> {
        // Rendering under the lock makes concurrent requests wait for one render instead of
        // each making its own.
        let mut rendered = lock(&self.rendered);
        let recorded = self.recorded.load(Ordering::SeqCst);
        if let Some(r) = rendered.as_ref() {
            let current = r.recorded == recorded && r.at.elapsed() < RENDER_REUSE;
            if current || self.live_renders.load(Ordering::SeqCst) >= MAX_LIVE_RENDERS {
                return Ok(r.text.clone());
            }
        }
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.generation().registry.gather(), &mut out)?;
        self.live_renders.fetch_add(1, Ordering::SeqCst);
        let text = Bytes::from_owner(Counted { bytes: out, live: self.live_renders.clone() });
        *rendered = Some(Rendered { recorded, at: Instant::now(), text: text.clone() });
        Ok(text)
    }

    /// Pushes what has been recorded and stops every reader (blocking, bounded by the
    /// exporters' timeouts).
    pub fn shutdown(&self) {
        for provider in &self.generation().providers {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "final metric export failed");
            }
        }
    }
}

/// Shuts a replaced generation down off the probing path: its readers push their last
/// interval (bounded by the exporters' timeouts), then its instruments go.
fn retire(old: Arc<Generation>) {
    let shutdown = move || {
        for provider in &old.providers {
            if let Err(e) = provider.shutdown() {
                tracing::debug!(error = %e, "last export of the replaced metrics failed");
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(shutdown)),
        Err(_) => shutdown(),
    }
}

impl Generation {
    fn new(build: &Build) -> Result<Self, MetricsError> {
        let registry = prometheus::Registry::new();
        register_process_metrics(&registry)?;
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| MetricsError::Reader(e.to_string()))?;
        let resource = lock(&build.resource).clone();
        let mut main = SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(prometheus);
        let mut providers = Vec::new();
        if let Some(push) = &build.push {
            let reader = (push.readers)();
            if push.exponential_histograms {
                providers.push(
                    SdkMeterProvider::builder()
                        .with_resource(resource)
                        .with_reader(reader)
                        .with_view(exponential)
                        .build(),
                );
            } else {
                main = main.with_reader(reader);
            }
        }
        providers.insert(0, main.build());
        let instruments: Vec<Instruments> = providers
            .iter()
            .map(|p| Instruments::new(&p.meter_with_scope(scope()), &build.buckets, build.incoming.clone()))
            .collect();
        // Overflow counters start at zero, so the first overflow shows in `increase()`.
        for i in &instruments {
            for metric in Tracked::ALL {
                i.overflow.add(0, &[KeyValue::new("metric", metric.prometheus_name())]);
            }
        }
        let build_info = providers.iter().map(|p| build_info(&p.meter_with_scope(scope()))).collect();
        Ok(Self { providers, registry, instruments, _build_info: build_info, book: Mutex::default() })
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        lock(&self.book)
    }
}

/// The standard `process_*` series (CPU seconds, resident and virtual memory, open and maximum
/// file descriptors, start time, threads) of the `prometheus` crate's collector, on `/metrics`
/// only: no well-kept crate offers them as OpenTelemetry instruments.
#[cfg(target_os = "linux")]
fn register_process_metrics(registry: &prometheus::Registry) -> Result<(), MetricsError> {
    let collector = prometheus::process_collector::ProcessCollector::for_self();
    registry.register(Box::new(collector)).map_err(MetricsError::Process)
}

#[cfg(not(target_os = "linux"))]
fn register_process_metrics(_: &prometheus::Registry) -> Result<(), MetricsError> {
    Ok(())
}

/// `kubenurse_build_info{version, revision}`, always 1, on both readers: which build runs where.
fn build_info(meter: &Meter) -> ObservableGauge<u64> {
    let attributes = [KeyValue::new("version", env!("CARGO_PKG_VERSION")), KeyValue::new("revision", REVISION)];
    meter
        .u64_observable_gauge(names::BUILD_INFO)
        .with_description("the running build: 1, labelled with its version and source revision")
        .with_callback(move |gauge| gauge.observe(1, &attributes))
        .build()
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

/// The instrumentation scope of every instrument: the agent, with its version.
fn scope() -> opentelemetry::InstrumentationScope {
    opentelemetry::InstrumentationScope::builder("kubenurse").with_version(env!("CARGO_PKG_VERSION")).build()
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
                .with_description(
                    "probe requests by probe type and HTTP status (ok for tcp and dns checks, or round_trip_error)",
                )
                .build(),
            errors: meter
                .u64_counter(names::ERRORS)
                .with_description("failed probes by probe type and the phase that failed")
                .build(),
            overflow: meter
                .u64_counter(names::METRIC_OVERFLOW)
                .with_description(
                    "measurements beyond a metric's series limit, folded into its otel_metric_overflow series",
                )
                .build(),
            zone_duration: histogram(
                names::ZONE_REQUEST_DURATION,
                "duration of neighbour requests, from start to the response headers, by source and target zone",
            ),
            zone_requests: meter
                .u64_counter(names::ZONE_REQUESTS)
                .with_description("neighbour probes by source and target zone")
                .build(),
            zone_errors: meter
                .u64_counter(names::ZONE_ERRORS)
                .with_description("failed neighbour probes (no response, or not 200) by source and target zone")
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
    use crate::probe::{Check, Event, Outcome, Peer, Target};

    fn metrics() -> Metrics {
        let resource = Resource::builder_empty().build();
        Metrics::new(crate::config::DEFAULT_BUCKETS.to_vec(), resource, Arc::default(), None).expect("metrics")
    }

    /// A probe of `kind` that got `status` after passing through every phase of a plain
    /// connection; `path_*` kinds are neighbour probes.
    fn probe(kind: &str, status: u16) -> ProbeResult {
        let node = kind.strip_prefix("path_");
        let target = Target {
            kind: kind.to_owned(),
            url: "http://127.0.0.1/alwayshappy".parse().expect("uri"),
            check: Check::Http,
            bearer_token: false,
            peer: node.map(|n| Peer {
                node: n.to_owned(),
                pod: format!("kubenurse-{n}"),
                source_zone: "zone-a".into(),
                target_zone: if n.ends_with('b') { "zone-b" } else { "zone-a" }.into(),
            }),
        };
        let mut result = ProbeResult::unobserved(Arc::new(target), crate::probe::FailedPhase::RoundTrip, String::new());
        let events = [Event::ConnectStart, Event::ConnectDone, Event::GotConn, Event::WroteRequest];
        result.events = events.iter().zip(1..).map(|(e, ms)| (*e, Duration::from_millis(ms))).collect();
        result.response_after = Some(Duration::from_millis(5));
        result.outcome = Outcome::Response { status };
        result
    }

    fn types_in(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split("type=\"").nth(1)?.split('"').next().map(str::to_owned))
            .collect()
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

    /// Runs `rounds` of probe types through `metrics`, as the scheduler does.
    fn run_rounds(metrics: &Metrics, rounds: &[&[&str]]) {
        for kinds in rounds {
            metrics.start_round(kinds.iter().copied());
            for kind in *kinds {
                metrics.record_probe(&probe(kind, if kind.contains("dead") { 503 } else { 200 }));
            }
        }
    }

    #[test]
    fn a_zone_the_operator_put_on_the_resource_is_kept() {
        let m = metrics().with_zone_from_discovery(false);
        let first = m.generation();
        m.set_own_zone(Some("zone-a"));
        assert!(Arc::ptr_eq(&first, &m.generation()));
        assert!(lock(&m.build.resource).get(&Key::from_static_str(ZONE_ATTRIBUTE)).is_none());
    }

    #[test]
    fn a_discovered_zone_goes_on_the_resource_once() {
        let m = metrics();
        let zone = |m: &Metrics| {
            let resource = lock(&m.build.resource);
            resource.get(&Key::from_static_str(ZONE_ATTRIBUTE)).map(|v| v.as_str().into_owned())
        };
        let first = m.generation();
        m.set_own_zone(None);
        assert!(Arc::ptr_eq(&first, &m.generation()) && zone(&m).is_none(), "nothing known, nothing changes");
        m.set_own_zone(Some("zone-a"));
        assert_eq!(zone(&m).as_deref(), Some("zone-a"));
        let second = m.generation();
        assert!(!Arc::ptr_eq(&first, &second), "a resource needs a new provider");
        m.set_own_zone(Some("zone-a"));
        assert!(Arc::ptr_eq(&second, &m.generation()), "the same zone again changes nothing");
        m.set_own_zone(Some("zone-b"));
        assert_eq!(zone(&m).as_deref(), Some("zone-b"));
    }

    #[test]
    fn departed_types_are_dropped_once_the_generation_is_old_enough() {
        // A generation that may be replaced at once.
        let metrics = metrics().with_series_reset(Duration::from_nanos(1));
        run_rounds(&metrics, &[&["me_service", "path_gone", "path_dead"], &["me_service", "path_gone", "path_dead"]]);
        let before = metrics.render_shared().expect("render");
        assert_eq!(
            types_in(&String::from_utf8_lossy(&before)),
            ["me_service", "path_dead", "path_gone"].map(String::from).into()
        );

        run_rounds(&metrics, &[&["me_service", "path_dead"]]);
        let after = metrics.render_shared().expect("render");
        let after = String::from_utf8_lossy(&after);
        assert_eq!(types_in(&after), ["me_service", "path_dead"].map(String::from).into(), "{after}");
        assert!(after.contains("kubenurse_errors_total{event=\"status_code_503\",type=\"path_dead\"} 1"), "{after}");
        assert!(
            after.contains("kubenurse_httpclient_requests_total{code=\"200\",type=\"me_service\"} 1"),
            "every series restarted: {after}"
        );
        // Nothing departed since: no further restart.
        run_rounds(&metrics, &[&["me_service", "path_dead"]]);
        let text = metrics.render().expect("render");
        assert!(text.contains("kubenurse_httpclient_requests_total{code=\"200\",type=\"me_service\"} 2"), "{text}");
    }

    #[test]
    fn departed_types_stay_while_the_generation_is_young_or_resets_are_off() {
        for metrics in [metrics(), metrics().with_series_reset(Duration::ZERO)] {
            run_rounds(&metrics, &[&["me_service", "path_gone"], &["me_service"], &["me_service"]]);
            let text = metrics.render().expect("render");
            assert_eq!(types_in(&text), ["me_service", "path_gone"].map(String::from).into());
            assert!(text.contains("kubenurse_httpclient_requests_total{code=\"200\",type=\"me_service\"} 3"));
        }
    }

    #[test]
    fn the_lean_profile_keeps_per_event_durations_for_fixed_probes_only() {
        let metrics = metrics().with_detail(MetricsDetail::Lean);
        run_rounds(&metrics, &[&["me_service", "path_node-a"]]);
        let text = metrics.render().expect("render");
        let families = |kind: &str| -> std::collections::BTreeSet<String> {
            text.lines()
                .filter(|l| !l.starts_with('#') && l.contains(&format!("type=\"{kind}\"")))
                .filter_map(|l| l.split('{').next().map(str::to_owned))
                .collect()
        };
        let trace = "kubenurse_httpclient_trace_request_duration_seconds_count";
        assert!(families("me_service").contains(trace), "{text}");
        assert!(!families("path_node-a").contains(trace), "{text}");
        for kept in ["kubenurse_httpclient_request_duration_seconds_count", "kubenurse_httpclient_requests_total"] {
            assert!(families("path_node-a").contains(kept), "{kept}: {text}");
        }
    }

    /// Log lines written while `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                lock(&self.0).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&lock(&buffer.0)).into_owned();
        text
    }

    #[test]
    fn series_beyond_the_limit_are_logged_once_and_counted() {
        let metrics = metrics();
        let extra = 25;
        let log = logged(|| {
            for i in 0..SERIES_LIMIT + extra {
                metrics.record_probe(&probe(&format!("check-{i}"), 200));
            }
        });
        let text = metrics.render().expect("render");
        // The SDK folded the same measurements that the agent counted.
        assert!(text.contains("kubenurse_httpclient_requests_total{otel_metric_overflow=\"true\"} 25"), "SDK overflow");
        for (metric, overflowed) in [
            ("kubenurse_httpclient_requests_total", extra),
            ("kubenurse_httpclient_request_duration_seconds", extra),
            // Four events per probe: the limit is reached after 500 types.
            ("kubenurse_httpclient_trace_request_duration_seconds", (SERIES_LIMIT + extra) * 4 - SERIES_LIMIT),
            ("kubenurse_errors_total", 0),
        ] {
            let line = format!("kubenurse_metric_overflow_total{{metric=\"{metric}\"}} {overflowed}");
            assert!(
                text.contains(&line),
                "{line} in\n{}",
                text.lines().filter(|l| l.contains("overflow")).collect::<Vec<_>>().join("\n")
            );
        }
        let warnings = log.lines().filter(|l| l.contains("metric series limit reached")).count();
        assert_eq!(warnings, 3, "once per instrument that reached the limit: {log}");
    }
}

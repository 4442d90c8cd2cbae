//! The standard OpenTelemetry SDK variables the agent honours, typed and validated like the
//! rest of its configuration, and resolved per signal (metrics, traces) as the OTLP exporter
//! specification describes.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    #[value(name = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    Gzip,
    None,
}

/// `OTEL_METRICS_EXPORTER` / `OTEL_TRACES_EXPORTER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Exporter {
    Otlp,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TemporalityPreference {
    Cumulative,
    Delta,
    #[value(name = "lowmemory")]
    LowMemory,
}

/// How histograms are pushed over OTLP (`/metrics` always keeps explicit buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OtlpHistogram {
    Explicit,
    Exponential,
}

/// `key=value,…` pairs (values percent-decoded), for headers and resource attributes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValues(pub BTreeMap<String, String>);

#[derive(Debug, Clone, Args)]
pub struct OtelConfig {
    /// OTLP base endpoint for every signal (`http://collector:4318`, or `:4317` with grpc);
    /// push is off while no endpoint is set.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = parse_endpoint)]
    pub endpoint: Option<String>,
    /// OTLP endpoint for metrics, used as is.
    #[arg(long = "otlp-metrics-endpoint", env = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", value_parser = parse_endpoint)]
    pub metrics_endpoint: Option<String>,
    /// OTLP endpoint for traces, used as is.
    #[arg(long = "otlp-traces-endpoint", env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_parser = parse_endpoint)]
    pub traces_endpoint: Option<String>,
    /// OTLP transport [default: http/protobuf].
    #[arg(long = "otlp-protocol", env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum)]
    pub protocol: Option<Protocol>,
    /// OTLP transport for metrics.
    #[arg(long = "otlp-metrics-protocol", env = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", value_enum)]
    pub metrics_protocol: Option<Protocol>,
    /// OTLP transport for traces.
    #[arg(long = "otlp-traces-protocol", env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", value_enum)]
    pub traces_protocol: Option<Protocol>,
    /// Headers sent with every export, `key=value,…`.
    #[arg(long = "otlp-headers", env = "OTEL_EXPORTER_OTLP_HEADERS", value_parser = parse_key_values)]
    pub headers: Option<KeyValues>,
    /// Headers for metric exports (added to the common ones).
    #[arg(long = "otlp-metrics-headers", env = "OTEL_EXPORTER_OTLP_METRICS_HEADERS", value_parser = parse_key_values)]
    pub metrics_headers: Option<KeyValues>,
    /// Headers for trace exports (added to the common ones).
    #[arg(long = "otlp-traces-headers", env = "OTEL_EXPORTER_OTLP_TRACES_HEADERS", value_parser = parse_key_values)]
    pub traces_headers: Option<KeyValues>,
    /// Compression of exports [default: none].
    #[arg(long = "otlp-compression", env = "OTEL_EXPORTER_OTLP_COMPRESSION", value_enum)]
    pub compression: Option<Compression>,
    /// Compression of metric exports.
    #[arg(long = "otlp-metrics-compression", env = "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", value_enum)]
    pub metrics_compression: Option<Compression>,
    /// Compression of trace exports.
    #[arg(long = "otlp-traces-compression", env = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", value_enum)]
    pub traces_compression: Option<Compression>,
    /// Deadline of one export, in milliseconds [default: 10000].
    #[arg(long = "otlp-timeout", env = "OTEL_EXPORTER_OTLP_TIMEOUT", value_parser = parse_millis)]
    pub timeout: Option<Duration>,
    /// Deadline of one metric export, in milliseconds.
    #[arg(long = "otlp-metrics-timeout", env = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", value_parser = parse_millis)]
    pub metrics_timeout: Option<Duration>,
    /// Deadline of one trace export, in milliseconds.
    #[arg(long = "otlp-traces-timeout", env = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", value_parser = parse_millis)]
    pub traces_timeout: Option<Duration>,
    /// Time between metric pushes, in milliseconds.
    #[arg(long = "otlp-metric-export-interval", env = "OTEL_METRIC_EXPORT_INTERVAL", default_value = "60000", value_parser = parse_millis)]
    pub metric_export_interval: Duration,
    /// Aggregation temporality of pushed metrics.
    #[arg(
        long = "otlp-temporality",
        env = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        value_enum,
        default_value = "cumulative",
        ignore_case = true
    )]
    pub temporality: TemporalityPreference,
    /// `otlp` pushes metrics when an endpoint is set; `none` never does.
    #[arg(long = "otel-metrics-exporter", env = "OTEL_METRICS_EXPORTER", value_enum, default_value = "otlp")]
    pub metrics_exporter: Exporter,
    /// `otlp` exports slow-probe spans when an endpoint is set; `none` never does.
    #[arg(long = "otel-traces-exporter", env = "OTEL_TRACES_EXPORTER", value_enum, default_value = "otlp")]
    pub traces_exporter: Exporter,
    /// `service.name` of the resource [default: kubenurse].
    #[arg(long = "otel-service-name", env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
    /// Extra resource attributes, `key=value,…`.
    #[arg(long = "otel-resource-attributes", env = "OTEL_RESOURCE_ATTRIBUTES", value_parser = parse_key_values)]
    pub resource_attributes: Option<KeyValues>,
    /// Histograms pushed over OTLP: `explicit` (the `/metrics` buckets) or `exponential`
    /// (base-2 exponential; a second meter provider records them).
    #[arg(long = "otlp-histogram", env = "KUBENURSE_OTLP_HISTOGRAM", value_enum, default_value = "explicit")]
    pub otlp_histogram: OtlpHistogram,
}

/// The signals the agent exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Metrics,
    Traces,
}

/// Everything an OTLP exporter for one signal needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalExport {
    /// The full URL (HTTP: with `/v1/metrics` or `/v1/traces`).
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    pub timeout: Duration,
}

impl OtelConfig {
    /// How to export `signal`, or `None` when it is off (no endpoint, or exporter `none`).
    pub fn signal(&self, signal: Signal) -> Option<SignalExport> {
        let (exporter, endpoint, protocol, headers, compression, timeout, path) = match signal {
            Signal::Metrics => (
                self.metrics_exporter,
                &self.metrics_endpoint,
                self.metrics_protocol,
                &self.metrics_headers,
                self.metrics_compression,
                self.metrics_timeout,
                "v1/metrics",
            ),
            Signal::Traces => (
                self.traces_exporter,
                &self.traces_endpoint,
                self.traces_protocol,
                &self.traces_headers,
                self.traces_compression,
                self.traces_timeout,
                "v1/traces",
            ),
        };
        if exporter == Exporter::None {
            return None;
        }
        let protocol = protocol.or(self.protocol).unwrap_or(Protocol::HttpProtobuf);
        let endpoint = match (endpoint, &self.endpoint) {
            (Some(own), _) => own.clone(),
            (None, Some(base)) if protocol == Protocol::HttpProtobuf => {
                format!("{}/{path}", base.trim_end_matches('/'))
            }
            (None, Some(base)) => base.clone(),
            (None, None) => return None,
        };
        let mut all_headers = self.headers.clone().unwrap_or_default().0;
        all_headers.extend(headers.clone().unwrap_or_default().0);
        Some(SignalExport {
            endpoint,
            protocol,
            headers: all_headers,
            compression: compression.or(self.compression).unwrap_or(Compression::None),
            timeout: timeout.or(self.timeout).unwrap_or(Duration::from_secs(10)),
        })
    }
}

/// An `http://` URL with a host. TLS to the collector is not built in: in-cluster collectors
/// are reached in plain text (or through a mesh sidecar).
fn parse_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim();
    let uri: http::Uri = s.parse().map_err(|e| format!("not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(s.to_owned()),
        Some("https") => Err("https collectors are not supported; use a plain http:// endpoint in the cluster".into()),
        _ => Err("expected an http:// URL with a host".into()),
    }
}

fn parse_millis(s: &str) -> Result<Duration, String> {
    let ms: u64 = s.trim().parse().map_err(|_| "expected whole milliseconds".to_owned())?;
    if ms == 0 {
        return Err("must be greater than zero".into());
    }
    // A day at most: larger values would overflow the SDK's deadlines.
    if ms > 86_400_000 {
        return Err("must be at most 86400000 (one day)".into());
    }
    Ok(Duration::from_millis(ms))
}

/// `k=v,k2=v2` with percent-encoded values, as the OpenTelemetry specification defines.
fn parse_key_values(s: &str) -> Result<KeyValues, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{pair:?} has an empty key"));
        }
        out.insert(
            key.to_owned(),
            percent_decode(value.trim()).ok_or_else(|| format!("{pair:?}: bad percent-encoding"))?,
        );
    }
    Ok(KeyValues(out))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Only {
        #[command(flatten)]
        otel: OtelConfig,
    }

    fn otel(args: &[&str]) -> OtelConfig {
        crate::config::parse_with_env::<Only, _, _>(std::iter::once("x").chain(args.iter().copied()), |_| None)
            .expect("valid")
            .otel
    }

    #[test]
    fn push_is_off_without_an_endpoint() {
        let c = otel(&[]);
        assert_eq!(c.signal(Signal::Metrics), None);
        assert_eq!(c.signal(Signal::Traces), None);
        assert_eq!(c.metric_export_interval, Duration::from_secs(60));
    }

    #[test]
    fn endpoints_resolve_per_signal_as_the_specification_says() {
        let c = otel(&["--otlp-endpoint=http://collector:4318/"]);
        assert_eq!(c.signal(Signal::Metrics).expect("on").endpoint, "http://collector:4318/v1/metrics");
        assert_eq!(c.signal(Signal::Traces).expect("on").endpoint, "http://collector:4318/v1/traces");
        let c = otel(&["--otlp-endpoint=http://collector:4317", "--otlp-protocol=grpc"]);
        assert_eq!(c.signal(Signal::Metrics).expect("on").endpoint, "http://collector:4317");
        let c = otel(&["--otlp-metrics-endpoint=http://m:9/custom", "--otel-traces-exporter=none"]);
        assert_eq!(c.signal(Signal::Metrics).expect("on").endpoint, "http://m:9/custom");
        assert_eq!(c.signal(Signal::Traces), None);
        let c = otel(&["--otlp-endpoint=http://c:4318", "--otel-metrics-exporter=none"]);
        assert_eq!(c.signal(Signal::Metrics), None);
    }

    #[test]
    fn headers_compression_and_timeouts_merge_signal_over_common() {
        let c = otel(&[
            "--otlp-endpoint=http://c:4318",
            "--otlp-headers=authorization=Bearer%20abc,x-team=sre",
            "--otlp-metrics-headers=x-team=platform",
            "--otlp-compression=gzip",
            "--otlp-traces-compression=none",
            "--otlp-timeout=2500",
        ]);
        let m = c.signal(Signal::Metrics).expect("on");
        assert_eq!(m.headers["authorization"], "Bearer abc");
        assert_eq!(m.headers["x-team"], "platform");
        assert_eq!(m.compression, Compression::Gzip);
        assert_eq!(m.timeout, Duration::from_millis(2500));
        assert_eq!(c.signal(Signal::Traces).expect("on").compression, Compression::None);
    }

    #[test]
    fn bad_values_are_rejected() {
        for args in [
            &["--otlp-endpoint=collector:4318"][..],
            &["--otlp-endpoint=https://collector:4318"],
            &["--otlp-protocol=http/json"],
            &["--otlp-headers=novalue"],
            &["--otlp-timeout=10s"],
            &["--otlp-metric-export-interval=0"],
            &["--otlp-metric-export-interval=18446744073709551615"],
            &["--otlp-temporality=sometimes"],
            &["--otlp-histogram=log"],
        ] {
            assert!(
                crate::config::parse_with_env::<Only, _, _>(std::iter::once("x").chain(args.iter().copied()), |_| None)
                    .is_err(),
                "{args:?}"
            );
        }
    }
}

//! The standard OpenTelemetry SDK variables the agent honours, typed and validated like the
//! rest of its configuration, and resolved per signal (metrics, traces) as the OTLP exporter
//! specification describes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{parse_bool, ConfigError};

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
    /// OTLP base endpoint for every signal (`http://collector:4318`, `https://…`, or with
    /// grpc `collector:4317`, TLS unless insecure); push is off while no endpoint is set.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = parse_endpoint)]
    pub endpoint: Option<String>,
    /// OTLP endpoint for metrics, used as is.
    #[arg(long = "otlp-metrics-endpoint", env = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", value_parser = parse_endpoint)]
    pub metrics_endpoint: Option<String>,
    /// OTLP endpoint for traces, used as is.
    #[arg(long = "otlp-traces-endpoint", env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_parser = parse_endpoint)]
    pub traces_endpoint: Option<String>,
    /// gRPC endpoints given without a scheme: plain text when true, TLS when false
    /// [default: false].
    #[arg(id = "otlp_insecure", long = "otlp-insecure", env = "OTEL_EXPORTER_OTLP_INSECURE", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub insecure: Option<bool>,
    /// As `OTEL_EXPORTER_OTLP_INSECURE`, for metrics.
    #[arg(long = "otlp-metrics-insecure", env = "OTEL_EXPORTER_OTLP_METRICS_INSECURE", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub metrics_insecure: Option<bool>,
    /// As `OTEL_EXPORTER_OTLP_INSECURE`, for traces.
    #[arg(long = "otlp-traces-insecure", env = "OTEL_EXPORTER_OTLP_TRACES_INSECURE", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub traces_insecure: Option<bool>,
    /// PEM file of the CA certificates that verify the collector [default: the system roots].
    #[arg(long = "otlp-certificate", env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub certificate: Option<PathBuf>,
    /// As `OTEL_EXPORTER_OTLP_CERTIFICATE`, for metrics.
    #[arg(long = "otlp-metrics-certificate", env = "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE")]
    pub metrics_certificate: Option<PathBuf>,
    /// As `OTEL_EXPORTER_OTLP_CERTIFICATE`, for traces.
    #[arg(long = "otlp-traces-certificate", env = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")]
    pub traces_certificate: Option<PathBuf>,
    /// PEM client certificate (chain) presented to the collector (mTLS), with the client key.
    #[arg(long = "otlp-client-certificate", env = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")]
    pub client_certificate: Option<PathBuf>,
    /// As `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`, for metrics.
    #[arg(long = "otlp-metrics-client-certificate", env = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE")]
    pub metrics_client_certificate: Option<PathBuf>,
    /// As `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`, for traces.
    #[arg(long = "otlp-traces-client-certificate", env = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE")]
    pub traces_client_certificate: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long = "otlp-client-key", env = "OTEL_EXPORTER_OTLP_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// As `OTEL_EXPORTER_OTLP_CLIENT_KEY`, for metrics.
    #[arg(long = "otlp-metrics-client-key", env = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY")]
    pub metrics_client_key: Option<PathBuf>,
    /// As `OTEL_EXPORTER_OTLP_CLIENT_KEY`, for traces.
    #[arg(long = "otlp-traces-client-key", env = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY")]
    pub traces_client_key: Option<PathBuf>,
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
    /// Headers for metric exports (instead of the common ones).
    #[arg(long = "otlp-metrics-headers", env = "OTEL_EXPORTER_OTLP_METRICS_HEADERS", value_parser = parse_key_values)]
    pub metrics_headers: Option<KeyValues>,
    /// Headers for trace exports (instead of the common ones).
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

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Traces => "traces",
        }
    }

    /// The name of a signal's own variable: `OTEL_EXPORTER_OTLP_METRICS_<what>`.
    fn variable(self, what: &str) -> String {
        match self {
            Signal::Metrics => format!("OTEL_EXPORTER_OTLP_METRICS_{what}"),
            Signal::Traces => format!("OTEL_EXPORTER_OTLP_TRACES_{what}"),
        }
    }
}

/// Everything an OTLP exporter for one signal needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalExport {
    pub signal: Signal,
    /// The full URL, `http://` or `https://` (HTTP: with `/v1/metrics` or `/v1/traces`).
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    pub timeout: Duration,
    /// The TLS files, for an `https://` endpoint.
    pub tls: Option<ExportTls>,
}

/// The files of an OTLP TLS connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportTls {
    /// CA certificates that verify the collector; the system roots when unset.
    pub certificate: Option<FileSetting>,
    /// Client certificate and key, for mTLS.
    pub client: Option<(FileSetting, FileSetting)>,
}

/// A file, and the variable that named it (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSetting {
    pub path: PathBuf,
    pub variable: String,
}

impl OtelConfig {
    /// Checks what a single value parser cannot: per-signal combinations, files and headers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for signal in [Signal::Metrics, Signal::Traces] {
            let Some(export) = self.signal(signal)? else { continue };
            let tls = export.tls.unwrap_or_default();
            let files = tls.certificate.iter().chain(tls.client.iter().flat_map(|(cert, key)| [cert, key]));
            for file in files {
                if !file.path.is_file() {
                    return Err(ConfigError::new(&file.variable, file.path.display().to_string(), "no such file"));
                }
            }
        }
        let headers = [
            ("OTEL_EXPORTER_OTLP_HEADERS", &self.headers),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", &self.metrics_headers),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", &self.traces_headers),
        ];
        for (variable, headers) in headers {
            for (name, value) in headers.iter().flat_map(|h| &h.0) {
                let problem = if http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err() {
                    format!("{name:?} is not a valid header name")
                } else if http::HeaderValue::from_str(value).is_err() {
                    format!("the value of {name:?} is not a valid header value")
                } else {
                    continue;
                };
                return Err(ConfigError::new(variable, format!("{name}=…"), problem));
            }
        }
        Ok(())
    }

    /// How to export `signal`, or `None` when it is off (no endpoint, or exporter `none`).
    /// Each option is the signal's own when set, else the common one, else the default, as the
    /// OTLP exporter specification says; headers included (a signal's headers replace the
    /// common ones, they do not add to them).
    pub fn signal(&self, signal: Signal) -> Result<Option<SignalExport>, ConfigError> {
        let own = match signal {
            Signal::Metrics => Own {
                exporter: self.metrics_exporter,
                endpoint: &self.metrics_endpoint,
                protocol: self.metrics_protocol,
                headers: &self.metrics_headers,
                compression: self.metrics_compression,
                timeout: self.metrics_timeout,
                insecure: self.metrics_insecure,
                certificate: &self.metrics_certificate,
                client_certificate: &self.metrics_client_certificate,
                client_key: &self.metrics_client_key,
            },
            Signal::Traces => Own {
                exporter: self.traces_exporter,
                endpoint: &self.traces_endpoint,
                protocol: self.traces_protocol,
                headers: &self.traces_headers,
                compression: self.traces_compression,
                timeout: self.traces_timeout,
                insecure: self.traces_insecure,
                certificate: &self.traces_certificate,
                client_certificate: &self.traces_client_certificate,
                client_key: &self.traces_client_key,
            },
        };
        if own.exporter == Exporter::None {
            return Ok(None);
        }
        let protocol = own.protocol.or(self.protocol).unwrap_or(Protocol::HttpProtobuf);
        let (endpoint, variable) = match (own.endpoint, &self.endpoint) {
            (Some(own), _) => (own.clone(), signal.variable("ENDPOINT")),
            (None, Some(base)) if protocol == Protocol::HttpProtobuf && has_scheme(base) => {
                (format!("{}/v1/{}", base.trim_end_matches('/'), signal.name()), "OTEL_EXPORTER_OTLP_ENDPOINT".into())
            }
            (None, Some(base)) => (base.clone(), "OTEL_EXPORTER_OTLP_ENDPOINT".into()),
            (None, None) => return Ok(None),
        };
        let endpoint = if has_scheme(&endpoint) {
            endpoint
        } else if protocol == Protocol::Grpc {
            // The specification's rule for gRPC targets without a scheme.
            let insecure = own.insecure.or(self.insecure).unwrap_or(false);
            format!("{}://{endpoint}", if insecure { "http" } else { "https" })
        } else {
            return Err(ConfigError::new(
                &variable,
                endpoint,
                "http/protobuf needs an http:// or https:// URL (only grpc takes host:port)",
            ));
        };
        let file = |own: &Option<PathBuf>, common: &Option<PathBuf>, what: &str| match (own, common) {
            (Some(path), _) => Some(FileSetting { path: path.clone(), variable: signal.variable(what) }),
            (None, Some(path)) => {
                Some(FileSetting { path: path.clone(), variable: format!("OTEL_EXPORTER_OTLP_{what}") })
            }
            (None, None) => None,
        };
        let certificate = file(own.certificate, &self.certificate, "CERTIFICATE");
        let client = match (
            file(own.client_certificate, &self.client_certificate, "CLIENT_CERTIFICATE"),
            file(own.client_key, &self.client_key, "CLIENT_KEY"),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(cert), None) => {
                let variable = cert.variable.replace("CLIENT_CERTIFICATE", "CLIENT_KEY");
                return Err(ConfigError::new(&variable, "", format!("required with {}", cert.variable)));
            }
            (None, Some(key)) => {
                let variable = key.variable.replace("CLIENT_KEY", "CLIENT_CERTIFICATE");
                return Err(ConfigError::new(&variable, "", format!("required with {}", key.variable)));
            }
        };
        let tls = endpoint.starts_with("https://").then_some(ExportTls { certificate, client });
        let headers = own.headers.as_ref().or(self.headers.as_ref()).cloned().unwrap_or_default().0;
        Ok(Some(SignalExport {
            signal,
            endpoint,
            protocol,
            headers,
            compression: own.compression.or(self.compression).unwrap_or(Compression::None),
            timeout: own.timeout.or(self.timeout).unwrap_or(Duration::from_secs(10)),
            tls,
        }))
    }
}

/// A signal's own settings.
struct Own<'a> {
    exporter: Exporter,
    endpoint: &'a Option<String>,
    protocol: Option<Protocol>,
    headers: &'a Option<KeyValues>,
    compression: Option<Compression>,
    timeout: Option<Duration>,
    insecure: Option<bool>,
    certificate: &'a Option<PathBuf>,
    client_certificate: &'a Option<PathBuf>,
    client_key: &'a Option<PathBuf>,
}

fn has_scheme(endpoint: &str) -> bool {
    endpoint.starts_with("http://") || endpoint.starts_with("https://")
}

/// An `http://` or `https://` URL with a host, or (for gRPC) `host:port` without a scheme.
fn parse_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim();
    if has_scheme(&s.to_ascii_lowercase()) {
        let uri: http::Uri = s.parse().map_err(|e| format!("not a URL ({e})"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err("URL has no host".into());
        }
        if uri.query().is_some() {
            return Err("URL must not have a query".into());
        }
        // The scheme in lower case, as the rest of the agent compares it.
        let scheme_len = s.find("://").unwrap_or(0);
        return Ok(format!("{}{}", s[..scheme_len].to_ascii_lowercase(), &s[scheme_len..]));
    }
    if s.contains("://") {
        return Err("expected an http:// or https:// URL, or host:port".into());
    }
    let uri: http::Uri = format!("http://{s}").parse().map_err(|e| format!("not host:port ({e})"))?;
    if uri.host().is_none_or(str::is_empty) || !matches!(uri.path(), "" | "/") || s.contains(['/', '?']) {
        return Err("expected an http:// or https:// URL, or host:port".into());
    }
    Ok(s.to_owned())
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

    fn with_env(args: &[&str], env: &[(&str, &str)]) -> Result<OtelConfig, String> {
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let parsed =
            crate::config::parse_with_env::<Only, _, _>(std::iter::once("x").chain(args.iter().copied()), |k| {
                env.get(k).cloned()
            })
            .map_err(|e| e.to_string())?;
        parsed.otel.validate().map_err(|e| e.to_string())?;
        Ok(parsed.otel)
    }

    fn otel(args: &[&str]) -> OtelConfig {
        with_env(args, &[]).expect("valid")
    }

    fn on(c: &OtelConfig, signal: Signal) -> SignalExport {
        c.signal(signal).expect("valid").expect("on")
    }

    #[test]
    fn push_is_off_without_an_endpoint() {
        let c = otel(&[]);
        assert_eq!(c.signal(Signal::Metrics).expect("valid"), None);
        assert_eq!(c.signal(Signal::Traces).expect("valid"), None);
        assert_eq!(c.metric_export_interval, Duration::from_secs(60));
    }

    #[test]
    fn endpoints_resolve_per_signal_as_the_specification_says() {
        let c = otel(&["--otlp-endpoint=http://collector:4318/"]);
        assert_eq!(on(&c, Signal::Metrics).endpoint, "http://collector:4318/v1/metrics");
        assert_eq!(on(&c, Signal::Traces).endpoint, "http://collector:4318/v1/traces");
        assert_eq!(on(&c, Signal::Traces).tls, None, "plain text");
        let c = otel(&["--otlp-endpoint=http://collector:4317", "--otlp-protocol=grpc"]);
        assert_eq!(on(&c, Signal::Metrics).endpoint, "http://collector:4317");
        let c = otel(&["--otlp-metrics-endpoint=http://m:9/custom", "--otel-traces-exporter=none"]);
        assert_eq!(on(&c, Signal::Metrics).endpoint, "http://m:9/custom");
        assert_eq!(c.signal(Signal::Traces).expect("valid"), None);
        let c = otel(&["--otlp-endpoint=http://c:4318", "--otel-metrics-exporter=none"]);
        assert_eq!(c.signal(Signal::Metrics).expect("valid"), None);
        let c = otel(&["--otlp-endpoint=HTTPS://c:4318"]);
        assert_eq!(on(&c, Signal::Metrics).endpoint, "https://c:4318/v1/metrics");
        assert_eq!(on(&c, Signal::Metrics).tls, Some(ExportTls::default()), "system roots, no client certificate");
    }

    #[test]
    fn a_grpc_endpoint_without_scheme_is_tls_unless_insecure() {
        let c = otel(&["--otlp-endpoint=collector:4317", "--otlp-protocol=grpc"]);
        assert_eq!(on(&c, Signal::Metrics).endpoint, "https://collector:4317");
        let c = with_env(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
                ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "false"),
            ],
        )
        .expect("valid");
        assert_eq!(on(&c, Signal::Metrics).endpoint, "http://collector:4317");
        assert_eq!(on(&c, Signal::Traces).endpoint, "https://collector:4317", "the signal's own setting wins");
        // A scheme decides, whatever insecure says.
        let c = otel(&["--otlp-endpoint=https://collector:4317", "--otlp-protocol=grpc", "--otlp-insecure=true"]);
        assert_eq!(on(&c, Signal::Metrics).endpoint, "https://collector:4317");
        let err = with_env(&[], &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "collector:4318")]).expect_err("http");
        assert!(err.contains("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") && err.contains("http/protobuf"), "{err}");
    }

    #[test]
    fn options_resolve_signal_over_common_and_headers_replace() {
        let c = otel(&[
            "--otlp-endpoint=http://c:4318",
            "--otlp-headers=authorization=Bearer%20abc,x-team=sre",
            "--otlp-metrics-headers=x-team=platform",
            "--otlp-compression=gzip",
            "--otlp-traces-compression=none",
            "--otlp-timeout=2500",
            "--otlp-traces-timeout=700",
        ]);
        let m = on(&c, Signal::Metrics);
        assert_eq!(m.headers, BTreeMap::from([("x-team".into(), "platform".into())]), "replaced, not merged");
        assert_eq!(m.compression, Compression::Gzip);
        assert_eq!(m.timeout, Duration::from_millis(2500));
        let t = on(&c, Signal::Traces);
        assert_eq!(t.headers["authorization"], "Bearer abc", "the common headers");
        assert_eq!(t.compression, Compression::None);
        assert_eq!(t.timeout, Duration::from_millis(700));
    }

    #[test]
    fn a_flag_wins_over_its_variable_and_a_signal_variable_over_a_common_flag() {
        let c = with_env(
            &["--otlp-headers=x-from=flag", "--otlp-timeout=1000"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-from=variable"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "3000"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-from=traces-variable"),
            ],
        )
        .expect("valid");
        let m = on(&c, Signal::Metrics);
        assert_eq!(m.headers["x-from"], "flag");
        assert_eq!(m.timeout, Duration::from_secs(1));
        assert_eq!(on(&c, Signal::Traces).headers["x-from"], "traces-variable");
    }

    #[test]
    fn tls_files_resolve_per_signal_and_must_exist() {
        let dir = tempfile::tempdir().expect("dir");
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "x").expect("write");
            path.display().to_string()
        };
        let (ca, metrics_ca, cert, key) = (file("ca"), file("mca"), file("cert"), file("key"));
        let c = with_env(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca),
                ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", &metrics_ca),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key),
            ],
        )
        .expect("valid");
        let m = on(&c, Signal::Metrics).tls.expect("tls");
        assert_eq!(m.certificate.expect("ca").variable, "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE");
        let (cert_file, key_file) = m.client.expect("client");
        assert_eq!((cert_file.path.display().to_string(), key_file.path.display().to_string()), (cert.clone(), key));
        let t = on(&c, Signal::Traces).tls.expect("tls");
        assert_eq!(t.certificate.expect("ca").path.display().to_string(), ca);

        let err = with_env(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", &cert),
            ],
        )
        .expect_err("no key");
        assert!(err.contains("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY"), "{err}");
        let err = with_env(
            &[],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318"), ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca")],
        )
        .expect_err("missing file");
        assert!(err.contains("OTEL_EXPORTER_OTLP_CERTIFICATE") && err.contains("no such file"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected() {
        for args in [
            &["--otlp-endpoint=ftp://collector:4318"][..],
            &["--otlp-endpoint=collector:4318/path"],
            &["--otlp-endpoint=https://"],
            &["--otlp-endpoint=collector:4318"],
            &["--otlp-protocol=http/json"],
            &["--otlp-headers=novalue"],
            &["--otlp-headers=bad header=1"],
            &["--otlp-endpoint=http://c:1", "--otlp-metrics-headers=x=%0A"],
            &["--otlp-insecure=perhaps"],
            &["--otlp-timeout=10s"],
            &["--otlp-metric-export-interval=0"],
            &["--otlp-metric-export-interval=18446744073709551615"],
            &["--otlp-temporality=sometimes"],
            &["--otlp-histogram=log"],
        ] {
            assert!(with_env(args, &[]).is_err(), "{args:?}");
        }
    }
}

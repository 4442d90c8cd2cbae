//! Logging, the OpenTelemetry resource that names this agent, and the OTLP push of metrics
//! and slow-probe spans.

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

mod otlp;
mod spans;

pub use otlp::{metric_push, tracer_provider, MetricPush, PushReader, TelemetryError};
pub use spans::ProbeSpans;

/// The OpenTelemetry SDK reports export failures through its own logs every interval, and
/// kube logs every refused or failed request of a watch; the agent summarises both itself
/// (see `otlp` and `discovery`), rate-limited, so theirs are off unless `RUST_LOG` asks.
const QUIET_SDK: &str = "opentelemetry=off,opentelemetry_sdk=off,opentelemetry_prometheus=off,\
kube_runtime::watcher=error,kube_client::client::builder=off";

/// Installs the log subscriber: `RUST_LOG` filtering (else `default_level`), text or JSON lines.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{default_level},{QUIET_SDK}")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Who this agent is, as resource attributes: the SDK's `telemetry.sdk.*`, its own identity,
/// then `OTEL_RESOURCE_ATTRIBUTES`, then `OTEL_SERVICE_NAME` (later ones win). The SDK's
/// environment detector is not used: those variables come through the configuration.
pub fn resource(config: &Config, pod_name: &str, namespace: Option<&str>) -> Resource {
    let mut attributes = vec![
        KeyValue::new("service.name", "kubenurse"),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", pod_name.to_owned()),
        KeyValue::new("k8s.pod.name", pod_name.to_owned()),
    ];
    if let Some(node) = &config.node_name {
        attributes.push(KeyValue::new("k8s.node.name", node.clone()));
    }
    if let Some(namespace) = namespace {
        attributes.push(KeyValue::new("k8s.namespace.name", namespace.to_owned()));
    }
    if let Some(zone) = &config.zone {
        attributes.push(KeyValue::new(crate::metrics::ZONE_ATTRIBUTE, zone.clone()));
    }
    if let Some(extra) = &config.otel.resource_attributes {
        attributes.extend(extra.0.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())));
    }
    if let Some(name) = &config.otel.service_name {
        attributes.push(KeyValue::new("service.name", name.clone()));
    }
    Resource::builder_empty()
        .with_detector(Box::new(opentelemetry_sdk::resource::TelemetryResourceDetector))
        .with_attributes(attributes)
        .build()
}

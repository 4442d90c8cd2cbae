//! Logging and the OpenTelemetry resource that names this agent.

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the log subscriber: `RUST_LOG` filtering (else `default_level`), text or JSON lines.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Who this agent is, as OpenTelemetry resource attributes.
pub fn resource(config: &Config, pod_name: &str) -> Resource {
    let mut attributes = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("k8s.pod.name", pod_name.to_owned()),
    ];
    if let Some(node) = &config.node_name {
        attributes.push(KeyValue::new("k8s.node.name", node.clone()));
    }
    if let Some(namespace) = &config.namespace {
        attributes.push(KeyValue::new("k8s.namespace.name", namespace.clone()));
    }
    Resource::builder_empty().with_service_name("kubenurse").with_attributes(attributes).build()
}

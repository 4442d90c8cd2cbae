//! kubenurse: a Kubernetes network health agent, compatible with postfinance/kubenurse and
//! OpenTelemetry-native.
//!
//! Data flows one way: [`config`] → [`discovery`] → [`selection`] → [`scheduler`] →
//! [`probe`] → [`metrics`], with [`server`] reading shared state ([`liveness`]: whether rounds still finish). [`targets`] turns the
//! configuration into what to probe. [`agent`] wires one agent.

pub mod agent;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod error_text;
pub mod incoming;
pub mod kube_client;
pub mod listener;
pub mod liveness;
pub mod metrics;
pub mod probe;
pub mod ratelimit;
pub mod scheduler;
pub mod selection;
pub mod server;
pub mod shutdown;
pub mod sync;
pub mod targets;
pub mod telemetry;
pub mod tls;

//! The agent's configuration: every option is a CLI flag with an environment twin, parsed and
//! validated once at start-up. Nothing else in the crate reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod checks;
pub mod otel;

use checks::parse_extra_checks;
pub use checks::{ExtraCheck, ExtraChecks};

/// Exit status for bad configuration (`EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// The longest duration any option accepts.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Prometheus' classic buckets, in seconds.
pub const DEFAULT_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Parser)]
#[command(
    name = "kubenurse",
    version,
    about = "Kubernetes network health agent",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run N agents on loopback addresses (127.0.0.2, …) probing each other, and print a
    /// per-pair status table every round. No Kubernetes needed.
    Demo(DemoArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Number of agents to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=50))]
    pub nodes: u8,
    /// Port every demo agent listens on (each on its own loopback address).
    #[arg(long, default_value_t = 18080)]
    pub port: u16,
    /// Interval between rounds.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Stop after this many rounds (0 = until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub rounds: u64,
    /// Spread the agents over this many zones (`zone-1`…), round robin; 0 = zones unknown.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=50))]
    pub zones: u8,
}

/// Where neighbours come from (`KUBENURSE_DISCOVERY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryMode {
    /// The endpoints of the agents' Service, minus pods on cordoned nodes.
    #[value(name = "endpointslices")]
    EndpointSlices,
    /// The agent pods and every node, as the Go agent watches them.
    Pods,
}

/// The longest default discovery jitter, whatever the check interval.
const MAX_DEFAULT_JITTER: Duration = Duration::from_secs(60);

/// How much the neighbour probes record (`KUBENURSE_METRICS_DETAIL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsDetail {
    /// Every instrument for every probe, as the Go agent.
    Full,
    /// Neighbour probes skip the per-event histogram (the largest share of the series).
    Lean,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything the agent needs to know, typed. Build it with [`Config::from_flags`] in
/// tests; `main` parses the real command line and environment.
#[derive(Debug, Clone, Parser)]
#[command(name = "kubenurse")]
pub struct Config {
    /// URL of the agent's own ingress; `/alwayshappy` is appended (probe `me_ingress`).
    #[arg(long, env = "KUBENURSE_INGRESS_URL", value_parser = parse_base_url)]
    pub ingress_url: Option<String>,
    /// URL of the agent's own service; `/alwayshappy` is appended (probe `me_service`).
    #[arg(long, env = "KUBENURSE_SERVICE_URL", value_parser = parse_base_url)]
    pub service_url: Option<String>,
    /// Skip TLS certificate verification on every probe but the apiserver probes, which carry
    /// the service-account token and always verify.
    #[arg(long, env = "KUBENURSE_INSECURE", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub insecure: bool,
    /// PEM file with extra CA certificates to trust, on top of the system roots and the
    /// service-account `ca.crt`.
    #[arg(long, env = "KUBENURSE_EXTRA_CA")]
    pub extra_ca: Option<PathBuf>,
    /// Extra targets, `name:url` entries separated by `|`; each is probed as type `name`. A
    /// URL is `http(s)://…` (a GET, success is 200), `tcp://host:port` (success is a
    /// connection), `dns://name` (the system's resolver configuration) or
    /// `dns://name@server[:port]` (success is an A or AAAA address).
    #[arg(long, env = "KUBENURSE_EXTRA_CHECKS", value_parser = parse_extra_checks)]
    pub extra_checks: Option<ExtraChecks>,
    /// Namespace the kubenurse pods run in (neighbour discovery) [default: the agent's own
    /// namespace, from the service-account `namespace` file].
    #[arg(long, env = "KUBENURSE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Label selector of the kubenurse pods (neighbour discovery); empty selects every pod in
    /// the namespace, as in the Go agent.
    #[arg(long, env = "KUBENURSE_NEIGHBOUR_FILTER", default_value = "")]
    pub neighbour_filter: String,
    /// How many neighbours each agent probes (0 = all).
    #[arg(long, env = "KUBENURSE_NEIGHBOUR_LIMIT", default_value_t = 10)]
    pub neighbour_limit: usize,
    /// Also probe neighbours on cordoned or unknown nodes (no node watch, no ClusterRole).
    #[arg(long, env = "KUBENURSE_ALLOW_UNSCHEDULABLE", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub allow_unschedulable: bool,
    /// Run the `api_server_direct` probe.
    #[arg(long, env = "KUBENURSE_CHECK_API_SERVER_DIRECT", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub check_api_server_direct: bool,
    /// Run the `api_server_dns` probe.
    #[arg(long, env = "KUBENURSE_CHECK_API_SERVER_DNS", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub check_api_server_dns: bool,
    /// Run the `me_ingress` probe.
    #[arg(long, env = "KUBENURSE_CHECK_ME_INGRESS", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub check_me_ingress: bool,
    /// Run the `me_service` probe.
    #[arg(long, env = "KUBENURSE_CHECK_ME_SERVICE", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub check_me_service: bool,
    /// Run the neighbour (`path_<node>`) probes.
    #[arg(long, env = "KUBENURSE_CHECK_NEIGHBOURHOOD", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub check_neighbourhood: bool,
    /// Time between the starts of two rounds.
    #[arg(long, env = "KUBENURSE_CHECK_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub check_interval: Duration,
    /// Keep connections open between rounds instead of a fresh DNS + TCP + TLS path per probe.
    #[arg(long, env = "KUBENURSE_REUSE_CONNECTIONS", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub reuse_connections: bool,
    /// How long to keep serving after SIGTERM while `/ready` answers 503.
    #[arg(long, env = "KUBENURSE_SHUTDOWN_DURATION", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_duration: Duration,
    /// Histogram bucket bounds in seconds, comma-separated, strictly increasing.
    #[arg(long, env = "KUBENURSE_HISTOGRAM_BUCKETS", value_parser = parse_buckets)]
    pub histogram_buckets: Option<Buckets>,
    /// Also serve HTTPS on the TLS listener, and probe neighbours over HTTPS.
    #[arg(long, env = "KUBENURSE_USE_TLS", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub use_tls: bool,
    /// PEM certificate (chain) for the TLS listener.
    #[arg(long, env = "KUBENURSE_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key for the TLS listener.
    #[arg(long, env = "KUBENURSE_CERT_KEY")]
    pub cert_key: Option<PathBuf>,
    /// Apiserver host (set by Kubernetes in every pod).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    pub kubernetes_service_host: Option<String>,
    /// Apiserver port (set by Kubernetes in every pod).
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", default_value_t = 443)]
    pub kubernetes_service_port: u16,
    /// DNS name of the apiserver service (probe `api_server_dns`).
    #[arg(long, env = "KUBERNETES_SERVICE_DNS", default_value = "kubernetes.default.svc.cluster.local")]
    pub kubernetes_service_dns: String,
    /// Plain HTTP listener.
    #[arg(long, env = "KUBENURSE_LISTEN_ADDR", default_value = "[::]:8080")]
    pub listen_addr: SocketAddr,
    /// TLS listener (with `KUBENURSE_USE_TLS=true`).
    #[arg(long, env = "KUBENURSE_TLS_LISTEN_ADDR", default_value = "[::]:8443")]
    pub tls_listen_addr: SocketAddr,
    /// Port probed on neighbours [default: 8080, or 8443 with TLS].
    #[arg(long, env = "KUBENURSE_NEIGHBOUR_PORT")]
    pub neighbour_port: Option<u16>,
    /// This agent's pod name [default: the hostname].
    #[arg(long, env = "KUBENURSE_POD_NAME")]
    pub pod_name: Option<String>,
    /// This agent's node name [default: read from the own pod].
    #[arg(long, env = "KUBENURSE_NODE_NAME")]
    pub node_name: Option<String>,
    /// Directory with the service-account `token` and `ca.crt`.
    #[arg(
        long,
        env = "KUBENURSE_SERVICE_ACCOUNT_DIR",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount"
    )]
    pub service_account_dir: PathBuf,
    /// Deadline of one probe, from start to response headers.
    #[arg(long, env = "KUBENURSE_CHECK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub check_timeout: Duration,
    /// A probe slower than this (or failed) is exported as a span.
    #[arg(long, env = "KUBENURSE_SLOW_THRESHOLD", default_value = "1s", value_parser = parse_duration)]
    pub slow_threshold: Duration,
    /// Static neighbours `node[@zone]=host:port[+host:port],…` (a second address of the other
    /// family makes the node dual-stack), used instead of the Kubernetes API.
    #[arg(long, env = "KUBENURSE_NEIGHBOURS", value_parser = parse_static_neighbours)]
    pub neighbours: Option<StaticNeighbours>,
    /// This agent's availability zone [default: its endpoint's `zone`, or its node's
    /// `topology.kubernetes.io/zone` label in pods mode].
    #[arg(long, env = "KUBENURSE_ZONE", value_parser = parse_zone)]
    pub zone: Option<String>,
    /// Kubeconfig to use when not running in a pod (only when set explicitly).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// DNS servers for the probes' name lookups, `ip[:port]` separated by commas, instead of
    /// the `nameserver` lines of `/etc/resolv.conf` (whose search list and `ndots` still apply).
    #[arg(long, env = "KUBENURSE_DNS_SERVERS", value_parser = parse_dns_servers)]
    pub dns_servers: Option<DnsServers>,
    /// First wait after a failed Kubernetes list or watch; doubles (with jitter) per failure.
    #[arg(long, env = "KUBENURSE_DISCOVERY_BACKOFF_BASE", default_value = "1s", value_parser = parse_duration)]
    pub discovery_backoff_base: Duration,
    /// Longest wait between two failed Kubernetes lists or watches.
    #[arg(long, env = "KUBENURSE_DISCOVERY_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub discovery_backoff_max: Duration,
    /// Where neighbours come from in a cluster: the EndpointSlices of the agents' Service
    /// (`endpointslices`), or the pods and nodes as the Go agent reads them (`pods`).
    #[arg(long, env = "KUBENURSE_DISCOVERY", value_enum, default_value = "endpointslices")]
    pub discovery: DiscoveryMode,
    /// The agents' Service, in the agent's own namespace, whose EndpointSlices list the
    /// neighbours (`KUBENURSE_DISCOVERY=endpointslices`).
    #[arg(long, env = "KUBENURSE_NEIGHBOUR_SERVICE", default_value = "kubenurse")]
    pub neighbour_service: String,
    /// Discovery starts after a random delay of up to this long, so that the agents of a
    /// rollout do not all list at once; 0s starts at once [default: the check interval, at
    /// most 1m].
    #[arg(long, env = "KUBENURSE_DISCOVERY_JITTER", value_parser = parse_duration)]
    pub discovery_jitter: Option<Duration>,
    /// `full`: every instrument for every probe, as the Go agent; `lean`: neighbour probes
    /// record request duration, requests and errors, and no per-event histogram.
    #[arg(long, env = "KUBENURSE_METRICS_DETAIL", value_enum, default_value = "full")]
    pub metrics_detail: MetricsDetail,
    /// Series of probe types no longer probed (a neighbour that left) are dropped by
    /// restarting every series, at most this often; 0s keeps them until the agent restarts.
    #[arg(long, env = "KUBENURSE_SERIES_RESET_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub series_reset_interval: Duration,
    /// How often the certificate files (TLS listener, `KUBENURSE_EXTRA_CA`, service-account
    /// `ca.crt`, OTLP certificates) are checked for new content; 0s reads them once at start.
    #[arg(long, env = "KUBENURSE_RELOAD_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Log format.
    #[arg(long, env = "KUBENURSE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub otel: otel::OtelConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Buckets(pub Vec<f64>);

/// One `KUBENURSE_NEIGHBOURS` entry: a node and the `host:port` its agent listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNeighbour {
    pub node: String,
    pub zone: Option<String>,
    /// `host:port` of the agent, one per address family (never empty).
    pub addresses: Vec<(String, u16)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNeighbours(pub Vec<StaticNeighbour>);

/// `KUBENURSE_DNS_SERVERS`: the name servers the probes ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsServers(pub Vec<SocketAddr>);

/// A configuration that cannot work, named after the variable that holds it.
#[derive(Debug, thiserror::Error)]
#[error("{variable}={value:?}: {problem}")]
pub struct ConfigError {
    pub variable: String,
    pub value: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(variable: &str, value: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { variable: variable.to_owned(), value: value.into(), problem: problem.into() }
    }
}

impl Cli {
    /// Parses `args` with the environment variables that `env` returns, instead of reading the
    /// process environment (`main` passes `std::env::var`, tests pass their own). An empty
    /// variable counts as unset, as the Go agent reads them with `os.Getenv`. A flag wins
    /// over its variable.
    pub fn try_parse_with_env<I, T>(args: I, env: impl Fn(&str) -> Option<String>) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        parse_with_env(args, env)
    }
}

impl Config {
    /// Parses a configuration from flags alone: no environment variable is read. For tests
    /// and tools that must not depend on the machine they run on.
    pub fn from_flags<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        parse_with_env(
            std::iter::once(std::ffi::OsString::from("kubenurse")).chain(args.into_iter().map(Into::into)),
            |_| None,
        )
    }
}

/// Parses `P` with each argument's environment twin looked up through `env` (empty = unset).
/// clap reads the process environment when an argument is declared, so the twins are
/// replaced by defaults taken from `env` before parsing. Help and version output come from
/// the command as declared, so `--help` still lists every variable.
pub(crate) fn parse_with_env<P, I, T>(args: I, env: impl Fn(&str) -> Option<String>) -> Result<P, clap::Error>
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let command = P::command().mut_args(|arg| {
        let Some(name) = arg.get_env().and_then(|n| n.to_str()).map(str::to_owned) else {
            return arg;
        };
        let arg = arg.env(None);
        match env(&name).filter(|value| !value.is_empty()) {
            Some(value) => arg.default_value(value),
            None => arg,
        }
    });
    let matches = match command.try_get_matches_from(args.clone()) {
        Ok(matches) => matches,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            return Err(P::command().try_get_matches_from(args).err().unwrap_or(e));
        }
        Err(e) => return Err(e),
    };
    P::from_arg_matches(&matches)
}

impl Config {
    /// Cross-field checks that a single value parser cannot make.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero =
            [("KUBENURSE_CHECK_INTERVAL", self.check_interval), ("KUBENURSE_CHECK_TIMEOUT", self.check_timeout)];
        for (variable, value) in nonzero {
            if value.is_zero() {
                return Err(ConfigError::new(variable, "0s", "must be greater than zero"));
            }
        }
        // Durations far beyond any sensible value would overflow instants and deadlines.
        let durations = [
            ("KUBENURSE_CHECK_INTERVAL", self.check_interval),
            ("KUBENURSE_CHECK_TIMEOUT", self.check_timeout),
            ("KUBENURSE_SHUTDOWN_DURATION", self.shutdown_duration),
            ("KUBENURSE_SLOW_THRESHOLD", self.slow_threshold),
            ("KUBENURSE_DISCOVERY_BACKOFF_BASE", self.discovery_backoff_base),
            ("KUBENURSE_DISCOVERY_BACKOFF_MAX", self.discovery_backoff_max),
            ("KUBENURSE_RELOAD_INTERVAL", self.reload_interval),
        ];
        for (variable, value) in durations {
            if value > MAX_DURATION {
                return Err(ConfigError::new(
                    variable,
                    humantime::format_duration(value).to_string(),
                    "must be at most 1 day",
                ));
            }
        }
        if self.discovery_backoff_base.is_zero() {
            return Err(ConfigError::new("KUBENURSE_DISCOVERY_BACKOFF_BASE", "0s", "must be greater than zero"));
        }
        if self.discovery_backoff_max < self.discovery_backoff_base {
            return Err(ConfigError::new(
                "KUBENURSE_DISCOVERY_BACKOFF_MAX",
                humantime::format_duration(self.discovery_backoff_max).to_string(),
                "must not be shorter than KUBENURSE_DISCOVERY_BACKOFF_BASE",
            ));
        }
        check_label("KUBENURSE_NEIGHBOUR_SERVICE", &self.neighbour_service)?;
        if self.use_tls {
            for (variable, value) in [("KUBENURSE_CERT_FILE", &self.cert_file), ("KUBENURSE_CERT_KEY", &self.cert_key)]
            {
                match value {
                    None => return Err(ConfigError::new(variable, "", "required with KUBENURSE_USE_TLS=true")),
                    Some(path) if !path.is_file() => {
                        return Err(ConfigError::new(variable, path.display().to_string(), "no such file"))
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(path) = &self.extra_ca {
            if !path.is_file() {
                return Err(ConfigError::new("KUBENURSE_EXTRA_CA", path.display().to_string(), "no such file"));
            }
        }
        if let Some(name) = &self.pod_name {
            check_name("KUBENURSE_POD_NAME", name)?;
        }
        if let Some(name) = &self.node_name {
            check_name("KUBENURSE_NODE_NAME", name)?;
        }
        self.otel.validate()?;
        if let Some(host) = &self.kubernetes_service_host {
            if host.is_empty() || host.contains(['/', ' ']) {
                return Err(ConfigError::new("KUBERNETES_SERVICE_HOST", host.clone(), "not a host name or IP address"));
            }
        }
        Ok(())
    }

    /// The histogram bounds in seconds.
    pub fn buckets(&self) -> Vec<f64> {
        self.histogram_buckets.as_ref().map_or_else(|| DEFAULT_BUCKETS.to_vec(), |b| b.0.clone())
    }

    /// The port probed on neighbours.
    pub fn effective_neighbour_port(&self) -> u16 {
        self.neighbour_port.unwrap_or(if self.use_tls { 8443 } else { 8080 })
    }

    /// The longest random delay before discovery starts.
    pub fn discovery_jitter(&self) -> Duration {
        self.discovery_jitter.unwrap_or(self.check_interval.min(MAX_DEFAULT_JITTER))
    }

    /// The extra checks, empty when none are configured.
    pub fn extra_checks(&self) -> &[ExtraCheck] {
        self.extra_checks.as_ref().map_or(&[], |c| c.0.as_slice())
    }
}

/// Turns a clap error into the one-line message `main` prints, naming the variable.
pub fn describe_clap_error(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let long = arg.trim_start_matches("--").split([' ', '=']).next().unwrap_or_default().to_owned();
    let command = <Cli as clap::CommandFactory>::command();
    let env = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    let reason = std::error::Error::source(err).map(ToString::to_string);
    match (env, value, reason) {
        (Some(env), Some(value), Some(reason)) => format!("{env} (--{long})={value:?}: {reason}"),
        (Some(env), Some(value), None) => format!("{env} (--{long})={value:?}: invalid value"),
        _ => err.to_string().lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_owned(),
    }
}

fn check_name(variable: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 253 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(ConfigError::new(
            variable,
            name,
            "not a Kubernetes object name (lowercase letters, digits, '-', '.')",
        ));
    }
    Ok(())
}

/// A Service name: a DNS label (lowercase letters, digits and '-', at most 63 characters).
fn check_label(variable: &str, name: &str) -> Result<(), ConfigError> {
    let edges_ok = !name.starts_with('-') && !name.ends_with('-');
    if name.is_empty()
        || name.len() > 63
        || !edges_ok
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ConfigError::new(
            variable,
            name,
            "not a Service name (a DNS label: lowercase letters, digits, '-')",
        ));
    }
    Ok(())
}

/// `true`/`false` (and `1`/`0`, `yes`/`no`), case-insensitive, like Go's `strconv.ParseBool`
/// plus the common shell spellings.
pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "y" | "on" => Ok(true),
        "false" | "f" | "0" | "no" | "n" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A humantime duration (`5s`, `1m30s`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("not a duration like 5s or 1m30s ({e})"))
}

/// An `http://` or `https://` URL with a host; returned without a trailing slash.
fn parse_base_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let uri: http::Uri = s.parse().map_err(|e| format!("not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("URL must start with http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("URL has no host".into());
    }
    if uri.query().is_some() {
        return Err("URL must not have a query; /alwayshappy is appended to it".into());
    }
    Ok(s.trim_end_matches('/').to_owned())
}

fn parse_buckets(s: &str) -> Result<Buckets, String> {
    let mut bounds = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let value: f64 = part.parse().map_err(|_| format!("{part:?} is not a number of seconds"))?;
        if !value.is_finite() || value <= 0.0 {
            return Err(format!("{part:?} must be a positive number of seconds"));
        }
        if bounds.last().is_some_and(|&last| value <= last) {
            return Err(format!("bounds must be strictly increasing ({part} after {})", bounds.last().unwrap_or(&0.0)));
        }
        bounds.push(value);
    }
    if bounds.len() > 64 {
        return Err("at most 64 bounds".into());
    }
    Ok(Buckets(bounds))
}

fn parse_static_neighbours(s: &str) -> Result<StaticNeighbours, String> {
    let mut neighbours: Vec<StaticNeighbour> = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, addrs) =
            entry.split_once('=').ok_or_else(|| format!("entry {entry:?} is not node[@zone]=host:port[+host:port]"))?;
        let (node, zone) = match name.split_once('@') {
            Some((node, zone)) => (node, Some(zone)),
            None => (name, None),
        };
        check_name("node", node).map_err(|_| format!("{node:?} is not a node name"))?;
        if let Some(zone) = zone {
            check_zone(zone)?;
        }
        let mut addresses = Vec::new();
        for addr in addrs.split('+') {
            let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("{addr:?} has no :port"))?;
            let port: u16 = port.parse().map_err(|_| format!("{addr:?}: port is not a number from 1 to 65535"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || port == 0 || format!("http://{}/", bracket(host)).parse::<http::Uri>().is_err() {
                return Err(format!("{addr:?} is not host:port"));
            }
            addresses.push((host.to_owned(), port));
        }
        let families: Vec<bool> = addresses.iter().map(|(h, _)| h.contains(':')).collect();
        if addresses.len() > 2 || (addresses.len() == 2 && families[0] == families[1]) {
            return Err(format!("{addrs:?}: at most one address per family (IPv4+IPv6)"));
        }
        if neighbours.iter().any(|n| n.node == node) {
            return Err(format!("node {node:?} appears twice"));
        }
        neighbours.push(StaticNeighbour { node: node.to_owned(), zone: zone.map(str::to_owned), addresses });
    }
    Ok(StaticNeighbours(neighbours))
}

/// A zone name is a Kubernetes label value: at most 63 characters, alphanumerics with `-`,
/// `_` or `.` inside.
fn check_zone(zone: &str) -> Result<(), String> {
    let inner_ok = zone.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let ends_ok =
        zone.starts_with(|c: char| c.is_ascii_alphanumeric()) && zone.ends_with(|c: char| c.is_ascii_alphanumeric());
    if zone.is_empty() || zone.len() > 63 || !inner_ok || !ends_ok {
        return Err(format!("{zone:?} is not a zone name (a label value: up to 63 letters, digits, '-', '_', '.')"));
    }
    Ok(())
}

fn parse_zone(s: &str) -> Result<String, String> {
    check_zone(s).map(|()| s.to_owned())
}

/// `ip[:port]` entries separated by commas; the port defaults to 53. IPv6 with a port is
/// written `[::1]:5353`.
fn parse_dns_servers(s: &str) -> Result<DnsServers, String> {
    let servers =
        s.split(',').map(str::trim).filter(|e| !e.is_empty()).map(parse_dns_server).collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err("no server given".into());
    }
    Ok(DnsServers(servers))
}

/// A name server, `ip[:port]`; the port defaults to 53.
fn parse_dns_server(entry: &str) -> Result<SocketAddr, String> {
    let server = match entry.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => match entry.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => return Err(format!("{entry:?} is not an IP address or ip:port")),
        },
    };
    if server.port() == 0 {
        return Err(format!("{entry:?}: port 0"));
    }
    Ok(server)
}

/// Brackets IPv6 literals for use in URLs.
pub fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cfg = Config::from_flags(args.iter().copied()).map_err(|e| describe_clap_error_for(&e))?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    fn describe_clap_error_for(e: &clap::Error) -> String {
        describe_clap_error(e)
    }

    #[test]
    fn defaults_match_the_go_agent() {
        let c = parse(&[]).expect("defaults are valid");
        assert_eq!(c.check_interval, Duration::from_secs(5));
        assert_eq!(c.shutdown_duration, Duration::from_secs(5));
        assert_eq!(c.check_timeout, Duration::from_secs(5));
        assert_eq!(c.neighbour_limit, 10);
        assert_eq!(c.neighbour_filter, "");
        assert_eq!(c.namespace, None);
        assert_eq!(c.kubernetes_service_dns, "kubernetes.default.svc.cluster.local");
        assert_eq!(c.buckets(), DEFAULT_BUCKETS.to_vec());
        assert_eq!(c.listen_addr, "[::]:8080".parse().expect("addr"));
        assert_eq!(c.effective_neighbour_port(), 8080);
        assert!(c.check_api_server_direct && c.check_neighbourhood && !c.insecure && !c.reuse_connections);
    }

    #[test]
    fn values_are_typed() {
        let c = parse(&[
            "--check-interval=1m30s",
            "--neighbour-limit=0",
            "--histogram-buckets=0.001, 0.1,2",
            "--extra-checks=google:https://example.test/healthz|local:http://127.0.0.1:9/x|db:tcp://db.test:5432|coredns:dns://kubernetes.default@10.96.0.10",
            "--neighbours=node-a=127.0.0.2:8080,node-b=[::1]:9090",
            "--insecure=TRUE",
        ])
        .expect("valid");
        assert_eq!(c.check_interval, Duration::from_secs(90));
        assert_eq!(c.neighbour_limit, 0);
        assert_eq!(c.buckets(), vec![0.001, 0.1, 2.0]);
        assert_eq!(c.extra_checks().len(), 4);
        assert_eq!(c.extra_checks()[0].url, "https://example.test/healthz");
        assert_eq!(c.extra_checks()[2].check, crate::probe::Check::Tcp);
        assert_eq!(
            c.extra_checks()[3].check,
            crate::probe::Check::Dns(crate::probe::DnsQuery {
                name: "kubernetes.default".into(),
                server: Some("10.96.0.10:53".parse().expect("addr"))
            })
        );
        let n = c.neighbours.expect("neighbours").0;
        assert_eq!(n[1], StaticNeighbour { node: "node-b".into(), zone: None, addresses: vec![("::1".into(), 9090)] });
        let dual =
            parse(&["--neighbours=node-a@eu-west-1a=127.0.0.2:8080+[::1]:18081", "--zone=eu-west-1b"]).expect("valid");
        assert_eq!(dual.zone.as_deref(), Some("eu-west-1b"));
        let expected = StaticNeighbour {
            node: "node-a".into(),
            zone: Some("eu-west-1a".into()),
            addresses: vec![("127.0.0.2".into(), 8080), ("::1".into(), 18081)],
        };
        assert_eq!(dual.neighbours.expect("neighbours").0, [expected]);
        assert!(c.insecure);
    }

    #[test]
    fn every_bad_value_is_named_in_one_line() {
        let cases: &[(&[&str], &str)] = &[
            (&["--check-interval=5 parsecs"], "KUBENURSE_CHECK_INTERVAL"),
            (&["--check-interval=0s"], "KUBENURSE_CHECK_INTERVAL"),
            (&["--check-timeout=0s"], "KUBENURSE_CHECK_TIMEOUT"),
            (&["--shutdown-duration=soon"], "KUBENURSE_SHUTDOWN_DURATION"),
            (&["--neighbour-limit=-1"], "KUBENURSE_NEIGHBOUR_LIMIT"),
            (&["--neighbour-limit=ten"], "KUBENURSE_NEIGHBOUR_LIMIT"),
            (&["--histogram-buckets=0.1,0.05"], "KUBENURSE_HISTOGRAM_BUCKETS"),
            (&["--histogram-buckets=0.1,0.1"], "KUBENURSE_HISTOGRAM_BUCKETS"),
            (&["--histogram-buckets=0.1,fast"], "KUBENURSE_HISTOGRAM_BUCKETS"),
            (&["--histogram-buckets=-1"], "KUBENURSE_HISTOGRAM_BUCKETS"),
            (&["--extra-checks=nocolon"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--extra-checks=bad name:http://x"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--extra-checks=me_ingress:http://x"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--extra-checks=a:ftp://x"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--extra-checks=a:http://x|a:http://y"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--extra-checks=a:udp://x:53"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--extra-checks=a:tcp://x"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--extra-checks=a:dns://x@coredns"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--extra-checks=a:dns://x@10.96.0.10:0"], "KUBENURSE_EXTRA_CHECKS"),
            (&["--listen-addr=localhost"], "KUBENURSE_LISTEN_ADDR"),
            (&["--tls-listen-addr=1.2.3.4:99999"], "KUBENURSE_TLS_LISTEN_ADDR"),
            (&["--ingress-url=not a url"], "KUBENURSE_INGRESS_URL"),
            (&["--service-url=kubenurse:8080"], "KUBENURSE_SERVICE_URL"),
            (&["--use-tls=true"], "KUBENURSE_CERT_FILE"),
            (&["--use-tls=maybe"], "KUBENURSE_USE_TLS"),
            (&["--neighbours=node-a"], "KUBENURSE_NEIGHBOURS"),
            (&["--neighbours=node-a=127.0.0.1:0"], "KUBENURSE_NEIGHBOURS"),
            (&["--neighbours=node-a=127.0.0.2:80+127.0.0.3:80"], "KUBENURSE_NEIGHBOURS"),
            (&["--neighbours=node-a=127.0.0.2:80+[::1]:80+[::1]:81"], "KUBENURSE_NEIGHBOURS"),
            (&["--neighbours=node-a@=127.0.0.2:80"], "KUBENURSE_NEIGHBOURS"),
            (&["--neighbours=node-a@zone a=127.0.0.2:80"], "KUBENURSE_NEIGHBOURS"),
            (&["--zone=-zone"], "KUBENURSE_ZONE"),
            (&["--zone=zone/1"], "KUBENURSE_ZONE"),
            (&["--extra-ca=/nonexistent/ca.pem"], "KUBENURSE_EXTRA_CA"),
            (&["--kubernetes-service-port=https"], "KUBERNETES_SERVICE_PORT"),
            (&["--pod-name=Bad_Name"], "KUBENURSE_POD_NAME"),
            (&["--check-timeout=300000000000y"], "KUBENURSE_CHECK_TIMEOUT"),
            (&["--check-interval=2d"], "KUBENURSE_CHECK_INTERVAL"),
            (&["--discovery-backoff-max=1000y"], "KUBENURSE_DISCOVERY_BACKOFF_MAX"),
        ];
        for (args, variable) in cases {
            let err = parse(args).expect_err(&format!("{args:?} must be rejected"));
            assert!(err.contains(variable), "{args:?}: {err:?} does not name {variable}");
            assert!(!err.contains('\n'), "{args:?}: message has several lines: {err:?}");
        }
    }

    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: std::collections::HashMap<String, String> =
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cli = Cli::try_parse_with_env(std::iter::once("kubenurse").chain(args.iter().copied()), |name| {
            env.get(name).cloned()
        })
        .map_err(|e| describe_clap_error(&e))?;
        cli.config.validate().map_err(|e| e.to_string())?;
        Ok(cli.config)
    }

    /// Every variable of the command, as declared.
    fn every_variable() -> Vec<String> {
        <Cli as clap::CommandFactory>::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn an_empty_variable_is_unset_like_in_the_go_agent() {
        let variables = every_variable();
        assert!(variables.len() > 40, "{variables:?}");
        for variable in &variables {
            let config = parse_env(&[], &[(variable.as_str(), "")])
                .unwrap_or_else(|e| panic!("{variable}=\"\" must mean unset, got: {e}"));
            let defaults = parse_env(&[], &[]).expect("defaults");
            assert_eq!(format!("{config:?}"), format!("{defaults:?}"), "{variable}=\"\" differs from unset");
        }
        // All of them empty at once, as a Helm chart with blank values renders them.
        let all: Vec<(&str, &str)> = variables.iter().map(|v| (v.as_str(), "")).collect();
        parse_env(&[], &all).expect("all empty = all unset");
    }

    #[test]
    fn variables_are_read_through_the_given_lookup_and_flags_win() {
        let c = parse_env(
            &["--neighbour-limit=3"],
            &[
                ("KUBENURSE_CHECK_INTERVAL", "2s"),
                ("KUBENURSE_NEIGHBOUR_LIMIT", "7"),
                ("KUBENURSE_NAMESPACE", "monitoring"),
                ("KUBENURSE_DNS_SERVERS", "127.0.0.1:5353, ::1"),
            ],
        )
        .expect("valid");
        assert_eq!(c.check_interval, Duration::from_secs(2));
        assert_eq!(c.neighbour_limit, 3, "the flag wins over the variable");
        assert_eq!(c.namespace.as_deref(), Some("monitoring"));
        assert_eq!(
            c.dns_servers,
            Some(DnsServers(vec!["127.0.0.1:5353".parse().expect("addr"), "[::1]:53".parse().expect("addr")]))
        );
    }

    #[test]
    fn a_bad_non_empty_variable_is_named() {
        for (variable, value) in [
            ("KUBENURSE_CHECK_INTERVAL", "soon"),
            ("KUBENURSE_NEIGHBOUR_LIMIT", "ten"),
            ("KUBENURSE_INSECURE", "maybe"),
            ("KUBENURSE_DNS_SERVERS", "dns.example"),
            ("KUBENURSE_DISCOVERY_BACKOFF_BASE", "0s"),
        ] {
            let err = parse_env(&[], &[(variable, value)]).expect_err(variable);
            assert!(err.contains(variable), "{err}");
        }
        let err =
            parse_env(&[], &[("KUBENURSE_DISCOVERY_BACKOFF_BASE", "10s"), ("KUBENURSE_DISCOVERY_BACKOFF_MAX", "1s")])
                .expect_err("max below base");
        assert!(err.contains("KUBENURSE_DISCOVERY_BACKOFF_MAX"), "{err}");
    }

    #[test]
    fn discovery_defaults_to_endpointslices_with_a_jitter_of_one_interval() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.discovery, DiscoveryMode::EndpointSlices);
        assert_eq!(c.neighbour_service, "kubenurse");
        assert_eq!(c.discovery_jitter(), Duration::from_secs(5), "the check interval");
        let c = parse(&["--check-interval=1h"]).expect("valid");
        assert_eq!(c.discovery_jitter(), Duration::from_secs(60), "at most a minute by default");
        let c = parse_env(
            &[],
            &[
                ("KUBENURSE_DISCOVERY", "pods"),
                ("KUBENURSE_NEIGHBOUR_SERVICE", "nurse-2"),
                ("KUBENURSE_DISCOVERY_JITTER", "0s"),
            ],
        )
        .expect("valid");
        assert_eq!((c.discovery, c.neighbour_service.as_str()), (DiscoveryMode::Pods, "nurse-2"));
        assert_eq!(c.discovery_jitter(), Duration::ZERO);
        for (variable, value) in [
            ("KUBENURSE_DISCOVERY", "endpoints"),
            ("KUBENURSE_NEIGHBOUR_SERVICE", "Kubenurse"),
            ("KUBENURSE_NEIGHBOUR_SERVICE", "kube.nurse"),
            ("KUBENURSE_DISCOVERY_JITTER", "soon"),
        ] {
            let err = parse_env(&[], &[(variable, value)]).expect_err(value);
            assert!(err.contains(variable) && !err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn metrics_detail_and_series_reset_interval() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.metrics_detail, MetricsDetail::Full, "Go-compatible by default");
        assert_eq!(c.series_reset_interval, Duration::from_secs(600));
        let c = parse_env(&[], &[("KUBENURSE_METRICS_DETAIL", "lean"), ("KUBENURSE_SERIES_RESET_INTERVAL", "0s")])
            .expect("valid");
        assert_eq!((c.metrics_detail, c.series_reset_interval), (MetricsDetail::Lean, Duration::ZERO));
        for (variable, value) in [("KUBENURSE_METRICS_DETAIL", "minimal"), ("KUBENURSE_SERIES_RESET_INTERVAL", "often")]
        {
            let err = parse_env(&[], &[(variable, value)]).expect_err(value);
            assert!(err.contains(variable) && !err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn help_lists_every_variable() {
        let help = <Cli as clap::CommandFactory>::command().render_long_help().to_string();
        for variable in [
            "KUBENURSE_INGRESS_URL",
            "KUBENURSE_EXTRA_CHECKS",
            "KUBENURSE_HISTOGRAM_BUCKETS",
            "KUBERNETES_SERVICE_DNS",
            "KUBENURSE_NEIGHBOURS",
        ] {
            assert!(help.contains(variable), "--help lacks {variable}");
        }
    }
}

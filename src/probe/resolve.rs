//! Name resolution for the probes: asynchronous and cancellable (a probe that runs out of
//! time drops its lookup, so a DNS outage cannot pile up blocked threads), on one resolver
//! that every probe shares, configured like the system's: `/etc/hosts` first, then the
//! servers, search list and `ndots` of `/etc/resolv.conf`, the servers replaced by
//! `KUBENURSE_DNS_SERVERS` when it is set.
//!
//! The DNS checks (`dns://`, see `dns_check`) use the same servers, search list and `ndots`,
//! on a resolver of their own with one attempt and the check's timeout.
//!
//! Nothing is cached: each probe measures a real lookup, as with the Go agent (whose resolver
//! has no cache), so `dns_done` times the cluster DNS path, and a DNS outage shows in the next
//! round instead of after the records' TTL.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
    ServerOrderingStrategy,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::proto::ProtoError;
use hickory_resolver::{Hosts, TokioResolver};

use crate::config::DnsServers;

const RESOLV_CONF: &str = "/etc/resolv.conf";
const HOSTS: &str = "/etc/hosts";

#[derive(Debug, thiserror::Error)]
#[error("cannot build the DNS resolver: {0}")]
pub struct ResolverError(#[source] NetError);

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("lookup {host}: invalid name: {source}")]
    InvalidName { host: String, source: ProtoError },
    #[error("lookup {host}: {source}")]
    Dns { host: String, source: NetError },
    #[error("lookup {host}: no addresses")]
    NoAddresses { host: String },
}

impl LookupError {
    /// The class of the error, for the span's `error.type`.
    pub fn cause(&self) -> Option<&'static str> {
        match self {
            LookupError::InvalidName { .. } => None,
            LookupError::Dns { source, .. } => cause(source),
            LookupError::NoAddresses { .. } => Some("no_address"),
        }
    }
}

/// The class of a DNS error: `timeout`, `nxdomain`, `no_address` (an answer without
/// records), `servfail`, `refused` (by the server's answer, or no server listening).
pub(super) fn cause(error: &NetError) -> Option<&'static str> {
    match error {
        NetError::Timeout => Some("timeout"),
        NetError::Dns(DnsError::NoRecordsFound(no)) if no.response_code == ResponseCode::NXDomain => Some("nxdomain"),
        NetError::Dns(DnsError::NoRecordsFound(_)) => Some("no_address"),
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => Some("servfail"),
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => Some("refused"),
        NetError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some("refused"),
        _ => None,
    }
}

/// The DNS checks' resolvers by server (`None`: the system's) and timeout.
type CheckResolvers = HashMap<(Option<SocketAddr>, Duration), TokioResolver>;

/// The probes' resolver; clones share one instance.
#[derive(Clone)]
pub struct Resolver {
    dns: TokioResolver,
    hosts: Arc<Hosts>,
    /// The servers and search list the resolver was built with, for the DNS checks.
    pub(super) system: ResolverConfig,
    pub(super) options: ResolverOpts,
    /// The DNS checks' resolvers, built on first use and kept: their settings never change,
    /// and nothing is cached in them.
    checks: Arc<Mutex<CheckResolvers>>,
}

impl Resolver {
    /// A resolver configured from `/etc/resolv.conf` and `/etc/hosts`, asking `servers`
    /// instead of the configured name servers when given.
    pub fn from_system(servers: Option<&DnsServers>) -> Result<Self, ResolverError> {
        Self::new(&read_or_empty(RESOLV_CONF), &read_or_empty(HOSTS), servers)
    }

    /// A resolver from the contents of a `resolv.conf` and a `hosts` file. Without name
    /// servers (or without a `resolv.conf`) it asks the local host, as Go and glibc do.
    pub fn new(resolv_conf: &[u8], hosts: &[u8], servers: Option<&DnsServers>) -> Result<Self, ResolverError> {
        let (conf, errors) = resolv_conf::Config::parse_with_errors(resolv_conf);
        for error in errors {
            tracing::warn!(file = RESOLV_CONF, %error, "ignoring a line of the resolver configuration");
        }
        let servers: Vec<SocketAddr> = match servers {
            Some(servers) => servers.0.clone(),
            None => conf.get_nameservers_or_local().iter().map(|ip| SocketAddr::new(ip.into(), 53)).collect(),
        };
        let name_servers = servers.iter().map(|addr| name_server(*addr)).collect();
        let search = conf
            .get_last_search_or_domain()
            .filter(|domain| *domain != "--")
            .filter_map(|domain| Name::from_str_relaxed(domain).ok())
            .collect();

        let mut options = ResolverOpts::default();
        options.ndots = conf.ndots as usize;
        options.timeout = Duration::from_secs(conf.timeout.into());
        options.attempts = conf.attempts as usize;
        options.edns0 = conf.edns0;
        // Servers are asked in the configured order, as glibc and Go do, unless `rotate`.
        options.server_ordering_strategy =
            if conf.rotate { ServerOrderingStrategy::RoundRobin } else { ServerOrderingStrategy::UserProvidedOrder };
        // Both families, in parallel, IPv4 first: the dialer races the other family.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.cache_size = 0;
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);
        // `lookup` reads the hosts file itself, for both families at once.
        options.use_hosts_file = ResolveHosts::Never;

        let system = ResolverConfig::from_parts(None, search, name_servers);
        let dns = build(system.clone(), options.clone()).map_err(ResolverError)?;
        let mut static_hosts = Hosts::default();
        if let Err(error) = static_hosts.read_hosts_conf(hosts) {
            tracing::warn!(file = HOSTS, %error, "cannot read the hosts file");
        }
        Ok(Self { dns, hosts: Arc::new(static_hosts), system, options, checks: Arc::default() })
    }

    /// The resolver of a DNS check: asking `server`, or the system's servers; no search list
    /// (the check expands names itself), one attempt, `timeout` per query, no cache.
    pub(super) fn for_check(&self, server: Option<SocketAddr>, timeout: Duration) -> Result<TokioResolver, NetError> {
        let mut checks = crate::sync::lock(&self.checks);
        if let Some(resolver) = checks.get(&(server, timeout)) {
            return Ok(resolver.clone());
        }
        let servers = match server {
            Some(addr) => vec![name_server(addr)],
            None => self.system.name_servers().to_vec(),
        };
        let mut options = self.options.clone();
        options.timeout = timeout;
        // No retry after the first attempt: a SERVFAIL or a lost answer is the check's result.
        options.attempts = 0;
        let resolver = build(ResolverConfig::from_parts(None, Vec::new(), servers), options)?;
        checks.insert((server, timeout), resolver.clone());
        Ok(resolver)
    }

    /// The addresses of `host`. A name in the hosts file is answered from there alone, for
    /// both families, as Go and glibc do: `localhost` never reaches a DNS server.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, LookupError> {
        let name =
            Name::from_utf8(host).map_err(|source| LookupError::InvalidName { host: host.to_owned(), source })?;
        let listed = self.static_host(&name);
        if !listed.is_empty() {
            return Ok(listed);
        }
        let found =
            self.dns.lookup_ip(name).await.map_err(|source| LookupError::Dns { host: host.to_owned(), source })?;
        let addrs: Vec<IpAddr> = found.iter().collect();
        if addrs.is_empty() {
            return Err(LookupError::NoAddresses { host: host.to_owned() });
        }
        Ok(addrs)
    }

    fn static_host(&self, name: &Name) -> Vec<IpAddr> {
        [RecordType::A, RecordType::AAAA]
            .into_iter()
            .filter_map(|kind| self.hosts.lookup_static_host(&Query::query(name.clone(), kind)))
            .flat_map(|lookup| lookup.answers().iter().filter_map(|r| r.data.ip_addr()).collect::<Vec<_>>())
            .collect()
    }
}

fn build(config: ResolverConfig, options: ResolverOpts) -> Result<TokioResolver, NetError> {
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default()).with_options(options).build()
}

/// A name server on `addr`, over UDP with TCP for truncated answers.
fn name_server(addr: SocketAddr) -> NameServerConfig {
    let on_port = |mut connection: ConnectionConfig| {
        connection.port = addr.port();
        connection
    };
    NameServerConfig::new(addr.ip(), true, vec![on_port(ConnectionConfig::udp()), on_port(ConnectionConfig::tcp())])
}

/// A missing or unreadable file reads as empty: the defaults then apply, as in Go.
fn read_or_empty(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|error| {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = path, %error, "cannot read, using the defaults");
        }
        Vec::new()
    })
}

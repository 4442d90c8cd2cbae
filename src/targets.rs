//! What to probe, built from the configuration: the fixed targets (apiserver, ingress,
//! service, extra checks), those skipped and why, and the target of each chosen neighbour.

use std::sync::Arc;

use crate::config::{bracket, Config};
use crate::discovery::Neighbour;
use crate::probe::{Check, Peer, Target, UNKNOWN_ZONE};

/// A probe that is not run, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub kind: String,
    pub reason: String,
}

/// The targets the configuration asks for.
#[derive(Debug, Clone)]
pub struct Targets {
    fixed: Vec<Arc<Target>>,
    skipped: Vec<Skipped>,
    neighbour_scheme: &'static str,
    neighbour_port: u16,
}

impl Targets {
    pub fn from_config(config: &Config) -> Self {
        let mut fixed = Vec::new();
        let mut skipped = Vec::new();
        let mut add = |kind: &str, enabled: bool, url: Option<String>, bearer_token: bool, missing: &str| {
            let target = match (enabled, url) {
                (false, _) => Err(format!("disabled by KUBENURSE_CHECK_{}=false", kind.to_ascii_uppercase())),
                (true, None) => Err(missing.to_owned()),
                (true, Some(url)) => url.parse::<http::Uri>().map_err(|e| format!("invalid URL {url}: {e}")),
            };
            match target {
                Ok(url) => fixed.push(Arc::new(Target {
                    kind: kind.to_owned(),
                    url,
                    check: Check::Http,
                    bearer_token,
                    peer: None,
                })),
                Err(reason) => skipped.push(Skipped { kind: kind.to_owned(), reason }),
            }
        };
        let port = config.kubernetes_service_port;
        let api_direct =
            config.kubernetes_service_host.as_ref().map(|h| format!("https://{}:{port}/version", bracket(h)));
        let api_dns = config
            .kubernetes_service_host
            .as_ref()
            .map(|_| format!("https://{}:{port}/version", bracket(&config.kubernetes_service_dns)));
        let no_apiserver = "no apiserver configured (KUBERNETES_SERVICE_HOST is not set)";
        add("api_server_direct", config.check_api_server_direct, api_direct, true, no_apiserver);
        add("api_server_dns", config.check_api_server_dns, api_dns, true, no_apiserver);
        let ingress = config.ingress_url.as_ref().map(|u| format!("{u}/alwayshappy"));
        add("me_ingress", config.check_me_ingress, ingress, false, "KUBENURSE_INGRESS_URL is not set");
        let service = config.service_url.as_ref().map(|u| format!("{u}/alwayshappy"));
        add("me_service", config.check_me_service, service, false, "KUBENURSE_SERVICE_URL is not set");
        fixed.extend(config.extra_checks().iter().map(|extra| {
            Arc::new(Target {
                kind: extra.name.clone(),
                url: extra.url.clone(),
                check: extra.check.clone(),
                bearer_token: false,
                peer: None,
            })
        }));
        Self {
            fixed,
            skipped,
            neighbour_scheme: if config.use_tls { "https" } else { "http" },
            neighbour_port: config.effective_neighbour_port(),
        }
    }

    /// The apiserver, ingress, service and extra-check targets.
    pub fn fixed(&self) -> &[Arc<Target>] {
        &self.fixed
    }

    /// The fixed probes that are not run.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The targets of a neighbour: `path_<node>` on its first address (IPv4 when it has
    /// both), and `path_<node>_ipv6` on its IPv6 address when it is dual-stack. An address
    /// that makes no URL is left out.
    pub fn neighbour(&self, n: &Neighbour, own_zone: Option<&str>) -> Vec<Arc<Target>> {
        let peer = Peer {
            node: n.node_name.clone(),
            pod: n.pod_name.clone(),
            source_zone: own_zone.unwrap_or(UNKNOWN_ZONE).to_owned(),
            target_zone: n.zone.as_deref().unwrap_or(UNKNOWN_ZONE).to_owned(),
        };
        let mut targets = Vec::with_capacity(n.addresses.len());
        for (i, address) in n.addresses.iter().enumerate() {
            let port = address.port.unwrap_or(self.neighbour_port);
            let url = format!("{}://{}:{port}/alwayshappy", self.neighbour_scheme, bracket(&address.ip));
            let Ok(url) = url.parse() else { continue };
            // Node names contain no `_`, so the suffix cannot collide with another node.
            let kind = match (i, address.is_ipv6()) {
                (0, _) => format!("path_{}", n.node_name),
                (_, true) => format!("path_{}_ipv6", n.node_name),
                (_, false) => continue,
            };
            targets.push(Arc::new(Target {
                kind,
                url,
                check: Check::Http,
                bearer_token: false,
                peer: Some(peer.clone()),
            }));
        }
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Address;

    fn targets(flags: &[&str]) -> Targets {
        Targets::from_config(&Config::from_flags(flags.iter().copied()).expect("config"))
    }

    fn urls_and_skipped(targets: &Targets) -> (Vec<String>, Vec<String>) {
        (
            targets.fixed().iter().map(|t| t.url.to_string()).collect(),
            targets.skipped().iter().map(|s| s.kind.clone()).collect(),
        )
    }

    #[test]
    fn unconfigured_probes_are_skipped() {
        let (urls, skipped) = urls_and_skipped(&targets(&[]));
        assert!(urls.is_empty());
        assert_eq!(skipped, ["api_server_direct", "api_server_dns", "me_ingress", "me_service"]);
    }

    #[test]
    fn configured_probes_get_their_urls() {
        let targets = targets(&[
            "--kubernetes-service-host=fd00::1",
            "--kubernetes-service-port=6443",
            "--ingress-url=https://nurse.example.test/",
            "--service-url=http://kubenurse.kube-system.svc:8080",
            "--check-api-server-dns=false",
            "--extra-checks=dns:http://127.0.0.1:53/x",
        ]);
        let (urls, skipped) = urls_and_skipped(&targets);
        assert_eq!(
            urls,
            [
                "https://[fd00::1]:6443/version",
                "https://nurse.example.test/alwayshappy",
                "http://kubenurse.kube-system.svc:8080/alwayshappy",
                "http://127.0.0.1:53/x"
            ]
        );
        assert_eq!(skipped, ["api_server_dns"]);
        let carries_token: Vec<bool> = targets.fixed().iter().map(|t| t.bearer_token).collect();
        assert_eq!(carries_token, [true, false, false, false], "only the apiserver probes carry the token");
    }

    #[test]
    fn neighbours_are_probed_on_their_pod_ip_with_their_identity() {
        let neighbour = |ips: &[&str], port| Neighbour {
            pod_name: "kubenurse-a".into(),
            addresses: ips.iter().map(|ip| Address { ip: ip.to_string(), port }).collect(),
            host_ip: "10.0.0.1".into(),
            node_name: "node-a".into(),
            node_hash: 0,
            zone: Some("zone-b".into()),
        };
        let plain = targets(&[]).neighbour(&neighbour(&["fd00::7"], None), None);
        assert_eq!(plain.len(), 1);
        assert_eq!(plain[0].url.to_string(), "http://[fd00::7]:8080/alwayshappy");
        assert_eq!(plain[0].kind, "path_node-a", "a single-stack IPv6 neighbour keeps the plain type");
        let peer = Peer {
            node: "node-a".into(),
            pod: "kubenurse-a".into(),
            source_zone: "unknown".into(),
            target_zone: "zone-b".into(),
        };
        assert_eq!(plain[0].peer, Some(peer));
        assert!(!plain[0].bearer_token);
        let tls = targets(&["--use-tls=true", "--cert-file=/c", "--cert-key=/k"])
            .neighbour(&neighbour(&["10.1.2.3"], Some(9443)), Some("zone-a"));
        assert_eq!(tls[0].url.to_string(), "https://10.1.2.3:9443/alwayshappy");
        assert_eq!(tls[0].peer.as_ref().map(|p| p.source_zone.as_str()), Some("zone-a"));
    }

    #[test]
    fn a_dual_stack_neighbour_is_probed_over_both_families() {
        let n = Neighbour {
            pod_name: "kubenurse-a".into(),
            addresses: vec![
                Address { ip: "10.1.2.3".into(), port: None },
                Address { ip: "fd00::3".into(), port: Some(18081) },
            ],
            host_ip: String::new(),
            node_name: "node-a".into(),
            node_hash: 0,
            zone: None,
        };
        let both = targets(&[]).neighbour(&n, None);
        let shown: Vec<(String, String)> = both.iter().map(|t| (t.kind.clone(), t.url.to_string())).collect();
        assert_eq!(
            shown,
            [
                ("path_node-a".to_owned(), "http://10.1.2.3:8080/alwayshappy".to_owned()),
                ("path_node-a_ipv6".to_owned(), "http://[fd00::3]:18081/alwayshappy".to_owned())
            ]
        );
    }
}

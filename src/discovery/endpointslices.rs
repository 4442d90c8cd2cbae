//! Agent pods read from the EndpointSlices of the agents' Service (`KUBENURSE_DISCOVERY=
//! endpointslices`, the default): Kubernetes keeps one endpoint per pod and address family,
//! with the pod's name, node and conditions, in slices of up to 100 endpoints. One watch of
//! a few dozen slices replaces the watches of every agent pod and every node.
//!
//! A pod is a candidate whether ready or not: when a node dies its pods turn NotReady about
//! 40 s later, and that node is exactly the one that must stay probed. Terminating pods are
//! not candidates.

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::slim::slim_resource;
use super::store::{AgentPod, Collection, Store};
use super::watch::Watched;

/// The label that ties an EndpointSlice to its Service.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the slice watch keeps of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    /// The pod, from `targetRef`.
    pub pod: String,
    pub address: String,
    pub ipv6: bool,
    pub node: String,
    /// `conditions.ready`; absent means true.
    pub ready: bool,
    /// `conditions.terminating`; absent means false.
    pub terminating: bool,
    /// The node's availability zone.
    pub zone: Option<String>,
}

/// An agent pod as the slices describe it, its endpoints of both families merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct SlicePod {
    pub node: String,
    /// IPv4 first (that is the address probed), then IPv6.
    pub pod_ips: Vec<String>,
    pub ready: bool,
    pub terminating: bool,
    pub zone: Option<String>,
}

impl SlicePod {
    /// The pod as a candidate neighbour: not terminating, with an address.
    pub fn agent_pod(&self) -> AgentPod<'_> {
        AgentPod {
            node: &self.node,
            pod_ips: &self.pod_ips,
            host_ip: "",
            eligible: !self.terminating && !self.pod_ips.is_empty(),
            ready: self.ready,
            created: None,
            zone: self.zone.as_deref(),
        }
    }
}

/// The agent pods of every slice, by pod name.
pub(super) fn agent_pods(slices: &HashMap<String, Vec<Endpoint>>) -> HashMap<String, SlicePod> {
    let mut pods: HashMap<String, SlicePod> = HashMap::new();
    let mut endpoints: Vec<&Endpoint> = slices.values().flatten().collect();
    // IPv4 before IPv6, whatever order the slices come in.
    endpoints.sort_by_key(|e| e.ipv6);
    for e in endpoints {
        let pod = pods.entry(e.pod.clone()).or_insert_with(|| SlicePod { ready: true, ..SlicePod::default() });
        if pod.node.is_empty() {
            pod.node.clone_from(&e.node);
        }
        if pod.zone.is_none() {
            pod.zone.clone_from(&e.zone);
        }
        if !pod.pod_ips.contains(&e.address) {
            pod.pod_ips.push(e.address.clone());
        }
        pod.ready &= e.ready;
        pod.terminating |= e.terminating;
    }
    pods
}

/// An EndpointSlice as discovery reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SlimEndpointSlice {
    metadata: ObjectMeta,
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<SlimEndpoint>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<SlimConditions>,
    node_name: Option<String>,
    zone: Option<String>,
    target_ref: Option<SlimTargetRef>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct SlimConditions {
    ready: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
struct SlimTargetRef {
    kind: Option<String>,
    name: Option<String>,
}

impl Watched for SlimEndpointSlice {
    /// The slice's pod endpoints (none for an `FQDN` slice).
    type Info = Vec<Endpoint>;

    fn keep(self) -> Option<(String, Vec<Endpoint>)> {
        let ipv6 = match self.address_type.as_str() {
            "IPv4" => Some(false),
            "IPv6" => Some(true),
            _ => None,
        };
        let endpoints = ipv6
            .map(|ipv6| {
                let endpoints = self.endpoints.into_iter().flatten();
                endpoints.filter_map(|e| endpoint(e, ipv6)).collect()
            })
            .unwrap_or_default();
        Some((self.metadata.name?, endpoints))
    }

    fn collection(store: &mut Store) -> &mut Collection<Vec<Endpoint>> {
        &mut store.slices
    }
}

/// The endpoint of a pod, if it is one: only the first address counts, as the API says.
fn endpoint(e: SlimEndpoint, ipv6: bool) -> Option<Endpoint> {
    let target = e.target_ref?;
    if target.kind.as_deref() != Some("Pod") {
        return None;
    }
    let conditions = e.conditions.unwrap_or_default();
    Some(Endpoint {
        pod: target.name.filter(|n| !n.is_empty())?,
        address: e.addresses.into_iter().next().filter(|a| !a.is_empty())?,
        ipv6,
        node: e.node_name.unwrap_or_default(),
        ready: conditions.ready.unwrap_or(true),
        terminating: conditions.terminating.unwrap_or(false),
        zone: e.zone.filter(|z| !z.is_empty()),
    })
}

slim_resource!(
    SlimEndpointSlice,
    group = "discovery.k8s.io",
    version = "v1",
    kind = "EndpointSlice",
    plural = "endpointslices",
    k8s_openapi::NamespaceResourceScope
);

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(address_type: &str, endpoints: serde_json::Value) -> (String, Vec<Endpoint>) {
        let json = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("kubenurse-{address_type}"), "labels": {SERVICE_NAME_LABEL: "kubenurse"}},
            "addressType": address_type, "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        });
        serde_json::from_value::<SlimEndpointSlice>(json).expect("parses").keep().expect("named")
    }

    fn pod_endpoint(pod: &str, address: &str, conditions: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"addresses": [address], "conditions": conditions, "nodeName": format!("node-{pod}"),
            "zone": "z1", "targetRef": {"kind": "Pod", "namespace": "kubenurse", "name": pod, "uid": "u"}})
    }

    #[test]
    fn absent_conditions_mean_ready_and_not_terminating() {
        let (name, endpoints) = slice(
            "IPv4",
            serde_json::json!([
                pod_endpoint("a", "10.0.0.1", serde_json::json!({})),
                pod_endpoint("b", "10.0.0.2", serde_json::json!({"ready": false, "serving": true, "terminating": true})),
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.4"], "targetRef": {"kind": "Node", "name": "n"}}
            ]),
        );
        assert_eq!(name, "kubenurse-IPv4");
        let expected = [
            Endpoint {
                pod: "a".into(),
                address: "10.0.0.1".into(),
                ipv6: false,
                node: "node-a".into(),
                ready: true,
                terminating: false,
                zone: Some("z1".into()),
            },
            Endpoint {
                pod: "b".into(),
                address: "10.0.0.2".into(),
                ipv6: false,
                node: "node-b".into(),
                ready: false,
                terminating: true,
                zone: Some("z1".into()),
            },
        ];
        assert_eq!(endpoints, expected, "endpoints without a pod are not agents");
        assert!(slice("FQDN", serde_json::json!([pod_endpoint("a", "a.example", serde_json::json!({}))])).1.is_empty());
    }

    #[test]
    fn both_families_of_a_pod_merge_ipv4_first() {
        let v6 = slice("IPv6", serde_json::json!([pod_endpoint("a", "fd00::1", serde_json::json!({"ready": false}))]));
        let v4 = slice("IPv4", serde_json::json!([pod_endpoint("a", "10.0.0.1", serde_json::json!({}))]));
        let pods = agent_pods(&[v6, v4].into_iter().collect());
        let a = &pods["a"];
        assert_eq!(a.pod_ips, ["10.0.0.1", "fd00::1"]);
        assert_eq!(a.node, "node-a");
        assert!(!a.ready, "not ready in one family");
        assert!(a.agent_pod().eligible, "not ready is still a neighbour");
    }
}

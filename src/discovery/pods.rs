//! Agent pods read from the pods themselves (`KUBENURSE_DISCOVERY=pods`, the Go agent's way,
//! and the fallback when EndpointSlices are forbidden): the pods of the namespace that match
//! `KUBENURSE_NEIGHBOUR_FILTER`. Also the own pod, when the own node must be read from it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

use super::slim::slim_resource;
use super::store::{AgentPod, Collection, Store};
use super::watch::Watched;

/// What the pod watch keeps of an agent pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PodInfo {
    pub node: String,
    /// `status.podIP` first, then the other `status.podIPs`.
    pub pod_ips: Vec<String>,
    pub host_ip: String,
    pub running: bool,
    pub deleting: bool,
    /// Condition `Ready=True`.
    pub ready: bool,
    pub created: Option<Time>,
}

impl PodInfo {
    /// The pod as a candidate neighbour: running, not being deleted, with an IP.
    pub fn agent_pod(&self) -> AgentPod<'_> {
        AgentPod {
            node: &self.node,
            pod_ips: &self.pod_ips,
            host_ip: &self.host_ip,
            eligible: self.running && !self.deleting && !self.pod_ips.is_empty(),
            ready: self.ready,
            created: self.created.as_ref(),
            // Pods do not carry it: the node watch does.
            zone: None,
        }
    }
}

/// A Pod as discovery reads it.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct SlimPod {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: SlimPodSpec,
    #[serde(default)]
    status: SlimPodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimPodSpec {
    node_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimPodStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs", default)]
    pod_ips: Option<Vec<SlimPodIp>>,
    #[serde(rename = "hostIP")]
    host_ip: Option<String>,
    #[serde(default)]
    conditions: Vec<SlimCondition>,
}

#[derive(Debug, Clone, Deserialize)]
struct SlimPodIp {
    ip: String,
}

#[derive(Debug, Clone, Deserialize)]
struct SlimCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

impl Watched for SlimPod {
    type Info = PodInfo;

    fn keep(self) -> Option<(String, PodInfo)> {
        let status = self.status;
        let ready = status.conditions.iter().any(|c| c.kind == "Ready" && c.status == "True");
        let mut pod_ips: Vec<String> = status.pod_ip.into_iter().filter(|ip| !ip.is_empty()).collect();
        for ip in status.pod_ips.into_iter().flatten().map(|p| p.ip) {
            if !ip.is_empty() && !pod_ips.contains(&ip) {
                pod_ips.push(ip);
            }
        }
        let info = PodInfo {
            node: self.spec.node_name.unwrap_or_default(),
            pod_ips,
            host_ip: status.host_ip.unwrap_or_default(),
            running: status.phase.as_deref() == Some("Running"),
            deleting: self.metadata.deletion_timestamp.is_some(),
            ready,
            created: self.metadata.creation_timestamp,
        };
        Some((self.metadata.name?, info))
    }

    fn collection(store: &mut Store) -> &mut Collection<PodInfo> {
        &mut store.pods
    }
}

slim_resource!(SlimPod, group = "", version = "v1", kind = "Pod", plural = "pods", k8s_openapi::NamespaceResourceScope);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slim_pod_reads_only_what_it_needs() {
        let json = serde_json::json!({
            "metadata": {"name": "kubenurse-abc", "namespace": "kube-system",
                "creationTimestamp": "2026-01-01T00:00:00Z", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "hostIP": "192.0.2.1",
                "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}
        });
        let pod: SlimPod = serde_json::from_value(json).expect("parses");
        let (name, info) = pod.keep().expect("named");
        assert_eq!(name, "kubenurse-abc");
        assert_eq!(info.node, "node-1");
        assert_eq!(info.pod_ips, ["10.0.0.5", "fd00::5"]);
        assert!(info.running && info.deleting && info.ready);
        assert!(info.created.is_some());
        assert!(!info.agent_pod().eligible, "being deleted");

        let unready = serde_json::json!({"metadata": {"name": "p"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}});
        let (_, info) = serde_json::from_value::<SlimPod>(unready).expect("parses").keep().expect("named");
        assert!(!info.ready && info.created.is_none() && info.pod_ips.is_empty());
    }
}

//! Which nodes may be probed, and whether the own node is cordoned (for `/ready`).
//!
//! Three shapes of the one node watch, from cheapest to dearest: only the own node (neighbour
//! probes off), only the cordoned nodes (`spec.unschedulable=true`, with EndpointSlices:
//! usually a handful of objects), or every node (pods mode, as the Go agent: a node that is
//! not listed is gone).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::slim::slim_resource;
use super::store::{Collection, Store};
use super::watch::Watched;

/// The field selector of the cordoned-node watch. It also catches the
/// `node.kubernetes.io/unschedulable` taint, which the node lifecycle controller sets for a
/// cordon and only for one.
pub(super) const CORDONED: &str = "spec.unschedulable=true";

/// What the listed nodes say about a node that is not among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum NodeView {
    /// Every node (or the own node) is listed: one that is missing is gone.
    #[default]
    All,
    /// Only cordoned nodes are listed: one that is missing may be probed.
    Cordoned,
}

/// A Node as discovery reads it.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct SlimNode {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: SlimNodeSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct SlimNodeSpec {
    #[serde(default)]
    unschedulable: Option<bool>,
    #[serde(default)]
    taints: Option<Vec<SlimTaint>>,
}

#[derive(Debug, Clone, Deserialize)]
struct SlimTaint {
    key: String,
    effect: String,
}

/// The label that names a node's availability zone.
pub(super) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the node watch keeps of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NodeInfo {
    /// Pods may be scheduled there: not cordoned, no unschedulable taint.
    pub schedulable: bool,
    /// The `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl Watched for SlimNode {
    type Info = NodeInfo;

    fn keep(self) -> Option<(String, NodeInfo)> {
        let cordoned = self.spec.unschedulable == Some(true);
        let tainted = self
            .spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.key == "node.kubernetes.io/unschedulable" && t.effect == "NoSchedule");
        let zone = self.metadata.labels.and_then(|mut labels| labels.remove(ZONE_LABEL)).filter(|z| !z.is_empty());
        Some((self.metadata.name?, NodeInfo { schedulable: !cordoned && !tainted, zone }))
    }

    fn collection(store: &mut Store) -> &mut Collection<NodeInfo> {
        &mut store.nodes
    }
}

slim_resource!(
    SlimNode,
    group = "",
    version = "v1",
    kind = "Node",
    plural = "nodes",
    k8s_openapi::ClusterResourceScope
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_schedulability_follows_cordon_and_taint() {
        let parse = |spec: serde_json::Value| {
            let node: SlimNode =
                serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}, "spec": spec})).expect("node");
            node.keep().expect("named").1.schedulable
        };
        assert!(parse(serde_json::json!({})));
        assert!(!parse(serde_json::json!({"unschedulable": true})));
        assert!(!parse(
            serde_json::json!({"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]})
        ));
        assert!(parse(
            serde_json::json!({"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "PreferNoSchedule"}]})
        ));
        assert!(parse(serde_json::json!({"taints": [{"key": "dedicated", "effect": "NoSchedule"}]})));
    }

    #[test]
    fn the_zone_is_the_topology_label() {
        let node: SlimNode = serde_json::from_value(serde_json::json!({"metadata": {"name": "n",
            "labels": {"topology.kubernetes.io/zone": "eu-west-1a", "kubernetes.io/hostname": "n"}}}))
        .expect("node");
        assert_eq!(node.keep().expect("named").1.zone.as_deref(), Some("eu-west-1a"));
        let bare: SlimNode = serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}})).expect("node");
        assert_eq!(bare.keep().expect("named").1.zone, None);
    }
}

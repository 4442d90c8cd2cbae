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

impl Watched for SlimNode {
    /// Whether pods may be scheduled there: not cordoned, no unschedulable taint.
    type Info = bool;

    fn keep(self) -> Option<(String, bool)> {
        let cordoned = self.spec.unschedulable == Some(true);
        let tainted = self
            .spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.key == "node.kubernetes.io/unschedulable" && t.effect == "NoSchedule");
        Some((self.metadata.name?, !cordoned && !tainted))
    }

    fn collection(store: &mut Store) -> &mut Collection<bool> {
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
            node.keep().expect("named").1
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
}

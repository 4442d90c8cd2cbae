//! Static neighbours (`KUBENURSE_NEIGHBOURS`): a fixed list of nodes and the `host:port` each
//! agent listens on, used instead of the Kubernetes API (outside a cluster, the demo, tests).

use super::Neighbour;
use crate::config::StaticNeighbours;
use crate::selection::ring_hash;

/// The neighbours of the list, each named after its node.
pub(super) fn neighbours(list: &StaticNeighbours) -> Vec<Neighbour> {
    list.0
        .iter()
        .map(|n| Neighbour {
            pod_name: n.node.clone(),
            pod_ip: n.host.clone(),
            pod_ips: vec![n.host.clone()],
            host_ip: n.host.clone(),
            node_name: n.node.clone(),
            node_hash: ring_hash(&n.node),
            port: Some(n.port),
        })
        .collect()
}

//! Static neighbours (`KUBENURSE_NEIGHBOURS`): a fixed list of nodes and the `host:port` each
//! agent listens on, used instead of the Kubernetes API (outside a cluster, the demo, tests).

use super::{Address, Neighbour};
use crate::config::StaticNeighbours;
use crate::selection::ring_hash;

/// The neighbours of the list, each named after its node.
pub(super) fn neighbours(list: &StaticNeighbours) -> Vec<Neighbour> {
    list.0
        .iter()
        .map(|n| {
            let mut addresses: Vec<Address> =
                n.addresses.iter().map(|(host, port)| Address { ip: host.clone(), port: Some(*port) }).collect();
            // IPv4 first, as discovery orders pod addresses.
            addresses.sort_by_key(Address::is_ipv6);
            Neighbour {
                pod_name: n.node.clone(),
                host_ip: addresses[0].ip.clone(),
                addresses,
                node_name: n.node.clone(),
                node_hash: ring_hash(&n.node),
                zone: n.zone.clone(),
            }
        })
        .collect()
}

//! Neighbour selection on a SHA-256 ring.
//!
//! Every agent hashes node names onto a 64-bit ring and probes the `limit` nodes that follow
//! its own position. Each node then receives exactly `limit` incoming probes, and the choice
//! only changes when nodes join or leave (the Go kubenurse uses the same scheme).

use sha2::{Digest, Sha256};

/// The ring position of a node: the first 8 bytes of SHA-256(name), big-endian.
pub fn ring_hash(node_name: &str) -> u64 {
    let digest = Sha256::digest(node_name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Keeps the `limit` candidates whose ring distance from `own_node` is smallest
/// (`limit == 0` keeps all). `node_of` names the node a candidate runs on.
///
/// The result is ordered by ring distance; ties (same node name) keep input order. This
/// hashes every candidate: callers that keep node hashes use [`nearest`].
pub fn select<T>(own_node: &str, limit: usize, candidates: Vec<T>, node_of: impl Fn(&T) -> &str) -> Vec<T> {
    let hashes: Vec<u64> = candidates.iter().map(|c| ring_hash(node_of(c))).collect();
    let keep = nearest(ring_hash(own_node), limit, &hashes);
    let mut slots: Vec<Option<T>> = candidates.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// The positions in `hashes` (ring positions of the candidates' nodes) of the `limit`
/// candidates nearest after `own` on the ring, nearest first, ties in input order. With
/// `limit == 0`, or no more candidates than `limit`, every position in input order.
pub fn nearest(own: u64, limit: usize, hashes: &[u64]) -> Vec<usize> {
    if limit == 0 || hashes.len() <= limit {
        return (0..hashes.len()).collect();
    }
    let mut keyed: Vec<(u64, usize)> = hashes.iter().enumerate().map(|(i, h)| (h.wrapping_sub(own), i)).collect();
    // Partial selection keeps this O(n) for large clusters; only the kept part is sorted.
    keyed.select_nth_unstable(limit - 1);
    keyed.truncate(limit);
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Deserialize)]
    struct Vectors {
        hash_examples_hex: BTreeMap<String, String>,
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        #[serde(rename = "self")]
        own: String,
        nodes_count: usize,
        node_name_format: String,
        limit: usize,
        selected: Vec<String>,
    }

    /// The shared reference vectors; the copy in `tests/vectors` is used where the shared
    /// folder is not beside the checkout, and must be identical to it when it is.
    fn vectors() -> Vectors {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let local = std::fs::read_to_string(root.join("tests/vectors/neighbour-selection.json"))
            .expect("vector copy in tests/vectors");
        if let Ok(shared) = std::fs::read_to_string(root.join("../shared/vectors/neighbour-selection.json")) {
            assert_eq!(shared, local, "tests/vectors copy differs from shared/vectors");
        }
        serde_json::from_str(&local).expect("vectors parse")
    }

    fn node_name(format: &str, i: usize) -> String {
        assert_eq!(format, "node-{:04d}", "unknown name format in vectors");
        format!("node-{i:04}")
    }

    #[test]
    fn hashes_match_reference_examples() {
        let v = vectors();
        assert!(!v.hash_examples_hex.is_empty());
        for (name, hex) in v.hash_examples_hex {
            assert_eq!(format!("{:016x}", ring_hash(&name)), hex, "hash of {name}");
        }
    }

    #[test]
    fn selection_matches_every_reference_case() {
        let v = vectors();
        assert!(v.cases.len() >= 20);
        for case in v.cases {
            let others: Vec<String> = (0..case.nodes_count)
                .map(|i| node_name(&case.node_name_format, i))
                .filter(|n| *n != case.own)
                .collect();
            let mut got = select(&case.own, case.limit, others, |n| n.as_str());
            got.sort();
            let mut want = case.selected.clone();
            want.sort();
            assert_eq!(got, want, "self={} n={} limit={}", case.own, case.nodes_count, case.limit);
        }
    }

    #[test]
    fn nearest_follows_the_ring_from_the_own_position() {
        let own = 1_000;
        let hashes = [own + 30, own - 1, own + 10, own + 20, own + 10];
        assert_eq!(nearest(own, 3, &hashes), [2, 4, 3], "nearest first, ties in input order");
        assert_eq!(nearest(own, 4, &hashes), [2, 4, 3, 0]);
        assert_eq!(nearest(own, 1, &hashes[..2]), [0], "the node just before is the farthest");
        assert_eq!(nearest(own, 0, &hashes), [0, 1, 2, 3, 4], "no limit: input order");
        assert_eq!(nearest(own, 9, &hashes), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn limit_zero_keeps_everything() {
        let others: Vec<String> = (1..50).map(|i| format!("n{i}")).collect();
        assert_eq!(select("n0", 0, others.clone(), |n| n.as_str()).len(), 49);
    }

    #[test]
    fn every_node_receives_exactly_limit_probes() {
        let nodes: Vec<String> = (0..200).map(|i| format!("ip-10-0-{i}.internal")).collect();
        let mut incoming = std::collections::HashMap::<&str, usize>::new();
        for own in &nodes {
            let others: Vec<&str> = nodes.iter().map(String::as_str).filter(|n| n != own).collect();
            for n in select(own, 7, others, |n| n) {
                *incoming.entry(n).or_default() += 1;
            }
        }
        assert_eq!(incoming.len(), nodes.len());
        assert!(incoming.values().all(|&c| c == 7));
    }
}

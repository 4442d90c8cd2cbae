//! What the watches know, and what discovery makes of it: the neighbours (one agent pod per
//! schedulable node), the own node, and the neighbourhood state that names every failure.
//! Whichever source lists the agent pods, the same rules pick the neighbours; the result is
//! kept until the next change, so reading it every round costs a copy, not a recount.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::endpointslices::{self, Endpoint};
use super::nodes::{NodeInfo, NodeView};
use super::pods::PodInfo;
use super::{Address, Neighbour, Neighbourhood};
use crate::selection::ring_hash;

/// One watched resource: the objects by name and how its watch is doing.
#[derive(Debug)]
pub(super) struct Collection<V> {
    pub watched: bool,
    pub objects: HashMap<String, V>,
    /// A list has completed at least once.
    pub synced: bool,
    /// The latest failure, until a list completes or the watch stays open again.
    pub error: Option<String>,
}

impl<V> Default for Collection<V> {
    fn default() -> Self {
        Self { watched: false, objects: HashMap::new(), synced: false, error: None }
    }
}

impl<V> Collection<V> {
    /// What is wrong with this watch, if anything.
    fn problem(&self, name: &str) -> Option<String> {
        match (&self.error, self.synced) {
            _ if !self.watched => None,
            (Some(e), _) => Some(format!("{name}: {e}")),
            (None, false) => Some(format!("{name}: waiting for the first list")),
            (None, true) => None,
        }
    }

    fn ready(&self) -> bool {
        !self.watched || self.synced
    }
}

/// Which watched resource lists the agent pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Agents {
    #[default]
    Pods,
    EndpointSlices,
}

/// An agent pod as every source describes it: the one shape the neighbour rules read.
#[derive(Debug, Clone, Copy)]
pub(super) struct AgentPod<'a> {
    pub node: &'a str,
    /// The probed address first.
    pub pod_ips: &'a [String],
    pub host_ip: &'a str,
    /// Its source says it may be probed (running, not terminating, has an address).
    pub eligible: bool,
    pub ready: bool,
    pub created: Option<&'a Time>,
    /// Its node's zone, where the source carries it (EndpointSlices).
    pub zone: Option<&'a str>,
}

/// The watches' copy of the cluster.
#[derive(Debug, Default)]
pub(super) struct Store {
    pub agents: Agents,
    pub pods: Collection<PodInfo>,
    /// Slice name → its pod endpoints.
    pub slices: Collection<Vec<Endpoint>>,
    pub nodes: Collection<NodeInfo>,
    pub node_view: NodeView,
    /// Why the pods are read although EndpointSlices were asked for.
    pub fallback: Option<String>,
    /// Discovery is still waiting out its random start delay.
    pub delaying: bool,
    /// What the watches amount to, until the next change.
    derived: Option<Derived>,
    /// The unknown own node has been logged (once each time it becomes unknown).
    own_node_unknown_logged: bool,
}

#[derive(Debug)]
struct Derived {
    neighbourhood: Arc<Neighbourhood>,
    /// Every agent pod known, eligible or not.
    known: HashSet<String>,
}

/// How the store is read: who this agent is and what is watched.
pub(super) struct KubeMode {
    pub own_pod: String,
    pub own_node: Option<String>,
    /// `KUBENURSE_ZONE`, which wins over what the watches say.
    pub own_zone: Option<String>,
    /// Where the agent pods are read from in pods mode.
    pub pods_namespace: String,
    pub label_selector: String,
    /// The agents' Service and its namespace (the agent's own), in endpointslices mode.
    pub service: String,
    pub service_namespace: String,
    pub allow_unschedulable: bool,
    pub neighbourhood: bool,
}

impl Store {
    /// Forgets what was derived; called after every change.
    pub fn changed(&mut self) {
        self.derived = None;
    }

    /// The own node: configured, or read from the own pod (or its endpoint).
    pub fn own_node(&self, m: &KubeMode) -> Option<String> {
        if m.own_node.is_some() {
            return m.own_node.clone();
        }
        let node = match self.agents {
            Agents::Pods => self.pods.objects.get(&m.own_pod).map(|p| p.node.as_str()),
            Agents::EndpointSlices => {
                self.slices.objects.values().flatten().find(|e| e.pod == m.own_pod).map(|e| e.node.as_str())
            }
        };
        node.filter(|n| !n.is_empty()).map(str::to_owned)
    }

    /// True once discovery has started and every watch has listed once.
    pub fn synced(&self) -> bool {
        !self.delaying && self.pods.ready() && self.slices.ready() && self.nodes.ready()
    }

    /// The neighbours and the state: `ok` (`skipped` when only the own node is watched), or
    /// every problem, `; `-separated. The same `Arc` until the next change.
    pub fn neighbourhood(&mut self, m: &KubeMode) -> Arc<Neighbourhood> {
        self.derived(m).neighbourhood.clone()
    }

    /// True when `pod` is an agent pod of the source.
    pub fn knows_pod(&mut self, m: &KubeMode, pod: &str) -> bool {
        self.derived(m).known.contains(pod)
    }

    /// False while the own node is cordoned, or gone where every node is listed; true while
    /// that is not known.
    pub fn own_node_schedulable(&self, m: &KubeMode) -> bool {
        if !self.nodes.watched || !self.nodes.synced {
            return true;
        }
        self.own_node(m).is_none_or(|node| self.schedulable(&node))
    }

    fn schedulable(&self, node: &str) -> bool {
        match self.nodes.objects.get(node) {
            Some(info) => info.schedulable,
            None => self.node_view == NodeView::Cordoned,
        }
    }

    /// The zone of `node` as the node watch saw it (pods mode lists every node).
    fn node_zone(&self, node: &str) -> Option<&str> {
        self.nodes.objects.get(node).and_then(|info| info.zone.as_deref())
    }

    /// The own zone: configured, else the own endpoint's, else the own node's label.
    fn own_zone(&self, m: &KubeMode, own_node: Option<&str>) -> Option<String> {
        if m.own_zone.is_some() {
            return m.own_zone.clone();
        }
        let endpoint = match self.agents {
            Agents::EndpointSlices => {
                self.slices.objects.values().flatten().find(|e| e.pod == m.own_pod).and_then(|e| e.zone.as_deref())
            }
            Agents::Pods => None,
        };
        endpoint.or_else(|| own_node.and_then(|n| self.node_zone(n))).map(str::to_owned)
    }

    /// Says once, when a list of the agent pods shows it, that the own node cannot be known.
    pub fn note_own_node(&mut self, m: &KubeMode) {
        let listed = self.agent_collection_listed();
        if !listed {
            return;
        }
        let unknown = self.own_node(m).is_none();
        if unknown && !self.own_node_unknown_logged {
            tracing::warn!(
                problem = %self.own_node_unknown(m),
                "the own node is unknown: set KUBENURSE_NODE_NAME from the downward API (spec.nodeName)"
            );
        }
        self.own_node_unknown_logged = unknown;
    }

    fn agent_collection_listed(&self) -> bool {
        match self.agents {
            Agents::Pods => self.pods.watched && self.pods.synced,
            Agents::EndpointSlices => self.slices.watched && self.slices.synced,
        }
    }

    fn derived(&mut self, m: &KubeMode) -> &Derived {
        let derived = match self.derived.take() {
            Some(derived) => derived,
            None => self.derive(m),
        };
        self.derived.insert(derived)
    }

    fn derive(&self, m: &KubeMode) -> Derived {
        let own_node = self.own_node(m);
        let mut problems: Vec<String> = self.fallback.iter().cloned().collect();
        if self.agent_collection_listed() && own_node.is_none() {
            problems.push(self.own_node_unknown(m));
        }
        problems.extend(self.pods.problem("pods"));
        problems.extend(self.slices.problem("endpointslices"));
        // With the own node read from the own pod, the node watch starts once the pod is known.
        if own_node.is_some() || m.own_node.is_some() || m.neighbourhood {
            problems.extend(self.nodes.problem("nodes"));
        }
        let (neighbours, known) = match self.agents {
            Agents::Pods => self.neighbours(m, self.pods.objects.iter().map(|(name, p)| (name, p.agent_pod()))),
            Agents::EndpointSlices => {
                let pods = endpointslices::agent_pods(&self.slices.objects);
                self.neighbours(m, pods.iter().map(|(name, p)| (name, p.agent_pod())))
            }
        };
        let state = match (problems.is_empty(), m.neighbourhood) {
            (false, _) => problems.join("; "),
            (true, true) => "ok".to_owned(),
            (true, false) => "skipped".to_owned(),
        };
        let neighbours = if m.neighbourhood { neighbours } else { Vec::new() };
        let own_zone = self.own_zone(m, own_node.as_deref());
        Derived { neighbourhood: Arc::new(Neighbourhood { state, neighbours, own_node, own_zone }), known }
    }

    /// The agent pods that may be probed, one per node, and the names of all agent pods.
    /// Nodes are only filtered once they have been listed: a node watch that never worked
    /// leaves the pods unfiltered (and says so in the state) rather than hiding every neighbour.
    fn neighbours<'a>(
        &self,
        m: &KubeMode,
        pods: impl Iterator<Item = (&'a String, AgentPod<'a>)>,
    ) -> (Vec<Neighbour>, HashSet<String>) {
        let filter_nodes = !m.allow_unschedulable && self.nodes.synced;
        let mut known = HashSet::new();
        let mut per_node: HashMap<&str, (&String, AgentPod<'a>)> = HashMap::new();
        for (name, pod) in pods {
            known.insert(name.clone());
            if *name == m.own_pod || !pod.eligible || pod.node.is_empty() {
                continue;
            }
            if filter_nodes && !self.schedulable(pod.node) {
                continue;
            }
            let chosen = per_node.entry(pod.node).or_insert((name, pod));
            if preference(name, &pod) > preference(chosen.0, &chosen.1) {
                *chosen = (name, pod);
            }
        }
        let mut neighbours: Vec<Neighbour> = per_node
            .into_values()
            .map(|(name, pod)| {
                let addresses = Address::of_pod(pod.pod_ips);
                Neighbour {
                    pod_name: name.clone(),
                    addresses,
                    host_ip: pod.host_ip.to_owned(),
                    node_name: pod.node.to_owned(),
                    node_hash: ring_hash(pod.node),
                    zone: pod.zone.or_else(|| self.node_zone(pod.node)).map(str::to_owned),
                }
            })
            .collect();
        neighbours.sort_by(|a, b| a.pod_name.cmp(&b.pod_name));
        (neighbours, known)
    }

    fn own_node_unknown(&self, m: &KubeMode) -> String {
        let (pod, ns) = (&m.own_pod, &m.pods_namespace);
        match self.agents {
            Agents::Pods => {
                let selected = match (m.neighbourhood, m.label_selector.is_empty()) {
                    (true, false) => format!(" matching {}", m.label_selector),
                    _ => String::new(),
                };
                format!(
                    "own node unknown: this agent's pod {pod} is not among the scheduled pods of namespace \
                     {ns}{selected}, and KUBENURSE_NODE_NAME is not set"
                )
            }
            Agents::EndpointSlices => format!(
                "own node unknown: this agent's pod {pod} is not among the endpoints of Service {} in namespace {}, \
                 and KUBENURSE_NODE_NAME is not set",
                m.service, m.service_namespace
            ),
        }
    }
}

/// Two agent pods on one node (a DaemonSet surge) are one neighbour: the Ready one, then the
/// newest (where the source knows ages), then the first by name.
fn preference<'a>(name: &'a str, pod: &AgentPod<'a>) -> impl Ord + 'a {
    (pod.ready, pod.created, Reverse(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode() -> KubeMode {
        KubeMode {
            own_pod: "self".into(),
            own_node: None,
            own_zone: None,
            pods_namespace: "kubenurse".into(),
            label_selector: "app=kubenurse".into(),
            service: "kubenurse".into(),
            service_namespace: "kubenurse".into(),
            allow_unschedulable: false,
            neighbourhood: true,
        }
    }

    fn pod(node: &str, ready: bool, created: i64) -> PodInfo {
        let created = k8s_openapi::jiff::Timestamp::from_second(created).ok().map(Time);
        PodInfo {
            node: node.into(),
            pod_ips: vec!["10.0.0.1".into()],
            host_ip: String::new(),
            running: true,
            deleting: false,
            ready,
            created,
        }
    }

    fn store(pods: &[(&str, PodInfo)]) -> Store {
        let mut store = Store::default();
        store.pods.watched = true;
        store.pods.synced = true;
        store.pods.objects = pods.iter().map(|(n, p)| (n.to_string(), p.clone())).collect();
        store.nodes.watched = true;
        store.nodes.synced = true;
        let zone = |z: &str| NodeInfo { schedulable: true, zone: Some(z.to_owned()) };
        store.nodes.objects = [("node-a".to_owned(), zone("z-a")), ("node-b".to_owned(), zone("z-b"))].into();
        store
    }

    fn picked(pods: &[(&str, PodInfo)]) -> Vec<String> {
        store(pods).neighbourhood(&mode()).neighbours.iter().map(|n| n.pod_name.clone()).collect()
    }

    #[test]
    fn a_surge_is_one_neighbour_per_node_ready_then_newest_then_name() {
        let old_ready = ("a-old", pod("node-a", true, 100));
        let new_unready = ("a-new", pod("node-a", false, 200));
        assert_eq!(picked(&[old_ready.clone(), new_unready.clone(), ("b", pod("node-b", true, 1))]), ["a-old", "b"]);
        let new_ready = ("a-new", pod("node-a", true, 200));
        assert_eq!(picked(&[old_ready.clone(), new_ready]), ["a-new"]);
        let twin = ("a-twin", pod("node-a", true, 100));
        assert_eq!(picked(&[old_ready.clone(), twin.clone()]), ["a-old"], "same age: first by name");
        assert_eq!(picked(&[twin, old_ready]), ["a-old"], "independent of order");
    }

    #[test]
    fn pods_stay_unfiltered_until_nodes_are_listed() {
        let pods = [("a", pod("node-a", true, 1)), ("c", pod("node-c", true, 1))];
        let mut s = store(&pods);
        assert_eq!(s.neighbourhood(&mode()).neighbours.len(), 1, "node-c is unknown once nodes are listed");
        s.nodes.synced = false;
        s.nodes.objects.clear();
        s.changed();
        assert_eq!(s.neighbourhood(&mode()).neighbours.len(), 2);
    }

    #[test]
    fn the_neighbourhood_is_kept_until_a_change() {
        let mut s = store(&[("a", pod("node-a", true, 1))]);
        let first = s.neighbourhood(&mode());
        assert!(Arc::ptr_eq(&first, &s.neighbourhood(&mode())), "read twice, derived once");
        s.changed();
        assert!(!Arc::ptr_eq(&first, &s.neighbourhood(&mode())));
    }

    fn endpoint(pod: &str, node: &str, address: &str, ready: bool, terminating: bool) -> Endpoint {
        let ipv6 = address.contains(':');
        let (pod, node, address) = (pod.into(), node.into(), address.into());
        let zone = Some(format!("z-{pod}"));
        Endpoint { pod, address, ipv6, node, ready, terminating, zone }
    }

    fn slices_store(slices: &[(&str, Vec<Endpoint>)], cordoned: &[&str]) -> Store {
        let mut store = Store { agents: Agents::EndpointSlices, node_view: NodeView::Cordoned, ..Store::default() };
        store.slices.watched = true;
        store.slices.synced = true;
        store.slices.objects = slices.iter().map(|(n, e)| (n.to_string(), e.clone())).collect();
        store.nodes.watched = true;
        store.nodes.synced = true;
        let cordoned_node = NodeInfo { schedulable: false, zone: None };
        store.nodes.objects = cordoned.iter().map(|n| (n.to_string(), cordoned_node.clone())).collect();
        store
    }

    #[test]
    fn endpoints_ready_or_not_are_neighbours_unless_terminating_or_cordoned() {
        let slice = vec![
            endpoint("self", "node-self", "10.0.0.1", true, false),
            endpoint("a", "node-a", "10.0.0.2", true, false),
            endpoint("b", "node-b", "10.0.0.3", false, false),
            endpoint("c", "node-c", "10.0.0.4", false, true),
            endpoint("d", "node-d", "10.0.0.5", true, false),
        ];
        let mut s = slices_store(
            &[("s1", slice), ("s2", vec![endpoint("e", "node-e", "10.0.0.6", true, false)])],
            &["node-d", "node-self"],
        );
        let m = mode();
        let n = s.neighbourhood(&m);
        let names: Vec<&str> = n.neighbours.iter().map(|n| n.pod_name.as_str()).collect();
        assert_eq!(names, ["a", "b", "e"]);
        assert_eq!(n.state, "ok");
        assert_eq!(n.own_node.as_deref(), Some("node-self"), "read from the own endpoint");
        assert!(n.neighbours.iter().all(|n| n.host_ip.is_empty()), "slices do not carry the host IP");
        assert!(!s.own_node_schedulable(&m), "the own node is cordoned");
        assert!(s.knows_pod(&m, "c") && s.knows_pod(&m, "d") && !s.knows_pod(&m, "ghost"));
        s.nodes.objects.clear();
        s.changed();
        assert!(s.own_node_schedulable(&m), "a node that is not cordoned is not listed");
        assert_eq!(s.neighbourhood(&m).neighbours.len(), 4);
    }

    #[test]
    fn a_dual_stack_neighbour_keeps_both_addresses_and_is_probed_on_ipv4() {
        let v4 = vec![endpoint("a", "node-a", "10.0.0.2", true, false)];
        let v6 = vec![endpoint("a", "node-a", "fd00::2", true, false)];
        let mut s = slices_store(&[("v6", v6), ("v4", v4)], &[]);
        let n = s.neighbourhood(&mode());
        assert_eq!(n.neighbours.len(), 1);
        assert_eq!(n.neighbours[0].pod_ip(), "10.0.0.2");
        let ips: Vec<&str> = n.neighbours[0].addresses.iter().map(|a| a.ip.as_str()).collect();
        assert_eq!(ips, ["10.0.0.2", "fd00::2"]);
    }

    #[test]
    fn zones_come_from_endpoints_or_from_nodes_and_the_configured_one_wins() {
        let slices = [(
            "s",
            vec![
                endpoint("self", "node-self", "10.0.0.1", true, false),
                endpoint("a", "node-a", "10.0.0.2", true, false),
            ],
        )];
        let mut s = slices_store(&slices, &[]);
        let n = s.neighbourhood(&mode());
        assert_eq!(n.own_zone.as_deref(), Some("z-self"), "the own endpoint's zone");
        assert_eq!(n.neighbours[0].zone.as_deref(), Some("z-a"));
        let configured = KubeMode { own_zone: Some("z-configured".into()), ..mode() };
        s.changed();
        assert_eq!(s.neighbourhood(&configured).own_zone.as_deref(), Some("z-configured"));

        // Pods mode: the node watch lists every node, with its zone label.
        let mut pods = store(&[("self", pod("node-a", true, 1)), ("b", pod("node-b", true, 1))]);
        let n = pods.neighbourhood(&mode());
        assert_eq!(n.own_zone.as_deref(), Some("z-a"), "the own node's label");
        assert_eq!(n.neighbours[0].zone.as_deref(), Some("z-b"));
    }
}

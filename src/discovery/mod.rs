//! Neighbour discovery: which agent pods exist, which nodes may be probed, and whether this
//! agent's own node is cordoned.
//!
//! One file per source of agent pods: the EndpointSlices of the agents' Service
//! (`endpointslices`, the default: one watch of a few dozen slices), the pods themselves
//! (`pods`, as the Go agent reads them, and the fallback when slices are forbidden), or a
//! static list (`static_list`). Nodes (`nodes`) filter both Kubernetes sources. Every source
//! yields agent pods in one shape ([`store::AgentPod`]) from which the store picks the
//! neighbourhood, and one loop (`watch`) follows every resource: list once (a streaming list
//! where the apiserver serves them), then watch; re-list only when the watch expires.
//!
//! When the apiserver fails, the last known set stays in use, the failure shows in the
//! neighbourhood state, and the watches back off and recover by themselves. Discovery starts
//! after a random delay of up to `KUBENURSE_DISCOVERY_JITTER`, so that a rollout of thousands
//! of agents does not list in the same second; the first round does not wait for it.

mod backoff;
mod endpointslices;
mod nodes;
mod pods;
mod slim;
mod static_list;
mod store;
mod watch;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kube::runtime::watcher;
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::{Config, DiscoveryMode, StaticNeighbours};
use crate::kube_client::{ApiAnswers, Kube};
use endpointslices::{SlimEndpointSlice, SERVICE_NAME_LABEL};
use nodes::{NodeView, SlimNode, CORDONED};
use pods::SlimPod;
use store::{Agents, Collection, KubeMode, Store};
use watch::{Forbidden, StreamingLists, Subject, WatchSettings};

/// The verbs `deploy/` grants on namespaced resources.
const NAMESPACED_VERBS: &[&str] = &["get", "list", "watch"];
/// The verbs `deploy/` grants on nodes: the only cluster-scoped permission the agent needs.
const NODE_VERBS: &[&str] = &["list", "watch"];

/// A neighbour as `/alive` lists it (the Go agent's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Neighbour {
    pub pod_name: String,
    /// Every address of the agent, one per family, IPv4 first. `/alive` shows the first, the
    /// primary one, as `PodIP`.
    #[serde(rename = "PodIP", serialize_with = "primary_ip")]
    pub addresses: Vec<Address>,
    /// The node's address; empty with EndpointSlices, which do not carry it.
    #[serde(rename = "HostIP")]
    pub host_ip: String,
    pub node_name: String,
    pub node_hash: u64,
    /// The node's availability zone, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl Neighbour {
    /// The primary address: IPv4 when the agent has both families.
    pub fn pod_ip(&self) -> &str {
        self.addresses.first().map_or("", |a| a.ip.as_str())
    }
}

fn primary_ip<S: serde::Serializer>(addresses: &[Address], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(addresses.first().map_or("", |a| a.ip.as_str()))
}

/// One address a neighbour's agent listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub ip: String,
    /// The port, when it differs from the configured one (static neighbours).
    pub port: Option<u16>,
}

impl Address {
    /// The addresses of `ips` on the configured port, IPv4 first, one per family.
    pub fn of_pod(ips: &[String]) -> Vec<Address> {
        let mut addresses: Vec<Address> = Vec::with_capacity(2);
        let v4 = ips.iter().find(|ip| !ip.contains(':'));
        let v6 = ips.iter().find(|ip| ip.contains(':'));
        for ip in v4.into_iter().chain(v6) {
            addresses.push(Address { ip: ip.clone(), port: None });
        }
        addresses
    }

    pub fn is_ipv6(&self) -> bool {
        self.ip.contains(':')
    }
}

/// The neighbours eligible for probing, before selection.
#[derive(Debug, Clone, Default)]
pub struct Neighbourhood {
    /// `ok`, `skipped`, or what is wrong with discovery.
    pub state: String,
    pub neighbours: Vec<Neighbour>,
    /// This agent's node, when known.
    pub own_node: Option<String>,
    /// This agent's availability zone: `KUBENURSE_ZONE`, else what discovery read.
    pub own_zone: Option<String>,
}

/// Where neighbours come from.
pub enum Source {
    /// Neighbour probes are off, or there is no way to find neighbours.
    None,
    Static(StaticNeighbours, Option<String>),
    Kubernetes(Box<KubeSettings>),
}

/// What the Kubernetes watches need.
pub struct KubeSettings {
    pub client: Client,
    /// What the apiserver answered below `client` (see [`ApiAnswers`]).
    pub answers: ApiAnswers,
    pub mode: DiscoveryMode,
    /// Where the agent pods are read in pods mode (`KUBENURSE_NAMESPACE`, or the own one).
    pub namespace: String,
    pub label_selector: String,
    /// The agents' Service and the agent's own namespace, where it lives.
    pub service: String,
    pub service_namespace: String,
    pub own_pod: String,
    pub own_node: Option<String>,
    /// `KUBENURSE_ZONE`: wins over what discovery reads.
    pub own_zone: Option<String>,
    pub allow_unschedulable: bool,
    /// Watch the agent pods for neighbours; when false only the own node is watched, for `/ready`.
    pub neighbourhood: bool,
    /// First wait after a failed list or watch; doubles (with jitter) per failure up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A watch re-established after a failure counts as healthy once open this long without error.
    pub healthy_after: Duration,
    /// Discovery starts after a random delay of up to this long.
    pub jitter: Duration,
}

impl Source {
    /// Where neighbours come from under `config`: static neighbours, the Kubernetes API, or
    /// nowhere. With neighbour probes off, the API is still asked about the own node (for the
    /// cordon check of `/ready`) unless `KUBENURSE_ALLOW_UNSCHEDULABLE` says nodes are not read.
    pub fn from_config(config: &Config, kube: Option<Kube>, own_pod: &str, namespace: Option<String>) -> Self {
        if let (true, Some(list)) = (config.check_neighbourhood, &config.neighbours) {
            return Source::Static(list.clone(), config.zone.clone());
        }
        let Some(kube) = kube else {
            if config.check_neighbourhood {
                tracing::info!("no Kubernetes configuration and no KUBENURSE_NEIGHBOURS: neighbour probes skipped");
            }
            return Source::None;
        };
        if !config.check_neighbourhood && config.allow_unschedulable {
            return Source::None;
        }
        Source::Kubernetes(Box::new(KubeSettings {
            client: kube.client,
            answers: kube.answers,
            mode: config.discovery,
            namespace: namespace.unwrap_or_else(|| kube.namespace.clone()),
            label_selector: config.neighbour_filter.clone(),
            service: config.neighbour_service.clone(),
            service_namespace: kube.namespace,
            own_pod: own_pod.to_owned(),
            own_node: config.node_name.clone(),
            own_zone: config.zone.clone(),
            allow_unschedulable: config.allow_unschedulable,
            neighbourhood: config.check_neighbourhood,
            backoff_base: config.discovery_backoff_base,
            backoff_max: config.discovery_backoff_max,
            healthy_after: healthy_after(config.discovery_backoff_base),
            jitter: config.discovery_jitter(),
        }))
    }
}

/// Ten backoff bases (10 s by default), at most 30 s: long enough that a watch which keeps
/// breaking is not taken for healthy, short enough that `/alive` clears soon after an outage.
fn healthy_after(backoff_base: Duration) -> Duration {
    backoff_base.saturating_mul(10).min(Duration::from_secs(30))
}

/// The watches a configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    agents: AgentWatch,
    nodes: NodeWatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentWatch {
    /// The own node is known and no neighbour is wanted.
    None,
    /// Only the own pod, to read the own node from it.
    OwnPod,
    Pods,
    EndpointSlices,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeWatch {
    None,
    /// Only the own node (started once it is known).
    OwnNode,
    Cordoned,
    All,
}

impl Plan {
    fn of(k: &KubeSettings) -> Self {
        Self::for_settings(k.neighbourhood, k.mode, k.own_node.is_some(), k.allow_unschedulable)
    }

    fn for_settings(neighbourhood: bool, mode: DiscoveryMode, own_node_known: bool, allow_unschedulable: bool) -> Self {
        let agents = match (neighbourhood, mode, own_node_known) {
            (true, DiscoveryMode::EndpointSlices, _) => AgentWatch::EndpointSlices,
            (true, DiscoveryMode::Pods, _) => AgentWatch::Pods,
            (false, _, false) => AgentWatch::OwnPod,
            (false, _, true) => AgentWatch::None,
        };
        let nodes = match (allow_unschedulable, agents) {
            (true, _) => NodeWatch::None,
            (false, AgentWatch::EndpointSlices) => NodeWatch::Cordoned,
            (false, AgentWatch::Pods) => NodeWatch::All,
            (false, AgentWatch::OwnPod | AgentWatch::None) => NodeWatch::OwnNode,
        };
        Self { agents, nodes }
    }
}

/// The discovery handle the scheduler, the readiness check and the listener read.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    mode: Mode,
    store: Mutex<Store>,
    /// Woken after every change of the store.
    changed: Notify,
}

enum Mode {
    /// No neighbours (the neighbourhood is `skipped`).
    Fixed(Arc<Neighbourhood>),
    Kubernetes(KubeMode),
}

impl Discovery {
    /// Starts discovery; Kubernetes watches run on spawned tasks until the process ends.
    pub fn start(source: Source) -> Self {
        let fixed = |state: &str, neighbours, own_zone| {
            let neighbourhood = Neighbourhood { state: state.into(), neighbours, own_node: None, own_zone };
            Mode::Fixed(Arc::new(neighbourhood))
        };
        let (mode, kube) = match source {
            Source::None => (fixed("skipped", Vec::new(), None), None),
            Source::Static(list, zone) => (fixed("ok", static_list::neighbours(&list), zone), None),
            Source::Kubernetes(k) => {
                let mode = KubeMode {
                    own_pod: k.own_pod.clone(),
                    own_node: k.own_node.clone(),
                    own_zone: k.own_zone.clone(),
                    pods_namespace: k.namespace.clone(),
                    label_selector: k.label_selector.clone(),
                    service: k.service.clone(),
                    service_namespace: k.service_namespace.clone(),
                    allow_unschedulable: k.allow_unschedulable,
                    neighbourhood: k.neighbourhood,
                };
                (Mode::Kubernetes(mode), Some(k))
            }
        };
        let discovery = Self { inner: Arc::new(Inner { mode, store: Mutex::default(), changed: Notify::new() }) };
        if let Some(k) = kube {
            discovery.begin(*k);
        }
        discovery
    }

    /// Says what will be watched, then starts the watches after the random start delay.
    fn begin(&self, k: KubeSettings) {
        let plan = Plan::of(&k);
        let delay = k.jitter.mul_f64(fastrand::f64());
        self.change(|store| {
            store.agents = match plan.agents {
                AgentWatch::EndpointSlices => Agents::EndpointSlices,
                _ => Agents::Pods,
            };
            store.node_view = if plan.nodes == NodeWatch::Cordoned { NodeView::Cordoned } else { NodeView::All };
            store.pods.watched = matches!(plan.agents, AgentWatch::Pods | AgentWatch::OwnPod);
            store.slices.watched = plan.agents == AgentWatch::EndpointSlices;
            store.nodes.watched = plan.nodes != NodeWatch::None;
            store.delaying = !delay.is_zero();
        });
        say_what_is_watched(&k, plan, delay);
        let discovery = self.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
                discovery.change(|store| store.delaying = false);
            }
            discovery.watch(Arc::new(k), plan);
        });
    }

    /// Spawns the watches of `plan`.
    fn watch(&self, k: Arc<KubeSettings>, plan: Plan) {
        let settings = WatchSettings {
            backoff_base: k.backoff_base,
            backoff_max: k.backoff_max,
            healthy_after: k.healthy_after,
            answers: k.answers.clone(),
            streaming: Arc::new(StreamingLists::default()),
        };
        match plan.agents {
            AgentWatch::None => {}
            AgentWatch::OwnPod => {
                let config = watcher::Config::default().fields(&format!("metadata.name={}", k.own_pod));
                tokio::spawn(self.clone().follow_pods(k.clone(), config, settings.clone()));
            }
            AgentWatch::Pods => {
                let config = watcher::Config::default().labels(&k.label_selector);
                tokio::spawn(self.clone().follow_pods(k.clone(), config, settings.clone()));
            }
            AgentWatch::EndpointSlices => {
                tokio::spawn(self.clone().follow_slices(k.clone(), settings.clone()));
            }
        }
        let api: Api<SlimNode> = Api::all(k.client.clone());
        let subject = Subject::of::<SlimNode>(None, NODE_VERBS);
        let config = match plan.nodes {
            NodeWatch::None => return,
            // Nodes are large (image lists): small pages bound the memory of a (re-)list.
            NodeWatch::All => watcher::Config::default().page_size(100),
            NodeWatch::Cordoned => watcher::Config::default().fields(CORDONED),
            NodeWatch::OwnNode => {
                let discovery = self.clone();
                tokio::spawn(async move {
                    let node = discovery.wait_own_node().await;
                    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
                    let _ = watch::run(discovery, api, config, subject, settings, false).await;
                });
                return;
            }
        };
        tokio::spawn(watch::run(self.clone(), api, config, subject, settings, false));
    }

    /// Follows the agent pods (or the own pod) in the pods namespace.
    async fn follow_pods(self, k: Arc<KubeSettings>, config: watcher::Config, settings: WatchSettings) {
        let api: Api<SlimPod> = Api::namespaced(k.client.clone(), &k.namespace);
        let subject = Subject::of::<SlimPod>(Some(&k.namespace), NAMESPACED_VERBS);
        let _ = watch::run(self, api, config, subject, settings, false).await;
    }

    /// Follows the EndpointSlices of the agents' Service; reads the pods instead once they
    /// are forbidden (a cluster that kept the Go agent's RBAC).
    async fn follow_slices(self, k: Arc<KubeSettings>, settings: WatchSettings) {
        let api: Api<SlimEndpointSlice> = Api::namespaced(k.client.clone(), &k.service_namespace);
        let config = watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", k.service));
        let subject = Subject::of::<SlimEndpointSlice>(Some(&k.service_namespace), NAMESPACED_VERBS);
        let Err(Forbidden(error)) = watch::run(self.clone(), api, config, subject, settings.clone(), true).await else {
            return;
        };
        tracing::warn!(
            %error,
            selector = %k.label_selector,
            namespace = %k.namespace,
            "EndpointSlices are forbidden: reading the agent pods instead (pods mode, as the Go agent); \
             grant the Role rule, or set KUBENURSE_DISCOVERY=pods"
        );
        let fallback = format!(
            "pods mode: the agent pods are read because endpointslices are {error}; \
             or set KUBENURSE_DISCOVERY=pods"
        );
        self.change(|store| {
            store.slices = Collection::default();
            store.agents = Agents::Pods;
            store.pods.watched = true;
            store.fallback = Some(fallback);
        });
        let config = watcher::Config::default().labels(&k.label_selector);
        self.follow_pods(k, config, settings).await;
    }

    /// True once discovery has started and the first full list of everything watched has
    /// arrived (or nothing is watched).
    pub fn is_synced(&self) -> bool {
        self.lock().synced()
    }

    /// Waits until [`Self::is_synced`], at most `limit`. While discovery waits out its random
    /// start delay this returns at once: the first round then probes what it can, and the
    /// neighbours join the round after their list.
    pub async fn wait_synced(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let started = self.wait_for(|d| {
            let store = d.lock();
            (store.delaying || store.synced()).then_some(())
        });
        let _ = tokio::time::timeout_at(deadline.into(), started).await;
    }

    /// Waits until the own node is known.
    async fn wait_own_node(&self) -> String {
        self.wait_for(|d| {
            let Mode::Kubernetes(m) = &d.inner.mode else { return None };
            d.lock().own_node(m)
        })
        .await
    }

    /// Waits until `check` answers, re-checking after every change of the store.
    async fn wait_for<T>(&self, check: impl Fn(&Self) -> Option<T>) -> T {
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(answer) = check(self) {
                return answer;
            }
            changed.await;
        }
    }

    /// The eligible neighbours now, and what is wrong with discovery, if anything.
    pub fn neighbourhood(&self) -> Neighbourhood {
        Neighbourhood::clone(&self.shared_neighbourhood())
    }

    /// [`Self::neighbourhood`] without a copy: the same `Arc` until discovery learns of a
    /// change, so a reader can tell with `Arc::ptr_eq` that nothing changed (and skip work).
    pub fn shared_neighbourhood(&self) -> Arc<Neighbourhood> {
        match &self.inner.mode {
            Mode::Fixed(neighbourhood) => neighbourhood.clone(),
            Mode::Kubernetes(m) => self.lock().neighbourhood(m),
        }
    }

    /// True when `pod` is an agent pod discovery knows of (with EndpointSlices: an endpoint's
    /// pod), so its probes may count as incoming checks. When agent pods are not watched
    /// (static neighbours, standalone, neighbour probes off) every origin counts.
    pub fn knows_pod(&self, pod: &str) -> bool {
        match &self.inner.mode {
            Mode::Kubernetes(m) if m.neighbourhood => self.lock().knows_pod(m, pod),
            _ => true,
        }
    }

    /// False while this agent's own node is cordoned, or gone where every node is watched
    /// (only known once nodes are listed and the own node is known); true otherwise.
    pub fn own_node_schedulable(&self) -> bool {
        match &self.inner.mode {
            Mode::Kubernetes(m) => self.lock().own_node_schedulable(m),
            _ => true,
        }
    }

    /// Applies `f` to the store, then wakes whoever waits for a change.
    fn change<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.lock();
        let out = f(&mut store);
        store.changed();
        if let Mode::Kubernetes(m) = &self.inner.mode {
            store.note_own_node(m);
        }
        drop(store);
        self.inner.changed.notify_waiters();
        out
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        crate::sync::lock(&self.inner.store)
    }
}

/// One line at start on where neighbours come from, and on settings that do not apply.
fn say_what_is_watched(k: &KubeSettings, plan: Plan, delay: Duration) {
    let start_delay = humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)).to_string();
    match plan.agents {
        AgentWatch::EndpointSlices => {
            let (service, namespace) = (&k.service, &k.service_namespace);
            tracing::info!(%service, %namespace, %start_delay, "neighbours from the EndpointSlices of the agents' Service");
            if !k.label_selector.is_empty() {
                tracing::info!(
                    selector = %k.label_selector,
                    "KUBENURSE_NEIGHBOUR_FILTER does not apply with KUBENURSE_DISCOVERY=endpointslices: the \
                     neighbours are the endpoints of the Service (it applies if pods are read instead)"
                );
            }
            if k.namespace != k.service_namespace {
                tracing::info!(
                    configured = %k.namespace,
                    %namespace,
                    "KUBENURSE_NAMESPACE does not apply with KUBENURSE_DISCOVERY=endpointslices: the Service is \
                     read in the agent's own namespace"
                );
            }
        }
        AgentWatch::Pods => {
            let (selector, namespace) = (&k.label_selector, &k.namespace);
            tracing::info!(%selector, %namespace, %start_delay, "neighbours from the agent pods");
        }
        AgentWatch::OwnPod => {
            let (pod, namespace) = (&k.own_pod, &k.namespace);
            tracing::info!(%pod, %namespace, "KUBENURSE_NODE_NAME is not set: the own node is read from the own pod");
        }
        AgentWatch::None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_healthy_period_follows_the_backoff_base() {
        assert_eq!(healthy_after(Duration::from_secs(1)), Duration::from_secs(10));
        assert_eq!(healthy_after(Duration::from_millis(100)), Duration::from_secs(1));
        assert_eq!(healthy_after(Duration::from_secs(60)), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn the_shared_neighbourhood_stays_the_same_until_a_change() {
        let list = crate::config::Config::from_flags(["--neighbours=node-a=127.0.0.2:8080"]).expect("config");
        let discovery = Discovery::start(Source::Static(list.neighbours.expect("neighbours"), None));
        let first = discovery.shared_neighbourhood();
        assert!(Arc::ptr_eq(&first, &discovery.shared_neighbourhood()));
        assert_eq!(discovery.neighbourhood().neighbours[0].node_name, "node-a");
        let none = Discovery::start(Source::None);
        assert_eq!(none.neighbourhood().state, "skipped");
    }

    #[test]
    fn each_configuration_watches_the_least_it_needs() {
        use AgentWatch as A;
        use DiscoveryMode::{EndpointSlices, Pods};
        use NodeWatch as N;
        let plan = |neighbourhood, mode, own_node_known, allow_unschedulable| {
            let p = Plan::for_settings(neighbourhood, mode, own_node_known, allow_unschedulable);
            (p.agents, p.nodes)
        };
        assert_eq!(plan(true, EndpointSlices, true, false), (A::EndpointSlices, N::Cordoned));
        assert_eq!(plan(true, EndpointSlices, false, true), (A::EndpointSlices, N::None));
        assert_eq!(plan(true, Pods, true, false), (A::Pods, N::All));
        assert_eq!(plan(true, Pods, true, true), (A::Pods, N::None));
        assert_eq!(plan(false, EndpointSlices, true, false), (A::None, N::OwnNode));
        assert_eq!(plan(false, Pods, false, false), (A::OwnPod, N::OwnNode));
    }
}

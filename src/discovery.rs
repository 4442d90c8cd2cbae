//! Neighbour discovery: which kubenurse pods exist, and which nodes may be probed.
//!
//! In a cluster, two watches (list once, then watch; re-list only when the watch expires)
//! keep a slim copy of the kubenurse pods and of node schedulability. Only the fields the
//! agent needs are kept, so 5,000 pods and nodes cost a few hundred kilobytes. When the
//! apiserver is unreachable the last known set stays in use and the watches recover by
//! themselves. Outside a cluster, neighbours are static or there are none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::StaticNeighbours;
use crate::selection::ring_hash;

/// A neighbour as `/alive` lists it (the Go agent's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Neighbour {
    pub pod_name: String,
    #[serde(rename = "PodIP")]
    pub pod_ip: String,
    #[serde(rename = "HostIP")]
    pub host_ip: String,
    pub node_name: String,
    pub node_hash: u64,
    /// Port the neighbour's agent listens on, when it differs from the configured one.
    #[serde(skip)]
    pub port: Option<u16>,
}

/// The neighbours eligible for probing, before selection.
#[derive(Debug, Clone, Default)]
pub struct Neighbourhood {
    /// `ok`, `skipped`, or what is wrong with discovery.
    pub state: String,
    pub neighbours: Vec<Neighbour>,
    /// This agent's node, when known.
    pub own_node: Option<String>,
}

/// Where neighbours come from.
pub enum Source {
    /// Neighbour probes are off, or there is no way to find neighbours.
    None,
    Static(StaticNeighbours),
    Kubernetes(KubeSettings),
}

pub struct KubeSettings {
    pub client: Client,
    pub namespace: String,
    pub label_selector: String,
    pub own_pod: String,
    pub own_node: Option<String>,
    pub allow_unschedulable: bool,
}

/// What the pod watch keeps of a kubenurse pod.
#[derive(Debug, Clone)]
struct PodInfo {
    node: String,
    pod_ip: Option<String>,
    host_ip: String,
    running: bool,
    deleting: bool,
}

#[derive(Debug, Default)]
struct Store {
    pods: HashMap<String, PodInfo>,
    pods_synced: bool,
    /// Node name → schedulable. `None` when nodes are not watched.
    nodes: Option<HashMap<String, bool>>,
    nodes_synced: bool,
    /// The latest watch error, cleared by the next good event.
    error: Option<String>,
}

/// The discovery handle the scheduler and the readiness check read.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    mode: Mode,
    store: Mutex<Store>,
    synced: Notify,
}

enum Mode {
    None,
    Static(Vec<Neighbour>),
    Kubernetes { own_pod: String, own_node: Option<String>, allow_unschedulable: bool },
}

impl Discovery {
    /// Starts discovery; Kubernetes watches run on spawned tasks until the process ends.
    pub fn start(source: Source) -> Self {
        let mode = match &source {
            Source::None => Mode::None,
            Source::Static(list) => Mode::Static(
                list.0
                    .iter()
                    .map(|n| Neighbour {
                        pod_name: n.node.clone(),
                        pod_ip: n.host.clone(),
                        host_ip: n.host.clone(),
                        node_name: n.node.clone(),
                        node_hash: ring_hash(&n.node),
                        port: Some(n.port),
                    })
                    .collect(),
            ),
            Source::Kubernetes(k) => Mode::Kubernetes {
                own_pod: k.own_pod.clone(),
                own_node: k.own_node.clone(),
                allow_unschedulable: k.allow_unschedulable,
            },
        };
        let discovery = Self { inner: Arc::new(Inner { mode, store: Mutex::default(), synced: Notify::new() }) };
        if let Source::Kubernetes(k) = source {
            let store_has_nodes = !k.allow_unschedulable;
            if store_has_nodes {
                discovery.lock().nodes = Some(HashMap::new());
                tokio::spawn(watch_nodes(discovery.clone(), Api::all(k.client.clone())));
            }
            let pods: Api<SlimPod> = Api::namespaced(k.client, &k.namespace);
            let config = watcher::Config::default().labels(&k.label_selector);
            tokio::spawn(watch_pods(discovery.clone(), pods, config, k.namespace));
        }
        discovery
    }

    /// True once the first full list of everything watched has arrived (or nothing is watched).
    pub fn is_synced(&self) -> bool {
        let store = self.lock();
        match self.inner.mode {
            Mode::Kubernetes { .. } => store.pods_synced && (store.nodes.is_none() || store.nodes_synced),
            _ => true,
        }
    }

    /// Waits until [`Self::is_synced`], at most `limit`.
    pub async fn wait_synced(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.is_synced() {
            let notified = self.inner.synced.notified();
            if self.is_synced() || tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                return;
            }
        }
    }

    /// The eligible neighbours now.
    pub fn neighbourhood(&self) -> Neighbourhood {
        match &self.inner.mode {
            Mode::None => Neighbourhood { state: "skipped".into(), ..Default::default() },
            Mode::Static(list) => Neighbourhood { state: "ok".into(), neighbours: list.clone(), own_node: None },
            Mode::Kubernetes { own_pod, own_node, allow_unschedulable } => {
                let store = self.lock();
                let own_node = own_node.clone().or_else(|| store.pods.get(own_pod).map(|p| p.node.clone()));
                let mut neighbours: Vec<Neighbour> = store
                    .pods
                    .iter()
                    .filter(|(name, pod)| {
                        *name != own_pod
                            && pod.running
                            && !pod.deleting
                            && pod.pod_ip.is_some()
                            && (*allow_unschedulable
                                || store.nodes.as_ref().and_then(|n| n.get(&pod.node)) == Some(&true))
                    })
                    .map(|(name, pod)| Neighbour {
                        pod_name: name.clone(),
                        pod_ip: pod.pod_ip.clone().unwrap_or_default(),
                        host_ip: pod.host_ip.clone(),
                        node_name: pod.node.clone(),
                        node_hash: ring_hash(&pod.node),
                        port: None,
                    })
                    .collect();
                neighbours.sort_by(|a, b| a.pod_name.cmp(&b.pod_name));
                let state = match (&store.error, store.pods_synced) {
                    (Some(e), _) => e.clone(),
                    (None, false) => "waiting for the first pod list".into(),
                    (None, true) => "ok".into(),
                };
                Neighbourhood { state, neighbours, own_node }
            }
        }
    }

    /// True when `pod` is an agent pod discovery knows of, so its probes may count as incoming
    /// checks. Without Kubernetes discovery (static neighbours, standalone) every origin counts.
    pub fn knows_pod(&self, pod: &str) -> bool {
        match &self.inner.mode {
            Mode::Kubernetes { .. } => self.lock().pods.contains_key(pod),
            Mode::None | Mode::Static(_) => true,
        }
    }

    /// False while this agent's own node is cordoned or gone (only known when nodes are
    /// watched); true otherwise.
    pub fn own_node_schedulable(&self) -> bool {
        let Mode::Kubernetes { own_pod, own_node, .. } = &self.inner.mode else {
            return true;
        };
        let store = self.lock();
        let Some(nodes) = store.nodes.as_ref().filter(|_| store.nodes_synced) else {
            return true;
        };
        let node = own_node.clone().or_else(|| store.pods.get(own_pod).map(|p| p.node.clone()));
        match node {
            Some(node) => nodes.get(&node) == Some(&true),
            None => true,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.inner.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn watch_pods(discovery: Discovery, api: Api<SlimPod>, config: watcher::Config, namespace: String) {
    let mut buffer: Option<HashMap<String, PodInfo>> = None;
    let mut log = ErrorLog::default();
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                let text = describe_watch_error(&e, "pods", &namespace);
                log.failed(&text);
                discovery.lock().error = Some(format!("list pods: {text}"));
                continue;
            }
        };
        log.recovered("pods");
        let mut store = discovery.lock();
        store.error = None;
        match event {
            Event::Init => buffer = Some(HashMap::new()),
            Event::InitApply(pod) => {
                if let Some((name, info)) = pod.into_info() {
                    buffer.get_or_insert_with(HashMap::new).insert(name, info);
                }
            }
            Event::InitDone => {
                store.pods = buffer.take().unwrap_or_default();
                store.pods_synced = true;
                drop(store);
                discovery.inner.synced.notify_waiters();
            }
            Event::Apply(pod) => {
                if let Some((name, info)) = pod.into_info() {
                    store.pods.insert(name, info);
                }
            }
            Event::Delete(pod) => {
                if let Some(name) = pod.metadata.name {
                    store.pods.remove(&name);
                }
            }
        }
    }
}

async fn watch_nodes(discovery: Discovery, api: Api<SlimNode>) {
    let mut buffer: Option<HashMap<String, bool>> = None;
    let mut log = ErrorLog::default();
    // Nodes are large (image lists): small pages bound the memory of a (re-)list.
    let config = watcher::Config::default().page_size(100);
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                log.failed(&describe_watch_error(&e, "nodes", ""));
                continue;
            }
        };
        log.recovered("nodes");
        let mut store = discovery.lock();
        let nodes = store.nodes.get_or_insert_with(HashMap::new);
        match event {
            Event::Init => buffer = Some(HashMap::new()),
            Event::InitApply(node) => {
                if let Some((name, schedulable)) = node.into_info() {
                    buffer.get_or_insert_with(HashMap::new).insert(name, schedulable);
                }
            }
            Event::InitDone => {
                *nodes = buffer.take().unwrap_or_default();
                store.nodes_synced = true;
                drop(store);
                discovery.inner.synced.notify_waiters();
            }
            Event::Apply(node) => {
                if let Some((name, schedulable)) = node.into_info() {
                    nodes.insert(name, schedulable);
                }
            }
            Event::Delete(node) => {
                if let Some(name) = node.metadata.name {
                    nodes.remove(&name);
                }
            }
        }
    }
}

fn watcher<K>(api: Api<K>, config: watcher::Config) -> impl futures::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config)
}

/// A watch error in words an operator can act on; a 403 names the missing permission.
fn describe_watch_error(e: &watcher::Error, resource: &str, namespace: &str) -> String {
    let api_error = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    };
    match api_error {
        Some(status) if status.code == 403 => {
            let scope =
                if namespace.is_empty() { "cluster-wide".to_owned() } else { format!("in namespace {namespace}") };
            format!(
                "forbidden: the service account lacks RBAC permission to list and watch {resource} {scope} ({})",
                status.message
            )
        }
        _ => e.to_string(),
    }
}

/// Logs the first failure of a streak and its end, and at most one line a minute between.
#[derive(Default)]
struct ErrorLog {
    failing_since: Option<Instant>,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn failed(&mut self, error: &str) {
        let now = Instant::now();
        self.failing_since.get_or_insert(now);
        if self.last_logged.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60)) {
            tracing::warn!(
                error,
                suppressed = self.suppressed,
                "kubernetes watch failed; keeping the last known neighbours"
            );
            self.last_logged = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    fn recovered(&mut self, resource: &str) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(resource, after = ?since.elapsed(), "kubernetes watch recovered");
            self.last_logged = None;
            self.suppressed = 0;
        }
    }
}

/// The parts of a Pod the agent reads; everything else is skipped while parsing.
#[derive(Debug, Clone, Deserialize)]
struct SlimPod {
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
    #[serde(rename = "hostIP")]
    host_ip: Option<String>,
}

impl SlimPod {
    fn into_info(self) -> Option<(String, PodInfo)> {
        let name = self.metadata.name?;
        let info = PodInfo {
            node: self.spec.node_name.unwrap_or_default(),
            pod_ip: self.status.pod_ip.filter(|ip| !ip.is_empty()),
            host_ip: self.status.host_ip.unwrap_or_default(),
            running: self.status.phase.as_deref() == Some("Running"),
            deleting: self.metadata.deletion_timestamp.is_some(),
        };
        Some((name, info))
    }
}

/// The parts of a Node the agent reads.
#[derive(Debug, Clone, Deserialize)]
struct SlimNode {
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

impl SlimNode {
    /// Name and whether pods may be scheduled there: not cordoned, no unschedulable taint.
    fn into_info(self) -> Option<(String, bool)> {
        let cordoned = self.spec.unschedulable == Some(true);
        let tainted = self
            .spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.key == "node.kubernetes.io/unschedulable" && t.effect == "NoSchedule");
        Some((self.metadata.name?, !cordoned && !tainted))
    }
}

macro_rules! slim_resource {
    ($ty:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = "v1";
            const GROUP: &'static str = "";
            const KIND: &'static str = $kind;
            const VERSION: &'static str = "v1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }

        impl k8s_openapi::Metadata for $ty {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

slim_resource!(SlimPod, "Pod", "pods", k8s_openapi::NamespaceResourceScope);
slim_resource!(SlimNode, "Node", "nodes", k8s_openapi::ClusterResourceScope);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slim_pod_reads_only_what_it_needs() {
        let json = serde_json::json!({
            "metadata": {"name": "kubenurse-abc", "namespace": "kube-system", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "hostIP": "192.0.2.1", "conditions": []}
        });
        let pod: SlimPod = serde_json::from_value(json).expect("parses");
        let (name, info) = pod.into_info().expect("named");
        assert_eq!(name, "kubenurse-abc");
        assert_eq!(info.node, "node-1");
        assert_eq!(info.pod_ip.as_deref(), Some("10.0.0.5"));
        assert!(info.running && info.deleting);
    }

    #[test]
    fn node_schedulability_follows_cordon_and_taint() {
        let parse = |spec: serde_json::Value| {
            let node: SlimNode =
                serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}, "spec": spec})).expect("node");
            node.into_info().expect("named").1
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

//! A fake kube-apiserver for integration tests.
//!
//! It speaks enough of the real wire protocol (HTTPS with its own CA, bearer
//! tokens, `Status` error bodies, paginated LIST over consistent snapshots,
//! chunked WATCH resuming from a resourceVersion, bookmarks, 410 `Expired`, label
//! and field selectors, streaming lists) that the real `kube::Client` and
//! `kube::runtime::watcher` work against it. Served, read-only: core/v1 Pods and
//! Nodes, and `discovery.k8s.io/v1` EndpointSlices.
//!
//! EndpointSlices are derived from the pods, as the EndpointSlice controller derives
//! them, for each Service the fake knows (`upsert_service`; from the start, Service
//! `kubenurse` in namespace `kubenurse` selecting the agent pods as the tests label
//! them: `app=kubenurse` or `app.kubernetes.io/name=kubenurse`, which no real Service
//! selector can say). One endpoint per pod and address family for every pod that has
//! an IP and has not finished; `ready` from the pod's Ready condition (false while
//! terminating), `serving` from Ready, `terminating` from `deletionTimestamp`;
//! `nodeName`, `zone` from the node's `topology.kubernetes.io/zone` label, `targetRef`
//! naming the pod. One set of slices per address family, at most 100 endpoints each
//! (`set_max_endpoints_per_slice`), labelled `kubernetes.io/service-name`; an endpoint
//! stays in its slice while its pod lives, as the controller keeps it. A real
//! apiserver rejects loopback addresses (127.0.0.0/8, ::1) in EndpointSlices (and
//! Endpoints): the fake serves what a real one never would, so that agents on
//! 127.0.0.x can find each other through it. Real clusters never have loopback pod IPs.
//!
//! Streaming lists (a watch with `sendInitialEvents=true`) are refused with 422 by
//! default, as by a Kubernetes 1.33 apiserver (the version it reports) with the
//! `WatchList` feature gate off, its default; `set_streaming_lists(Accepted)` serves
//! them as 1.32 and 1.34 do: the initial ADDED events, then a BOOKMARK annotated
//! `k8s.io/initial-events-end: "true"`, then the changes.
//!
//! Tests mutate state synchronously (`upsert_pod`, `delete_node`, ...). Every
//! mutation gets a new global resourceVersion and is appended to an in-memory
//! history that watches replay from until `expire_watches()` compacts it.
//! EndpointSlices follow on the next request or watch wake-up after a change, each
//! change to a slice with a resourceVersion of its own.
//! `set_fault` simulates an unreliable control plane, `set_resource_fault` and
//! `queue_faults` a single resource refused (missing RBAC, errors, throttling with
//! `Retry-After`); the request log (with arrival instants, for the gaps a client leaves
//! between retries), `response_bytes()` and `peak_concurrent_lists()` let tests assert on
//! how the apiserver was used.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ContainerImage, Node, Pod, Taint};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// Namespace of the ServiceAccount the fake token belongs to.
pub const SA_NAMESPACE: &str = "kubenurse";
const SA_USER: &str = "system:serviceaccount:kubenurse:kubenurse";
const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. \
    You can start a new list without the continue parameter, or use the continue value from the response to get a \
    consistent list result.";
/// The real apiserver picks 30-60 min when the client sends no timeoutSeconds.
const DEFAULT_WATCH_TIMEOUT: u64 = 1800;
/// The EndpointSlice controller's default `--max-endpoints-per-slice`.
const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// Initial watch events are read from the state in batches of this many objects.
const INITIAL_BATCH: usize = 100;
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// How the fake answers a streaming list (a watch with `sendInitialEvents=true`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamingLists {
    /// 422 Invalid, as a 1.27–1.33 apiserver with the `WatchList` feature gate off.
    #[default]
    Refused,
    /// Served, as a 1.32 or 1.34+ apiserver.
    Accepted,
}

/// Injected control-plane failure mode, see [`FakeApiServer::set_fault`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// The listener stays bound, but new connections are dropped right after
    /// accept and all open connections (watches included) are cut.
    Outage,
    /// Authenticated pod/node requests get 403, like missing RBAC.
    Forbidden,
    /// Authenticated requests get 500 InternalError.
    ServerError,
    /// Authenticated requests get 429 with `Retry-After` and a plain-text body, as API
    /// Priority and Fairness rejects them.
    TooManyRequests { retry_after_secs: u64 },
}

/// One served request (requests cut by `Fault::Outage` are not logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// Raw (percent-encoded) query string.
    pub query: String,
    pub watch: bool,
    pub status: u16,
    /// When the request arrived.
    pub at: Instant,
}

/// A served resource type.
struct Res {
    plural: &'static str,
    kind: &'static str,
    /// "" for the core group.
    group: &'static str,
    api_version: &'static str,
    /// Field labels the real apiserver accepts in field selectors.
    fields: &'static str,
}

const PODS: Res = Res {
    plural: "pods",
    kind: "Pod",
    group: "",
    api_version: "v1",
    fields: "metadata.name metadata.namespace spec.nodeName spec.restartPolicy \
        spec.schedulerName spec.serviceAccountName spec.hostNetwork status.phase status.podIP \
        status.nominatedNodeName",
};
const NODES: Res = Res {
    plural: "nodes",
    kind: "Node",
    group: "",
    api_version: "v1",
    fields: "metadata.name metadata.namespace spec.unschedulable",
};
const ENDPOINT_SLICES: Res = Res {
    plural: "endpointslices",
    kind: "EndpointSlice",
    group: "discovery.k8s.io",
    api_version: "discovery.k8s.io/v1",
    fields: "metadata.name metadata.namespace",
};

fn resource(plural: &str) -> &'static Res {
    match plural {
        "pods" => &PODS,
        "nodes" => &NODES,
        "endpointslices" => &ENDPOINT_SLICES,
        other => panic!("the fake apiserver serves pods, nodes and endpointslices, not {other}"),
    }
}

/// (plural, namespace, name): ordered like etcd keys, which fixes LIST order.
type Key = (&'static str, String, String);
type Params = HashMap<String, String>;
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// One mutation: `obj` is the new state (for deletes the last state, carrying
/// the deletion's resourceVersion), `prev` the state before.
struct Change {
    rv: u64,
    key: Key,
    prev: Option<Value>,
    obj: Value,
    deleted: bool,
}

struct State {
    rv: u64,
    /// Watches and continue tokens older than this get 410 Expired.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    fault: Fault,
    /// Faults of one resource ("pods", "nodes", "endpointslices"), ahead of the global one.
    resource_faults: HashMap<&'static str, ResourceFault>,
    requests: Vec<RequestRecord>,
    /// (namespace, name) → the Service whose EndpointSlices are derived.
    services: BTreeMap<(String, String), Service>,
    /// Pods, nodes or Services changed since the slices were derived.
    slices_stale: bool,
    max_endpoints_per_slice: usize,
    streaming: StreamingLists,
}

impl Default for State {
    fn default() -> Self {
        let agents = |key: &str| BTreeMap::from([(key.to_string(), "kubenurse".to_string())]);
        let service = Service { uid: new_uid(), selectors: vec![agents("app"), agents("app.kubernetes.io/name")] };
        Self {
            rv: 0,
            compacted: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            fault: Fault::None,
            resource_faults: HashMap::new(),
            requests: Vec::new(),
            services: BTreeMap::from([((SA_NAMESPACE.to_string(), "kubenurse".to_string()), service)]),
            slices_stale: false,
            max_endpoints_per_slice: MAX_ENDPOINTS_PER_SLICE,
            streaming: StreamingLists::default(),
        }
    }
}

/// A Service, as far as its EndpointSlices need: it selects the pods that match any of
/// its selectors (a real Service has exactly one).
struct Service {
    uid: String,
    selectors: Vec<BTreeMap<String, String>>,
}

/// The fault of one resource: queued faults answer the next requests, one each, then the
/// standing one applies.
#[derive(Default)]
struct ResourceFault {
    standing: Fault,
    queued: VecDeque<Fault>,
}

impl State {
    /// The objects of `plural` as of resourceVersion `rv` (undoes newer history).
    fn snapshot(&self, plural: &str, rv: u64) -> BTreeMap<&Key, &Value> {
        let mut snap: BTreeMap<&Key, &Value> = self.objects.iter().collect();
        for c in self.history.iter().rev().take_while(|c| c.rv > rv) {
            match &c.prev {
                Some(prev) => snap.insert(&c.key, prev),
                None => snap.remove(&c.key),
            };
        }
        snap.retain(|key, _| key.0 == plural);
        snap
    }

    /// Creates or updates, keeping uid/creationTimestamp. Like the real apiserver, an
    /// update that changes nothing is a no-op (no resourceVersion, no event). Returns the
    /// new resourceVersion, if any.
    fn put(&mut self, key: Key, mut obj: Value) -> Option<u64> {
        let prev = self.objects.get(&key).cloned();
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        if let Some(prev) = &prev {
            for field in ["uid", "creationTimestamp", "resourceVersion"] {
                if let Some(value) = prev["metadata"].get(field) {
                    meta.insert(field.to_string(), value.clone());
                }
            }
            if *prev == obj {
                return None;
            }
        } else {
            meta.entry("uid").or_insert_with(|| new_uid().into());
            meta.entry("creationTimestamp").or_insert_with(|| now_rfc3339().into());
        }
        Some(self.record(key, prev, obj, false))
    }

    /// Deletes; returns the deletion's resourceVersion if the object existed.
    fn remove(&mut self, key: &Key) -> Option<u64> {
        let prev = self.objects.remove(key)?;
        let obj = prev.clone();
        Some(self.record(key.clone(), Some(prev), obj, true))
    }

    /// Gives a change the next resourceVersion and records it.
    fn record(&mut self, key: Key, prev: Option<Value>, mut obj: Value, deleted: bool) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        set_rv(&mut obj, rv);
        if key.0 != "endpointslices" {
            self.slices_stale = true;
        }
        if !deleted {
            self.objects.insert(key.clone(), obj.clone());
        }
        self.history.push(Change { rv, key, prev, obj, deleted });
        rv
    }

    /// Brings the EndpointSlices up to date with the pods, nodes and Services, as the
    /// EndpointSlice controller would; returns the latest resourceVersion if anything changed.
    fn sync_slices(&mut self) -> Option<u64> {
        if !self.slices_stale {
            return None;
        }
        self.slices_stale = false;
        let mut desired: BTreeMap<Key, Value> = BTreeMap::new();
        for ((ns, name), service) in &self.services {
            desired.extend(self.service_slices(ns, name, service));
        }
        let stale: Vec<Key> =
            self.objects.keys().filter(|k| k.0 == "endpointslices" && !desired.contains_key(*k)).cloned().collect();
        let mut changed = None;
        for key in stale {
            changed = self.remove(&key).or(changed);
        }
        for (key, obj) in desired {
            changed = self.put(key, obj).or(changed);
        }
        self.slices_stale = false;
        changed
    }

    /// The slices Service `ns/name` should have: each endpoint stays in the slice that
    /// holds it, new ones fill slices with room, then new slices.
    fn service_slices(&self, ns: &str, name: &str, service: &Service) -> Vec<(Key, Value)> {
        let mut families: [BTreeMap<String, Value>; 2] = Default::default();
        for ((plural, pod_ns, pod_name), pod) in &self.objects {
            if *plural != "pods" || pod_ns != ns || !service.selects(pod) {
                continue;
            }
            let phase = str_at(pod, "/status/phase").unwrap_or_default();
            if matches!(phase, "Succeeded" | "Failed") {
                continue;
            }
            for ip in pod_ips(pod) {
                let endpoint = self.endpoint(ns, pod_name, pod, &ip);
                families[usize::from(ip.contains(':'))].insert(pod_name.clone(), endpoint);
            }
        }
        let mut out = Vec::new();
        for (family, mut endpoints) in families.into_iter().enumerate() {
            let (address_type, prefix) = [("IPv4", "ipv4"), ("IPv6", "ipv6")][family];
            // Existing slices of this Service and family, by name, with their pods still wanted.
            let mut slices: Vec<(String, Vec<Value>)> = Vec::new();
            for ((plural, slice_ns, slice_name), slice) in &self.objects {
                let mine = *plural == "endpointslices"
                    && slice_ns == ns
                    && str_at(slice, &format!("/metadata/labels/{}", SERVICE_NAME_LABEL.replace('/', "~1")))
                        == Some(name)
                    && str_at(slice, "/addressType") == Some(address_type);
                if !mine {
                    continue;
                }
                let kept = slice["endpoints"].as_array().into_iter().flatten();
                let kept = kept.filter_map(|e| endpoints.remove(str_at(e, "/targetRef/name")?));
                slices.push((slice_name.clone(), kept.collect()));
            }
            for (_, endpoint) in endpoints {
                let max = self.max_endpoints_per_slice;
                match slices.iter_mut().find(|(_, e)| e.len() < max) {
                    Some((_, e)) => e.push(endpoint),
                    None => {
                        let taken = |n: &String| slices.iter().any(|(s, _)| s == n);
                        let slice_name = (0..).map(|i| format!("{name}-{prefix}-{i}")).find(|n| !taken(n));
                        slices.push((slice_name.expect("a free name"), vec![endpoint]));
                    }
                }
            }
            for (slice_name, endpoints) in slices.into_iter().filter(|(_, e)| !e.is_empty()) {
                let labels = json!({ SERVICE_NAME_LABEL: name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io" });
                let owner = json!([{ "apiVersion": "v1", "kind": "Service", "name": name, "uid": service.uid,
                    "controller": true, "blockOwnerDeletion": true }]);
                let slice = json!({
                    "apiVersion": ENDPOINT_SLICES.api_version, "kind": ENDPOINT_SLICES.kind,
                    "metadata": { "name": slice_name, "namespace": ns, "generateName": format!("{name}-"),
                        "labels": labels, "ownerReferences": owner },
                    "addressType": address_type,
                    "endpoints": endpoints,
                    "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
                });
                out.push((("endpointslices", ns.to_string(), slice_name), slice));
            }
        }
        out
    }

    /// The endpoint of `pod` at `ip`.
    fn endpoint(&self, ns: &str, name: &str, pod: &Value, ip: &str) -> Value {
        let ready = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| str_at(c, "/type") == Some("Ready") && str_at(c, "/status") == Some("True"));
        let terminating = pod.pointer("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null());
        let mut endpoint = json!({
            "addresses": [ip],
            "conditions": { "ready": ready && !terminating, "serving": ready, "terminating": terminating },
            "targetRef": { "kind": "Pod", "namespace": ns, "name": name,
                "uid": str_at(pod, "/metadata/uid").unwrap_or_default() },
        });
        if let Some(node) = str_at(pod, "/spec/nodeName") {
            endpoint["nodeName"] = node.into();
            let node = self.objects.get(&("nodes", String::new(), node.to_string()));
            if let Some(zone) = node.and_then(|n| str_at(n, "/metadata/labels/topology.kubernetes.io~1zone")) {
                endpoint["zone"] = zone.into();
            }
        }
        endpoint
    }
}

impl Service {
    fn selects(&self, pod: &Value) -> bool {
        let label = |k: &str| pod.pointer("/metadata/labels").and_then(|l| l.get(k)?.as_str());
        self.selectors.iter().any(|s| s.iter().all(|(k, v)| label(k) == Some(v.as_str())))
    }
}

/// `status.podIPs`, or `status.podIP`.
fn pod_ips(pod: &Value) -> Vec<String> {
    let listed = pod.pointer("/status/podIPs").and_then(Value::as_array).into_iter().flatten();
    let mut ips: Vec<String> = listed.filter_map(|p| str_at(p, "/ip")).map(str::to_string).collect();
    if ips.is_empty() {
        ips.extend(str_at(pod, "/status/podIP").filter(|ip| !ip.is_empty()).map(str::to_string));
    }
    ips
}

/// Broadcast to connections and watch streams: a `conn_epoch` bump cuts every
/// connection (outage), a `watch_epoch` bump ends every watch stream cleanly.
#[derive(Clone, Copy, Default)]
struct Signal {
    rv: u64,
    watch_epoch: u64,
    conn_epoch: u64,
}

struct Shared {
    state: Mutex<State>,
    signal: watch::Sender<Signal>,
    bytes: AtomicU64,
    /// Lists in progress (a paginated list from its first page's request until its last page
    /// is sent, a streaming list until its initial-events-end bookmark), and the most at once.
    lists: AtomicUsize,
    peak_lists: AtomicUsize,
    token: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state with the EndpointSlices brought up to date (watchers woken if they changed).
    fn lock_synced(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        if let Some(rv) = st.sync_slices() {
            self.signal.send_modify(|s| s.rv = rv);
        }
        st
    }
}

/// The end of a list in progress, for `peak_concurrent_lists`: it ends when this drops.
struct ListGuard(Arc<Shared>);

impl ListGuard {
    /// A list begins.
    fn new(shared: &Arc<Shared>) -> Self {
        Self::begin(shared);
        Self(shared.clone())
    }

    fn begin(shared: &Shared) {
        let now = shared.lists.fetch_add(1, Relaxed) + 1;
        shared.peak_lists.fetch_max(now, Relaxed);
    }

    /// The list begun earlier (its first page) ends with this one.
    fn ending(shared: &Arc<Shared>) -> Self {
        Self(shared.clone())
    }
}

impl Drop for ListGuard {
    fn drop(&mut self) {
        self.0.lists.fetch_sub(1, Relaxed);
    }
}

/// The running fake apiserver; dropping it stops the server and its connections.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// PEM of the CA that signed the serving certificate.
    pub ca_pem: String,
    ca_der: Vec<u8>,
    task: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort(); // drops the JoinSet, which aborts every connection task
    }
}

impl FakeApiServer {
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (ca_pem, ca_der, tls) = make_tls();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let token = format!("fake-sa-token-{:016x}{:016x}", random(), random());
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            signal: watch::Sender::new(Signal::default()),
            bytes: AtomicU64::new(0),
            lists: AtomicUsize::new(0),
            peak_lists: AtomicUsize::new(0),
            token,
        });
        let acceptor = TlsAcceptor::from(tls);
        let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        Self { shared, addr, ca_pem, ca_der, task }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    pub fn token(&self) -> String {
        self.shared.token.clone()
    }

    /// A `kube::Config` trusting the fake CA and carrying the bearer token.
    pub fn kube_config(&self) -> kube::Config {
        let mut cfg = kube::Config::new(self.url().parse().expect("valid url"));
        cfg.root_cert = Some(vec![self.ca_der.clone()]);
        cfg.default_namespace = SA_NAMESPACE.to_string();
        let auth = serde_json::from_value(json!({ "token": self.token() }));
        cfg.auth_info = auth.expect("AuthInfo");
        cfg
    }
    /// Must be called inside a tokio runtime.
    pub fn kube_client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).expect("kube client")
    }
    /// The agent flags of an in-cluster agent talking to this apiserver, with the service
    /// account in `sa_dir` (see [`Self::write_service_account_dir`]); the apiserver's DNS name
    /// is `localhost`, so no resolver is asked.
    pub fn agent_args(&self, sa_dir: &Path) -> Vec<String> {
        vec![
            "--kubernetes-service-host=127.0.0.1".into(),
            format!("--kubernetes-service-port={}", self.port()),
            "--kubernetes-service-dns=localhost".into(),
            format!("--service-account-dir={}", sa_dir.display()),
        ]
    }

    /// Writes `token`, `ca.crt` and `namespace` like /var/run/secrets/kubernetes.io/serviceaccount.
    pub fn write_service_account_dir(&self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("create sa dir");
        let files = [("token", self.shared.token.as_str()), ("ca.crt", &self.ca_pem), ("namespace", SA_NAMESPACE)];
        for (file, content) in files {
            std::fs::write(dir.join(file), content).expect("write sa file");
        }
    }

    // ---- state ----

    pub fn upsert_pod(&self, pod: Pod) {
        self.upsert(&PODS, serde_json::to_value(pod).expect("serialize Pod"));
    }
    /// Creates or replaces Service `ns/name` selecting the pods labelled `selector`; its
    /// EndpointSlices follow.
    pub fn upsert_service(&self, ns: &str, name: &str, selector: &[(&str, &str)]) {
        let selector = selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut st = self.shared.lock();
        let key = (ns.to_string(), name.to_string());
        let uid = st.services.get(&key).map_or_else(new_uid, |s| s.uid.clone());
        st.services.insert(key, Service { uid, selectors: vec![selector] });
        st.slices_stale = true;
        drop(st);
        drop(self.shared.lock_synced());
    }
    /// Deletes Service `ns/name`, and with it its EndpointSlices.
    pub fn delete_service(&self, ns: &str, name: &str) {
        let mut st = self.shared.lock();
        st.services.remove(&(ns.to_string(), name.to_string()));
        st.slices_stale = true;
        drop(st);
        drop(self.shared.lock_synced());
    }
    /// The EndpointSlices of namespace `ns` now, by name.
    pub fn endpoint_slices(&self, ns: &str) -> Vec<EndpointSlice> {
        let st = self.shared.lock_synced();
        let slices = st.objects.iter().filter(|(k, _)| k.0 == "endpointslices" && k.1 == ns);
        slices.map(|(_, s)| serde_json::from_value(s.clone()).expect("stored slice deserializes")).collect()
    }
    /// Endpoints per slice from now on (the controller's `--max-endpoints-per-slice`).
    pub fn set_max_endpoints_per_slice(&self, max: usize) {
        let mut st = self.shared.lock();
        st.max_endpoints_per_slice = max.max(1);
        st.slices_stale = true;
        drop(st);
        drop(self.shared.lock_synced());
    }
    /// Whether streaming lists are served (by default they are refused, as by a default 1.33).
    pub fn set_streaming_lists(&self, streaming: StreamingLists) {
        self.shared.lock().streaming = streaming;
    }
    pub fn upsert_node(&self, node: Node) {
        self.upsert(&NODES, serde_json::to_value(node).expect("serialize Node"));
    }
    /// Returns whether the pod existed.
    pub fn delete_pod(&self, ns: &str, name: &str) -> bool {
        self.delete(("pods", ns.to_string(), name.to_string()))
    }
    /// Returns whether the node existed.
    pub fn delete_node(&self, name: &str) -> bool {
        self.delete(("nodes", String::new(), name.to_string()))
    }
    pub fn get_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.get(("pods", ns.to_string(), name.to_string()))
    }
    pub fn get_node(&self, name: &str) -> Option<Node> {
        self.get(("nodes", String::new(), name.to_string()))
    }
    /// The current global resourceVersion (after the slices caught up).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_synced().rv
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: Key) -> Option<T> {
        let obj = self.shared.lock().objects.get(&key).cloned()?;
        Some(serde_json::from_value(obj).expect("stored object deserializes"))
    }

    /// Create or update (see [`State::put`]), then wake watchers.
    fn upsert(&self, res: &Res, mut obj: Value) {
        let name = str_at(&obj, "/metadata/name").expect("metadata.name").to_string();
        let mut ns = String::new();
        if res.plural == "pods" {
            ns = str_at(&obj, "/metadata/namespace").unwrap_or("default").to_string();
            obj["metadata"]["namespace"] = ns.clone().into();
        }
        let rv = self.shared.lock().put((res.plural, ns, name), obj);
        self.wake(rv);
    }

    fn delete(&self, key: Key) -> bool {
        let rv = self.shared.lock().remove(&key);
        self.wake(rv);
        rv.is_some()
    }

    fn wake(&self, rv: Option<u64>) {
        if let Some(rv) = rv {
            self.shared.signal.send_modify(|s| s.rv = rv);
        }
    }

    // ---- faults ----

    pub fn set_fault(&self, fault: Fault) {
        self.shared.lock().fault = fault;
        if fault == Fault::Outage {
            self.shared.signal.send_modify(|s| s.conn_epoch += 1);
        }
    }

    /// Requests for `plural` ("pods", "nodes" or "endpointslices") get `fault` (`Forbidden`, `ServerError` or
    /// `TooManyRequests`) until it is changed; `Fault::None` lets them through again. Open
    /// watches are not cut: the fault answers the next list or watch.
    pub fn set_resource_fault(&self, plural: &str, fault: Fault) {
        let res = resource(plural);
        self.shared.lock().resource_faults.entry(res.plural).or_default().standing = fault;
    }

    /// The next requests for `plural` get `faults`, one each in order; then the standing
    /// fault of [`Self::set_resource_fault`] applies again.
    pub fn queue_faults(&self, plural: &str, faults: impl IntoIterator<Item = Fault>) {
        let res = resource(plural);
        self.shared.lock().resource_faults.entry(res.plural).or_default().queued.extend(faults);
    }

    /// Compacts the history: every watch or continue token from an older
    /// resourceVersion now gets 410 Expired, and open watch streams end.
    pub fn expire_watches(&self) {
        let mut st = self.shared.lock();
        st.rv += 1;
        st.compacted = st.rv;
        st.history.clear();
        let rv = st.rv;
        drop(st);
        self.shared.signal.send_modify(|s| {
            s.rv = rv;
            s.watch_epoch += 1;
        });
    }

    // ---- request log ----

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }
    /// Requests (list or watch) whose path ends with `path_suffix`, in arrival order.
    pub fn requests_to(&self, path_suffix: &str) -> Vec<RequestRecord> {
        let st = self.shared.lock();
        st.requests.iter().filter(|r| r.path.ends_with(path_suffix)).cloned().collect()
    }
    /// Non-watch GETs whose path ends with `path_suffix` (e.g. "/pods", "/nodes",
    /// "/endpointslices"): LIST requests (a streaming list is a watch).
    pub fn list_calls(&self, path_suffix: &str) -> usize {
        self.count_calls(path_suffix, false)
    }
    /// Watch GETs whose path ends with `path_suffix`.
    pub fn watch_calls(&self, path_suffix: &str) -> usize {
        self.count_calls(path_suffix, true)
    }
    fn count_calls(&self, suffix: &str, watch: bool) -> usize {
        let hit = |r: &&RequestRecord| r.method == "GET" && r.watch == watch;
        let st = self.shared.lock();
        st.requests.iter().filter(hit).filter(|r| r.path.ends_with(suffix)).count()
    }
    /// Total response body bytes sent so far, watch events included.
    pub fn response_bytes(&self) -> u64 {
        self.shared.bytes.load(Relaxed)
    }
    /// The most lists in progress at the same time since the start (or `clear_requests`): a
    /// paginated list counts from its first page's request until its last page is sent (one
    /// given up half-way stays counted), a streaming list until its initial-events-end bookmark.
    pub fn peak_concurrent_lists(&self) -> usize {
        self.shared.peak_lists.load(Relaxed)
    }
    /// Clears the request log, the byte counter and the peak of concurrent lists.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
        self.shared.bytes.store(0, Relaxed);
        self.shared.peak_lists.store(self.shared.lists.load(Relaxed), Relaxed);
    }
}

// ---- object builders ----

/// A pod with one container; `node`/`ip` may be "" (unscheduled / no IP yet).
pub fn pod(name: &str, ns: &str, labels: &[(&str, &str)], node: &str, ip: &str, phase: &str) -> Pod {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let (node, ip) = ((!node.is_empty()).then_some(node), (!ip.is_empty()).then_some(ip));
    let ips = ip.map(|ip| json!([{ "ip": ip }]));
    let ready = if phase == "Running" { "True" } else { "False" };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "nodeName": node, "containers": [{
            "name": "kubenurse", "image": "postfinance/kubenurse:v1.14.2",
            "ports": [{ "containerPort": 8080, "protocol": "TCP" }] }] },
        "status": { "phase": phase, "conditions": [{ "type": "Ready", "status": ready }],
            "podIP": ip, "podIPs": ips, "hostIP": ip, "hostIPs": ips },
    }))
    .expect("valid Pod")
}

/// `pod` with a second address (dual-stack: one IPv4 and one IPv6 endpoint).
pub fn with_second_ip(mut pod: Pod, ip: &str) -> Pod {
    let status = pod.status.get_or_insert_with(Default::default);
    let ips = status.pod_ips.get_or_insert_with(Vec::new);
    ips.push(k8s_openapi::api::core::v1::PodIP { ip: ip.to_string() });
    pod
}

/// `pod` running but not Ready (its readiness probe fails, or its node stopped reporting).
pub fn not_ready(mut pod: Pod) -> Pod {
    let conditions = pod.status.as_mut().and_then(|s| s.conditions.as_mut()).expect("conditions");
    conditions.iter_mut().filter(|c| c.type_ == "Ready").for_each(|c| c.status = "False".into());
    pod
}

/// `pod` not started yet: phase Pending, not Ready.
pub fn pending(pod: Pod) -> Pod {
    let mut pod = not_ready(pod);
    pod.status.get_or_insert_with(Default::default).phase = Some("Pending".into());
    pod
}

/// `pod` being deleted (a `deletionTimestamp`, still running).
pub fn terminating(mut pod: Pod) -> Pod {
    let now = k8s_openapi::jiff::Timestamp::now();
    pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
    pod
}

/// A pod of realistic size (about 5 KB of JSON): what a DaemonSet pod carries besides the
/// fields discovery reads (managed fields, the service-account volume, tolerations, env,
/// container statuses).
pub fn realistic_pod(name: &str, ns: &str, labels: &[(&str, &str)], node: &str, ip: &str) -> Pod {
    let mut value = serde_json::to_value(pod(name, ns, labels, node, ip, "Running")).expect("pod json");
    let fields_v1 = json!({ "f:metadata": { "f:generateName": {}, "f:labels": { ".": {},
        "f:app.kubernetes.io/name": {}, "f:controller-revision-hash": {}, "f:pod-template-generation": {} },
        "f:ownerReferences": { ".": {}, "k:{\"uid\":\"0\"}": {} } }, "f:spec": { "f:affinity": { ".": {},
        "f:nodeAffinity": { ".": {}, "f:requiredDuringSchedulingIgnoredDuringExecution": {} } },
        "f:containers": { "k:{\"name\":\"kubenurse\"}": { ".": {}, "f:env": {}, "f:image": {},
        "f:imagePullPolicy": {}, "f:livenessProbe": {}, "f:name": {}, "f:ports": {}, "f:readinessProbe": {},
        "f:resources": {}, "f:securityContext": {}, "f:terminationMessagePath": {} } } } });
    let metadata = value["metadata"].as_object_mut().expect("metadata");
    metadata.insert("generateName".into(), "kubenurse-".into());
    metadata.insert(
        "annotations".into(),
        json!({ "prometheus.io/scrape": "true", "prometheus.io/port": "8080",
        "prometheus.io/path": "/metrics", "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z" }),
    );
    metadata.insert(
        "ownerReferences".into(),
        json!([{ "apiVersion": "apps/v1", "kind": "DaemonSet",
        "name": "kubenurse", "uid": "00000000-0000-4000-8000-000000000001", "controller": true,
        "blockOwnerDeletion": true }]),
    );
    metadata.insert(
        "managedFields".into(),
        json!([
        { "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
          "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": fields_v1 },
        { "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-01-01T00:00:05Z",
          "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": { "f:status": { "f:conditions": {},
          "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {}, "f:podIP": {},
          "f:podIPs": {}, "f:startTime": {} } } }]),
    );
    let env: Vec<Value> = ["KUBENURSE_POD_NAME", "KUBENURSE_NODE_NAME", "KUBENURSE_NAMESPACE"]
        .iter()
        .map(
            |n| json!({ "name": n, "valueFrom": { "fieldRef": { "apiVersion": "v1", "fieldPath": "metadata.name" } } }),
        )
        .chain((0..6).map(|i| json!({ "name": format!("KUBENURSE_SETTING_{i}"), "value": "a-typical-value" })))
        .collect();
    let container = &mut value["spec"]["containers"][0];
    container["env"] = env.into();
    container["resources"] = json!({ "requests": { "cpu": "10m", "memory": "24Mi" }, "limits": { "memory": "64Mi" } });
    container["readinessProbe"] = json!({ "httpGet": { "path": "/ready", "port": "http", "scheme": "HTTP" },
        "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2, "successThreshold": 1 });
    container["livenessProbe"] = json!({ "httpGet": { "path": "/alwayshappy", "port": "http", "scheme": "HTTP" },
        "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3, "successThreshold": 1 });
    container["securityContext"] = json!({ "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
        "runAsNonRoot": true, "runAsUser": 65532, "capabilities": { "drop": ["ALL"] } });
    container["volumeMounts"] = json!([{ "name": "kube-api-access-abcde", "readOnly": true,
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount" }]);
    let spec = value["spec"].as_object_mut().expect("spec");
    spec.insert("serviceAccountName".into(), "kubenurse".into());
    spec.insert(
        "tolerations".into(),
        json!([
        { "operator": "Exists", "effect": "NoSchedule" }, { "operator": "Exists", "effect": "NoExecute" },
        { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute" },
        { "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute" },
        { "key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule" },
        { "key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule" },
        { "key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule" },
        { "key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule" }]),
    );
    spec.insert("affinity".into(), json!({ "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{ "matchFields": [{ "key": "metadata.name", "operator": "In", "values": [node] }] }] } } }));
    spec.insert(
        "volumes".into(),
        json!([{ "name": "kube-api-access-abcde", "projected": { "defaultMode": 420,
        "sources": [{ "serviceAccountToken": { "expirationSeconds": 3607, "path": "token" } },
        { "configMap": { "name": "kube-root-ca.crt", "items": [{ "key": "ca.crt", "path": "ca.crt" }] } },
        { "downwardAPI": { "items": [{ "path": "namespace", "fieldRef": { "apiVersion": "v1",
          "fieldPath": "metadata.namespace" } }] } }] } }]),
    );
    let status = value["status"].as_object_mut().expect("status");
    status.insert("qosClass".into(), "Burstable".into());
    status.insert("startTime".into(), "2026-01-01T00:00:00Z".into());
    status.insert(
        "containerStatuses".into(),
        json!([{ "name": "kubenurse", "ready": true, "started": true,
        "restartCount": 0, "image": "ghcr.io/example/kubenurse-rs:0.1.0",
        "imageID": format!("ghcr.io/example/kubenurse-rs@sha256:{}", "0123456789abcdef".repeat(4)),
        "containerID": format!("containerd://{}", "fedcba9876543210".repeat(4)),
        "state": { "running": { "startedAt": "2026-01-01T00:00:03Z" } } }]),
    );
    serde_json::from_value(value).expect("valid Pod")
}

/// `node` in availability zone `zone` (the `topology.kubernetes.io/zone` label).
pub fn in_zone(mut node: Node, zone: &str) -> Node {
    let labels = node.metadata.labels.get_or_insert_with(Default::default);
    labels.insert("topology.kubernetes.io/zone".to_string(), zone.to_string());
    node
}

/// A Ready node with the usual well-known labels.
pub fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64" } },
        "spec": {},
        "status": { "conditions": [{ "type": "Ready", "status": "True",
            "reason": "KubeletReady", "message": "kubelet is posting ready status" }] },
    }))
    .expect("valid Node")
}

/// `kubectl cordon`: spec.unschedulable=true plus the taint the node
/// lifecycle controller adds for it.
pub fn cordoned(node: Node) -> Node {
    let mut node = with_taint(node, "node.kubernetes.io/unschedulable", "NoSchedule");
    node.spec.get_or_insert_with(Default::default).unschedulable = Some(true);
    node
}

pub fn with_taint(mut node: Node, key: &str, effect: &str) -> Node {
    let (key, effect) = (key.to_string(), effect.to_string());
    let taints = &mut node.spec.get_or_insert_with(Default::default).taints;
    taints.get_or_insert_with(Vec::new).push(Taint { key, effect, ..Default::default() });
    node
}

/// A node whose status.images makes it realistically large (~250 B per image).
pub fn node_with_images(name: &str, n_images: usize) -> Node {
    let image = |i: u64| {
        let repo = format!("registry.example.com/platform-team/some-fairly-long-image-name-{i}");
        let digest = format!("{:016x}", (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)).repeat(4);
        let names = vec![format!("{repo}@sha256:{digest}"), format!("{repo}:v1.{i}.0")];
        let size_bytes = Some(50_000_000 + 1_000 * i as i64);
        ContainerImage { names: Some(names), size_bytes }
    };
    let mut node = node(name);
    let status = node.status.get_or_insert_with(Default::default);
    status.images = Some((0..n_images as u64).map(image).collect());
    node
}

// ---- server ----

fn make_tls() -> (String, Vec<u8>, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku};
    use rcgen::{IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "fake-kube-apiserver-ca");
    ca.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate().expect("server key");
    let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let mut params = CertificateParams::new(sans).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    params.extended_key_usages = vec![Eku::ServerAuth];
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .expect("server tls config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca_cert.pem(), ca_cert.der().to_vec(), Arc::new(cfg))
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await; // e.g. EMFILE
            continue;
        };
        while conns.try_join_next().is_some() {}
        if shared.lock().fault != Fault::Outage {
            conns.spawn(serve_conn(tcp, acceptor.clone(), shared.clone()));
        } // else: drop the socket right away
    }
}

async fn serve_conn(tcp: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut signal = shared.signal.subscribe();
    let epoch = signal.borrow().conn_epoch;
    let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
    let Ok(Ok(tls)) = handshake.await else { return };
    let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc);
    tokio::select! {
        _ = conn => {}
        // Outage: drop the socket mid-flight, clients see EOF/reset.
        _ = signal.wait_for(|s| s.conn_epoch != epoch) => {}
    }
}

enum Reply {
    Json(u16, Value),
    /// A page of a LIST (200); a list is in progress from its first page until its last is sent.
    List {
        page: Value,
        first: bool,
        last: bool,
    },
    Watch(Box<WatchCursor>),
    /// Close the connection without a response (outage).
    Hangup,
    /// 429 with `Retry-After` and a plain-text body.
    Throttled {
        retry_after_secs: u64,
    },
}

type HandlerResult = Result<Response<Body>, std::io::Error>;

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> HandlerResult {
    let at = Instant::now();
    let query = req.uri().query().unwrap_or_default().to_string();
    let params = parse_query(&query);
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let mut record = RequestRecord { method, path, query, watch, status: 200, at };
    let expected = format!("Bearer {}", shared.token);
    let auth = req.headers().get(header::AUTHORIZATION);
    let authorized = auth.map(HeaderValue::as_bytes) == Some(expected.as_bytes());
    let mut retry_after = None;
    let mut content_type = HeaderValue::from_static("application/json");
    let body = match route(&shared, &record, &params, authorized) {
        Reply::Hangup => return Err(std::io::Error::other("injected outage")),
        Reply::Json(code, value) => {
            let bytes = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
            shared.bytes.fetch_add(bytes.len() as u64, Relaxed);
            record.status = code;
            Full::new(bytes).boxed_unsync()
        }
        Reply::List { page, first, last } => {
            if first {
                ListGuard::begin(&shared);
            }
            let guard = last.then(|| ListGuard::ending(&shared));
            let bytes = Bytes::from(serde_json::to_vec(&page).unwrap_or_default());
            shared.bytes.fetch_add(bytes.len() as u64, Relaxed);
            // The guard lives until the body has been sent and dropped.
            let body = futures::stream::unfold((Some(bytes), guard), |(bytes, guard)| async move {
                let bytes = bytes?;
                Some((Ok::<_, Infallible>(Frame::data(bytes)), (None, guard)))
            });
            StreamBody::new(body).boxed_unsync()
        }
        Reply::Throttled { retry_after_secs } => {
            record.status = 429;
            retry_after = Some(HeaderValue::from(retry_after_secs));
            content_type = HeaderValue::from_static("text/plain; charset=utf-8");
            Full::new(Bytes::from_static(b"Too many requests, please try again later.\n")).boxed_unsync()
        }
        Reply::Watch(cursor) => {
            let events = futures::stream::unfold(cursor, |mut c| async move {
                let chunk = c.next().await?;
                Some((Ok::<_, Infallible>(Frame::data(chunk)), c))
            });
            StreamBody::new(events).boxed_unsync()
        }
    };
    let code = StatusCode::from_u16(record.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    shared.lock().requests.push(record);
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    resp.headers_mut().insert(header::CONTENT_TYPE, content_type);
    if let Some(retry_after) = retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, retry_after);
    }
    Ok(resp)
}

fn route(shared: &Arc<Shared>, req: &RequestRecord, p: &Params, authorized: bool) -> Reply {
    let mut st = shared.lock_synced();
    match st.fault {
        Fault::Outage => return Reply::Hangup,
        _ if !authorized => return status(401, "Unauthorized", "Unauthorized", Value::Null),
        Fault::ServerError => return server_error(),
        Fault::TooManyRequests { retry_after_secs } => return Reply::Throttled { retry_after_secs },
        _ if req.method != "GET" => {
            let msg = "the server does not allow this method on the requested resource";
            return status(405, "MethodNotAllowed", msg, Value::Null);
        }
        _ if req.path == "/version" => return Reply::Json(200, version_info()),
        _ => {}
    }
    let segments: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
    let (res, ns, name) = match segments.as_slice() {
        ["api", "v1", "pods"] => (&PODS, None, None),
        ["api", "v1", "namespaces", ns, "pods"] => (&PODS, Some(*ns), None),
        ["api", "v1", "namespaces", ns, "pods", name] => (&PODS, Some(*ns), Some(*name)),
        ["api", "v1", "nodes"] => (&NODES, None, None),
        ["api", "v1", "nodes", name] => (&NODES, None, Some(*name)),
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => (&ENDPOINT_SLICES, None, None),
        ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices"] => (&ENDPOINT_SLICES, Some(*ns), None),
        ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices", name] => {
            (&ENDPOINT_SLICES, Some(*ns), Some(*name))
        }
        _ => {
            let msg = "the server could not find the requested resource";
            return status(404, "NotFound", msg, json!({}));
        }
    };
    let plural = res.plural;
    let fault = match st.resource_faults.get_mut(plural) {
        Some(f) => f.queued.pop_front().unwrap_or(f.standing),
        None => Fault::None,
    };
    let fault = if fault == Fault::None { st.fault } else { fault };
    match fault {
        Fault::ServerError => return server_error(),
        Fault::TooManyRequests { retry_after_secs } => return Reply::Throttled { retry_after_secs },
        _ => {}
    }
    if fault == Fault::Forbidden {
        let verb = match (name, req.watch) {
            (Some(_), _) => "get",
            (None, true) => "watch",
            (None, false) => "list",
        };
        let scope = match ns {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        let (group, qualified) = match res.group {
            "" => ("", plural.to_string()),
            group => (group, format!("{plural}.{group}")),
        };
        let msg = format!(
            "{qualified} is forbidden: User \"{SA_USER}\" cannot {verb} resource \"{plural}\" in API group \"{group}\" {scope}"
        );
        let details = match group {
            "" => json!({ "kind": plural }),
            group => json!({ "group": group, "kind": plural }),
        };
        return status(403, "Forbidden", msg, details);
    }
    if req.watch {
        if let Some(invalid) = invalid_watch(&st, p) {
            return invalid;
        }
    }
    let reply = match name {
        Some(name) => {
            let key = (plural, ns.unwrap_or_default().to_string(), name.to_string());
            let msg = format!("{plural} \"{name}\" not found");
            let details = json!({ "name": name, "kind": plural });
            let found = st.objects.get(&key).map(|obj| Reply::Json(200, obj.clone()));
            found.ok_or_else(|| status(404, "NotFound", msg, details))
        }
        None => Filter::parse(res, ns, p).and_then(|filter| match req.watch {
            true => WatchCursor::open(shared, &st, filter, p).map(|c| Reply::Watch(Box::new(c))),
            false => list(&st, filter, p).map(|page| {
                let first = p.get("continue").is_none_or(|c| c.is_empty());
                let last = page.pointer("/metadata/continue").is_none();
                Reply::List { page, first, last }
            }),
        }),
    };
    reply.unwrap_or_else(|err| err)
}

fn list(st: &State, filter: Filter, p: &Params) -> Result<Value, Reply> {
    let limit = num_param(p, "limit")?.filter(|l| *l > 0).unwrap_or(u64::MAX) as usize;
    let (rv, after) = match p.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let decoded = decode_continue(token, filter.res.plural);
            let (rv, key) = decoded.ok_or_else(|| bad_request("continue key is not valid"))?;
            (rv, Some(key))
        }
        None if p.get("resourceVersionMatch").is_some_and(|m| m == "Exact") => {
            (num_param(p, "resourceVersion")?.unwrap_or(st.rv), None)
        }
        None => (st.rv, None),
    };
    if rv < st.compacted {
        let msg = match after {
            Some(_) => CONTINUE_EXPIRED.to_string(),
            None => format!("too old resource version: {rv} ({})", st.compacted),
        };
        return Err(status(410, "Expired", msg, Value::Null));
    }
    let snapshot = st.snapshot(filter.res.plural, rv);
    let unseen = |key: &&Key| after.as_ref().is_none_or(|after| *key > after);
    let mut matching = snapshot.into_iter().filter(|(k, obj)| unseen(k) && filter.wants(k, obj));
    let (mut items, mut last) = (Vec::new(), None);
    for (key, obj) in matching.by_ref().take(limit) {
        let mut item = obj.clone(); // list items carry no kind/apiVersion
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        items.push(item);
        last = Some(key);
    }
    let remaining = matching.count();
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if let (true, Some((_, ns, name))) = (remaining > 0, last) {
        meta["continue"] = encode_continue(rv, ns, name).into();
        meta["remainingItemCount"] = remaining.into();
    }
    let kind = format!("{}List", filter.res.kind);
    Ok(json!({ "kind": kind, "apiVersion": filter.res.api_version, "metadata": meta, "items": items }))
}

/// The 422 a real apiserver gives a watch whose list options do not validate: a streaming
/// list while streaming lists are off, or without the options they require.
fn invalid_watch(st: &State, p: &Params) -> Option<Reply> {
    let send_initial = p.get("sendInitialEvents")?;
    let mut causes: Vec<(&str, &str)> = Vec::new();
    if p.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
        causes
            .push(("resourceVersionMatch", "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"));
    }
    if st.streaming == StreamingLists::Refused {
        causes.push((
            "sendInitialEvents",
            "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
        ));
    }
    if send_initial == "true" && p.get("allowWatchBookmarks").map(String::as_str) != Some("true") {
        causes.push(("allowWatchBookmarks", "allowWatchBookmarks must be true when sendInitialEvents is true"));
    }
    if causes.is_empty() {
        return None;
    }
    let described: Vec<String> = causes.iter().map(|(field, m)| format!("{field}: Forbidden: {m}")).collect();
    let described = match described.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let details = json!({ "group": "meta.k8s.io", "kind": "ListOptions", "causes": causes.iter().map(|(field, m)|
        json!({ "reason": "FieldValueForbidden", "message": format!("Forbidden: {m}"), "field": field })).collect::<Vec<_>>() });
    Some(status(422, "Invalid", format!("ListOptions.meta.k8s.io \"\" is invalid: {described}"), details))
}

/// One open watch stream: sends the initial state (for `resourceVersion=0` or a streaming
/// list) or replays history after `last_rv`, then follows new changes until timeoutSeconds,
/// client hang-up or `expire_watches`.
struct WatchCursor {
    shared: Arc<Shared>,
    filter: Filter,
    /// The state still to send as ADDED events, read in batches.
    initial: Option<Initial>,
    last_rv: u64,
    pending: VecDeque<Bytes>,
    signal: watch::Receiver<Signal>,
    epoch: u64,
    deadline: Instant,
    /// allowWatchBookmarks: send a BOOKMARK right before the timeout ends the stream.
    bookmarks: bool,
    done: bool,
}

/// The initial events of a watch: the objects as of `rv`, those after `after` still to send.
struct Initial {
    rv: u64,
    after: Option<Key>,
    /// A streaming list: end with the initial-events-end bookmark; a list in flight until then.
    streaming: Option<ListGuard>,
}

impl WatchCursor {
    fn open(shared: &Arc<Shared>, st: &State, filter: Filter, p: &Params) -> Result<Self, Reply> {
        let timeout = num_param(p, "timeoutSeconds")?.filter(|t| *t > 0);
        let timeout = Duration::from_secs(timeout.unwrap_or(DEFAULT_WATCH_TIMEOUT));
        let signal = shared.signal.subscribe();
        let epoch = signal.borrow().watch_epoch;
        let streaming = p.get("sendInitialEvents").is_some_and(|s| s == "true");
        let mut c = Self {
            shared: shared.clone(),
            filter,
            initial: None,
            last_rv: st.rv,
            pending: VecDeque::new(),
            signal,
            epoch,
            deadline: Instant::now() + timeout,
            bookmarks: p.get("allowWatchBookmarks").is_some_and(|b| b == "true"),
            done: false,
        };
        match num_param(p, "resourceVersion")? {
            // A streaming list (resourceVersionMatch=NotOlderThan): the current state is new enough.
            _ if streaming => {
                c.initial = Some(Initial { rv: st.rv, after: None, streaming: Some(ListGuard::new(shared)) });
            }
            Some(rv) if rv > 0 => {
                c.last_rv = rv;
                c.fill(st);
            }
            // No (or "0" = any) resourceVersion: synthetic ADDED events for the current state.
            _ => c.initial = Some(Initial { rv: st.rv, after: None, streaming: None }),
        }
        Ok(c)
    }

    /// Queues the next batch of initial events; after the last, the end bookmark of a
    /// streaming list, and the changes made since.
    fn send_initial(&mut self, st: &State) {
        let Some(initial) = self.initial.as_mut() else { return };
        let rv = initial.rv;
        if rv < st.compacted {
            self.initial = None;
            self.last_rv = rv;
            self.fill(st);
            return;
        }
        let snapshot = st.snapshot(self.filter.res.plural, rv);
        let after = initial.after.take();
        let unsent = snapshot.into_iter().filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a));
        let batch: Vec<(&Key, &Value)> =
            unsent.filter(|(k, obj)| self.filter.wants(k, obj)).take(INITIAL_BATCH).collect();
        let last = batch.last().map(|(k, _)| (*k).clone());
        for (_, obj) in &batch {
            self.push("ADDED", obj);
        }
        if batch.len() == INITIAL_BATCH {
            if let Some(initial) = self.initial.as_mut() {
                initial.after = last;
            }
            return;
        }
        let streaming = self.initial.take().and_then(|i| i.streaming);
        if streaming.is_some() {
            let (kind, api_version) = (self.filter.res.kind, self.filter.res.api_version);
            let meta = json!({ "resourceVersion": rv.to_string(), "annotations": { INITIAL_EVENTS_END: "true" } });
            self.push("BOOKMARK", &json!({ "kind": kind, "apiVersion": api_version, "metadata": meta }));
        }
        self.last_rv = rv;
        self.fill(st);
    }

    fn push(&mut self, kind: &str, object: &Value) {
        #[derive(serde::Serialize)]
        struct WatchEvent<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            object: &'a Value,
        }
        let mut line = serde_json::to_vec(&WatchEvent { kind, object }).unwrap_or_default();
        line.push(b'\n');
        self.pending.push_back(Bytes::from(line));
    }

    /// Queues events for the history after `last_rv` with selector semantics:
    /// objects entering the selection are ADDED, objects leaving it DELETED.
    fn fill(&mut self, st: &State) {
        if self.last_rv < st.compacted {
            let (rv, compacted) = (self.last_rv, st.compacted);
            let msg = format!("too old resource version: {rv} ({compacted})");
            self.push("ERROR", &status_json(410, "Expired", msg, Value::Null));
            self.done = true;
            return;
        }
        let start = st.history.partition_point(|c| c.rv <= self.last_rv);
        for c in &st.history[start..] {
            let wanted = |obj: &Value| self.filter.wants(&c.key, obj);
            let (before, now) = (c.prev.as_ref().is_some_and(wanted), !c.deleted && wanted(&c.obj));
            match (before, now) {
                (true, true) => self.push("MODIFIED", &c.obj),
                (false, true) => self.push("ADDED", &c.obj),
                (true, false) if c.deleted => self.push("DELETED", &c.obj),
                (true, false) => {
                    let mut gone = c.prev.clone().unwrap_or_default();
                    set_rv(&mut gone, c.rv);
                    self.push("DELETED", &gone);
                }
                (false, false) => {}
            }
        }
        self.last_rv = self.last_rv.max(st.rv);
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                self.shared.bytes.fetch_add(chunk.len() as u64, Relaxed);
                return Some(chunk);
            }
            if self.done {
                return None;
            }
            if self.initial.is_some() {
                let shared = self.shared.clone();
                self.send_initial(&shared.lock_synced());
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(self.deadline) => {
                    if !self.bookmarks {
                        return None;
                    }
                    let (kind, meta) = (self.filter.res.kind, json!({ "resourceVersion": self.last_rv.to_string() }));
                    let api_version = self.filter.res.api_version;
                    self.push("BOOKMARK", &json!({ "kind": kind, "apiVersion": api_version, "metadata": meta }));
                    self.done = true;
                }
                changed = self.signal.changed() => {
                    let epoch = self.signal.borrow_and_update().watch_epoch;
                    if changed.is_err() || epoch != self.epoch {
                        return None;
                    }
                    let shared = self.shared.clone();
                    self.fill(&shared.lock_synced());
                }
            }
        }
    }
}

// ---- selectors ----

/// One requirement: `key` (a label, or a field if `field`) must have one of
/// `values` (or merely exist if `None`); `negate` inverts the outcome.
struct Requirement {
    key: String,
    field: bool,
    values: Option<Vec<String>>,
    negate: bool,
}

/// What a LIST/WATCH selects: resource, namespace and selectors (all ANDed).
struct Filter {
    res: &'static Res,
    ns: Option<String>,
    reqs: Vec<Requirement>,
}

impl Filter {
    fn parse(res: &'static Res, ns: Option<&str>, p: &Params) -> Result<Self, Reply> {
        let mut reqs = Vec::new();
        for (param, field) in [("labelSelector", false), ("fieldSelector", true)] {
            for term in split_terms(p.get(param).map_or("", String::as_str)) {
                reqs.push(parse_requirement(term, field).map_err(bad_request)?);
            }
        }
        let fields = res.fields.split_whitespace();
        let supported = |r: &&Requirement| !r.field || fields.clone().any(|f| f == r.key);
        if let Some(r) = reqs.iter().find(|r| !supported(r)) {
            return Err(bad_request(format!("field label not supported: {}", r.key)));
        }
        let ns = ns.map(str::to_string);
        Ok(Self { res, ns, reqs })
    }

    fn wants(&self, key: &Key, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)?.as_str()).map(str::to_string);
        key.0 == self.res.plural
            && self.ns.as_ref().is_none_or(|ns| *ns == key.1)
            && self.reqs.iter().all(|r| {
                let got = match r.field {
                    true => Some(field_value(obj, &r.key)),
                    false => label(&r.key),
                };
                let hit = match &r.values {
                    Some(values) => got.is_some_and(|got| values.contains(&got)),
                    None => got.is_some(),
                };
                hit != r.negate
            })
    }
}

fn field_value(obj: &Value, field: &str) -> String {
    match obj.pointer(&format!("/{}", field.replace('.', "/"))) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        _ if matches!(field, "spec.unschedulable" | "spec.hostNetwork") => "false".to_string(),
        _ => String::new(),
    }
}

/// Splits a selector on the commas that are not inside `in (...)` sets.
fn split_terms(s: &str) -> impl Iterator<Item = &str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, ch) in s.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms.into_iter().map(str::trim).filter(|t| !t.is_empty())
}

/// One selector term: `k=v`, `k==v`, `k!=v`, and for labels also
/// `k in (a,b)`, `k notin (a,b)`, `k` and `!k`.
fn parse_requirement(t: &str, field: bool) -> Result<Requirement, String> {
    let err = || format!("unable to parse requirement: invalid selector term {t:?}");
    let one = |v: &str| Some(vec![v.trim().to_string()]);
    let (key, values, negate) = if let Some((key, v)) = t.split_once("!=") {
        (key, one(v), true)
    } else if let Some((key, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        (key, one(v), false)
    } else if field {
        return Err(err());
    } else if let Some(key) = t.strip_prefix('!') {
        (key, None, true)
    } else if let Some((head, set)) = t.strip_suffix(')').and_then(|t| t.split_once('(')) {
        let values = Some(set.split(',').map(|v| v.trim().to_string()).collect());
        match head.trim().rsplit_once(' ') {
            Some((key, "in")) => (key, values, false),
            Some((key, "notin")) => (key, values, true),
            _ => return Err(err()),
        }
    } else {
        (t, None, false)
    };
    let key = key.trim().to_string();
    let charset = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
    if key.is_empty() || !key.chars().all(charset) {
        return Err(err());
    }
    Ok(Requirement { key, field, values, negate })
}

// ---- small helpers ----

fn status_json(code: u16, reason: &str, message: String, details: Value) -> Value {
    let mut status = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code });
    if !details.is_null() {
        status["details"] = details;
    }
    status
}

fn status(code: u16, reason: &str, message: impl Into<String>, details: Value) -> Reply {
    Reply::Json(code, status_json(code, reason, message.into(), details))
}

fn server_error() -> Reply {
    let msg = "Internal error occurred: injected fault (fake apiserver)";
    status(500, "InternalError", msg, Value::Null)
}

fn bad_request(message: impl Into<String>) -> Reply {
    status(400, "BadRequest", message, Value::Null)
}

/// A numeric query parameter; absent or empty is `None`, garbage is 400.
fn num_param(p: &Params, name: &str) -> Result<Option<u64>, Reply> {
    let Some(raw) = p.get(name).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    raw.parse().map(Some).map_err(|_| bad_request(format!("invalid {name}: {raw:?}")))
}

fn version_info() -> Value {
    json!({ "major": "1", "minor": "33", "emulationMajor": "1", "emulationMinor": "33",
        "minCompatibilityMajor": "1", "minCompatibilityMinor": "32", "gitVersion": "v1.33.0",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2", "compiler": "gc",
        "platform": "linux/amd64" })
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> Option<&'a str> {
    obj.pointer(pointer).and_then(Value::as_str)
}

fn set_rv(obj: &mut Value, rv: u64) {
    obj["metadata"]["resourceVersion"] = rv.to_string().into();
}

/// Opaque to clients (hex of "rv/namespace/name"), like the real base64 token.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let raw = format!("{rv}/{ns}/{name}");
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str, plural: &'static str) -> Option<(u64, Key)> {
    let hex = |i: usize| u8::from_str_radix(token.get(i..i + 2)?, 16).ok();
    let bytes: Vec<u8> = (0..token.len()).step_by(2).map(hex).collect::<Option<_>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '/').map(str::to_string);
    let rv = parts.next()?.parse().ok()?;
    Some((rv, (plural, parts.next()?, parts.next()?)))
}

fn parse_query(query: &str) -> Params {
    let pairs = query.split('&').filter(|kv| !kv.is_empty());
    let pairs = pairs.map(|kv| kv.split_once('=').unwrap_or((kv, "")));
    pairs.map(|(k, v)| (pct_decode(k), pct_decode(v))).collect()
}

fn pct_decode(s: &str) -> String {
    let (bytes, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
    while i < bytes.len() {
        let hex = s.get(i + 1..i + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 2;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(unix_now().as_nanos());
    hasher.finish()
}

fn new_uid() -> String {
    let (a, b) = (random(), random());
    format!("{:08x}-0000-4000-8000-{:012x}", a >> 32, b >> 16)
}

fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::from_second(unix_now().as_secs() as i64);
    now.map_or_else(|_| "1970-01-01T00:00:00Z".to_string(), |t| t.to_string())
}

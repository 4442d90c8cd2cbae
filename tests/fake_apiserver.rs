//! Self-test of the fake kube-apiserver fixture against the real `kube` crate.

mod common;

use std::time::Duration;

use common::fake_apiserver::{
    cordoned, in_zone, node, node_with_images, not_ready, pod, terminating, with_second_ip, FakeApiServer, Fault,
    StreamingLists,
};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;

const NS: &str = "kubenurse";
const WAIT: Duration = Duration::from_secs(10);

fn nurse(name: &str, node: &str, ip: &str) -> Pod {
    pod(name, NS, &[("app", "kubenurse")], node, ip, "Running")
}

fn api_error(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn names<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<String> {
    let mut names: Vec<String> = pods.into_iter().map(|p| p.name_any()).collect();
    names.sort();
    names
}

/// Next watcher item (Ok or Err), failing the test after `WAIT`.
async fn next<S, T>(stream: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("timed out waiting for a watcher event")
        .expect("watcher stream ended")
}

/// Skips items until one satisfies `pred`; returns the skipped ones too.
async fn wait_for<S, T>(stream: &mut S, mut pred: impl FnMut(&T) -> bool) -> (T, Vec<T>)
where
    S: Stream<Item = T> + Unpin,
{
    let mut skipped = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let item = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("timed out waiting for the expected watcher event")
            .expect("watcher stream ended");
        if pred(&item) {
            return (item, skipped);
        }
        skipped.push(item);
    }
}

type PodEvent = Result<Event<Pod>, watcher::Error>;

fn is_apply(ev: &PodEvent, name: &str) -> bool {
    matches!(ev, Ok(Event::Apply(p)) if p.name_any() == name)
}

fn is_delete(ev: &PodEvent, name: &str) -> bool {
    matches!(ev, Ok(Event::Delete(p)) if p.name_any() == name)
}

#[tokio::test]
async fn list_paginates_with_consistent_snapshot() {
    let server = FakeApiServer::start().await;
    for i in 0..5 {
        server.upsert_pod(nurse(&format!("nurse-{i}"), &format!("node-{i}"), &format!("10.0.0.{i}")));
    }
    server.upsert_pod(pod("other", NS, &[("app", "other")], "node-0", "10.0.1.1", "Running"));
    server.upsert_pod(pod("nurse-elsewhere", "default", &[("app", "kubenurse")], "node-0", "10.0.1.2", "Running"));
    let api: Api<Pod> = Api::namespaced(server.kube_client(), NS);

    let lp = ListParams::default().labels("app=kubenurse").limit(2);
    let first = api.list(&lp).await.expect("first page");
    assert_eq!(names(&first.items), ["nurse-0", "nurse-1"]);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let snapshot_rv = first.metadata.resource_version.clone().expect("list resourceVersion");
    assert_eq!(snapshot_rv, server.resource_version().to_string());
    let item = &first.items[0];
    assert!(item.metadata.uid.is_some() && item.metadata.creation_timestamp.is_some());
    assert!(item.metadata.resource_version.is_some());

    // Changes after the first page must not leak into later pages.
    server.upsert_pod(nurse("nurse-2b", "node-9", "10.0.0.99"));
    server.delete_pod(NS, "nurse-4");

    let mut all = first.items.clone();
    let mut token = first.metadata.continue_;
    let mut pages = 1;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = api.list(&lp.clone().continue_token(&t)).await.expect("next page");
        assert_eq!(page.metadata.resource_version.as_deref(), Some(snapshot_rv.as_str()));
        assert!(page.items.len() <= 2);
        all.extend(page.items);
        token = page.metadata.continue_;
        pages += 1;
        assert!(pages < 10, "pagination does not terminate");
    }
    assert_eq!(pages, 3);
    assert_eq!(names(&all), ["nurse-0", "nurse-1", "nurse-2", "nurse-3", "nurse-4"]);

    // A fresh list sees the new state.
    let now = api.list(&ListParams::default().labels("app=kubenurse")).await.expect("list");
    assert_eq!(names(&now.items), ["nurse-0", "nurse-1", "nurse-2", "nurse-2b", "nurse-3"]);
    assert_eq!(server.list_calls("/namespaces/kubenurse/pods"), 4);

    // Continue tokens older than the compacted history are rejected with 410.
    let first = api.list(&lp).await.expect("first page");
    server.expire_watches();
    let token = first.metadata.continue_.expect("continue token");
    let err = api.list(&lp.clone().continue_token(&token)).await.expect_err("expired token");
    let status = api_error(err);
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    let err = api.list(&lp.clone().continue_token("not-hex")).await.expect_err("garbage token");
    assert_eq!(api_error(err).code, 400);
}

#[tokio::test]
async fn label_and_field_selectors() {
    let server = FakeApiServer::start().await;
    server.upsert_pod(nurse("a", "node-a", "10.0.0.1"));
    server.upsert_pod(nurse("b", "node-b", "10.0.0.2"));
    server.upsert_pod(pod("c", NS, &[("app", "kubenurse"), ("tier", "x")], "node-a", "", "Pending"));
    server.upsert_pod(pod("d", NS, &[("app", "other")], "node-a", "10.0.0.4", "Running"));
    server.upsert_pod(pod("e", NS, &[], "node-b", "10.0.0.5", "Succeeded"));
    server.upsert_node(node("node-a"));
    server.upsert_node(cordoned(node("node-b")));
    server.upsert_node(node_with_images("node-c", 50));
    let client = server.kube_client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let list = |lp: ListParams| {
        let pods = pods.clone();
        async move { names(&pods.list(&lp).await.expect("list").items) }
    };

    let by_fields = |f: &str| ListParams::default().fields(f);
    assert_eq!(list(by_fields("spec.nodeName=node-a")).await, ["a", "c", "d"]);
    assert_eq!(list(by_fields("spec.nodeName==node-a,status.phase!=Running")).await, ["c"]);
    assert_eq!(list(by_fields("metadata.name=b,metadata.namespace=kubenurse")).await, ["b"]);
    let both = ListParams::default().labels("app=kubenurse").fields("status.phase=Running");
    assert_eq!(list(both).await, ["a", "b"]);

    let by_labels = |l: &str| ListParams::default().labels(l);
    assert_eq!(list(by_labels("app in (kubenurse, other),tier!=x")).await, ["a", "b", "d"]);
    assert_eq!(list(by_labels("app notin (kubenurse)")).await, ["d", "e"]);
    assert_eq!(list(by_labels("!app")).await, ["e"]);
    assert_eq!(list(by_labels("app,tier")).await, ["c"]);
    assert_eq!(list(by_labels("app==other")).await, ["d"]);

    let err = pods.list(&by_fields("spec.bogus=1")).await.expect_err("unsupported field");
    let status = api_error(err);
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
    assert!(status.message.contains("field label not supported"), "{}", status.message);
    assert_eq!(api_error(pods.list(&by_labels("app in (a")).await.expect_err("bad")).code, 400);

    let nodes: Api<Node> = Api::all(client.clone());
    let schedulable = nodes.list(&by_fields("spec.unschedulable=false")).await.expect("nodes");
    let mut node_names: Vec<String> = schedulable.items.iter().map(|n| n.name_any()).collect();
    node_names.sort();
    assert_eq!(node_names, ["node-a", "node-c"]);
    let node_c = schedulable.items.iter().find(|n| n.name_any() == "node-c").expect("node-c");
    assert_eq!(node_c.status.as_ref().and_then(|s| s.images.as_ref()).map_or(0, Vec::len), 50);
    let cordoned = nodes.get("node-b").await.expect("get node");
    assert_eq!(cordoned.spec.and_then(|s| s.unschedulable), Some(true));
    let missing = api_error(nodes.get("nope").await.expect_err("missing node"));
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));

    let version = client.apiserver_version().await.expect("version");
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));
    assert!(server.response_bytes() > 10_000, "node-c alone is large");
}

#[tokio::test]
async fn watcher_follows_changes_and_relists_after_expiry() {
    let server = FakeApiServer::start().await;
    server.upsert_pod(nurse("a", "node-a", "10.0.0.1"));
    server.upsert_pod(nurse("b", "node-b", "10.0.0.2"));
    server.upsert_pod(pod("x", NS, &[("app", "other")], "node-a", "10.0.0.9", "Running"));
    let api: Api<Pod> = Api::namespaced(server.kube_client(), NS);
    let cfg = watcher::Config::default().labels("app=kubenurse");
    let mut events = watcher(api, cfg).default_backoff().boxed();

    assert!(matches!(next(&mut events).await, Ok(Event::Init)));
    let mut initial = Vec::new();
    loop {
        match next(&mut events).await.expect("init event") {
            Event::InitApply(p) => initial.push(p),
            Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(names(&initial), ["a", "b"]);

    server.upsert_pod(pod("x", NS, &[("app", "other")], "node-b", "10.0.0.9", "Running")); // filtered
    server.upsert_pod(nurse("c", "node-c", "10.0.0.3"));
    let (ev, skipped) = wait_for(&mut events, |e| is_apply(e, "c")).await;
    assert!(skipped.is_empty(), "unexpected events before Apply(c): {skipped:?}");
    let Ok(Event::Apply(c)) = ev else { unreachable!() };
    assert_eq!(c.status.and_then(|s| s.pod_ip).as_deref(), Some("10.0.0.3"));
    assert_eq!(server.get_pod(NS, "c").and_then(|p| p.metadata.resource_version), c.metadata.resource_version);

    // Relabeling out of the selector looks like a delete, like the real apiserver.
    server.upsert_pod(pod("b", NS, &[("app", "retired")], "node-b", "10.0.0.2", "Running"));
    assert!(is_delete(&next(&mut events).await, "b"));
    assert!(server.delete_pod(NS, "a"));
    assert!(is_delete(&next(&mut events).await, "a"));
    assert!(server.watch_calls("/pods") >= 1);

    // Compaction: the stream ends, the resume gets 410 and the watcher re-lists.
    let lists_before = server.list_calls("/pods");
    server.expire_watches();
    let (_, skipped) = wait_for(&mut events, |e| matches!(e, Ok(Event::Init))).await;
    assert!(skipped.iter().all(Result::is_err), "{skipped:?}");
    let (_, relisted) = wait_for(&mut events, |e| matches!(e, Ok(Event::InitDone))).await;
    let init_apply = |e: &PodEvent| match e {
        Ok(Event::InitApply(p)) => Some(p.clone()),
        _ => None,
    };
    let relisted: Vec<Pod> = relisted.iter().filter_map(init_apply).collect();
    assert_eq!(names(&relisted), ["c"]);
    assert_eq!(server.list_calls("/pods"), lists_before + 1);
    assert!(server.requests().iter().any(|r| r.watch && r.query.contains("resourceVersion=")));

    server.upsert_pod(nurse("d", "node-d", "10.0.0.4"));
    let _ = wait_for(&mut events, |e| is_apply(e, "d")).await;
}

#[tokio::test]
async fn raw_watch_honours_timeout_and_expired_resource_version() {
    let server = FakeApiServer::start().await;
    server.upsert_pod(nurse("a", "node-a", "10.0.0.1"));
    let api: Api<Pod> = Api::namespaced(server.kube_client(), NS);

    // kube asks for bookmarks by default: one arrives right before the timeout closes the stream.
    let wp = WatchParams::default().labels("app=kubenurse").timeout(1);
    let stream = api.watch(&wp, "0").await.expect("watch");
    let all: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>()).await.expect("timeoutSeconds honoured");
    match all.as_slice() {
        [Ok(WatchEvent::Added(p)), Ok(WatchEvent::Bookmark(bm))] => {
            assert_eq!(p.name_any(), "a");
            assert_eq!(bm.metadata.resource_version, server.resource_version().to_string());
        }
        other => panic!("expected ADDED then BOOKMARK, got {other:?}"),
    }
    let stream = api.watch(&wp.clone().disable_bookmarks(), "0").await.expect("watch");
    let all: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>()).await.expect("timeoutSeconds honoured");
    assert!(matches!(all.as_slice(), [Ok(WatchEvent::Added(_))]), "{all:?}");

    let rv = server.resource_version().to_string();
    server.expire_watches();
    let mut stream = api.watch(&wp, &rv).await.expect("watch").boxed();
    match next(&mut stream).await.expect("error event") {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn auth_and_injected_errors() {
    let server = FakeApiServer::start().await;
    server.upsert_pod(nurse("a", "node-a", "10.0.0.1"));

    let mut cfg = server.kube_config();
    cfg.auth_info = serde_json::from_value(serde_json::json!({ "token": "wrong" })).expect("auth");
    let bad: Api<Pod> = Api::namespaced(kube::Client::try_from(cfg).expect("client"), NS);
    let status = api_error(bad.list(&ListParams::default()).await.expect_err("401"));
    assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));

    let client = server.kube_client();
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    server.set_fault(Fault::Forbidden);
    let status = api_error(api.list(&ListParams::default()).await.expect_err("403"));
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert!(status.message.contains(r#"cannot list resource "pods" in API group "" in the namespace "kubenurse""#));

    server.set_fault(Fault::ServerError);
    let status = api_error(api.list(&ListParams::default()).await.expect_err("500"));
    assert_eq!(status.code, 500);

    server.set_fault(Fault::None);
    assert_eq!(api.list(&ListParams::default()).await.expect("healthy").items.len(), 1);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 403, 500, 200]);

    let dir = tempfile::tempdir().expect("tempdir");
    server.write_service_account_dir(dir.path());
    assert_eq!(std::fs::read_to_string(dir.path().join("token")).expect("token"), server.token());
    assert!(std::fs::read_to_string(dir.path().join("ca.crt")).expect("ca").contains("BEGIN CERTIFICATE"));
}

#[tokio::test]
async fn per_resource_faults_answer_in_order_and_the_log_keeps_arrival_order() {
    let server = FakeApiServer::start().await;
    server.upsert_pod(nurse("a", "node-a", "10.0.0.1"));
    server.upsert_node(node("node-a"));
    // kube retries 429 by itself unless told not to; here every answer is wanted as it is.
    let mut cfg = server.kube_config();
    cfg.default_retry = false;
    let client = kube::Client::try_from(cfg).expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let nodes: Api<Node> = Api::all(client);
    let lp = ListParams::default();

    server.set_resource_fault("nodes", Fault::Forbidden);
    server.queue_faults("nodes", [Fault::ServerError, Fault::TooManyRequests { retry_after_secs: 7 }]);
    assert_eq!(api_error(nodes.list(&lp).await.expect_err("queued 500")).code, 500);
    assert_eq!(pods.list(&lp).await.expect("pods are not refused").items.len(), 1);
    // Throttling answers as API Priority and Fairness does: plain text and Retry-After.
    let throttled = api_error(nodes.list(&lp).await.expect_err("queued 429"));
    assert_eq!(throttled.code, 429);
    assert!(throttled.message.contains("Too many requests"), "{}", throttled.message);
    let forbidden = api_error(nodes.list(&lp).await.expect_err("standing 403"));
    assert_eq!((forbidden.code, forbidden.reason.as_str()), (403, "Forbidden"));
    assert!(forbidden.message.contains(r#"cannot list resource "nodes" in API group "" at the cluster scope"#));
    assert_eq!(api_error(nodes.watch(&WatchParams::default(), "0").await.err().expect("403")).code, 403);
    server.set_resource_fault("nodes", Fault::None);
    assert_eq!(nodes.list(&lp).await.expect("healthy again").items.len(), 1);

    let log = server.requests_to("/nodes");
    let statuses: Vec<u16> = log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 429, 403, 403, 200]);
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at), "arrival instants in order");
    assert_eq!(server.requests_to("/pods").len(), 1);

    // The Retry-After header itself, as a raw client sees it.
    use rustls_pki_types::pem::PemObject;
    server.queue_faults("pods", [Fault::TooManyRequests { retry_after_secs: 7 }]);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await.expect("connect");
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        rustls_pki_types::CertificateDer::pem_slice_iter(server.ca_pem.as_bytes()).flatten(),
    );
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let stream = connector.connect(name, tcp).await.expect("tls");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("/api/v1/namespaces/{NS}/pods"))
        .header("host", "localhost")
        .header("authorization", format!("Bearer {}", server.token()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("answer");
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("7"));
}

#[tokio::test]
async fn watcher_recovers_from_outage() {
    let server = FakeApiServer::start().await;
    server.upsert_pod(nurse("a", "node-a", "10.0.0.1"));
    let client = server.kube_client();
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let cfg = watcher::Config::default().labels("app=kubenurse");
    let mut events = watcher(api.clone(), cfg).default_backoff().boxed();
    let _ = wait_for(&mut events, |e| matches!(e, Ok(Event::InitDone))).await;
    server.upsert_pod(nurse("b", "node-b", "10.0.0.2"));
    let _ = wait_for(&mut events, |e| is_apply(e, "b")).await; // the watch stream is established

    server.set_fault(Fault::Outage);
    let err = api.list(&ListParams::default()).await.expect_err("outage");
    assert!(!matches!(err, kube::Error::Api(_)), "connection-level error expected, got {err:?}");
    let _ = wait_for(&mut events, Result::is_err).await; // the cut watch cannot be resumed
    server.upsert_pod(nurse("c", "node-c", "10.0.0.3")); // happens while clients are cut off

    server.set_fault(Fault::None);
    let (_, skipped) = wait_for(&mut events, |e| is_apply(e, "c")).await;
    assert!(skipped.iter().all(|e| e.is_err()), "{skipped:?}");
    assert_eq!(api.list(&ListParams::default()).await.expect("recovered").items.len(), 3);
}

#[tokio::test]
async fn many_concurrent_clients() {
    let server = FakeApiServer::start().await;
    for i in 0..20 {
        server.upsert_node(node(&format!("node-{i:02}")));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let nodes: Api<Node> = Api::all(server.kube_client());
        tasks.spawn(async move {
            for _ in 0..5 {
                let list = nodes.list(&ListParams::default().limit(7)).await.expect("list");
                assert_eq!(list.items.len(), 7);
            }
        });
    }
    tokio::time::timeout(WAIT, async {
        while let Some(res) = tasks.join_next().await {
            res.expect("client task");
        }
    })
    .await
    .expect("concurrent lists finish");
    assert_eq!(server.list_calls("/nodes"), 80);
}

/// (pod, address, ready, terminating) of every endpoint of `slice`, in slice order.
fn endpoints(slice: &EndpointSlice) -> Vec<(String, String, bool, bool)> {
    slice
        .endpoints
        .iter()
        .map(|e| {
            let pod = e.target_ref.as_ref().and_then(|t| t.name.clone()).unwrap_or_default();
            let c = e.conditions.clone().unwrap_or_default();
            (pod, e.addresses[0].clone(), c.ready.unwrap_or(true), c.terminating.unwrap_or(false))
        })
        .collect()
}

#[tokio::test]
async fn endpoint_slices_follow_the_pods_of_the_service_per_family_and_shard() {
    let server = FakeApiServer::start().await;
    server.upsert_node(in_zone(node("node-a"), "zone-1"));
    server.upsert_pod(with_second_ip(nurse("a", "node-a", "10.0.0.1"), "fd00::1"));
    server.upsert_pod(not_ready(nurse("b", "node-b", "10.0.0.2")));
    server.upsert_pod(terminating(nurse("c", "node-c", "10.0.0.3")));
    server.upsert_pod(pod("done", NS, &[("app", "kubenurse")], "node-d", "10.0.0.4", "Failed"));
    server.upsert_pod(pod("no-ip", NS, &[("app", "kubenurse")], "", "", "Pending"));
    server.upsert_pod(pod("other", NS, &[("app", "other")], "node-a", "10.0.0.5", "Running"));

    let api: Api<EndpointSlice> = Api::namespaced(server.kube_client(), NS);
    let list = api.list(&ListParams::default().labels("kubernetes.io/service-name=kubenurse")).await.expect("list");
    let by_family = |family: &str| list.items.iter().filter(|s| s.address_type == family).collect::<Vec<_>>();
    let (v4, v6) = (by_family("IPv4"), by_family("IPv6"));
    assert_eq!((v4.len(), v6.len()), (1, 1), "{list:#?}");
    let expected = [
        ("a".to_string(), "10.0.0.1".to_string(), true, false),
        ("b".into(), "10.0.0.2".into(), false, false),
        ("c".into(), "10.0.0.3".into(), false, true),
    ];
    assert_eq!(endpoints(v4[0]), expected, "finished, unaddressed and unselected pods are no endpoints");
    assert_eq!(endpoints(v6[0]), [("a".to_string(), "fd00::1".to_string(), true, false)]);
    let a = &v4[0].endpoints[0];
    assert_eq!((a.node_name.as_deref(), a.zone.as_deref()), (Some("node-a"), Some("zone-1")));
    let c = v4[0].endpoints[2].conditions.clone().expect("conditions");
    assert_eq!(c.serving, Some(true), "a terminating pod still serves while Ready");
    assert_eq!(v4[0].metadata.resource_version, server.endpoint_slices(NS)[0].metadata.resource_version);

    // 100 endpoints per slice: the 101st opens a second slice; a pod that goes frees its
    // place, the next one takes it, and nothing else moves.
    for i in 0..98 {
        server.upsert_pod(nurse(&format!("n{i:03}"), "node-x", &format!("10.1.0.{i}")));
    }
    let sizes = |server: &FakeApiServer| {
        let slices = server.endpoint_slices(NS);
        slices.iter().filter(|s| s.address_type == "IPv4").map(|s| s.endpoints.len()).collect::<Vec<_>>()
    };
    assert_eq!(sizes(&server), [100, 1]);
    let second = server.endpoint_slices(NS).into_iter().find(|s| s.endpoints.len() == 1).expect("second slice");
    server.delete_pod(NS, "b");
    server.upsert_pod(nurse("z", "node-z", "10.2.0.1"));
    assert_eq!(sizes(&server), [100, 1]);
    let now = server.endpoint_slices(NS).into_iter().find(|s| s.metadata.name == second.metadata.name);
    assert_eq!(now.map(|s| s.metadata.resource_version), Some(second.metadata.resource_version), "untouched");
    let first = server.endpoint_slices(NS).into_iter().find(|s| s.endpoints.len() == 100).expect("first slice");
    let pods: Vec<String> = endpoints(&first).into_iter().map(|e| e.0).collect();
    assert!(pods.contains(&"z".to_string()) && !pods.contains(&"b".to_string()), "z took b's place: {pods:?}");

    // A Service of its own, and its removal.
    server.upsert_service(NS, "others", &[("app", "other")]);
    let others = api.list(&ListParams::default().labels("kubernetes.io/service-name=others")).await.expect("list");
    assert_eq!(others.items.len(), 1);
    server.delete_service(NS, "others");
    let others = api.list(&ListParams::default().labels("kubernetes.io/service-name=others")).await.expect("list");
    assert!(others.items.is_empty());
}

#[tokio::test]
async fn endpoint_slices_are_watched_paginated_and_expire_like_pods() {
    let server = FakeApiServer::start().await;
    server.set_max_endpoints_per_slice(1);
    server.upsert_pod(nurse("a", "node-a", "10.0.0.1"));
    server.upsert_pod(nurse("b", "node-b", "10.0.0.2"));
    let api: Api<EndpointSlice> = Api::namespaced(server.kube_client(), NS);
    let cfg = watcher::Config::default().labels("kubernetes.io/service-name=kubenurse").page_size(1);
    let mut events = watcher(api, cfg).boxed();
    let (_, initial) = wait_for(&mut events, |e| matches!(e, Ok(Event::InitDone))).await;
    assert_eq!(initial.iter().filter(|e| matches!(e, Ok(Event::InitApply(_)))).count(), 2);
    assert_eq!(server.list_calls("/endpointslices"), 2, "one slice per page");

    // A pod turning NotReady changes its endpoint: the slice is MODIFIED.
    server.upsert_pod(not_ready(nurse("b", "node-b", "10.0.0.2")));
    let (event, _) = wait_for(&mut events, |e| matches!(e, Ok(Event::Apply(_)))).await;
    let Ok(Event::Apply(slice)) = event else { unreachable!() };
    assert_eq!(endpoints(&slice), [("b".to_string(), "10.0.0.2".to_string(), false, false)]);

    server.expire_watches();
    let _ = wait_for(&mut events, |e| matches!(e, Ok(Event::InitDone))).await;
    assert_eq!(server.list_calls("/endpointslices"), 4, "re-listed after 410");
    server.delete_pod(NS, "a");
    let _ = wait_for(&mut events, |e| matches!(e, Ok(Event::Delete(_)))).await;

    // Forbidden, with the API group named.
    server.set_resource_fault("endpointslices", Fault::Forbidden);
    let api: Api<EndpointSlice> = Api::namespaced(server.kube_client(), NS);
    let status = api_error(api.list(&ListParams::default()).await.expect_err("403"));
    assert!(status.message.starts_with("endpointslices.discovery.k8s.io is forbidden"), "{}", status.message);
    assert!(status.message.contains(r#"resource "endpointslices" in API group "discovery.k8s.io""#));
}

#[tokio::test]
async fn streaming_lists_are_refused_with_422_or_served_with_an_end_bookmark() {
    let server = FakeApiServer::start().await;
    server.upsert_pod(nurse("a", "node-a", "10.0.0.1"));
    server.upsert_pod(nurse("b", "node-b", "10.0.0.2"));
    let api: Api<Pod> = Api::namespaced(server.kube_client(), NS);
    let wp = WatchParams::streaming_lists().labels("app=kubenurse");

    // A 1.33 apiserver with the WatchList feature gate off (its default).
    let status = api_error(api.watch(&wp, "0").await.err().expect("422"));
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(status.message.contains("sendInitialEvents is forbidden for watch unless the WatchList feature gate"));
    // kube's watcher would send that request again and again.
    let cfg = watcher::Config::default().labels("app=kubenurse").streaming_lists();
    let mut refused = watcher(api.clone(), cfg.clone()).boxed();
    for _ in 0..3 {
        assert!(matches!(next(&mut refused).await, Err(watcher::Error::WatchStartFailed(_))));
    }

    // Served: the objects, the end bookmark, then changes; no LIST at all.
    server.set_streaming_lists(StreamingLists::Accepted);
    let mut stream = api.watch(&wp, "0").await.expect("watch").boxed();
    let mut added = Vec::new();
    let bookmark = loop {
        match next(&mut stream).await.expect("event") {
            WatchEvent::Added(p) => added.push(p),
            WatchEvent::Bookmark(bm) => break bm,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(names(&added), ["a", "b"]);
    assert_eq!(bookmark.metadata.annotations.get("k8s.io/initial-events-end").map(String::as_str), Some("true"));
    server.upsert_pod(nurse("c", "node-c", "10.0.0.3"));
    assert!(matches!(next(&mut stream).await, Ok(WatchEvent::Added(p)) if p.name_any() == "c"));

    let mut events = watcher(api, cfg).boxed();
    let (_, initial) = wait_for(&mut events, |e| matches!(e, Ok(Event::InitDone))).await;
    assert_eq!(initial.iter().filter(|e| matches!(e, Ok(Event::InitApply(_)))).count(), 3);
    assert_eq!(server.list_calls("/pods"), 0);
    assert!(server.peak_concurrent_lists() >= 1, "a streaming list counts as a list while it runs");
}

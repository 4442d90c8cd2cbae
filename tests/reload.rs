//! Certificate files rotated under a running agent, laid out as Kubernetes mounts a Secret:
//! the TLS listener serves the new certificate to new connections while open ones go on, the
//! probes trust a rotated extra CA and a rotated service-account CA, and a broken update keeps
//! the previous files, logged once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::agent::{start, wait_report};
use common::fake_apiserver::FakeApiServer;
use common::process::{free_port, Spawned};
use common::secret::SecretDir;
use common::targets::{Target, TestCa};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

const WAIT: Duration = Duration::from_secs(30);

/// A TLS connection to `addr` that trusts `ca` only, ready for requests.
async fn connect(addr: std::net::SocketAddr, ca: &TestCa) -> Result<SendRequest<Empty<Bytes>>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("ca")).expect("root");
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
    let tls = tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// GET `/alive` on an open connection: the status.
async fn alive(sender: &mut SendRequest<Empty<Bytes>>) -> u16 {
    let request = http::Request::get("/alive").header("host", "localhost").body(Empty::new()).expect("request");
    let answer = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = answer.status().as_u16();
    let _ = answer.into_body().collect().await;
    status
}

/// Connects (bounded retries) until a handshake trusting `ca` succeeds.
async fn connect_until(addr: std::net::SocketAddr, ca: &TestCa, what: &str) -> SendRequest<Empty<Bytes>> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match connect(addr, ca).await {
            Ok(sender) => return sender,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{what}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_a_rotated_certificate_without_dropping_connections() {
    let old_ca = TestCa::new("old ca");
    let new_ca = TestCa::new("new ca");
    let (cert, key) = old_ca.leaf_pem(&["localhost", "127.0.0.1"]);
    let mut secret = SecretDir::new(&[("tls.crt", &cert), ("tls.key", &key)]);
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let tls_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    let agent = Spawned::start(&[
        ("KUBENURSE_LISTEN_ADDR", &listen),
        ("KUBENURSE_TLS_LISTEN_ADDR", &tls_addr.to_string()),
        ("KUBENURSE_USE_TLS", "true"),
        ("KUBENURSE_CERT_FILE", &secret.path("tls.crt")),
        ("KUBENURSE_CERT_KEY", &secret.path("tls.key")),
        ("KUBENURSE_RELOAD_INTERVAL", "100ms"),
        ("KUBENURSE_SHUTDOWN_DURATION", "0s"),
        ("KUBENURSE_DNS_SERVERS", "127.0.0.1:1"),
    ]);
    let mut open = connect_until(tls_addr, &old_ca, "the listener with the first certificate").await;
    assert_eq!(alive(&mut open).await, 200);

    let (cert, key) = new_ca.leaf_pem(&["localhost", "127.0.0.1"]);
    secret.update(&[("tls.crt", &cert), ("tls.key", &key)]);
    let mut fresh = connect_until(tls_addr, &new_ca, "a new handshake with the rotated certificate").await;
    assert_eq!(alive(&mut fresh).await, 200);
    assert_eq!(alive(&mut open).await, 200, "the connection opened before the rotation goes on");
    assert!(connect(tls_addr, &old_ca).await.is_err(), "the old certificate is no longer served");

    // A broken update (a key that does not match the certificate) keeps the rotated pair.
    let (_, other_key) = new_ca.leaf_pem(&["localhost"]);
    secret.update(&[("tls.crt", &cert), ("tls.key", &other_key)]);
    agent.wait_line("not usable", WAIT).await;
    // Many more polls of the same broken files.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut after = connect(tls_addr, &new_ca).await.expect("the previous certificate is still served");
    assert_eq!(alive(&mut after).await, 200);

    let (code, stderr) = agent.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
    let reloads: Vec<&str> = stderr.lines().filter(|l| l.contains("reloaded changed certificate files")).collect();
    assert_eq!(reloads.len(), 1, "{stderr}");
    assert!(reloads[0].contains("listener certificate"), "{stderr}");
    let broken: Vec<&str> = stderr.lines().filter(|l| l.contains("not usable")).collect();
    assert_eq!(broken.len(), 1, "a broken update is logged once:\n{stderr}");
    assert!(broken[0].contains("tls.key"), "the file is named: {}", broken[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_trust_a_rotated_extra_ca() {
    let old_ca = TestCa::new("old ca");
    let new_ca = TestCa::new("new ca");
    let target = Target::https("127.0.0.1", &new_ca).await;
    let mut secret = SecretDir::new(&[("ca.crt", &old_ca.cert_pem)]);
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=100ms".into(),
        "--check-timeout=2s".into(),
        "--reload-interval=100ms".into(),
        format!("--extra-ca={}", secret.path("ca.crt")),
        format!("--extra-checks=tgt:{}", target.https_url("127.0.0.1", "/ok")),
    ])
    .await;
    let outcome = |report: &kubenurse::scheduler::RoundReport| {
        report.results.iter().find(|r| r.target.kind == "tgt").map(|r| (r.is_ok(), r.summary()))
    };
    let report = wait_report(&agent, "the untrusted target failed", |r| outcome(r).is_some_and(|(ok, _)| !ok)).await;
    let (_, summary) = outcome(&report).expect("tgt");
    assert!(summary.contains("UnknownIssuer") || summary.contains("certificate"), "{summary}");

    secret.update(&[("ca.crt", &format!("{}{}", old_ca.cert_pem, new_ca.cert_pem))]);
    wait_report(&agent, "the target is trusted after the rotation", |r| outcome(r).is_some_and(|(ok, _)| ok)).await;

    // A broken update keeps the trust in force.
    secret.update(&[("ca.crt", "not a certificate")]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let round = agent.reports().borrow().as_ref().map_or(0, |r| r.number);
    wait_report(&agent, "still trusted", |r| r.number > round + 2 && outcome(r).is_some_and(|(ok, _)| ok)).await;
    agent.stop().await;
}

/// The service-account `ca.crt` rotates too (a cluster CA rotation): the apiserver probes,
/// which always verify, trust the apiserver once the new CA is mounted, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_probes_trust_a_rotated_service_account_ca() {
    let api = FakeApiServer::start().await;
    let wrong_ca = TestCa::new("previous cluster ca");
    let token = api.token();
    let mut secret = SecretDir::new(&[("ca.crt", &wrong_ca.cert_pem), ("token", &token), ("namespace", "kubenurse")]);
    let mut args = api.agent_args(secret.dir.path());
    args.extend([
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=100ms".into(),
        "--check-timeout=2s".into(),
        "--reload-interval=100ms".into(),
        "--check-neighbourhood=false".into(),
        "--allow-unschedulable=true".into(),
    ]);
    let agent = start(&args).await;
    let outcome = |report: &kubenurse::scheduler::RoundReport| {
        report.results.iter().find(|r| r.target.kind == "api_server_direct").map(|r| (r.is_ok(), r.summary()))
    };
    let report =
        wait_report(&agent, "the apiserver is not trusted yet", |r| outcome(r).is_some_and(|(ok, _)| !ok)).await;
    let (_, summary) = outcome(&report).expect("api_server_direct");
    assert!(summary.contains("UnknownIssuer") || summary.contains("certificate"), "{summary}");

    secret.update(&[("ca.crt", &api.ca_pem), ("token", &token), ("namespace", "kubenurse")]);
    wait_report(&agent, "the apiserver is trusted after the rotation", |r| outcome(r).is_some_and(|(ok, _)| ok)).await;
    agent.stop().await;
}

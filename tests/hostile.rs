//! Hostile clients. An agent in its own process (so that its memory is its own) is attacked
//! from twenty loopback addresses by more than a thousand connections at once, plain and TLS:
//! some trickle a request head, some ask for the large `/metrics` and `/alive` and never read
//! the answer, and every one of them comes back as soon as it notices it was closed. Meanwhile
//! the kubelet's address keeps getting answers from `/ready` and `/alwayshappy` on fresh
//! connections, and the agent stays under half its 64 Mi memory limit.
//!
//! Also: origins that discovery does not know are not counted as incoming checks.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::agent::{get, get_with, metric, probed_nodes, start, wait_report};
use common::fake_apiserver::{node, pod, FakeApiServer};
use common::process::free_port;
use common::targets::{Target, TestCa};
use http_body_util::BodyExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// Attacker addresses 127.0.0.10 onwards; the kubelet probes from 127.0.0.2.
const ATTACKER_ADDRESSES: u8 = 20;
/// Connections per attacker address, at once: 1,440 in all, 1,200 of them plain (more than
/// the 1,024 each listener used to allow).
const CONNECTIONS_PER_ADDRESS: usize = 72;
/// How often an attacker trickles a byte, and so how soon it notices it was closed.
const TICK: Duration = Duration::from_millis(200);
/// Bounds on each attacker connection's loop.
const MAX_RECONNECTS: usize = 500;
const ATTACK_LIMIT: Duration = Duration::from_secs(120);
/// Fresh-connection requests of each kind the kubelet's address makes during the attack.
const PROBES: usize = 20;
/// Only stops a hang; answers normally take milliseconds.
const ANSWER_LIMIT: Duration = Duration::from_secs(5);
/// Half the memory limit of deploy/base/daemonset.yaml.
const MEMORY_LIMIT_KIB: u64 = 32 * 1024;
/// Agents whose `/alive` lists them all: a large answer.
const STATIC_NEIGHBOURS: usize = 1_500;

#[derive(Clone, Copy, Debug)]
enum Attack {
    /// A request head just under the size limit, then one more byte per tick.
    Trickle,
    /// A request for `path`, whose answer is never read.
    NeverRead(&'static str),
}

#[derive(Default)]
struct Tally {
    connected: AtomicUsize,
    closed: AtomicUsize,
}

struct Attackers {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Attackers {
    fn start(plain: SocketAddr, tls: SocketAddr, connector: TlsConnector) -> Self {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let until = Instant::now() + ATTACK_LIMIT;
        let mut tasks = tokio::task::JoinSet::new();
        for a in 0..ATTACKER_ADDRESSES {
            let source = IpAddr::from([127, 0, 0, 10 + a]);
            for i in 0..CONNECTIONS_PER_ADDRESS {
                let attack = match i % 3 {
                    0 => Attack::Trickle,
                    1 => Attack::NeverRead("/metrics"),
                    _ => Attack::NeverRead("/alive"),
                };
                // One in six over TLS.
                let target = if i % 6 == 5 { (tls, Some(connector.clone())) } else { (plain, None) };
                tasks.spawn(attack_loop(source, target, attack, tally.clone(), stop.clone(), until));
            }
        }
        Attackers { tally, stop, tasks }
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        tokio::time::timeout(Duration::from_secs(30), all).await.expect("attackers stopped");
    }
}

/// One attacker connection: opens, attacks until it notices it was closed, opens again.
async fn attack_loop(
    source: IpAddr,
    (target, tls): (SocketAddr, Option<TlsConnector>),
    attack: Attack,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    until: Instant,
) {
    let done = || stop.load(Ordering::SeqCst) || Instant::now() >= until;
    for _ in 0..MAX_RECONNECTS {
        if done() {
            return;
        }
        let Some(mut stream) = open(source, target, tls.as_ref()).await else {
            tokio::time::sleep(TICK).await;
            continue;
        };
        tally.connected.fetch_add(1, Ordering::SeqCst);
        let opening = match attack {
            Attack::Trickle => format!("GET /alive HTTP/1.1\r\nhost: a\r\nx-trickle: {}", "a".repeat(15_000)),
            Attack::NeverRead(path) => format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n"),
        };
        // Between requests, CRLF is allowed and ignored; writing it tells a closed connection.
        let keep: &[u8] = match attack {
            Attack::Trickle => b"a",
            Attack::NeverRead(_) => b"\r\n",
        };
        let mut payload = opening.as_bytes();
        loop {
            if send(&mut stream, payload).await.is_err() {
                tally.closed.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if done() {
                return;
            }
            tokio::time::sleep(TICK).await;
            payload = keep;
        }
    }
}

async fn send(stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(TICK * 5, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

type Stream = Box<dyn AsyncWrite + Unpin + Send>;

/// A connection from `source` with a small receive buffer, so that large answers back up
/// into the agent at once.
async fn open(source: IpAddr, target: SocketAddr, tls: Option<&TlsConnector>) -> Option<Stream> {
    let tcp = connect_from(source, target, Some(4096)).await?;
    match tls {
        None => Some(Box::new(tcp)),
        Some(connector) => {
            let name = ServerName::try_from("localhost").expect("name");
            let tls = tokio::time::timeout(ANSWER_LIMIT, connector.connect(name, tcp)).await.ok()?.ok()?;
            Some(Box::new(tls))
        }
    }
}

async fn connect_from(source: IpAddr, target: SocketAddr, receive_buffer: Option<u32>) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size).ok()?;
    }
    socket.bind(SocketAddr::new(source, 0)).ok()?;
    tokio::time::timeout(ANSWER_LIMIT, socket.connect(target)).await.ok()?.ok()
}

/// GET `path` on a fresh connection from `source`; the status, or `None` if no answer came
/// within the limit.
async fn fresh_get(source: IpAddr, target: SocketAddr, tls: Option<&TlsConnector>, path: &str) -> Option<u16> {
    let answer = async {
        let tcp = connect_from(source, target, None).await?;
        match tls {
            None => exchange(tcp, target, path).await,
            Some(connector) => {
                let name = ServerName::try_from("localhost").expect("name");
                exchange(connector.connect(name, tcp).await.ok()?, target, path).await
            }
        }
    };
    tokio::time::timeout(ANSWER_LIMIT, answer).await.ok().flatten()
}

async fn exchange(
    io: impl tokio::io::AsyncRead + AsyncWrite + Unpin + Send + 'static,
    target: SocketAddr,
    path: &str,
) -> Option<u16> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", target.to_string())
        .header("connection", "close")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    let res = sender.send_request(req).await.ok()?;
    let status = res.status().as_u16();
    res.into_body().collect().await.ok()?;
    Some(status)
}

fn tls_connector(ca: &TestCa) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("ca cert");
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Anonymous resident memory (heap, stacks) in KiB: what the agent allocates. The rest of
/// its RSS is the pages of its own binary, which is large in a debug build.
fn anonymous_kib(pid: u32) -> u64 {
    common::process::status_kib(pid, "RssAnon")
}

/// The agent's process, killed if the test ends early.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The soft limit of open files of this process.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .expect("open files limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_starve_the_kubelet_or_exhaust_memory() {
    let attackers = usize::from(ATTACKER_ADDRESSES) * CONNECTIONS_PER_ADDRESS;
    assert!(
        open_files_limit() > attackers as u64 + 1024,
        "this test holds {attackers} connections: raise the open files limit (ulimit -n)"
    );
    let ca = TestCa::new("hostile test ca");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = ca.leaf_pem(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.path().join("tls.crt"), cert).expect("cert");
    std::fs::write(dir.path().join("tls.key"), key).expect("key");
    std::fs::write(dir.path().join("ca.crt"), &ca.cert_pem).expect("ca");
    // Neighbours answer over TLS; the agent probes ten of them and lists all in `/alive`.
    let neighbour = Target::https("127.0.0.1", &ca).await;
    let neighbours: Vec<String> =
        (0..STATIC_NEIGHBOURS).map(|i| format!("node-{i:04}=127.0.0.1:{}", neighbour.addr.port())).collect();
    let plain: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    let dir_path = |f: &str| dir.path().join(f).display().to_string();
    let agent = std::process::Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .envs([
            ("KUBENURSE_LISTEN_ADDR", plain.to_string()),
            ("KUBENURSE_TLS_LISTEN_ADDR", tls.to_string()),
            ("KUBENURSE_USE_TLS", "true".into()),
            ("KUBENURSE_CERT_FILE", dir_path("tls.crt")),
            ("KUBENURSE_CERT_KEY", dir_path("tls.key")),
            ("KUBENURSE_EXTRA_CA", dir_path("ca.crt")),
            ("KUBENURSE_CHECK_INTERVAL", "1s".into()),
            ("KUBENURSE_SHUTDOWN_DURATION", "0s".into()),
            ("KUBENURSE_NEIGHBOURS", neighbours.join(",")),
            ("RUST_LOG", "warn".into()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn agent");
    let mut agent = KillOnDrop(Some(agent));
    let pid = agent.pid();
    let kubelet = IpAddr::from([127, 0, 0, 2]);
    let connector = tls_connector(&ca);

    let deadline = Instant::now() + Duration::from_secs(30);
    while fresh_get(kubelet, plain, None, "/ready").await != Some(200) {
        assert!(Instant::now() < deadline, "the agent never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics_size = get(plain, "/metrics").await.1.len();
    let alive_size = get(plain, "/alive").await.1.len();
    assert!(metrics_size > 100_000 && alive_size > 100_000, "large answers: {metrics_size}, {alive_size} bytes");
    let anon_before = anonymous_kib(pid);

    let attack = Attackers::start(plain, tls, connector.clone());
    // As many connections opened as there are attackers before the kubelet's requests start.
    let deadline = Instant::now() + Duration::from_secs(60);
    while attack.tally.connected.load(Ordering::SeqCst) < attackers {
        assert!(Instant::now() < deadline, "attackers did not connect in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The kubelet's probes and a neighbour's (over TLS), each on a fresh connection, spread
    // over longer than the write timeout so that stuck connections are cut and come back.
    let mut answered = [0; 3];
    let mut anon_max = 0;
    let mut rss_max = 0;
    for _ in 0..PROBES {
        answered[0] += usize::from(fresh_get(kubelet, plain, None, "/ready").await == Some(200));
        answered[1] += usize::from(fresh_get(kubelet, plain, None, "/alwayshappy").await == Some(200));
        answered[2] += usize::from(fresh_get(kubelet, tls, Some(&connector), "/alwayshappy").await == Some(200));
        anon_max = anon_max.max(anonymous_kib(pid));
        rss_max = rss_max.max(common::process::rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let (connected, closed) =
        (attack.tally.connected.load(Ordering::SeqCst), attack.tally.closed.load(Ordering::SeqCst));
    attack.stop().await;
    eprintln!(
        "{attackers} attacker connections at once: {connected} opened, {closed} closed by the agent; \
         answered {answered:?} of {PROBES}; anonymous memory {anon_before} KiB before, at most \
         {anon_max} KiB during (RSS with the binary {rss_max} KiB); /metrics {metrics_size} bytes, \
         /alive {alive_size} bytes"
    );
    assert_eq!(answered, [PROBES; 3], "/ready, /alwayshappy, /alwayshappy over TLS on fresh connections");
    assert!(anon_max < MEMORY_LIMIT_KIB, "anonymous memory {anon_max} KiB");
    assert!(closed >= attackers / 2, "the agent cut stuck and surplus connections: {closed}");

    // Still serving once the attack is over, and a clean drain on SIGTERM.
    assert_eq!(get_with(plain, "/alwayshappy", &[]).await.0, 200);
    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill").success());
    let mut child = agent.0.take().expect("agent");
    let exit = tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("the agent exited in time")
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn origins_that_discovery_does_not_know_are_not_counted() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    let neighbour = Target::http("127.0.0.61").await;
    api.upsert_node(node("node-self"));
    api.upsert_node(node("node-a"));
    let labels = [("app", "kubenurse")];
    api.upsert_pod(pod("kubenurse-self", "kubenurse", &labels, "node-self", "127.0.0.60", "Running"));
    api.upsert_pod(pod("kubenurse-a", "kubenurse", &labels, "node-a", "127.0.0.61", "Running"));
    let agent = start(
        &[
            api.agent_args(dir.path()),
            vec![
                "--listen-addr=127.0.0.60:0".into(),
                "--check-interval=200ms".into(),
                "--discovery=pods".into(),
                "--neighbour-filter=app=kubenurse".into(),
                "--pod-name=kubenurse-self".into(),
                format!("--neighbour-port={}", neighbour.addr.port()),
            ],
        ]
        .concat(),
    )
    .await;
    wait_report(&agent, "kubenurse-a discovered", |r| probed_nodes(r) == ["node-a"]).await;
    for origin in ["kubenurse-a", "made-up", "kubenurse-ghost", "kubenurse-a"] {
        let (status, _) = get_with(agent.local_addr, "/alwayshappy", &[("kubenurse-neighbour-origin", origin)]).await;
        assert_eq!(status, 200, "{origin} is answered all the same");
    }
    let (_, text) = get(agent.local_addr, "/metrics").await;
    assert_eq!(metric(&text, "kubenurse_neighbourhood_incoming_checks", &[]), Some(1.0), "only kubenurse-a");
    agent.stop().await;
}

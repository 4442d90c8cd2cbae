//! The real binary: start-up, SIGTERM sequence, second signal, bad configuration.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::get;
use common::process::free_port;

fn agent(envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubenurse"));
    cmd.env_clear().env("PATH", "/usr/bin:/bin").envs(envs.iter().copied());
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").args([format!("-{name}"), child.id().to_string()]).status().expect("kill");
    assert!(status.success());
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

async fn ready_status(addr: std::net::SocketAddr) -> Option<u16> {
    let stream = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    drop(stream);
    Some(get(addr, "/ready").await.0)
}

#[tokio::test]
async fn sigterm_turns_unready_keeps_serving_then_exits_zero() {
    let port = free_port("127.0.0.1");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let listen = addr.to_string();
    let mut child = agent(&[
        ("KUBENURSE_LISTEN_ADDR", &listen),
        ("KUBENURSE_CHECK_INTERVAL", "200ms"),
        ("KUBENURSE_SHUTDOWN_DURATION", "2s"),
    ])
    .spawn()
    .expect("spawn");
    assert!(eventually(Duration::from_secs(20), async || ready_status(addr).await == Some(200)).await, "never ready");

    signal(&child, "TERM");
    assert!(
        eventually(Duration::from_secs(20), async || ready_status(addr).await == Some(503)).await,
        "/ready did not turn 503"
    );
    // Still serving and probing during the shutdown duration: rounds go on (every 200 ms
    // for 2 s) until the listener closes. Rounds still finish, so the agent is live.
    assert_eq!(get(addr, "/alwayshappy").await.0, 200);
    assert_eq!(get(addr, "/livez").await.0, 200, "draining is no reason to restart");
    let at_unready = rounds(addr).await.expect("serving after SIGTERM");
    let mut last = at_unready;
    for _ in 0..400 {
        match rounds(addr).await {
            Some(n) => last = n,
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(last >= at_unready + 3.0, "rounds stopped at SIGTERM: {at_unready} then {last}");
    let status = wait_exit(&mut child, Duration::from_secs(20)).expect("exits after the drain");
    assert_eq!(status.code(), Some(0));
}

/// Rounds done so far, from `/metrics`; `None` once the agent no longer answers.
async fn rounds(addr: std::net::SocketAddr) -> Option<f64> {
    ready_status(addr).await?;
    // The listener may close between the two requests: a failed GET means "gone".
    let (status, text) = tokio::spawn(get(addr, "/metrics")).await.ok()?;
    (status == 200).then(|| common::agent::metric(&text, "kubenurse_round_lateness_seconds_count", &[]))?
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let port = free_port("127.0.0.1");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let listen = addr.to_string();
    let mut child =
        agent(&[("KUBENURSE_LISTEN_ADDR", &listen), ("KUBENURSE_SHUTDOWN_DURATION", "60s")]).spawn().expect("spawn");
    assert!(eventually(Duration::from_secs(20), async || ready_status(addr).await == Some(200)).await, "never ready");
    signal(&child, "TERM");
    assert!(eventually(Duration::from_secs(20), async || ready_status(addr).await == Some(503)).await);
    signal(&child, "INT");
    let status = wait_exit(&mut child, Duration::from_secs(5)).expect("second signal ends the process at once");
    assert_eq!(status.code(), Some(130));
}

#[test]
fn bad_configuration_exits_64_with_one_line_naming_the_variable() {
    let cases: &[(&str, &str)] = &[
        ("KUBENURSE_CHECK_INTERVAL", "soon"),
        ("KUBENURSE_CHECK_INTERVAL", "0s"),
        ("KUBENURSE_NEIGHBOUR_LIMIT", "-3"),
        ("KUBENURSE_HISTOGRAM_BUCKETS", "1,0.5"),
        ("KUBENURSE_EXTRA_CHECKS", "just-a-name"),
        ("KUBENURSE_LISTEN_ADDR", "everywhere"),
        ("KUBENURSE_USE_TLS", "true"),
    ];
    for (variable, value) in cases {
        let out = agent(&[(variable, value)]).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{variable}={value}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{variable}={value}: {stderr}");
        assert!(lines[0].starts_with("invalid configuration: "), "{stderr}");
        let named = if *variable == "KUBENURSE_USE_TLS" { "KUBENURSE_CERT_FILE" } else { variable };
        assert!(lines[0].contains(named), "{stderr}");
        assert!(!stderr.contains("panicked"));
    }
}

#[test]
fn help_lists_every_option_with_its_variable() {
    let out = agent(&[]).arg("--help").output().expect("run");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for variable in
        ["KUBENURSE_CHECK_INTERVAL", "KUBENURSE_NEIGHBOUR_LIMIT", "KUBENURSE_LISTEN_ADDR", "KUBERNETES_SERVICE_HOST"]
    {
        assert!(help.contains(variable), "{variable} missing from --help");
    }
}

#[tokio::test]
async fn empty_variables_mean_unset_as_helm_renders_them() {
    let port = free_port("127.0.0.1");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let listen = addr.to_string();
    let mut envs: Vec<(&str, &str)> = [
        "KUBENURSE_INGRESS_URL",
        "KUBENURSE_SERVICE_URL",
        "KUBENURSE_INSECURE",
        "KUBENURSE_EXTRA_CA",
        "KUBENURSE_EXTRA_CHECKS",
        "KUBENURSE_NAMESPACE",
        "KUBENURSE_NEIGHBOUR_FILTER",
        "KUBENURSE_NEIGHBOUR_LIMIT",
        "KUBENURSE_ALLOW_UNSCHEDULABLE",
        "KUBENURSE_CHECK_API_SERVER_DIRECT",
        "KUBENURSE_CHECK_API_SERVER_DNS",
        "KUBENURSE_CHECK_ME_INGRESS",
        "KUBENURSE_CHECK_ME_SERVICE",
        "KUBENURSE_CHECK_NEIGHBOURHOOD",
        "KUBENURSE_CHECK_INTERVAL",
        "KUBENURSE_REUSE_CONNECTIONS",
        "KUBENURSE_SHUTDOWN_DURATION",
        "KUBENURSE_HISTOGRAM_BUCKETS",
        "KUBENURSE_USE_TLS",
        "KUBENURSE_CERT_FILE",
        "KUBENURSE_CERT_KEY",
        "KUBENURSE_POD_NAME",
        "KUBENURSE_NODE_NAME",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "KUBERNETES_SERVICE_DNS",
    ]
    .into_iter()
    .map(|v| (v, ""))
    .collect();
    envs.push(("KUBENURSE_LISTEN_ADDR", &listen));
    let mut child = agent(&envs).spawn().expect("spawn");
    let ready = eventually(Duration::from_secs(20), async || ready_status(addr).await == Some(200)).await;
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    assert!(ready, "did not start with empty variables: {}", String::from_utf8_lossy(&out.stderr));
}

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
    let signalled = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), async || ready_status(addr).await == Some(503)).await,
        "/ready did not turn 503 at once"
    );
    // Still serving during the shutdown duration.
    assert_eq!(get(addr, "/alwayshappy").await.0, 200);
    assert_eq!(get(addr, "/metrics").await.0, 200);
    assert!(child.try_wait().expect("wait").is_none(), "exited before the shutdown duration");

    let status = wait_exit(&mut child, Duration::from_secs(20)).expect("exits after the drain");
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "left before the shutdown duration: {:?}",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0));
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
    assert!(eventually(Duration::from_secs(1), async || ready_status(addr).await == Some(503)).await);
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

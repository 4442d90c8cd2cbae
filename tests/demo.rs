//! `kubenurse demo`: several agents in one process, printing a per-pair table.

use std::process::Command;

#[test]
fn demo_agents_find_each_other_and_print_the_table() {
    let port = std::net::TcpListener::bind("127.0.0.2:0").expect("bind").local_addr().expect("addr").port();
    let out = Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .args(["demo", "--nodes", "3", "--rounds", "2", "--interval", "300ms", "--port", &port.to_string()])
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let tables: Vec<&str> = stdout.split("\nround ").skip(1).collect();
    assert_eq!(tables.len(), 2, "{stdout}");
    for table in tables {
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert_eq!(rows.len(), 3, "{table}");
        for row in rows {
            // Each agent probes the two others successfully (a latency in ms) and not itself.
            assert_eq!(row.matches(" ms").count(), 2, "{row}");
            assert!(!row.contains("connect_done") && !row.contains("round_trip_error"), "{row}");
        }
    }
}

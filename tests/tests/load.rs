//! Every load scenario of `lockbroker-bench load` runs briefly against a
//! daemon it spawns and reports its numbers (a smoke test: no timing is
//! asserted; the figures are the benchmarks' job).

#![cfg(unix)]

use std::path::Path;
use std::process::{Command, Stdio};

/// `lockbroker-bench` under test.
const BENCH: &str = env!("CARGO_BIN_EXE_lb-bench");

/// The daemon it spawns.
fn daemon_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-daemon"))
}

/// The tool whose `status` the inspect scenario runs.
fn cli_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-cli"))
}

/// `lockbroker-bench load ARGS --spawn --json`, its JSON report.
fn load(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BENCH)
        .arg("load")
        .args(args)
        .args(["--spawn", "--json", "--cli"])
        .arg(cli_bin())
        .env("LOCKBROKERD", daemon_bin())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn every_load_scenario_runs_and_reports() {
    for (scenario, ops) in [
        ("uncontended", "50"),
        ("contended", "50"),
        ("semaphore", "50"),
        ("handoff", "50"),
        ("state", "50"),
        ("connections", "50"),
        ("names", "2000"),
        ("abandon", "3"),
        ("inspect", "3000"),
    ] {
        let v = load(&[
            scenario,
            "--clients",
            "3",
            "--ops",
            ops,
            "--duration",
            "0.05",
        ]);
        assert_eq!(v["scenario"], scenario);
        assert!(v["ops"].as_u64().unwrap() > 0, "{scenario}: {v}");
        assert!(v["ops_per_sec"].as_f64().unwrap() > 0.0, "{scenario}: {v}");
        assert!(v["p99_us"].as_f64().unwrap() >= v["p50_us"].as_f64().unwrap());
        match scenario {
            "contended" => assert_eq!(v["fifo_violations"], 0),
            "connections" => assert!(v["bytes_per_connection"].is_number()),
            "names" => assert!(v["bytes_per_name"].is_number()),
            "inspect" => {
                assert_eq!(v["names"], 3000);
                assert!(v["status_runs"].as_u64().unwrap() >= 1, "{v}");
                assert!(v["idle_p99_us"].is_number(), "{v}");
            }
            _ => {}
        }
    }
    let v = load(&["uncontended", "--blocking", "--clients", "2", "--ops", "50"]);
    assert_eq!(v["ops"], 100);
}

#[test]
fn a_bad_scenario_is_refused_with_usage() {
    let out = Command::new(BENCH)
        .args(["load", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value 'nonsense'"), "{stderr}");
}

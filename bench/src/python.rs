//! The Python scenarios: one Python lock's uncontended acquire + release —
//! lockbroker's `Lock` through the Python client in this repository,
//! redis-py's `Lock` against a `redis-server` the harness starts, and
//! filelock's `FileLock`, and the floor of a Python client (two round
//! trips of raw socket calls with the echo server) — timed by
//! `bench/python/cycle.py` in a
//! `python3` pinned as the placement says. redis-py and filelock are the
//! benchmark's own, optional: a scenario whose module is missing is
//! skipped with a note (`pip install redis filelock` to run them).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Bins;
use crate::run::{Measure, Sample, Server, daemon, pinned};

/// The timing script, run with `python3 -c`.
const CYCLE: &str = include_str!("../python/cycle.py");

/// Which Python lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `lockbroker.Lock`.
    Lockbroker,
    /// redis-py's `Lock`.
    Redis,
    /// filelock's `FileLock`.
    FileLock,
    /// Two echo round trips through Python's socket module.
    Floor,
}

impl Kind {
    /// The scenario's name in the table.
    pub fn scenario(self) -> &'static str {
        match self {
            Kind::Lockbroker => "Python lockbroker.Lock",
            Kind::Redis => "Python redis-py Lock",
            Kind::FileLock => "Python filelock.FileLock",
            Kind::Floor => "Python floor, 2 round trips",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Kind::Lockbroker => "lockbroker",
            Kind::Redis => "redis",
            Kind::FileLock => "filelock",
            Kind::Floor => "floor",
        }
    }

    fn module(self) -> &'static str {
        match self {
            Kind::Lockbroker => "lockbroker",
            Kind::Redis => "redis",
            Kind::FileLock => "filelock",
            Kind::Floor => "socket",
        }
    }
}

/// Where the Python client of this repository is.
fn client_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

fn python() -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", client_path())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// The kinds that can run here, with a note on stderr for each that
/// cannot.
pub fn available(redis_server: bool) -> Vec<Kind> {
    let mut kinds = Vec::new();
    for kind in [Kind::Floor, Kind::Lockbroker, Kind::Redis, Kind::FileLock] {
        let imports = python()
            .args(["-c", &format!("import {}", kind.module())])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !imports {
            eprintln!(
                "note: python3 cannot import {}; the {} scenario is skipped",
                kind.module(),
                kind.scenario()
            );
        } else if kind == Kind::Redis && !redis_server {
            eprintln!(
                "note: no redis-server; the {} scenario is skipped",
                kind.scenario()
            );
        } else {
            kinds.push(kind);
        }
    }
    kinds
}

/// One run of `kind`'s cycle, one client, for `m.duration`.
pub fn run(bins: &Bins, m: &Measure, kind: Kind) -> Sample {
    let dir = tempfile::tempdir().expect("temp dir");
    let lock_file = dir.path().join("python.lock");
    let _server: Option<Server>;
    let target: PathBuf = match kind {
        Kind::Lockbroker => {
            let server = daemon(bins, m, &[]);
            let socket = server.socket.clone();
            _server = Some(server);
            socket
        }
        Kind::Redis => {
            let server = crate::redis::server(m);
            let socket = server.socket.clone();
            _server = Some(server);
            socket
        }
        Kind::FileLock => {
            _server = None;
            lock_file
        }
        Kind::Floor => {
            let server = crate::floor::echo_server(bins, m, crate::floor::Echo::Threads);
            let socket = server.socket.clone();
            _server = Some(server);
            socket
        }
    };
    let mut cmd = pinned(m.placement.client_cpu(), Path::new("python3"));
    cmd.env("PYTHONPATH", client_path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-c", CYCLE, kind.arg()])
        .arg(&target)
        .arg(m.duration.as_secs_f64().to_string());
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "python3 cycle.py {}: {}",
        kind.arg(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cycle.py JSON");
    Sample {
        ops_per_sec: v["ops_per_sec"].as_f64().unwrap_or(0.0),
        p50_us: v["p50_us"].as_f64().unwrap_or(0.0),
    }
}

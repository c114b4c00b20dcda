//! The CLI tests that are the same on every platform: what they drive
//! (exit statuses, lock kinds, status listings, state commands, help,
//! guarded writes) does not
//! depend on how processes, signals or addresses work.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockbroker_tests::harness::{address, wait_exit};

use crate::fixture::{CLI, CONFLICT, Daemon, WORKER, finish, kill, read_pid, run, wait_until};

/// More locks than one page of the daemon's (1000), and than the 10,000
/// the tool used to show at most: all are listed, in order.
#[test]
fn status_lists_every_lock_page_by_page() {
    let d = Daemon::start();
    let connector = lockbroker::Connector::new().socket(d.socket());
    let client = lockbroker::blocking::Client::connect_with(&connector).unwrap();
    let n = 10_500;
    let guards: Vec<_> = (0..n)
        .map(|i| client.mutex(format!("many/{i:05}")).acquire().unwrap())
        .collect();
    let _other = client.mutex("other").acquire().unwrap();
    let out = run(d.cli().args(["status", "--json", "many/"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = status["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), n, "every lock listed");
    let want: Vec<String> = (0..n).map(|i| format!("many/{i:05}")).collect();
    assert!(names == want, "in name order");
    assert_eq!(status["truncated"], false);
    assert_eq!(status["daemon"]["socket"], d.socket().display().to_string());
    let table = run(d.cli().args(["status"]));
    let text = String::from_utf8(table.stdout).unwrap();
    assert_eq!(
        text.matches("\nmany/").count(),
        n,
        "every lock in the table"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("other ") && l.split_whitespace().nth(1) == Some("mutex")),
        "{}",
        &text[..200]
    );
    drop(guards);
}

#[test]
fn ping_and_help() {
    let d = Daemon::start();
    let out = run(d.cli().args(["ping", "--json"]));
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    for cmd in ["lock", "sem", "status", "ping", "metrics", "run", "daemon"] {
        let out = Command::new(CLI).args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains("Examples:"), "`{cmd} --help` has no example");
    }
    // A daemon that is not there: one clear line.
    let nowhere = address(&tempfile::tempdir().unwrap().path().join("gone"));
    let out = Command::new(CLI)
        .arg("--socket")
        .arg(&nowhere)
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("lockbroker: cannot connect"), "{err}");
}

/// `lockbroker metrics` prints the daemon's metrics, which a strict
/// reader of the format accepts, with the hold another session has.
#[test]
fn metrics_prints_the_daemons_counts() {
    let d = Daemon::start();
    let connector = lockbroker::Connector::new().socket(d.socket());
    let client = lockbroker::blocking::Client::connect_with(&connector).unwrap();
    let _held = client.rwlock("cfg").write().unwrap();
    let out = run(d.cli().arg("metrics"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let m = lockbroker_tests::openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        m.get("lockbroker_holds", &[("kind", "rwlock_exclusive")]),
        1.0
    );
    assert_eq!(
        m.get("lockbroker_sessions", &[]),
        2.0,
        "the holder's and the tool's"
    );
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn a_command_under_lock_writes_state_guarded_by_its_own_hold() {
    let d = Daemon::start();
    // The README's example: it must not queue behind its own wrapper.
    let out = run(d.cli().args([
        "lock",
        "deploy",
        "--",
        CLI,
        "state",
        "set",
        "--lock",
        "deploy",
        "deploy/status",
        "step 3 of 7",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = run(d.cli().args(["state", "get", "deploy/status"]));
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "step 3 of 7");
    // Nested wrappers: the outer lock's hold is found too.
    let out = run(d
        .cli()
        .args(["lock", "outer", "--", CLI, "lock", "inner", "--"])
        .args([
            CLI,
            "state",
            "set",
            "--lock",
            "outer",
            "deploy/status",
            "nested",
        ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A fence that is no longer live (the wrapper's environment, replayed
    // after it ended) is refused and changes nothing.
    let stale = run(d.cli().env("LOCKBROKER_LOCKS", "1 deploy").args([
        "state",
        "set",
        "--lock",
        "deploy",
        "deploy/status",
        "late",
    ]));
    assert_eq!(stale.status.code(), Some(69));
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("stale_fence"),
        "{}",
        String::from_utf8_lossy(&stale.stderr)
    );
    let got = run(d.cli().args(["state", "get", "deploy/status"]));
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "nested");
}

#[test]
fn state_commands_and_their_exit_statuses() {
    let d = Daemon::start();
    let ok = |args: &[&str]| {
        let out = run(d.cli().args(args));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let v1: u64 = ok(&["state", "set", "build/status", "running"])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(ok(&["state", "get", "build/status"]), "running\n");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["--json", "state", "get", "build/status"])).unwrap();
    assert_eq!(
        (json["value"].as_str(), json["version"].as_u64()),
        (Some("running"), Some(v1))
    );
    // Absent key: 4. Version mismatch: 5; nothing changes.
    assert_eq!(
        run(d.cli().args(["state", "get", "nope"])).status.code(),
        Some(4)
    );
    assert_eq!(
        run(d.cli().args(["state", "rm", "nope"])).status.code(),
        Some(4)
    );
    let out = run(d
        .cli()
        .args(["state", "cas", "build/status", &(v1 + 100).to_string(), "x"]));
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("version mismatch"));
    let v2: u64 = ok(&["state", "cas", "build/status", &v1.to_string(), "done"])
        .trim()
        .parse()
        .unwrap();
    assert!(v2 > v1);
    // Increments, including negative deltas.
    assert_eq!(ok(&["state", "incr", "visits"]), "1\n");
    assert_eq!(ok(&["state", "incr", "visits", "10"]), "11\n");
    assert_eq!(ok(&["state", "incr", "--", "visits", "-3"]), "8\n");
    // A value from stdin, and a guarded write under a lock.
    let mut child = d
        .cli()
        .args(["state", "set", "--lock", "deploy", "deploy/log", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"line one\nline two\n").unwrap();
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
    assert_eq!(ok(&["state", "get", "deploy/log"]), "line one\nline two\n");
    let listing = ok(&["state", "list", "build/", "--values"]);
    assert_eq!(listing, format!("build/status\t{v2}\tdone\n"));
    assert_eq!(ok(&["state", "rm", "build/status"]), "done\n");
    // The lock taken for the guarded write was released.
    assert_eq!(d.status_json()["locks"].as_array().unwrap().len(), 0);
}

#[test]
fn state_watch_prints_one_line_per_change() {
    let d = Daemon::start();
    let out = run(d.cli().args(["state", "set", "jobs/0", "first"]));
    let v0 = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // --from replays jobs/0, so its line proves the watch is in place.
    let mut watch = d
        .cli()
        .args(["state", "watch", "--prefix", "jobs/", "--from", &v0])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("a watch line")
    };
    assert_eq!(next(), format!("{v0} set jobs/0 first"));
    run(d.cli().args(["state", "set", "jobs/1", "queued"]));
    run(d.cli().args(["state", "set", "other", "x"]));
    run(d.cli().args(["state", "rm", "jobs/1"]));
    let a = next();
    let b = next();
    assert!(a.ends_with(" set jobs/1 queued"), "{a}");
    assert!(b.ends_with(" removed jobs/1"), "{b}");
    let va: u64 = a.split(' ').next().unwrap().parse().unwrap();
    let vb: u64 = b.split(' ').next().unwrap().parse().unwrap();
    assert!(vb > va);
    watch.kill().unwrap();
    let _ = wait_exit(&mut watch, Duration::from_secs(10));
}

/// `lockbroker ARGS -- lb-worker pidfile TAG.pid`, once its command runs
/// (holding): the wrapper and the command's pid.
fn hold(d: &Daemon, args: &[&str], tag: &str) -> (Child, u32) {
    let pidfile = d.path(&format!("{tag}.pid"));
    let mut cmd = d.cli();
    cmd.args(args)
        .args(["--", WORKER, "pidfile", pidfile.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let wrapper = cmd.spawn().unwrap();
    let command = read_pid(&pidfile);
    (wrapper, command)
}

/// Ends a [`hold`]: its command is killed, so its wrapper exits.
fn release((mut wrapper, command): (Child, u32)) {
    assert!(kill(command));
    wait_exit(&mut wrapper, Duration::from_secs(20));
}

#[test]
fn nonblock_and_timeout_give_the_conflict_exit_code() {
    let d = Daemon::start();
    let holder = hold(&d, &["lock", "busy"], "h");
    let out = run(&mut d.lock(&["--nonblock", "busy"], &["env", "X"]));
    assert_eq!(out.status.code(), Some(CONFLICT), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("busy"), "{err}");
    let start = Instant::now();
    let out = run(&mut d.lock(&["--timeout", "300ms", "busy"], &["env", "X"]));
    assert_eq!(out.status.code(), Some(CONFLICT), "{out:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "gave up early"
    );
    let out = run(&mut d.lock(&["-n", "--conflict-exit-code", "9", "busy"], &["env", "X"]));
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    release(holder);
    wait_until("the lock is free", || d.is_free("busy"));
}

#[test]
fn shared_holders_overlap_and_an_exclusive_one_does_not() {
    let d = Daemon::start();
    let r1 = hold(&d, &["lock", "--shared", "rw"], "r1");
    let r2 = hold(&d, &["lock", "--shared", "rw"], "r2"); // both inside at once
    assert!(!d.is_free("rw"), "exclusive while readers hold");
    release(r1);
    release(r2);
    let w = hold(&d, &["lock", "rw"], "w");
    let out = run(&mut d.lock(&["--shared", "--nonblock", "rw"], &["env", "X"]));
    assert_eq!(
        out.status.code(),
        Some(CONFLICT),
        "shared while a writer holds"
    );
    release(w);
}

/// `lb-worker inside` counts who is in the critical section and fails
/// past the capacity.
#[test]
fn a_semaphore_of_two_never_has_three_inside() {
    let d = Daemon::start();
    let inside = d.path("inside");
    std::fs::create_dir(&inside).unwrap();
    let children: Vec<Child> = (0..6)
        .map(|_| {
            d.cli()
                .args(["sem", "pool", "--capacity", "2", "--", WORKER, "inside"])
                .arg(&inside)
                .arg("2")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = finish(c);
        assert!(out.status.success(), "{out:?}");
    }
}

/// A flock(1) user changes one word: `-s`, `-x`/`-e`, `-n`, `-w SECONDS`
/// (fractions), `-E CODE`, and the command as every word after NAME.
#[test]
fn flocks_options_mean_the_same_here() {
    let d = Daemon::start();
    // No `--`: the command is every word after the name, its own options
    // included.
    let out = run(d
        .cli()
        .args(["lock", "plain", WORKER, "env", "LOCKBROKER_LOCK", "-n"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "LOCKBROKER_LOCK=plain\n-n unset\n"
    );
    // Shared holders overlap; -x and -e are exclusive.
    let reader = hold(&d, &["lock", "-s", "rw"], "reader");
    let out = run(d.cli().args(["lock", "-s", "-n", "rw", WORKER, "env", "X"]));
    assert!(out.status.success(), "a second shared holder: {out:?}");
    for exclusive in ["-x", "-e"] {
        let out = run(d
            .cli()
            .args(["lock", exclusive, "-n", "rw", WORKER, "env", "X"]));
        assert_eq!(out.status.code(), Some(CONFLICT), "{exclusive}: {out:?}");
    }
    // -w with a fraction of a second, -E for the status.
    let start = Instant::now();
    let out = run(d
        .cli()
        .args(["lock", "-w", "0.3", "-E", "9", "rw", WORKER, "env", "X"]));
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "gave up early"
    );
    // Shared and exclusive at once is a usage error.
    let out = run(d.cli().args(["lock", "-s", "-x", "rw", WORKER, "env", "X"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    release(reader);
    // `--` still separates the command.
    let out = run(d.cli().args(["lock", "-x", "rw", "--", WORKER, "env", "X"]));
    assert!(out.status.success(), "{out:?}");
}

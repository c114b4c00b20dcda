//! systemd integration: the unit files verify, socket activation through
//! `systemd-socket-activate`, and READY=1 / WATCHDOG=1 / STOPPING=1 on a
//! notify socket the test owns.
//!
//! The tests that need systemd's tools skip (with a note) where they are not
//! installed, unless LOCKBROKER_REQUIRE_SYSTEMD=1 (set by CI) makes that a
//! failure.

use lockbroker_tests::harness::hold_over_raw;
use lockbroker_tests::unix::{exit_before, signal, wait_exit};

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::BIN;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The path of `tool`, or `None` (after saying why) if the test should skip.
fn tool(tool: &str) -> Option<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Some(p);
        }
    }
    if std::env::var_os("LOCKBROKER_REQUIRE_SYSTEMD").is_some_and(|v| v == "1") {
        panic!("{tool} is required (LOCKBROKER_REQUIRE_SYSTEMD=1) but not installed");
    }
    eprintln!("skipped: {tool} is not installed (Debian package systemd)");
    None
}

/// Copies the unit files into `dir` with ExecStart pointing at the built
/// daemon (verify checks that the binary exists).
fn units_in(dir: &Path, sub: &str) -> Vec<PathBuf> {
    let src = repo().join("systemd").join(sub);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str());
        if !matches!(ext, Some("service" | "socket")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("/usr/bin/lockbrokerd") || ext == Some("socket"));
        let dest = dir.join(path.file_name().unwrap());
        std::fs::write(&dest, text.replace("/usr/bin/lockbrokerd", BIN)).unwrap();
        out.push(dest);
    }
    out.sort();
    assert_eq!(out.len(), 2, "a socket and a service in systemd/{sub}");
    out
}

/// `systemd-analyze verify` must pass with no warning at all.
fn verify(user: bool, units: &[PathBuf], runtime: &Path) {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let mut cmd = Command::new(analyze);
    if user {
        cmd.arg("--user");
    }
    let out = cmd
        .args(["verify", "--man=no"])
        .args(units)
        .env("XDG_RUNTIME_DIR", runtime)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "verify: {stderr}"
    );
}

#[test]
fn system_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_in(dir.path(), "");
    verify(false, &units, dir.path());
    // Every hardening line the issue asks for is there.
    let service = std::fs::read_to_string(repo().join("systemd/lockbroker.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=lockbroker",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "PrivateNetwork=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "UMask=0077",
    ] {
        assert!(service.contains(line), "lockbroker.service lacks {line:?}");
    }
    let socket = std::fs::read_to_string(repo().join("systemd/lockbroker.socket")).unwrap();
    for line in [
        "ListenStream=/run/lockbroker/broker.sock",
        "SocketMode=0660",
        "SocketGroup=lockbroker",
    ] {
        assert!(socket.contains(line), "lockbroker.socket lacks {line:?}");
    }
}

#[test]
fn user_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_in(dir.path(), "user");
    verify(true, &units, dir.path());
    let socket = std::fs::read_to_string(repo().join("systemd/user/lockbroker.socket")).unwrap();
    assert!(socket.contains("ListenStream=%t/lockbroker/broker.sock"));
}

#[test]
fn sysusers_file_parses() {
    let Some(sysusers) = tool("systemd-sysusers") else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let out = Command::new(sysusers)
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join("systemd/sysusers.d/lockbroker.conf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("lockbroker:")),
        "{passwd}"
    );
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l.starts_with("lockbroker:")),
        "{group}"
    );
}

#[test]
fn socket_activation_serves_the_passed_socket() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    // The daemon is told a different path: it must serve the passed socket.
    let unused = dir.path().join("unused.sock");
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(&socket)
        .arg(BIN)
        .arg("--socket")
        .arg(&unused)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // systemd-socket-activate listens before it starts the daemon. Wait
    // until it accepts, not until the file exists: between its bind and
    // its listen, a connect is refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "activator exited");
        assert!(Instant::now() < deadline, "the activator never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            hold_over_raw(&socket, "activated").await;
        })
        .await
        .expect("a lock through the activated socket");
    });
    assert!(!unused.exists(), "the daemon bound its own socket too");
    assert!(signal(child.id(), libc::SIGTERM));
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

/// Receives datagrams on `sock` until one contains `want`.
fn expect_notify(sock: &UnixDatagram, want: &str) {
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {want}: {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]);
        if msg.lines().any(|l| l == want) {
            return;
        }
    }
}

#[test]
fn readiness_watchdog_and_stopping_are_notified() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket = dir.path().join("broker.sock");
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "100000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    expect_notify(&notify, "READY=1");
    // READY=1 is only sent once connections are accepted.
    std::os::unix::net::UnixStream::connect(&socket).expect("ready means listening");
    expect_notify(&notify, "WATCHDOG=1");
    expect_notify(&notify, "WATCHDOG=1");
    assert!(signal(child.id(), libc::SIGTERM));
    expect_notify(&notify, "STOPPING=1");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

/// On the socket-activation path too, the signal handlers are installed
/// before the daemon takes the passed socket and says READY=1: signalled
/// the moment READY=1 arrives, it says STOPPING=1 and exits 0, every time.
#[test]
fn a_signal_the_moment_an_activated_daemon_is_ready_shuts_down_cleanly() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    const ROUNDS: usize = 100;
    let deadline = Instant::now() + Duration::from_secs(120);
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut unclean = Vec::new();
    for round in 0..ROUNDS {
        let socket = dir.path().join(format!("{round}.sock"));
        let mut child = Command::new(&activate)
            .arg("-l")
            .arg(&socket)
            .arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
            .arg(BIN)
            .arg("--socket")
            .arg(dir.path().join("unused.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The activator execs the daemon on the first connection; spin
        // (yielding, never sleeping) until it listens.
        let _connection = loop {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) {
                break stream;
            }
            assert!(child.try_wait().unwrap().is_none(), "activator exited");
            assert!(Instant::now() < deadline, "the test ran out of time");
            std::thread::yield_now();
        };
        notify
            .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))
            .unwrap();
        expect_notify(&notify, "READY=1");
        assert!(signal(child.id(), libc::SIGTERM));
        let (status, err) = exit_before(child, deadline);
        if !status.success() {
            unclean.push(format!("round {round}: {status}, stderr: {err}"));
            continue;
        }
        // The daemon's last word before exiting 0; already queued.
        expect_notify(&notify, "STOPPING=1");
    }
    assert!(
        unclean.is_empty(),
        "{} unclean exits in {ROUNDS} activations:\n{}",
        unclean.len(),
        unclean.join("\n")
    );
}

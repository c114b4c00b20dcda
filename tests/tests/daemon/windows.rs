//! The `lockbrokerd` binary on Windows: the counterparts of `process.rs`'s
//! signal and one-daemon tests. A console event (Ctrl-Break here; Ctrl-C,
//! a closed console, logoff and shutdown take the same path) stops it
//! cleanly; a second daemon on the same pipe is refused with status 3;
//! the private pipes `lockbroker run` and the tests use admit their
//! owner, whose identity the client verified.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockbroker_proto::{Event, ServerMessage};
use lockbroker_tests::harness::{DaemonProcess, address, bounded, hold_over_raw, wait_exit};
use lockbroker_tests::windows::{ctrl_break, has_console, is_wine, own_group};

use super::BIN;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `lockbrokerd --socket PIPE` in a console process group of its own,
/// once it serves.
fn serve(pipe: &Path) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.arg("--socket")
        .arg(pipe)
        .env_remove("LOCKBROKER_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = own_group(&mut cmd).spawn().unwrap();
    let connector = lockbroker::Connector::new().socket(pipe);
    runtime()
        .block_on(lockbroker::launch::wait_until_serving(
            &mut child,
            &connector,
            Duration::from_secs(20),
            false,
        ))
        .unwrap_or_else(|e| panic!("the daemon at {}: {e}", pipe.display()));
    child
}

/// Counterpart of `sigterm_tells_sessions_releases_and_exits_0_within_a_second`.
/// Not under a headless Wine, which can make no console to send the event
/// through (README, "Tested under Wine"): the shutdown it starts is the
/// one the Unix signals start, tested on Linux.
#[test]
fn ctrl_break_tells_sessions_releases_and_exits_0() {
    if !has_console() {
        assert!(is_wine(), "a Windows test process without a console");
        eprintln!("skipped under Wine: no console to send Ctrl-Break through");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pipe = address(dir.path());
    let mut child = serve(&pipe);
    runtime().block_on(bounded(async {
        let mut raw = hold_over_raw(&pipe, "held").await;
        let signalled = Instant::now();
        assert!(ctrl_break(child.id()), "GenerateConsoleCtrlEvent failed");
        let event = raw.recv().await.expect("an event before the close");
        assert_eq!(event, ServerMessage::Event(Event::ShuttingDown));
        raw.assert_closed().await;
        let status = wait_exit(&mut child, Duration::from_secs(5));
        assert!(status.success(), "exit status {status}");
        let took = signalled.elapsed();
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    }));
}

/// Counterpart of `a_second_daemon_on_the_same_socket_is_refused`.
#[test]
fn a_second_daemon_on_the_same_pipe_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = address(dir.path());
    let _first = DaemonProcess::start_blocking(BIN.as_ref(), &pipe, &[]);
    let mut second = Command::new(BIN)
        .arg("--socket")
        .arg(&pipe)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a second daemon that is not refused serves on and on.
    let status = wait_exit(&mut second, Duration::from_secs(20));
    let mut msg = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut msg).unwrap();
    assert!(msg.contains("already serving"), "{msg}");
    assert_eq!(status.code(), Some(3), "{msg}");
    assert_eq!(msg.lines().count(), 1, "one clear line: {msg}");
    // The first one is undisturbed.
    runtime().block_on(async {
        let client = lockbroker::Connector::new()
            .socket(&pipe)
            .connect()
            .await
            .unwrap();
        client.ping().await.unwrap();
    });
}

/// A daemon's identity as its clients see it: the session's uid is the
/// number of the user's SID, the same for every session of the user.
#[test]
fn a_session_carries_the_users_number() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = address(dir.path());
    let _daemon = DaemonProcess::start_blocking(BIN.as_ref(), &pipe, &[]);
    let me = lockbroker_proto::pipe::current_identity().unwrap();
    assert!(me.uid.is_some(), "{me:?} has a number");
    runtime().block_on(async {
        let client = lockbroker::Connector::new()
            .socket(&pipe)
            .connect()
            .await
            .unwrap();
        let _g = client.mutex("mine").acquire().await.unwrap();
        let info = client.inspect("mine").await.unwrap();
        let session = &info.entries[0].holders[0].session;
        assert_eq!(session.uid, me.uid, "{me:?}");
        assert_eq!(session.pid, Some(std::process::id()));
        // Protocol version 2: the account, read from the token with the uid.
        assert_eq!(session.user, me.account, "{me:?}");
    });
}

/// `sc NAME ARGS…` (the system's service tool); its output.
fn sc(args: &[&str]) -> std::process::Output {
    Command::new("sc")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Counterpart of the systemd tests: lockbrokerd installs itself as a
/// service, the service control manager starts it, its stop shuts the
/// daemon down cleanly (every session told `ShuttingDown` and released),
/// and it removes itself. Skipped where this user may not install
/// services (not an administrator).
#[test]
fn the_service_serves_until_the_service_manager_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = address(dir.path());
    let name = format!("lockbroker-test-{}", std::process::id());
    let out = Command::new(BIN)
        .args(["--install-service", "--service-name", &name, "--socket"])
        .arg(&pipe)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && err.contains("os error 5") {
        eprintln!("skipped: this user may not install services ({err})");
        return;
    }
    assert!(out.status.success(), "{err}");
    /// Removes the service whatever happens to the test.
    struct Installed<'a>(&'a str);
    impl Drop for Installed<'_> {
        fn drop(&mut self) {
            let _ = Command::new(BIN)
                .args(["--uninstall-service", "--service-name", self.0])
                .output();
        }
    }
    let installed = Installed(&name);
    let started = sc(&["start", &name]);
    assert!(started.status.success(), "{started:?}");
    runtime().block_on(bounded(async {
        let connector = lockbroker::Connector::new().socket(&pipe);
        // The service listens a moment after the manager reports it
        // started: only connecting can tell.
        lockbroker_tests::harness::wait_until("the service serves", || async {
            connector.connect().await.is_ok()
        })
        .await;
        let mut raw = hold_over_raw(&pipe, "held").await;
        let stopped = sc(&["stop", &name]);
        assert!(stopped.status.success(), "{stopped:?}");
        let event = raw.recv().await.expect("an event before the close");
        assert_eq!(event, ServerMessage::Event(Event::ShuttingDown));
        raw.assert_closed().await;
    }));
    drop(installed);
    let gone = sc(&["query", &name]);
    assert!(
        !gone.status.success(),
        "the service is still there: {gone:?}"
    );
}

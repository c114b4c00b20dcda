//! The `lockbrokerd` binary: signals, exit codes, one daemon per socket,
//! stale sockets, and the per-user directory checks.

use lockbroker_tests::harness::hold_over_raw;
use lockbroker_tests::unix::{signal, wait_exit};

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lockbroker_proto::{Event, ServerMessage};

use super::BIN;

fn daemon(args: &[&str], runtime_dir: Option<&Path>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("LOCKBROKER_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match runtime_dir {
        Some(dir) => cmd.env("XDG_RUNTIME_DIR", dir),
        None => cmd.env_remove("XDG_RUNTIME_DIR"),
    };
    cmd
}

/// Waits until `socket` accepts connections, or the daemon exits (fails).
fn wait_ready(child: &mut Child, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if StdStream::connect(socket).is_ok() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("daemon exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "daemon never listened on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts a daemon on `socket` and waits until it listens.
fn serve(socket: &Path) -> Child {
    let mut child = daemon(&["--socket", &sock_arg(socket)], None)
        .spawn()
        .unwrap();
    wait_ready(&mut child, socket);
    child
}

/// Runs a daemon that is expected to refuse to start; returns its output.
fn refused(args: &[&str], runtime_dir: Option<&Path>) -> Output {
    let out = daemon(args, runtime_dir).output().unwrap();
    assert!(
        !out.status.success(),
        "daemon started but should have refused"
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sock_arg(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

#[test]
fn sigterm_tells_sessions_releases_and_exits_0_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let mut child = serve(&socket);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut raw = hold_over_raw(&socket, "held").await;

        let signalled = Instant::now();
        assert!(signal(child.id(), libc::SIGTERM));
        let event = raw.recv().await.expect("an event before the close");
        assert_eq!(event, ServerMessage::Event(Event::ShuttingDown));
        raw.assert_closed().await;
        let status = wait_exit(&mut child, Duration::from_secs(5));
        let took = signalled.elapsed();
        assert!(status.success(), "exit status {status}");
        assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
    });
    assert!(!socket.exists(), "socket file left behind");
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let mut child = serve(&socket);
    assert!(signal(child.id(), libc::SIGINT));
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
    assert!(!socket.exists());
}

/// A signal at the first moment the socket exists still shuts the daemon
/// down cleanly: the handlers are installed before the socket is bound.
#[test]
fn a_signal_right_after_start_always_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let mut unclean = Vec::new();
    for round in 0..100 {
        let mut child = daemon(&["--socket", &sock_arg(&socket)], None)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // The earliest moment a client could connect: the socket file exists.
        while !socket.exists() {
            assert!(Instant::now() < deadline, "round {round}: no socket");
            assert!(
                child.try_wait().unwrap().is_none(),
                "round {round}: daemon exited"
            );
            std::thread::yield_now();
        }
        let sig = if round % 2 == 0 {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        assert!(signal(child.id(), sig));
        let status = wait_exit(&mut child, Duration::from_secs(5));
        if !status.success() || socket.exists() {
            unclean.push((round, status, socket.exists()));
            let _ = std::fs::remove_file(&socket);
        }
    }
    assert!(
        unclean.is_empty(),
        "unclean exits (round, status, socket left): {unclean:?}"
    );
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let mut first = serve(&socket);
    let out = refused(&["--socket", &sock_arg(&socket)], None);
    let msg = stderr(&out);
    assert!(msg.contains("already serving"), "{msg}");
    // Its own exit status, so that whoever started it can tell "connect to
    // the other one" from a failure.
    assert_eq!(out.status.code(), Some(3), "{msg}");
    assert_eq!(msg.lines().count(), 1, "one clear line: {msg}");
    // The first one is undisturbed.
    assert!(StdStream::connect(&socket).is_ok());
    assert!(signal(first.id(), libc::SIGTERM));
    assert!(wait_exit(&mut first, Duration::from_secs(5)).success());
}

#[test]
fn a_stale_socket_of_a_killed_daemon_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let mut first = serve(&socket);
    assert!(signal(first.id(), libc::SIGKILL));
    first.wait().unwrap();
    assert!(socket.exists(), "SIGKILL leaves the socket file");
    let mut second = serve(&socket);
    assert!(signal(second.id(), libc::SIGTERM));
    assert!(wait_exit(&mut second, Duration::from_secs(5)).success());
}

#[test]
fn a_non_socket_file_in_the_way_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sock");
    std::fs::write(&path, "precious").unwrap();
    let out = refused(&["--socket", &sock_arg(&path)], None);
    assert!(stderr(&out).contains("not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

/// The local scope creates `$XDG_RUNTIME_DIR/lockbroker` with mode 0700.
#[test]
fn the_local_scope_creates_a_private_directory() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = runtime.path().join("lockbroker");
    let socket = dir.join("broker.sock");
    let mut child = daemon(&[], Some(runtime.path())).spawn().unwrap();
    wait_ready(&mut child, &socket);
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let sock_mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(sock_mode, 0o600);
    assert!(signal(child.id(), libc::SIGTERM));
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
}

fn scope_dir(runtime: &Path) -> PathBuf {
    runtime.join("lockbroker")
}

#[test]
fn a_directory_with_a_loose_mode_is_refused() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = scope_dir(runtime.path());
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = refused(&[], Some(runtime.path()));
    assert!(stderr(&out).contains("mode is 0755"), "{}", stderr(&out));
    assert!(!dir.join("broker.sock").exists());
}

#[test]
fn a_symlinked_directory_is_refused() {
    let runtime = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::set_permissions(elsewhere.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), scope_dir(runtime.path())).unwrap();
    let out = refused(&[], Some(runtime.path()));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
}

/// Needs root to give the directory to another user; skipped otherwise.
#[test]
fn a_directory_owned_by_another_user_is_refused() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing a directory's owner needs root");
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let dir = scope_dir(runtime.path());
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 65534);
    let out = refused(&[], Some(runtime.path()));
    assert!(
        stderr(&out).contains("owned by uid 65534"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_flags_are_refused_with_one_line() {
    let out = refused(
        &["--max-frame-len", "10", "--socket", "/nonexistent/x.sock"],
        None,
    );
    let msg = stderr(&out);
    assert!(msg.contains("--max-frame-len"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert_eq!(out.status.code(), Some(1), "{msg}");
}

#[test]
fn a_bad_metrics_address_is_refused_with_what_was_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let socket = sock_arg(&dir.path().join("broker.sock"));
    let out = refused(
        &["--socket", &socket, "--metrics-listen", "localhost"],
        None,
    );
    let msg = stderr(&out);
    assert!(msg.contains("neither an IP address and port"), "{msg}");
    assert_eq!(out.status.code(), Some(2), "a usage error: {msg}");
    // A port another program has: the start fails, and the lock socket is
    // not left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let out = refused(&["--socket", &socket, "--metrics-listen", &port], None);
    let msg = stderr(&out);
    assert!(msg.contains("binding the metrics address"), "{msg}");
    assert!(msg.contains(&port), "{msg}");
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(!dir.path().join("broker.sock").exists());
}

#[test]
fn the_help_documents_the_exit_statuses() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("3 when another lockbrokerd"), "{help}");
}

/// The socket takes connections only once it has its final mode: a client
/// that gets in has reached the daemon through a socket other users cannot
/// open, and a daemon whose socket is moved once it answers keeps serving.
/// The daemons run with umask 0, so the mode the bind gives is 0777, and
/// the client connects as fast as it can to catch the first moment.
#[test]
fn the_socket_answers_only_once_its_mode_is_set() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    for round in 0..40 {
        let socket = dir.path().join(format!("broker-{round}.sock"));
        let mut cmd = daemon(&["--socket", &sock_arg(&socket)], None);
        // SAFETY: umask is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let _first = loop {
            if let Ok(stream) = StdStream::connect(&socket) {
                break stream;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("daemon exited early with {status}");
            }
            assert!(Instant::now() < deadline, "daemon never listened");
            std::thread::yield_now();
        };
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "round {round}: answered with mode {mode:o}");
        let moved = dir.path().join(format!("moved-{round}.sock"));
        std::fs::rename(&socket, &moved).unwrap();
        assert!(StdStream::connect(&moved).is_ok(), "round {round}");
        assert!(signal(child.id(), libc::SIGTERM));
        assert!(
            wait_exit(&mut child, Duration::from_secs(5)).success(),
            "round {round}"
        );
    }
}

/// What an operator chases is logged at warn level with the lock or key
/// and who: a limit refusal, a quota hit, and a session that ended
/// holding locks (its pid and the names). A shutdown, where every session
/// ends holding what it held, is not reported as abandonment.
#[test]
fn limits_quotas_and_abandonment_are_warnings_naming_who_and_what() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let mut child = daemon(
        &[
            "--socket",
            &sock_arg(&socket),
            "--log-level",
            "warn",
            "--max-holds",
            "1",
            "--state-keys-per-user",
            "1",
        ],
        None,
    )
    .spawn()
    .unwrap();
    wait_ready(&mut child, &socket);
    let connector = lockbroker::Connector::new().socket(&socket);
    let client = lockbroker::blocking::Client::connect_with(&connector).unwrap();
    let _a = client.mutex("limits/a").acquire().unwrap();
    let err = client.mutex("limits/b").acquire().unwrap_err();
    assert_eq!(err.code(), Some(lockbroker::ErrorCode::TooManyHolds));
    let state = client.state();
    state.set("quota/one", "1").unwrap();
    let err = state.set("quota/two", "2").unwrap_err();
    assert_eq!(err.code(), Some(lockbroker::ErrorCode::QuotaExceeded));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let holder = hold_over_raw(&socket, "left/held").await;
        drop(holder);
        // Granted once the dead session's cleanup has run, which logs.
        let next = lockbroker::Connector::new()
            .socket(&socket)
            .connect()
            .await
            .unwrap();
        let guard = next.mutex("left/held").acquire().await.unwrap();
        assert!(guard.abandoned());
        // Held at the shutdown: no warning for this one.
        let other = lockbroker::Connector::new()
            .socket(&socket)
            .connect()
            .await
            .unwrap();
        std::mem::forget(other.mutex("left/at-shutdown").acquire().await.unwrap());
        assert!(signal(child.id(), libc::SIGTERM));
        wait_exit(&mut child, Duration::from_secs(5));
    });
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    let line = |what: &str| {
        log.lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line with {what:?} in\n{log}"))
    };
    let me = format!("pid={}", std::process::id());
    let limit = line("too_many_holds");
    assert!(
        limit.contains("WARN") && limit.contains("\"limits/b\"") && limit.contains(&me),
        "{limit}"
    );
    let quota = line("quota_exceeded");
    assert!(
        quota.contains("WARN") && quota.contains("\"quota/two\"") && quota.contains(&me),
        "{quota}"
    );
    let abandoned = line("abandoned:");
    assert!(
        abandoned.contains("WARN")
            && abandoned.contains("\"left/held\"")
            && abandoned.contains(&me),
        "{abandoned}"
    );
    assert!(!log.contains("left/at-shutdown"), "{log}");
}

/// `--log-file` keeps the log under its bound for the daemon's whole
/// life: many sessions logging at debug level turn it over several
/// times, and only the file and one old one are left, each within the
/// bound. What the daemon says on its way out (here: that it stops) is in
/// the current file.
#[test]
fn a_log_file_turns_over_at_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let log = dir.path().join("daemon.log");
    let mut child = daemon(
        &[
            "--socket",
            &sock_arg(&socket),
            "--log-level",
            "debug",
            "--log-file",
            &sock_arg(&log),
            "--log-file-max",
            "4096",
        ],
        None,
    )
    .spawn()
    .unwrap();
    wait_ready(&mut child, &socket);
    let connector = lockbroker::Connector::new().socket(&socket);
    for _ in 0..200 {
        let client = lockbroker::blocking::Client::connect_with(&connector).unwrap();
        client.ping().unwrap();
    }
    assert!(signal(child.id(), libc::SIGTERM));
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(stderr, "", "everything goes to the log file");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("daemon.log"))
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["daemon.log", "daemon.log.1"]);
    let old = std::fs::read_to_string(dir.path().join("daemon.log.1")).unwrap();
    let now = std::fs::read_to_string(&log).unwrap();
    assert!(old.len() <= 4096 && old.len() > 3000, "{} bytes", old.len());
    assert!(now.len() <= 4096, "{} bytes", now.len());
    assert!(
        old.lines().all(|l| l.contains("lockbrokerd")),
        "whole lines: {old}"
    );
    assert!(now.contains("shutting down"), "{now}");
}

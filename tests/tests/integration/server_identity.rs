//! The Rust client refuses a daemon another user could be posing as: a
//! local-scope directory that is not the user's or is open to others, and
//! a daemon (on any address) whose peer credentials name an unexpected
//! user, unless the caller opts in with `Connector::allow_server_uid`.
//!
//! The other user is `nobody` (65534): the tests run daemons, or the
//! client, as nobody when they run as root, and skip those parts otherwise
//! (saying so on stderr). Local-scope cases run `lb-worker ping` (the
//! blocking client) in a child with its own `XDG_RUNTIME_DIR`, since the
//! scope default is read from the environment.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lockbroker::Connector;
use lockbroker::address::{Expected, Problem};

use lockbroker_tests::unix::{NOBODY, as_nobody, can_be_nobody, chmod, euid, local_dir};

use crate::util::{bounded, daemon_bin, worker};

/// A temporary directory, mode `mode`, owned by `owner`.
fn dir_of(owner: u32, mode: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), mode);
    std::os::unix::fs::chown(dir.path(), Some(owner), Some(owner)).unwrap();
    dir
}

/// A `lockbrokerd` child, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `lockbrokerd --socket SOCKET`, as nobody when `nobody`, and
/// waits until it listens.
fn daemon(socket: &Path, nobody: bool) -> Daemon {
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("--socket")
        .arg(socket)
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if nobody {
        as_nobody(&mut cmd);
    }
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start {} (as nobody: {nobody}; the target directory must be \
             readable by nobody): {e}",
            daemon_bin().display()
        )
    });
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(daemon.0.try_wait().unwrap().is_none(), "lockbrokerd exited");
        assert!(Instant::now() < deadline, "lockbrokerd never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon
}

/// Runs `lb-worker ping ALLOWED...` with `XDG_RUNTIME_DIR=runtime` (and
/// `LOCKBROKER_SOCKET=socket` if given), as nobody when `nobody`.
fn ping(runtime: &Path, socket: Option<&Path>, allowed: &[u32], nobody: bool) -> Output {
    let mut cmd = Command::new(worker());
    cmd.arg("ping")
        .args(allowed.iter().map(u32::to_string))
        .env("XDG_RUNTIME_DIR", runtime)
        .env_remove("LOCKBROKER_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(socket) = socket {
        cmd.env("LOCKBROKER_SOCKET", socket);
    }
    if nobody {
        as_nobody(&mut cmd);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lb-worker ping did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

/// `lb-worker ping`'s verdict: `ok`, or `untrusted PROBLEM OWNER PATH`.
fn verdict(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) | Some(3) => stdout,
        _ => panic!("lb-worker ping failed ({}): {stderr}", out.status),
    }
}

#[tokio::test]
async fn an_explicit_socket_served_by_another_user_is_refused_unless_allowed() {
    if !can_be_nobody("the explicit socket of another user") {
        return;
    }
    bounded(async {
        let dir = dir_of(NOBODY, 0o700);
        let socket = dir.path().join("broker.sock");
        let _attacker = daemon(&socket, true);
        let connector = Connector::new()
            .socket(&socket)
            .timeout(Duration::from_secs(10));
        let err = connector.connect().await.unwrap_err();
        let lockbroker::Error::Untrusted(u) = &err else {
            panic!("expected Untrusted, got {err:?}");
        };
        assert_eq!(u.problem, Problem::Server);
        assert_eq!((u.owner, u.path.as_path()), (NOBODY, socket.as_path()));
        assert_eq!(u.expected, Expected::new([0, euid()]));
        let message = err.to_string();
        assert!(message.contains("runs as uid 65534"), "{message}");
        assert!(message.contains(&socket.display().to_string()), "{message}");

        let client = connector.allow_server_uid(NOBODY).connect().await.unwrap();
        client.ping().await.unwrap();
    })
    .await;

    // The same through LOCKBROKER_SOCKET and the blocking client.
    let dir = dir_of(NOBODY, 0o700);
    let socket = dir.path().join("broker.sock");
    let _attacker = daemon(&socket, true);
    let runtime = tempfile::tempdir().unwrap();
    let out = ping(runtime.path(), Some(&socket), &[], false);
    assert_eq!(
        verdict(&out),
        format!("untrusted Server {NOBODY} {}", socket.display())
    );
    let out = ping(runtime.path(), Some(&socket), &[NOBODY], false);
    assert_eq!(verdict(&out), "ok");
}

#[test]
fn a_local_directory_owned_by_another_user_is_refused() {
    if !can_be_nobody("a local directory owned by another user") {
        return;
    }
    // The attack: nobody made the victim's scope directory first and
    // serves a daemon there.
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), NOBODY, 0o700);
    let _attacker = daemon(&dir.join("broker.sock"), true);
    let out = ping(runtime.path(), None, &[], false);
    assert_eq!(
        verdict(&out),
        format!("untrusted Owner {NOBODY} {}", dir.display())
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "directory {} is owned by uid 65534, expected uid {}",
            dir.display(),
            euid()
        )),
        "{stderr}"
    );
    // Trusting nobody as a server does not make its directory ours.
    assert!(verdict(&ping(runtime.path(), None, &[NOBODY], false)).starts_with("untrusted Owner"));
}

#[test]
fn a_local_directory_open_to_others_is_refused() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), euid(), 0o777);
    // Anybody could have put the socket there; as root, nobody does.
    let nobody = can_be_nobody("running the daemon in the open directory as nobody");
    let _daemon = daemon(&dir.join("broker.sock"), nobody);
    let out = ping(runtime.path(), None, &[], false);
    assert_eq!(
        verdict(&out),
        format!(
            "untrusted Mode {{ mode: {}, required: {} }} {} {}",
            0o777,
            0o700,
            euid(),
            dir.display()
        )
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("its mode is 0777"), "{stderr}");
}

#[test]
fn a_daemon_of_another_user_in_the_users_own_directory_is_refused() {
    if !can_be_nobody("a socket of another user in the user's directory") {
        return;
    }
    // The directory passes; only the peer credentials tell. nobody binds
    // in its own directory and root moves the socket into its own.
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), euid(), 0o700);
    let theirs = dir_of(NOBODY, 0o700);
    let _attacker = daemon(&theirs.path().join("broker.sock"), true);
    let socket = dir.join("broker.sock");
    std::fs::rename(theirs.path().join("broker.sock"), &socket).unwrap();
    let out = ping(runtime.path(), None, &[], false);
    assert_eq!(
        verdict(&out),
        format!("untrusted Server {NOBODY} {}", socket.display())
    );
    assert_eq!(verdict(&ping(runtime.path(), None, &[NOBODY], false)), "ok");
}

#[test]
fn a_same_user_local_daemon_is_accepted() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), euid(), 0o700);
    let _daemon = daemon(&dir.join("broker.sock"), false);
    assert_eq!(verdict(&ping(runtime.path(), None, &[], false)), "ok");

    if !can_be_nobody("the same checks for an unprivileged user") {
        return;
    }
    // nobody's own daemon in nobody's own directory.
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), NOBODY, 0o700);
    let _theirs = daemon(&dir.join("broker.sock"), true);
    assert_eq!(verdict(&ping(runtime.path(), None, &[], true)), "ok");
}

#[test]
fn an_unprivileged_client_refuses_a_directory_of_another_user() {
    if !can_be_nobody("running the client as nobody") {
        return;
    }
    // nobody's scope directory made by root, with root's daemon in it.
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), 0, 0o700);
    let _daemon = daemon(&dir.join("broker.sock"), false);
    let out = ping(runtime.path(), None, &[], true);
    assert_eq!(
        verdict(&out),
        format!("untrusted Owner 0 {}", dir.display())
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected uid 65534"), "{stderr}");
}

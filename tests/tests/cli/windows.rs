//! The CLI on Windows (under Wine in CI), with `lb-worker` as the command
//! where the Unix tests run `sh -c` scripts. Each test names its Unix
//! counterpart in `unix.rs`.
//!
//! The tests that are the same on both platforms are in `both.rs`. Unix
//! tests without a counterpart here: the file counter of 8 processes
//! (`sh` loops; the same exclusion is raced by the storm below and by the
//! integration suite's counter, which runs on both), `sigterm_to_lockbroker`
//! (signals), the autostart races on a lock file and a symlinked log (the
//! pipe's one-daemon guarantee is the twenty-first-uses test below and the
//! daemon tests'), `lockbroker daemon` in the foreground (stopped by
//! SIGTERM; its clean stop on Windows is the daemon tests' console and
//! service tests), and the directory-trust tests (the pipe's counterpart
//! is the server check, tested in the integration and unit tests).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::{CLI, DAEMON, Daemon, WORKER, finish, read_pid, run, wait_until};
use lockbroker_tests::harness::wait_exit;
use lockbroker_tests::windows::{alive, kill};

/// `lockbroker`'s exit status for a lost lock (README).
const LOCK_LOST: i32 = 76;

/// Counterpart of `lock_runs_the_command_with_its_environment_and_passes_its_status`.
#[test]
fn lock_runs_the_command_with_its_environment_and_passes_its_status() {
    let d = Daemon::start();
    let out = run(&mut d.lock(
        &["job"],
        &[
            "env",
            "LOCKBROKER_LOCK",
            "LOCKBROKER_FENCE",
            "LOCKBROKER_ABANDONED",
        ],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("LOCKBROKER_LOCK=job"), "{stdout}");
    assert!(stdout.contains("LOCKBROKER_FENCE=1"), "{stdout}");
    assert!(stdout.contains("LOCKBROKER_ABANDONED unset"), "{stdout}");
    // The command's status is passed on (lb-worker's usage error is 1).
    let out = run(&mut d.lock(&["job"], &["no-such-subcommand"]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // A command that cannot be found: 127, as shells say.
    let out = run(d.cli().args(["lock", "job", "--", "no-such-program-here"]));
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(d.is_free("job"), "every run released the lock");
}

/// Counterpart of `killing_the_wrapper_leaves_the_lock_with_the_command_tree`:
/// `taskkill /F` of lockbroker leaves the lock with the command, which
/// inherited the lock's pipe handle; the lock ends when the command does.
#[test]
fn killing_the_wrapper_leaves_the_lock_with_the_command() {
    let d = Daemon::start();
    let pidfile = d.path("command.pid");
    let mut wrapper = d
        .lock(&["k"], &["pidfile", pidfile.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let command = read_pid(&pidfile);
    wrapper.kill().unwrap();
    wait_exit(&mut wrapper, Duration::from_secs(20));
    assert!(alive(command), "the command outlives its wrapper");
    assert!(!d.is_free("k"), "the command still holds the lock");
    assert!(kill(command));
    wait_until("the lock is free", || d.is_free("k"));
}

/// Counterpart of `what_the_command_leaves_running_keeps_the_lock_unless_close`,
/// for what differs on Windows: the command's copy of the pipe handle is
/// not inherited, so what it leaves running does not keep the lock (as
/// with `--close`), with or without `-o`.
#[test]
fn what_the_command_leaves_running_does_not_keep_the_lock() {
    let d = Daemon::start();
    for (i, flags) in [&["x"][..], &["-o", "x"][..]].into_iter().enumerate() {
        let pidfile = d.path(&format!("left{i}.pid"));
        // Not piped: the process left running inherits every inheritable
        // handle of the command, its output pipes among them.
        let mut wrapper = d
            .lock(flags, &["leave", pidfile.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_exit(&mut wrapper, Duration::from_secs(20)).success());
        let left = read_pid(&pidfile);
        assert!(alive(left), "the command left a process running");
        assert!(d.is_free("x"), "{flags:?}: nothing holds x");
        assert!(kill(left));
    }
}

/// Counterpart of `losing_the_lock_terminates_the_command_group`: the
/// daemon dies, lockbroker terminates the command's whole job (a process
/// the command started included) after `--kill-grace`, and exits 76.
#[test]
fn losing_the_lock_terminates_the_whole_job() {
    let mut d = Daemon::start();
    let pidfile = d.path("tree.pid");
    let wrapper = d
        .lock(
            &["--kill-grace", "200ms", "lost"],
            &["tree", pidfile.to_str().unwrap()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let command = read_pid(&pidfile);
    let grandchild = read_pid(&d.path("tree.pid.child"));
    assert!(alive(command) && alive(grandchild));
    d.process.kill();
    let out = finish(wrapper);
    assert_eq!(out.status.code(), Some(LOCK_LOST), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lost the lock"), "{stderr}");
    wait_until("the command and its child are gone", || {
        !alive(command) && !alive(grandchild)
    });
}

/// Counterpart of `a_storm_of_killed_wrappers_never_lets_two_holders_in`:
/// wrappers killed at random moments (connecting, waiting, holding) never
/// let two commands into the critical section at once.
#[test]
fn a_storm_of_killed_wrappers_never_lets_two_holders_in() {
    const WRAPPERS: usize = 8;
    const STORM: Duration = Duration::from_secs(8);
    let d = Daemon::start();
    let marker = d.path("marker");
    let marker = marker.to_str().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("storm seed {seed}");
    let deadline = Instant::now() + STORM;
    let (killed, granted, overlaps, unstarted) = (
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    );
    std::thread::scope(|scope| {
        for slot in 0..WRAPPERS {
            let (d, killed, granted, overlaps, unstarted) =
                (&d, &killed, &granted, &overlaps, &unstarted);
            scope.spawn(move || {
                let mut rng = seed.wrapping_mul(slot as u64 + 1) | 1;
                let mut below = |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                while Instant::now() < deadline {
                    let spawned = d
                        .lock(&["--timeout", "60s", "storm"], &["critical", marker])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn();
                    // Wine's CreateProcess itself fails now and then amid
                    // this many kills ("Internal error", 1359, with a
                    // wineserver sendmsg error): that wrapper never ran,
                    // which is no run of lockbroker; the storm goes on, and
                    // the counts below still demand enough that did.
                    let mut w = match spawned {
                        Ok(w) => w,
                        Err(e) => {
                            eprintln!("a wrapper could not be started: {e}");
                            unstarted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                    };
                    let victim = below(3) == 0;
                    if victim {
                        std::thread::sleep(Duration::from_millis(below(400)));
                        let _ = w.kill();
                        killed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let status = wait_exit(&mut w, Duration::from_secs(120));
                    match status.code() {
                        Some(0) => {
                            granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Some(2) => {
                            overlaps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    // The commands of killed wrappers may still run: wait until the lock
    // is free, then look for a marker left by two holders at once.
    wait_until("every command is gone", || d.is_free("storm"));
    let (killed, granted) = (killed.into_inner(), granted.into_inner());
    let unstarted = unstarted.into_inner();
    eprintln!("{granted} grants seen, {killed} wrappers killed, {unstarted} not started");
    assert!(
        unstarted <= granted,
        "most wrappers must start: {unstarted} did not"
    );
    assert_eq!(overlaps.into_inner(), 0, "two holders at once");
    assert!(
        !Path::new(marker).exists(),
        "a critical section left its marker"
    );
    assert!(granted >= 20 && killed >= 5, "the storm did too little");
}

/// Counterpart of `run_gives_each_tree_its_own_broker_and_passes_the_status`:
/// `lockbroker run` serves its tree on a private pipe (not a file path),
/// named in `LOCKBROKER_SOCKET`.
#[test]
fn run_serves_its_tree_on_a_private_pipe() {
    let d = Daemon::start();
    let out = run(d.cli().args([
        "run",
        "--",
        CLI,
        "lock",
        "inner",
        "--",
        WORKER,
        "env",
        "LOCKBROKER_SOCKET",
        "LOCKBROKER_FENCE",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?} {stdout}");
    assert!(
        stdout.contains(r"LOCKBROKER_SOCKET=\\.\pipe\lockbroker-"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&d.socket().display().to_string()),
        "{stdout}"
    );
    assert!(stdout.contains("LOCKBROKER_FENCE=1"), "{stdout}");
    let out = run(d.cli().args(["run", "--", WORKER, "no-such-subcommand"]));
    assert_eq!(out.status.code(), Some(1), "the status is passed on");
}

/// Counterpart of `twenty_first_uses_at_once_start_exactly_one_daemon`: the
/// local scope's daemon is autostarted (detached, its log in
/// `%LOCALAPPDATA%\lockbroker`), once, whatever the number of first uses
/// racing; then stopped.
#[test]
fn twenty_first_uses_at_once_start_exactly_one_daemon() {
    let home = tempfile::tempdir().unwrap();
    // A user name of its own makes a local pipe of its own.
    let user = format!("lbtest{}", std::process::id());
    let tool = |args: &[&str]| {
        let mut cmd = Command::new(CLI);
        cmd.args(args)
            .env_remove("LOCKBROKER_SOCKET")
            .env("USERNAME", &user)
            .env("LOCALAPPDATA", home.path())
            .env("LOCKBROKERD", DAEMON)
            .stdin(Stdio::null());
        cmd
    };
    let users: Vec<Child> = (0..20)
        .map(|_| {
            tool(&["ping"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for user in users {
        let out = finish(user);
        assert!(out.status.success(), "{out:?}");
    }
    let out = run(&mut tool(&["status", "--json"]));
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = status["daemon"]["pid"].as_u64().unwrap() as u32;
    // Every first use talked to that one daemon: a second `ping` now
    // starts none (the log says "listening" once).
    let log = home.path().join("lockbroker").join("broker.log");
    let listening = std::fs::read_to_string(&log)
        .unwrap()
        .matches("listening")
        .count();
    assert_eq!(listening, 1, "{}", std::fs::read_to_string(&log).unwrap());
    assert!(kill(pid));
}

/// Counterpart of `status_json_lists_holder_pid_and_waiters_in_order`, for
/// what differs on Windows: a session's user is the account its process
/// runs as (the protocol's `uid` is the number of its SID).
#[test]
fn status_names_the_account_of_each_session() {
    let d = Daemon::start();
    let pidfile = d.path("holder.pid");
    let mut holder = d
        .lock(&["st"], &["pidfile", pidfile.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let command = read_pid(&pidfile);
    let me = lockbroker::address::current_identity().unwrap();
    let out = run(d.cli().args(["status", "--json", "st"]));
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let session = &status["locks"][0]["holders"][0];
    assert_eq!(session["user"], me.account.as_str(), "{status}");
    assert_eq!(session["uid"], me.uid.unwrap(), "{status}");
    let out = run(d
        .cli()
        .args(["status", "-o", "USER", "--no-headings", "st"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), me.account, "{text}");
    assert!(kill(command));
    wait_exit(&mut holder, Duration::from_secs(20));
}

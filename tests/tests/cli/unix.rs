//! The CLI on Unix: these use `sh -c` scripts as the commands, signals,
//! `/proc`, socket files and directory modes. Their Windows counterparts,
//! with `lb-worker` as the command, are in `windows.rs`; what has none yet
//! is listed there.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::{CLI, DAEMON, Daemon, finish, read_pid, run, wait_until};
use lockbroker_tests::unix::{
    NOBODY, alive, as_nobody, can_be_nobody, euid, local_dir, signal, wait_exit,
};

fn sh(script: &str) -> Vec<&str> {
    vec!["--", "sh", "-c", script]
}

#[test]
fn lock_runs_the_command_with_its_environment_and_passes_its_status() {
    let d = Daemon::start();
    let out = run(d.cli().args(["lock", "job"]).args(sh(
        "echo \"$LOCKBROKER_FENCE $LOCKBROKER_HOLD ${LOCKBROKER_ABANDONED:-no}\"; exit 7",
    )));
    assert_eq!(out.status.code(), Some(7));
    let line = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{line}");
    assert!(fields[0].parse::<u64>().unwrap() > 0);
    assert!(fields[1].parse::<u64>().unwrap() > 0);
    assert_eq!(fields[2], "no");
    // A command that does not exist: 127, one line on stderr.
    let out = run(d.cli().args(["lock", "job", "--", "/nonexistent/cmd"]));
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    // The lock was released each time.
    assert_eq!(d.status_json()["locks"].as_array().unwrap().len(), 0);
}

#[test]
fn the_command_inherits_the_lock_connection_and_no_other_socket() {
    let d = Daemon::start();
    let out = run(d.cli().args(["lock", "fds"]).args(sh("ls -l /proc/$$/fd")));
    assert!(out.status.success());
    let listing = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        listing.matches("socket:").count(),
        1,
        "the command must inherit exactly the lock's connection:\n{listing}"
    );
}

/// A shell loop that waits for `file` to exist.
fn wait_for(file: &Path) -> String {
    format!("while [ ! -e {} ]; do sleep 0.01; done", file.display())
}

fn holders_and_waiters(d: &Daemon, name: &str) -> (usize, usize) {
    let status = d.status_json();
    let Some(lock) = status["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
    else {
        return (0, 0);
    };
    (
        lock["holders"].as_array().unwrap().len(),
        lock["waiters"].as_array().unwrap().len(),
    )
}

#[test]
fn killing_the_wrapper_leaves_the_lock_with_the_command_tree() {
    let d = Daemon::start();
    let (go_cmd, go_bg) = (d.path("go.cmd"), d.path("go.bg"));
    // The command starts a background child, then both wait; the
    // background child outlives the command.
    let script = format!(
        "(echo $(sh -c 'echo $PPID') > bg.pid; {}; touch bg.done) & echo $$ > cmd.pid; {}; touch cmd.done",
        wait_for(&go_bg),
        wait_for(&go_cmd)
    );
    let mut first = d
        .cli()
        .args(["lock", "x"])
        .args(sh(&script))
        .spawn()
        .unwrap();
    let cmd_pid = read_pid(&d.path("cmd.pid"));
    let bg_pid = read_pid(&d.path("bg.pid"));
    signal(first.id(), libc::SIGKILL);
    assert!(!wait_exit(&mut first, Duration::from_secs(20)).success());
    let second_script =
        "test -e cmd.done && test -e bg.done && echo \"${LOCKBROKER_ABANDONED:-no}\" > second";
    let mut second = d
        .cli()
        .args(["lock", "x"])
        .args(sh(second_script))
        .spawn()
        .unwrap();
    wait_until("the second wrapper waits", || {
        holders_and_waiters(&d, "x") == (1, 1)
    });
    // The command ends; its background child still holds the lock.
    std::fs::write(&go_cmd, "").unwrap();
    wait_until("the command exits", || !alive(cmd_pid));
    assert!(alive(bg_pid));
    assert_eq!(holders_and_waiters(&d, "x"), (1, 1));
    assert!(second.try_wait().unwrap().is_none());
    // Only once the whole tree is gone does the next holder start.
    std::fs::write(&go_bg, "").unwrap();
    assert!(wait_exit(&mut second, Duration::from_secs(20)).success());
    assert_eq!(
        std::fs::read_to_string(d.path("second")).unwrap().trim(),
        "1",
        "the next holder is told the lock was abandoned"
    );
}

#[test]
fn what_the_command_leaves_running_keeps_the_lock_unless_close() {
    let d = Daemon::start();
    let go = d.path("go");
    // The background child must not keep the test's output pipes open.
    let bg = format!(
        "({}; rm bg.pid) >/dev/null 2>&1 & echo $! > bg.pid",
        wait_for(&go)
    );
    let out = run(d.cli().args(["lock", "x"]).args(sh(&bg)));
    assert!(out.status.success());
    let busy = run(d.cli().args(["lock", "-n", "x", "--", "true"]));
    assert_eq!(busy.status.code(), Some(75), "the background child holds x");
    std::fs::write(&go, "").unwrap();
    // It ends as released, not abandoned.
    let next = run(d
        .cli()
        .args(["lock", "--timeout", "20s", "x"])
        .args(sh("echo ${LOCKBROKER_ABANDONED:-no}")));
    assert!(next.status.success());
    assert_eq!(String::from_utf8_lossy(&next.stdout).trim(), "no");
    // With -o, the lock ends with the command itself.
    std::fs::remove_file(&go).unwrap();
    let out = run(d.cli().args(["lock", "-o", "x"]).args(sh(&bg)));
    assert!(out.status.success());
    let bg_pid = read_pid(&d.path("bg.pid"));
    let free = run(d.cli().args(["lock", "-n", "x", "--", "true"]));
    assert_eq!(free.status.code(), Some(0), "-o leaves nothing holding x");
    assert!(alive(bg_pid));
    std::fs::write(&go, "").unwrap();
    // Waited for: once the directory is gone it would wait for ever.
    wait_until("the background child exits", || !alive(bg_pid));
}

/// A small xorshift generator: the storm's randomness, reproducible from
/// the seed it prints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn a_storm_of_killed_wrappers_never_lets_two_holders_in() {
    const WRAPPERS: usize = 32;
    const STORM: Duration = Duration::from_secs(10);
    let d = Daemon::start();
    // The command checks exclusion itself: O_EXCL creation of a marker
    // (`set -C`), the fence appended in grant order, and half of the time
    // the marker is removed by a background child after the command exits.
    let script = "set -C; if ! : > marker; then echo \"$LOCKBROKER_FENCE\" >> overlaps; fi; \
        echo \"$LOCKBROKER_FENCE\" >> fences; sleep 0.01; \
        if [ $((LOCKBROKER_FENCE % 2)) = 0 ]; then (sleep 0.01; rm -f marker) & else rm -f marker; fi";
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("storm seed {seed}");
    let deadline = Instant::now() + STORM;
    let killed = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        for slot in 0..WRAPPERS {
            let d = &d;
            let killed = &killed;
            scope.spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(slot as u64 + 1) | 1);
                while Instant::now() < deadline {
                    let mut w = d
                        .cli()
                        .args([
                            "lock",
                            "--timeout",
                            "60s",
                            "storm",
                            "--",
                            "sh",
                            "-c",
                            script,
                        ])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap();
                    // A third of the wrappers die at a random moment:
                    // connecting, waiting, or holding.
                    if rng.below(3) == 0 {
                        std::thread::sleep(Duration::from_millis(rng.below(40)));
                        signal(w.id(), libc::SIGKILL);
                        killed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    wait_exit(&mut w, Duration::from_secs(120));
                }
            });
        }
    });
    // Commands of killed wrappers may still run: wait until nothing holds.
    wait_until("every command tree is gone", || {
        holders_and_waiters(&d, "storm") == (0, 0)
    });
    let overlaps = std::fs::read_to_string(d.path("overlaps")).unwrap_or_default();
    assert!(
        overlaps.is_empty(),
        "two holders at once, fences:\n{overlaps}"
    );
    let fences: Vec<u64> = std::fs::read_to_string(d.path("fences"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences must increase in grant order: {fences:?}"
    );
    let killed = killed.into_inner();
    eprintln!("{} grants, {killed} wrappers killed", fences.len());
    assert!(
        fences.len() >= 50 && killed >= 10,
        "the storm did too little"
    );
}

/// A `PATH` whose first directory (made in `dir`) has `lockbroker`, the
/// tool under test, for scripts that call it by name: cargo names it
/// `lb-cli`, and the real `lockbroker` in the target directory may be stale
/// or not built at all.
fn path_with_lockbroker(dir: &Path) -> String {
    let bin = dir.join("bin");
    if !bin.exists() {
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(CLI, bin.join("lockbroker")).unwrap();
    }
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap())
}

#[test]
fn eight_processes_increment_a_counter_file_exactly() {
    let d = Daemon::start();
    std::fs::write(d.path("counter"), "0\n").unwrap();
    let script = "for i in $(seq 50); do lockbroker lock counter -- sh -c 'n=$(cat counter); echo $((n + 1)) > counter' || exit 1; done";
    let path = path_with_lockbroker(d.dir.path());
    let mut children: Vec<Child> = (0..8)
        .map(|_| {
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .env("PATH", &path)
                .env("LOCKBROKER_SOCKET", d.socket())
                .current_dir(d.dir.path())
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in &mut children {
        assert!(wait_exit(c, Duration::from_secs(120)).success());
    }
    assert_eq!(
        std::fs::read_to_string(d.path("counter")).unwrap().trim(),
        "400"
    );
}

/// Starts `lockbroker lock NAME -- sh -c 'touch READY; wait for GO'` and
/// returns once it holds the lock.
fn hold(d: &Daemon, args: &[&str], tag: &str) -> Child {
    let ready = d.path(&format!("{tag}.ready"));
    let go = d.path(&format!("{tag}.go"));
    let script = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.01; done",
        ready.display(),
        go.display()
    );
    let mut child = d.cli().args(args).args(sh(&script)).spawn().unwrap();
    wait_until(&format!("{tag} holds"), || {
        assert!(child.try_wait().unwrap().is_none(), "{tag} exited early");
        ready.exists()
    });
    child
}

fn release(d: &Daemon, mut child: Child, tag: &str) {
    std::fs::write(d.path(&format!("{tag}.go")), "").unwrap();
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}

#[test]
fn losing_the_lock_terminates_the_command_group() {
    let mut d = Daemon::start();
    // The command ignores SIGTERM and has a child of its own: the group
    // must be killed after the grace period.
    let script = "trap '' TERM; sleep 1000 & echo $! > bg; touch started; wait";
    let mut child = d
        .cli()
        .args(["lock", "--kill-grace", "200ms", "doomed"])
        .args(sh(script))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the command starts", || d.path("started").exists());
    let bg: u32 = std::fs::read_to_string(d.path("bg"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(bg));
    d.process.kill(); // the daemon dies: the lock is lost
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(76));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("lost the lock"), "{err}");
    wait_until("the command's own child is killed", || !alive(bg));
}

#[test]
fn sigterm_to_lockbroker_reaches_the_command() {
    let d = Daemon::start();
    let script =
        "trap 'echo got-term > term; exit 0' TERM; touch started; while :; do sleep 0.01; done";
    let mut child = d
        .cli()
        .args(["lock", "sig"])
        .args(sh(script))
        .spawn()
        .unwrap();
    wait_until("the command starts", || d.path("started").exists());
    signal(child.id(), libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "the command's own status");
    assert_eq!(
        std::fs::read_to_string(d.path("term")).unwrap().trim(),
        "got-term"
    );
}

#[test]
fn status_json_lists_holder_pid_and_waiters_in_order() {
    let d = Daemon::start();
    let holder = hold(&d, &["lock", "st"], "h");
    let mut waiters = Vec::new();
    for i in 0..2 {
        waiters.push(d.cli().args(["lock", "st", "--", "true"]).spawn().unwrap());
        wait_until("the waiter queues", || {
            d.status_json()["locks"][0]["waiters"]
                .as_array()
                .unwrap()
                .len()
                == i + 1
        });
    }
    let status = d.status_json();
    let lock = &status["locks"][0];
    assert_eq!(lock["name"], "st");
    assert_eq!(lock["kind"], "mutex");
    assert_eq!(lock["holders"][0]["pid"], holder.id());
    // Its host, as the system names it, and its account's name.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if !host.is_empty() {
        assert_eq!(lock["holders"][0]["host"], host.trim());
    }
    // The account's name, or null for a uid without one.
    let user = lock["holders"][0]["user"].clone();
    assert!(user.is_string() || user.is_null(), "{status}");
    let order: Vec<u64> = lock["waiters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(order, [waiters[0].id() as u64, waiters[1].id() as u64]);
    assert!(status["daemon"]["sessions"].as_u64().unwrap() >= 3);
    // The table form names the same holder (WRAPPER: the session's own
    // process).
    let table = run(d
        .cli()
        .args(["status", "-o", "STATE,WRAPPER,USER", "--no-headings"]));
    let text = String::from_utf8(table.stdout).unwrap();
    let first: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(first[..2], ["holder", &holder.id().to_string()], "{text}");
    if let Some(user) = user.as_str() {
        assert_eq!(first[2], user, "{text}");
    }
    release(&d, holder, "h");
    for mut w in waiters {
        assert!(wait_exit(&mut w, Duration::from_secs(20)).success());
    }
}

#[test]
fn twenty_first_uses_at_once_start_exactly_one_daemon() {
    let runtime = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(CLI);
        cmd.args(args)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .env("LOCKBROKERD", DAEMON)
            .env_remove("LOCKBROKER_SOCKET")
            .env_remove("LOCKBROKER_NO_AUTOSTART")
            .stdin(Stdio::null());
        cmd
    };
    let mut tools: Vec<Child> = (0..20)
        .map(|_| {
            cli(&["lock", "first", "--", "true"])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for t in &mut tools {
        let status = wait_exit(t, Duration::from_secs(60));
        let mut err = String::new();
        t.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.success(), "{status}: {err}");
    }
    let out = cli(&["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = status["daemon"]["pid"].as_u64().unwrap() as u32;
    let marker = format!("XDG_RUNTIME_DIR={}", runtime.path().display());
    let daemons = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&p| alive(p))
            .filter(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
                String::from_utf8_lossy(&cmd).contains(DAEMON)
                    && String::from_utf8_lossy(&env)
                        .split('\0')
                        .any(|v| v == marker)
            })
            .collect::<Vec<u32>>()
    };
    // Daemons that lost the race exit at once; wait for them to be gone.
    wait_until("one daemon is left", || daemons().len() == 1);
    assert_eq!(daemons(), [pid]);
    // Autostart can be turned off, and the global scope never autostarts.
    signal(pid, libc::SIGTERM);
    wait_until("the daemon exits", || !alive(pid));
    let out = cli(&["--no-autostart", "ping"]).output().unwrap();
    assert_eq!(out.status.code(), Some(69));
    let out = cli(&["ping"])
        .env("LOCKBROKER_NO_AUTOSTART", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(daemons().is_empty());
}

#[test]
fn run_gives_each_tree_its_own_broker_and_passes_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_with_lockbroker(dir.path());
    // Each tree takes the same lock name without waiting, and holds it until
    // the other tree holds it too: only possible with separate brokers.
    let tree = |me: &str, other: &str| {
        let script = format!(
            "lockbroker --scope self lock --nonblock shared -- sh -c 'touch {me}; while [ ! -e {other} ]; do sleep 0.01; done'"
        );
        Command::new(CLI)
            .args(["run", "--", "sh", "-c", &script])
            .env("PATH", &path)
            .env("LOCKBROKERD", DAEMON)
            .env_remove("LOCKBROKER_SOCKET")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut a = tree("a", "b");
    let mut b = tree("b", "a");
    assert!(wait_exit(&mut a, Duration::from_secs(60)).success());
    assert!(wait_exit(&mut b, Duration::from_secs(60)).success());
    let out = Command::new(CLI)
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "test -S \"$LOCKBROKER_SOCKET\" && exit 7",
        ])
        .env("LOCKBROKERD", DAEMON)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    // Outside `run`, the self scope has no daemon.
    let out = Command::new(CLI)
        .args(["--scope", "self", "ping"])
        .env_remove("LOCKBROKER_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOCKBROKER_SOCKET"));
}

#[test]
fn lockbroker_daemon_runs_lockbrokerd_in_the_foreground() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fg.sock");
    let mut child = Command::new(CLI)
        .arg("--socket")
        .arg(&socket)
        .args(["daemon", "--log-level", "warn"])
        .env("LOCKBROKERD", DAEMON)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the daemon listens", || {
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let out = Command::new(CLI)
        .arg("--socket")
        .arg(&socket)
        .arg("ping")
        .output()
        .unwrap();
    assert!(out.status.success());
    signal(child.id(), libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    assert!(!socket.exists());
}

/// A runtime directory with the local scope's directory in it, 0700.
fn local_scope() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let runtime = tempfile::tempdir().unwrap();
    let dir = runtime.path().join("lockbroker");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    (runtime, dir)
}

/// Stops the daemon the tool autostarted on the local scope of
/// `runtime`, found through `status`, and waits until it is gone.
fn stop_autostarted(runtime: &Path) {
    let status = run(Command::new(CLI)
        .args(["status", "--json"])
        .env("XDG_RUNTIME_DIR", runtime)
        .env("LOCKBROKER_NO_AUTOSTART", "1")
        .env_remove("LOCKBROKER_SOCKET"));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let pid = status["daemon"]["pid"].as_u64().unwrap() as u32;
    assert!(signal(pid, libc::SIGTERM));
    wait_until("the autostarted daemon exits", || !alive(pid));
}

/// `lockbroker ping` on the local scope of `runtime`, autostart allowed.
fn autostarting_ping(runtime: &Path) -> Command {
    let mut cmd = Command::new(CLI);
    cmd.arg("ping")
        .env("XDG_RUNTIME_DIR", runtime)
        .env("LOCKBROKERD", DAEMON)
        .env_remove("LOCKBROKER_SOCKET")
        .env_remove("LOCKBROKER_NO_AUTOSTART")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn an_autostarted_daemon_that_cannot_start_is_reported_at_once() {
    // A file in the socket's place: the client finds nobody listening and
    // starts the daemon, which refuses to replace it and exits.
    let (runtime, dir) = local_scope();
    std::fs::write(dir.join("broker.sock"), "").unwrap();
    let started = Instant::now();
    let out = run(&mut autostarting_ping(runtime.path()));
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("lockbrokerd: refusing to replace") && err.contains("is not a socket"),
        "the daemon's own error: {err}"
    );
    // A bound on the failure mode (the start timeout is 10 s), not a
    // synchronisation.
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn autostart_waits_for_the_daemon_that_won_the_race() {
    use std::os::fd::AsRawFd;
    let (runtime, dir) = local_scope();
    // Stand in for a daemon that has won the race (it holds the lock file)
    // but does not listen yet: the tool's own daemon loses and exits 3,
    // which is no reason to give up.
    let lock = std::fs::File::create(dir.join("broker.sock.lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let tool = autostarting_ping(runtime.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = dir.join("broker.log");
    wait_until("the tool's daemon lost the race", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("already serving"))
    });
    // Now the winner comes up; the tool, still waiting, connects to it.
    drop(lock);
    let mut winner = Command::new(DAEMON)
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env_remove("LOCKBROKER_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = finish(tool);
    signal(winner.id(), libc::SIGTERM);
    assert!(wait_exit(&mut winner, Duration::from_secs(10)).success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {err}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("answered"));
}

#[test]
fn run_reports_a_private_daemon_that_cannot_start_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A real lockbrokerd given a flag value it refuses. The script is
    // written by another process: a descriptor open for writing in this
    // one could leak into a concurrent test's child and make exec fail
    // with ETXTBSY.
    let wrapper = dir.path().join("lockbrokerd");
    let status = Command::new("sh")
        .args([
            "-c",
            r#"printf '#!/bin/sh\nexec "%s" "$@" --max-frame-len 10\n' "$0" > "$1" && chmod 755 "$1""#,
        ])
        .arg(DAEMON)
        .arg(&wrapper)
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let out = run(Command::new(CLI)
        .args(["run", "--", "true"])
        .env("LOCKBROKERD", &wrapper)
        .env_remove("LOCKBROKER_SOCKET")
        .stdin(Stdio::null()));
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    // One line: lockbroker's, quoting the daemon's own error.
    assert!(
        err.starts_with("lockbroker: the private lockbrokerd could not start"),
        "{err}"
    );
    assert!(err.contains("lockbrokerd: --max-frame-len"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // A bound on the failure mode (the start timeout is 10 s), not a
    // synchronisation.
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// A `lockbroker` under `lockbroker lock` that autostarts the local
/// scope's daemon must not hand that daemon the lock's connection: the
/// lock ends with the command, not with a daemon that outlives it.
#[test]
fn a_daemon_autostarted_under_a_lock_does_not_keep_it() {
    let d = Daemon::start();
    let (runtime, _dir) = local_scope();
    let out = run(d
        .cli()
        .env_remove("LOCKBROKER_SOCKET")
        .env_remove("LOCKBROKER_NO_AUTOSTART")
        .env("XDG_RUNTIME_DIR", runtime.path())
        .arg("--socket")
        .arg(d.socket())
        .args(["lock", "x", "--", CLI, "ping"]));
    let free = run(d.cli().args(["lock", "-n", "x", "--", "true"]));
    // Stop the autostarted daemon before judging.
    stop_autostarted(runtime.path());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(free.status.code(), Some(0), "the daemon kept the lock");
}

/// Nor does `lockbroker run`'s private daemon get the lock's connection,
/// which the command under `run` inherited: its socket is not among the
/// daemon's descriptors.
#[test]
fn a_private_daemon_under_a_lock_does_not_get_it() {
    let d = Daemon::start();
    let script = r#"
        for f in /proc/$$/fd/*; do
            case $(readlink "$f") in socket:*) readlink "$f";; esac
        done > mine
        test -s mine || exit 8
        pid=$("$LB" status --json | tr -d ' \n' | sed 's/.*"daemon":{[^}]*"pid":\([0-9]*\).*/\1/')
        for f in /proc/$pid/fd/*; do readlink "$f"; done > theirs
        ! grep -qxFf mine theirs
    "#;
    let out = run(d
        .cli()
        .env("LB", CLI)
        .args(["lock", "x", "--", CLI, "run", "--", "sh", "-c", script]));
    assert!(
        out.status.success(),
        "the private daemon got the lock's connection: {out:?}"
    );
}

#[test]
fn autostart_never_follows_a_symlinked_log() {
    let (runtime, dir) = local_scope();
    let victim = runtime.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("broker.log")).unwrap();
    let out = run(&mut autostarting_ping(runtime.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("broker.log"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}

// ---- Whom the tool trusts to serve the socket ----
//
// The other user is `nobody` (65534): as root, these tests run a daemon
// (the attacker) or the tool itself as nobody; otherwise they skip those
// parts, saying so on stderr.

/// A `lockbrokerd --socket SOCKET` run as nobody, killed on drop.
struct Foreign(Child);

impl Foreign {
    fn start(socket: &Path) -> Foreign {
        let mut cmd = Command::new(DAEMON);
        cmd.arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = as_nobody(&mut cmd).spawn().unwrap_or_else(|e| {
            panic!("cannot start lockbrokerd as nobody (the target directory must be readable by nobody): {e}")
        });
        let mut foreign = Foreign(child);
        wait_until("nobody's daemon listens", || {
            assert!(foreign.0.try_wait().unwrap().is_none(), "daemon exited");
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        });
        foreign
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lockbroker ARGS` with `XDG_RUNTIME_DIR=runtime` and no other address.
fn tool(runtime: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(CLI);
    cmd.args(args)
        .env("XDG_RUNTIME_DIR", runtime)
        .env("LOCKBROKERD", DAEMON)
        .env_remove("LOCKBROKER_SOCKET")
        .env_remove("LOCKBROKER_NO_AUTOSTART")
        .current_dir("/")
        .stdin(Stdio::null());
    cmd
}

/// Checks that `out` is a refusal: exit 69 and one line containing every
/// one of `needles`.
fn assert_refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("lockbroker: refusing the lockbroker daemon: "),
        "{err}"
    );
    for needle in needles {
        assert!(err.contains(needle), "no {needle:?} in {err}");
    }
}

#[test]
fn the_local_scope_refuses_a_directory_of_another_user() {
    if !can_be_nobody("a local directory owned by another user") {
        return;
    }
    // The attack: nobody made the victim's scope directory first and
    // serves a daemon there.
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), NOBODY, 0o700);
    let _attacker = Foreign::start(&dir.join("broker.sock"));
    let path = dir.display().to_string();
    let owned = format!("is owned by uid 65534, expected uid {}", euid());
    let out = run(&mut tool(runtime.path(), &["--no-autostart", "ping"]));
    assert_refused(&out, &[&path, &owned]);
    // Autostart does not step in, and the command never runs.
    let marker = runtime.path().join("ran");
    let script = format!("touch {}", marker.display());
    let out = run(&mut tool(
        runtime.path(),
        &["lock", "x", "--", "sh", "-c", &script],
    ));
    assert_refused(&out, &[&path, &owned]);
    assert!(!marker.exists());
    assert!(!dir.join("broker.log").exists());
}

#[test]
fn the_local_scope_refuses_a_directory_open_to_others() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), euid(), 0o777);
    // Anybody could have put a socket there; as root, nobody does.
    let _attacker = can_be_nobody("running the daemon in the open directory as nobody")
        .then(|| Foreign::start(&dir.join("broker.sock")));
    let out = run(&mut tool(runtime.path(), &["--no-autostart", "ping"]));
    let path = dir.display().to_string();
    assert_refused(&out, &[&path, "its mode is 0777", "chmod 700"]);
}

#[test]
fn an_explicit_socket_of_another_user_needs_allow_uid() {
    if !can_be_nobody("the explicit socket of another user") {
        return;
    }
    let theirs = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(theirs.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let socket = theirs.path().join("broker.sock");
    let _attacker = Foreign::start(&socket);
    let runtime = tempfile::tempdir().unwrap();
    let s = socket.to_str().unwrap();
    let hint = "(--allow-uid 65534 trusts it)";
    let server = "runs as uid 65534, expected uid 0";
    let out = run(&mut tool(runtime.path(), &["--socket", s, "ping"]));
    assert_refused(&out, &[s, server, hint]);
    let out = run(tool(runtime.path(), &["ping"]).env("LOCKBROKER_SOCKET", s));
    assert_refused(&out, &[s, server, hint]);
    let out = run(&mut tool(
        runtime.path(),
        &["--allow-uid", "65534", "--socket", s, "ping"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a number: a usage error.
    let out = run(&mut tool(
        runtime.path(),
        &["--allow-uid", "nobody", "ping"],
    ));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unprivileged_user_gets_the_same_checks() {
    if !can_be_nobody("running the tool as nobody") {
        return;
    }
    // Root's directory where nobody's scope directory should be.
    let runtime = tempfile::tempdir().unwrap();
    let dir = local_dir(runtime.path(), 0, 0o700);
    let out = run(as_nobody(&mut tool(runtime.path(), &["ping"])));
    let path = dir.display().to_string();
    assert_refused(&out, &[&path, "is owned by uid 0, expected uid 65534"]);

    // nobody's own daemon, autostarted in its own directory, is accepted.
    let runtime = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(runtime.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let out = run(as_nobody(&mut tool(runtime.path(), &["ping"])));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(as_nobody(&mut tool(runtime.path(), &["status", "--json"])));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = status["daemon"]["pid"].as_u64().unwrap() as u32;
    signal(pid, libc::SIGTERM);
    wait_until("nobody's daemon exits", || !alive(pid));
}

#[test]
fn dash_c_runs_a_command_line_through_sh() {
    let d = Daemon::start();
    for args in [
        [
            "lock",
            "-c",
            "echo \"$LOCKBROKER_LOCK\" $((1 + 2)); exit 4",
            "line",
        ],
        [
            "lock",
            "line",
            "-c",
            "echo \"$LOCKBROKER_LOCK\" $((1 + 2)); exit 4",
        ],
    ] {
        let out = run(d.cli().args(args));
        assert_eq!(out.status.code(), Some(4), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "line 3\n");
    }
    // -c and a command at once: a usage error.
    let out = run(d.cli().args(["lock", "line", "-c", "true", "echo"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// A bash script in the daemon's directory that takes `name` with the
/// README's `lockbroker hold` idiom (`hold_args` before the name), writes
/// the fence to `fence`, then runs `body`.
fn holding_script(d: &Daemon, hold_args: &str, name: &str, body: &str) -> Command {
    holding_script_after(d, "", hold_args, name, body)
}

/// [`holding_script`], running `prelude` before it takes the lock.
fn holding_script_after(
    d: &Daemon,
    prelude: &str,
    hold_args: &str,
    name: &str,
    body: &str,
) -> Command {
    let script = format!(
        "{prelude}\n\
         exec 9< <(lockbroker hold {hold_args} {name}) && read -r fence <&9 || exit 75\n\
         echo \"$fence\" > fence.tmp && mv fence.tmp fence\n\
         {body}"
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .env("PATH", path_with_lockbroker(d.dir.path()))
        .env("LOCKBROKER_SOCKET", d.socket())
        .current_dir(d.dir.path())
        .stdin(Stdio::null());
    cmd
}

/// A FIFO in the daemon's directory: a script blocks reading it until the
/// test writes a line.
fn fifo(d: &Daemon, name: &str) -> PathBuf {
    let path = d.path(name);
    assert!(
        Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap()
            .success()
    );
    path
}

/// The next holder of `name` is told it was abandoned, or not.
fn next_is_abandoned(d: &Daemon, name: &str) -> bool {
    let out = run(d
        .cli()
        .args(["lock", "-w", "20", name, "--", "sh", "-c"])
        .arg("echo ${LOCKBROKER_ABANDONED:-0}"));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

#[test]
fn hold_keeps_the_lock_for_the_rest_of_the_script() {
    let d = Daemon::start();
    let body = "lockbroker lock -n job true; echo $? > inner; exit 3";
    let out = run(&mut holding_script(&d, "", "job", body));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // Held once the line returned: the script's own try was refused.
    assert_eq!(std::fs::read_to_string(d.path("inner")).unwrap(), "75\n");
    let fence: u64 = std::fs::read_to_string(d.path("fence"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(fence > 0);
    // Released (not abandoned) when the script exited.
    assert!(!next_is_abandoned(&d, "job"));
}

#[test]
fn closing_the_descriptor_releases_the_hold_early() {
    let d = Daemon::start();
    let go = fifo(&d, "go");
    let body = "exec 9<&-; touch closed; read -r _ < go";
    let mut script = holding_script(&d, "", "job", body).spawn().unwrap();
    wait_until("the script closes its descriptor", || {
        d.path("closed").exists()
    });
    // Free while the script still runs.
    wait_until("the hold is released", || d.is_free("job"));
    assert!(script.try_wait().unwrap().is_none(), "the script ended");
    std::fs::write(&go, "\n").unwrap();
    assert!(wait_exit(&mut script, Duration::from_secs(20)).success());
    assert!(!next_is_abandoned(&d, "job"));
}

#[test]
fn a_script_killed_with_sigkill_releases_its_hold() {
    let d = Daemon::start();
    let _go = fifo(&d, "go");
    let body = "echo $$ > pid.tmp && mv pid.tmp pid; read -r _ < go";
    let mut script = holding_script(&d, "", "job", body).spawn().unwrap();
    let pid = read_pid(&d.path("pid"));
    assert!(!d.is_free("job"), "held while the script runs");
    assert!(signal(pid, libc::SIGKILL));
    wait_exit(&mut script, Duration::from_secs(20));
    wait_until("the hold is released", || d.is_free("job"));
}

#[test]
fn a_hold_that_is_not_obtained_fails_the_read() {
    let d = Daemon::start();
    let go = fifo(&d, "go");
    let mut holder = holding_script(&d, "", "job", "read -r _ < go")
        .spawn()
        .unwrap();
    wait_until("the first script holds", || d.path("fence").exists());
    std::fs::remove_file(d.path("fence")).unwrap();
    for args in ["-n", "-w 0.2"] {
        let out = run(&mut holding_script(&d, args, "job", "exit 0"));
        assert_eq!(out.status.code(), Some(75), "{args}: {out:?}");
        assert!(!d.path("fence").exists(), "{args}: held");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("\"job\""),
            "{out:?}"
        );
    }
    std::fs::write(&go, "\n").unwrap();
    assert!(wait_exit(&mut holder, Duration::from_secs(20)).success());
}

#[test]
fn losing_a_hold_terminates_the_script() {
    let mut d = Daemon::start();
    let _go = fifo(&d, "go");
    let mut script = holding_script(&d, "", "doomed", "read -r _ < go")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the script holds", || d.path("fence").exists());
    d.process.kill(); // the daemon dies: the lock is lost
    let status = wait_exit(&mut script, Duration::from_secs(20));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    let mut err = String::new();
    script
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("lost the lock"), "{err}");
}

#[test]
fn a_script_killed_while_its_hold_waits_leaves_no_waiter() {
    let d = Daemon::start();
    let go = fifo(&d, "go");
    let mut holder = holding_script(&d, "", "job", "read -r _ < go")
        .spawn()
        .unwrap();
    wait_until("the first script holds", || d.path("fence").exists());
    // The second script waits in its `read` while its hold waits.
    let mut waiter = holding_script_after(&d, "echo $$ > pid.tmp && mv pid.tmp pid", "", "job", "")
        .spawn()
        .unwrap();
    let pid = read_pid(&d.path("pid"));
    wait_until("the hold waits", || {
        holders_and_waiters(&d, "job") == (1, 1)
    });
    assert!(signal(pid, libc::SIGKILL));
    wait_exit(&mut waiter, Duration::from_secs(20));
    wait_until("the hold gives up", || {
        holders_and_waiters(&d, "job") == (1, 0)
    });
    std::fs::write(&go, "\n").unwrap();
    assert!(wait_exit(&mut holder, Duration::from_secs(20)).success());
}

/// `status` answers "who" as lslocks does: the command a wrapper runs and
/// its pid, the side each holder and waiter takes, and the columns asked
/// for, with or without headings.
#[test]
fn status_shows_the_wrapped_command_its_pid_and_its_side() {
    let d = Daemon::start();
    let go = fifo(&d, "go");
    let script = "echo $$ > pid.tmp && mv pid.tmp pid; read -r _ < go";
    let mut reader = d
        .cli()
        .args(["lock", "-s", "rw", "--", "sh", "-c", script])
        .spawn()
        .unwrap();
    let command_pid = read_pid(&d.path("pid"));
    let mut writer = d
        .cli()
        .args(["lock", "-w", "20", "rw", "true"])
        .spawn()
        .unwrap();
    wait_until("the writer queues", || {
        holders_and_waiters(&d, "rw") == (1, 1)
    });
    let status = d.status_json();
    let lock = &status["locks"][0];
    assert_eq!(lock["kind"], "rwlock");
    let holder = &lock["holders"][0];
    assert_eq!(holder["command_pid"], command_pid, "{status}");
    assert_eq!(holder["pid"], reader.id(), "the session is the wrapper's");
    assert_eq!(holder["command"], format!("sh -c '{script}'"));
    assert_eq!(holder["access"], "shared");
    let waiter = &lock["waiters"][0];
    assert_eq!(
        waiter["access"], "exclusive",
        "an exclusive waiter, not a mutex"
    );
    assert_eq!(waiter["state"], "waiter 1");
    assert_eq!(waiter["command"], "true");
    // The table: the columns asked for, no headings.
    let out = run(d.cli().args([
        "status",
        "-o",
        "name,type,mode,state,pid,command",
        "--no-headings",
    ]));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        rows[0],
        [
            "rw",
            "rwlock",
            "shared",
            "holder",
            &command_pid.to_string(),
            &format!("sh -c '{script}'")
        ],
        "{text}"
    );
    assert_eq!(
        rows[1][..4],
        ["rw", "rwlock", "exclusive", "waiter 1"],
        "{text}"
    );
    assert_eq!(rows.len(), 2, "{text}");
    // Headings: the daemon's line, then the titles; `+` adds to the defaults.
    let out = run(d.cli().args(["status", "-o", "+SESSION"]));
    let text = String::from_utf8(out.stdout).unwrap();
    let titles: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        titles,
        [
            "NAME", "TYPE", "MODE", "STATE", "PID", "USER", "HOST", "FOR", "FENCE", "COMMAND",
            "SESSION"
        ]
    );
    let out = run(d.cli().args(["status", "-o", "NAME,NOPE"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOPE"),
        "{out:?}"
    );
    std::fs::write(&go, "\n").unwrap();
    assert!(wait_exit(&mut reader, Duration::from_secs(20)).success());
    assert!(wait_exit(&mut writer, Duration::from_secs(20)).success());
}

/// `--version` names the version and the commit the binaries were built
/// from.
#[test]
fn version_names_the_commit() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    for (program, name) in [(CLI, "lockbroker"), (DAEMON, "lockbrokerd")] {
        let out = run(Command::new(program).arg("--version"));
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{name} {} (commit {head})", env!("CARGO_PKG_VERSION"))
        );
    }
}

/// Completions and man pages, generated from the clap definitions of both
/// programs: bash reads the completions, the pages are roff naming every
/// subcommand or flag.
#[test]
fn completions_and_man_pages_for_both_programs() {
    let dir = tempfile::tempdir().unwrap();
    for (program, name, args) in [
        (CLI, "lockbroker", &["completions", "bash"][..]),
        (DAEMON, "lockbrokerd", &["--completions", "bash"][..]),
    ] {
        let out = run(Command::new(program).args(args));
        assert!(out.status.success(), "{out:?}");
        let file = dir.path().join(name);
        std::fs::write(&file, &out.stdout).unwrap();
        let check = run(Command::new("bash").arg("-n").arg(&file));
        assert!(check.status.success(), "bash cannot read them: {check:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains(&format!("complete -F _{name}")),
            "{name}: {text}"
        );
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(Command::new(CLI).args(["completions", shell]));
        assert!(
            out.status.success() && out.stdout.len() > 100,
            "{shell}: {out:?}"
        );
    }
    let out = run(Command::new(CLI).arg("man"));
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH lockbroker 1"), "{page}");
    for sub in ["lock", "hold", "sem", "status", "completions"] {
        assert!(
            page.contains(&format!("lockbroker\\-{sub}")),
            "{sub} missing: {page}"
        );
    }
    let out = run(Command::new(DAEMON).arg("--man"));
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH lockbrokerd 1"), "{page}");
    assert!(page.contains("etcd\\-endpoints"), "{page}");
}

/// `lockbrokerd --config FILE`: the file's flags apply (here the socket
/// and a limit), the command line overrides them, and an unknown key
/// stops the daemon before it serves, naming the key.
#[test]
fn the_daemon_reads_its_flags_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("from-file.sock");
    let file = dir.path().join("lockbrokerd.toml");
    std::fs::write(
        &file,
        format!(
            "socket = {:?}\nmax-holds = 1\nmax-pending = 1\n",
            socket.display().to_string()
        ),
    )
    .unwrap();
    let mut daemon = Command::new(DAEMON)
        .arg("--config")
        .arg(&file)
        .args(["--max-holds", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed however the test ends.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            signal(self.0, libc::SIGKILL);
        }
    }
    let _kill = Kill(daemon.id());
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(CLI);
        cmd.arg("--socket").arg(&socket).args(args);
        run(&mut cmd)
    };
    wait_until("the daemon serves the file's socket", || {
        cli(&["ping"]).status.success()
    });
    // --max-holds 2 from the command line, not 1 from the file: a
    // session may hold two, and not three.
    let client =
        lockbroker::blocking::Client::connect_with(&lockbroker::Connector::new().socket(&socket))
            .unwrap();
    let _a = client.mutex("a").acquire().unwrap();
    let _b = client.mutex("b").acquire().unwrap();
    let third = client.mutex("c").try_acquire();
    assert!(third.is_err(), "a third hold: {third:?}");
    drop(client);
    assert!(signal(daemon.id(), libc::SIGTERM));
    wait_exit(&mut daemon, Duration::from_secs(20));
    std::fs::write(&file, "max-holdz = 1\n").unwrap();
    let out = run(Command::new(DAEMON).arg("--config").arg(&file));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key \"max-holdz\""), "{err}");
}

/// A daemon older than the `Metrics` request ends the connection when it
/// reads one: `lockbroker metrics` says so in one line, exit 69. The old
/// daemon is played from the golden vectors: it refuses version 3,
/// welcomes the tool in version 2, then closes on the request it does not
/// know.
#[test]
fn metrics_from_a_daemon_older_than_them_is_one_clear_line() {
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("old.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let golden = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proto/golden/v2.txt"
    ))
    .unwrap();
    let hex = golden
        .lines()
        .find_map(|l| l.strip_prefix("welcome_v2 s2c "))
        .unwrap()
        .to_owned();
    let welcome: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let old = std::thread::spawn(move || {
        let frame = |conn: &mut std::os::unix::net::UnixStream| {
            let mut len = [0u8; 4];
            conn.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            conn.read_exact(&mut body).unwrap();
            body
        };
        // Hellos of versions 4 and 3 are refused, as a daemon of version
        // 2 does; the tool asks again in the version below each time.
        for version in [4u16, 3] {
            let (mut conn, _) = listener.accept().unwrap();
            let hello = frame(&mut conn);
            // ClientMessage::Hello (0), the magic, then the version.
            assert_eq!(&hello[8..10], &version.to_le_bytes());
            let refusal = lockbroker_proto::ServerMessage::Fatal(lockbroker_proto::ErrorInfo::new(
                lockbroker_proto::ErrorCode::UnsupportedVersion,
                "this daemon speaks versions 1 to 2",
            ));
            let bytes = lockbroker_proto::frame::to_frame(&refusal, 4096).unwrap();
            conn.write_all(&bytes).unwrap();
        }
        let (mut conn, _) = listener.accept().unwrap();
        let hello = frame(&mut conn);
        assert_eq!(&hello[8..10], &2u16.to_le_bytes());
        conn.write_all(&welcome).unwrap();
        let request = frame(&mut conn);
        // ClientMessage::Request (1), its id, then Request::Metrics (16).
        assert_eq!(&request[..4], &1u32.to_le_bytes());
        assert_eq!(&request[12..16], &16u32.to_le_bytes());
    });
    let out = Command::new(CLI)
        .arg("--socket")
        .arg(&socket)
        .arg("metrics")
        .output()
        .unwrap();
    old.join().unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "lockbrokerd 0.1.0 closed the connection: it is older than the metrics request"
        ),
        "{err}"
    );
}

/// The autostarted daemon logs to `broker.log` with `--log-file`, which
/// turns over at its bound: a log already past it (from daemons before)
/// becomes `broker.log.1`, and the new daemon starts a fresh one. The
/// daemon's own turning over is tested in the daemon's crate.
#[test]
fn autostart_keeps_the_log_bounded() {
    let (runtime, dir) = local_scope();
    let log = dir.join("broker.log");
    let big = lockbrokerd::logfile::DEFAULT_MAX as usize + 100;
    std::fs::write(&log, vec![b'.'; big]).unwrap();
    let out = run(&mut autostarting_ping(runtime.path()));
    assert!(out.status.success(), "{out:?}");
    stop_autostarted(runtime.path());
    assert_eq!(
        std::fs::metadata(dir.join("broker.log.1")).unwrap().len(),
        big as u64
    );
    let fresh = std::fs::read_to_string(&log).unwrap();
    assert!(fresh.contains("listening"), "{fresh}");
    assert!(fresh.len() < 10_000, "{} bytes", fresh.len());
}

/// The issue's two scripts: each holds one lock and, inside, takes the
/// other. Each inner `lockbroker` is a session and an actor of its own,
/// but runs within its wrapper (`LOCKBROKER_ACTOR`), which keeps its lock
/// while the inner one waits, so the daemon sees the cycle: the inner
/// `lock` that would close it exits 35 naming it, its script goes on, and
/// the other script's inner `lock` is then served.
#[test]
fn nested_locks_taken_in_opposite_orders_are_a_deadlock_refused() {
    let d = Daemon::start();
    let (go1, go2) = (fifo(&d, "go1"), fifo(&d, "go2"));
    let script = |outer: &str, inner: &str, go: &str| {
        let body = format!(
            "echo > {outer}.held; read -r _ < {go}; \
             lockbroker lock {inner} -- true 2> {inner}.err; echo $? > {outer}.inner"
        );
        let mut cmd = d.cli();
        cmd.env("PATH", path_with_lockbroker(d.dir.path()))
            .env_remove("LOCKBROKER_ACTOR")
            .args(["lock", outer, "--", "sh", "-c", &body])
            .spawn()
            .unwrap()
    };
    let mut first = script("x", "y", "go1");
    let mut second = script("y", "x", "go2");
    wait_until("both hold", || {
        d.path("x.held").exists() && d.path("y.held").exists()
    });
    std::fs::write(&go1, "\n").unwrap();
    wait_until("the first script's inner lock waits for y", || {
        holders_and_waiters(&d, "y") == (1, 1)
    });
    std::fs::write(&go2, "\n").unwrap();
    assert!(wait_exit(&mut second, Duration::from_secs(20)).success());
    assert_eq!(
        std::fs::read_to_string(d.path("y.inner")).unwrap().trim(),
        "35"
    );
    let err = std::fs::read_to_string(d.path("x.err")).unwrap();
    assert!(
        err.contains("waiting for \"x\" would deadlock")
            && err.contains("held by session")
            && err.contains(", which waits, through session")
            && err.contains("for \"y\"")
            && err.contains("on whose behalf this session acts"),
        "{err}"
    );
    assert!(wait_exit(&mut first, Duration::from_secs(20)).success());
    assert_eq!(
        std::fs::read_to_string(d.path("x.inner")).unwrap().trim(),
        "0"
    );
}

/// Two commands run in parallel under one lock take an inner lock in
/// turn: each is an actor of its own within the wrapper, so the second
/// waits for the first, which waits for nothing: no deadlock, the second
/// is served once the first is done.
#[test]
fn parallel_commands_under_one_lock_are_not_a_deadlock() {
    let d = Daemon::start();
    let (go, _held) = (fifo(&d, "go"), fifo(&d, "held"));
    let body = "lockbroker lock r -- sh -c 'echo > held; read -r _ < go' & \
                read -r _ < held; \
                lockbroker lock r -- true; echo $? > second; wait";
    let mut outer = d
        .cli()
        .env("PATH", path_with_lockbroker(d.dir.path()))
        .env_remove("LOCKBROKER_ACTOR")
        .args(["lock", "outer", "--", "sh", "-c", body])
        .spawn()
        .unwrap();
    wait_until("the second waits for r", || {
        holders_and_waiters(&d, "r") == (1, 1)
    });
    std::fs::write(&go, "\n").unwrap();
    assert!(wait_exit(&mut outer, Duration::from_secs(20)).success());
    assert_eq!(
        std::fs::read_to_string(d.path("second")).unwrap().trim(),
        "0"
    );
}

/// A command that takes the lock its own wrapper holds would wait for ever
/// (flock(1) hangs there): it is refused at once with 35, two levels deep
/// too, and the wrapper goes on.
#[test]
fn a_command_taking_its_wrappers_lock_is_a_deadlock_refused() {
    let d = Daemon::start();
    let mut outer = d
        .cli()
        .env("PATH", path_with_lockbroker(d.dir.path()))
        .env_remove("LOCKBROKER_ACTOR")
        .args(["lock", "x", "--", "lockbroker", "lock", "y", "--"])
        .args([
            "sh",
            "-c",
            "lockbroker lock x -- true 2> inner.err; echo $? > inner",
        ])
        .spawn()
        .unwrap();
    assert!(wait_exit(&mut outer, Duration::from_secs(20)).success());
    assert_eq!(
        std::fs::read_to_string(d.path("inner")).unwrap().trim(),
        "35"
    );
    let err = std::fs::read_to_string(d.path("inner.err")).unwrap();
    assert!(
        err.contains(
            "waiting for \"x\" would deadlock: this session waits for \"x\", held by session"
        ) && err.contains("on whose behalf this session acts"),
        "{err}"
    );
    assert_eq!(holders_and_waiters(&d, "x"), (0, 0));
    // The flag that once turned detection on is still accepted.
    let old_flag = d
        .cli()
        .args(["--detect-deadlocks", "lock", "z", "--", "true"])
        .output()
        .unwrap();
    assert!(old_flag.status.success(), "{old_flag:?}");
}

/// `--on-contended USR1`: the command is signalled, once, when someone
/// starts waiting for its lock, so it can finish early; the waiter is then
/// served. A signal that cannot be sent is a usage error.
#[test]
fn a_command_is_signalled_when_someone_waits_for_its_lock() {
    let d = Daemon::start();
    // The job waits for USR1 (interrupting `wait`), then leaves.
    let job = "trap 'echo told > told; kill $p 2>/dev/null; exit 0' USR1; \
               sleep 1000 & p=$!; echo > ready; wait $p; echo not told > told";
    let mut holder = d
        .cli()
        .args(["lock", "--on-contended", "USR1", "x", "--", "sh", "-c", job])
        .spawn()
        .unwrap();
    wait_until("the job holds x", || d.path("ready").exists());
    let mut waiter = d
        .cli()
        .args(["lock", "--timeout", "30s", "x", "--", "true"])
        .spawn()
        .unwrap();
    assert!(wait_exit(&mut holder, Duration::from_secs(20)).success());
    assert_eq!(
        std::fs::read_to_string(d.path("told")).unwrap().trim(),
        "told"
    );
    assert!(wait_exit(&mut waiter, Duration::from_secs(20)).success());
    for bad in ["KILL", "STOP", "NOPE", "0", "65"] {
        let out = d
            .cli()
            .args(["lock", "--on-contended", bad, "y", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a signal to send"), "{bad}: {err}");
    }
    assert_eq!(holders_and_waiters(&d, "y"), (0, 0));
}

/// `--lease`: a command that outlives its lock's lease is terminated (exit
/// 76, saying so), and the next holder is told the lock was abandoned.
#[test]
fn a_command_that_outlives_its_lease_is_terminated() {
    let d = Daemon::start();
    let out = d
        .cli()
        .args(["lock", "--lease", "100ms", "--kill-grace", "5s", "x", "--"])
        .args(["sh", "-c", "sleep 1000 & wait $!"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(76), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lost the lock \"x\" (the lease of 100 ms on \"x\" ran out)"),
        "{err}"
    );
    let next = d
        .cli()
        .args([
            "lock",
            "x",
            "--",
            "sh",
            "-c",
            "echo ${LOCKBROKER_ABANDONED:-0}",
        ])
        .output()
        .unwrap();
    assert!(next.status.success(), "{next:?}");
    assert_eq!(String::from_utf8_lossy(&next.stdout).trim(), "1");
    let bad = d
        .cli()
        .args(["lock", "--lease", "0s", "y", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("would end at once"), "{err}");
}

/// `lockbroker break`: a stuck command's lock is revoked from outside —
/// the command is terminated (76, naming who broke it), `break` says what
/// it broke, the next holder is told the lock was abandoned; nothing to
/// break is exit 1.
#[test]
fn a_stuck_lock_is_broken_from_outside() {
    let d = Daemon::start();
    let mut stuck = d
        .cli()
        .args([
            "lock",
            "x",
            "--",
            "sh",
            "-c",
            "echo > ready; sleep 1000 & wait $!",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the command holds x", || d.path("ready").exists());
    let out = d.cli().args(["--json", "status"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hold = status["locks"][0]["holders"][0]["hold_id"]
        .as_u64()
        .unwrap();
    let broke = d
        .cli()
        .args(["break", "x", "--hold", &hold.to_string()])
        .output()
        .unwrap();
    assert!(broke.status.success(), "{broke:?}");
    assert_eq!(
        String::from_utf8_lossy(&broke.stdout).trim(),
        format!("broke hold {hold} of \"x\"")
    );
    assert_eq!(
        wait_exit(&mut stuck, Duration::from_secs(20)).code(),
        Some(76)
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stuck.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("lost the lock \"x\" (broken by session")
            && err.contains("lockbroker break x"),
        "{err}"
    );
    let next = d
        .cli()
        .args([
            "lock",
            "x",
            "--",
            "sh",
            "-c",
            "echo ${LOCKBROKER_ABANDONED:-0}",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&next.stdout).trim(), "1");
    let none = d.cli().args(["break", "x"]).output().unwrap();
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    assert!(String::from_utf8_lossy(&none.stderr).contains("nobody holds it"));
}

/// `lockbrokerd --acl`: each verb a rule names is refused to nobody with
/// exit 77, naming the rule, and allowed to root; what no rule names stays
/// allowed to both; a listing over a prefix with a refusing rule beneath
/// is refused, a narrower one is not.
#[test]
fn access_rules_refuse_each_verb_to_nobody_and_let_root_through() {
    use lockbroker_tests::unix::{as_nobody, can_be_nobody, chmod};
    if !can_be_nobody("the access-rule verbs as nobody") {
        return;
    }
    let d = Daemon::start_with(|dir| {
        let acl = dir.join("acl.toml");
        std::fs::write(
            &acl,
            r#"
            [[rule]]
            prefix = "deploy/"
            acquire = ["user:root"]
            break = ["user:root"]
            inspect = ["*"]

            [[rule]]
            prefix = "secrets/"
            state-read = ["user:root"]
            state-write = ["user:root"]
            watch = ["user:root"]
            inspect = ["user:root"]
            "#,
        )
        .unwrap();
        vec!["--acl".into(), acl.into()]
    });
    // nobody may reach the socket; the rules decide the rest.
    chmod(d.dir.path(), 0o755);
    chmod(d.socket(), 0o666);
    let run = |nobody: bool, args: &[&str]| {
        let mut cmd = d.cli();
        cmd.args(["--allow-uid", "0"]).args(args);
        if nobody {
            as_nobody(&mut cmd);
        }
        cmd.output().unwrap()
    };
    let verbs: [&[&str]; 7] = [
        &["lock", "--timeout", "5s", "deploy/web", "--", "true"],
        &["status", "deploy/"],
        &["status", "secrets/"],
        &["state", "set", "secrets/k", "v"],
        &["state", "get", "secrets/k"],
        &["state", "watch", "--prefix", "secrets/", "--from", "1"],
        &["break", "deploy/web"],
    ];
    for args in verbs {
        let out = run(true, args);
        let err = String::from_utf8_lossy(&out.stderr);
        if args == ["status", "deploy/"] {
            // Everyone may inspect deploy/.
            assert!(out.status.success(), "{args:?}: {err}");
            continue;
        }
        assert_eq!(out.status.code(), Some(77), "{args:?} as nobody: {err}");
        assert!(
            err.contains("(forbidden)") && err.contains("the rule for"),
            "{args:?}: {err}"
        );
    }
    // Root may do each (break finds nobody holding: 1).
    assert!(run(false, verbs[0]).status.success());
    assert!(run(false, verbs[3]).status.success());
    assert_eq!(
        String::from_utf8_lossy(&run(false, verbs[4]).stdout).trim(),
        "v"
    );
    assert!(run(false, &["status", ""]).status.success());
    assert_eq!(run(false, verbs[6]).status.code(), Some(1));
    let mut watch = d.cli();
    watch
        .args(["state", "watch", "--prefix", "secrets/", "--from", "1"])
        .stdout(std::process::Stdio::piped());
    let mut watching = watch.spawn().unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(watching.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.contains("secrets/k"), "{first}");
    let _ = watching.kill();
    let _ = watching.wait();
    // No rule names it: allowed to nobody too; a listing of everything
    // would show secrets/, which nobody may not inspect.
    assert!(run(true, &["lock", "other", "--", "true"]).status.success());
    assert!(
        run(true, &["state", "set", "other/k", "v"])
            .status
            .success()
    );
    assert_eq!(run(true, &["status"]).status.code(), Some(77));
}

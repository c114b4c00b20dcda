//! What the CLI tests of every platform share: a daemon on an address of
//! its own, `lockbroker` aimed at it, and bounded waits for processes and
//! their output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lockbroker_tests::harness::{DaemonProcess, address, wait_exit};

/// The `lockbroker` tool under test.
pub const CLI: &str = env!("CARGO_BIN_EXE_lb-cli");
/// The command the portable tests run under a lock.
pub const WORKER: &str = env!("CARGO_BIN_EXE_lb-worker");
/// The daemon.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_lb-daemon");

/// `lockbroker`'s exit status for a lock not obtained (README).
pub const CONFLICT: i32 = 75;

/// Kills process `pid` at once (SIGKILL, `TerminateProcess`); whether it
/// was there to kill.
pub fn kill(pid: u32) -> bool {
    #[cfg(unix)]
    return lockbroker_tests::unix::signal(pid, libc::SIGKILL);
    #[cfg(windows)]
    return lockbroker_tests::windows::kill(pid);
}

/// Fails the test if `cond` does not hold within 20 seconds. For what is
/// only observable by asking (a file another process writes, a lock's
/// holders).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A daemon on a socket (a pipe, on Windows) of its own, and a directory
/// for the test's files.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    socket: PathBuf,
    pub process: DaemonProcess,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(|_| Vec::new())
    }

    /// A daemon started with the flags `flags` gives, from its directory.
    pub fn start_with(flags: impl FnOnce(&Path) -> Vec<std::ffi::OsString>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = address(dir.path());
        let flags = flags(dir.path());
        let flags: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
        let process = DaemonProcess::start_blocking(Path::new(DAEMON), &socket, &flags);
        Daemon {
            dir,
            socket,
            process,
        }
    }

    /// Its address.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `lockbroker` aimed at this daemon, in the test's directory.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(CLI);
        cmd.env("LOCKBROKER_SOCKET", &self.socket)
            .env("LOCKBROKERD", DAEMON)
            .env_remove("LOCKBROKER_ABANDONED")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// `lockbroker lock ARGS -- lb-worker WORKER_ARGS`.
    pub fn lock(&self, args: &[&str], worker: &[&str]) -> Command {
        let mut cmd = self.cli();
        cmd.arg("lock")
            .args(args)
            .arg("--")
            .arg(WORKER)
            .args(worker);
        cmd
    }

    /// Whether `name` can be taken at once (the lock is free).
    pub fn is_free(&self, name: &str) -> bool {
        let out = run(self
            .cli()
            .args(["lock", "--nonblock", name, "--", WORKER, "env", "X"]));
        match out.status.code() {
            Some(0) => true,
            Some(CONFLICT) => false,
            _ => panic!("unexpected: {out:?}"),
        }
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = run(self.cli().args(["status", "--json"]));
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Runs `cmd` to its end, bounded, collecting its output.
pub fn run(cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child)
}

/// Waits (bounded) for `child` (stdout and stderr piped) and collects its
/// output, read while it runs (an output larger than a pipe's buffer would
/// block it). The output must end too: a process that kept the pipes open
/// (a daemon that inherited them) fails the test rather than hanging it.
pub fn finish(mut child: Child) -> Output {
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            let _ = tx.send(b);
        });
        rx
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let ended = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the output never ended: another process kept the pipe open")
    };
    Output {
        status,
        stdout: ended(out),
        stderr: ended(err),
    }
}

/// The pid in `file` once it is written (complete: writers rename it into
/// place).
pub fn read_pid(file: &Path) -> u32 {
    let mut pid = None;
    wait_until(&format!("{} is written", file.display()), || {
        pid = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

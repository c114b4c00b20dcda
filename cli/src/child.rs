//! Running the command: its own process group, signals passed on, and the
//! group terminated if the lock is lost while it runs.

use std::ffi::OsString;
use std::process::ExitStatus;
use std::time::Duration;

use lockbroker::LockGuard;
use tokio::process::{Child, Command};

use crate::exit;

/// How the command ended.
pub enum Outcome {
    /// It exited by itself (or by a signal we passed on).
    Exited(ExitStatus),
    /// The lock was lost and the command was terminated.
    LockLost,
}

/// Spawns `command` with `env`, in its own process group when `own_group`.
pub fn spawn(
    command: &[OsString],
    env: &[(&str, String)],
    remove: &[&str],
    own_group: bool,
) -> Result<Child, (u8, String)> {
    let (program, args) = command.split_first().expect("clap requires a command");
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in remove {
        cmd.env_remove(k);
    }
    #[cfg(unix)]
    if own_group {
        cmd.process_group(0);
    }
    #[cfg(not(unix))]
    let _ = own_group;
    cmd.spawn().map_err(|e| {
        // As shells do: 127 for a missing command, 126 for one that cannot run.
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => 127,
            _ => 126,
        };
        (
            code,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        )
    })
}

/// Waits for the command (`exited` completes with its status) while holding
/// `guard`: SIGINT and SIGTERM are passed on to its process group `pgid`;
/// losing the lock terminates the group (SIGTERM, then SIGKILL after
/// `grace`).
pub async fn supervise(
    exited: impl std::future::Future<Output = std::io::Result<ExitStatus>>,
    pgid: Option<u32>,
    guard: &LockGuard,
    grace: Duration,
) -> std::io::Result<Outcome> {
    let signals = Signals::new()?;
    let mut lost = false;
    let kill_at = tokio::time::sleep(Duration::MAX);
    tokio::pin!(kill_at);
    tokio::pin!(signals);
    tokio::pin!(exited);
    loop {
        tokio::select! {
            status = &mut exited => {
                let status = status?;
                return Ok(if lost { Outcome::LockLost } else { Outcome::Exited(status) });
            }
            sig = signals.as_mut().recv() => {
                if let (Some(sig), Some(pgid)) = (sig, pgid) {
                    signal_group(pgid, sig);
                }
            }
            () = guard.lost(), if !lost => {
                lost = true;
                eprintln!(
                    "lockbroker: lost the lock {:?} (the daemon went away); terminating the command",
                    guard.name()
                );
                if let Some(pgid) = pgid {
                    signal_group(pgid, Signal::Term);
                }
                kill_at.as_mut().reset(tokio::time::Instant::now() + grace);
            }
            () = &mut kill_at, if lost => {
                if let Some(pgid) = pgid {
                    signal_group(pgid, Signal::Kill);
                }
                kill_at.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(86400));
            }
        }
    }
}

/// Waits for `child`, passing SIGTERM on to it (SIGINT from a terminal
/// reaches it directly, as it shares our process group).
pub async fn wait_passing_term(mut child: Child) -> std::io::Result<ExitStatus> {
    let signals = Signals::new()?;
    tokio::pin!(signals);
    loop {
        tokio::select! {
            status = child.wait() => return status,
            sig = signals.as_mut().recv() => {
                if let (Some(Signal::Term), Some(pid)) = (sig, child.id()) {
                    signal_pid(pid, Signal::Term);
                }
            }
        }
    }
}

/// The exit status lockbroker passes on for `status`: the code, or 128 +
/// the signal that killed the command, as shells report it.
pub fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return code as u8;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128u8.wrapping_add(sig as u8);
        }
    }
    exit::ERROR
}

/// Signals lockbroker handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(unix), allow(dead_code))]
pub enum Signal {
    /// SIGINT.
    Int,
    /// SIGTERM.
    Term,
    /// SIGKILL (only sent, never received).
    Kill,
}

#[cfg(unix)]
fn raw(sig: Signal) -> i32 {
    match sig {
        Signal::Int => libc::SIGINT,
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    }
}

#[cfg(unix)]
fn signal_group(pgid: u32, sig: Signal) {
    // SAFETY: sending a signal to the process group we created.
    unsafe { libc::kill(-(pgid as i32), raw(sig)) };
}

#[cfg(unix)]
fn signal_pid(pid: u32, sig: Signal) {
    // SAFETY: sending a signal to our child.
    unsafe { libc::kill(pid as i32, raw(sig)) };
}

#[cfg(not(unix))]
fn signal_group(_pgid: u32, _sig: Signal) {}

#[cfg(not(unix))]
fn signal_pid(_pid: u32, _sig: Signal) {}

/// SIGINT and SIGTERM as a stream; installing it stops them from killing
/// lockbroker itself.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn recv(self: std::pin::Pin<&mut Self>) -> Option<Signal> {
        #[cfg(unix)]
        {
            let this = self.get_mut();
            tokio::select! {
                s = this.int.recv() => s.map(|()| Signal::Int),
                s = this.term.recv() => s.map(|()| Signal::Term),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = self;
            std::future::pending().await
        }
    }
}

/// A command that runs holding a lock, on Unix: it inherits the lock's
/// connection, so the daemon sees the session end only when lockbroker
/// *and* every process that inherited the connection have closed it — a
/// `kill -9` of lockbroker leaves the lock with the command's tree, as a
/// `flock(1)` lock lives in the descriptor its command inherits.
#[cfg(unix)]
pub mod holding {
    use std::ffi::OsString;
    use std::os::fd::RawFd;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Command, ExitStatus};

    use tokio::signal::unix::{SignalKind, signal};

    /// A started command and what watches it.
    pub struct Holding {
        pid: u32,
        children: tokio::signal::unix::Signal,
    }

    /// Spawns `command` in its own process group, inheriting `fd` (the
    /// lock's connection). lockbroker becomes a child subreaper first, so
    /// that whatever the command leaves running is re-parented to it and
    /// can be found when the command exits.
    pub fn spawn(
        command: &[OsString],
        env: &[(&str, String)],
        remove: &[&str],
        fd: RawFd,
    ) -> Result<Holding, (u8, String)> {
        // Before the spawn, so no exit is missed.
        let children = signal(SignalKind::child())
            .map_err(|e| (crate::exit::ERROR, format!("cannot watch the command: {e}")))?;
        #[cfg(target_os = "linux")]
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        let (program, args) = command.split_first().expect("clap requires a command");
        let mut cmd = Command::new(program);
        cmd.args(args).process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in remove {
            cmd.env_remove(k);
        }
        // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on
        // the connection in the child only.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            };
            (
                code,
                format!("cannot run {}: {e}", program.to_string_lossy()),
            )
        })?;
        Ok(Holding {
            pid: child.id(),
            children,
        })
    }

    impl Holding {
        /// The command's pid, which is also its process group.
        pub fn pid(&self) -> u32 {
            self.pid
        }

        /// Waits for the command to exit. Every child that ends is reaped
        /// here (the command, and orphans re-parented to lockbroker).
        pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
            loop {
                if let Some(status) = reap(self.pid) {
                    return Ok(status);
                }
                self.children.recv().await;
            }
        }
    }

    /// Reaps every child that has ended; the command's status if it did.
    fn reap(command: u32) -> Option<ExitStatus> {
        let mut found = None;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own children with a local status.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return found;
            }
            if pid as u32 == command {
                found = Some(ExitStatus::from_raw(status));
            }
        }
    }

    /// Whether a process the command started still runs, other than
    /// `ignore` (the daemon lockbroker may have started itself). As a
    /// subreaper, lockbroker is the parent of every orphan of the command's
    /// tree, so a live descendant means a live child. `None` where that
    /// cannot be told (no subreaper, no `/proc`).
    pub fn descendants_remain(ignore: Option<u32>) -> Option<bool> {
        if !cfg!(target_os = "linux") {
            return None;
        }
        reap(0);
        let me = std::process::id();
        let dir = std::fs::read_dir("/proc").ok()?;
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if Some(pid) == ignore {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(me) && state != Some("Z") {
                return Some(true);
            }
        }
        Some(false)
    }

    /// Ends the connection for every process that shares it: after `-o`,
    /// what the command left running keeps no session open.
    pub fn shut_down(fd: RawFd) {
        // SAFETY: shutdown on our own connection's descriptor.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

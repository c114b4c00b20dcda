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

/// Waits for `child` while holding `guard`: SIGINT and SIGTERM are passed
/// on to its process group; losing the lock terminates the group (SIGTERM,
/// then SIGKILL after `grace`).
pub async fn supervise(
    mut child: Child,
    guard: &LockGuard,
    grace: Duration,
) -> std::io::Result<Outcome> {
    let signals = Signals::new()?;
    let pgid = child.id();
    let mut lost = false;
    let kill_at = tokio::time::sleep(Duration::MAX);
    tokio::pin!(kill_at);
    tokio::pin!(signals);
    loop {
        tokio::select! {
            status = child.wait() => {
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

//! Starting `lockbrokerd` and waiting until it serves.
//!
//! Whoever starts a daemon — the command-line tool's autostart and its
//! private `lockbroker run` daemon, the benchmarks, the tests — then needs
//! the same wait: connect until a daemon answers, and meanwhile notice the
//! started process exiting, which says at once that it could not start
//! instead of after the whole timeout. The caller spawns the process (how
//! its output is kept differs) and hands it here.

use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::{Client, Connector, Error};

/// `lockbrokerd`'s exit status when another daemon already serves its
/// socket: it lost a start race, and the winner is the one to connect to.
pub const EXIT_ALREADY_RUNNING: i32 = 3;

/// How long a started daemon is given to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How often connecting is tried again while a daemon starts.
const RETRY: Duration = Duration::from_millis(5);

/// The `lockbrokerd` program: `$LOCKBROKERD`, else the one beside the
/// running program (as `cargo build` and `cargo install` place them), else
/// the first on `PATH`.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LOCKBROKERD").filter(|p| !p.is_empty()) {
        return path.into();
    }
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name(format!("lockbrokerd{}", std::env::consts::EXE_SUFFIX));
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("lockbrokerd")
}

/// Why a started daemon is not serving.
#[derive(Debug)]
pub enum LaunchError {
    /// The process exited before anything served the socket.
    Exited(ExitStatus),
    /// Nothing served the socket within the time given.
    TimedOut(Duration),
    /// Something serves the socket, but the connection failed (refused
    /// handshake, a server that is not trusted, ...).
    Connect(Error),
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LaunchError::Exited(status) => write!(f, "lockbrokerd exited ({status})"),
            LaunchError::TimedOut(t) => {
                write!(f, "lockbrokerd did not start listening within {t:?}")
            }
            LaunchError::Connect(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for LaunchError {}

/// Connects through `connector` as soon as a daemon serves, while `child`
/// — the daemon started for it — runs; gives up after `timeout`.
///
/// If `child` exits with [`EXIT_ALREADY_RUNNING`] and `winner_may_serve`,
/// another daemon won the race to serve the same socket, and the wait goes
/// on for it; any other exit is [`LaunchError::Exited`] at once.
pub async fn wait_until_serving(
    child: &mut Child,
    connector: &Connector,
    timeout: Duration,
    winner_may_serve: bool,
) -> Result<Client, LaunchError> {
    let deadline = Instant::now() + timeout;
    let mut exited = false;
    loop {
        match connector.connect().await {
            Ok(client) => return Ok(client),
            Err(e) if e.nobody_listens() => {}
            Err(e) => return Err(LaunchError::Connect(e)),
        }
        if !exited && let Ok(Some(status)) = child.try_wait() {
            if !(winner_may_serve && status.code() == Some(EXIT_ALREADY_RUNNING)) {
                return Err(LaunchError::Exited(status));
            }
            exited = true;
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::TimedOut(timeout));
        }
        tokio::time::sleep(RETRY).await;
    }
}

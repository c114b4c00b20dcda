//! Where a daemon listens: the scopes of DESIGN.md and their socket paths.
//!
//! Both the daemon and the clients resolve addresses here, so the two can
//! never disagree. Clients resolve an explicit address first, then
//! [`SOCKET_ENV`], then their scope's default ([`resolve`]).

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// The environment variable that names the socket for clients.
pub const SOCKET_ENV: &str = "LOCKBROKER_SOCKET";

/// Who shares a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// One user's login session (the default).
    #[default]
    Local,
    /// Every user of the machine.
    Global,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Local => "local",
            Scope::Global => "global",
        })
    }
}

/// The environment a default address depends on, captured once so that
/// resolution is a pure function (and testable).
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `LOCKBROKER_SOCKET`.
    pub socket: Option<OsString>,
    /// `XDG_RUNTIME_DIR` (Unix).
    pub runtime_dir: Option<OsString>,
    /// The effective user id (Unix) or user name (Windows).
    pub user: String,
}

impl Env {
    /// Reads the current process's environment.
    pub fn current() -> Env {
        Env {
            socket: std::env::var_os(SOCKET_ENV).filter(|s| !s.is_empty()),
            runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").filter(|s| !s.is_empty()),
            user: current_user(),
        }
    }
}

#[cfg(unix)]
fn current_user() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }.to_string()
}

#[cfg(windows)]
fn current_user() -> String {
    std::env::var("USERNAME").unwrap_or_else(|_| "default".to_owned())
}

/// The default address of `scope`: a socket path on Unix, a pipe name on
/// Windows.
pub fn default_address(scope: Scope, env: &Env) -> PathBuf {
    if cfg!(windows) {
        return PathBuf::from(match scope {
            Scope::Local => format!(r"\\.\pipe\lockbroker-{}", env.user),
            Scope::Global => r"\\.\pipe\lockbroker".to_owned(),
        });
    }
    match scope {
        Scope::Local => scope_dir(scope, env).join("broker.sock"),
        Scope::Global => PathBuf::from("/run/lockbroker/broker.sock"),
    }
}

/// The directory holding `scope`'s default socket (Unix).
pub fn scope_dir(scope: Scope, env: &Env) -> PathBuf {
    match (scope, &env.runtime_dir) {
        (Scope::Local, Some(dir)) => PathBuf::from(dir).join("lockbroker"),
        (Scope::Local, None) => PathBuf::from(format!("/tmp/lockbroker-{}", env.user)),
        (Scope::Global, _) => PathBuf::from("/run/lockbroker"),
    }
}

/// A client's address: `explicit`, else `LOCKBROKER_SOCKET`, else the
/// scope's default.
pub fn resolve(explicit: Option<PathBuf>, scope: Scope, env: &Env) -> PathBuf {
    explicit
        .or_else(|| env.socket.clone().map(PathBuf::from))
        .unwrap_or_else(|| default_address(scope, env))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn env(socket: Option<&str>, runtime: Option<&str>) -> Env {
        Env {
            socket: socket.map(Into::into),
            runtime_dir: runtime.map(Into::into),
            user: "1000".into(),
        }
    }

    #[test]
    fn explicit_beats_env_beats_scope() {
        let e = env(Some("/e.sock"), Some("/run/user/1000"));
        assert_eq!(
            resolve(Some("/x.sock".into()), Scope::Local, &e),
            PathBuf::from("/x.sock")
        );
        assert_eq!(resolve(None, Scope::Local, &e), PathBuf::from("/e.sock"));
        assert_eq!(
            resolve(None, Scope::Local, &env(None, Some("/run/user/1000"))),
            PathBuf::from("/run/user/1000/lockbroker/broker.sock")
        );
        assert_eq!(
            resolve(None, Scope::Local, &env(None, None)),
            PathBuf::from("/tmp/lockbroker-1000/broker.sock")
        );
        assert_eq!(
            resolve(None, Scope::Global, &env(None, None)),
            PathBuf::from("/run/lockbroker/broker.sock")
        );
    }
}

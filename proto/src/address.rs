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
    /// One process tree: the private daemon `lockbroker run` starts and
    /// names in [`SOCKET_ENV`]. It has no default address.
    Process,
    /// One user's login session (the default).
    #[default]
    Local,
    /// Every user of the machine.
    Global,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Process => "self",
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
/// Windows. The process scope has none.
pub fn default_address(scope: Scope, env: &Env) -> Option<PathBuf> {
    if cfg!(windows) {
        return match scope {
            Scope::Process => None,
            Scope::Local => Some(format!(r"\\.\pipe\lockbroker-{}", env.user).into()),
            Scope::Global => Some(r"\\.\pipe\lockbroker".into()),
        };
    }
    match scope {
        Scope::Process => None,
        Scope::Local | Scope::Global => scope_dir(scope, env).map(|d| d.join("broker.sock")),
    }
}

/// The directory holding `scope`'s default socket (Unix).
pub fn scope_dir(scope: Scope, env: &Env) -> Option<PathBuf> {
    match (scope, &env.runtime_dir) {
        (Scope::Process, _) => None,
        (Scope::Local, Some(dir)) => Some(PathBuf::from(dir).join("lockbroker")),
        (Scope::Local, None) => Some(PathBuf::from(format!("/tmp/lockbroker-{}", env.user))),
        (Scope::Global, _) => Some(PathBuf::from("/run/lockbroker")),
    }
}

/// A client's address: `explicit`, else `LOCKBROKER_SOCKET`, else the
/// scope's default (`None` only for the process scope without
/// `LOCKBROKER_SOCKET`).
pub fn resolve(explicit: Option<PathBuf>, scope: Scope, env: &Env) -> Option<PathBuf> {
    explicit
        .or_else(|| env.socket.clone().map(PathBuf::from))
        .or_else(|| default_address(scope, env))
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
        let path = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            resolve(Some("/x.sock".into()), Scope::Local, &e),
            path("/x.sock")
        );
        assert_eq!(resolve(None, Scope::Local, &e), path("/e.sock"));
        assert_eq!(resolve(None, Scope::Process, &e), path("/e.sock"));
        assert_eq!(resolve(None, Scope::Process, &env(None, None)), None);
        assert_eq!(
            resolve(None, Scope::Local, &env(None, Some("/run/user/1000"))),
            path("/run/user/1000/lockbroker/broker.sock")
        );
        assert_eq!(
            resolve(None, Scope::Local, &env(None, None)),
            path("/tmp/lockbroker-1000/broker.sock")
        );
        assert_eq!(
            resolve(None, Scope::Global, &env(None, None)),
            path("/run/lockbroker/broker.sock")
        );
    }
}

//! Errors that stop the daemon from starting.

use std::io;
use std::path::PathBuf;

use lockbroker_proto::address::Untrusted;

/// `lockbrokerd`'s exit status when another daemon already serves its
/// address: a tool that autostarted it then connects to that one.
pub const EXIT_ALREADY_RUNNING: u8 = 3;

/// Why the daemon could not start serving its socket.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another daemon already serves this address.
    #[error("another lockbrokerd is already serving {}", path.display())]
    AlreadyRunning {
        /// The contested address.
        path: PathBuf,
    },
    /// The socket directory is unsafe to use: another user could pose as
    /// the daemon there.
    #[error("refusing the socket directory: {0}")]
    UnsafeDirectory(Untrusted),
    /// Something exists at the socket path that is not a socket.
    #[error("refusing to replace {}: it exists and is not a socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// An operating-system call failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The state database cannot be opened or read. The daemon refuses to
    /// start rather than start with empty state.
    #[error(
        "cannot use the state database {}: {reason}; refusing to start rather than start with empty state (move the file away to start afresh)",
        path.display()
    )]
    StateDatabase {
        /// The database file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend (the etcd cluster) cannot be used.
    #[error("cannot use the etcd cluster: {0}")]
    Backend(String),
    /// The state store's thread could not be started.
    #[error("cannot start the state store's thread: {0}")]
    Thread(io::Error),
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
}

impl StartError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StartError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

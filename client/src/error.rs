//! The client's error type.

use std::io;
use std::path::PathBuf;

use lockbroker_proto::address::{Untrusted, UntrustedPipe};
use lockbroker_proto::{ErrorCode, ErrorInfo, NameError, Response};

/// Everything that can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The scope has no default address and none was given (the process
    /// scope outside `lockbroker run`).
    #[error(
        "no lockbroker address: the self scope needs LOCKBROKER_SOCKET, which `lockbroker run` sets"
    )]
    NoAddress,
    /// No daemon could be reached at the address.
    #[error("cannot connect to the lockbroker daemon at {}: {source}", path.display())]
    Connect {
        /// The address tried.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The socket's directory, or the daemon behind the socket, belongs to a
    /// user this client does not trust: another user could pose as the
    /// daemon ([`Connector::allow_server_uid`](crate::Connector::allow_server_uid)
    /// opts in to a daemon run by another user). Nothing was sent.
    #[error("refusing the lockbroker daemon: {0}")]
    Untrusted(Untrusted),
    /// The pipe's server (Windows) runs as a user not trusted: another user
    /// may have created the pipe first
    /// ([`Connector::allow_server_sid`](crate::Connector::allow_server_sid)
    /// opts in to a daemon run by another user). Nothing was sent.
    #[error("refusing the lockbroker daemon: {0}")]
    UntrustedPipe(UntrustedPipe),
    /// The daemon refused the connection or answered the handshake oddly.
    #[error("handshake with the lockbroker daemon at {} failed: {message}", path.display())]
    Handshake {
        /// The address.
        path: PathBuf,
        /// The daemon's code, when it sent one.
        code: Option<ErrorCode>,
        /// What went wrong.
        message: String,
    },
    /// A name was rejected before anything was sent.
    #[error("invalid name {name:?}: {source}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it is invalid.
        source: NameError,
    },
    /// The daemon refused a request.
    #[error("lockbroker refused {what}: {message} ({code})")]
    Refused {
        /// What was asked, e.g. `acquire "deploy/status"`.
        what: String,
        /// The daemon's stable code.
        code: ErrorCode,
        /// The daemon's explanation.
        message: String,
    },
    /// The connection to the daemon is gone; every hold of this client has
    /// been released by the daemon.
    #[error("the connection to the lockbroker daemon was lost")]
    ConnectionLost,
    /// A state value was not the JSON expected, or could not be encoded.
    #[error("JSON of state key {key:?}: {source}")]
    Json {
        /// The key.
        key: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The blocking client could not start the runtime its connection runs
    /// on (out of threads or descriptors).
    #[error("cannot start the client runtime: {0}")]
    Runtime(io::Error),
    /// The daemon sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// The daemon's error code, if this error came from the daemon.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            Error::Handshake { code, .. } => *code,
            _ => None,
        }
    }

    /// Whether connecting failed because no daemon listens at the address
    /// (no socket, or nobody accepting on it), as opposed to a daemon that
    /// answered and refused: the case in which starting one can help.
    pub fn nobody_listens(&self) -> bool {
        match self {
            Error::Connect { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ),
            _ => false,
        }
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The daemon refused `what`.
pub(crate) fn refused(what: String, e: ErrorInfo) -> Error {
    Error::Refused {
        what,
        code: e.code,
        message: e.message,
    }
}

/// The daemon answered `what` with something no daemon of this protocol
/// sends.
pub(crate) fn unexpected(what: &str, response: Response) -> Error {
    Error::Protocol(format!("unexpected answer to {what}: {response:?}"))
}

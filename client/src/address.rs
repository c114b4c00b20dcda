//! Where the daemon of each scope listens, and why a client refuses one.
//!
//! The rules are the protocol crate's, shared with the daemon; this is the
//! part a client program needs: scopes, the variable that names a socket,
//! the directory check and the refusals.

pub use lockbroker_proto::address::{
    DirError, Expected, Identity, Problem, SOCKET_ENV, Scope, Untrusted, UntrustedPipe,
    private_address,
};
#[cfg(unix)]
pub use lockbroker_proto::address::{check_dir, euid};
#[cfg(windows)]
pub use lockbroker_proto::pipe::{current_identity, identity_of};

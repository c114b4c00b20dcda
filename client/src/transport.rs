//! Connecting to the daemon's socket (Unix) or pipe (Windows).
//!
//! The stream is close-on-exec (Rust's default), so a child process never
//! inherits a lock's connection unless the program hands it down on
//! purpose, as `lockbroker lock` does (`Client::connection_fd`).
//! [`connect`] also says who serves the socket (its uid on Unix, the
//! pipe server's process id on Windows), for the connector's trust check.

use std::io;
use std::path::Path;

// Tokio's halves, registered for writing as well: the reactor's wake-up
// when the daemon reads a request readies this CPU for the answer (a
// read-only registration was measured and dropped: BENCHMARKS.md, issue 12).
#[cfg(unix)]
pub(crate) use tokio::net::unix::{OwnedReadHalf as ReadHalf, OwnedWriteHalf as WriteHalf};

/// Connects to `path`; returns the halves and the user id of the process
/// that listens there (the socket's peer credentials).
#[cfg(unix)]
pub(crate) async fn connect(path: &Path) -> io::Result<(ReadHalf, WriteHalf, u32)> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    let uid = stream.peer_cred()?.uid();
    let (r, w) = stream.into_split();
    Ok((r, w, uid))
}

#[cfg(windows)]
pub(crate) use lockbroker_proto::pipe::{PipeReader as ReadHalf, PipeWriter as WriteHalf};

/// Connects to the pipe `path`; returns the halves and the process id of
/// the pipe's server.
#[cfg(windows)]
pub(crate) async fn connect(path: &Path) -> io::Result<(ReadHalf, WriteHalf, u32)> {
    lockbroker_proto::pipe::connect(path).await
}

//! Connecting to the daemon's socket (Unix) or pipe (Windows).
//!
//! The stream is close-on-exec (Rust's default), so a child process never
//! inherits a lock's connection unless the program hands it down on
//! purpose, as `lockbroker lock` does (`Client::connection_fd`).
//! [`connect`] also says which user serves the socket, for the connector's
//! trust check.

use std::io;
use std::path::Path;

#[cfg(unix)]
pub(crate) use tokio::net::unix::{OwnedReadHalf as ReadHalf, OwnedWriteHalf as WriteHalf};

/// Connects to `path`; returns the halves and the user id of the process
/// that listens there (the socket's peer credentials).
#[cfg(unix)]
pub(crate) async fn connect(path: &Path) -> io::Result<(ReadHalf, WriteHalf, Option<u32>)> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    let uid = stream.peer_cred()?.uid();
    let (r, w) = stream.into_split();
    Ok((r, w, Some(uid)))
}

#[cfg(windows)]
pub(crate) type ReadHalf = interprocess::os::windows::named_pipe::tokio::RecvPipeStream<
    interprocess::os::windows::named_pipe::pipe_mode::Bytes,
>;
#[cfg(windows)]
pub(crate) type WriteHalf = interprocess::os::windows::named_pipe::tokio::SendPipeStream<
    interprocess::os::windows::named_pipe::pipe_mode::Bytes,
>;

/// Connects to the pipe `path`. The pipe server's identity is not
/// verified yet (no user id: `None`); the daemon creates the pipe as its
/// first instance with an owner-only security descriptor.
#[cfg(windows)]
pub(crate) async fn connect(path: &Path) -> io::Result<(ReadHalf, WriteHalf, Option<u32>)> {
    use interprocess::os::windows::named_pipe::pipe_mode::Bytes;
    use interprocess::os::windows::named_pipe::tokio::DuplexPipeStream;
    let stream = DuplexPipeStream::<Bytes>::connect_by_path(path).await?;
    let (r, w) = stream.split();
    Ok((r, w, None))
}

//! Connecting to the daemon's socket (Unix) or pipe (Windows).
//!
//! The stream is close-on-exec (Rust's default), so a child process never
//! inherits a lock's connection.

use std::io;
use std::path::Path;

#[cfg(unix)]
pub(crate) use tokio::net::unix::{OwnedReadHalf as ReadHalf, OwnedWriteHalf as WriteHalf};

#[cfg(unix)]
pub(crate) async fn connect(path: &Path) -> io::Result<(ReadHalf, WriteHalf)> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    Ok(stream.into_split())
}

#[cfg(windows)]
pub(crate) type ReadHalf = interprocess::os::windows::named_pipe::tokio::RecvPipeStream<
    interprocess::os::windows::named_pipe::pipe_mode::Bytes,
>;
#[cfg(windows)]
pub(crate) type WriteHalf = interprocess::os::windows::named_pipe::tokio::SendPipeStream<
    interprocess::os::windows::named_pipe::pipe_mode::Bytes,
>;

#[cfg(windows)]
pub(crate) async fn connect(path: &Path) -> io::Result<(ReadHalf, WriteHalf)> {
    use interprocess::os::windows::named_pipe::pipe_mode::Bytes;
    use interprocess::os::windows::named_pipe::tokio::DuplexPipeStream;
    let stream = DuplexPipeStream::<Bytes>::connect_by_path(path).await?;
    Ok(stream.split())
}

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
compile_error!("the Windows transport is not written yet");

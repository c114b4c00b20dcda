//! The integration tests' harness: the shared one
//! ([`lockbroker_tests::harness`]), with the programs of this package.

use std::path::Path;

pub use lockbroker_tests::harness::*;

/// Path of the worker binary used for multi-process tests.
pub fn worker() -> &'static str {
    env!("CARGO_BIN_EXE_lb-worker")
}

/// The `lockbrokerd` binary, for tests that kill or restart the daemon
/// process.
pub fn daemon_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-daemon"))
}

/// The daemon program as a process on `socket`, with extra flags, once it
/// accepts connections.
pub async fn spawn_daemon(socket: &Path, flags: &[&std::ffi::OsStr]) -> tokio::process::Child {
    lockbroker_tests::harness::spawn_daemon(daemon_bin(), socket, flags).await
}

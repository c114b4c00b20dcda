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
/// serves.
pub async fn spawn_daemon(socket: &Path, flags: &[&std::ffi::OsStr]) -> DaemonProcess {
    DaemonProcess::start(daemon_bin(), socket, flags).await
}

/// Fails the test if `cond` does not hold within 20 seconds, asking again
/// every few milliseconds: for what only a blocking client can see.
pub fn wait_until_blocking(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

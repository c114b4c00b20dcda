//! The `lockbrokerd` binary driven from outside, in one test binary: its
//! process behaviour (signals or console events, exit statuses, one daemon
//! per socket or pipe, stale sockets, directory checks), systemd
//! integration, and the Python client's suite against it.

// Signals, socket files and directory modes. Windows counterpart: `windows`.
#[cfg(unix)]
mod process;
// Runs the Python suite against the daemon over a Unix socket: no Windows
// Python runs on the CI machine (the client's pipe transport is tested by
// the Python suite's own Linux tests).
#[cfg(unix)]
mod python_client;
// systemd exists only on Linux; the Windows service is `windows`'s.
#[cfg(unix)]
mod systemd;
#[cfg(windows)]
mod windows;

/// The daemon binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_lb-daemon");

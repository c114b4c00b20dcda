//! The `lockbrokerd` binary driven from outside, in one test binary: its
//! process behaviour (signals, exit statuses, one daemon per socket, stale
//! sockets, directory checks), systemd integration, and the Python
//! client's suite against it.
//!
//! Unix only: the tests use Unix sockets, signals and `/proc`; on Windows
//! the code is compiled, not run.

#![cfg(unix)]

mod process;
mod python_client;
mod systemd;

/// The daemon binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_lb-daemon");

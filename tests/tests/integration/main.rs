//! Integration tests: each drives a real daemon (in this process, on a
//! socket in its own temporary directory) through the public client, raw
//! protocol bytes, or separate worker processes.
//!
//! Unix only: the tests use Unix sockets, signals and `/proc`; on Windows
//! the code is compiled, not run.

#![cfg(unix)]

mod abandon;
mod bad_input;
mod cancel;
mod client_api;
mod durability;
mod exclusion;
mod fifo;
mod inspect;
mod memory;
mod rwlock;
mod semaphore;
mod server_identity;
mod state;
mod timeouts;
mod util;

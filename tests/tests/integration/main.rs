//! Integration tests: each drives a real daemon (in this process, on a
//! socket in its own temporary directory) through the public client, raw
//! protocol bytes, or separate worker processes.
//!
//! They run on Unix and on Windows (under Wine in CI): the daemon listens
//! on a socket or a pipe of its own. What cannot exist on a platform is
//! gated where it is, naming its counterpart on the other.

mod abandon;
mod bad_input;
mod blocking;
mod cancel;
mod client_api;
mod contention;
mod deadlock;
mod durability;
// The etcd backend's keys in etcd (etcd runs on Unix here).
#[cfg(unix)]
mod etcd_keys;
mod exclusion;
// Faults of etcd clusters and of daemons on them (etcd runs on Unix here).
#[cfg(unix)]
mod faults;
mod fifo;
mod handoff;
// Several daemons on one etcd cluster (etcd runs on Unix here).
#[cfg(unix)]
mod hosts;
mod inspect;
mod leases;
mod metrics;
// Reads the daemon's resident memory from /proc. No Windows counterpart
// yet: what bounds memory is the platform-independent lock table.
#[cfg(unix)]
mod memory;
mod rwlock;
mod semaphore;
// Directory modes and uids. Windows counterparts: the SID trust rules
// unit tests (`lockbroker_proto::address`) and the daemon tests' identity
// test (`daemon/windows.rs`).
#[cfg(unix)]
mod server_identity;
mod state;
mod timeouts;
mod util;
// Reads the host and user from Linux's files, and stands in for an old
// daemon on a Unix socket.
#[cfg(target_os = "linux")]
mod versions;

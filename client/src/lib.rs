//! Client for the lockbroker daemon: named mutexes, semaphores and
//! read-write locks shared by every process of a machine, granted strictly
//! first-come first-served, with timeouts — and released the moment their
//! holder's connection closes, even by `kill -9`, with the next holder told
//! the lock was abandoned.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> lockbroker::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let socket = lockbroker::address::private_address(dir.path()).unwrap();
//! # let config = lockbrokerd::Config::for_socket(&socket);
//! # let listener = lockbrokerd::transport::Listener::bind(&socket, None).unwrap();
//! # tokio::spawn(async move {
//! #     lockbrokerd::server::run(listener, &config, std::future::pending::<()>()).await.unwrap()
//! # });
//! use std::time::Duration;
//! use lockbroker::Connector;
//!
//! // Without `.socket(..)`: $LOCKBROKER_SOCKET, else the login session's daemon.
//! let client = Connector::new().socket(&socket).connect().await?;
//!
//! let status = client.mutex("deploy/status");
//! let guard = status.acquire().await?;
//! if guard.abandoned() {
//!     // The previous holder died holding the lock: check the file first.
//! }
//! println!("writing with fence {}", guard.fence());
//! guard.release().await?;
//!
//! // At most four of these at once, machine-wide; give up after a second.
//! let pool = client.semaphore("gpu-pool", 4);
//! match pool.acquire_timeout(Duration::from_secs(1)).await? {
//!     Some(_permit) => { /* use the resource; dropping the guard releases */ }
//!     None => eprintln!("all four are busy"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`Connector`] resolves the address and connects; [`Client`] is the
//!   async, cheaply cloned connection; one connection serves any number of
//!   tasks at once.
//! - [`Mutex`], [`Semaphore`] and [`RwLock`] are handles with `acquire`,
//!   `try_acquire` (never jumps the queue) and `acquire_timeout` forms.
//! - [`LockGuard`] is a hold: its fence, its abandoned flag, `release()` to
//!   see errors, or drop to release in the background. Dropping a pending
//!   acquire future cancels it on the daemon.
//! - [`State`] is the daemon's versioned key/value store: get, set,
//!   compare-and-set, remove, increment, list, [`Watch`] (a `Stream` of
//!   changes), JSON helpers, and writes guarded by a held lock.
//! - [`blocking`] offers the same for code without a Tokio runtime.
//! - [`Error`] says what went wrong; errors from the daemon carry its stable
//!   [`ErrorCode`].
//! - [`launch`] starts `lockbrokerd` and waits until it serves.
//! - [`actor`] reads and writes `LOCKBROKER_ACTOR`, the actors a command
//!   run under a lock runs within (deadlock detection).

pub mod actor;
pub mod address;
pub mod blocking;
mod client;
mod connector;
#[cfg(unix)]
mod direct;
mod error;
mod guard;
mod handle;
pub mod launch;
mod ops;
mod state;
mod transport;

pub use address::Scope;
pub use client::Client;
pub use connector::{Connector, DEFAULT_CONNECT_TIMEOUT};
pub use error::{Error, Result};
pub use guard::LockGuard;
pub use handle::{Mutex, RwLock, Semaphore};
pub use lockbroker_proto::{COMMIT, ChangeKind, StateEntry, Versioned};
pub use lockbroker_proto::{
    EntryInfo, EntryKind, ErrorCode, HolderInfo, Inspection, Limits, LockKind, NameError,
    ServerInfo, SessionInfo, WaiterInfo,
};
pub use state::{
    RemoveOutcome, State, Watch, WatchEvent, WatchOptions, WriteOptions, WriteOutcome,
};

/// This crate's README, compiled as doctests so its example stays true
/// (the README is packaged with the crate).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

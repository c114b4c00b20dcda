//! The lockbroker daemon as a library: `lockbrokerd` is a thin `main` over
//! it, and tests start it in-process on a socket of their own.
//!
//! # Layout
//!
//! - [`program`]: the `lockbrokerd` program (`main.rs` only calls it).
//! - [`config`]: command-line flags and the validated [`Config`].
//! - [`transport`]: binding the socket safely (one daemon per socket, stale
//!   socket reclaim, directory checks), accepting, peer credentials.
//! - [`server`]: the accept loop, connection limit and graceful shutdown.
//! - [`broker`]: [`Broker`](broker::Broker), what every session shares.
//! - [`backend`]: the seam between sessions and what keeps the locks and
//!   the state; [`Local`](backend::Local) is the in-memory table and store.
//! - [`session`]: one task per connection: the handshake and I/O loop, its
//!   lock requests and its state requests.
//! - `etcd` (feature `etcd`): the backend that keeps every lock in an
//!   etcd cluster, shared by the daemons of several hosts.
//! - [`lock_table`]: the synchronous lock table (FIFO queues, holds, fences,
//!   abandonment); it does no I/O.
//! - [`state`]: the shared key/value store on its own thread (versions,
//!   expiry, quotas, watches, redb persistence).
//! - [`metrics`]: what the sessions count, and the `--metrics-listen`
//!   endpoint.
//! - [`logfile`]: `--log-file`, a log that turns over at a size bound.
//! - [`shutdown`]: the signal fanned out to sessions.
//! - [`systemd`]: socket activation, readiness and the watchdog.
//! - `service` (Windows): installing, removing and running as a Windows
//!   service.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), lockbrokerd::error::StartError> {
//! use lockbrokerd::{config::Config, server, transport::Listener};
//!
//! let config = Config::for_socket("/tmp/demo.sock");
//! let listener = Listener::bind(&config.socket, config.scope)?;
//! server::run(listener, &config, tokio::signal::ctrl_c()).await?;
//! # Ok(())
//! # }
//! ```

pub mod acl;
pub mod backend;
pub mod broker;
pub mod config;
pub mod direct;
pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod identity;
pub mod lock_table;
pub mod logfile;
pub mod metrics;
pub mod program;
pub mod server;
#[cfg(windows)]
pub mod service;
pub mod session;
pub mod shutdown;
pub mod state;
pub mod systemd;
pub mod transport;

pub use config::Config;

/// The daemon's software version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the daemon was built from ("unknown" outside a checkout).
pub const COMMIT: &str = lockbroker_proto::COMMIT;
/// What `--version` shows: the version and the commit.
pub static LONG_VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{VERSION} (commit {COMMIT})"));

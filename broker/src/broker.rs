//! [`Broker`]: what every session shares — the backend (the lock table
//! and the state store), the limits, the session counters and the metrics. The server makes one and
//! hands it to each session it starts; sessions use nothing else of the
//! server's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lockbroker_proto::ServerInfo;

use crate::backend::{Backend, Local};
use crate::config::SessionLimits;
use crate::identity::Accounts;
use crate::lock_table::LockTable;
use crate::metrics::Metrics;
use crate::state::State;

/// What every session shares: the backend (locks and state), the limits
/// and counters.
#[derive(Debug)]
pub struct Broker {
    /// The locks and the state.
    pub backend: Box<dyn Backend>,
    /// Applied to every session.
    pub limits: SessionLimits,
    started: std::time::Instant,
    open_sessions: AtomicU64,
    next_session: AtomicU64,
    /// Raised when shutdown begins: from then on no grant is written
    /// straight into a socket (`direct`), so, as before, a session that
    /// is ending answers no grant made by another's end.
    ending: Arc<AtomicBool>,
    /// This host's name, shown with every session.
    pub host: String,
    /// The names of the peers' accounts.
    pub accounts: Accounts,
    /// What the sessions count, for `--metrics-listen` and `Metrics`.
    pub metrics: Metrics,
    /// Members of this group may break any hold (`--admin-group`).
    pub admin_gid: Option<u32>,
    /// Who may do what to which names (`--acl`); everyone everything
    /// without.
    pub acl: Option<Arc<crate::acl::Acl>>,
}

impl Broker {
    /// A broker with an empty lock table whose fences start above
    /// `fence_floor` and which keeps at most `max_abandoned` tombstones.
    pub fn new(
        limits: SessionLimits,
        state: State,
        fence_floor: u64,
        max_abandoned: usize,
    ) -> Broker {
        let local = Local {
            table: LockTable::new(fence_floor, max_abandoned),
            state,
        };
        Broker::with_backend(limits, Box::new(local))
    }

    /// A broker whose sessions use `backend`.
    pub fn with_backend(limits: SessionLimits, backend: Box<dyn Backend>) -> Broker {
        Broker {
            backend,
            limits,
            started: std::time::Instant::now(),
            open_sessions: AtomicU64::new(0),
            next_session: AtomicU64::new(0),
            ending: Arc::new(AtomicBool::new(false)),
            host: crate::identity::host_name(),
            accounts: Accounts::default(),
            metrics: Metrics::new(),
            admin_gid: None,
            acl: None,
        }
    }

    /// Shutdown begins: say so before the sessions are told.
    pub fn begin_ending(&self) {
        self.ending.store(true, Ordering::Release);
    }

    /// The flag [`Broker::begin_ending`] raises, for the sessions' gates.
    pub fn ending(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ending)
    }

    /// A new session id, unique in the daemon's life.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a session as open until the returned guard drops.
    pub fn session_opened(self: &Arc<Self>) -> OpenSession {
        self.open_sessions.fetch_add(1, Ordering::Relaxed);
        self.metrics.session_opened();
        OpenSession(Arc::clone(self))
    }

    /// Every metric, in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        self.metrics.render(
            self.open_sessions.load(Ordering::Relaxed),
            self.backend.state_size(),
        )
    }

    /// Facts for `inspect`.
    pub fn server_info(&self) -> ServerInfo {
        ServerInfo {
            version: crate::VERSION.to_owned(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            sessions: self.open_sessions.load(Ordering::Relaxed),
        }
    }
}

/// Keeps a session counted as open; see [`Broker::session_opened`].
#[derive(Debug)]
pub struct OpenSession(Arc<Broker>);

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

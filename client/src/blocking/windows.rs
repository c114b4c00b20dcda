//! The blocking client's connection on Windows: the async client on a
//! one-worker runtime of its own. (A named pipe opened for synchronous
//! I/O serializes a read and a write, so a thread reading for its own
//! answer, as on Unix, would hold up every other thread's request.)

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockbroker_proto::{Request, Welcome};
use tokio::runtime::Runtime;

use crate::connector::Connector;
use crate::error::{Error, Result};
use crate::ops::Op;
use crate::state::WatchEvent;

/// The async client and the runtime its connection task runs on: it must
/// keep running between calls (to route answers and keep the session
/// alive), which a `current_thread` runtime would only do inside
/// `block_on`.
pub(crate) struct Conn {
    client: crate::Client,
    runtime: Option<Runtime>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("client", &self.client)
            .finish()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Never wait: no drop may hang (or panic inside async code).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// An open watch.
#[derive(Debug)]
pub(crate) struct WatchHandle(crate::Watch);

impl Conn {
    /// Connects as `connector` says.
    pub(crate) fn connect(connector: &Connector) -> Result<Arc<Conn>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lockbroker-client")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let client = runtime.block_on(connector.connect())?;
        Ok(Arc::new(Conn {
            client,
            runtime: Some(runtime),
        }))
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("the runtime lives until drop")
            .block_on(f)
    }

    /// The daemon's greeting.
    pub(crate) fn welcome(&self) -> &Welcome {
        self.client.welcome()
    }

    /// On whose behalf acquires are made.
    pub(crate) fn actors(&self) -> &crate::connector::Actors {
        self.client.actors()
    }

    /// Sends `op`'s request and waits for its answer.
    pub(crate) fn run<T>(&self, op: Op<T>) -> Result<T> {
        self.block_on(self.client.run(op))
    }

    /// Sends a request whose answer nobody waits for.
    pub(crate) fn forget(&self, request: Request) {
        self.client.forget(request);
    }

    /// Waits at most `timeout` for hold `hold_id` to be told that someone
    /// waits behind it; whether it was.
    pub(crate) fn wait_contended(&self, hold_id: u64, timeout: Duration) -> bool {
        if self.client.is_contended(hold_id) || timeout.is_zero() {
            return self.client.is_contended(hold_id);
        }
        let told = self.client.contended(hold_id);
        // The timer must be made inside the runtime.
        self.block_on(async { tokio::time::timeout(timeout, told).await })
            .is_ok()
    }

    /// Waits at most `timeout` for hold `hold_id` to be revoked or the
    /// connection lost; whether either happened.
    pub(crate) fn wait_hold_lost(&self, hold_id: u64, timeout: Duration) -> bool {
        let gone = || self.client.is_revoked(hold_id) || self.client.is_lost();
        if gone() || timeout.is_zero() {
            return gone();
        }
        let lost = self.client.hold_lost(hold_id);
        // The timer must be made inside the runtime.
        self.block_on(async { tokio::time::timeout(timeout, lost).await })
            .is_ok()
    }

    /// Why hold `hold_id` was revoked, if it was.
    pub(crate) fn revocation(&self, hold_id: u64) -> Option<String> {
        self.client.revocation(hold_id)
    }

    /// Forgets what was heard of hold `hold_id`, which is ending.
    pub(crate) fn forget_hold(&self, hold_id: u64) {
        self.client.forget_hold(hold_id);
    }

    /// Starts the watch `op` asks for.
    pub(crate) fn watch(&self, op: Op<()>) -> Result<WatchHandle> {
        let state = self.client.state();
        Ok(WatchHandle(self.block_on(state.watch_op(op))?))
    }

    /// The next change `watch` sees, waiting until `deadline`.
    pub(crate) fn next_event(
        &self,
        watch: &mut WatchHandle,
        deadline: Option<Instant>,
    ) -> Option<WatchEvent> {
        let next = watch.0.next();
        match deadline {
            None => self.block_on(next),
            Some(at) => {
                let deadline = tokio::time::Instant::from_std(at);
                // The timer must be made inside the runtime.
                self.block_on(async { tokio::time::timeout_at(deadline, next).await })
                    .ok()
                    .flatten()
            }
        }
    }

    /// Stops `watch` (its drop tells the daemon).
    pub(crate) fn unwatch(&self, _watch: &mut WatchHandle) {}

    /// Whether the connection is gone.
    pub(crate) fn is_lost(&self) -> bool {
        self.client.is_lost()
    }
}

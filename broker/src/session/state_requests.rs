//! A session's shared-state requests: validation, guarded writes, and
//! watches.
//!
//! The store answers on the session's completion channel. A guarded write
//! is checked against the session's holds when it arrives, and until the
//! store has applied it, the session holds back any release, so the hold
//! is still held at the instant the write is applied. A session that ends
//! waits for its guarded writes before it releases anything.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use lockbroker_proto::{ErrorCode, ErrorInfo, Event, LockName, Request, Response, StateSet};
use tokio::sync::{broadcast, mpsc};

use tokio::io::AsyncWrite;

use super::{Session, shrink_index};
use crate::metrics::StateOp;
use crate::state::{Change, Completion, Guard, Op, ReplyTo};

/// Stop reading requests while state values of this many bytes wait for
/// the store (a durable store commits each write to disk, and a client can
/// send faster than that).
pub const STATE_INFLIGHT_BYTES: usize = 4 * 1024 * 1024;

/// Default page of `StateList`.
const DEFAULT_LIST_LIMIT: u32 = 1000;
/// Largest page of `StateList`.
const MAX_LIST_LIMIT: u32 = 100_000;

/// The state part of a session.
#[derive(Debug)]
pub(super) struct StateRequests {
    /// Where the state store sends this session's answers.
    completions_tx: mpsc::UnboundedSender<Box<Completion>>,
    /// Active watches by watch id (the `StateWatch` request id).
    watches: HashMap<u64, Watch>,
    /// Watches the store has not confirmed yet.
    watches_starting: HashMap<u64, Watch>,
    /// Every change the store publishes, once the session watches.
    changes: Option<broadcast::Receiver<Arc<Change>>>,
    /// Request ids of guarded writes the store has not answered yet. While
    /// there are any, releases wait in `deferred`, so a guarded write is
    /// applied only while its hold is held.
    guarded: HashSet<u64>,
    /// Request ids of state requests the store has not answered yet, with
    /// the bytes of value each carries.
    inflight: HashMap<u64, usize>,
    /// Their sum.
    inflight_bytes: usize,
}

impl StateRequests {
    /// Nothing asked yet; the store answers on `completions_tx`.
    pub(super) fn new(completions_tx: mpsc::UnboundedSender<Box<Completion>>) -> StateRequests {
        StateRequests {
            completions_tx,
            watches: HashMap::new(),
            watches_starting: HashMap::new(),
            changes: None,
            guarded: HashSet::new(),
            inflight: HashMap::new(),
            inflight_bytes: 0,
        }
    }

    /// Whether the store has answers this session waits for before it
    /// reads more (past the session's `max_pending`, or too many bytes).
    pub(super) fn backed_up(&self, max_pending: usize) -> bool {
        self.inflight.len() >= max_pending || self.inflight_bytes >= STATE_INFLIGHT_BYTES
    }

    /// Whether `id` names a state request still being answered, or a watch.
    pub(super) fn uses_id(&self, id: u64) -> bool {
        self.inflight.contains_key(&id)
            || self.watches.contains_key(&id)
            || self.watches_starting.contains_key(&id)
    }

    /// Whether to take the next published change now: the session
    /// watches, no watch is being set up (the store's answer decides which
    /// changes are the new watch's), and the caller's output is not backed
    /// up (a slow watcher then lags instead of growing its buffer).
    pub(super) fn takes_changes(&self) -> bool {
        self.changes.is_some() && self.watches_starting.is_empty()
    }

    /// The next change for a session that watches; pends forever otherwise
    /// (the select guard keeps it from being polled then).
    pub(super) async fn next_change(&mut self) -> Result<Arc<Change>, broadcast::error::RecvError> {
        match &mut self.changes {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

/// An active watch.
#[derive(Debug, Clone)]
pub(super) struct Watch {
    key: String,
    prefix: bool,
    with_values: bool,
    /// Live changes after this version are this watch's.
    live_from: u64,
}

impl Watch {
    fn matches(&self, key: &str) -> bool {
        if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key
        }
    }
}

fn invalid_key(e: impl std::fmt::Display) -> ErrorInfo {
    ErrorInfo::new(ErrorCode::InvalidName, format!("invalid key: {e}"))
}

impl<W: AsyncWrite + Unpin> Session<W> {
    fn uid(&self) -> u32 {
        // Quotas of peers without credentials (Windows) share one bucket.
        self.peer.info.uid.unwrap_or(u32::MAX)
    }

    fn submit(&mut self, id: u64, op: Op) {
        let reply = ReplyTo {
            tx: self.state.completions_tx.clone(),
            request_id: id,
            session_id: self.id(),
        };
        self.broker.backend.submit_state(op, reply);
    }

    /// Checks a write's guard; the write is then tracked until answered.
    fn guard(&mut self, id: u64, guard: Option<u64>) -> Result<Option<Guard>, ErrorInfo> {
        let Some(hold_id) = guard else {
            return Ok(None);
        };
        if !self.locks.has_hold(hold_id) {
            return Err(ErrorInfo::new(
                ErrorCode::GuardNotHeld,
                format!("this session does not hold {hold_id}; the guarded write was refused"),
            ));
        }
        self.state.guarded.insert(id);
        Ok(Some(Guard {
            session_id: self.id(),
            hold_id,
        }))
    }

    /// Checks a fenced write: a plain state write, on a valid lock name.
    /// The backend checks the fence as it applies the write.
    fn check_fenced(&self, lock: String, write: Request) -> Result<(Request, LockName), ErrorInfo> {
        let lock = LockName::new(lock).map_err(|e| {
            ErrorInfo::new(ErrorCode::InvalidName, format!("invalid lock name: {e}"))
        })?;
        let plain_write = matches!(
            write,
            Request::StateSet(StateSet { guard: None, .. })
                | Request::StateRemove { guard: None, .. }
                | Request::StateIncrement { guard: None, .. }
        );
        if !plain_write {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidArgument,
                "a fenced write must be a state set, remove or increment without a guard of its own",
            ));
        }
        Ok((write, lock))
    }

    pub(super) fn state_request(&mut self, id: u64, request: Request) {
        if let Err(e) = self.try_state_request(id, request) {
            self.error(id, e);
        }
    }

    fn try_state_request(&mut self, id: u64, request: Request) -> Result<(), ErrorInfo> {
        if self.id_in_use(id) {
            return Err(ErrorInfo::new(
                ErrorCode::DuplicateRequestId,
                format!("request id {id} is already used by a request still being answered"),
            ));
        }
        let (request, fenced) = match request {
            Request::StateFenced { lock, fence, write } => {
                let (write, lock) = self.check_fenced(lock, *write)?;
                (write, Some((lock, fence)))
            }
            other => (other, None),
        };
        if let Some(op) = metrics_op(&request) {
            self.broker.metrics.state_op(op);
        }
        let op = match request {
            Request::StateGet { key } => Op::Get {
                key: LockName::new(key).map_err(invalid_key)?,
            },
            Request::StateSet(StateSet {
                key,
                value,
                if_version,
                ttl_ms,
                guard,
            }) => {
                let key = LockName::new(key).map_err(invalid_key)?;
                let max = self.broker.backend.max_value_len();
                if value.len() > max as usize {
                    return Err(ErrorInfo::new(
                        ErrorCode::ValueTooLarge,
                        format!(
                            "a value of {} bytes for {key:?} is over the limit of {max}",
                            value.len()
                        ),
                    ));
                }
                Op::Set {
                    key,
                    value,
                    if_version,
                    ttl_ms,
                    uid: self.uid(),
                    guard: self.guard(id, guard)?,
                }
            }
            Request::StateRemove {
                key,
                if_version,
                guard,
            } => {
                let key = LockName::new(key).map_err(invalid_key)?;
                Op::Remove {
                    key,
                    if_version,
                    guard: self.guard(id, guard)?,
                }
            }
            Request::StateIncrement { key, delta, guard } => {
                let key = LockName::new(key).map_err(invalid_key)?;
                Op::Increment {
                    key,
                    delta,
                    uid: self.uid(),
                    guard: self.guard(id, guard)?,
                }
            }
            Request::StateList {
                prefix,
                start_after,
                limit,
                with_values,
            } => {
                lockbroker_proto::validate_prefix(&prefix).map_err(invalid_key)?;
                let limit = match limit {
                    0 => DEFAULT_LIST_LIMIT,
                    n => n.min(MAX_LIST_LIMIT),
                };
                Op::List {
                    prefix,
                    start_after,
                    limit: limit as usize,
                    with_values,
                }
            }
            Request::StateWatch {
                key,
                prefix,
                from_version,
                with_values,
            } => {
                if prefix {
                    lockbroker_proto::validate_prefix(&key).map_err(invalid_key)?;
                } else {
                    LockName::new(key.as_str()).map_err(invalid_key)?;
                }
                let count = self.state.watches.len() + self.state.watches_starting.len();
                let max = self.broker.limits.max_pending as usize;
                if count >= max {
                    return Err(ErrorInfo::new(
                        ErrorCode::TooManyPending,
                        format!(
                            "watch of {key:?}: this session already has {count} watches (limit {max})"
                        ),
                    ));
                }
                let need_receiver =
                    self.state.changes.is_none() && self.state.watches_starting.is_empty();
                self.state.watches_starting.insert(
                    id,
                    Watch {
                        key: key.clone(),
                        prefix,
                        with_values,
                        live_from: 0,
                    },
                );
                Op::Watch {
                    key,
                    prefix,
                    from_version,
                    need_receiver,
                }
            }
            Request::StateUnwatch { watch_id } => {
                // A watch whose start the store has not confirmed yet ends
                // too: its confirmation then finds nothing to start.
                let active = self.state.watches.remove(&watch_id).is_some();
                let starting = self.state.watches_starting.remove(&watch_id).is_some();
                if !active && !starting {
                    return Err(ErrorInfo::new(
                        ErrorCode::NotPending,
                        format!("no watch has id {watch_id}"),
                    ));
                }
                self.respond(id, Response::Done);
                return Ok(());
            }
            // Lock requests are handled before this is called.
            other => {
                tracing::error!(?other, "not a state request");
                return Err(ErrorInfo::new(ErrorCode::Internal, "misrouted request"));
            }
        };
        let bytes = match &op {
            Op::Set { value, .. } => value.len(),
            _ => 0,
        };
        let op = match fenced {
            Some((lock, fence)) => Op::Fenced {
                lock,
                fence,
                write: Box::new(op),
            },
            None => op,
        };
        self.state.inflight.insert(id, bytes);
        self.state.inflight_bytes += bytes;
        self.submit(id, op);
        Ok(())
    }

    /// An answer from the store.
    pub(super) fn completed(&mut self, done: Completion) {
        let id = done.request_id;
        if let Some(bytes) = self.state.inflight.remove(&id) {
            self.state.inflight_bytes -= bytes;
        }
        shrink_index(&mut self.state.inflight);
        self.respond(id, done.response);
        if let Some(start) = done.watch {
            // Kept even if this watch was ended meanwhile: later watches
            // count on the session's one receiver.
            if start.receiver.is_some() {
                self.state.changes = start.receiver;
            }
            if let Some(mut watch) = self.state.watches_starting.remove(&id) {
                watch.live_from = start.live_from;
                if start.lagged {
                    self.event(Event::WatchLagged { watch_id: id });
                }
                for change in &start.replay {
                    self.notify(id, &watch, change);
                }
                self.state.watches.insert(id, watch);
            }
        }
        if self.state.guarded.remove(&id) && self.state.guarded.is_empty() {
            self.run_deferred();
        }
    }

    fn notify(&mut self, watch_id: u64, watch: &Watch, change: &Change) {
        let value = match (&change.value, watch.with_values) {
            (Some(v), true) => Some(v.to_vec()),
            _ => None,
        };
        self.event(Event::StateChanged {
            watch_id,
            key: change.key.clone(),
            version: change.version,
            change: change.kind,
            value,
        });
    }

    /// A change published by the store (or the news that some were missed).
    pub(super) fn changed(&mut self, change: Result<Arc<Change>, broadcast::error::RecvError>) {
        match change {
            Ok(change) => {
                let matching: Vec<(u64, Watch)> = self
                    .state
                    .watches
                    .iter()
                    .filter(|(_, w)| change.version > w.live_from && w.matches(&change.key))
                    .map(|(id, w)| (*id, w.clone()))
                    .collect();
                for (id, watch) in matching {
                    self.notify(id, &watch, &change);
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(session_id = self.id(), missed, "watcher fell behind");
                let mut ids: Vec<u64> = self.state.watches.keys().copied().collect();
                ids.sort_unstable();
                for watch_id in ids {
                    self.event(Event::WatchLagged { watch_id });
                }
            }
            Err(broadcast::error::RecvError::Closed) => self.state.changes = None,
        }
    }

    /// Whether `request` releases something while guarded writes are out.
    pub(super) fn must_wait_for_guarded_writes(&self, request: &Request) -> bool {
        !self.state.guarded.is_empty()
            && matches!(
                request,
                Request::Release { .. } | Request::ReleaseByName { .. }
            )
    }

    /// Carries out held-back requests, in order, until one must wait again
    /// (behind guarded writes, or a listing one of them started).
    pub(super) fn run_deferred(&mut self) {
        while let Some((_, request)) = self.deferred.front() {
            if self.locks.is_listing()
                || self.locks.is_applying()
                || self.must_wait_for_guarded_writes(request)
            {
                break;
            }
            let (id, request) = self.deferred.pop_front().expect("front exists");
            self.dispatch(id, request);
        }
    }

    /// Before a session's holds are released at its end, its guarded writes
    /// must have been applied.
    pub(super) async fn finish_guarded_writes(
        &mut self,
        completions: &mut mpsc::UnboundedReceiver<Box<Completion>>,
    ) {
        while !self.state.guarded.is_empty() {
            match tokio::time::timeout(Duration::from_secs(30), completions.recv()).await {
                Ok(Some(done)) => self.completed(*done),
                _ => {
                    tracing::error!("the state store did not answer guarded writes");
                    break;
                }
            }
        }
        self.deferred.clear();
    }
}

/// What the metrics call state request `request`.
fn metrics_op(request: &Request) -> Option<StateOp> {
    Some(match request {
        Request::StateGet { .. } => StateOp::Get,
        Request::StateSet(_) => StateOp::Set,
        Request::StateRemove { .. } => StateOp::Remove,
        Request::StateIncrement { .. } => StateOp::Increment,
        Request::StateList { .. } => StateOp::List,
        Request::StateWatch { .. } => StateOp::Watch,
        Request::StateUnwatch { .. } => StateOp::Unwatch,
        _ => return None,
    })
}

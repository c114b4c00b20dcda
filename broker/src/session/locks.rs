//! A session's lock requests: acquire (granted, queued or refused), the
//! waits' deadlines and cancels, release by hold or by name, inspection a
//! chunk at a time, and the release of everything when the session ends.

use std::collections::{BTreeSet, HashMap, HashSet};

use lockbroker_proto::{ErrorCode, ErrorInfo, Grant, LockName, Response, frame};
use tokio::time::Instant;

use tokio::io::AsyncWrite;

use super::{Session, shrink_index};
use crate::config::{DEFAULT_INSPECT_LIMIT, MAX_INSPECT_LIMIT};
use crate::lock_table::{AcquireOutcome, AcquireSpec};

/// Entries a listing gathers per turn of the loop: a few hundred
/// microseconds of work at most, so others are served between turns.
pub const LIST_CHUNK: usize = 128;

/// An `Inspect` or `InspectAfter` being gathered, a chunk per turn; each
/// chunk is encoded as it comes, so no turn encodes the whole answer.
#[derive(Debug)]
struct Listing {
    /// The request.
    id: u64,
    prefix: String,
    /// The cursor: the last name gathered (or the request's `start_after`).
    after: String,
    /// Entries still wanted.
    left: usize,
    /// The answer so far.
    frame: frame::InspectionFrame,
}

/// A waiting acquire.
#[derive(Debug)]
struct Pending {
    name: LockName,
    deadline: Option<Instant>,
}

/// The lock part of a session.
#[derive(Debug, Default)]
pub(super) struct Locks {
    /// hold id → name, for every hold the session has: a release names
    /// only the hold, and the table is keyed by name.
    holds: HashMap<u64, LockName>,
    /// request id → waiting acquire.
    pending: HashMap<u64, Pending>,
    /// (deadline, request id) of waiting acquires with a timeout.
    deadlines: BTreeSet<(Instant, u64)>,
    /// The listing being gathered, if any.
    listing: Option<Listing>,
    /// The client asked that its holds end as released, not abandoned,
    /// when the connection closes (`Request::ReleaseOnClose`).
    release_on_close: bool,
}

impl Locks {
    /// The earliest deadline of a waiting acquire.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Whether a listing is being gathered (the session then reads and
    /// carries out nothing else).
    pub(super) fn is_listing(&self) -> bool {
        self.listing.is_some()
    }

    /// Whether `request_id` is a waiting acquire.
    pub(super) fn is_pending(&self, request_id: u64) -> bool {
        self.pending.contains_key(&request_id)
    }

    /// Whether the session has hold `hold_id`.
    pub(super) fn has_hold(&self, hold_id: u64) -> bool {
        self.holds.contains_key(&hold_id)
    }

    /// Holds end as released, not abandoned, when the connection closes.
    pub(super) fn release_on_close(&mut self) {
        self.release_on_close = true;
    }
}

impl<W: AsyncWrite + Unpin> Session<W> {
    pub(super) fn acquire(&mut self, id: u64, req: lockbroker_proto::Acquire) {
        if let Err(e) = self.try_acquire(id, req) {
            self.error(id, e);
        }
    }

    fn try_acquire(&mut self, id: u64, req: lockbroker_proto::Acquire) -> Result<(), ErrorInfo> {
        if self.id_in_use(id) {
            return Err(ErrorInfo::new(
                ErrorCode::DuplicateRequestId,
                format!("request id {id} is already used by a request still being answered"),
            ));
        }
        let name = LockName::new(req.name).map_err(|e| {
            ErrorInfo::new(ErrorCode::InvalidName, format!("invalid lock name: {e}"))
        })?;
        let mut spec = AcquireSpec::validate(req.kind, req.capacity, req.permits, req.timeout_ms)?;
        let limits = self.broker.limits;
        if self.locks.holds.len() + self.locks.pending.len() >= limits.max_holds as usize {
            return Err(ErrorInfo::new(
                ErrorCode::TooManyHolds,
                format!(
                    "this session already has {} holds and waiting acquires (limit {})",
                    self.locks.holds.len() + self.locks.pending.len(),
                    limits.max_holds
                ),
            ));
        }
        let at_pending_limit = self.locks.pending.len() >= limits.max_pending as usize;
        let is_try = !spec.may_wait;
        spec.may_wait &= !at_pending_limit;
        match self.broker.backend.acquire(&name, &self.peer, id, &spec)? {
            AcquireOutcome::Granted(grant) => {
                self.locks.holds.insert(grant.hold_id, name);
                self.respond(id, Response::Granted(grant));
            }
            AcquireOutcome::WouldBlock if is_try => self.respond(id, Response::TimedOut),
            AcquireOutcome::WouldBlock => {
                return Err(ErrorInfo::new(
                    ErrorCode::TooManyPending,
                    format!(
                        "this session already has {} acquires waiting (limit {})",
                        self.locks.pending.len(),
                        limits.max_pending
                    ),
                ));
            }
            AcquireOutcome::Queued => {
                // A deadline too far to represent is no deadline.
                let deadline = req.timeout_ms.and_then(|ms| {
                    Instant::now().checked_add(std::time::Duration::from_millis(ms))
                });
                if let Some(at) = deadline {
                    self.locks.deadlines.insert((at, id));
                }
                self.locks.pending.insert(id, Pending { name, deadline });
            }
        }
        Ok(())
    }

    /// A grant the table made while this session waited: records the hold of a waiting acquire now granted, and answers it
    /// unless the grant was `sent` to the peer already (`direct`).
    pub(super) fn granted_while_waiting(&mut self, request_id: u64, grant: Grant, sent: bool) {
        let Some(p) = self.locks.pending.remove(&request_id) else {
            // Cannot happen: a waiter stays pending until its grant arrives.
            tracing::error!(request_id, "grant for an acquire that is not pending");
            return;
        };
        if let Some(at) = p.deadline {
            self.locks.deadlines.remove(&(at, request_id));
        }
        self.locks.holds.insert(grant.hold_id, p.name);
        if !sent {
            self.respond(request_id, Response::Granted(grant));
        }
        shrink_index(&mut self.locks.pending);
    }

    /// Times out every waiting acquire whose deadline is at or before `now`.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(at, request_id)) = self.locks.deadlines.first() {
            if at > now {
                break;
            }
            self.locks.deadlines.pop_first();
            if self.withdraw(request_id) {
                self.respond(request_id, Response::TimedOut);
            }
            // Otherwise the grant won the race and is on its way.
        }
    }

    /// Takes waiting acquire `request_id` out of its queue; false if it was
    /// already granted.
    fn withdraw(&mut self, request_id: u64) -> bool {
        let Some(p) = self.locks.pending.get(&request_id) else {
            return false;
        };
        let (removed, grants) = self
            .broker
            .backend
            .cancel(p.name.as_str(), self.id(), request_id);
        grants.send();
        if removed {
            if let Some(p) = self.locks.pending.remove(&request_id)
                && let Some(at) = p.deadline
            {
                self.locks.deadlines.remove(&(at, request_id));
            }
            shrink_index(&mut self.locks.pending);
        }
        removed
    }

    pub(super) fn cancel(&mut self, id: u64, request_id: u64) {
        if self.withdraw(request_id) {
            self.respond(request_id, Response::Cancelled);
            self.respond(id, Response::Done);
        } else {
            self.error(
                id,
                ErrorInfo::new(
                    ErrorCode::NotPending,
                    format!("no waiting acquire has request id {request_id}"),
                ),
            );
        }
    }

    pub(super) fn release(&mut self, id: u64, hold_id: u64) {
        // The index and the table change together, so a hold is in both or
        // in neither: one answer for a hold this session does not have.
        let permits = self.locks.holds.remove(&hold_id).and_then(|name| {
            let (permits, grants) = self
                .broker
                .backend
                .release(name.as_str(), self.id(), hold_id);
            grants.send();
            permits
        });
        shrink_index(&mut self.locks.holds);
        match permits {
            Some(permits) => self.respond(id, Response::Released { permits }),
            None => self.error(
                id,
                ErrorInfo::new(
                    ErrorCode::UnknownHold,
                    format!("this session has no hold {hold_id}"),
                ),
            ),
        }
    }

    pub(super) fn release_by_name(&mut self, id: u64, name: String, count: u32) {
        let result = (|| {
            let name = LockName::new(name).map_err(|e| {
                ErrorInfo::new(ErrorCode::InvalidName, format!("invalid lock name: {e}"))
            })?;
            if count == 0 {
                return Err(ErrorInfo::new(
                    ErrorCode::InvalidPermits,
                    "a release must name at least one permit",
                ));
            }
            self.broker
                .backend
                .release_count(name.as_str(), self.id(), count)
                .map_err(ErrorInfo::from)
        })();
        match result {
            Ok(released) => {
                for hold_id in released.ended {
                    self.locks.holds.remove(&hold_id);
                }
                shrink_index(&mut self.locks.holds);
                released.deliveries.send();
                self.respond(id, Response::Released { permits: count });
            }
            Err(e) => self.error(id, e),
        }
    }

    /// Starts answering an `Inspect` (empty `start_after`) or
    /// `InspectAfter`; a small listing is answered at once.
    pub(super) fn inspect(&mut self, id: u64, prefix: String, start_after: String, limit: u32) {
        if let Err(e) = lockbroker_proto::validate_prefix(&prefix) {
            return self.error(
                id,
                ErrorInfo::new(ErrorCode::InvalidName, format!("invalid prefix: {e}")),
            );
        }
        let limit = match limit {
            0 => DEFAULT_INSPECT_LIMIT,
            n => n.min(MAX_INSPECT_LIMIT),
        };
        let server = self.broker.server_info();
        self.locks.listing = Some(Listing {
            id,
            prefix,
            after: start_after,
            left: limit as usize,
            frame: frame::InspectionFrame::new(id, server, self.broker.limits.max_frame_len),
        });
        self.list_step();
    }

    /// Gathers and encodes the next chunk of the listing, and answers once
    /// it has all it asked for, or all there is.
    pub(super) fn list_step(&mut self) {
        let Some(mut l) = self.locks.listing.take() else {
            return;
        };
        let table = &self.broker.backend;
        let (chunk, more) = table.list(&l.prefix, &l.after, l.left.min(LIST_CHUNK));
        l.left -= chunk.len();
        for entry in &chunk {
            if let Err(e) = l.frame.push(entry) {
                // Gathering the rest would only be thrown away.
                let message = format!("{e}; ask with a narrower prefix or a smaller limit");
                return self.error(l.id, ErrorInfo::new(ErrorCode::ResponseTooLarge, message));
            }
        }
        if let Some(last) = chunk.last() {
            l.after.clone_from(&last.name);
        }
        if more && l.left > 0 {
            self.locks.listing = Some(l);
            return;
        }
        l.frame.finish(more, self.out.queue_encoded());
    }

    /// Releases everything the session held (as abandoned, unless the
    /// client asked otherwise) and withdraws every wait.
    pub(super) fn cleanup(&mut self) {
        let abandon = !self.locks.release_on_close;
        let names: HashSet<&LockName> = self
            .locks
            .holds
            .values()
            .chain(self.locks.pending.values().map(|p| &p.name))
            .collect();
        for name in names {
            self.broker
                .backend
                .end_session(name.as_str(), self.id(), abandon)
                .send();
        }
        self.locks.holds.clear();
        self.locks.pending.clear();
        self.locks.deadlines.clear();
    }
}

//! The seam between sessions and what keeps the locks and the state.
//!
//! A session needs a few operations of "the locks" (acquire, cancel,
//! release, end its part in a name, end, list) and two of "the state"
//! (submit an operation, the largest value); [`Backend`] is exactly those.
//! [`Local`] is the backend of one daemon: the in-memory [`LockTable`] and
//! the [`State`] store (memory, or redb on disk); `etcd::Etcd` (feature
//! `etcd`) keeps both in an etcd cluster.
//!
//! The interface lets a backend answer later. An acquire that is not
//! granted at once returns [`AcquireOutcome::Queued`] and its outcome is
//! sent to the session's [`Peer`] as a [`Notice`](crate::lock_table::Notice):
//! a grant made by another session's release here, or a cluster's answer.
//! A change returns [`Applied::Later`] when it is applied elsewhere, and
//! `Notice::Applied` says when. State operations, fenced writes among
//! them, are answered on the session's completion channel ([`ReplyTo`]) in
//! every backend.
//!
//! A trait object (`Box<dyn Backend>` in the [`Broker`](crate::broker::Broker))
//! costs one indirect call per request and no allocation; the local lock
//! table itself stays synchronous and does no I/O.

use std::sync::Arc;

use lockbroker_proto::{EntryInfo, ErrorCode, ErrorInfo, LockName, Response};

use crate::lock_table::{AcquireOutcome, AcquireSpec, BreakRefusal, LockError, LockTable, Peer};
use crate::state::{Op, ReplyTo, State};

/// Whether a change a session asked for is applied when the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a change applied later is answered only when it is"]
pub enum Applied {
    /// Applied: answer now.
    Now,
    /// Applied later: [`Notice::Applied`](crate::lock_table::Notice) with
    /// the call's token says when, and the answers wait for it.
    Later,
}

/// What sessions need from the locks and the state.
///
/// Calls that change something take the session's `token` for the change;
/// a backend that applies it elsewhere returns [`Applied::Later`] and
/// notifies the session's [`Peer`] with that token once it is applied.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// Asks for `spec` on `name` for `peer`'s acquire `request_id`: granted
    /// now, queued (the outcome is sent to `peer` later: a grant, or, from
    /// a backend that decides elsewhere, a refusal), or not possible
    /// without waiting.
    fn acquire(
        &self,
        name: &LockName,
        peer: &Arc<Peer>,
        request_id: u64,
        spec: &AcquireSpec,
    ) -> Result<AcquireOutcome, LockError>;

    /// Whether holders that ask are told when someone waits behind them
    /// ([`Notice::Contended`](crate::lock_table::Notice::Contended)).
    fn tells_contention(&self) -> bool {
        true
    }

    /// Whether holds may have leases ([`Backend::revoke`]); acquires that
    /// ask for one are refused otherwise.
    fn has_leases(&self) -> bool {
        false
    }

    /// Breaks the holds of `name` (hold `hold_id` only, if given), if
    /// `may` allows each holder (see [`LockTable::break_holds`]); the ids
    /// broken, or why none was.
    fn break_holds(
        &self,
        name: &LockName,
        hold_id: Option<u64>,
        may: &dyn Fn(&lockbroker_proto::SessionInfo) -> bool,
        message: &str,
    ) -> Result<Vec<u64>, ErrorInfo> {
        let _ = (hold_id, may, message);
        Err(ErrorInfo::new(
            ErrorCode::Unsupported,
            format!(
                "break of {:?}: this daemon's backend cannot break holds",
                name.as_str()
            ),
        ))
    }

    /// Ends hold `hold_id` of `peer` on `name` as abandoned (its lease ran
    /// out); whether it was there.
    fn revoke(&self, name: &str, peer: &Arc<Peer>, hold_id: u64) -> bool {
        let _ = (name, peer, hold_id);
        false
    }

    /// Withdraws `peer`'s waiting acquire `request_id` on `name`; `None`
    /// if it was granted meanwhile (the grant is on its way).
    fn cancel(&self, name: &str, peer: &Arc<Peer>, request_id: u64, token: u64) -> Option<Applied>;

    /// Releases hold `hold_id` of `peer` on `name`: the permits it had,
    /// or `None` if there is no such hold.
    fn release(
        &self,
        name: &str,
        peer: &Arc<Peer>,
        hold_id: u64,
        token: u64,
    ) -> Option<(u32, Applied)>;

    /// Releases `count` permits of `peer`'s holds on `name`, oldest first,
    /// all or nothing: the holds that ended entirely.
    fn release_count(
        &self,
        name: &str,
        peer: &Arc<Peer>,
        count: u32,
        token: u64,
    ) -> Result<(Vec<u64>, Applied), LockError>;

    /// Ends the session's holds and waits on `name`; its holds count as
    /// abandoned when `abandon`.
    fn end_session(&self, name: &str, peer: &Arc<Peer>, abandon: bool);

    /// The session has ended: every name it used was given to
    /// [`Backend::end_session`].
    fn session_ended(&self, _peer: &Arc<Peer>, _abandon: bool) {}

    /// Up to `limit` entries under `prefix` after `start_after`, in name
    /// order, and whether more may follow; `None` if they are sent to
    /// `peer` later, with `token`.
    fn list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
        peer: &Arc<Peer>,
        token: u64,
    ) -> Option<(Vec<EntryInfo>, bool)>;

    /// Hands a state operation over; its answer comes on `reply`.
    fn submit_state(&self, op: Op, reply: ReplyTo);

    /// The largest state value accepted.
    fn max_value_len(&self) -> u32;

    /// The state's `(keys, bytes)` as its quotas count them, where this
    /// daemon keeps it.
    fn state_size(&self) -> Option<(u64, u64)> {
        None
    }
}

/// One daemon's own locks and state.
#[derive(Debug)]
pub struct Local {
    /// Every lock entry.
    pub table: LockTable,
    /// The shared state.
    pub state: State,
}

// Every change is applied by the call; grants it made are sent once the
// table's shard lock is gone, which it is when the table's call returns.
impl Backend for Local {
    fn acquire(
        &self,
        name: &LockName,
        peer: &Arc<Peer>,
        request_id: u64,
        spec: &AcquireSpec,
    ) -> Result<AcquireOutcome, LockError> {
        self.table.acquire(name, peer, request_id, spec)
    }

    fn cancel(&self, name: &str, peer: &Arc<Peer>, request_id: u64, _: u64) -> Option<Applied> {
        let (removed, grants) = self.table.cancel(name, peer.id(), request_id);
        grants.send();
        removed.then_some(Applied::Now)
    }

    fn release(
        &self,
        name: &str,
        peer: &Arc<Peer>,
        hold_id: u64,
        _: u64,
    ) -> Option<(u32, Applied)> {
        let (permits, grants) = self.table.release(name, peer.id(), hold_id);
        grants.send();
        permits.map(|p| (p, Applied::Now))
    }

    fn release_count(
        &self,
        name: &str,
        peer: &Arc<Peer>,
        count: u32,
        _: u64,
    ) -> Result<(Vec<u64>, Applied), LockError> {
        let released = self.table.release_count(name, peer.id(), count)?;
        released.deliveries.send();
        Ok((released.ended, Applied::Now))
    }

    fn end_session(&self, name: &str, peer: &Arc<Peer>, abandon: bool) {
        self.table.end_session(name, peer.id(), abandon).send();
    }

    fn has_leases(&self) -> bool {
        true
    }

    fn break_holds(
        &self,
        name: &LockName,
        hold_id: Option<u64>,
        may: &dyn Fn(&lockbroker_proto::SessionInfo) -> bool,
        message: &str,
    ) -> Result<Vec<u64>, ErrorInfo> {
        let what = match hold_id {
            Some(id) => format!("hold {id} of {:?}", name.as_str()),
            None => format!("the holds of {:?}", name.as_str()),
        };
        let (ids, grants) = self
            .table
            .break_holds(name.as_str(), hold_id, may, message)
            .map_err(|e| match e {
                BreakRefusal::NotHeld => ErrorInfo::new(
                    ErrorCode::NotHeld,
                    format!("break of {what}: nobody holds it"),
                ),
                BreakRefusal::Forbidden(hold, who) => ErrorInfo::new(
                    ErrorCode::Forbidden,
                    format!(
                        "break of {what}: hold {hold} is of session {} (uid {}): only its user, root and the daemon's admin group may break it; nothing was broken",
                        who.session_id,
                        who.uid.map_or("unknown".into(), |u| u.to_string()),
                    ),
                ),
            })?;
        grants.send();
        Ok(ids)
    }

    fn revoke(&self, name: &str, peer: &Arc<Peer>, hold_id: u64) -> bool {
        let (revoked, grants) = self.table.revoke(name, peer.id(), hold_id);
        grants.send();
        revoked
    }

    fn session_ended(&self, peer: &Arc<Peer>, _abandon: bool) {
        self.table.session_ended(peer.id());
    }

    fn list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
        _: &Arc<Peer>,
        _: u64,
    ) -> Option<(Vec<EntryInfo>, bool)> {
        Some(self.table.list(prefix, start_after, limit))
    }

    fn submit_state(&self, op: Op, reply: ReplyTo) {
        // The fence is checked now and the write handed to the store with
        // nothing between, so a release that comes later (and any write by
        // the next holder) is ordered after it.
        if let Op::Fenced { lock, fence, write } = op {
            if self.table.fence_is_live(lock.as_str(), fence) {
                self.state.submit(*write, reply);
            } else {
                reply.answer(Response::Error(stale_fence(&lock, fence)));
            }
            return;
        }
        self.state.submit(op, reply);
    }

    fn max_value_len(&self) -> u32 {
        self.state.max_value_len()
    }

    fn state_size(&self) -> Option<(u64, u64)> {
        Some(self.state.size())
    }
}

/// The refusal of a fenced write whose fence is not live.
pub fn stale_fence(lock: &LockName, fence: u64) -> ErrorInfo {
    ErrorInfo::new(
        ErrorCode::StaleFence,
        format!("lock {lock:?} has no live hold with fence {fence}; the write was refused"),
    )
}

#[cfg(test)]
mod tests {
    use lockbroker_proto::io::FrameReader;
    use lockbroker_proto::{
        Acquire, ClientMessage, DEFAULT_MAX_FRAME_LEN, Hello, LockKind, MAGIC, PROTOCOL_VERSION,
        Request, Response, ServerMessage, frame,
    };
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::broker::Broker;
    use crate::config::SessionLimits;
    use crate::lock_table::{Delivery, Notice};
    use crate::state::StateConfig;
    use crate::transport::PeerCred;

    /// The local backend, except that nothing is answered at once: each
    /// grant, each applied change and each page of a listing is sent a
    /// moment later from another task, as a backend that applies them
    /// over the network (etcd) sends them.
    #[derive(Debug)]
    struct Later(Local);

    /// Sends `notice` to `peer` from another task, after a turn.
    fn later(peer: &Arc<Peer>, notice: Notice) {
        let peer = Arc::clone(peer);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            peer.notify(notice);
        });
    }

    impl Backend for Later {
        fn acquire(
            &self,
            name: &LockName,
            peer: &Arc<Peer>,
            request_id: u64,
            spec: &AcquireSpec,
        ) -> Result<AcquireOutcome, LockError> {
            match self.0.acquire(name, peer, request_id, spec)? {
                AcquireOutcome::Granted(grant) => {
                    let delivery = Delivery {
                        to: Arc::clone(peer),
                        request_id,
                        grant,
                    };
                    tokio::spawn(async move {
                        tokio::task::yield_now().await;
                        delivery.send();
                    });
                }
                AcquireOutcome::WouldBlock => later(peer, Notice::WouldBlock { request_id }),
                AcquireOutcome::Queued => {}
            }
            Ok(AcquireOutcome::Queued)
        }
        fn cancel(
            &self,
            name: &str,
            peer: &Arc<Peer>,
            request_id: u64,
            token: u64,
        ) -> Option<Applied> {
            let applied = self.0.cancel(name, peer, request_id, token)?;
            assert_eq!(applied, Applied::Now);
            later(peer, Notice::Applied { token });
            Some(Applied::Later)
        }
        fn release(
            &self,
            name: &str,
            peer: &Arc<Peer>,
            hold_id: u64,
            token: u64,
        ) -> Option<(u32, Applied)> {
            let (permits, applied) = self.0.release(name, peer, hold_id, token)?;
            assert_eq!(applied, Applied::Now);
            later(peer, Notice::Applied { token });
            Some((permits, Applied::Later))
        }
        fn release_count(
            &self,
            name: &str,
            peer: &Arc<Peer>,
            count: u32,
            token: u64,
        ) -> Result<(Vec<u64>, Applied), LockError> {
            let (ended, applied) = self.0.release_count(name, peer, count, token)?;
            assert_eq!(applied, Applied::Now);
            later(peer, Notice::Applied { token });
            Ok((ended, Applied::Later))
        }
        fn end_session(&self, name: &str, peer: &Arc<Peer>, abandon: bool) {
            self.0.end_session(name, peer, abandon);
        }
        fn list(
            &self,
            prefix: &str,
            start_after: &str,
            limit: usize,
            peer: &Arc<Peer>,
            token: u64,
        ) -> Option<(Vec<EntryInfo>, bool)> {
            let (entries, more) = self.0.list(prefix, start_after, limit, peer, token)?;
            later(
                peer,
                Notice::Listed {
                    token,
                    entries,
                    more,
                },
            );
            None
        }
        fn submit_state(&self, op: Op, reply: ReplyTo) {
            self.0.submit_state(op, reply);
        }
        fn max_value_len(&self) -> u32 {
            self.0.max_value_len()
        }
    }

    fn acquire(name: &str, timeout_ms: Option<u64>) -> Request {
        Request::Acquire(Acquire {
            name: name.into(),
            kind: LockKind::Mutex,
            capacity: 1,
            permits: 1,
            timeout_ms,
        })
    }

    /// A session over a backend that answers everything later is served as
    /// over the local one: the grant is answered, a second acquire of the
    /// same mutex waits (and times out) behind it, a try fails, a wait is
    /// cancelled, the listing shows the hold, and a release frees it.
    #[tokio::test]
    async fn a_backend_whose_grants_arrive_later_serves_sessions() {
        let state = State::open(&StateConfig::default()).unwrap().0;
        let local = Local {
            table: LockTable::new(0, 16),
            state,
        };
        let broker = Arc::new(Broker::with_backend(
            SessionLimits::default(),
            Box::new(Later(local)),
        ));
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(theirs);
        let (_trigger, shutdown) = crate::shutdown::channel();
        let cred = PeerCred::default();
        tokio::spawn(crate::session::run(r, w, cred, broker, shutdown));
        let (r, mut w) = tokio::io::split(ours);
        let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME_LEN);
        let mut send = Vec::new();
        let hello = ClientMessage::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            client_name: "later".into(),
        });
        frame::encode(&hello, DEFAULT_MAX_FRAME_LEN, &mut send).unwrap();
        for (id, request) in [(1, acquire("m", None)), (2, acquire("m", Some(20)))] {
            let msg = ClientMessage::Request { id, request };
            frame::encode(&msg, DEFAULT_MAX_FRAME_LEN, &mut send).unwrap();
        }
        w.write_all(&send).await.unwrap();
        let mut next = async || match reader.read_message::<ServerMessage>().await.unwrap() {
            Some(ServerMessage::Response { id, response }) => (id, response),
            Some(ServerMessage::Welcome(_)) => (0, Response::Done),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(next().await.0, 0, "the welcome");
        let (id, granted) = next().await;
        let Response::Granted(grant) = granted else {
            panic!("expected a grant, got {granted:?}");
        };
        assert_eq!(id, 1);
        assert_eq!(next().await, (2, Response::TimedOut));
        // A try is answered later too; a withdrawn wait once its
        // withdrawal is applied; a listing a page at a time, later.
        send.clear();
        for (id, request) in [
            (3, acquire("m", Some(0))),
            (4, acquire("m", None)),
            (5, Request::Cancel { request_id: 4 }),
            (
                6,
                Request::Inspect {
                    prefix: String::new(),
                    limit: 0,
                },
            ),
        ] {
            let msg = ClientMessage::Request { id, request };
            frame::encode(&msg, DEFAULT_MAX_FRAME_LEN, &mut send).unwrap();
        }
        w.write_all(&send).await.unwrap();
        // Answers may come in any order (PROTOCOL.md 7).
        let mut answers = std::collections::BTreeMap::new();
        while answers.len() < 4 {
            let (id, response) = next().await;
            assert!(
                answers.insert(id, response).is_none(),
                "{id} answered twice"
            );
        }
        assert_eq!(answers[&3], Response::TimedOut);
        assert_eq!(answers[&4], Response::Cancelled);
        assert_eq!(answers[&5], Response::Done);
        let Some(Response::Inspection(inspection)) = answers.remove(&6) else {
            panic!("expected an inspection, got {answers:?}");
        };
        assert_eq!(inspection.entries.len(), 1);
        assert_eq!(inspection.entries[0].holders[0].hold_id, grant.hold_id);
        assert!(inspection.entries[0].waiters.is_empty());
        let release = ClientMessage::Request {
            id: 7,
            request: Request::Release {
                hold_id: grant.hold_id,
            },
        };
        send.clear();
        frame::encode(&release, DEFAULT_MAX_FRAME_LEN, &mut send).unwrap();
        w.write_all(&send).await.unwrap();
        assert_eq!(next().await, (7, Response::Released { permits: 1 }));
    }
}

//! The seam between sessions and what keeps the locks and the state.
//!
//! A session needs a few operations of "the locks" (acquire, cancel,
//! release, end its part, check a fence, list) and two of "the state"
//! (submit an operation, the largest value); [`Backend`] is exactly those.
//! [`Local`] is the backend of one daemon: the in-memory [`LockTable`] and
//! the [`State`] store (memory, or redb on disk).
//!
//! The interface lets a backend answer later. An acquire that is not
//! granted at once returns [`AcquireOutcome::Queued`] and its grant is sent
//! to the session's [`Peer`] whenever it is made — by another session's
//! release here, or by a remote cluster's answer in a backend that has
//! one. State operations are answered on the session's completion channel
//! ([`ReplyTo`]) in every backend. So a backend whose grants arrive over
//! the network fits behind the same sessions, protocol and tests.
//!
//! A trait object (`Box<dyn Backend>` in the [`Broker`](crate::broker::Broker))
//! costs one indirect call per request and no allocation; the local lock
//! table itself stays synchronous and does no I/O.

use std::sync::Arc;

use lockbroker_proto::{EntryInfo, LockName};

use crate::lock_table::{
    AcquireOutcome, AcquireSpec, Grants, LockError, LockTable, Peer, Released,
};
use crate::state::{Op, ReplyTo, State};

/// What sessions need from the locks and the state.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// Asks for `spec` on `name` for `peer`'s acquire `request_id`: granted
    /// now, queued (the grant is sent to `peer` later), or not possible
    /// without waiting.
    fn acquire(
        &self,
        name: &LockName,
        peer: &Arc<Peer>,
        request_id: u64,
        spec: &AcquireSpec,
    ) -> Result<AcquireOutcome, LockError>;

    /// Withdraws session `session_id`'s waiting acquire `request_id` on
    /// `name`; false if it was granted meanwhile (the grant is on its way).
    fn cancel(&self, name: &str, session_id: u64, request_id: u64) -> (bool, Grants);

    /// Releases hold `hold_id` of the session on `name`: the permits it
    /// had, or `None` if there is no such hold.
    fn release(&self, name: &str, session_id: u64, hold_id: u64) -> (Option<u32>, Grants);

    /// Releases `count` permits of the session's holds on `name`, oldest
    /// first, all or nothing.
    fn release_count(&self, name: &str, session_id: u64, count: u32)
    -> Result<Released, LockError>;

    /// Ends the session's holds and waits on `name`; its holds count as
    /// abandoned when `abandon`.
    fn end_session(&self, name: &str, session_id: u64, abandon: bool) -> Grants;

    /// Whether `name` has a live hold with `fence`, of any session.
    fn fence_is_live(&self, name: &str, fence: u64) -> bool;

    /// Up to `limit` entries under `prefix` after `start_after`, in name
    /// order; whether more may follow.
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> (Vec<EntryInfo>, bool);

    /// Hands a state operation over; its answer comes on `reply`.
    fn submit_state(&self, op: Op, reply: ReplyTo);

    /// The largest state value accepted.
    fn max_value_len(&self) -> u32;
}

/// One daemon's own locks and state.
#[derive(Debug)]
pub struct Local {
    /// Every lock entry.
    pub table: LockTable,
    /// The shared state.
    pub state: State,
}

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

    fn cancel(&self, name: &str, session_id: u64, request_id: u64) -> (bool, Grants) {
        self.table.cancel(name, session_id, request_id)
    }

    fn release(&self, name: &str, session_id: u64, hold_id: u64) -> (Option<u32>, Grants) {
        self.table.release(name, session_id, hold_id)
    }

    fn release_count(
        &self,
        name: &str,
        session_id: u64,
        count: u32,
    ) -> Result<Released, LockError> {
        self.table.release_count(name, session_id, count)
    }

    fn end_session(&self, name: &str, session_id: u64, abandon: bool) -> Grants {
        self.table.end_session(name, session_id, abandon)
    }

    fn fence_is_live(&self, name: &str, fence: u64) -> bool {
        self.table.fence_is_live(name, fence)
    }

    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> (Vec<EntryInfo>, bool) {
        self.table.list(prefix, start_after, limit)
    }

    fn submit_state(&self, op: Op, reply: ReplyTo) {
        self.state.submit(op, reply);
    }

    fn max_value_len(&self) -> u32 {
        self.state.max_value_len()
    }
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
    use crate::lock_table::Delivery;
    use crate::state::StateConfig;
    use crate::transport::PeerCred;

    /// The local backend, except that no acquire is granted at once: each
    /// grant is sent a moment later from another task, as a backend whose
    /// grants come back over the network would send them.
    #[derive(Debug)]
    struct Later(Local);

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
                    Ok(AcquireOutcome::Queued)
                }
                other => Ok(other),
            }
        }
        fn cancel(&self, name: &str, session_id: u64, request_id: u64) -> (bool, Grants) {
            self.0.cancel(name, session_id, request_id)
        }
        fn release(&self, name: &str, session_id: u64, hold_id: u64) -> (Option<u32>, Grants) {
            self.0.release(name, session_id, hold_id)
        }
        fn release_count(
            &self,
            name: &str,
            session_id: u64,
            count: u32,
        ) -> Result<Released, LockError> {
            self.0.release_count(name, session_id, count)
        }
        fn end_session(&self, name: &str, session_id: u64, abandon: bool) -> Grants {
            self.0.end_session(name, session_id, abandon)
        }
        fn fence_is_live(&self, name: &str, fence: u64) -> bool {
            self.0.fence_is_live(name, fence)
        }
        fn list(&self, prefix: &str, start_after: &str, limit: usize) -> (Vec<EntryInfo>, bool) {
            self.0.list(prefix, start_after, limit)
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

    /// A session over a backend whose grants all arrive later is served as
    /// over the local one: the grant is answered, a second acquire of the
    /// same mutex waits (and times out) behind it, and a release frees it.
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
        let cred = PeerCred {
            pid: None,
            uid: None,
            gid: None,
        };
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
        let release = ClientMessage::Request {
            id: 3,
            request: Request::Release {
                hold_id: grant.hold_id,
            },
        };
        send.clear();
        frame::encode(&release, DEFAULT_MAX_FRAME_LEN, &mut send).unwrap();
        w.write_all(&send).await.unwrap();
        assert_eq!(next().await, (3, Response::Released { permits: 1 }));
    }
}

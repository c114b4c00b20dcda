//! The lock table: every named lock's capacity, holders and FIFO queue.
//!
//! The table is synchronous and does no I/O. Names are spread by hash over
//! [`SHARDS`] shards, each an ordered map behind its own mutex. Each method
//! changes one entry under its shard's lock and returns what must happen
//! next (a [`Delivery`] per grant it made to a waiting session); the caller
//! sends those after the lock is gone, so no session is woken while a
//! shard is locked. No shard lock is held while taking another shard's.
//!
//! The shards are ordered so that a listing costs what it returns:
//! [`LockTable::list`] merges the shards from a cursor, visiting only the
//! names it lists, each under a short lock of its own shard. A session can
//! so page through a million names while every other session is served;
//! a hash map would have to be walked whole, and sorted, for every page.
//! Ordered maps also give their memory back when names go, where a hash
//! table keeps the capacity of its largest moment.
//!
//! Every kind of lock is counted permits on one entry:
//! - a semaphore has capacity N and a request weighs its permits;
//! - a rwlock has capacity [`RW_WEIGHT`]: a shared request weighs 1, an
//!   exclusive one the whole capacity;
//! - a mutex is a rwlock that is only taken exclusively, so a mutex request
//!   weighs the whole capacity too. Mutex and rwlock requests therefore mix
//!   on one name: `lockbroker lock NAME` and `lockbroker lock --shared NAME`
//!   exclude each other as `flock` and `flock -s` do. Only a semaphore and
//!   the other kinds cannot share a name.
//!
//! So one rule serves all three: the head of the queue is granted when its
//! weight fits in what is free, and granting continues down the queue while
//! the head fits. Nothing behind the head is ever served first, which is what
//! keeps a large request (or an exclusive rwlock request) from starving.
//!
//! **Abandoned flags.** When a session ends holding a name, the name's flag
//! is set, and the next grant reports it. A name nobody holds or waits for
//! is kept only for its flag: a *tombstone*. At most `max_abandoned`
//! tombstones are kept; past that the oldest (the one idle longest with its
//! flag) is forgotten first, so the next grant on it reports nothing. A
//! name in use keeps its flag whatever the count, so memory is bounded by
//! the names in use (bounded per session) plus `max_abandoned`. The list of
//! tombstones has its own mutex, taken inside a shard's lock; no shard lock
//! is ever taken while it is held.
//!
//! Fences and hold ids come from daemon-wide counters: a fence is strictly
//! greater than every fence before it, for any name, which is more than the
//! per-name guarantee needs and survives an entry being forgotten.

use std::cmp::Reverse;
use std::collections::btree_map::Entry as MapEntry;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use lockbroker_proto::{
    EntryInfo, EntryKind, ErrorCode, ErrorInfo, Grant, HolderInfo, LockKind, LockName, SessionInfo,
    WaiterInfo,
};
use tokio::sync::mpsc;

use crate::direct::Gate;

/// A rwlock's capacity; an exclusive request takes all of it.
pub const RW_WEIGHT: u64 = u32::MAX as u64;

/// Shards of the table: enough that a few runtime workers seldom meet on
/// one lock, few enough that merging them for a listing stays cheap.
pub const SHARDS: usize = 16;

/// Why the table refused a request. The session turns it into the
/// protocol's error (its stable code and this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// An acquire of no permits.
    #[error("an acquire must ask for at least one permit")]
    NoPermits,
    /// A mutex has one permit.
    #[error("{permits} permits asked of a mutex, whose capacity is 1")]
    MutexPermits {
        /// Permits asked for.
        permits: u32,
    },
    /// A semaphore of no permits.
    #[error("a semaphore's capacity must be at least 1")]
    ZeroCapacity,
    /// More permits than the semaphore has.
    #[error("{permits} permits asked of a semaphore of capacity {capacity}")]
    AboveCapacity {
        /// Permits asked for.
        permits: u32,
        /// The semaphore's capacity.
        capacity: u32,
    },
    /// A rwlock request is one permit.
    #[error("a rwlock request takes exactly 1 permit, not {permits}")]
    RwPermits {
        /// Permits asked for.
        permits: u32,
    },
    /// The name is in use as another kind of lock.
    #[error("{name:?} is in use as a {in_use}, not a {asked}")]
    KindMismatch {
        /// The name.
        name: String,
        /// What it is in use as.
        in_use: EntryKind,
        /// What was asked for.
        asked: EntryKind,
    },
    /// The semaphore is in use with another capacity.
    #[error("semaphore {name:?} is in use with capacity {in_use}, not {asked}")]
    CapacityMismatch {
        /// The name.
        name: String,
        /// Its capacity in use.
        in_use: u32,
        /// The capacity asked for.
        asked: u32,
    },
    /// The wait could never be granted: every holder it needs waits, in
    /// the end, for its own actor (the message names a cycle).
    #[error("{0}")]
    Deadlock(String),
    /// A release of more permits than the session holds on the name.
    #[error("cannot release {count} permits of {name:?}: this session holds {held}")]
    NotHeld {
        /// The name.
        name: String,
        /// Permits asked to release.
        count: u32,
        /// Permits the session holds there.
        held: u64,
    },
}

impl LockError {
    /// The protocol's stable code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            LockError::NoPermits | LockError::RwPermits { .. } => ErrorCode::InvalidPermits,
            LockError::MutexPermits { .. } | LockError::AboveCapacity { .. } => {
                ErrorCode::PermitsAboveCapacity
            }
            LockError::ZeroCapacity => ErrorCode::InvalidCapacity,
            LockError::KindMismatch { .. } => ErrorCode::KindMismatch,
            LockError::CapacityMismatch { .. } => ErrorCode::CapacityMismatch,
            LockError::NotHeld { .. } => ErrorCode::NotHeld,
            LockError::Deadlock(_) => ErrorCode::Deadlock,
        }
    }
}

impl From<LockError> for ErrorInfo {
    fn from(e: LockError) -> ErrorInfo {
        ErrorInfo::new(e.code(), e.to_string())
    }
}

/// Why [`LockTable::break_holds`] broke nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakRefusal {
    /// No such hold on the name.
    NotHeld,
    /// The caller may not break this hold, of this session.
    Forbidden(u64, SessionInfo),
}

/// A grant made to a waiting session, to be sent by the caller once the
/// table is no longer locked.
#[derive(Debug)]
pub struct Delivery {
    /// The session that waited.
    pub to: Arc<Peer>,
    /// The acquire request that is now granted.
    pub request_id: u64,
    /// The hold it got.
    pub grant: Grant,
}

impl Delivery {
    /// Hands the grant to its session: written into its socket now if
    /// its gate allows ([`crate::direct`]), and through its channel either
    /// way, so that it records the hold. If the session has already gone,
    /// its cleanup has released (or will release) the hold, so nothing is
    /// lost.
    pub fn send(self) {
        let Delivery {
            to,
            request_id,
            grant,
        } = self;
        let note = |sent| {
            let _ = to.grants.send(Notice::Granted {
                request_id,
                grant,
                sent,
            });
        };
        match &to.gate {
            Some(gate) => gate.send_grant(request_id, grant, note),
            None => note(false),
        }
    }
}

/// The grants one change of the table made to waiting sessions. The
/// table returns them once its shard lock is gone, and they are sent then:
/// by [`Grants::send`], or when they are dropped, so a grant can never be
/// forgotten (its session would wait forever for a lock it holds).
#[must_use = "grants are sent when dropped; send them where the change is made"]
#[derive(Debug, Default)]
pub struct Grants(Vec<Delivery>);

impl Grants {
    /// Sends every grant to its session.
    pub fn send(self) {
        drop(self);
    }

    fn push(&mut self, delivery: Delivery) {
        self.0.push(delivery);
    }
}

impl std::ops::Deref for Grants {
    type Target = [Delivery];

    fn deref(&self) -> &[Delivery] {
        &self.0
    }
}

impl Drop for Grants {
    fn drop(&mut self) {
        std::mem::take(&mut self.0)
            .into_iter()
            .for_each(Delivery::send);
    }
}

/// A session as the table sees it: who it is, and where its grants go.
#[derive(Debug)]
pub struct Peer {
    /// Identity shown by `inspect`.
    pub info: SessionInfo,
    /// Grants made while the session waited, each with whether it was
    /// written into the socket already. The session's task owns the
    /// receiver; it closes when the session ends.
    grants: mpsc::UnboundedSender<Notice>,
    /// Where grants may be written straight into the session's socket.
    gate: Option<Arc<Gate>>,
}

/// What a backend tells a session after the call that asked: a grant
/// made while it waited, and (from a backend whose changes are applied
/// elsewhere, as over etcd) the other ends of requests it answered later.
#[derive(Debug)]
pub enum Notice {
    /// Waiting acquire `request_id` was granted `grant`; `sent`: the
    /// answer was written to the session's peer already.
    Granted {
        /// The acquire.
        request_id: u64,
        /// The hold it got.
        grant: Grant,
        /// Written to the peer already ([`crate::direct`]).
        sent: bool,
    },
    /// Acquire `request_id` could not be granted without waiting, and may
    /// not wait (a try, or the session was at its pending limit).
    WouldBlock {
        /// The acquire.
        request_id: u64,
    },
    /// Acquire `request_id` was refused.
    Refused {
        /// The acquire.
        request_id: u64,
        /// Why.
        error: ErrorInfo,
    },
    /// Hold `hold_id` was broken by another session (possibly before the
    /// hold's own `Granted` reached the session): it is gone.
    Revoked {
        /// The hold.
        hold_id: u64,
        /// Who broke it, for the client.
        message: String,
    },
    /// Someone waits behind hold `hold_id`, which asked to be told (sent
    /// once per hold; possibly before the hold's own `Granted`).
    Contended {
        /// The hold.
        hold_id: u64,
    },
    /// Every hold and wait of the session is lost (its lease may have
    /// expired): the session must end, saying why.
    Lost {
        /// Why, for the client.
        error: ErrorInfo,
    },
    /// The change the session asked for under `token` (a release, a
    /// withdrawn wait) is applied: its answers may go out.
    Applied {
        /// The session's token for the change.
        token: u64,
    },
    /// A page of a listing asked for under `token`.
    Listed {
        /// The session's token for the listing.
        token: u64,
        /// Entries in name order.
        entries: Vec<EntryInfo>,
        /// Whether more may follow.
        more: bool,
    },
}

/// What a session receives from the backend: [`Notice`]s.
pub type GrantsReceiver = mpsc::UnboundedReceiver<Notice>;

impl Peer {
    /// A peer whose grants arrive on the returned receiver only.
    pub fn new(info: SessionInfo) -> (Arc<Peer>, GrantsReceiver) {
        Peer::with_gate(info, None)
    }

    /// A peer whose grants are also written through `gate` when it can.
    pub fn with_gate(info: SessionInfo, gate: Option<Arc<Gate>>) -> (Arc<Peer>, GrantsReceiver) {
        let (grants, rx) = mpsc::unbounded_channel();
        (Arc::new(Peer { info, grants, gate }), rx)
    }

    /// Makes every grant already written to the session's peer visible on
    /// its receiver: call before reading the grants to handle a request,
    /// which may name a hold the peer learnt of that way.
    pub fn barrier(&self) {
        if let Some(gate) = &self.gate {
            gate.barrier();
        }
    }

    /// Writes no more grants into the session's socket (it is ending).
    pub fn close_gate(&self) {
        if let Some(gate) = &self.gate {
            gate.close();
        }
    }

    /// Whether part of a grant written into the socket waits for the
    /// session to finish writing it.
    pub fn has_spill(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.has_spill())
    }

    /// The session id.
    pub fn id(&self) -> u64 {
        self.info.session_id
    }

    /// Tells the session `notice` (nothing if it has ended).
    pub fn notify(&self, notice: Notice) {
        let _ = self.grants.send(notice);
    }
}

/// A validated acquire request.
#[derive(Debug, Clone)]
pub struct AcquireSpec {
    /// What kind of lock.
    pub kind: LockKind,
    /// Capacity (1 for a mutex; ignored for rwlocks).
    pub capacity: u32,
    /// Permits asked for.
    pub permits: u32,
    /// May the request wait in the queue? False for a try (timeout 0) and
    /// when the session is at its pending limit.
    pub may_wait: bool,
    /// For `inspect` only.
    pub timeout_ms: Option<u64>,
    /// The thread of control asking (`AcquireAs`), 0 for none: holds and
    /// waits of an actor are what deadlock detection follows.
    pub actor: u64,
    /// The actors `actor` runs within, nearest first (`AcquireWith`):
    /// each keeps its holds while `actor` waits.
    pub within: Within,
    /// Tell the holder's session when someone waits behind the hold.
    pub notify_contended: bool,
}

/// The actors an actor runs within, nearest first; shared by a wait's
/// queue entry and the waits index, and empty for most acquires.
pub type Within = Option<Arc<[u64]>>;

impl AcquireSpec {
    /// Checks the request's own fields (not the entry it names).
    pub fn validate(
        kind: LockKind,
        capacity: u32,
        permits: u32,
        timeout_ms: Option<u64>,
    ) -> Result<AcquireSpec, LockError> {
        if permits == 0 {
            return Err(LockError::NoPermits);
        }
        let capacity = match kind {
            LockKind::Mutex => {
                if permits > 1 {
                    return Err(LockError::MutexPermits { permits });
                }
                1
            }
            LockKind::Semaphore => {
                if capacity == 0 {
                    return Err(LockError::ZeroCapacity);
                }
                if permits > capacity {
                    return Err(LockError::AboveCapacity { permits, capacity });
                }
                capacity
            }
            LockKind::RwShared | LockKind::RwExclusive => {
                if permits != 1 {
                    return Err(LockError::RwPermits { permits });
                }
                0
            }
        };
        Ok(AcquireSpec {
            kind,
            capacity,
            permits,
            may_wait: timeout_ms != Some(0),
            timeout_ms,
            actor: 0,
            within: None,
            notify_contended: false,
        })
    }

    fn weight(&self) -> u64 {
        weight(self.kind, self.permits)
    }
}

fn weight(kind: LockKind, permits: u32) -> u64 {
    match kind {
        LockKind::Semaphore | LockKind::RwShared => u64::from(permits),
        LockKind::Mutex | LockKind::RwExclusive => RW_WEIGHT,
    }
}

/// Whether a request of `kind` may use an entry of kind `entry`.
fn compatible(entry: EntryKind, kind: LockKind) -> bool {
    (entry == EntryKind::Semaphore) == (kind == LockKind::Semaphore)
}

/// What became of an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// Granted at once.
    Granted(Grant),
    /// Queued; the grant will come as a [`Delivery`].
    Queued,
    /// Not granted, and the request may not wait (a try, or the session is
    /// at its pending limit).
    WouldBlock,
}

/// The result of a release by name and count.
#[derive(Debug)]
pub struct Released {
    /// Holds that ended entirely (a partly released one is not listed).
    pub ended: Vec<u64>,
    /// Grants the release made possible.
    pub deliveries: Grants,
}

#[derive(Debug)]
struct Holder {
    peer: Arc<Peer>,
    /// The actor it was granted to (0: none).
    actor: u64,
    /// Its session is to be told when someone waits behind it, and has
    /// not been yet.
    notify_contended: bool,
    hold_id: u64,
    kind: LockKind,
    permits: u32,
    fence: u64,
    since_ms: u64,
}

#[derive(Debug)]
struct Waiter {
    peer: Arc<Peer>,
    /// The actor waiting (0: none).
    actor: u64,
    /// The actors it runs within.
    within: Within,
    /// Its hold is to be told of contention.
    notify_contended: bool,
    request_id: u64,
    kind: LockKind,
    permits: u32,
    since_ms: u64,
    timeout_ms: Option<u64>,
}

/// A FIFO of waiters that costs one pointer while empty, which most
/// entries are (the daemon may hold a million names); a bare `VecDeque`
/// would cost four.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)]
struct Queue(Option<Box<VecDeque<Waiter>>>);

impl Queue {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    fn front(&self) -> Option<&Waiter> {
        self.0.as_ref()?.front()
    }

    fn pop_front(&mut self) -> Option<Waiter> {
        let q = self.0.as_mut()?;
        let w = q.pop_front();
        if q.is_empty() {
            self.0 = None;
        }
        w
    }

    fn push_back(&mut self, w: Waiter) {
        self.0.get_or_insert_default().push_back(w);
    }

    fn iter(&self) -> impl Iterator<Item = &Waiter> {
        self.0.iter().flat_map(|q| q.iter())
    }

    fn remove(&mut self, index: usize) -> Option<Waiter> {
        let q = self.0.as_mut()?;
        let w = q.remove(index);
        if q.is_empty() {
            self.0 = None;
        }
        w
    }

    fn retain(&mut self, keep: impl FnMut(&Waiter) -> bool) {
        if let Some(q) = self.0.as_mut() {
            q.retain(keep);
            if q.is_empty() {
                self.0 = None;
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    kind: EntryKind,
    /// Total weight: N for a semaphore, else [`RW_WEIGHT`].
    capacity: u32,
    /// Weight not held.
    free: u32,
    /// Grant order, oldest first. A thin vec (one pointer in the entry,
    /// its length in the allocation): every held name has an entry.
    holders: thin_vec::ThinVec<Holder>,
    queue: Queue,
    /// The next grant reports that a holder died holding this lock.
    abandoned: bool,
    /// The entry is a tombstone (idle, kept for its flag). Its place in
    /// the age order is kept in [`Tombstones`], not here: every held name
    /// has an entry, few are tombstones.
    tombstone: bool,
    /// Some holder is to be told when someone waits behind it (so a wait
    /// looks at the holders only then).
    to_tell: bool,
}

impl Entry {
    fn new(spec: &AcquireSpec) -> Entry {
        let capacity = match spec.kind {
            LockKind::Semaphore => spec.capacity,
            _ => RW_WEIGHT as u32,
        };
        Entry {
            kind: spec.kind.entry_kind(),
            capacity,
            free: capacity,
            holders: thin_vec::ThinVec::new(),
            queue: Queue::default(),
            abandoned: false,
            tombstone: false,
            to_tell: false,
        }
    }

    /// Tells each holder that asked, and was not told yet, that someone
    /// waits behind it: under the shard lock, so a hold released after
    /// this is told before its release.
    fn tell_contended(&mut self) {
        if !std::mem::take(&mut self.to_tell) {
            return;
        }
        for h in self.holders.iter_mut().filter(|h| h.notify_contended) {
            h.notify_contended = false;
            h.peer.notify(Notice::Contended { hold_id: h.hold_id });
        }
    }

    fn in_use(&self) -> bool {
        !self.holders.is_empty() || !self.queue.is_empty()
    }

    /// Nothing to remember: the entry can be forgotten.
    fn is_idle(&self) -> bool {
        !self.in_use() && !self.abandoned
    }

    /// Checks that `spec` may be used on this entry, re-shaping an entry
    /// that is only remembered for its abandoned flag.
    fn admit(&mut self, name: &str, spec: &AcquireSpec) -> Result<(), LockError> {
        if !self.in_use() {
            let (abandoned, tombstone) = (self.abandoned, self.tombstone);
            *self = Entry::new(spec);
            self.abandoned = abandoned;
            self.tombstone = tombstone;
            return Ok(());
        }
        let kind = spec.kind.entry_kind();
        if !compatible(self.kind, spec.kind) {
            return Err(LockError::KindMismatch {
                name: name.to_owned(),
                in_use: self.kind,
                asked: kind,
            });
        }
        // A mutex that someone takes a side of is shown as a rwlock.
        if kind == EntryKind::RwLock {
            self.kind = EntryKind::RwLock;
        }
        if kind == EntryKind::Semaphore && spec.capacity != self.capacity {
            return Err(LockError::CapacityMismatch {
                name: name.to_owned(),
                in_use: self.capacity,
                asked: spec.capacity,
            });
        }
        Ok(())
    }

    fn info_capacity(&self) -> u32 {
        match self.kind {
            EntryKind::Mutex => 1,
            EntryKind::Semaphore => self.capacity,
            EntryKind::RwLock => 0,
        }
    }

    /// What `inspect` shows of this entry.
    fn info(&self, name: &LockName) -> EntryInfo {
        EntryInfo {
            name: name.as_str().to_owned(),
            kind: self.kind,
            capacity: self.info_capacity(),
            abandoned: self.abandoned,
            holders: self
                .holders
                .iter()
                .map(|h| HolderInfo {
                    session: h.peer.info.clone(),
                    hold_id: h.hold_id,
                    kind: h.kind,
                    permits: h.permits,
                    fence: h.fence,
                    since_ms: h.since_ms,
                })
                .collect(),
            waiters: self
                .queue
                .iter()
                .map(|w| WaiterInfo {
                    session: w.peer.info.clone(),
                    request_id: w.request_id,
                    kind: w.kind,
                    permits: w.permits,
                    since_ms: w.since_ms,
                    timeout_ms: w.timeout_ms,
                })
                .collect(),
        }
    }
}

/// One shard: name → entry, in name order.
type Shard = BTreeMap<LockName, Entry>;

/// The tombstones, oldest first.
#[derive(Debug, Default)]
struct Tombstones {
    /// Sequence number → name; numbers only grow, so the first is the
    /// oldest.
    by_age: BTreeMap<u64, LockName>,
    /// Name → its sequence number, for the tombstones on the list.
    by_name: HashMap<LockName, u64>,
    /// The last sequence number given.
    last: u64,
}

impl Tombstones {
    /// Takes `name` off the list (it is in use again).
    fn forget(&mut self, name: &LockName) {
        if let Some(seq) = self.by_name.remove(name) {
            self.by_age.remove(&seq);
        }
    }
}

/// How far one pass of an acquire goes when the lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Not queued: `None` if it would have to wait.
    Try,
    /// Queued, its holders told of it.
    Queue,
    /// Queued, its holders told only once it is known to stay (a wait
    /// checked for deadlock, which may be withdrawn at once).
    QueueUntold,
}

/// What a new hold is granted for: an acquire's fields the holder keeps.
struct Granted {
    actor: u64,
    kind: LockKind,
    permits: u32,
    notify_contended: bool,
}

impl Granted {
    fn of(spec: &AcquireSpec) -> Granted {
        Granted {
            actor: spec.actor,
            kind: spec.kind,
            permits: spec.permits,
            notify_contended: spec.notify_contended,
        }
    }
}

/// Takes `m`. A panic under a shard lock is a bug, but the other sessions
/// still need the table, so a poisoned lock is used as it was left.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An entry as [`LockTable::find_deadlock`] read it: what is free, the
/// holders (actor, weight, session) and the queue, in order.
#[derive(Debug)]
struct Seen {
    name: LockName,
    free: u64,
    holders: Vec<(u64, u64, Arc<Peer>)>,
    queue: VecDeque<SeenWait>,
}

#[derive(Debug)]
struct SeenWait {
    actor: u64,
    within: Within,
    weight: u64,
    peer: Arc<Peer>,
    request_id: u64,
}

/// The actor of `w` and those it runs within: each waits while `w` does.
fn waiting_actors(w: &SeenWait) -> impl Iterator<Item = u64> + '_ {
    let within = w.within.as_deref().unwrap_or_default();
    std::iter::once(w.actor).chain(within.iter().copied())
}

/// Plays the waits of `seen` out: holds of an actor that waits for
/// nothing, itself or through an actor within it, (or of no actor) are let
/// go, and each queue's head is granted while it fits, until nothing
/// changes. What is left queued can never be granted while the actors left
/// waiting keep what they hold.
fn play_out(seen: &mut [Seen]) {
    let mut waiting: HashMap<u64, usize> = HashMap::new();
    for w in seen.iter().flat_map(|e| e.queue.iter()) {
        if w.actor != 0 {
            for a in waiting_actors(w) {
                *waiting.entry(a).or_default() += 1;
            }
        }
    }
    loop {
        let mut changed = false;
        for e in seen.iter_mut() {
            let before = e.holders.len();
            let mut freed = 0;
            e.holders.retain(|(a, weight, _)| {
                let stays = *a != 0 && waiting.get(a).is_some_and(|n| *n > 0);
                if !stays {
                    freed += weight;
                }
                stays
            });
            e.free += freed;
            changed |= e.holders.len() != before;
            while e.queue.front().is_some_and(|w| w.weight <= e.free) {
                let w = e.queue.pop_front().expect("a head");
                e.free -= w.weight;
                if w.actor != 0 {
                    for a in waiting_actors(&w) {
                        *waiting.get_mut(&a).expect("counted") -= 1;
                    }
                }
                e.holders.push((w.actor, w.weight, w.peer));
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

/// "waiting for "y" would deadlock: this session waits for "y", held by
/// session 5 (pid 42, "job"), which waits for "x", held by this session":
/// a cycle among what [`play_out`] left waiting, from the new wait
/// (`actor`'s, within `within`, in `peer`, on `name`) back to `actor` or
/// one it runs within. Each step goes to a holder of the lock waited for,
/// or a waiter ahead, that is itself left waiting, directly or through an
/// actor within it (whose session the message then names).
fn describe_deadlock(
    seen: &[Seen],
    peer: &Arc<Peer>,
    actor: u64,
    within: &[u64],
    name: &LockName,
) -> String {
    // Actor → (a lock it waits for, the session of that wait).
    let mut waits_for: HashMap<u64, Vec<(&LockName, &Arc<Peer>)>> = HashMap::new();
    for e in seen {
        for w in &e.queue {
            for a in waiting_actors(w) {
                waits_for.entry(a).or_default().push((&e.name, &w.peer));
            }
        }
    }
    // Who keeps a wait on `e` waiting: its holders, and the waiters ahead
    // (false).
    let keepers = |e: &Seen, waiter: u64| -> Vec<(u64, Arc<Peer>, bool)> {
        let ahead = e.queue.iter().take_while(|w| w.actor != waiter);
        (e.holders.iter().map(|h| (h.0, Arc::clone(&h.2), true)))
            .chain(ahead.map(|w| (w.actor, Arc::clone(&w.peer), false)))
            .filter(|(a, _, _)| *a != 0)
            .collect()
    };
    let entry = |n: &LockName| seen.iter().find(|e| e.name == *n);
    // One step of the cycle: the actor waiting, the lock, the session of
    // the wait, the keeper's session, and whether the keeper holds.
    type Step<'a> = (u64, LockName, &'a Arc<Peer>, Arc<Peer>, bool);
    // Depth first from the new wait, remembering how each actor was
    // reached.
    let mut reached: HashMap<u64, Step> = HashMap::new();
    let mut stack = vec![(actor, name.clone(), peer)];
    let mut closing = None;
    'walk: while let Some((at, waited, waiter)) = stack.pop() {
        let Some(e) = entry(&waited) else { continue };
        for (b, session, holds) in keepers(e, at) {
            if b == actor || within.contains(&b) {
                closing = Some((at, waited.clone(), waiter, session, holds));
                break 'walk;
            }
            if let std::collections::hash_map::Entry::Vacant(v) = reached.entry(b) {
                v.insert((at, waited.clone(), waiter, session, holds));
                for (n, p) in waits_for.get(&b).into_iter().flatten() {
                    stack.push((b, (*n).clone(), *p));
                }
            }
        }
    }
    let describe = |session: &Arc<Peer>| -> String {
        if Arc::ptr_eq(session, peer) {
            return "this session".into();
        }
        let info = &session.info;
        let mut s = format!("session {}", info.session_id);
        match (info.pid, info.client_name.as_str()) {
            (Some(pid), "") => s += &format!(" (pid {pid})"),
            (Some(pid), client) => s += &format!(" (pid {pid}, {client:?})"),
            (None, "") => {}
            (None, client) => s += &format!(" ({client:?})"),
        }
        s
    };
    let mut text = format!("waiting for {:?} would deadlock: ", name.as_str());
    let Some(last) = closing else {
        // Always found: what is left waiting waits on what is left.
        return text + "every holder it needs waits, in the end, for this session";
    };
    // Back from the last step to the new wait.
    let mut links = vec![last];
    let mut at = links[0].0;
    while at != actor {
        let step = reached[&at].clone();
        at = step.0;
        links.push(step);
    }
    links.reverse();
    let mut keeper: Option<&Arc<Peer>> = None;
    for (_, n, waiter, holder, holds) in &links {
        match keeper {
            None => text += &format!("this session waits for {:?}", n.as_str()),
            Some(k) if Arc::ptr_eq(k, waiter) => {
                text += &format!(", which waits for {:?}", n.as_str())
            }
            Some(_) => {
                text += &format!(
                    ", which waits, through {}, for {:?}",
                    describe(waiter),
                    n.as_str()
                )
            }
        }
        let how = if *holds { "held by" } else { "queued first by" };
        text += &format!(", {how} {}", describe(holder));
        keeper = Some(holder);
    }
    if keeper.is_some_and(|k| !Arc::ptr_eq(k, peer)) {
        text += ", on whose behalf this session acts";
    }
    // An error must fit any frame: a long cycle is cut.
    if text.len() > MAX_DEADLOCK_MESSAGE {
        let mut end = MAX_DEADLOCK_MESSAGE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text += " …";
    }
    text
}

/// Longest deadlock message, in bytes: well within the smallest frame.
const MAX_DEADLOCK_MESSAGE: usize = 2048;

/// The first name of `shard` within `lower..` that starts with `prefix`.
fn first_match(shard: &Shard, lower: Bound<&str>, prefix: &str) -> Option<LockName> {
    let (name, _) = shard.range::<str, _>((lower, Bound::Unbounded)).next()?;
    name.as_str().starts_with(prefix).then(|| name.clone())
}

/// Name → lock entry, shared by every session; cheap to clone.
#[derive(Debug, Clone)]
pub struct LockTable {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a name's shard.
    hasher: RandomState,
    tombstones: Mutex<Tombstones>,
    /// Most tombstones kept.
    max_abandoned: usize,
    next_hold: AtomicU64,
    next_fence: AtomicU64,
    /// The waits of every session, for deadlock detection. Taken by an
    /// acquire that must wait, for its queueing and its check, so no other
    /// wait is added meanwhile; before any shard lock, never inside one.
    waits: Mutex<Waits>,
}

/// The waits of actors, for deadlock detection: actor → its waits, as
/// queued; and session → the actors it queued for, to forget a session's
/// waits when it ends. A wait that has ended (granted, cancelled, timed
/// out) may linger until a check finds it gone from its queue or its
/// session ends; each actor's list is pruned when it doubles, and each
/// session's actors when they double (an actor left without waits is
/// forgotten), so both stay within twice what is live: a long session
/// whose every task acts for itself does not grow the index.
#[derive(Debug, Default)]
struct Waits {
    by_actor: HashMap<u64, ActorWaits>,
    by_session: HashMap<u64, SessionActors>,
}

#[derive(Debug, Default)]
struct SessionActors {
    actors: std::collections::HashSet<u64>,
    /// Prune when the set reaches this size.
    prune_at: usize,
}

#[derive(Debug, Default)]
struct ActorWaits {
    /// (name, session, request id).
    waits: Vec<(LockName, u64, u64)>,
    /// Prune when the list reaches this length.
    prune_at: usize,
}

/// Waits an actor's list holds before it is first pruned.
const WAITS_PRUNE_FLOOR: usize = 64;

impl LockTable {
    /// An empty table whose first fence is `fence_floor + 1`, keeping the
    /// abandoned flags of at most `max_abandoned` idle names.
    pub fn new(fence_floor: u64, max_abandoned: usize) -> LockTable {
        LockTable {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                tombstones: Mutex::default(),
                max_abandoned,
                next_hold: AtomicU64::new(0),
                next_fence: AtomicU64::new(fence_floor),
                waits: Mutex::default(),
            }),
        }
    }

    fn shard(&self, name: &str) -> &Mutex<Shard> {
        let hash = self.inner.hasher.hash_one(name);
        &self.inner.shards[hash as usize % SHARDS]
    }

    /// Asks for `spec` on `name` for `peer`'s acquire `request_id`.
    ///
    /// An acquire of an actor (`spec.actor`, a thread of control) that
    /// must wait is refused with [`LockError::Deadlock`] if its wait could
    /// then never be granted (see [`LockTable::find_deadlock`]). Only such
    /// an acquire is checked: one granted at once, a try, or one of no
    /// actor never is.
    pub fn acquire(
        &self,
        name: &LockName,
        peer: &Arc<Peer>,
        request_id: u64,
        spec: &AcquireSpec,
    ) -> Result<AcquireOutcome, LockError> {
        if spec.actor == 0 {
            return Ok(self
                .acquire_pass(name, peer, request_id, spec, Pass::Queue)?
                .expect("an acquire allowed to queue has an outcome"));
        }
        if let Some(outcome) = self.acquire_pass(name, peer, request_id, spec, Pass::Try)? {
            return Ok(outcome);
        }
        // It must wait: it is queued and checked with the waits held, so
        // no other wait is added meanwhile and a deadlock found is one that
        // was there when each lock was read (waits only end meanwhile).
        let mut waits = lock(&self.inner.waits);
        let outcome = self
            .acquire_pass(name, peer, request_id, spec, Pass::QueueUntold)?
            .expect("an acquire allowed to queue has an outcome");
        if !matches!(outcome, AcquireOutcome::Queued) {
            return Ok(outcome);
        }
        let Some(cycle) = self.find_deadlock(&mut waits, peer, spec, name, request_id) else {
            let within = spec.within.as_deref().unwrap_or_default();
            for a in std::iter::once(spec.actor).chain(within.iter().copied()) {
                self.record_wait(&mut waits, a, peer.id(), name, request_id);
            }
            // A wait that stays: its holders may now hear of it.
            if let Some(entry) = lock(self.shard(name.as_str())).get_mut(name.as_str())
                && !entry.queue.is_empty()
            {
                entry.tell_contended();
            }
            return Ok(AcquireOutcome::Queued);
        };
        let (removed, grants) = self.cancel(name.as_str(), peer.id(), request_id);
        drop(waits);
        grants.send();
        if removed {
            Err(LockError::Deadlock(cycle))
        } else {
            // Granted meanwhile (a holder in the cycle let go): no cycle,
            // and the grant is on its way.
            Ok(AcquireOutcome::Queued)
        }
    }

    /// One try at `acquire`: `None` when the request would have to queue
    /// and `pass` is [`Pass::Try`].
    fn acquire_pass(
        &self,
        name: &LockName,
        peer: &Arc<Peer>,
        request_id: u64,
        spec: &AcquireSpec,
        pass: Pass,
    ) -> Result<Option<AcquireOutcome>, LockError> {
        let mut shard = lock(self.shard(name.as_str()));
        // One search either way; the key is a shared name, not a copy.
        match shard.entry(name.clone()) {
            MapEntry::Occupied(mut o) => {
                let entry = o.get_mut();
                let outcome = self.acquire_in(entry, name, peer, request_id, spec, pass);
                if entry.tombstone && entry.in_use() {
                    // In use again: no longer a tombstone, and never evicted.
                    entry.tombstone = false;
                    lock(&self.inner.tombstones).forget(name);
                }
                outcome
            }
            MapEntry::Vacant(v) => {
                let mut entry = Entry::new(spec);
                let outcome = self.acquire_in(&mut entry, name, peer, request_id, spec, pass)?;
                if !entry.is_idle() {
                    v.insert(entry);
                }
                Ok(outcome)
            }
        }
    }

    fn acquire_in(
        &self,
        entry: &mut Entry,
        name: &LockName,
        peer: &Arc<Peer>,
        request_id: u64,
        spec: &AcquireSpec,
        pass: Pass,
    ) -> Result<Option<AcquireOutcome>, LockError> {
        entry.admit(name.as_str(), spec)?;
        let weight = spec.weight();
        if entry.queue.is_empty() && weight <= u64::from(entry.free) {
            entry.free -= weight as u32;
            let grant = self.new_hold(entry, peer, Granted::of(spec));
            return Ok(Some(AcquireOutcome::Granted(grant)));
        }
        if !spec.may_wait {
            return Ok(Some(AcquireOutcome::WouldBlock));
        }
        if pass == Pass::Try {
            return Ok(None);
        }
        entry.queue.push_back(Waiter {
            peer: Arc::clone(peer),
            actor: spec.actor,
            within: spec.within.clone(),
            notify_contended: spec.notify_contended,
            request_id,
            kind: spec.kind,
            permits: spec.permits,
            since_ms: now_ms(),
            timeout_ms: spec.timeout_ms,
        });
        if pass == Pass::Queue {
            entry.tell_contended();
        }
        Ok(Some(AcquireOutcome::Queued))
    }

    /// Whether `session_id`'s acquire `request_id` waits on `name`.
    fn is_waiting(&self, name: &str, session_id: u64, request_id: u64) -> bool {
        lock(self.shard(name)).get(name).is_some_and(|e| {
            e.queue
                .iter()
                .any(|w| w.request_id == request_id && w.peer.id() == session_id)
        })
    }

    /// What `find_deadlock` needs of `name`'s entry, read under its lock.
    fn snapshot(&self, name: &LockName) -> Option<Seen> {
        let shard = lock(self.shard(name.as_str()));
        let entry = shard.get(name.as_str())?;
        Some(Seen {
            name: name.clone(),
            free: u64::from(entry.free),
            holders: (entry.holders.iter())
                .map(|h| (h.actor, weight(h.kind, h.permits), Arc::clone(&h.peer)))
                .collect(),
            queue: (entry.queue.iter())
                .map(|w| SeenWait {
                    actor: w.actor,
                    within: w.within.clone(),
                    weight: weight(w.kind, w.permits),
                    peer: Arc::clone(&w.peer),
                    request_id: w.request_id,
                })
                .collect(),
        })
    }

    /// Whether the new wait of `spec`'s actor (`peer`'s `request_id` on
    /// `name`, just queued) can never be granted, described if so.
    ///
    /// The locks it can depend on are read (the names its blockers wait
    /// for, themselves or through actors within them, and theirs, from
    /// `waits`), then the waits are played out: an actor that waits for
    /// nothing, itself or through an actor within it, lets go of everything
    /// it holds (so do holds and waits of no actor: whether they wait is
    /// not known), and each queue is served in order as it would be. If
    /// that never reaches the new wait, every actor it needs is waiting,
    /// directly or not, for the new wait's own actor (or one it runs
    /// within): a deadlock. A semaphore needing any one of
    /// several holders, and shared holders going together, are so judged
    /// exactly, as a walk of edges alone could not. Waits found ended are
    /// dropped from `waits` on the way.
    fn find_deadlock(
        &self,
        waits: &mut Waits,
        peer: &Arc<Peer>,
        spec: &AcquireSpec,
        name: &LockName,
        request_id: u64,
    ) -> Option<String> {
        // The locks the new wait depends on, each read once.
        let mut seen: Vec<Seen> = Vec::new();
        let mut names: std::collections::HashSet<LockName> = std::collections::HashSet::new();
        let mut actors: std::collections::HashSet<u64> = std::collections::HashSet::new();
        let mut frontier = vec![name.clone()];
        names.insert(name.clone());
        while let Some(next) = frontier.pop() {
            let Some(entry) = self.snapshot(&next) else {
                continue;
            };
            let involved =
                (entry.holders.iter().map(|h| h.0)).chain(entry.queue.iter().map(|w| w.actor));
            for a in involved {
                if a == 0 || !actors.insert(a) {
                    continue;
                }
                for (waited, _, _) in waits.by_actor.get(&a).map_or(&[][..], |l| &l.waits) {
                    if names.insert(waited.clone()) {
                        frontier.push(waited.clone());
                    }
                }
            }
            seen.push(entry);
        }
        // Waits the index has that their queues no longer do have ended.
        for a in &actors {
            if let Some(list) = waits.by_actor.get_mut(a) {
                list.waits.retain(|(n, s, id)| {
                    seen.iter().any(|e| {
                        e.name == *n
                            && e.queue
                                .iter()
                                .any(|w| w.peer.id() == *s && w.request_id == *id)
                    })
                });
            }
        }
        play_out(&mut seen);
        let stuck = seen.iter().find(|e| e.name == *name).is_some_and(|e| {
            e.queue
                .iter()
                .any(|w| w.peer.id() == peer.id() && w.request_id == request_id)
        });
        let within = spec.within.as_deref().unwrap_or_default();
        stuck.then(|| describe_deadlock(&seen, peer, spec.actor, within, name))
    }

    /// Adds a wait to `actor`'s list (of its waits and those of the actors
    /// within it), pruning the list of ended waits when it has doubled.
    fn record_wait(
        &self,
        waits: &mut Waits,
        actor: u64,
        session_id: u64,
        name: &LockName,
        request_id: u64,
    ) {
        let list = waits.by_actor.entry(actor).or_default();
        if list.waits.len() >= list.prune_at.max(WAITS_PRUNE_FLOOR) {
            list.waits
                .retain(|(n, s, id)| self.is_waiting(n.as_str(), *s, *id));
            list.prune_at = list.waits.len() * 2;
        }
        list.waits.push((name.clone(), session_id, request_id));
        let session = waits.by_session.entry(session_id).or_default();
        if session.actors.insert(actor)
            && session.actors.len() >= session.prune_at.max(WAITS_PRUNE_FLOOR)
        {
            let actors: Vec<u64> = session.actors.iter().copied().collect();
            for a in actors {
                let Some(list) = waits.by_actor.get_mut(&a) else {
                    continue;
                };
                list.waits
                    .retain(|(n, s, id)| self.is_waiting(n.as_str(), *s, *id));
                if list.waits.is_empty() {
                    waits.by_actor.remove(&a);
                }
            }
            let live = |a: &u64| {
                waits
                    .by_actor
                    .get(a)
                    .is_some_and(|l| l.waits.iter().any(|w| w.1 == session_id))
            };
            let session = waits.by_session.get_mut(&session_id).expect("just used");
            let kept: std::collections::HashSet<u64> =
                session.actors.iter().copied().filter(|a| live(a)).collect();
            session.prune_at = kept.len() * 2;
            session.actors = kept;
        }
    }

    /// Forgets the waits of a session that has ended.
    pub fn session_ended(&self, session_id: u64) {
        let mut waits = lock(&self.inner.waits);
        let Some(session) = waits.by_session.remove(&session_id) else {
            return;
        };
        for actor in session.actors {
            if let Some(list) = waits.by_actor.get_mut(&actor) {
                list.waits.retain(|(_, s, _)| *s != session_id);
                if list.waits.is_empty() {
                    waits.by_actor.remove(&actor);
                }
            }
        }
    }

    fn new_hold(&self, entry: &mut Entry, peer: &Arc<Peer>, granted: Granted) -> Grant {
        let Granted {
            actor,
            kind,
            permits,
            notify_contended,
        } = granted;
        let grant = Grant {
            hold_id: self.inner.next_hold.fetch_add(1, Ordering::Relaxed) + 1,
            fence: self.inner.next_fence.fetch_add(1, Ordering::Relaxed) + 1,
            abandoned: std::mem::take(&mut entry.abandoned),
        };
        // Most names have one holder: room for exactly one, not the four a
        // first push would make (later pushes grow as usual).
        if entry.holders.capacity() == 0 {
            entry.holders.reserve_exact(1);
        }
        entry.holders.push(Holder {
            peer: Arc::clone(peer),
            actor,
            notify_contended,
            hold_id: grant.hold_id,
            kind,
            permits,
            fence: grant.fence,
            since_ms: now_ms(),
        });
        entry.to_tell |= notify_contended;
        grant
    }

    /// Grants from the head of the queue while the head fits.
    fn grant_ready(&self, entry: &mut Entry, out: &mut Grants) {
        while let Some(head) = entry.queue.front() {
            let weight = weight(head.kind, head.permits);
            if weight > u64::from(entry.free) {
                break;
            }
            let w = entry.queue.pop_front().expect("head exists");
            entry.free -= weight as u32;
            let granted = Granted {
                actor: w.actor,
                kind: w.kind,
                permits: w.permits,
                notify_contended: w.notify_contended,
            };
            let grant = self.new_hold(entry, &w.peer, granted);
            out.push(Delivery {
                to: w.peer,
                request_id: w.request_id,
                grant,
            });
        }
        if !entry.queue.is_empty() {
            entry.tell_contended();
        }
    }

    /// Runs `f` on the entry for `name`, then serves its queue; an entry
    /// left idle is forgotten, or kept as a tombstone if its flag is set.
    /// `None` if there is no such entry.
    fn with_entry<T>(
        &self,
        name: &str,
        out: &mut Grants,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> Option<T> {
        let mut shard = lock(self.shard(name));
        let entry = shard.get_mut(name)?;
        let result = f(entry);
        self.grant_ready(entry, out);
        if entry.in_use() || entry.tombstone {
            return Some(result);
        }
        if !entry.abandoned {
            shard.remove(name);
            return Some(result);
        }
        let (name, entry) = shard
            .range_mut::<str, _>((Bound::Included(name), Bound::Included(name)))
            .next()
            .expect("the entry is there");
        let evicted = self.bury(name, entry);
        drop(shard);
        self.evict(evicted);
        Some(result)
    }

    /// Makes an idle entry with its flag set a tombstone; returns the
    /// tombstones past the bound, oldest first, to be evicted once the
    /// shard lock is gone.
    fn bury(&self, name: &LockName, entry: &mut Entry) -> Vec<LockName> {
        // A tombstone keeps its flag, not the room its holders had.
        entry.holders = thin_vec::ThinVec::new();
        entry.tombstone = true;
        let mut t = lock(&self.inner.tombstones);
        t.last += 1;
        let seq = t.last;
        t.by_age.insert(seq, name.clone());
        t.by_name.insert(name.clone(), seq);
        let mut evicted = Vec::new();
        while t.by_age.len() > self.inner.max_abandoned {
            let (_, oldest) = t.by_age.pop_first().expect("over the bound");
            t.by_name.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Forgets tombstones taken off the list by [`LockTable::bury`]. One
    /// used again meanwhile (no longer a tombstone), or used and buried
    /// again (back on the list, younger), is left alone.
    fn evict(&self, evicted: Vec<LockName>) {
        for name in evicted {
            let mut shard = lock(self.shard(name.as_str()));
            if shard.get(name.as_str()).is_some_and(|e| {
                e.tombstone && !lock(&self.inner.tombstones).by_name.contains_key(&name)
            }) {
                shard.remove(name.as_str());
            }
        }
    }

    /// Removes `peer`'s waiting acquire `request_id` on `name`. Returns
    /// whether it was still waiting; if not, it was granted and its delivery
    /// is on its way.
    pub fn cancel(&self, name: &str, session_id: u64, request_id: u64) -> (bool, Grants) {
        let mut out = Grants::default();
        let removed = self
            .with_entry(name, &mut out, |e| {
                let pos = e
                    .queue
                    .iter()
                    .position(|w| w.request_id == request_id && w.peer.id() == session_id);
                pos.map(|p| e.queue.remove(p)).is_some()
            })
            .unwrap_or(false);
        (removed, out)
    }

    /// Releases hold `hold_id` of session `session_id` on `name`. Returns
    /// the permits it had, or `None` if the session has no such hold there.
    pub fn release(&self, name: &str, session_id: u64, hold_id: u64) -> (Option<u32>, Grants) {
        let mut out = Grants::default();
        let permits = self
            .with_entry(name, &mut out, |e| {
                let pos = e
                    .holders
                    .iter()
                    .position(|h| h.hold_id == hold_id && h.peer.id() == session_id)?;
                let h = e.holders.remove(pos);
                e.free += weight(h.kind, h.permits) as u32;
                Some(h.permits)
            })
            .flatten();
        (permits, out)
    }

    /// Ends hold `hold_id` of session `session_id` on `name` as if its
    /// session had died holding it (its lease ran out): the next grant
    /// reports abandonment. Whether the hold was there.
    pub fn revoke(&self, name: &str, session_id: u64, hold_id: u64) -> (bool, Grants) {
        let mut out = Grants::default();
        let revoked = self
            .with_entry(name, &mut out, |e| {
                let pos = e
                    .holders
                    .iter()
                    .position(|h| h.hold_id == hold_id && h.peer.id() == session_id)?;
                let h = e.holders.remove(pos);
                e.free += weight(h.kind, h.permits) as u32;
                e.abandoned = true;
                Some(())
            })
            .flatten()
            .is_some();
        (revoked, out)
    }

    /// Breaks the holds of `name` (hold `hold_id` only, if given) of
    /// whichever sessions have them, if `may` allows each holder: as
    /// [`LockTable::revoke`], each holder's session told (`message`) under
    /// the shard lock. All or nothing; the ids broken, in grant order.
    pub fn break_holds(
        &self,
        name: &str,
        hold_id: Option<u64>,
        may: &dyn Fn(&SessionInfo) -> bool,
        message: &str,
    ) -> Result<(Vec<u64>, Grants), BreakRefusal> {
        let mut out = Grants::default();
        let broken = self.with_entry(name, &mut out, |e| {
            let named = |h: &Holder| hold_id.is_none_or(|id| h.hold_id == id);
            if !e.holders.iter().any(named) {
                return Err(BreakRefusal::NotHeld);
            }
            if let Some(h) = e
                .holders
                .iter()
                .filter(|h| named(h))
                .find(|h| !may(&h.peer.info))
            {
                return Err(BreakRefusal::Forbidden(h.hold_id, h.peer.info.clone()));
            }
            let mut ids = Vec::new();
            let mut freed = 0;
            e.holders.retain(|h| {
                if !named(h) {
                    return true;
                }
                freed += weight(h.kind, h.permits);
                ids.push(h.hold_id);
                h.peer.notify(Notice::Revoked {
                    hold_id: h.hold_id,
                    message: message.to_owned(),
                });
                false
            });
            e.free += freed as u32;
            e.abandoned = true;
            Ok(ids)
        });
        match broken {
            None => Err(BreakRefusal::NotHeld),
            Some(result) => result.map(|ids| (ids, out)),
        }
    }

    /// Releases `count` permits of session `session_id`'s holds on `name`,
    /// oldest hold first; all or nothing.
    pub fn release_count(
        &self,
        name: &str,
        session_id: u64,
        count: u32,
    ) -> Result<Released, LockError> {
        let mut deliveries = Grants::default();
        let not_held = |held: u64| LockError::NotHeld {
            name: name.to_owned(),
            count,
            held,
        };
        let result = self.with_entry(name, &mut deliveries, |e| {
            let held: u64 = e
                .holders
                .iter()
                .filter(|h| h.peer.id() == session_id)
                .map(|h| u64::from(h.permits))
                .sum();
            if held < u64::from(count) {
                return Err(not_held(held));
            }
            let mut left = count;
            let mut ended = Vec::new();
            e.holders.retain_mut(|h| {
                if left == 0 || h.peer.id() != session_id {
                    return true;
                }
                let take = left.min(h.permits);
                left -= take;
                // A mutex or exclusive hold is one permit that weighs all.
                e.free += weight(h.kind, take) as u32;
                h.permits -= take;
                if h.permits == 0 {
                    ended.push(h.hold_id);
                    false
                } else {
                    true
                }
            });
            Ok(ended)
        });
        match result {
            Some(Ok(ended)) => Ok(Released { ended, deliveries }),
            Some(Err(e)) => Err(e),
            None => Err(not_held(0)),
        }
    }

    /// Ends session `session_id`'s part in `name`: its holds are released
    /// (so the next grant reports abandonment when `abandon`) and its waits
    /// removed.
    pub fn end_session(&self, name: &str, session_id: u64, abandon: bool) -> Grants {
        let mut out = Grants::default();
        self.with_entry(name, &mut out, |e| {
            e.queue.retain(|w| w.peer.id() != session_id);
            let before = e.holders.len();
            let mut freed = 0;
            e.holders.retain(|h| {
                let keep = h.peer.id() != session_id;
                if !keep {
                    freed += weight(h.kind, h.permits);
                }
                keep
            });
            if e.holders.len() != before {
                e.free += freed as u32;
                e.abandoned |= abandon;
            }
        });
        out
    }

    /// Whether `name` has a live hold with `fence`, whichever session holds
    /// it: the check of a fenced state write.
    pub fn fence_is_live(&self, name: &str, fence: u64) -> bool {
        lock(self.shard(name))
            .get(name)
            .is_some_and(|e| e.holders.iter().any(|h| h.fence == fence))
    }

    /// Entries whose name starts with `prefix`, in name order, at most
    /// `limit` of them; the flag says whether more matched.
    pub fn inspect(&self, prefix: &str, limit: usize) -> (Vec<EntryInfo>, bool) {
        self.list(prefix, "", limit)
    }

    /// Entries whose name starts with `prefix` and comes after
    /// `start_after` (every matching one if it is empty), in name order, at
    /// most `limit` of them; the flag says whether more may follow.
    ///
    /// The cost is proportional to the shards plus the entries returned:
    /// each shard is searched once from the cursor, then the smallest next
    /// name is taken, each under a short lock of its own shard. Entries are
    /// shown as they were when visited, not at one instant.
    pub fn list(&self, prefix: &str, start_after: &str, limit: usize) -> (Vec<EntryInfo>, bool) {
        let lower = if start_after.is_empty() || start_after < prefix {
            Bound::Included(prefix)
        } else {
            Bound::Excluded(start_after)
        };
        let shards = &self.inner.shards;
        let mut next: BinaryHeap<Reverse<(LockName, usize)>> = shards
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some(Reverse((first_match(&lock(s), lower, prefix)?, i))))
            .collect();
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(Reverse((name, i))) = next.pop() else {
                break;
            };
            let shard = lock(&shards[i]);
            let mut from =
                shard.range::<str, _>((Bound::Included(name.as_str()), Bound::Unbounded));
            let after = match from.next() {
                Some((k, e)) if *k == name => {
                    out.push(e.info(k));
                    from.next()
                }
                // Forgotten since it was found: its successor takes its place.
                found => found,
            };
            if let Some((k, _)) = after.filter(|(k, _)| k.as_str().starts_with(prefix)) {
                next.push(Reverse((k.clone(), i)));
            }
        }
        (out, !next.is_empty())
    }

    /// How many entries the table remembers (busy or abandoned).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether the table remembers no entry.
    pub fn is_empty(&self) -> bool {
        self.inner.shards.iter().all(|s| lock(s).is_empty())
    }

    /// How many idle names are kept only for their abandoned flag.
    pub fn tombstones(&self) -> usize {
        lock(&self.inner.tombstones).by_age.len()
    }
}

/// Milliseconds since the Unix epoch, for `inspect`.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64) -> (Arc<Peer>, GrantsReceiver) {
        Peer::new(SessionInfo {
            session_id: id,
            pid: None,
            uid: None,
            gid: None,
            client_name: format!("s{id}"),
            ..SessionInfo::default()
        })
    }

    fn name(s: &str) -> LockName {
        LockName::new(s).unwrap()
    }

    fn spec(kind: LockKind, capacity: u32, permits: u32, timeout_ms: Option<u64>) -> AcquireSpec {
        AcquireSpec::validate(kind, capacity, permits, timeout_ms).unwrap()
    }

    fn granted(o: AcquireOutcome) -> Grant {
        match o {
            AcquireOutcome::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[test]
    fn grants_reach_their_session_even_when_dropped() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, mut b_grants) = peer(2);
        let n = name("m");
        let m = spec(LockKind::Mutex, 0, 1, None);
        let held = granted(t.acquire(&n, &a, 1, &m).unwrap());
        assert_eq!(t.acquire(&n, &b, 7, &m).unwrap(), AcquireOutcome::Queued);
        let (permits, grants) = t.release("m", 1, held.hold_id);
        assert_eq!((permits, grants.len()), (Some(1), 1));
        assert!(b_grants.try_recv().is_err(), "not sent while still in hand");
        drop(grants);
        let Notice::Granted {
            request_id, grant, ..
        } = b_grants.try_recv().expect("sent on drop")
        else {
            panic!("not a grant");
        };
        assert_eq!(request_id, 7);
        assert!(grant.fence > held.fence);
    }

    #[test]
    fn large_head_is_not_starved_and_try_never_jumps() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let n = name("pool");
        let sem = |k, to| spec(LockKind::Semaphore, 3, k, to);
        let held = granted(t.acquire(&n, &a, 1, &sem(2, None)).unwrap());
        // b wants 3: must wait. Then a k=1 request fits the free permit but
        // is behind the head, so it queues too; a try fails.
        assert_eq!(
            t.acquire(&n, &b, 2, &sem(3, None)).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(
            t.acquire(&n, &a, 3, &sem(1, None)).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(
            t.acquire(&n, &a, 4, &sem(1, Some(0))).unwrap(),
            AcquireOutcome::WouldBlock
        );
        let (permits, out) = t.release("pool", 1, held.hold_id);
        assert_eq!(permits, Some(2));
        let order: Vec<u64> = out.iter().map(|d| d.request_id).collect();
        assert_eq!(order, [2], "the k=3 head goes first, alone");
        let (_, out) = t.release("pool", 2, out[0].grant.hold_id);
        assert_eq!(out.iter().map(|d| d.request_id).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn mismatches_are_refused_while_busy_and_forgotten_when_idle() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let n = name("x");
        let g = granted(
            t.acquire(&n, &a, 1, &spec(LockKind::Semaphore, 2, 1, None))
                .unwrap(),
        );
        let err = t
            .acquire(&n, &a, 2, &spec(LockKind::Semaphore, 3, 1, None))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::CapacityMismatch);
        let err = t
            .acquire(&n, &a, 3, &spec(LockKind::Mutex, 1, 1, None))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::KindMismatch);
        t.release("x", 1, g.hold_id).1.send();
        assert!(t.is_empty(), "an idle entry is forgotten");
        granted(
            t.acquire(&n, &a, 4, &spec(LockKind::Mutex, 1, 1, None))
                .unwrap(),
        );
    }

    #[test]
    fn abandonment_is_reported_once_even_after_the_entry_idles() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let n = name("m");
        let m = spec(LockKind::Mutex, 1, 1, None);
        let first = granted(t.acquire(&n, &a, 1, &m).unwrap());
        assert!(t.end_session("m", 1, true).is_empty());
        assert_eq!(t.len(), 1, "the abandoned flag is remembered");
        let second = granted(t.acquire(&n, &b, 1, &m).unwrap());
        assert!(second.abandoned);
        assert!(second.fence > first.fence);
        t.release("m", 2, second.hold_id).1.send();
        let third = granted(t.acquire(&n, &b, 2, &m).unwrap());
        assert!(!third.abandoned, "reported once");
    }

    #[test]
    fn a_session_ended_without_abandoning_leaves_no_flag_and_fences_die_with_holds() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let n = name("m");
        let m = spec(LockKind::Mutex, 1, 1, None);
        let first = granted(t.acquire(&n, &a, 1, &m).unwrap());
        assert!(t.fence_is_live("m", first.fence));
        assert!(!t.fence_is_live("m", first.fence + 1));
        assert!(!t.fence_is_live("other", first.fence));
        assert!(t.end_session("m", 1, false).is_empty());
        assert!(!t.fence_is_live("m", first.fence));
        assert!(t.is_empty(), "nothing to remember");
        let second = granted(t.acquire(&n, &b, 1, &m).unwrap());
        assert!(!second.abandoned);
    }

    #[test]
    fn exclusive_head_blocks_later_shared() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let n = name("rw");
        let shared = spec(LockKind::RwShared, 0, 1, None);
        let excl = spec(LockKind::RwExclusive, 0, 1, None);
        let r1 = granted(t.acquire(&n, &a, 1, &shared).unwrap());
        let r2 = granted(t.acquire(&n, &a, 2, &shared).unwrap());
        assert_eq!(t.acquire(&n, &a, 3, &excl).unwrap(), AcquireOutcome::Queued);
        assert_eq!(
            t.acquire(&n, &a, 4, &shared).unwrap(),
            AcquireOutcome::Queued
        );
        assert!(t.release("rw", 1, r1.hold_id).1.is_empty());
        let out = t.release("rw", 1, r2.hold_id).1;
        assert_eq!(out.iter().map(|d| d.request_id).collect::<Vec<_>>(), [3]);
        let out = t.release("rw", 1, out[0].grant.hold_id).1;
        assert_eq!(out.iter().map(|d| d.request_id).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn mutex_and_rwlock_requests_share_a_name() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let n = name("flock");
        let m = spec(LockKind::Mutex, 0, 1, None);
        let shared = spec(LockKind::RwShared, 0, 1, None);
        let r = granted(t.acquire(&n, &a, 1, &shared).unwrap());
        assert_eq!(t.acquire(&n, &a, 2, &m).unwrap(), AcquireOutcome::Queued);
        assert_eq!(
            t.acquire(&n, &a, 3, &shared).unwrap(),
            AcquireOutcome::Queued
        );
        let (info, _) = t.inspect("", 1);
        assert_eq!((info[0].kind, info[0].capacity), (EntryKind::RwLock, 0));
        let out = t.release("flock", 1, r.hold_id).1;
        assert_eq!(out.iter().map(|d| d.request_id).collect::<Vec<_>>(), [2]);
        let out = t.release("flock", 1, out[0].grant.hold_id).1;
        assert_eq!(out.iter().map(|d| d.request_id).collect::<Vec<_>>(), [3]);
        // A name used only as a mutex is shown as one.
        let g = granted(t.acquire(&name("only"), &a, 4, &m).unwrap());
        let (info, _) = t.inspect("only", 1);
        assert_eq!((info[0].kind, info[0].capacity), (EntryKind::Mutex, 1));
        t.release("only", 1, g.hold_id).1.send();
    }

    #[test]
    fn release_count_is_oldest_first_and_all_or_nothing() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let n = name("s");
        let sem = |k| spec(LockKind::Semaphore, 5, k, None);
        let g1 = granted(t.acquire(&n, &a, 1, &sem(2)).unwrap());
        let g2 = granted(t.acquire(&n, &a, 2, &sem(2)).unwrap());
        let err = t.release_count("s", 1, 5).unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotHeld);
        let r = t.release_count("s", 1, 3).unwrap();
        assert_eq!(r.ended, [g1.hold_id]);
        let (info, _) = t.inspect("", 10);
        assert_eq!(info[0].holders.len(), 1);
        assert_eq!(
            (info[0].holders[0].hold_id, info[0].holders[0].permits),
            (g2.hold_id, 1)
        );
        assert_eq!(t.release_count("s", 1, 1).unwrap().ended, [g2.hold_id]);
        assert!(t.is_empty());
        assert_eq!(
            t.release_count("s", 1, 1).unwrap_err().code(),
            ErrorCode::NotHeld
        );
    }

    /// Holds `names` as mutexes in session `id`, then ends the session,
    /// name by name in that order, as a session's cleanup does.
    fn abandon(t: &LockTable, id: u64, names: &[&str]) {
        let (p, _) = peer(id);
        let m = spec(LockKind::Mutex, 1, 1, None);
        for (i, n) in names.iter().enumerate() {
            granted(t.acquire(&name(n), &p, i as u64, &m).unwrap());
        }
        for n in names {
            assert!(t.end_session(n, id, true).is_empty());
        }
    }

    fn abandoned_names(t: &LockTable) -> Vec<String> {
        let (infos, _) = t.inspect("", 100);
        infos
            .into_iter()
            .filter(|i| i.abandoned)
            .map(|i| i.name)
            .collect()
    }

    /// Every held name has an entry: the daemon's memory per name (the
    /// benchmark's figure, with its target) counts each of its bytes.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_entry_is_four_words() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    #[test]
    fn tombstones_past_the_bound_are_forgotten_oldest_first() {
        let t = LockTable::new(0, 2);
        let m = spec(LockKind::Mutex, 1, 1, None);
        abandon(&t, 1, &["x", "y", "z"]);
        assert_eq!(t.tombstones(), 2);
        assert_eq!(abandoned_names(&t), ["y", "z"], "x, the oldest, went first");
        assert_eq!(t.len(), 2);
        let (b, _) = peer(2);
        let g = granted(t.acquire(&name("x"), &b, 1, &m).unwrap());
        assert!(!g.abandoned, "x's flag was forgotten");
        t.release("x", 2, g.hold_id).1.send();

        // A tombstone used again and abandoned again is the youngest.
        abandon(&t, 3, &["y"]);
        abandon(&t, 4, &["w"]);
        assert_eq!(abandoned_names(&t), ["w", "y"], "z was the oldest");

        // Taking a tombstone takes it off the list: it is never evicted
        // while in use, and its grant reports the flag.
        let g = granted(t.acquire(&name("y"), &b, 2, &m).unwrap());
        assert!(g.abandoned);
        assert_eq!(t.tombstones(), 1);
        abandon(&t, 5, &["v", "u"]);
        assert_eq!(abandoned_names(&t), ["u", "v"]);
        assert_eq!(t.inspect("y", 1).0[0].holders.len(), 1);
    }

    #[test]
    fn a_flag_on_a_name_in_use_is_never_evicted() {
        let t = LockTable::new(0, 1);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let sem = spec(LockKind::Semaphore, 2, 1, None);
        let n = name("pool");
        granted(t.acquire(&n, &a, 1, &sem).unwrap());
        let held = granted(t.acquire(&n, &b, 1, &sem).unwrap());
        t.end_session("pool", 1, true).send();
        // Many tombstones come and go; the busy name keeps its flag.
        for i in 0..10 {
            abandon(&t, 10 + i, &[&format!("t{i}")]);
        }
        assert_eq!(t.tombstones(), 1);
        let info = &t.inspect("pool", 1).0[0];
        assert!(info.abandoned && info.holders.len() == 1);
        let (c, _) = peer(3);
        assert!(granted(t.acquire(&n, &c, 1, &sem).unwrap()).abandoned);
        t.release("pool", 2, held.hold_id).1.send();
    }

    #[test]
    fn no_flag_is_kept_for_an_idle_name_with_a_bound_of_zero() {
        let t = LockTable::new(0, 0);
        abandon(&t, 1, &["a", "b"]);
        assert!(t.is_empty());
        assert_eq!(t.tombstones(), 0);
    }

    #[test]
    fn listing_pages_through_every_shard_in_name_order() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let m = spec(LockKind::Mutex, 1, 1, None);
        let mut all: Vec<String> = (0..300)
            .map(|i| format!("{}/{i}", ["app", "db", "web"][i % 3]))
            .collect();
        for (i, n) in all.iter().enumerate() {
            granted(t.acquire(&name(n), &a, i as u64, &m).unwrap());
        }
        all.sort();
        // Small pages, each from the last name of the one before.
        let page = |prefix: &str| {
            let mut got = Vec::new();
            let mut after = String::new();
            loop {
                let (infos, more) = t.list(prefix, &after, 7);
                got.extend(infos.into_iter().map(|i| i.name));
                if !more {
                    return got;
                }
                after = got.last().expect("a page before").clone();
            }
        };
        assert_eq!(page(""), all);
        let db: Vec<String> = all
            .iter()
            .filter(|n| n.starts_with("db/"))
            .cloned()
            .collect();
        assert_eq!(page("db/"), db);
        // A cursor before the prefix starts at the prefix; one past every
        // match gives nothing; one between names is excluded exactly.
        assert_eq!(t.list("db/", "a", 1).0[0].name, db[0]);
        assert_eq!(t.list("db/", "e", 10), (Vec::new(), false));
        let (infos, more) = t.list("", "db/5", 2);
        assert_eq!(
            infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["db/52", "db/55"]
        );
        assert!(more);
        let (infos, more) = t.list("web/", &all[all.len() - 2], 5);
        assert_eq!(infos.len(), 1);
        assert!(!more, "the last page says so");
    }

    fn as_actor(mut spec: AcquireSpec, actor: u64) -> AcquireSpec {
        spec.actor = actor;
        spec
    }

    fn mutex() -> AcquireSpec {
        spec(LockKind::Mutex, 1, 1, None)
    }

    fn deadlock(r: Result<AcquireOutcome, LockError>) -> String {
        match r {
            Err(LockError::Deadlock(message)) => message,
            other => panic!("expected a deadlock, got {other:?}"),
        }
    }

    fn waiters_of(t: &LockTable, n: &str) -> Vec<u64> {
        let (entries, _) = t.inspect(n, 10);
        entries
            .iter()
            .filter(|e| e.name == n)
            .flat_map(|e| e.waiters.iter().map(|w| w.session.session_id))
            .collect()
    }

    #[test]
    fn two_actors_waiting_for_each_other_are_refused_once() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let (x, y) = (name("x"), name("y"));
        granted(t.acquire(&x, &a, 1, &as_actor(mutex(), 11)).unwrap());
        granted(t.acquire(&y, &b, 1, &as_actor(mutex(), 22)).unwrap());
        assert_eq!(
            t.acquire(&y, &a, 2, &as_actor(mutex(), 11)).unwrap(),
            AcquireOutcome::Queued
        );
        let message = deadlock(t.acquire(&x, &b, 2, &as_actor(mutex(), 22)));
        assert_eq!(
            message,
            "waiting for \"x\" would deadlock: this session waits for \"x\", held by \
             session 1 (\"s1\"), which waits for \"y\", held by this session"
        );
        // Only the request that closed the cycle: nothing queued for it,
        // the other wait and every hold untouched.
        assert_eq!(waiters_of(&t, "x"), Vec::<u64>::new());
        assert_eq!(waiters_of(&t, "y"), [1]);
        // Without actors nothing is judged: the same waits queue.
        let t = LockTable::new(0, 1024);
        granted(t.acquire(&x, &a, 1, &mutex()).unwrap());
        granted(t.acquire(&y, &b, 1, &mutex()).unwrap());
        assert_eq!(
            t.acquire(&y, &a, 2, &mutex()).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(
            t.acquire(&x, &b, 2, &mutex()).unwrap(),
            AcquireOutcome::Queued
        );
    }

    fn told(rx: &mut GrantsReceiver) -> Vec<u64> {
        let mut told = Vec::new();
        while let Ok(notice) = rx.try_recv() {
            if let Notice::Contended { hold_id } = notice {
                told.push(hold_id);
            }
        }
        told
    }

    fn telling(mut spec: AcquireSpec) -> AcquireSpec {
        spec.notify_contended = true;
        spec
    }

    #[test]
    fn a_holder_that_asked_is_told_once_when_someone_waits() {
        let t = LockTable::new(0, 1024);
        let (a, mut a_rx) = peer(1);
        let (b, mut b_rx) = peer(2);
        let (c, _) = peer(3);
        let x = name("x");
        let held = granted(t.acquire(&x, &a, 1, &telling(mutex())).unwrap());
        // A try that finds it taken does not wait: no news.
        assert_eq!(
            t.acquire(&x, &c, 1, &spec(LockKind::Mutex, 1, 1, Some(0)))
                .unwrap(),
            AcquireOutcome::WouldBlock
        );
        assert_eq!(told(&mut a_rx), Vec::<u64>::new());
        assert_eq!(
            t.acquire(&x, &b, 1, &telling(mutex())).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(told(&mut a_rx), [held.hold_id]);
        // Once per hold.
        assert_eq!(
            t.acquire(&x, &c, 2, &mutex()).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(told(&mut a_rx), Vec::<u64>::new());
        // b is granted while c still waits: told at its grant.
        let (_, grants) = t.release("x", 1, held.hold_id);
        let b_hold = grants[0].grant.hold_id;
        grants.send();
        assert_eq!(told(&mut b_rx), [b_hold]);
        // A holder that did not ask is never told.
        let (d, mut d_rx) = peer(4);
        let y = name("y");
        granted(t.acquire(&y, &d, 1, &mutex()).unwrap());
        assert_eq!(
            t.acquire(&y, &a, 2, &mutex()).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(told(&mut d_rx), Vec::<u64>::new());
    }

    #[test]
    fn a_revoked_hold_frees_the_lock_and_the_next_grant_says_abandoned() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let x = name("x");
        let held = granted(t.acquire(&x, &a, 1, &mutex()).unwrap());
        assert_eq!(
            t.acquire(&x, &b, 1, &mutex()).unwrap(),
            AcquireOutcome::Queued
        );
        // Only the session's own hold.
        assert!(!t.revoke("x", 2, held.hold_id).0);
        let (revoked, grants) = t.revoke("x", 1, held.hold_id);
        assert!(revoked);
        assert_eq!(grants.len(), 1);
        assert!(grants[0].grant.abandoned, "the next holder is told");
        grants.send();
        // Once is all: the hold is gone.
        assert!(!t.revoke("x", 1, held.hold_id).0);
        assert_eq!(t.release("x", 1, held.hold_id).0, None);
    }

    #[test]
    fn breaking_is_all_or_nothing_and_tells_each_holder() {
        let t = LockTable::new(0, 1024);
        let (a, mut a_rx) = peer(1);
        let (b, mut b_rx) = peer(2);
        let (w, _) = peer(3);
        let s = name("s");
        let sem = |k| spec(LockKind::Semaphore, 3, k, None);
        let ha = granted(t.acquire(&s, &a, 1, &sem(1)).unwrap());
        let hb = granted(t.acquire(&s, &b, 1, &sem(1)).unwrap());
        assert_eq!(
            t.acquire(&s, &w, 1, &sem(3)).unwrap(),
            AcquireOutcome::Queued
        );
        let revoked = |rx: &mut GrantsReceiver| -> Vec<u64> {
            std::iter::from_fn(|| rx.try_recv().ok())
                .filter_map(|n| match n {
                    Notice::Revoked { hold_id, .. } => Some(hold_id),
                    _ => None,
                })
                .collect()
        };
        // Session 2's hold may not be broken: nothing is.
        let only_1 = |who: &SessionInfo| who.session_id == 1;
        assert_eq!(
            t.break_holds("s", None, &only_1, "m").unwrap_err(),
            BreakRefusal::Forbidden(hb.hold_id, b.info.clone())
        );
        assert!(revoked(&mut a_rx).is_empty());
        // One hold by id; then a name nobody holds, an id not on it.
        let (ids, grants) = t.break_holds("s", Some(ha.hold_id), &only_1, "m").unwrap();
        assert_eq!(ids, [ha.hold_id]);
        assert!(grants.is_empty(), "the waiter needs all three permits");
        assert_eq!(revoked(&mut a_rx), [ha.hold_id]);
        assert_eq!(
            t.break_holds("s", Some(ha.hold_id), &|_| true, "m")
                .unwrap_err(),
            BreakRefusal::NotHeld
        );
        assert_eq!(
            t.break_holds("nobody", None, &|_| true, "m").unwrap_err(),
            BreakRefusal::NotHeld
        );
        // Every hold of the name: the waiter is granted, told abandoned.
        let (ids, grants) = t.break_holds("s", None, &|_| true, "m").unwrap();
        assert_eq!(ids, [hb.hold_id]);
        assert_eq!(revoked(&mut b_rx), [hb.hold_id]);
        assert_eq!(grants.len(), 1);
        assert!(grants[0].grant.abandoned);
        grants.send();
        assert_eq!(
            t.release("s", 2, hb.hold_id).0,
            None,
            "broken holds are gone"
        );
    }

    #[test]
    fn a_wait_refused_as_a_deadlock_tells_no_holder() {
        let t = LockTable::new(0, 1024);
        let (a, mut a_rx) = peer(1);
        let (b, _) = peer(2);
        let (x, y) = (name("x"), name("y"));
        granted(
            t.acquire(&x, &a, 1, &telling(as_actor(mutex(), 11)))
                .unwrap(),
        );
        granted(t.acquire(&y, &b, 1, &as_actor(mutex(), 22)).unwrap());
        assert_eq!(
            t.acquire(&y, &a, 2, &as_actor(mutex(), 11)).unwrap(),
            AcquireOutcome::Queued
        );
        deadlock(t.acquire(&x, &b, 2, &as_actor(mutex(), 22)));
        assert_eq!(told(&mut a_rx), Vec::<u64>::new(), "nobody waits behind x");
        // A wait of an actor that stays is told, once checked.
        let (c, _) = peer(3);
        assert_eq!(
            t.acquire(&x, &c, 1, &as_actor(mutex(), 33)).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(told(&mut a_rx).len(), 1);
    }

    #[test]
    fn every_shared_holder_that_asked_is_told_of_a_writer() {
        let t = LockTable::new(0, 1024);
        let (a, mut a_rx) = peer(1);
        let (b, mut b_rx) = peer(2);
        let (w, _) = peer(3);
        let r = name("r");
        let shared = || telling(spec(LockKind::RwShared, 0, 1, None));
        let one = granted(t.acquire(&r, &a, 1, &shared()).unwrap());
        let two = granted(t.acquire(&r, &b, 1, &shared()).unwrap());
        let exclusive = spec(LockKind::RwExclusive, 0, 1, None);
        assert_eq!(
            t.acquire(&r, &w, 1, &exclusive).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(told(&mut a_rx), [one.hold_id]);
        assert_eq!(told(&mut b_rx), [two.hold_id]);
    }

    fn within(mut spec: AcquireSpec, actor: u64, outer: &[u64]) -> AcquireSpec {
        spec.actor = actor;
        spec.within = Some(outer.into());
        spec
    }

    #[test]
    fn commands_within_wrappers_that_wait_for_each_other_are_refused() {
        // The issue's two scripts: wrapper 1 (actor 10, session 1) holds x
        // and runs a command (actor 11, session 3) that waits for y;
        // wrapper 2 (actor 20, session 2) holds y and runs one (actor 21,
        // session 4) that waits for x. Each wrapper keeps its lock while
        // its command waits: a deadlock, through four sessions.
        let t = LockTable::new(0, 1024);
        let (w1, _) = peer(1);
        let (w2, _) = peer(2);
        let (c1, _) = peer(3);
        let (c2, _) = peer(4);
        let (x, y) = (name("x"), name("y"));
        granted(t.acquire(&x, &w1, 1, &as_actor(mutex(), 10)).unwrap());
        granted(t.acquire(&y, &w2, 1, &as_actor(mutex(), 20)).unwrap());
        assert_eq!(
            t.acquire(&y, &c1, 1, &within(mutex(), 11, &[10])).unwrap(),
            AcquireOutcome::Queued
        );
        let message = deadlock(t.acquire(&x, &c2, 1, &within(mutex(), 21, &[20])));
        assert_eq!(
            message,
            "waiting for \"x\" would deadlock: this session waits for \"x\", held by \
             session 1 (\"s1\"), which waits, through session 3 (\"s3\"), for \"y\", \
             held by session 2 (\"s2\"), on whose behalf this session acts"
        );
        assert_eq!(waiters_of(&t, "x"), Vec::<u64>::new());
        assert_eq!(waiters_of(&t, "y"), [3]);
    }

    #[test]
    fn a_command_waiting_for_its_wrappers_lock_is_refused() {
        // `lockbroker lock x -- lockbroker lock x -- …`, two levels deep.
        let t = LockTable::new(0, 1024);
        let (w, _) = peer(1);
        let (c, _) = peer(2);
        let x = name("x");
        granted(t.acquire(&x, &w, 1, &as_actor(mutex(), 10)).unwrap());
        granted(
            t.acquire(&name("y"), &c, 1, &within(mutex(), 11, &[10]))
                .unwrap(),
        );
        let (cc, _) = peer(3);
        let message = deadlock(t.acquire(&x, &cc, 1, &within(mutex(), 12, &[11, 10])));
        assert_eq!(
            message,
            "waiting for \"x\" would deadlock: this session waits for \"x\", held by \
             session 1 (\"s1\"), on whose behalf this session acts"
        );
    }

    #[test]
    fn commands_side_by_side_within_one_wrapper_are_no_deadlock() {
        // Two commands run in parallel under one hold of x take y in turn:
        // the second waits for the first, which waits for nothing.
        let t = LockTable::new(0, 1024);
        let (w, _) = peer(1);
        let (c1, _) = peer(2);
        let (c2, _) = peer(3);
        let (x, y) = (name("x"), name("y"));
        granted(t.acquire(&x, &w, 1, &as_actor(mutex(), 10)).unwrap());
        let first = granted(t.acquire(&y, &c1, 1, &within(mutex(), 11, &[10])).unwrap());
        assert_eq!(
            t.acquire(&y, &c2, 1, &within(mutex(), 12, &[10])).unwrap(),
            AcquireOutcome::Queued
        );
        // Wrapper 10 keeps x while command 12 waits, but 12 waits only
        // for 11, which waits for nothing: another actor may wait for x.
        let (other, _) = peer(4);
        assert_eq!(
            t.acquire(&x, &other, 1, &as_actor(mutex(), 30)).unwrap(),
            AcquireOutcome::Queued
        );
        // Once the first command lets go of y, the second is served.
        let (_, grants) = t.release("y", 2, first.hold_id);
        assert_eq!(grants.len(), 1);
        grants.send();
        assert_eq!(waiters_of(&t, "y"), Vec::<u64>::new());
    }

    #[test]
    fn a_cycle_of_three_across_kinds_is_found() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let (c, _) = peer(3);
        let (m, sem, rw) = (name("m"), name("sem"), name("rw"));
        let sem2 = |k| spec(LockKind::Semaphore, 2, k, None);
        granted(t.acquire(&m, &a, 1, &as_actor(mutex(), 1)).unwrap());
        granted(t.acquire(&sem, &b, 1, &as_actor(sem2(2), 2)).unwrap());
        granted(
            t.acquire(
                &rw,
                &c,
                1,
                &as_actor(spec(LockKind::RwShared, 0, 1, None), 3),
            )
            .unwrap(),
        );
        assert_eq!(
            t.acquire(&sem, &a, 2, &as_actor(sem2(1), 1)).unwrap(),
            AcquireOutcome::Queued
        );
        let exclusive = spec(LockKind::RwExclusive, 0, 1, None);
        assert_eq!(
            t.acquire(&rw, &b, 2, &as_actor(exclusive, 2)).unwrap(),
            AcquireOutcome::Queued
        );
        let message = deadlock(t.acquire(&m, &c, 2, &as_actor(mutex(), 3)));
        assert!(
            message.contains("\"m\"") && message.contains("\"sem\"") && message.contains("\"rw\""),
            "{message}"
        );
    }

    #[test]
    fn a_semaphore_any_one_holder_of_which_can_free_it_is_no_deadlock() {
        // a waits for one of three permits held by b and c; b waits for a.
        // c waits for nothing, so its release serves a: no deadlock.
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let (c, _) = peer(3);
        let (x, sem) = (name("x"), name("sem"));
        let sem3 = |k| spec(LockKind::Semaphore, 3, k, None);
        granted(t.acquire(&x, &a, 1, &as_actor(mutex(), 1)).unwrap());
        granted(t.acquire(&sem, &b, 1, &as_actor(sem3(2), 2)).unwrap());
        granted(t.acquire(&sem, &c, 1, &as_actor(sem3(1), 3)).unwrap());
        assert_eq!(
            t.acquire(&x, &b, 2, &as_actor(mutex(), 2)).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(
            t.acquire(&sem, &a, 2, &as_actor(sem3(1), 1)).unwrap(),
            AcquireOutcome::Queued
        );
        // Once c waits too (for a), a can never be served.
        let message = deadlock(t.acquire(&x, &c, 2, &as_actor(mutex(), 3)));
        assert!(message.contains("\"x\""), "{message}");
    }

    #[test]
    fn an_actor_waiting_behind_its_own_hold_is_refused() {
        let t = LockTable::new(0, 1024);
        let (outer, _) = peer(1);
        let (inner, _) = peer(2);
        let x = name("x");
        // A nested `lockbroker lock x` acts for the session that holds x.
        granted(t.acquire(&x, &outer, 1, &as_actor(mutex(), 7)).unwrap());
        let message = deadlock(t.acquire(&x, &inner, 1, &as_actor(mutex(), 7)));
        assert_eq!(
            message,
            "waiting for \"x\" would deadlock: this session waits for \"x\", held by \
             session 1 (\"s1\"), on whose behalf this session acts"
        );
        // A semaphore the actor holds part of: refused only when the rest
        // can never be enough.
        let sem = name("sem");
        let sem3 = |k| spec(LockKind::Semaphore, 3, k, None);
        granted(t.acquire(&sem, &outer, 2, &as_actor(sem3(2), 7)).unwrap());
        deadlock(t.acquire(&sem, &outer, 3, &as_actor(sem3(2), 7)));
        let (other, _) = peer(3);
        granted(t.acquire(&sem, &other, 1, &as_actor(sem3(1), 8)).unwrap());
        assert_eq!(
            t.acquire(&sem, &outer, 4, &as_actor(sem3(1), 7)).unwrap(),
            AcquireOutcome::Queued
        );
    }

    #[test]
    fn holds_and_waits_of_no_actor_are_taken_to_end() {
        // b acts for nobody: whether it waits is not known, so it is taken
        // to let go in the end, and a's wait for it is no deadlock.
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let (x, y) = (name("x"), name("y"));
        granted(t.acquire(&x, &a, 1, &as_actor(mutex(), 1)).unwrap());
        granted(t.acquire(&y, &b, 1, &mutex()).unwrap());
        assert_eq!(
            t.acquire(&x, &b, 2, &mutex()).unwrap(),
            AcquireOutcome::Queued
        );
        assert_eq!(
            t.acquire(&y, &a, 2, &as_actor(mutex(), 1)).unwrap(),
            AcquireOutcome::Queued
        );
    }

    #[test]
    fn an_ended_wait_closes_no_cycle_and_is_forgotten() {
        let t = LockTable::new(0, 1024);
        let (a, _) = peer(1);
        let (b, _) = peer(2);
        let (x, y) = (name("x"), name("y"));
        granted(t.acquire(&x, &a, 1, &as_actor(mutex(), 1)).unwrap());
        granted(t.acquire(&y, &b, 1, &as_actor(mutex(), 2)).unwrap());
        assert_eq!(
            t.acquire(&y, &a, 2, &as_actor(mutex(), 1)).unwrap(),
            AcquireOutcome::Queued
        );
        // a's wait times out (the session withdraws it).
        assert!(t.cancel("y", 1, 2).0);
        assert_eq!(
            t.acquire(&x, &b, 2, &as_actor(mutex(), 2)).unwrap(),
            AcquireOutcome::Queued
        );
        assert!(
            lock(&t.inner.waits).by_actor[&1].waits.is_empty(),
            "the check dropped the ended wait"
        );
        t.session_ended(1);
        t.session_ended(2);
        let waits = lock(&t.inner.waits);
        assert!(waits.by_actor.is_empty() && waits.by_session.is_empty());
    }

    /// One long session whose every task acts for itself: the index keeps
    /// about what is live, not every actor that ever waited.
    #[test]
    fn a_session_of_many_short_lived_actors_does_not_grow_the_index() {
        let t = LockTable::new(0, 1024);
        let (holder, _) = peer(1);
        let (tasks, _) = peer(2);
        let x = name("x");
        for round in 0..2_000u64 {
            let held = granted(t.acquire(&x, &holder, round, &mutex()).unwrap());
            let actor = 1_000 + round;
            assert_eq!(
                t.acquire(&x, &tasks, round, &as_actor(mutex(), actor))
                    .unwrap(),
                AcquireOutcome::Queued
            );
            let (_, out) = t.release("x", 1, held.hold_id);
            let hold = out[0].grant.hold_id;
            drop(out);
            t.release("x", 2, hold).0.unwrap();
        }
        let waits = lock(&t.inner.waits);
        assert!(
            waits.by_actor.len() <= 2 * WAITS_PRUNE_FLOOR,
            "{} actors kept",
            waits.by_actor.len()
        );
        assert!(waits.by_session[&2].actors.len() <= 2 * WAITS_PRUNE_FLOOR);
    }

    /// A wait that ends (a timeout, on another thread) while the wait that
    /// would close a cycle with it is checked: the check refuses the new
    /// wait, or finds no cycle; never is a cycle left waiting.
    #[test]
    fn a_timeout_racing_the_check_leaves_no_cycle_waiting() {
        for _ in 0..500 {
            let t = LockTable::new(0, 1024);
            let (a, _) = peer(1);
            let (b, _) = peer(2);
            let (x, y) = (name("x"), name("y"));
            granted(t.acquire(&x, &a, 1, &as_actor(mutex(), 1)).unwrap());
            granted(t.acquire(&y, &b, 1, &as_actor(mutex(), 2)).unwrap());
            assert_eq!(
                t.acquire(&y, &a, 2, &as_actor(mutex(), 1)).unwrap(),
                AcquireOutcome::Queued
            );
            let racer = {
                let t = t.clone();
                std::thread::spawn(move || t.cancel("y", 1, 2).0)
            };
            let closing = t.acquire(&x, &b, 2, &as_actor(mutex(), 2));
            let a_timed_out = racer.join().unwrap();
            let a_waits = waiters_of(&t, "y") == [1];
            let b_waits = waiters_of(&t, "x") == [2];
            assert!(!(a_waits && b_waits), "a cycle is left waiting");
            match closing {
                Ok(AcquireOutcome::Queued) => assert!(a_timed_out && b_waits),
                Err(LockError::Deadlock(_)) => assert!(!b_waits),
                other => panic!("{other:?}"),
            }
        }
    }

    mod deadlock_model {
        //! Deadlock detection against a reference that plays out the whole
        //! table: each of six actors is one thread of control (its own
        //! session; it does nothing while it waits but time out), three of
        //! them running within others as commands run under a wrapper's
        //! lock do (a wrapper does nothing while a command within it
        //! waits), and an acquire must be refused exactly when, with its
        //! wait added, some wait could never be granted.
        use super::*;
        use proptest::prelude::*;

        const CAPACITY: [u64; 3] = [RW_WEIGHT, 3, RW_WEIGHT];
        const ACTORS: usize = 6;
        /// The actors each runs within, nearest first: 3 within 1, 4
        /// within 0, 5 within 4 (and so 0).
        const WITHIN: [&[usize]; ACTORS] = [&[], &[], &[], &[1], &[0], &[4, 0]];

        #[derive(Debug, Clone)]
        enum Op {
            Acquire {
                a: usize,
                n: usize,
                permits: u32,
                shared: bool,
            },
            Release {
                a: usize,
                pick: usize,
            },
            TimeOut {
                a: usize,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                5 => (0..ACTORS, 0..3usize, 1..=3u32, any::<bool>())
                    .prop_map(|(a, n, permits, shared)| Op::Acquire { a, n, permits, shared }),
                3 => (0..ACTORS, any::<usize>()).prop_map(|(a, pick)| Op::Release { a, pick }),
                1 => (0..ACTORS).prop_map(|a| Op::TimeOut { a }),
            ]
        }

        /// (actor, weight, hold id or request id)
        type Slot = (usize, u64, u64);

        #[derive(Default, Clone)]
        struct Model {
            holders: [Vec<Slot>; 3],
            queue: [Vec<Slot>; 3],
        }

        impl Model {
            fn waits(&self, a: usize) -> Option<(usize, u64)> {
                (0..3).find_map(|n| self.queue[n].iter().find(|s| s.0 == a).map(|s| (n, s.2)))
            }

            /// Whether `a` or an actor within it waits: `a` does nothing.
            fn busy(&self, a: usize) -> bool {
                (0..ACTORS).any(|b| (b == a || WITHIN[b].contains(&a)) && self.waits(b).is_some())
            }

            /// Whether some wait can never be granted: actors that wait
            /// for nothing let go, queues are served in order, to the end.
            fn stuck(&self) -> bool {
                let mut m = self.clone();
                loop {
                    let mut changed = false;
                    for (n, capacity) in CAPACITY.into_iter().enumerate() {
                        let waiting: Vec<usize> = (0..ACTORS).filter(|a| m.busy(*a)).collect();
                        let before = m.holders[n].len();
                        m.holders[n].retain(|h| waiting.contains(&h.0));
                        changed |= m.holders[n].len() != before;
                        loop {
                            let used: u64 = m.holders[n].iter().map(|h| h.1).sum();
                            match m.queue[n].first() {
                                Some(w) if used + w.1 <= capacity => {
                                    let w = m.queue[n].remove(0);
                                    m.holders[n].push(w);
                                    changed = true;
                                }
                                _ => break,
                            }
                        }
                    }
                    if !changed {
                        return m.queue.iter().any(|q| !q.is_empty());
                    }
                }
            }

            fn granted(&mut self, deliveries: &[Delivery]) {
                for d in deliveries {
                    let n = (0..3)
                        .find(|n| self.queue[*n].iter().any(|w| w.2 == d.request_id))
                        .expect("a delivery for a waiter");
                    let at = self.queue[n]
                        .iter()
                        .position(|w| w.2 == d.request_id)
                        .unwrap();
                    let (a, weight, _) = self.queue[n].remove(at);
                    self.holders[n].push((a, weight, d.grant.hold_id));
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
            #[test]
            fn refused_exactly_when_a_wait_could_never_be_granted(
                ops in prop::collection::vec(op(), 1..60)
            ) {
                let t = LockTable::new(0, 1024);
                let peers: Vec<Arc<Peer>> = (1..=ACTORS as u64).map(|i| peer(i).0).collect();
                let names = [name("m"), name("s"), name("r")];
                let mut m = Model::default();
                let mut next_request = 0;
                for op in ops {
                    match op {
                        Op::Acquire { a, n, permits, shared } => {
                            if m.busy(a) {
                                continue; // a thread that waits does nothing else
                            }
                            let (kind, permits) = match n {
                                0 => (LockKind::Mutex, 1),
                                1 => (LockKind::Semaphore, permits),
                                _ if shared => (LockKind::RwShared, 1),
                                _ => (LockKind::RwExclusive, 1),
                            };
                            next_request += 1;
                            let outer: Vec<u64> = WITHIN[a].iter().map(|b| *b as u64 + 1).collect();
                            let s = match outer.is_empty() {
                                true => as_actor(spec(kind, 3, permits, None), a as u64 + 1),
                                false => within(spec(kind, 3, permits, None), a as u64 + 1, &outer),
                            };
                            let w = weight(kind, permits);
                            let mut with_wait = m.clone();
                            with_wait.queue[n].push((a, w, next_request));
                            match t.acquire(&names[n], &peers[a], next_request, &s) {
                                Ok(AcquireOutcome::Granted(g)) => m.holders[n].push((a, w, g.hold_id)),
                                Ok(AcquireOutcome::Queued) => {
                                    prop_assert!(!with_wait.stuck(), "queued into a deadlock");
                                    m = with_wait;
                                }
                                Err(LockError::Deadlock(_)) => {
                                    prop_assert!(with_wait.stuck(), "refused, but no deadlock");
                                }
                                other => prop_assert!(false, "{other:?}"),
                            }
                        }
                        Op::Release { a, pick } => {
                            if m.busy(a) {
                                continue;
                            }
                            let held: Vec<(usize, u64)> = (0..3)
                                .flat_map(|n| m.holders[n].iter().filter(|h| h.0 == a).map(move |h| (n, h.2)))
                                .collect();
                            if held.is_empty() {
                                continue;
                            }
                            let (n, hold_id) = held[pick % held.len()];
                            let (released, out) = t.release(names[n].as_str(), a as u64 + 1, hold_id);
                            prop_assert!(released.is_some());
                            m.holders[n].retain(|h| h.2 != hold_id);
                            m.granted(&out);
                        }
                        Op::TimeOut { a } => {
                            let Some((n, request_id)) = m.waits(a) else { continue };
                            let (removed, out) = t.cancel(names[n].as_str(), a as u64 + 1, request_id);
                            prop_assert!(removed);
                            m.queue[n].retain(|w| w.2 != request_id);
                            m.granted(&out);
                        }
                    }
                    prop_assert!(!m.stuck(), "a deadlock is left waiting");
                }
            }
        }
    }

    mod model {
        //! The table against a reference model that recomputes everything
        //! from plain lists on every step.
        use super::*;
        use proptest::prelude::*;

        const NAMES: [&str; 3] = ["m", "s", "r"];
        const SEM_CAPACITY: u32 = 3;

        #[derive(Debug, Clone)]
        enum Op {
            Acquire {
                s: usize,
                n: usize,
                permits: u32,
                shared: bool,
                try_: bool,
            },
            Release {
                s: usize,
                pick: usize,
            },
            ReleaseCount {
                s: usize,
                n: usize,
                count: u32,
            },
            Cancel {
                s: usize,
                pick: usize,
            },
            Disconnect {
                s: usize,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..3usize, 0..3usize, 1..=SEM_CAPACITY, any::<bool>(), prop::bool::weighted(0.2))
                    .prop_map(|(s, n, permits, shared, try_)| Op::Acquire { s, n, permits, shared, try_ }),
                3 => (0..3usize, any::<usize>()).prop_map(|(s, pick)| Op::Release { s, pick }),
                1 => (0..3usize, 0..3usize, 1..=SEM_CAPACITY)
                    .prop_map(|(s, n, count)| Op::ReleaseCount { s, n, count }),
                1 => (0..3usize, any::<usize>()).prop_map(|(s, pick)| Op::Cancel { s, pick }),
                1 => (0..3usize).prop_map(|s| Op::Disconnect { s }),
            ]
        }

        /// (session id, request id, kind, permits, hold id)
        type Slot = (u64, u64, LockKind, u32, u64);

        #[derive(Default)]
        struct ModelEntry {
            holders: Vec<Slot>,
            queue: Vec<Slot>,
            abandoned: bool,
        }

        fn capacity(n: usize) -> u64 {
            match n {
                1 => u64::from(SEM_CAPACITY),
                _ => RW_WEIGHT,
            }
        }

        fn free(n: usize, e: &ModelEntry) -> u64 {
            capacity(n) - e.holders.iter().map(|h| weight(h.2, h.3)).sum::<u64>()
        }

        /// Grants the model expects, in order: (session, request id, abandoned).
        fn model_grant(
            n: usize,
            e: &mut ModelEntry,
            out: &mut Vec<(u64, u64, bool)>,
        ) -> Vec<usize> {
            let mut granted_idx = Vec::new();
            while let Some(head) = e.queue.first().copied() {
                if weight(head.2, head.3) > free(n, e) {
                    break;
                }
                e.queue.remove(0);
                out.push((head.0, head.1, std::mem::take(&mut e.abandoned)));
                e.holders.push(head);
                granted_idx.push(e.holders.len() - 1);
            }
            granted_idx
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
            #[test]
            fn table_matches_model(
                ops in prop::collection::vec(op(), 1..120),
                max_abandoned in 0..=3usize,
            ) {
                let t = LockTable::new(0, max_abandoned);
                let mut model: Vec<ModelEntry> = (0..3).map(|_| ModelEntry::default()).collect();
                // The model's tombstones, oldest first.
                let mut tombs: VecDeque<usize> = VecDeque::new();
                // Current incarnation of each of three sessions.
                let mut sessions: Vec<Arc<Peer>> = (1..=3).map(|i| peer(i).0).collect();
                let mut next_session = 4;
                let mut next_request = 1;
                let mut last_fence = 0;
                for op in ops {
                    let mut expected: Vec<(u64, u64, bool)> = Vec::new();
                    let mut got = Grants::default();
                    match op {
                        Op::Acquire { s, n, permits, shared, try_ } => {
                            // Names 0 and 2 mix mutex and rwlock requests.
                            let kind = match (n, shared, permits % 2) {
                                (1, _, _) => LockKind::Semaphore,
                                (_, true, _) => LockKind::RwShared,
                                (0, false, _) | (2, false, 0) => LockKind::Mutex,
                                _ => LockKind::RwExclusive,
                            };
                            let permits = if n == 1 { permits } else { 1 };
                            let sp = spec(kind, SEM_CAPACITY, permits, try_.then_some(0));
                            let rid = next_request;
                            next_request += 1;
                            let p = &sessions[s];
                            let outcome = t.acquire(&name(NAMES[n]), p, rid, &sp).unwrap();
                            let e = &mut model[n];
                            let fits = e.queue.is_empty() && weight(kind, permits) <= free(n, e);
                            match outcome {
                                AcquireOutcome::Granted(g) => {
                                    prop_assert!(fits, "granted while it should not be");
                                    prop_assert_eq!(g.abandoned, std::mem::take(&mut e.abandoned));
                                    prop_assert!(g.fence > last_fence);
                                    last_fence = g.fence;
                                    e.holders.push((p.id(), rid, kind, permits, g.hold_id));
                                }
                                AcquireOutcome::WouldBlock => prop_assert!(!fits && try_),
                                AcquireOutcome::Queued => {
                                    prop_assert!(!fits && !try_);
                                    e.queue.push((p.id(), rid, kind, permits, 0));
                                }
                            }
                        }
                        Op::Release { s, pick } => {
                            let sid = sessions[s].id();
                            let mine: Vec<(usize, usize)> = model.iter().enumerate()
                                .flat_map(|(n, e)| e.holders.iter().enumerate()
                                    .filter(|(_, h)| h.0 == sid).map(move |(i, _)| (n, i)))
                                .collect();
                            if mine.is_empty() {
                                // Releasing a hold the session does not have.
                                let (p, out) = t.release("m", sid, u64::MAX);
                                prop_assert_eq!(p, None);
                                prop_assert!(out.is_empty());
                                continue;
                            }
                            let (n, i) = mine[pick % mine.len()];
                            let h = model[n].holders.remove(i);
                            let (p, out) = t.release(NAMES[n], sid, h.4);
                            prop_assert_eq!(p, Some(h.3));
                            got = out;
                            let idx = model_grant(n, &mut model[n], &mut expected);
                            fill_hold_ids(&mut model[n], idx, &got);
                        }
                        Op::ReleaseCount { s, n, count } => {
                            let sid = sessions[s].id();
                            let count = if n == 1 { count } else { 1 };
                            let held: u32 = model[n].holders.iter().filter(|h| h.0 == sid).map(|h| h.3).sum();
                            let r = t.release_count(NAMES[n], sid, count);
                            if held < count {
                                prop_assert_eq!(r.unwrap_err().code(), ErrorCode::NotHeld);
                                continue;
                            }
                            let r = r.unwrap();
                            let mut left = count;
                            let mut ended = Vec::new();
                            model[n].holders.retain_mut(|h| {
                                if left == 0 || h.0 != sid { return true; }
                                let take = left.min(h.3);
                                left -= take;
                                h.3 -= take;
                                if h.3 == 0 { ended.push(h.4); false } else { true }
                            });
                            prop_assert_eq!(r.ended, ended);
                            got = r.deliveries;
                            let idx = model_grant(n, &mut model[n], &mut expected);
                            fill_hold_ids(&mut model[n], idx, &got);
                        }
                        Op::Cancel { s, pick } => {
                            let sid = sessions[s].id();
                            let mine: Vec<(usize, usize)> = model.iter().enumerate()
                                .flat_map(|(n, e)| e.queue.iter().enumerate()
                                    .filter(|(_, w)| w.0 == sid).map(move |(i, _)| (n, i)))
                                .collect();
                            if mine.is_empty() {
                                let (removed, out) = t.cancel("s", sid, u64::MAX);
                                prop_assert!(!removed && out.is_empty());
                                continue;
                            }
                            let (n, i) = mine[pick % mine.len()];
                            let w = model[n].queue.remove(i);
                            let (removed, out) = t.cancel(NAMES[n], sid, w.1);
                            prop_assert!(removed);
                            got = out;
                            let idx = model_grant(n, &mut model[n], &mut expected);
                            fill_hold_ids(&mut model[n], idx, &got);
                        }
                        Op::Disconnect { s } => {
                            let sid = sessions[s].id();
                            for n in 0..3 {
                                let mut out = t.end_session(NAMES[n], sid, true);
                                let e = &mut model[n];
                                e.queue.retain(|w| w.0 != sid);
                                let before = e.holders.len();
                                e.holders.retain(|h| h.0 != sid);
                                if e.holders.len() != before { e.abandoned = true; }
                                let start = expected.len();
                                let idx = model_grant(n, e, &mut expected);
                                prop_assert_eq!(out.len(), expected.len() - start);
                                fill_hold_ids(e, idx, &out);
                                got.0.append(&mut out.0);
                                // The table evicts as each name goes idle.
                                settle(&mut model, &mut tombs, max_abandoned, [n]);
                            }
                            sessions[s] = peer(next_session).0;
                            next_session += 1;
                            // Nothing of the old session is left anywhere.
                            let (infos, _) = t.inspect("", 10);
                            for info in &infos {
                                prop_assert!(info.holders.iter().all(|h| h.session.session_id != sid));
                                prop_assert!(info.waiters.iter().all(|w| w.session.session_id != sid));
                            }
                        }
                    }
                    settle(&mut model, &mut tombs, max_abandoned, 0..3);
                    prop_assert_eq!(t.tombstones(), tombs.len());
                    let got_ids: Vec<(u64, u64, bool)> = got.iter()
                        .map(|d| (d.to.id(), d.request_id, d.grant.abandoned)).collect();
                    prop_assert_eq!(&got_ids, &expected, "grants follow FIFO");
                    for d in got.iter() {
                        prop_assert!(d.grant.fence > last_fence, "fences increase");
                        last_fence = d.grant.fence;
                    }
                    // Invariants: never above capacity; the table remembers
                    // exactly the busy or abandoned entries.
                    let (infos, _) = t.inspect("", 10);
                    for (n, e) in model.iter().enumerate() {
                        prop_assert!(free(n, e) <= capacity(n));
                        let info = infos.iter().find(|i| i.name == NAMES[n]);
                        let busy = !e.holders.is_empty() || !e.queue.is_empty() || e.abandoned;
                        prop_assert_eq!(info.is_some(), busy, "entry {} remembered iff busy", NAMES[n]);
                        if let Some(info) = info {
                            let holders: Vec<u64> = info.holders.iter().map(|h| h.hold_id).collect();
                            let model_holders: Vec<u64> = e.holders.iter().map(|h| h.4).collect();
                            prop_assert_eq!(holders, model_holders);
                            let waiters: Vec<u64> = info.waiters.iter().map(|w| w.request_id).collect();
                            let model_waiters: Vec<u64> = e.queue.iter().map(|w| w.1).collect();
                            prop_assert_eq!(waiters, model_waiters);
                        }
                    }
                }
            }
        }

        /// Tracks which names are tombstones (idle, kept for their flag), in
        /// the order they became one, and forgets the oldest flags past
        /// `max`.
        fn settle(
            model: &mut [ModelEntry],
            tombs: &mut VecDeque<usize>,
            max: usize,
            names: impl IntoIterator<Item = usize>,
        ) {
            for n in names {
                let e = &model[n];
                if !e.holders.is_empty() || !e.queue.is_empty() {
                    tombs.retain(|&t| t != n);
                } else if e.abandoned && !tombs.contains(&n) {
                    tombs.push_back(n);
                }
                while tombs.len() > max {
                    let old = tombs.pop_front().expect("over the bound");
                    model[old].abandoned = false;
                }
            }
        }

        /// Copies the hold ids the table gave to the model's new holders.
        fn fill_hold_ids(e: &mut ModelEntry, idx: Vec<usize>, got: &[Delivery]) {
            for i in idx {
                let h = &mut e.holders[i];
                if let Some(d) = got.iter().find(|d| d.request_id == h.1 && d.to.id() == h.0) {
                    h.4 = d.grant.hold_id;
                }
            }
        }
    }
}

//! The etcd backend (`--backend etcd`): the locks of every daemon that
//! names the same etcd cluster and prefix are one set of locks, so
//! processes on several hosts share them through their own local daemons.
//!
//! Each session gets one etcd lease, granted at its first acquire and
//! kept alive by its daemon; each hold or wait is one key on that lease
//! (`etcd/queue.rs` has the layout and the rule that decides who holds). A
//! session that ends has its lease revoked at once, so its keys vanish
//! and every daemon that waits on them grants the next in line; a daemon
//! or host that dies stops keeping its leases alive, and etcd deletes
//! their keys after the lease's TTL.
//!
//! An acquire is one transaction: put the key (in the lowest slot of the
//! name free on this daemon: `etcd/slots.rs`), read the name's keys. The
//! key's create revision is its place in the queue and its fence. If it
//! is not granted at once, the daemon watches the name from the revision
//! after the one it read (one watch per name per daemon, shared by its
//! waiters there; a watch that starts at or below etcd's current
//! revision is served by etcd's slower catch-up loop) and grants its
//! waiters as the keys before them go. Every change a session asks for
//! (release, withdrawal) is answered once etcd has applied it, so a
//! release that was answered has freed the lock for every host.
//!
//! The daemon tracks when each lease was last confirmed alive. If the
//! lease could expire in etcd before it is confirmed again (the daemon
//! lost contact), the session is ended with `holds_lost` first, so its
//! client learns it no longer holds anything before anyone else can be
//! granted its locks.

mod queue;
mod slots;
mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, TxnOp, TxnOpResponse, WatchOptions,
};
use lockbroker_proto::{EntryInfo, ErrorCode, ErrorInfo, Grant, LockName};
use tokio::sync::{OnceCell, mpsc};

use crate::backend::{Applied, Backend};
use crate::config::EtcdConfig;
use crate::lock_table::{AcquireOutcome, AcquireSpec, Delivery, LockError, Notice, Peer, now_ms};
use crate::state::{Op, ReplyTo, StateConfig};
use queue::{Queued, Record};

/// How long one request to etcd may take before it is retried (or, for
/// the first connection, the daemon gives up starting).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause before retrying a change etcd did not confirm.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Most waits of a session withdrawn while etcd has not answered their
/// put; past it, its acquires are refused as too many pending.
const MAX_WITHDRAWN: usize = 1024;

/// Keys deleted by one transaction (etcd's default limit is 128
/// operations).
const TXN_DELETES: usize = 100;

/// Keys read per page when listing.
const LIST_PAGE: i64 = 1000;

/// How long an abandonment nobody took the lock after is remembered.
const MARKER_TTL: Duration = Duration::from_secs(3600);

/// A lease shared by many keys that need not outlive it by much: one at a
/// time, replaced once half its TTL has passed and never kept alive, so
/// what is put with it is gone within a TTL.
struct Rotating {
    ttl: Duration,
    current: tokio::sync::Mutex<Option<(i64, Instant)>>,
}

impl Rotating {
    fn new(ttl: Duration) -> Rotating {
        Rotating {
            ttl,
            current: tokio::sync::Mutex::new(None),
        }
    }

    async fn get(&self, client: &Client) -> Result<i64, ErrorInfo> {
        let mut current = self.current.lock().await;
        if let Some((id, at)) = *current
            && at.elapsed() < self.ttl / 2
        {
            return Ok(id);
        }
        let (id, asked) = grant_lease(client, self.ttl, false).await?;
        *current = Some((id, asked));
        Ok(id)
    }

    /// The lease expired under its user: the next asks for a new one.
    async fn forget(&self) {
        *self.current.lock().await = None;
    }
}

/// The etcd backend; see the module's documentation.
#[derive(Debug)]
pub struct Etcd {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    /// For the sessions' lease keepalives only.
    keepalive_client: Client,
    prefix: String,
    ttl: Duration,
    /// Makes this daemon's key tags unique among all daemons.
    instance: u64,
    host: String,
    next_hold: AtomicU64,
    core: Mutex<Core>,
    watches: mpsc::UnboundedSender<WatchCmd>,
    /// The lease release notes are put with: short, never kept alive.
    note_lease: Rotating,
    /// The lease abandonment markers are put with: an hour.
    marker_lease: Rotating,
    /// Largest state value.
    max_value_len: u32,
    /// Recent state changes kept for watches to replay.
    history_len: usize,
    /// What the state watch has delivered.
    state_feed: Mutex<state::Feed>,
    /// Every state change, to the sessions that watch.
    state_changes: tokio::sync::broadcast::Sender<Arc<crate::state::Change>>,
    /// Woken whenever the state watch delivers.
    state_caught_up: tokio::sync::Notify,
    /// Asks the state watch for a progress report.
    state_progress: mpsc::UnboundedSender<()>,
    /// Each session's state operations, in order.
    state_queues: Mutex<HashMap<u64, mpsc::UnboundedSender<(Op, ReplyTo)>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// What this daemon knows of its sessions and of the names they wait on.
#[derive(Default)]
struct Core {
    sessions: HashMap<u64, SessionState>,
    names: HashMap<LockName, NameState>,
    /// Watch id → the name it watches.
    watching: HashMap<i64, LockName>,
    last_watch: i64,
    /// Abandonment markers whose abandonment a grant here has told, to be
    /// removed once the core is unlocked.
    consume: Vec<(LockName, i64)>,
    /// The key slots of each name in use here.
    slots: slots::Slots,
}

/// One session's lease: granted once, at its first acquire (asked for
/// again while etcd does not grant it); `None` once the session ended
/// without one, so that none is granted after.
type LeaseCell = OnceCell<Option<i64>>;

struct SessionState {
    peer: Arc<Peer>,
    lease: Arc<LeaseCell>,
    /// Request id → wait.
    waits: HashMap<u64, Wait>,
    /// Hold id → hold.
    holds: HashMap<u64, Hold>,
    /// Ends the lease's keepalive task.
    stop_keepalive: Option<tokio::sync::oneshot::Sender<()>>,
    /// Hold ids of waits withdrawn (timed out, cancelled) while their
    /// key was being put: the put's task deletes the key once etcd
    /// answers. The withdrawal itself is answered at once, so a timeout
    /// is on time even while etcd does not answer.
    withdrawn: HashSet<u64>,
    /// Changes to the session's keys under way (releases, withdrawals,
    /// the clean releases and markers of its end), which its lease's
    /// revocation waits for.
    changes: Vec<tokio::task::JoinHandle<()>>,
    /// Slots of keys left to the lease's revocation (waits and abandoned
    /// holds of names the session was done with before it ended).
    revoked: Vec<(LockName, u32)>,
}

struct Wait {
    name: LockName,
    /// Its key's slot, and the tag made of it.
    slot: u32,
    tag: String,
    record: Record,
    /// Its create revision, once its key is put.
    revision: Option<i64>,
}

struct Hold {
    name: LockName,
    slot: u32,
    tag: String,
    record: Record,
    /// Its key's create revision: its place in the queue and its fence.
    revision: i64,
}

/// A name some of this daemon's sessions wait on: its queue as etcd has
/// it, kept current by a watch.
struct NameState {
    /// Keys by create revision.
    queue: BTreeMap<i64, Queued>,
    /// The revision the queue reflects.
    revision: i64,
    /// This name's watch.
    watch: i64,
    /// Local waiters: create revision → (session, request).
    waiters: BTreeMap<i64, (u64, u64)>,
    /// A holder's key went without a release: the next grant is told.
    abandoned: bool,
    /// The mod revision of the name's abandonment marker, if it has one.
    marker: Option<i64>,
}

impl NameState {
    /// Revisions of the keys granted now (read for each change the watch
    /// shows, under the core's lock: it walks the holders only).
    fn granted(&self) -> BTreeSet<i64> {
        let held = queue::granted_len(self.queue.values());
        self.queue.keys().take(held).copied().collect()
    }
}

enum WatchCmd {
    Start { id: i64, key: Vec<u8>, from: i64 },
    Cancel { id: i64 },
}

/// Grants a lease of `ttl`, asking again while etcd does not answer (for
/// at most [`REQUEST_TIMEOUT`]: a lease granted but not heard of just
/// expires unused) or, for a `fresh` one, answers so late that much of
/// the TTL may be gone; the lease, and when it was asked for (its TTL
/// runs from no earlier).
async fn grant_lease(
    client: &Client,
    ttl: Duration,
    fresh: bool,
) -> Result<(i64, Instant), ErrorInfo> {
    let seconds = ttl.as_secs().max(1) as i64;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let asked = Instant::now();
        match client.clone().lease_grant(seconds, None).await {
            Ok(granted) if !fresh || asked.elapsed() < ttl / 4 => {
                return Ok((granted.id(), asked));
            }
            Ok(late) => {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let _ = client.lease_revoke(late.id()).await;
                });
            }
            Err(e) if Instant::now() >= deadline => return Err(unavailable(e)),
            Err(e) => {
                tracing::debug!("etcd did not grant a lease, asking again: {e}");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        if Instant::now() >= deadline {
            return Err(unavailable("leases were granted too late"));
        }
    }
}

/// Whether `e` says the request never reached etcd (it can be sent again
/// whatever it was).
fn never_sent(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    matches!(e, etcd_client::Error::TransportError(_))
        || text.contains("connect error")
        || text.contains("Connection refused")
}

/// Whether `e` says a read's revision was compacted away (reading it
/// again cannot succeed): etcd's `ErrCompacted`, which the client crate
/// passes on as text.
fn compacted(e: &etcd_client::Error) -> bool {
    e.to_string()
        .contains("required revision has been compacted")
}

fn unavailable(e: impl std::fmt::Display) -> ErrorInfo {
    ErrorInfo::new(
        ErrorCode::Unavailable,
        format!("the etcd cluster did not answer: {e}"),
    )
}

impl Etcd {
    /// Connects to the cluster (failing if no member answers in time) and
    /// starts the watch tasks; shared state has `state`'s limits.
    pub async fn connect(config: &EtcdConfig, state: &StateConfig) -> Result<Etcd, String> {
        // No timeout per request: it would cut the watch and keepalive
        // streams too. The keepalives' own clock bounds how long the
        // daemon goes on without etcd.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if config.ca_cert.is_some() || config.identity.is_some() {
            options = options.with_tls(tls_options(config)?);
        }
        let connect = || async {
            Client::connect(&config.endpoints, Some(options.clone()))
                .await
                .map_err(|e| format!("cannot connect to etcd at {:?}: {e}", config.endpoints))
        };
        let mut client = connect().await?;
        // Keepalives have a connection of their own, so that they never
        // queue behind the daemon's lock traffic: a renewal that waits in
        // the client's queue is a lease nearer expiry.
        let keepalive_client = connect().await?;
        // One round trip now: a cluster that cannot be reached fails the
        // start, not the first acquire.
        let probe = client.get(
            format!("{}/", config.prefix),
            Some(GetOptions::new().with_count_only()),
        );
        let revision = match tokio::time::timeout(REQUEST_TIMEOUT, probe).await {
            Ok(Ok(r)) => r.header().map_or(0, |h| h.revision()),
            Ok(Err(e)) => {
                return Err(format!(
                    "etcd at {:?} does not answer: {e}",
                    config.endpoints
                ));
            }
            Err(_) => {
                return Err(format!(
                    "etcd at {:?} did not answer within {REQUEST_TIMEOUT:?}",
                    config.endpoints
                ));
            }
        };
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| format!("no randomness: {e}"))?;
        let (watches, commands) = mpsc::unbounded_channel();
        let (state_progress, progress) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            client,
            keepalive_client,
            prefix: config.prefix.trim_end_matches('/').to_owned(),
            ttl: config.lease_ttl,
            instance: u64::from_le_bytes(seed),
            host: crate::identity::host_name(),
            next_hold: AtomicU64::new(0),
            core: Mutex::new(Core::default()),
            watches,
            note_lease: Rotating::new(config.lease_ttl),
            marker_lease: Rotating::new(MARKER_TTL),
            max_value_len: state.max_value_len,
            history_len: state.history,
            state_feed: Mutex::new(state::Feed::default()),
            state_changes: tokio::sync::broadcast::channel(state.history.max(1)).0,
            state_caught_up: tokio::sync::Notify::new(),
            state_progress,
            state_queues: Mutex::new(HashMap::new()),
        });
        tokio::spawn(watch_task(Arc::clone(&shared), commands));
        tokio::spawn(state::state_feed(Arc::clone(&shared), revision, progress));
        Ok(Etcd { shared })
    }
}

fn tls_options(tls: &EtcdConfig) -> Result<etcd_client::TlsOptions, String> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let mut options = etcd_client::TlsOptions::new();
    if let Some(ca) = &tls.ca_cert {
        options = options.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When a change to a session's keys is no longer worth retrying:
    /// two lease TTLs on, the session's lease has expired in etcd whatever
    /// became of it, and its keys with it.
    fn give_up(&self) -> Instant {
        Instant::now() + self.ttl * 2
    }

    fn name_range(&self, name: &str) -> Vec<u8> {
        queue::name_range(&self.prefix, name)
    }

    /// The session's lease, granted (and its keepalive started) by the
    /// first caller; asked for again by the next one if that failed.
    async fn lease(self: &Arc<Self>, session_id: u64, cell: &LeaseCell) -> Result<i64, ErrorInfo> {
        let lease = cell.get_or_try_init(|| async {
            let mut client = self.client.clone();
            let (id, asked) = grant_lease(&client, self.ttl, true).await?;
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let peer = {
                let mut core = self.core();
                match core.sessions.get_mut(&session_id) {
                    Some(s) => {
                        s.stop_keepalive = Some(stop);
                        Some(Arc::clone(&s.peer))
                    }
                    None => None,
                }
            };
            match peer {
                Some(peer) => {
                    tokio::spawn(keepalive(Arc::clone(self), id, asked, peer, stopped));
                }
                // The session ended while its lease was being granted.
                None => {
                    let _ = client.lease_revoke(id).await;
                }
            }
            Ok::<_, ErrorInfo>(Some(id))
        });
        lease
            .await?
            .ok_or_else(|| ErrorInfo::new(ErrorCode::Internal, "the session has ended"))
    }

    /// Puts abandonment markers for `names` (each with the record of a
    /// hold abandoned there), retrying until etcd confirms.
    async fn mark_abandoned(&self, marks: Vec<(String, Record)>) {
        let give_up = self.give_up();
        while Instant::now() < give_up {
            let lease = match self.marker_lease.get(&self.client).await {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::warn!("no lease for abandonment markers: {}", e.message);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            let ops: Vec<TxnOp> = marks
                .iter()
                .map(|(name, record)| {
                    TxnOp::put(
                        queue::marker_key(&self.prefix, name),
                        record.encode(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            let txn = etcd_client::Txn::new().and_then(ops);
            match self.client.clone().kv_client().txn(txn).await {
                Ok(_) => return,
                Err(e) if e.to_string().contains("lease not found") => {
                    self.marker_lease.forget().await;
                }
                Err(e) => {
                    tracing::warn!("cannot mark an abandonment, retrying: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    fn record(&self, peer: &Peer, request_id: u64, hold_id: u64, spec: &AcquireSpec) -> Record {
        Record {
            kind: spec.kind,
            capacity: spec.capacity,
            permits: spec.permits,
            hold_id,
            request_id,
            session: peer.info.clone(),
            host: self.host.clone(),
            since_ms: now_ms(),
            timeout_ms: spec.timeout_ms,
        }
    }

    /// Puts acquire `request_id`'s key and reads the front of its queue;
    /// then grants it, refuses it, or leaves it waiting on the name's
    /// watch.
    async fn put_wait(
        self: Arc<Self>,
        session_id: u64,
        request_id: u64,
        hold_id: u64,
        (name, mut slot): (LockName, u32),
        may_wait: bool,
    ) {
        // The wait, while it is this one's (not withdrawn, nor replaced
        // by a later acquire with the same request id).
        let mine = |s: &SessionState| {
            s.waits
                .get(&request_id)
                .is_some_and(|w| w.record.hold_id == hold_id)
        };
        // Nothing was put, or the key went with the session's lease.
        let give_back = |slot: u32| self.core().slots.give_back(name.as_str(), slot);
        let Some((lease, record, peer)) = ({
            let mut core = self.core();
            core.sessions.get_mut(&session_id).and_then(|s| {
                if !mine(s) {
                    // Withdrawn before anything was put.
                    s.withdrawn.remove(&hold_id);
                    return None;
                }
                let w = s.waits.get(&request_id)?;
                Some((Arc::clone(&s.lease), w.record.clone(), Arc::clone(&s.peer)))
            })
        }) else {
            return give_back(slot);
        };
        // After a pause for etcd: whether the wait is still worth
        // pursuing (withdrawn, it is done with).
        let still_mine = || match self.core().sessions.get_mut(&session_id) {
            Some(s) if mine(s) => true,
            Some(s) => {
                s.withdrawn.remove(&hold_id);
                false
            }
            None => false,
        };
        // The session's lease is waited for as the put is.
        let lease = loop {
            match self.lease(session_id, &lease).await {
                Ok(lease) => break lease,
                Err(e) => {
                    tracing::debug!("etcd did not grant a session's lease, asking again: {e:?}");
                    if !still_mine() {
                        // Nothing was put.
                        return give_back(slot);
                    }
                }
            }
        };
        if !still_mine() {
            // Withdrawn while the lease was granted: nothing to put.
            return give_back(slot);
        }
        let marker = queue::marker_key(&self.prefix, name.as_str());
        // The front of the queue is enough to know whether the new key is
        // granted, and reading all of it each time would cost as much as
        // the queue is long.
        let front = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(queue::front_len(record.kind, record.capacity));
        let (key, response) = loop {
            let key = queue::hold_key(
                &self.prefix,
                name.as_str(),
                &slots::tag(self.instance, slot),
            );
            let reads = [
                TxnOp::get(self.name_range(name.as_str()), Some(front.clone())),
                TxnOp::get(marker.clone(), None),
                TxnOp::get(key.clone(), None),
            ];
            let put = TxnOp::put(
                key.clone(),
                record.encode(),
                Some(PutOptions::new().with_lease(lease)),
            );
            // Put only where no key is: one left in the slot by an ended
            // session whose lease etcd has not taken yet is not taken
            // over (with its place in the queue).
            let txn = etcd_client::Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then(
                    std::iter::once(put)
                        .chain(reads.clone())
                        .collect::<Vec<_>>(),
                )
                .or_else(reads);
            // Put again when etcd did not answer (a leader change, say):
            // a put applied already is found in the slot, with its
            // create revision. An acquire waits for etcd as it waits for
            // the lock: until its timeout or cancel withdraws it, or its
            // session ends (which a daemon cut off from etcd does to its
            // sessions).
            let response = loop {
                match self.client.clone().kv_client().txn(txn.clone()).await {
                    Ok(r) => break r,
                    Err(e) => {
                        tracing::debug!("etcd did not take an acquire, retrying: {e}");
                        tokio::time::sleep(RETRY_PAUSE).await;
                        if !still_mine() {
                            // The put may have been applied: take it back.
                            return self.delete_later(
                                session_id,
                                name.as_str(),
                                (key, slot),
                                None,
                                None,
                            );
                        }
                    }
                }
            };
            if response.succeeded() || put_earlier(&response, lease, hold_id) {
                break (key, response);
            }
            // Another's key: the wait moves to another slot.
            let mut core = self.core();
            let core = &mut *core;
            let next = core.slots.take(&name);
            core.slots.give_back(name.as_str(), slot);
            let Some(s) = core.sessions.get_mut(&session_id) else {
                core.slots.give_back(name.as_str(), next);
                return;
            };
            if !mine(s) {
                // Withdrawn meanwhile: nothing of it was put.
                s.withdrawn.remove(&hold_id);
                core.slots.give_back(name.as_str(), next);
                return;
            }
            let w = s.waits.get_mut(&request_id).expect("mine");
            tracing::debug!(name = %name, slot, "a key of an ended session is in the slot");
            w.slot = next;
            w.tag = slots::tag(self.instance, next);
            slot = next;
        };
        // Where the queue was read, and where this key stands in it (its
        // fence): the same, unless the put was applied by an earlier try.
        let mut read_at = response.header().map_or(0, |h| h.revision());
        let mut gets = response.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let front = gets
            .next()
            .map(|g| self.queued(name.as_str(), g.kvs()))
            .unwrap_or_default();
        let marked = gets
            .next()
            .and_then(|g| g.kvs().first().map(|kv| kv.mod_revision()));
        let revision = gets
            .next()
            .and_then(|g| g.kvs().first().map(|kv| kv.create_revision()))
            .unwrap_or(read_at);
        // Every key before this one is in what was read if this one is.
        let complete = front.iter().any(|q| q.revision == revision);
        let mut decision = if let Some((in_use, capacity)) =
            queue::mismatch(&front, record.kind, record.capacity)
        {
            let error = if in_use == record.kind.entry_kind() {
                LockError::CapacityMismatch {
                    name: name.to_string(),
                    in_use: capacity,
                    asked: record.capacity,
                }
            } else {
                LockError::KindMismatch {
                    name: name.to_string(),
                    in_use,
                    asked: record.kind.entry_kind(),
                }
            };
            Decision::Refuse(Notice::Refused {
                request_id,
                error: error.into(),
            })
        } else if complete {
            decide(&front, revision, may_wait, request_id, None)
        } else {
            // Too many keys before it to tell from the front alone.
            Decision::Read
        };
        loop {
            if let Decision::Read = decision {
                // The whole queue, once: for a try or a wait the front
                // could not decide, and for the first waiter of a name
                // here, whose watch starts from it.
                match self.read_queue(name.as_str(), read_at).await {
                    Ok((queue, at)) => {
                        read_at = at;
                        decision =
                            decide(&queue, revision, may_wait, request_id, Some(queue.clone()))
                    }
                    // What was read at is gone for good: the queue as it
                    // is now tells as much (the name's watch starts from
                    // there).
                    Err(e) if compacted(&e) => {
                        read_at = 0;
                        continue;
                    }
                    // Read again, as the put is sent again, while etcd
                    // does not answer.
                    Err(e) => {
                        tracing::debug!("etcd did not read a queue, retrying: {e}");
                        tokio::time::sleep(RETRY_PAUSE).await;
                        if !still_mine() {
                            return self.delete_later(
                                session_id,
                                name.as_str(),
                                (key, slot),
                                Some(revision),
                                None,
                            );
                        }
                        continue;
                    }
                }
            }
            let mut deliveries = Vec::new();
            let mut consume_marker = None;
            let after = {
                let mut core = self.core();
                let core = &mut *core;
                let Some(s) = core.sessions.get_mut(&session_id) else {
                    // The session ended meanwhile; its lease's revocation
                    // takes the key (and a slot given back early is not
                    // put over).
                    core.slots.give_back(name.as_str(), slot);
                    return;
                };
                if !mine(s) {
                    // Withdrawn while its key was being put (and answered
                    // then): the key goes.
                    s.withdrawn.remove(&hold_id);
                    After::Delete(None)
                } else {
                    if let Some(w) = s.waits.get_mut(&request_id) {
                        w.revision = Some(revision);
                    }
                    match decision {
                        Decision::Read => unreachable!("read above"),
                        Decision::Refuse(notice) => {
                            s.waits.remove(&request_id);
                            After::Delete(Some(notice))
                        }
                        Decision::Grant => {
                            // Abandonment seen by this daemon's watch, or
                            // marked by the daemon of a session that ended
                            // holding the name while nobody waited.
                            let seen = core
                                .names
                                .get_mut(name.as_str())
                                .is_some_and(|state| std::mem::take(&mut state.abandoned));
                            consume_marker = marked;
                            let w = s.waits.remove(&request_id).expect("looked up above");
                            let abandoned = seen || marked.is_some();
                            deliveries.push(grant(s, request_id, w, revision, abandoned));
                            After::Nothing
                        }
                        Decision::Wait(queue) => {
                            if let Some(state) = core.names.get_mut(name.as_str()) {
                                // The name's watch decides, once it has
                                // shown this key (and so every key before).
                                state.waiters.insert(revision, (session_id, request_id));
                                deliveries.extend(evaluate(core, &self.watches, &name, &[]));
                                After::Nothing
                            } else if let Some(queue) = queue {
                                // Watch the name from the revision after
                                // the one read.
                                core.last_watch += 1;
                                let watch = core.last_watch;
                                let mut state = NameState {
                                    queue: queue.into_iter().map(|q| (q.revision, q)).collect(),
                                    revision: read_at,
                                    watch,
                                    waiters: BTreeMap::new(),
                                    abandoned: marked.is_some(),
                                    marker: marked,
                                };
                                state.waiters.insert(revision, (session_id, request_id));
                                core.names.insert(name.clone(), state);
                                core.watching.insert(watch, name.clone());
                                let _ = self.watches.send(WatchCmd::Start {
                                    id: watch,
                                    key: self.name_range(name.as_str()),
                                    from: read_at + 1,
                                });
                                After::Nothing
                            } else {
                                // Nobody here watches the name (any more):
                                // the whole queue first.
                                After::Read
                            }
                        }
                    }
                }
            };
            if let Some(at) = consume_marker {
                self.core().consume.push((name.clone(), at));
            }
            self.finish(deliveries);
            match after {
                After::Nothing => {}
                After::Read => {
                    decision = Decision::Read;
                    continue;
                }
                // The answer waits for the key to go, so a try or a refusal
                // leaves nothing behind in the queue.
                After::Delete(Some(notice)) => {
                    self.delete(vec![key], Release::after(name.as_str(), Some(revision)))
                        .await;
                    give_back(slot);
                    peer.notify(notice);
                }
                After::Delete(None) => {
                    self.delete_later(session_id, name.as_str(), (key, slot), Some(revision), None)
                }
            }
            return;
        }
    }

    /// Gives back `slots` of `name`, whose keys are gone.
    fn give_back(&self, name: &str, slots: impl IntoIterator<Item = u32>) {
        let mut core = self.core();
        for slot in slots {
            core.slots.give_back(name, slot);
        }
    }

    /// Sends grants made under the core's lock, and removes the markers
    /// of abandonments they told.
    fn finish(self: &Arc<Self>, deliveries: Vec<Delivery>) {
        deliveries.into_iter().for_each(Delivery::send);
        let consume = std::mem::take(&mut self.core().consume);
        for (name, revision) in consume {
            self.consume_marker(name.as_str(), revision);
        }
    }

    /// Every key of `name` at `revision` (0: the latest), in queue order,
    /// and the revision read at.
    async fn read_queue(
        &self,
        name: &str,
        revision: i64,
    ) -> Result<(Vec<Queued>, i64), etcd_client::Error> {
        let options = GetOptions::new().with_prefix().with_revision(revision);
        let read = self
            .client
            .clone()
            .get(self.name_range(name), Some(options))
            .await?;
        // The header has the latest revision, whatever was read at.
        let at = match revision {
            0 => read.header().map_or(0, |h| h.revision()),
            at => at,
        };
        Ok((self.queued(name, read.kvs()), at))
    }

    /// Deletes `name`'s abandonment marker, if it is still the one put at
    /// `revision`: its abandonment has been told.
    fn consume_marker(self: &Arc<Self>, name: &str, revision: i64) {
        let key = queue::marker_key(&self.prefix, name);
        let mut kv = self.client.clone().kv_client();
        tokio::spawn(async move {
            let txn = etcd_client::Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::delete(key, None)]);
            if let Err(e) = kv.txn(txn).await {
                tracing::warn!("cannot remove an abandonment marker: {e}");
            }
        });
    }

    /// The keys of `name` among `kvs`, as its queue (release notes and
    /// keys that are not ours left out).
    fn queued(&self, name: &str, kvs: &[etcd_client::KeyValue]) -> Vec<Queued> {
        let mut queue: Vec<Queued> = kvs
            .iter()
            .filter_map(|kv| {
                let (n, tag) = queue::split_key(&self.prefix, kv.key())?;
                if n != name || !queue::is_tag(tag) {
                    return None;
                }
                Some(Queued {
                    revision: kv.create_revision(),
                    tag: tag.to_vec(),
                    record: Record::decode(kv.value())?,
                })
            })
            .collect();
        queue.sort_by_key(|q| q.revision);
        queue
    }

    /// Deletes `key` (in `slot`) of session `session_id` on `name` in a
    /// task of its own (with a release note: a key that was already
    /// granted elsewhere is not taken for abandoned), gives its slot back,
    /// then tells `applied` its token. `newest`: the key's create
    /// revision, when known.
    fn delete_later(
        self: &Arc<Self>,
        session_id: u64,
        name: &str,
        (key, slot): (Vec<u8>, u32),
        newest: Option<i64>,
        applied: Option<(Arc<Peer>, u64)>,
    ) {
        let shared = Arc::clone(self);
        let note = Release::after(name, newest);
        let name = name.to_owned();
        self.spawn_for(session_id, async move {
            shared.delete(vec![key], note).await;
            shared.core().slots.give_back(&name, slot);
            if let Some((peer, token)) = applied {
                peer.notify(Notice::Applied { token });
            }
        });
    }

    /// Runs a change to session `session_id`'s keys; the revocation of its
    /// lease at its end waits for it, so that what it released before it
    /// ended is not taken for abandoned.
    fn spawn_for(&self, session_id: u64, change: impl Future<Output = ()> + Send + 'static) {
        let task = tokio::spawn(change);
        if let Some(s) = self.core().sessions.get_mut(&session_id) {
            s.changes.retain(|t| !t.is_finished());
            s.changes.push(task);
        }
    }

    /// Applies a release: deletes `ended` (with the name's release note
    /// naming them, so nobody takes them for abandoned) and rewrites
    /// `shrunk` (a hold that keeps fewer permits), retrying until etcd
    /// confirms. Keys whose lease is gone are gone already.
    async fn delete(&self, ended: Vec<Vec<u8>>, note: Option<Release>) {
        // etcd takes at most 128 operations in a transaction (its
        // --max-txn-ops): a batch of deletes with its note, at a time.
        let mut batches: Vec<Vec<Vec<u8>>> = ended.chunks(TXN_DELETES).map(<[_]>::to_vec).collect();
        let last = batches.pop().unwrap_or_default();
        let name = note.as_ref().map(|n| n.name.clone());
        for batch in batches {
            self.delete_batch(batch, name.clone().and_then(Release::of))
                .await;
        }
        self.delete_batch(last, note).await;
    }

    async fn delete_batch(&self, ended: Vec<Vec<u8>>, note: Option<Release>) {
        let give_up = self.give_up();
        while Instant::now() < give_up {
            let deletes: Vec<TxnOp> = ended
                .iter()
                .map(|k| TxnOp::delete(k.clone(), None))
                .collect();
            let mut ops = deletes.clone();
            // Without a note when no key of the name is newer than those
            // deleted.
            let mut unless_newer = None;
            if let Some(Release {
                name,
                shrunk,
                newest,
            }) = &note
            {
                let lease = match self.note_lease.get(&self.client).await {
                    Ok(lease) => lease,
                    Err(e) => {
                        tracing::warn!("no lease for a release note: {}", e.message);
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                };
                let tags: Vec<String> = ended
                    .iter()
                    .filter_map(|k| queue::split_key(&self.prefix, k))
                    .map(|(_, tag)| String::from_utf8_lossy(tag).into_owned())
                    .collect();
                if !tags.is_empty() {
                    if let Some(newest) = newest
                        && shrunk.is_empty()
                    {
                        unless_newer = Some(
                            Compare::create_revision(
                                self.name_range(name),
                                CompareOp::Less,
                                newest + 1,
                            )
                            .with_prefix(),
                        );
                    }
                    ops.push(TxnOp::put(
                        queue::note_key(&self.prefix, name),
                        serde_json::to_vec(&tags).expect("tags encode"),
                        Some(PutOptions::new().with_lease(lease)),
                    ));
                }
                for Rewrite { key, value, lease } in shrunk {
                    // Only while the hold is there: a put would bring
                    // back a key its lease took.
                    ops.push(TxnOp::txn(
                        etcd_client::Txn::new()
                            .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
                            .and_then([TxnOp::put(
                                key.clone(),
                                value.clone(),
                                Some(PutOptions::new().with_lease(*lease)),
                            )]),
                    ));
                }
            }
            if ops.is_empty() {
                return;
            }
            let txn = match unless_newer {
                Some(compare) => etcd_client::Txn::new()
                    .when([compare])
                    .and_then(deletes)
                    .or_else(ops),
                None => etcd_client::Txn::new().and_then(ops),
            };
            match self.client.clone().kv_client().txn(txn).await {
                Ok(_) => return,
                Err(e) => {
                    let text = e.to_string();
                    if text.contains("lease not found") {
                        // The note's lease expired under us: a new one.
                        self.note_lease.forget().await;
                        continue;
                    }
                    tracing::warn!("etcd did not apply a release, retrying: {text}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }
}

/// A release of holds on one name: its note names the keys deleted, and
/// `shrunk` rewrites the holds that keep fewer permits.
struct Release {
    name: String,
    shrunk: Vec<Rewrite>,
    /// The newest create revision among the keys deleted, when known: a
    /// note is written only if some key of the name is newer. Only a key
    /// behind them can be waiting for them (the holders of a name are the
    /// front of its queue), so when none is, nobody can take the delete
    /// for an abandonment, and an uncontended release costs etcd one
    /// delete, not a delete and a put.
    newest: Option<i64>,
}

/// A hold's key put again with fewer permits (its create revision, so
/// its place and its fence, unchanged).
struct Rewrite {
    key: Vec<u8>,
    value: Vec<u8>,
    lease: i64,
}

impl Release {
    /// A release of keys on `name` whose revisions are not all known: the
    /// note is always written.
    fn of(name: impl Into<String>) -> Option<Release> {
        Release::after(name, None)
    }

    /// A release of keys on `name` the newest of which was created at
    /// `newest`.
    fn after(name: impl Into<String>, newest: Option<i64>) -> Option<Release> {
        Some(Release {
            name: name.into(),
            shrunk: Vec::new(),
            newest,
        })
    }
}

/// What the first read of a new key decided.
enum Decision {
    Grant,
    Refuse(Notice),
    /// Wait; with the whole queue if it was read.
    Wait(Option<Vec<Queued>>),
    /// Read the whole queue to decide.
    Read,
}

/// What is left to do once the decision is recorded.
enum After {
    Nothing,
    /// Read the whole queue, then decide again.
    Read,
    /// Delete the key, then tell the session this.
    Delete(Option<Notice>),
}

/// Whether the key at `revision` is granted by `queue` (which holds every
/// key before it), may wait, or must not; `full` is the whole queue if
/// that is what was read.
fn decide(
    queue: &[Queued],
    revision: i64,
    may_wait: bool,
    request_id: u64,
    full: Option<Vec<Queued>>,
) -> Decision {
    let upto: Vec<Queued> = queue
        .iter()
        .filter(|q| q.revision <= revision)
        .cloned()
        .collect();
    if upto.last().is_some_and(|q| q.revision == revision)
        && queue::granted_len(&upto) == upto.len()
    {
        Decision::Grant
    } else if !may_wait {
        Decision::Refuse(Notice::WouldBlock { request_id })
    } else {
        Decision::Wait(full)
    }
}

/// Moves wait `request_id` of `s`, granted at `revision`, to its holds.
fn grant(
    s: &mut SessionState,
    request_id: u64,
    w: Wait,
    revision: i64,
    abandoned: bool,
) -> Delivery {
    let hold_id = w.record.hold_id;
    s.holds.insert(
        hold_id,
        Hold {
            name: w.name,
            slot: w.slot,
            tag: w.tag,
            record: w.record,
            revision,
        },
    );
    Delivery {
        to: Arc::clone(&s.peer),
        request_id,
        grant: Grant {
            hold_id,
            fence: revision as u64,
            abandoned,
        },
    }
}

/// Whether the key an acquire's transaction found in its slot is its own,
/// put by an earlier try whose answer was lost.
fn put_earlier(response: &etcd_client::TxnResponse, lease: i64, hold_id: u64) -> bool {
    let found = response
        .op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .nth(2);
    found
        .as_ref()
        .and_then(|g| g.kvs().first())
        .is_some_and(|kv| {
            kv.lease() == lease && Record::decode(kv.value()).is_some_and(|r| r.hold_id == hold_id)
        })
}

/// Grants the local waiters of `name` that its queue now admits; those in
/// `newly` (revisions granted by the change just applied, in order) are
/// checked for the abandoned flag.
fn evaluate(
    core: &mut Core,
    watches: &mpsc::UnboundedSender<WatchCmd>,
    name: &LockName,
    newly: &[i64],
) -> Vec<Delivery> {
    let Some(state) = core.names.get_mut(name) else {
        return Vec::new();
    };
    let granted = state.granted();
    let mut deliveries = Vec::new();
    // The flag goes to the first key granted after the abandonment, on
    // whichever daemon it waits.
    let flagged = if state.abandoned {
        newly.first().copied()
    } else {
        None
    };
    if flagged.is_some() {
        state.abandoned = false;
    }
    let mut told = false;
    for revision in granted {
        let Some((session_id, request_id)) = state.waiters.remove(&revision) else {
            continue;
        };
        let Some(s) = core.sessions.get_mut(&session_id) else {
            continue;
        };
        let Some(w) = s.waits.remove(&request_id) else {
            continue;
        };
        let abandoned = flagged == Some(revision);
        told |= abandoned;
        deliveries.push(grant(s, request_id, w, revision, abandoned));
    }
    if told
        && let Some(marker) = core
            .names
            .get_mut(name.as_str())
            .and_then(|s| s.marker.take())
    {
        core.consume.push((name.clone(), marker));
    }
    forget_if_unwaited(core, watches, name.as_str());
    deliveries
}

/// Drops what this daemon knows of `name`, and its watch, once none of
/// its sessions waits there.
fn forget_if_unwaited(core: &mut Core, watches: &mpsc::UnboundedSender<WatchCmd>, name: &str) {
    if let Some(state) = core.names.get(name)
        && state.waiters.is_empty()
    {
        let watch = state.watch;
        core.names.remove(name);
        core.watching.remove(&watch);
        let _ = watches.send(WatchCmd::Cancel { id: watch });
    }
}

impl Shared {
    /// Applies one watch response's events to the name watched by `id`.
    fn apply_events(&self, id: i64, events: &[etcd_client::Event]) -> Vec<Delivery> {
        let mut core = self.core();
        let core = &mut *core;
        let Some(name) = core.watching.get(&id).cloned() else {
            return Vec::new();
        };
        let Some(state) = core.names.get_mut(&name) else {
            return Vec::new();
        };
        // By revision: a transaction's events share one.
        let mut by_revision: BTreeMap<i64, Vec<&etcd_client::Event>> = BTreeMap::new();
        for e in events {
            if let Some(kv) = e.kv()
                && kv.mod_revision() > state.revision
            {
                by_revision.entry(kv.mod_revision()).or_default().push(e);
            }
        }
        let mut newly = Vec::new();
        for (revision, events) in by_revision {
            let before = state.granted();
            // Tags a release note of this revision names.
            let released: Vec<String> = events
                .iter()
                .filter(|e| e.event_type() == EventType::Put)
                .filter_map(|e| e.kv())
                .filter(|kv| {
                    queue::split_key(&self.prefix, kv.key()).is_some_and(|(_, t)| t == queue::NOTE)
                })
                .filter_map(|kv| serde_json::from_slice::<Vec<String>>(kv.value()).ok())
                .flatten()
                .collect();
            for e in &events {
                let Some(kv) = e.kv() else { continue };
                let Some((_, tag)) = queue::split_key(&self.prefix, kv.key()) else {
                    continue;
                };
                if tag == queue::NOTE {
                    continue;
                }
                if tag == queue::MARKER {
                    // Put by the daemon of a session that ended holding
                    // the name, before its lease's revocation takes the
                    // session's keys.
                    match e.event_type() {
                        EventType::Put => {
                            state.abandoned = true;
                            state.marker = Some(kv.mod_revision());
                        }
                        EventType::Delete => state.marker = None,
                    }
                    continue;
                }
                match e.event_type() {
                    EventType::Put => {
                        if let Some(record) = Record::decode(kv.value()) {
                            state.queue.insert(
                                kv.create_revision(),
                                Queued {
                                    revision: kv.create_revision(),
                                    tag: tag.to_vec(),
                                    record,
                                },
                            );
                        }
                    }
                    EventType::Delete => {
                        let gone = state
                            .queue
                            .iter()
                            .find(|(_, q)| q.tag == tag)
                            .map(|(r, _)| *r);
                        if let Some(r) = gone {
                            state.queue.remove(&r);
                            let was_holder = before.contains(&r);
                            let noted = released.iter().any(|t| t.as_bytes() == tag);
                            if was_holder && !noted {
                                state.abandoned = true;
                            }
                        }
                    }
                }
            }
            state.revision = revision;
            let after = state.granted();
            newly.extend(after.into_iter().filter(|r| !before.contains(r)));
        }
        evaluate(core, &self.watches, &name, &newly)
    }
}

/// Keeps lease `id` alive for `peer`'s session; ends the session with
/// `holds_lost` once the lease could expire in etcd before it is
/// confirmed again.
async fn keepalive(
    shared: Arc<Shared>,
    id: i64,
    asked: Instant,
    peer: Arc<Peer>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let ttl = shared.ttl.max(Duration::from_secs(1));
    // etcd counts the TTL from when it renewed the lease, which is after
    // the renewal was sent: counted from the sending, it ends no later
    // there than here. A quarter is left for the client to stop.
    let safe = ttl * 3 / 4;
    let every = ttl / 4;
    let mut confirmed = asked;
    'stream: loop {
        let mut client = shared.keepalive_client.clone();
        let opened = tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep_until((confirmed + safe).into()) => break 'stream,
            opened = client.lease_keep_alive(id) => opened,
        };
        let Ok((mut keeper, mut stream)) = opened else {
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(RETRY_PAUSE) => continue 'stream,
            }
        };
        let mut sent: VecDeque<Instant> = VecDeque::new();
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep_until((confirmed + safe).into()) => break 'stream,
                () = tokio::time::sleep_until(next.into()) => {
                    next = Instant::now() + every;
                    let at = Instant::now();
                    if keeper.keep_alive().await.is_err() {
                        continue 'stream;
                    }
                    sent.push_back(at);
                }
                msg = stream.message() => match msg {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        if let Some(at) = sent.pop_front() {
                            confirmed = confirmed.max(at);
                        }
                    }
                    // The lease is gone in etcd.
                    Ok(Some(_)) => break 'stream,
                    Ok(None) | Err(_) => continue 'stream,
                },
            }
        }
    }
    tracing::warn!(
        lease = id,
        session_id = peer.id(),
        since_confirmed = ?confirmed.elapsed(),
        "lost contact with etcd: the session's holds are lost"
    );
    peer.notify(Notice::Lost {
        error: ErrorInfo::new(
            ErrorCode::HoldsLost,
            format!(
                "the daemon lost contact with etcd for {:?}: its lease there may expire, so every hold of this session is lost",
                safe
            ),
        ),
    });
}

/// Serves the daemon's watches on one etcd watch stream: starts and
/// cancels them as names gain and lose local waiters, applies their
/// events, and after a broken stream starts again from what etcd has.
async fn watch_task(shared: Arc<Shared>, mut commands: mpsc::UnboundedReceiver<WatchCmd>) {
    loop {
        // The stream opens with a watch of its own, on a key nobody writes.
        let idle = format!("{}/w", shared.prefix);
        let opened = shared.client.clone().watch(idle, None).await;
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("cannot open an etcd watch stream: {e}");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        // Every name waited on is read afresh: events may have been
        // missed while there was no stream.
        let names: Vec<LockName> = shared.core().names.keys().cloned().collect();
        for name in names {
            resync(&shared, &name).await;
        }
        loop {
            tokio::select! {
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    let sent = match cmd {
                        WatchCmd::Start { id, key, from } => {
                            let options = WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(from)
                                .with_watch_id(id);
                            stream.watch(key, Some(options)).await
                        }
                        WatchCmd::Cancel { id } => stream.cancel(id).await,
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                msg = stream.message() => {
                    let response = match msg {
                        Ok(Some(r)) => r,
                        _ => break,
                    };
                    if response.canceled() && response.compact_revision() > 0 {
                        // Started below the compacted revision: read again.
                        let name = shared.core().watching.get(&response.watch_id()).cloned();
                        if let Some(name) = name {
                            resync(&shared, &name).await;
                        }
                        continue;
                    }
                    let deliveries = shared.apply_events(response.watch_id(), response.events());
                    shared.finish(deliveries);
                }
            }
        }
        tracing::warn!("the etcd watch stream broke; opening another");
    }
}

/// Reads `name`'s queue afresh and watches it from there, under a new
/// watch id.
async fn resync(shared: &Arc<Shared>, name: &LockName) {
    let range = shared.name_range(name.as_str());
    let read = loop {
        match shared
            .client
            .clone()
            .get(range.clone(), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!("cannot read {name:?} from etcd: {e}");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    };
    let revision = read.header().map_or(0, |h| h.revision());
    let queue = shared.queued(name.as_str(), read.kvs());
    let deliveries = {
        let mut core = shared.core();
        let core = &mut *core;
        core.last_watch += 1;
        let watch = core.last_watch;
        let Some(state) = core.names.get_mut(name) else {
            return;
        };
        let before = state.granted();
        core.watching.remove(&state.watch);
        state.watch = watch;
        state.queue = queue.into_iter().map(|q| (q.revision, q)).collect();
        state.revision = revision;
        let newly: Vec<i64> = state
            .granted()
            .into_iter()
            .filter(|r| !before.contains(r))
            .collect();
        core.watching.insert(watch, name.clone());
        let _ = shared.watches.send(WatchCmd::Start {
            id: watch,
            key: range,
            from: revision + 1,
        });
        evaluate(core, &shared.watches, name, &newly)
    };
    shared.finish(deliveries);
}

impl Shared {
    /// Ends a session's lease once `changes` to its keys are applied.
    async fn revoke(
        &self,
        changes: Vec<tokio::task::JoinHandle<()>>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        lease: &LeaseCell,
    ) {
        // What the session released (or marked) before it ended is
        // applied first, its lease still kept alive meanwhile: else
        // its keys would vanish with the lease, as if abandoned.
        for change in changes {
            let _ = change.await;
        }
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        // A lease being granted is waited for; one not asked for yet
        // never will be.
        let Some(id) = *lease.get_or_init(|| async { None }).await else {
            return;
        };
        // Revoking takes every key of the session at once; its
        // waiters elsewhere are granted, told "abandoned" for holds.
        let give_up = self.give_up();
        while Instant::now() < give_up {
            match self.client.clone().lease_revoke(id).await {
                Ok(_) => return,
                Err(e) if e.to_string().contains("lease not found") => return,
                Err(e) => {
                    tracing::warn!(lease = id, "cannot revoke a lease, retrying: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }
}

impl Backend for Etcd {
    /// Another host's waits are not seen as they start: contention
    /// events are refused (`unsupported`).
    fn tells_contention(&self) -> bool {
        false
    }

    fn acquire(
        &self,
        name: &LockName,
        peer: &Arc<Peer>,
        request_id: u64,
        spec: &AcquireSpec,
    ) -> Result<AcquireOutcome, LockError> {
        let shared = &self.shared;
        let hold_id = shared.next_hold.fetch_add(1, Ordering::Relaxed) + 1;
        let record = shared.record(peer, request_id, hold_id, spec);
        let slot;
        {
            let mut core = shared.core();
            let core = &mut *core;
            let s = core
                .sessions
                .entry(peer.id())
                .or_insert_with(|| SessionState {
                    peer: Arc::clone(peer),
                    lease: Arc::new(LeaseCell::new()),
                    waits: HashMap::new(),
                    holds: HashMap::new(),
                    stop_keepalive: None,
                    withdrawn: HashSet::new(),
                    changes: Vec::new(),
                    revoked: Vec::new(),
                });
            // Withdrawn waits whose put etcd has not answered count
            // against the session's pending ones.
            if s.withdrawn.len() >= MAX_WITHDRAWN {
                return Ok(AcquireOutcome::WouldBlock);
            }
            slot = core.slots.take(name);
            s.waits.insert(
                request_id,
                Wait {
                    name: name.clone(),
                    slot,
                    tag: slots::tag(shared.instance, slot),
                    record,
                    revision: None,
                },
            );
        }
        tokio::spawn(Arc::clone(shared).put_wait(
            peer.id(),
            request_id,
            hold_id,
            (name.clone(), slot),
            spec.may_wait,
        ));
        Ok(AcquireOutcome::Queued)
    }

    fn cancel(&self, name: &str, peer: &Arc<Peer>, request_id: u64, token: u64) -> Option<Applied> {
        let shared = &self.shared;
        let key = {
            let mut core = shared.core();
            let core = &mut *core;
            let s = core.sessions.get_mut(&peer.id())?;
            let w = s.waits.get_mut(&request_id)?;
            let Some(revision) = w.revision else {
                // Its key is still being put: it goes once it is.
                let hold_id = w.record.hold_id;
                s.waits.remove(&request_id);
                s.withdrawn.insert(hold_id);
                return Some(Applied::Now);
            };
            let w = s.waits.remove(&request_id).expect("looked up above");
            if let Some(state) = core.names.get_mut(name) {
                state.waiters.remove(&revision);
            }
            forget_if_unwaited(core, &shared.watches, name);
            (
                queue::hold_key(&shared.prefix, name, &w.tag),
                w.slot,
                revision,
            )
        };
        let (key, slot, revision) = key;
        shared.delete_later(
            peer.id(),
            name,
            (key, slot),
            Some(revision),
            Some((Arc::clone(peer), token)),
        );
        Some(Applied::Later)
    }

    fn release(
        &self,
        name: &str,
        peer: &Arc<Peer>,
        hold_id: u64,
        token: u64,
    ) -> Option<(u32, Applied)> {
        let shared = &self.shared;
        let hold = {
            let mut core = shared.core();
            core.sessions.get_mut(&peer.id())?.holds.remove(&hold_id)?
        };
        let permits = hold.record.permits;
        let key = queue::hold_key(&shared.prefix, name, &hold.tag);
        shared.delete_later(
            peer.id(),
            name,
            (key, hold.slot),
            Some(hold.revision),
            Some((Arc::clone(peer), token)),
        );
        Some((permits, Applied::Later))
    }

    fn release_count(
        &self,
        name: &str,
        peer: &Arc<Peer>,
        count: u32,
        token: u64,
    ) -> Result<(Vec<u64>, Applied), LockError> {
        let shared = &self.shared;
        let (ended, shrunk) = {
            let mut core = shared.core();
            let s = core.sessions.get_mut(&peer.id());
            let mut mine: Vec<(u64, &mut Hold)> = match s {
                Some(s) => s
                    .holds
                    .iter_mut()
                    .filter(|(_, h)| h.name.as_str() == name)
                    .map(|(id, h)| (*id, h))
                    .collect(),
                None => Vec::new(),
            };
            // Oldest first: hold ids grow with time.
            mine.sort_by_key(|(id, _)| *id);
            let held: u64 = mine.iter().map(|(_, h)| u64::from(h.record.permits)).sum();
            if held < u64::from(count) {
                return Err(LockError::NotHeld {
                    name: name.to_owned(),
                    count,
                    held,
                });
            }
            let mut left = count;
            let mut ended = Vec::new();
            let mut shrunk = None;
            for (id, h) in mine {
                if left == 0 {
                    break;
                }
                if h.record.permits <= left {
                    left -= h.record.permits;
                    ended.push(id);
                } else {
                    h.record.permits -= left;
                    left = 0;
                    shrunk = Some((id, h.tag.clone(), h.record.clone()));
                }
            }
            let s = core.sessions.get_mut(&peer.id()).expect("has holds");
            let ended: Vec<(u64, Hold)> = ended
                .into_iter()
                .filter_map(|id| s.holds.remove(&id).map(|h| (id, h)))
                .collect();
            let lease = s.lease.get().copied().flatten();
            (
                ended,
                shrunk.map(|(id, tag, record)| (id, tag, record, lease)),
            )
        };
        let keys: Vec<Vec<u8>> = ended
            .iter()
            .map(|(_, h)| queue::hold_key(&shared.prefix, name, &h.tag))
            .collect();
        let shrunk: Vec<Rewrite> = shrunk
            .into_iter()
            .filter_map(|(_, tag, record, lease)| {
                Some(Rewrite {
                    key: queue::hold_key(&shared.prefix, name, &tag),
                    value: record.encode(),
                    lease: lease?,
                })
            })
            .collect();
        // A hold kept with fewer permits is rewritten: the note goes with it.
        let newest = ended.iter().map(|(_, h)| h.revision).max();
        let slots: Vec<u32> = ended.iter().map(|(_, h)| h.slot).collect();
        let ids = ended.iter().map(|(id, _)| *id).collect();
        let shared2 = Arc::clone(shared);
        let session_id = peer.id();
        let peer = Arc::clone(peer);
        let name = name.to_owned();
        shared.spawn_for(session_id, async move {
            let release = Release {
                name: name.clone(),
                shrunk,
                newest,
            };
            shared2.delete(keys, Some(release)).await;
            shared2.give_back(&name, slots);
            peer.notify(Notice::Applied { token });
        });
        Ok((ids, Applied::Later))
    }

    fn end_session(&self, name: &str, peer: &Arc<Peer>, abandon: bool) {
        let shared = &self.shared;
        let mut core = shared.core();
        let core = &mut *core;
        let Some(s) = core.sessions.get_mut(&peer.id()) else {
            return;
        };
        let waits: Vec<u64> = s
            .waits
            .iter()
            .filter(|(_, w)| w.name.as_str() == name)
            .map(|(id, _)| *id)
            .collect();
        let mut revisions = Vec::new();
        for id in waits {
            // A wait whose key is being put is its put's task's to undo.
            if let Some(w) = s.waits.remove(&id)
                && let Some(r) = w.revision
            {
                revisions.push(r);
                s.revoked.push((w.name, w.slot));
            }
        }
        let holds: Vec<u64> = s
            .holds
            .iter()
            .filter(|(_, h)| h.name.as_str() == name)
            .map(|(id, _)| *id)
            .collect();
        let mut released = Vec::new();
        let mut slots = Vec::new();
        let mut abandoned = None;
        let mut newest = None;
        for id in holds {
            if let Some(h) = s.holds.remove(&id) {
                released.push(queue::hold_key(&shared.prefix, name, &h.tag));
                slots.push((h.name.clone(), h.slot));
                newest = newest.max(Some(h.revision));
                abandoned = Some(h.record);
            }
        }
        if abandon && let Some(record) = abandoned {
            // Marked before the lease is revoked, so that whoever takes
            // the name next, now or later, on any host, is told.
            let shared2 = Arc::clone(shared);
            let owned = name.to_owned();
            s.changes.push(tokio::spawn(async move {
                shared2.mark_abandoned(vec![(owned, record)]).await;
            }));
            // Their keys go with the lease.
            s.revoked.append(&mut slots);
        }
        if !abandon && !released.is_empty() {
            // Released, not abandoned: the keys go with a release note
            // before the lease is revoked.
            let shared2 = Arc::clone(shared);
            let owned = name.to_owned();
            s.changes.push(tokio::spawn(async move {
                shared2
                    .delete(released, Release::after(owned.clone(), newest))
                    .await;
                shared2.give_back(&owned, slots.into_iter().map(|(_, slot)| slot));
            }));
        }
        if let Some(state) = core.names.get_mut(name) {
            for r in revisions {
                state.waiters.remove(&r);
            }
        }
        forget_if_unwaited(core, &shared.watches, name);
    }

    fn session_ended(&self, peer: &Arc<Peer>, _abandon: bool) {
        let shared = Arc::clone(&self.shared);
        shared.end_state_queue(peer.id());
        let Some(mut s) = shared.core().sessions.remove(&peer.id()) else {
            return;
        };
        let changes = std::mem::take(&mut s.changes);
        let stop = s.stop_keepalive.take();
        let lease = Arc::clone(&s.lease);
        // The slots of the keys the lease takes, given back once it has
        // (a wait whose key is being put is its put's task's).
        let mut slots = std::mem::take(&mut s.revoked);
        slots.extend(
            s.waits
                .into_values()
                .filter(|w| w.revision.is_some())
                .map(|w| (w.name, w.slot)),
        );
        slots.extend(s.holds.into_values().map(|h| (h.name, h.slot)));
        tokio::spawn(async move {
            shared.revoke(changes, stop, &lease).await;
            let mut core = shared.core();
            for (name, slot) in slots {
                core.slots.give_back(name.as_str(), slot);
            }
        });
    }

    fn list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
        peer: &Arc<Peer>,
        token: u64,
    ) -> Option<(Vec<EntryInfo>, bool)> {
        let shared = Arc::clone(&self.shared);
        let peer = Arc::clone(peer);
        let prefix = prefix.to_owned();
        let start_after = start_after.to_owned();
        tokio::spawn(async move {
            let (entries, more) = match shared.list(&prefix, &start_after, limit).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!("cannot list from etcd: {}", e.message);
                    (Vec::new(), false)
                }
            };
            peer.notify(Notice::Listed {
                token,
                entries,
                more,
            });
        });
        None
    }

    fn submit_state(&self, op: Op, reply: ReplyTo) {
        self.shared.submit_state(op, reply);
    }

    fn max_value_len(&self) -> u32 {
        self.shared.max_value_len
    }
}

impl Shared {
    /// Up to `limit` names under `prefix` after `start_after`, each with
    /// its queue in etcd's order.
    async fn list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
    ) -> Result<(Vec<EntryInfo>, bool), ErrorInfo> {
        // Past every key of `start_after` (its keys continue with \0),
        // and no lower than the prefix.
        let mut after = queue::locks_range(&self.prefix, start_after);
        after.push(1);
        let mut from = queue::locks_range(&self.prefix, prefix).max(after);
        let mut end = queue::locks_range(&self.prefix, prefix);
        prefix_end(&mut end);
        let mut names: BTreeMap<String, Vec<Queued>> = BTreeMap::new();
        let mut markers: HashMap<String, Record> = HashMap::new();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = self
                .client
                .clone()
                .get(from.clone(), Some(options))
                .await
                .map_err(unavailable)?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            for kv in page.kvs() {
                let Some((name, tag)) = queue::split_key(&self.prefix, kv.key()) else {
                    continue;
                };
                if tag == queue::NOTE {
                    continue;
                }
                let Some(record) = Record::decode(kv.value()) else {
                    continue;
                };
                if tag == queue::MARKER {
                    markers.insert(name.to_owned(), record);
                    names.entry(name.to_owned()).or_default();
                    continue;
                }
                names.entry(name.to_owned()).or_default().push(Queued {
                    revision: kv.create_revision(),
                    tag: tag.to_vec(),
                    record,
                });
            }
            let more = page.more();
            if let Some(last) = page.kvs().last() {
                from = last.key().to_vec();
                from.push(0);
            }
            // One name more than asked says whether more follow.
            if !more || names.len() > limit {
                break;
            }
        }
        let seen: HashMap<String, bool> = {
            let core = self.core();
            names
                .keys()
                .map(|n| {
                    (
                        n.clone(),
                        core.names.get(n.as_str()).is_some_and(|s| s.abandoned),
                    )
                })
                .collect()
        };
        let more = names.len() > limit;
        let entries = names
            .into_iter()
            .take(limit)
            .filter_map(|(name, mut queue)| {
                queue.sort_by_key(|q| q.revision);
                let marker = markers.remove(&name);
                let abandoned = seen[&name] || marker.is_some();
                queue::entry_info(&name, &queue, abandoned).or_else(|| {
                    // Nobody holds or waits: the marker says what it was.
                    marker.map(|r| queue::idle_entry(&name, &r))
                })
            })
            .collect();
        Ok((entries, more))
    }
}

/// Turns `key` into the end of the range of keys it starts.
fn prefix_end(key: &mut Vec<u8>) {
    while let Some(last) = key.pop() {
        if last < 0xff {
            key.push(last + 1);
            return;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    key.push(0);
}

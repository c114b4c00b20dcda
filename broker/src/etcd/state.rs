//! Shared state over etcd: each key is `<prefix>/s/<key>`, its version is
//! its etcd mod revision (cluster-wide, only growing), a conditional write
//! is a transaction comparing it, an increment a loop of such
//! transactions, a TTL an etcd lease of its own, and a guarded or fenced
//! write a transaction that also compares the hold's key.
//!
//! One watch per daemon on every state key feeds the sessions' watches
//! (as the local store's changes do) and a bounded history they replay
//! from. A removal puts a short-lived *removal note* `<prefix>/t/<key>`
//! in the same transaction, so every daemon tells a removal from an
//! expiry. Each session's operations are carried out in the order it sent
//! them, as by the local store.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, TxnOp, TxnOpResponse, WatchOptions,
};
use lockbroker_proto::{
    ChangeKind, ErrorCode, ErrorInfo, LockName, Response, StateEntry, Versioned,
};
use tokio::sync::mpsc;

use super::{REQUEST_TIMEOUT, RETRY_PAUSE, Shared, never_sent, prefix_end, queue, unavailable};
use crate::backend::stale_fence;
use crate::state::{Change, Completion, Guard, Op, ReplyTo, WatchStart};

/// How long a watch that replays waits for the daemon's feed to catch up
/// with etcd before it starts, told it lagged.
const CATCH_UP: Duration = Duration::from_secs(5);

/// How often a watch that waits for the feed asks etcd for progress.
const PROGRESS_AGAIN: Duration = Duration::from_millis(100);

/// What the daemon's state watch has delivered.
#[derive(Debug, Default)]
pub(super) struct Feed {
    /// Recent changes, oldest first.
    history: VecDeque<Arc<Change>>,
    /// Every change up to this revision has been published: the stream's
    /// position, moved by its events only.
    delivered: i64,
    /// The highest revision a progress report named. etcd before 3.4.24
    /// (etcd-io/etcd#15220; Debian ships 3.4.23) may report progress
    /// past events it has not sent yet, so this says only how far etcd
    /// has got, never which events were seen: those past `delivered`
    /// are still published when they come.
    progress: i64,
}

/// A condition a write was applied under, checked again when it was not.
enum Held {
    /// The hold `key` of a guarded write.
    Guard(Vec<u8>),
    /// The hold `key` of a fenced write, with its fence.
    Fence(Vec<u8>, LockName, u64),
}

impl Shared {
    fn state_key(&self, key: &str) -> Vec<u8> {
        format!("{}/s/{key}", self.prefix).into_bytes()
    }

    fn removal_note(&self, key: &str) -> Vec<u8> {
        format!("{}/t/{key}", self.prefix).into_bytes()
    }

    /// Queues `op` behind the session's earlier ones.
    pub(super) fn submit_state(self: &Arc<Self>, op: Op, reply: ReplyTo) {
        let mut queues = self.state_queues.lock().unwrap_or_else(|e| e.into_inner());
        let tx = queues.entry(reply.session_id).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<(Op, ReplyTo)>();
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                while let Some((op, reply)) = rx.recv().await {
                    shared.apply(op, reply).await;
                }
            });
            tx
        });
        let _ = tx.send((op, reply));
    }

    /// The session's operations are done with once it has ended.
    pub(super) fn end_state_queue(&self, session_id: u64) {
        self.state_queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session_id);
    }

    async fn apply(&self, op: Op, reply: ReplyTo) {
        if let Op::Watch {
            key,
            prefix,
            from_version,
            need_receiver,
        } = op
        {
            let start = self
                .watch_start(&key, prefix, from_version, need_receiver)
                .await;
            let done = match start {
                Ok(start) => Completion {
                    request_id: reply.request_id,
                    response: Response::Done,
                    watch: Some(start),
                },
                Err(e) => Completion {
                    request_id: reply.request_id,
                    response: Response::Error(e),
                    watch: None,
                },
            };
            let _ = reply.tx.send(Box::new(done));
            return;
        }
        let response = self.state_op(op).await.unwrap_or_else(Response::Error);
        reply.answer(response);
    }

    async fn state_op(&self, op: Op) -> Result<Response, ErrorInfo> {
        match op {
            Op::Get { key } => {
                let got = self.kv_get(self.state_key(key.as_str()), None).await?;
                Ok(Response::StateValue(got.kvs().first().map(versioned)))
            }
            Op::List {
                prefix,
                start_after,
                limit,
                with_values,
            } => {
                self.state_list(&prefix, &start_after, limit, with_values)
                    .await
            }
            Op::Fenced { lock, fence, write } => {
                let key = self.live_fence(&lock, fence).await?;
                self.write(*write, Some(Held::Fence(key, lock, fence)))
                    .await
            }
            write => {
                let held = match guard_of(&write) {
                    Some(guard) => Some(Held::Guard(self.guard_key(guard)?)),
                    None => None,
                };
                self.write(write, held).await
            }
        }
    }

    /// The key of `guard`'s hold, while the daemon knows it.
    fn guard_key(&self, guard: Guard) -> Result<Vec<u8>, ErrorInfo> {
        let core = self.core();
        let hold = core
            .sessions
            .get(&guard.session_id)
            .and_then(|s| s.holds.get(&guard.hold_id))
            .ok_or_else(|| guard_lost(guard.hold_id))?;
        Ok(queue::hold_key(&self.prefix, hold.name.as_str(), &hold.tag))
    }

    /// The key of `lock`'s hold with `fence`, if that hold is live (a key
    /// once granted stays granted while it exists).
    async fn live_fence(&self, lock: &LockName, fence: u64) -> Result<Vec<u8>, ErrorInfo> {
        let fence_rev = i64::try_from(fence).map_err(|_| stale_fence(lock, fence))?;
        let options = GetOptions::new()
            .with_prefix()
            .with_max_create_revision(fence_rev);
        let read = self
            .kv_get(self.name_range(lock.as_str()), Some(options))
            .await?;
        let queue = self.queued(lock.as_str(), read.kvs());
        let held = queue::granted_len(&queue);
        match queue.iter().position(|q| q.revision == fence_rev) {
            Some(i) if i < held => Ok(queue::hold_key(
                &self.prefix,
                lock.as_str(),
                std::str::from_utf8(&queue[i].tag).unwrap_or_default(),
            )),
            _ => Err(stale_fence(lock, fence)),
        }
    }

    /// A read, asked again while etcd does not answer (for at most
    /// [`REQUEST_TIMEOUT`]).
    async fn kv_get(
        &self,
        key: Vec<u8>,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, ErrorInfo> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            match self.client.clone().get(key.clone(), options.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() >= deadline => return Err(unavailable(e)),
                Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
            }
        }
    }

    /// A set, remove or increment, under `held` if it has a guard or a
    /// fence.
    async fn write(&self, op: Op, held: Option<Held>) -> Result<Response, ErrorInfo> {
        let held_compare = match &held {
            Some(Held::Guard(key)) => Some(Compare::version(key.clone(), CompareOp::Greater, 0)),
            Some(Held::Fence(key, _, fence)) => Some(Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                *fence as i64,
            )),
            None => None,
        };
        match op {
            Op::Set {
                key,
                value,
                if_version,
                ttl_ms,
                ..
            } => {
                let skey = self.state_key(key.as_str());
                let mut put = PutOptions::new();
                if let Some(ms) = ttl_ms {
                    // etcd's leases count whole seconds.
                    let ttl = Duration::from_secs(ms.div_ceil(1000).max(1));
                    let (lease, _) = super::grant_lease(&self.client, ttl, false).await?;
                    put = put.with_lease(lease);
                }
                let compares = version_compare(&skey, if_version)
                    .into_iter()
                    .chain(held_compare)
                    .collect::<Vec<_>>();
                let txn = etcd_client::Txn::new().when(compares).and_then([TxnOp::put(
                    skey.clone(),
                    value,
                    Some(put),
                )]);
                let (ok, revision, _) = self.try_txn(txn, &skey, &held).await?;
                match ok {
                    Ok(()) => Ok(Response::StateWritten {
                        version: revision as u64,
                    }),
                    Err(refused) => Ok(refused),
                }
            }
            Op::Remove {
                key, if_version, ..
            } => {
                let skey = self.state_key(key.as_str());
                let lease = self.note_lease.get(&self.client).await?;
                let compares = version_compare(&skey, if_version)
                    .into_iter()
                    .chain(held_compare)
                    .collect::<Vec<_>>();
                let txn = etcd_client::Txn::new().when(compares).and_then([
                    TxnOp::delete(
                        skey.clone(),
                        Some(etcd_client::DeleteOptions::new().with_prev_key()),
                    ),
                    TxnOp::put(
                        self.removal_note(key.as_str()),
                        Vec::new(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                ]);
                let (ok, _, responses) = self.try_txn(txn, &skey, &held).await?;
                match ok {
                    Ok(()) => {
                        let old = responses.into_iter().find_map(|r| match r {
                            TxnOpResponse::Delete(d) => d.prev_kvs().first().map(versioned),
                            _ => None,
                        });
                        Ok(Response::StateRemoved(old))
                    }
                    Err(refused) => Ok(refused),
                }
            }
            Op::Increment { key, delta, .. } => loop {
                let skey = self.state_key(key.as_str());
                let got = self.kv_get(skey.clone(), None).await?;
                let (current, at) = match got.kvs().first() {
                    None => (0, None),
                    Some(kv) => {
                        let n = std::str::from_utf8(kv.value())
                            .ok()
                            .and_then(|s| s.parse::<i64>().ok())
                            .ok_or_else(|| {
                                ErrorInfo::new(
                                    ErrorCode::NotAnInteger,
                                    format!("the value of {key} is not a decimal integer"),
                                )
                            })?;
                        (n, Some(kv.mod_revision()))
                    }
                };
                let value = current.checked_add(delta).ok_or_else(|| {
                    ErrorInfo::new(
                        ErrorCode::NotAnInteger,
                        format!("{current} + {delta} overflows a 64-bit integer"),
                    )
                })?;
                let (compare, put) = match at {
                    // Keeps the key's TTL, as the local store does.
                    Some(rev) => (
                        Compare::mod_revision(skey.clone(), CompareOp::Equal, rev),
                        PutOptions::new().with_ignore_lease(),
                    ),
                    None => (
                        Compare::create_revision(skey.clone(), CompareOp::Equal, 0),
                        PutOptions::new(),
                    ),
                };
                let compares: Vec<Compare> = std::iter::once(compare)
                    .chain(held_compare.clone())
                    .collect();
                let txn = etcd_client::Txn::new().when(compares).and_then([TxnOp::put(
                    skey.clone(),
                    value.to_string().into_bytes(),
                    Some(put),
                )]);
                let (ok, revision, _) = self.try_txn(txn, &skey, &held).await?;
                match ok {
                    Ok(()) => {
                        return Ok(Response::StateCounter {
                            value,
                            version: revision as u64,
                        });
                    }
                    // Written by someone else meanwhile: again.
                    Err(Response::StateConflict { .. }) => continue,
                    Err(refused) => return Ok(refused),
                }
            },
            other => {
                tracing::error!(?other, "not a state write");
                Err(ErrorInfo::new(
                    ErrorCode::Internal,
                    "misrouted state request",
                ))
            }
        }
    }

    /// Runs a write's transaction; when its conditions failed, reads why:
    /// the hold is gone (an error), or the key's version differs (a
    /// conflict answer).
    async fn try_txn(
        &self,
        txn: etcd_client::Txn,
        skey: &[u8],
        held: &Option<Held>,
    ) -> Result<(Result<(), Response>, i64, Vec<TxnOpResponse>), ErrorInfo> {
        let mut otherwise = vec![TxnOp::get(skey.to_vec(), None)];
        if let Some(Held::Guard(key) | Held::Fence(key, ..)) = held {
            otherwise.push(TxnOp::get(key.clone(), None));
        }
        let txn = txn.or_else(otherwise);
        // Sent again only when it never reached etcd: a write whose answer
        // was lost may have been applied.
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let response = loop {
            match self.client.clone().kv_client().txn(txn.clone()).await {
                Ok(r) => break r,
                Err(e) if never_sent(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(unavailable(e)),
            }
        };
        let revision = response.header().map_or(0, |h| h.revision());
        let responses = response.op_responses();
        if response.succeeded() {
            return Ok((Ok(()), revision, responses));
        }
        let mut gets = responses.iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let current = gets
            .next()
            .and_then(|g| g.kvs().first().map(|kv| kv.mod_revision() as u64))
            .unwrap_or(0);
        let hold_alive = gets.next().map(|g| !g.kvs().is_empty());
        match (held, hold_alive) {
            (Some(Held::Guard(_)), Some(false)) => Err(guard_lost(0)),
            (Some(Held::Fence(_, lock, fence)), Some(false)) => Err(stale_fence(lock, *fence)),
            _ => Ok((
                Err(Response::StateConflict { current }),
                revision,
                Vec::new(),
            )),
        }
    }

    async fn state_list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
        with_values: bool,
    ) -> Result<Response, ErrorInfo> {
        let base = self.state_key("");
        let from_prefix = self.state_key(prefix);
        let mut after = self.state_key(start_after);
        after.push(0);
        let from = if start_after.is_empty() {
            from_prefix.clone()
        } else {
            from_prefix.clone().max(after)
        };
        let mut end = from_prefix;
        prefix_end(&mut end);
        let mut options = GetOptions::new()
            .with_range(end)
            .with_limit(limit as i64 + 1);
        if !with_values {
            options = options.with_keys_only();
        }
        let read = self.kv_get(from, Some(options)).await?;
        let more = read.kvs().len() > limit;
        let entries = read
            .kvs()
            .iter()
            .take(limit)
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key().strip_prefix(base.as_slice())?).ok()?;
                Some(StateEntry {
                    key: key.to_owned(),
                    version: kv.mod_revision() as u64,
                    value: with_values.then(|| kv.value().to_vec()),
                })
            })
            .collect();
        Ok(Response::StateEntries { entries, more })
    }

    /// Where a session's new watch starts: after etcd's current revision,
    /// replaying the history from `from_version` if asked.
    async fn watch_start(
        &self,
        key: &str,
        prefix: bool,
        from_version: u64,
        need_receiver: bool,
    ) -> Result<WatchStart, ErrorInfo> {
        // Subscribed before "now" is read: every change after now reaches
        // the receiver.
        let receiver = need_receiver.then(|| self.state_changes.subscribe());
        let now = self
            .kv_get(
                self.state_key(""),
                Some(GetOptions::new().with_count_only()),
            )
            .await?
            .header()
            .map_or(0, |h| h.revision());
        let mut lagged = false;
        let mut replay = Vec::new();
        // Where live changes start: after now, unless replayed up to less.
        let mut published = now;
        if from_version > 0 && from_version <= now as u64 {
            // The history must reach now before it is replayed.
            let caught_up = tokio::time::timeout(CATCH_UP, async {
                loop {
                    let notified = self.state_caught_up.notified();
                    let reached = {
                        let feed = self.feed();
                        feed.delivered.max(feed.progress)
                    };
                    if reached >= now {
                        return;
                    }
                    // etcd answers a progress request only once the watch
                    // has caught up (it ignores it before): ask again.
                    let _ = self.state_progress.send(());
                    let _ = tokio::time::timeout(PROGRESS_AGAIN, notified).await;
                }
            })
            .await;
            lagged = caught_up.is_err();
            // Replayed: the history up to what the feed has published;
            // live: what it publishes after (to the receiver subscribed
            // above), whatever etcd's progress reports said.
            let feed = self.feed();
            published = feed.delivered;
            let oldest = feed
                .history
                .front()
                .map_or(feed.delivered + 1, |c| c.version as i64);
            lagged |= (from_version as i64) < oldest;
            replay = feed
                .history
                .iter()
                .filter(|c| c.version >= from_version && c.version <= published as u64)
                .filter(|c| {
                    if prefix {
                        c.key.starts_with(key)
                    } else {
                        c.key == key
                    }
                })
                .cloned()
                .collect();
        }
        Ok(WatchStart {
            replay,
            lagged,
            live_from: (published as u64).max(from_version.saturating_sub(1)),
            receiver,
        })
    }

    fn feed(&self) -> std::sync::MutexGuard<'_, Feed> {
        self.state_feed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes one watch response's state changes.
    fn publish(&self, response: &etcd_client::WatchResponse) {
        let base = self.state_key("");
        let notes = self.removal_note("");
        let mut by_revision: std::collections::BTreeMap<i64, Vec<&etcd_client::Event>> =
            Default::default();
        for e in response.events() {
            if let Some(kv) = e.kv() {
                by_revision.entry(kv.mod_revision()).or_default().push(e);
            }
        }
        let mut feed = self.feed();
        for (revision, events) in by_revision {
            if revision <= feed.delivered {
                continue;
            }
            let removed: HashSet<&[u8]> = events
                .iter()
                .filter(|e| e.event_type() == EventType::Put)
                .filter_map(|e| e.kv()?.key().strip_prefix(notes.as_slice()))
                .collect();
            for e in events {
                let Some(kv) = e.kv() else { continue };
                let Some(key) = kv.key().strip_prefix(base.as_slice()) else {
                    continue;
                };
                let Ok(name) = std::str::from_utf8(key) else {
                    continue;
                };
                let (kind, value) = match e.event_type() {
                    EventType::Put => (ChangeKind::Set, Some(Arc::new(kv.value().to_vec()))),
                    EventType::Delete => {
                        let leased = e.prev_kv().is_some_and(|p| p.lease() != 0);
                        if leased && !removed.contains(key) {
                            (ChangeKind::Expired, None)
                        } else {
                            (ChangeKind::Removed, None)
                        }
                    }
                };
                let change = Arc::new(Change {
                    version: revision as u64,
                    key: name.to_owned(),
                    kind,
                    value,
                });
                if feed.history.len() >= self.history_len.max(1) {
                    feed.history.pop_front();
                }
                feed.history.push_back(Arc::clone(&change));
                let _ = self.state_changes.send(change);
            }
            feed.delivered = revision;
        }
        // A progress report: etcd has got this far (see `Feed::progress`).
        // Not the answer creating the watch, whose revision is etcd's
        // current one while the watch may still be catching up from the
        // revision it asked for.
        if response.events().is_empty()
            && !response.created()
            && let Some(h) = response.header()
        {
            feed.progress = feed.progress.max(h.revision());
        }
        drop(feed);
        self.state_caught_up.notify_waiters();
    }
}

/// Feeds every state change to the sessions, from the revision after
/// `from`, on a watch stream of its own; after a broken stream, again
/// from what was delivered.
pub(super) async fn state_feed(
    shared: Arc<Shared>,
    from: i64,
    mut progress: mpsc::UnboundedReceiver<()>,
) {
    shared.feed().delivered = from;
    let start = shared.state_key("");
    // Both `s/` (state) and `t/` (removal notes).
    let mut end = format!("{}/t/", shared.prefix).into_bytes();
    prefix_end(&mut end);
    loop {
        let after = shared.feed().delivered + 1;
        let options = WatchOptions::new()
            .with_range(end.clone())
            .with_start_revision(after)
            .with_prev_key();
        let mut stream = match shared
            .client
            .clone()
            .watch(start.clone(), Some(options))
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("cannot watch the shared state in etcd: {e}");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                asked = progress.recv() => {
                    if asked.is_none() {
                        return;
                    }
                    if stream.request_progress().await.is_err() {
                        break;
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(response)) => {
                        if response.canceled() {
                            tracing::warn!(
                                compacted = response.compact_revision(),
                                "the shared state's history was compacted past this daemon's watch; changes were missed"
                            );
                            let mut feed = shared.feed();
                            feed.delivered = feed.delivered.max(response.compact_revision() - 1);
                            break;
                        }
                        shared.publish(&response);
                    }
                    _ => break,
                },
            }
        }
    }
}

fn versioned(kv: &etcd_client::KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        version: kv.mod_revision() as u64,
    }
}

fn version_compare(key: &[u8], if_version: Option<u64>) -> Option<Compare> {
    match if_version? {
        0 => Some(Compare::create_revision(key.to_vec(), CompareOp::Equal, 0)),
        v => Some(Compare::mod_revision(
            key.to_vec(),
            CompareOp::Equal,
            v as i64,
        )),
    }
}

fn guard_of(op: &Op) -> Option<Guard> {
    match op {
        Op::Set { guard, .. } | Op::Remove { guard, .. } | Op::Increment { guard, .. } => *guard,
        _ => None,
    }
}

fn guard_lost(hold_id: u64) -> ErrorInfo {
    let which = if hold_id == 0 {
        String::from("its hold")
    } else {
        format!("hold {hold_id}")
    };
    ErrorInfo::new(
        ErrorCode::GuardNotHeld,
        format!(
            "this session no longer holds {which} (its lease ended); the guarded write was refused"
        ),
    )
}

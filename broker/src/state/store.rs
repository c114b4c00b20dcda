//! The store: every state entry in memory, owned by one thread.
//!
//! Being the only writer, it hands out versions from one daemon-wide
//! counter, checks quotas, expires keys on time, and publishes each change
//! in version order on a broadcast channel (with a bounded history that
//! watches replay from). With a database, a write is committed there
//! before the maps change and the write is answered.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockbroker_proto::{ChangeKind, ErrorCode, ErrorInfo, LockName, Response, StateEntry};
use tokio::sync::broadcast;

use super::persist::Database;
use super::record::Record;
use super::{Change, Completion, Op, ReplyTo, StateConfig, StateSize, WatchStart};
use crate::error::StartError;

/// Keys and bytes owned.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    keys: u64,
    bytes: u64,
}

/// The store's own state, owned by its thread.
pub(super) struct Store {
    config: StateConfig,
    /// Where writes are committed before they are answered, if anywhere.
    db: Option<Database>,
    entries: BTreeMap<String, Record>,
    expiries: BTreeSet<(u64, String)>,
    usage: HashMap<u32, Usage>,
    total: Usage,
    last_version: u64,
    history: VecDeque<Arc<Change>>,
    changes: broadcast::Sender<Arc<Change>>,
    /// `total`, published for the metrics.
    size: Arc<StateSize>,
}

/// A failed write: an error for the client, or a storage failure that
/// leaves the store unable to promise durability.
type OpResult = Result<Response, ErrorInfo>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// The store `config` describes, loaded from its state directory if it
    /// has one; and the fence epoch of this run (0 without a directory).
    pub(super) fn open(config: &StateConfig) -> Result<(Store, u64), StartError> {
        let (changes, _) = broadcast::channel(config.history.max(1));
        let mut store = Store {
            config: config.clone(),
            db: None,
            entries: BTreeMap::new(),
            expiries: BTreeSet::new(),
            usage: HashMap::new(),
            total: Usage::default(),
            last_version: 0,
            history: VecDeque::new(),
            changes,
            size: Arc::default(),
        };
        let Some(dir) = &config.dir else {
            return Ok((store, 0));
        };
        let (db, loaded) = Database::open(dir, now_ms())?;
        for (key, record) in loaded.entries {
            store.insert_loaded(key, record);
        }
        store.last_version = loaded.last_version;
        store.db = Some(db);
        tracing::info!(
            keys = store.entries.len(),
            expired = loaded.expired,
            last_version = store.last_version,
            fence_epoch = loaded.epoch,
            "state loaded"
        );
        Ok((store, loaded.epoch))
    }

    fn insert_loaded(&mut self, key: String, record: Record) {
        let usage = self.usage.entry(record.owner).or_default();
        usage.keys += 1;
        usage.bytes += record.charge(&key);
        self.total.keys += 1;
        self.total.bytes += record.charge(&key);
        if record.expires_ms != 0 {
            self.expiries.insert((record.expires_ms, key.clone()));
        }
        self.entries.insert(key, record);
    }

    /// Serves `ops` until every sender is gone.
    pub(super) fn run(mut self, ops: std_mpsc::Receiver<(Op, ReplyTo)>) {
        self.size.publish(self.total.keys, self.total.bytes);
        loop {
            let wait = self
                .expiries
                .first()
                .map(|(at, _)| Duration::from_millis(at.saturating_sub(now_ms())));
            let next = match wait {
                Some(wait) => ops.recv_timeout(wait),
                None => ops
                    .recv()
                    .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
            };
            match next {
                Ok((op, reply)) => {
                    self.expire(now_ms());
                    let (response, watch) = self.handle(op);
                    let _ = reply.tx.send(Box::new(Completion {
                        request_id: reply.request_id,
                        response,
                        watch,
                    }));
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => self.expire(now_ms()),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
            self.size.publish(self.total.keys, self.total.bytes);
        }
    }

    /// Where the store publishes its size.
    pub(super) fn size(&self) -> Arc<StateSize> {
        Arc::clone(&self.size)
    }

    fn handle(&mut self, op: Op) -> (Response, Option<WatchStart>) {
        let result = match op {
            Op::Get { key } => Ok(Response::StateValue(
                self.live(key.as_str()).map(Record::versioned),
            )),
            Op::Set {
                key,
                value,
                if_version,
                ttl_ms,
                uid,
                guard: _,
            } => self.set(key, value, if_version, ttl_ms, uid),
            // Guards and fences are checked by the session and the
            // backend before the write reaches the store.
            Op::Remove {
                key, if_version, ..
            } => self.remove(key, if_version),
            Op::Increment {
                key, delta, uid, ..
            } => self.increment(key, delta, uid),
            Op::Fenced { write, .. } => return self.handle(*write),
            Op::List {
                prefix,
                start_after,
                limit,
                with_values,
            } => Ok(self.list(&prefix, &start_after, limit, with_values)),
            Op::Watch {
                key,
                prefix,
                from_version,
                need_receiver,
            } => {
                let start = self.watch(&key, prefix, from_version, need_receiver);
                return (Response::Done, Some(start));
            }
        };
        (result.unwrap_or_else(Response::Error), None)
    }

    /// The entry at `key`, unless it has expired.
    fn live(&self, key: &str) -> Option<&Record> {
        let now = now_ms();
        self.entries
            .get(key)
            .filter(|r| r.expires_ms == 0 || r.expires_ms > now)
    }

    fn check_version(&self, key: &str, if_version: Option<u64>) -> Result<(), Response> {
        let current = self.live(key).map_or(0, |r| r.version);
        match if_version {
            Some(want) if want != current => Err(Response::StateConflict { current }),
            _ => Ok(()),
        }
    }

    fn set(
        &mut self,
        key: LockName,
        value: Vec<u8>,
        if_version: Option<u64>,
        ttl_ms: Option<u64>,
        uid: u32,
    ) -> OpResult {
        if let Err(conflict) = self.check_version(key.as_str(), if_version) {
            return Ok(conflict);
        }
        let expires_ms = match ttl_ms {
            Some(ttl) => now_ms().saturating_add(ttl.max(1)),
            None => 0,
        };
        let version = self.write(key.into_string(), value, expires_ms, uid)?;
        Ok(Response::StateWritten { version })
    }

    fn increment(&mut self, key: LockName, delta: i64, uid: u32) -> OpResult {
        let (current, expires_ms) = match self.live(key.as_str()) {
            None => (0, 0),
            Some(r) => {
                let parsed = std::str::from_utf8(&r.value)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok());
                match parsed {
                    Some(n) => (n, r.expires_ms),
                    None => {
                        return Err(ErrorInfo::new(
                            ErrorCode::NotAnInteger,
                            format!("the value of {key} is not a decimal integer"),
                        ));
                    }
                }
            }
        };
        let value = current.checked_add(delta).ok_or_else(|| {
            ErrorInfo::new(
                ErrorCode::NotAnInteger,
                format!("{current} + {delta} overflows a 64-bit integer"),
            )
        })?;
        let version = self.write(
            key.into_string(),
            value.to_string().into_bytes(),
            expires_ms,
            uid,
        )?;
        Ok(Response::StateCounter { value, version })
    }

    /// Stores a value after the quota checks; the version it got.
    fn write(
        &mut self,
        key: String,
        value: Vec<u8>,
        expires_ms: u64,
        uid: u32,
    ) -> Result<u64, ErrorInfo> {
        let new_charge = (key.len() + value.len()) as u64;
        let old = self.live(&key).map(|r| (r.owner, r.charge(&key)));
        // What the writer and the daemon would own afterwards.
        let mine = self.usage.get(&uid).copied().unwrap_or_default();
        let (mut my_keys, mut my_bytes) = (mine.keys + 1, mine.bytes + new_charge);
        let (mut all_keys, mut all_bytes) = (self.total.keys + 1, self.total.bytes + new_charge);
        if let Some((owner, charge)) = old {
            all_keys -= 1;
            all_bytes -= charge;
            if owner == uid {
                my_keys -= 1;
                my_bytes -= charge;
            }
        }
        let quota = |what: String| {
            Err(ErrorInfo::new(
                ErrorCode::QuotaExceeded,
                format!("writing {key:?}: {what}"),
            ))
        };
        if my_keys > self.config.max_keys_per_user && old.is_none_or(|(o, _)| o != uid) {
            return quota(format!(
                "uid {uid} may own at most {} keys",
                self.config.max_keys_per_user
            ));
        }
        // Over the quota is allowed only for an overwrite of the writer's
        // own key that does not grow it.
        let shrinks_own = old.is_some_and(|(o, c)| o == uid && new_charge <= c);
        if my_bytes > self.config.max_bytes_per_user && !shrinks_own {
            return quota(format!(
                "uid {uid} may own at most {} bytes of state",
                self.config.max_bytes_per_user
            ));
        }
        if all_keys > self.config.max_keys && old.is_none() {
            return quota(format!(
                "the daemon holds at most {} keys",
                self.config.max_keys
            ));
        }
        if all_bytes > self.config.max_bytes && new_charge > old.map_or(0, |(_, c)| c) {
            return quota(format!(
                "the daemon holds at most {} bytes of state",
                self.config.max_bytes
            ));
        }
        let version = self.last_version + 1;
        let record = Record {
            value: Arc::new(value),
            version,
            expires_ms,
            owner: uid,
        };
        if let Some(db) = &self.db {
            db.put(&key, &record, version)?;
        }
        // Committed (or in memory only): now change the maps.
        self.forget(&key);
        self.insert_loaded(key.clone(), record.clone());
        self.last_version = version;
        self.publish(Change {
            version,
            key,
            kind: ChangeKind::Set,
            value: Some(record.value),
        });
        Ok(version)
    }

    fn remove(&mut self, key: LockName, if_version: Option<u64>) -> OpResult {
        if let Err(conflict) = self.check_version(key.as_str(), if_version) {
            return Ok(conflict);
        }
        let Some(old) = self.live(key.as_str()).map(Record::versioned) else {
            return Ok(Response::StateRemoved(None));
        };
        self.delete(key.into_string(), ChangeKind::Removed)?;
        Ok(Response::StateRemoved(Some(old)))
    }

    /// Removes `key` durably and publishes the change.
    fn delete(&mut self, key: String, kind: ChangeKind) -> Result<(), ErrorInfo> {
        let version = self.last_version + 1;
        if let Some(db) = &self.db {
            db.remove(&key, version)?;
        }
        self.forget(&key);
        self.last_version = version;
        self.publish(Change {
            version,
            key,
            kind,
            value: None,
        });
        Ok(())
    }

    /// Drops `key` from the maps and the quotas (not from the database).
    fn forget(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            let charge = old.charge(key);
            if let Some(u) = self.usage.get_mut(&old.owner) {
                u.keys -= 1;
                u.bytes -= charge;
                if u.keys == 0 {
                    self.usage.remove(&old.owner);
                }
            }
            self.total.keys -= 1;
            self.total.bytes -= charge;
            if old.expires_ms != 0 {
                self.expiries.remove(&(old.expires_ms, key.to_owned()));
            }
        }
    }

    /// Removes every key whose time ran out, publishing `Expired`.
    fn expire(&mut self, now: u64) {
        while let Some((at, key)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            // The record decides, not the index: a retry entry may outlive
            // a rewrite of the key.
            let due = self
                .entries
                .get(&key)
                .is_some_and(|r| r.expires_ms != 0 && r.expires_ms <= now);
            if !due {
                continue;
            }
            if self.delete(key.clone(), ChangeKind::Expired).is_err() {
                // Storage failed; the key stays hidden (reads check the
                // expiry) and is tried again in a second.
                self.expiries.insert((now + 1000, key));
                break;
            }
        }
    }

    fn publish(&mut self, change: Change) {
        let change = Arc::new(change);
        if self.history.len() == self.config.history.max(1) {
            self.history.pop_front();
        }
        self.history.push_back(Arc::clone(&change));
        // No receivers is fine: nobody watches.
        let _ = self.changes.send(change);
    }

    fn list(&self, prefix: &str, start_after: &str, limit: usize, with_values: bool) -> Response {
        let now = now_ms();
        let start = if start_after.is_empty() || start_after < prefix {
            std::ops::Bound::Included(prefix.to_owned())
        } else {
            std::ops::Bound::Excluded(start_after.to_owned())
        };
        let mut entries = Vec::new();
        let mut more = false;
        for (key, r) in self
            .entries
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, r)| r.expires_ms == 0 || r.expires_ms > now)
        {
            if entries.len() == limit {
                more = true;
                break;
            }
            entries.push(StateEntry {
                key: key.clone(),
                version: r.version,
                value: with_values.then(|| r.value.to_vec()),
            });
        }
        Response::StateEntries { entries, more }
    }

    fn watch(&self, key: &str, prefix: bool, from_version: u64, need_receiver: bool) -> WatchStart {
        let matches = |c: &Change| {
            if prefix {
                c.key.starts_with(key)
            } else {
                c.key == key
            }
        };
        let (replay, lagged) = if from_version == 0 || from_version > self.last_version {
            (Vec::new(), false)
        } else {
            let oldest = self
                .history
                .front()
                .map_or(self.last_version + 1, |c| c.version);
            let replay = self
                .history
                .iter()
                .filter(|c| c.version >= from_version && matches(c))
                .cloned()
                .collect();
            (replay, from_version < oldest)
        };
        WatchStart {
            replay,
            lagged,
            // A watch from a version still to come starts there.
            live_from: self.last_version.max(from_version.saturating_sub(1)),
            receiver: need_receiver.then(|| self.changes.subscribe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(config: StateConfig) -> Store {
        Store::open(&config).expect("in-memory store").0
    }

    fn name(s: &str) -> LockName {
        LockName::new(s).unwrap()
    }

    fn code(r: OpResult) -> Option<ErrorCode> {
        r.err().map(|e| e.code)
    }

    /// A user at its byte quota cannot grow by taking over another user's
    /// key, but may shrink its own.
    #[test]
    fn byte_quota_counts_the_owner() {
        let mut s = store(StateConfig {
            max_bytes_per_user: 100,
            ..StateConfig::default()
        });
        assert!(s.set(name("mine"), vec![0; 90], None, None, 1).is_ok()); // 94 bytes
        assert!(s.set(name("theirs"), vec![0; 50], None, None, 2).is_ok());
        let taken = s.set(name("theirs"), vec![0; 10], None, None, 1);
        assert_eq!(code(taken), Some(ErrorCode::QuotaExceeded));
        assert!(s.set(name("mine"), vec![0; 80], None, None, 1).is_ok());
        assert_eq!(s.usage[&1].bytes, 84);
        assert_eq!(s.usage[&2].bytes, 56);
    }

    /// An expiry index entry left behind by a rewrite does not delete the
    /// new value.
    #[test]
    fn a_stale_expiry_entry_does_not_delete_a_rewritten_key() {
        let mut s = store(StateConfig::default());
        s.set(name("k"), b"old".to_vec(), None, Some(10), 1)
            .unwrap();
        s.expiries.insert((1, "k".into())); // as a failed delete's retry would
        s.set(name("k"), b"new".to_vec(), None, None, 1).unwrap();
        s.expire(now_ms() + 60_000);
        assert_eq!(s.live("k").map(|r| r.value.to_vec()), Some(b"new".to_vec()));
    }
}

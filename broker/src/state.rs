//! Shared state: versioned key/value entries with expiry, quotas, watches
//! and optional durable storage.
//!
//! One thread, the *store*, owns every entry; sessions send it [`Op`]s and
//! get the answers back on their own completion channel, so a slow disk
//! write never stalls the async runtime or another session's locks. Being
//! the only writer, the store hands out versions from one daemon-wide
//! counter and publishes each change, in version order, on a broadcast
//! channel that watching sessions read; a session that falls behind sees
//! the channel's lag and tells its watches.
//!
//! With a state directory, every write is committed to an embedded `redb`
//! database before it is answered; at start the entries are loaded (expired
//! ones dropped), and a fence epoch is bumped and committed so that fences
//! never go backwards across restarts. A database that cannot be opened or
//! read stops the daemon from starting: it never silently starts empty.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockbroker_proto::{
    ChangeKind, ErrorCode, ErrorInfo, LockName, Response, StateEntry, Versioned,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc};

use crate::error::StartError;

/// Fences of one daemon run are `(epoch << FENCE_EPOCH_SHIFT) | counter`, so a
/// restarted daemon with a higher epoch never issues a lower fence.
pub const FENCE_EPOCH_SHIFT: u32 = 40;

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_VERSION: &str = "last_version";
const FENCE_EPOCH: &str = "fence_epoch";

/// The database file inside the state directory.
pub const DB_FILE: &str = "state.redb";

/// Limits and storage of the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// Keep state here; `None` keeps it in memory only.
    pub dir: Option<PathBuf>,
    /// Largest value, in bytes.
    pub max_value_len: u32,
    /// Most keys one user (peer uid) may own.
    pub max_keys_per_user: u64,
    /// Most bytes (keys plus values) one user may own.
    pub max_bytes_per_user: u64,
    /// Most keys in all.
    pub max_keys: u64,
    /// Most bytes in all.
    pub max_bytes: u64,
    /// Recent changes kept for watchers to replay and catch up with.
    pub history: usize,
}

/// Default largest value: 1 MiB.
pub const DEFAULT_MAX_VALUE_LEN: u32 = 1024 * 1024;

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: None,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            max_keys_per_user: 100_000,
            max_bytes_per_user: 256 * 1024 * 1024,
            max_keys: 1_000_000,
            max_bytes: 1024 * 1024 * 1024,
            history: 4096,
        }
    }
}

/// One published change, shared by every watching session.
#[derive(Debug)]
pub struct Change {
    /// Its version.
    pub version: u64,
    /// The key.
    pub key: String,
    /// What happened.
    pub kind: ChangeKind,
    /// The new value (for `Set`).
    pub value: Option<Arc<Vec<u8>>>,
}

/// Where the store sends an answer: the session's completion channel and
/// the request id.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    /// The session's completions (boxed: a channel allocates its slots up
    /// front, and every session has one).
    pub tx: mpsc::UnboundedSender<Box<Completion>>,
    /// The request answered.
    pub request_id: u64,
}

/// An answer from the store.
#[derive(Debug)]
pub struct Completion {
    /// The request answered.
    pub request_id: u64,
    /// The answer.
    pub response: Response,
    /// For a watch: where it starts.
    pub watch: Option<WatchStart>,
}

/// How a new watch begins.
#[derive(Debug)]
pub struct WatchStart {
    /// Changes already made that the watch asked for, in version order.
    pub replay: Vec<Arc<Change>>,
    /// The history did not reach back to the asked-for version.
    pub lagged: bool,
    /// Live changes after this version belong to the watch.
    pub live_from: u64,
    /// A receiver subscribed at this point, if the session asked for one.
    pub receiver: Option<broadcast::Receiver<Arc<Change>>>,
}

/// A request to the store.
#[derive(Debug)]
pub enum Op {
    /// Read a key.
    Get {
        /// The key.
        key: LockName,
    },
    /// Write a key.
    Set {
        /// The key.
        key: LockName,
        /// The value.
        value: Vec<u8>,
        /// Required current version (0: absent).
        if_version: Option<u64>,
        /// Time to live.
        ttl_ms: Option<u64>,
        /// The writer, for quotas.
        uid: u32,
    },
    /// Remove a key.
    Remove {
        /// The key.
        key: LockName,
        /// Required current version (0: absent).
        if_version: Option<u64>,
    },
    /// Add to a decimal integer.
    Increment {
        /// The key.
        key: LockName,
        /// Added.
        delta: i64,
        /// The writer, for quotas.
        uid: u32,
    },
    /// List a page of keys.
    List {
        /// Key prefix.
        prefix: String,
        /// Start after this key.
        start_after: String,
        /// Page size.
        limit: usize,
        /// Include values.
        with_values: bool,
    },
    /// Start a watch.
    Watch {
        /// Key or prefix.
        key: String,
        /// Whether `key` is a prefix.
        prefix: bool,
        /// 0: from now; else replay from this version.
        from_version: u64,
        /// The session has no receiver yet.
        need_receiver: bool,
    },
}

/// A handle on the store; dropping the last one stops its thread.
#[derive(Debug)]
pub struct State {
    ops: Option<std_mpsc::Sender<(Op, ReplyTo)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    max_value_len: u32,
}

impl State {
    /// Opens (or creates) the store, loading a state directory if
    /// configured. Returns the store and the fence epoch of this run.
    pub fn open(config: &StateConfig) -> Result<(State, u64), StartError> {
        let (store, epoch) = Store::open(config)?;
        let (ops, rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lockbroker-state".into())
            .spawn(move || store.run(rx))
            .map_err(|e| StartError::io("starting the state thread for", PathBuf::new(), e))?;
        Ok((
            State {
                ops: Some(ops),
                thread: Some(thread),
                max_value_len: config.max_value_len,
            },
            epoch,
        ))
    }

    /// Sends `op`; its answer arrives on `reply`.
    pub fn submit(&self, op: Op, reply: ReplyTo) {
        if let Some(ops) = &self.ops {
            if let Err(std_mpsc::SendError((_, reply))) = ops.send((op, reply)) {
                let _ = reply.tx.send(Box::new(Completion {
                    request_id: reply.request_id,
                    response: Response::Error(ErrorInfo::new(
                        ErrorCode::ShuttingDown,
                        "the state store has stopped",
                    )),
                    watch: None,
                }));
            }
        }
    }

    /// Largest value accepted.
    pub fn max_value_len(&self) -> u32 {
        self.max_value_len
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the ops already sent;
        // joining closes the database before anyone reopens it.
        self.ops.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Debug, Clone)]
struct Record {
    value: Arc<Vec<u8>>,
    version: u64,
    /// Unix milliseconds; 0 for none.
    expires_ms: u64,
    owner: u32,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.value.len());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out.extend_from_slice(&self.owner.to_le_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let version = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
        let expires_ms = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let owner = u32::from_le_bytes(bytes.get(16..20)?.try_into().ok()?);
        Some(Record {
            value: Arc::new(bytes[20..].to_vec()),
            version,
            expires_ms,
            owner,
        })
    }

    fn charge(&self, key: &str) -> u64 {
        (key.len() + self.value.len()) as u64
    }

    fn versioned(&self) -> Versioned {
        Versioned {
            value: self.value.to_vec(),
            version: self.version,
        }
    }
}

/// Keys and bytes owned.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    keys: u64,
    bytes: u64,
}

/// The store's own state, owned by its thread.
struct Store {
    config: StateConfig,
    db: Option<redb::Database>,
    db_path: PathBuf,
    entries: BTreeMap<String, Record>,
    expiries: BTreeSet<(u64, String)>,
    usage: HashMap<u32, Usage>,
    total: Usage,
    last_version: u64,
    history: VecDeque<Arc<Change>>,
    changes: broadcast::Sender<Arc<Change>>,
}

/// A failed write: an error for the client, or a storage failure that
/// leaves the store unable to promise durability.
type OpResult = Result<Response, ErrorInfo>;

fn storage_error(e: impl std::fmt::Display) -> ErrorInfo {
    tracing::error!(error = %e, "state storage failed");
    ErrorInfo::new(ErrorCode::Internal, format!("state storage failed: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    fn open(config: &StateConfig) -> Result<(Store, u64), StartError> {
        let (changes, _) = broadcast::channel(config.history.max(1));
        let mut store = Store {
            config: config.clone(),
            db: None,
            db_path: PathBuf::new(),
            entries: BTreeMap::new(),
            expiries: BTreeSet::new(),
            usage: HashMap::new(),
            total: Usage::default(),
            last_version: 0,
            history: VecDeque::new(),
            changes,
        };
        let Some(dir) = &config.dir else {
            return Ok((store, 0));
        };
        create_private_dir(dir)?;
        let path = dir.join(DB_FILE);
        let refuse = |e: &dyn std::fmt::Display| {
            StartError::Config(format!(
                "cannot use the state database {}: {e}; refusing to start rather than start with empty state (move the file away to start afresh)",
                path.display()
            ))
        };
        let db = redb::Database::create(&path).map_err(|e| refuse(&e))?;
        let epoch = store.load(&db).map_err(|e| refuse(&e))?;
        store.db = Some(db);
        store.db_path = path;
        Ok((store, epoch))
    }

    /// Loads every entry, drops expired ones, and bumps the fence epoch.
    fn load(&mut self, db: &redb::Database) -> Result<u64, redb::Error> {
        let now = now_ms();
        let mut expired = Vec::new();
        let mut meta_last = 0;
        let mut epoch = 0;
        {
            let read = db.begin_read()?;
            match read.open_table(META) {
                Ok(meta) => {
                    meta_last = meta.get(LAST_VERSION)?.map_or(0, |v| v.value());
                    epoch = meta.get(FENCE_EPOCH)?.map_or(0, |v| v.value());
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
            match read.open_table(KEYS) {
                Ok(keys) => {
                    for item in keys.iter()? {
                        let (k, v) = item?;
                        let key = k.value().to_owned();
                        let record = Record::decode(v.value()).ok_or_else(|| {
                            redb::Error::Corrupted(format!("record of key {key:?} is malformed"))
                        })?;
                        self.last_version = self.last_version.max(record.version);
                        if record.expires_ms != 0 && record.expires_ms <= now {
                            expired.push(key);
                        } else {
                            self.insert_loaded(key, record);
                        }
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.last_version = self.last_version.max(meta_last);
        let epoch = epoch + 1;
        let write = db.begin_write()?;
        {
            let mut keys = write.open_table(KEYS)?;
            for key in &expired {
                keys.remove(key.as_str())?;
            }
            let mut meta = write.open_table(META)?;
            meta.insert(FENCE_EPOCH, epoch)?;
            meta.insert(LAST_VERSION, self.last_version)?;
        }
        write.commit()?;
        tracing::info!(
            keys = self.entries.len(),
            expired = expired.len(),
            last_version = self.last_version,
            fence_epoch = epoch,
            "state loaded"
        );
        Ok(epoch)
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

    fn run(mut self, ops: std_mpsc::Receiver<(Op, ReplyTo)>) {
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
        }
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
            } => self.set(key, value, if_version, ttl_ms, uid),
            Op::Remove { key, if_version } => self.remove(key, if_version),
            Op::Increment { key, delta, uid } => self.increment(key, delta, uid),
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
        let quota = |what: String| Err(ErrorInfo::new(ErrorCode::QuotaExceeded, what));
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
        self.persist(
            |keys| {
                keys.insert(key.as_str(), record.encode().as_slice())?;
                Ok(())
            },
            version,
        )?;
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
        self.persist(
            |keys| {
                keys.remove(key.as_str())?;
                Ok(())
            },
            version,
        )?;
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

    /// Applies `change` to the keys table and records `version`, in one
    /// committed transaction; nothing without a database.
    fn persist(
        &mut self,
        change: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), redb::Error>,
        version: u64,
    ) -> Result<(), ErrorInfo> {
        let Some(db) = &self.db else {
            return Ok(());
        };
        let result = (|| -> Result<(), redb::Error> {
            let write = db.begin_write()?;
            {
                let mut keys = write.open_table(KEYS)?;
                change(&mut keys)?;
                let mut meta = write.open_table(META)?;
                meta.insert(LAST_VERSION, version)?;
            }
            write.commit()?;
            Ok(())
        })();
        result.map_err(|e| storage_error(format!("{}: {e}", self.db_path.display())))
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

/// Creates the state directory (0700 on Unix) if it is missing.
fn create_private_dir(dir: &Path) -> Result<(), StartError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| StartError::io("creating the state directory", dir, e))
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

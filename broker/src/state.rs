//! Shared state: versioned key/value entries with expiry, quotas, watches
//! and optional durable storage. This file is the handle sessions hold and
//! the messages they exchange with the store; `store` is the in-memory
//! store on its own thread, `persist` its `redb` database, and `record`
//! one entry and its encoding.
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

mod persist;
mod record;
mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;

use lockbroker_proto::{ChangeKind, ErrorCode, ErrorInfo, LockName, Response};
use tokio::sync::{broadcast, mpsc};

use crate::error::StartError;
use store::Store;

pub use persist::DB_FILE;

/// Fences of one daemon run are `(epoch << FENCE_EPOCH_SHIFT) | counter`, so a
/// restarted daemon with a higher epoch never issues a lower fence.
pub const FENCE_EPOCH_SHIFT: u32 = 40;

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
    /// The session asking: a backend keeps each session's operations in
    /// the order it sent them.
    pub session_id: u64,
}

impl ReplyTo {
    /// Sends `response` (not a watch's start) to the session.
    pub fn answer(self, response: Response) {
        let _ = self.tx.send(Box::new(Completion {
            request_id: self.request_id,
            response,
            watch: None,
        }));
    }
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

/// A hold a guarded write depends on: the session's, on `lock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    /// The holding session.
    pub session_id: u64,
    /// Its hold.
    pub hold_id: u64,
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
        /// Applied only while this hold is held.
        guard: Option<Guard>,
    },
    /// Remove a key.
    Remove {
        /// The key.
        key: LockName,
        /// Required current version (0: absent).
        if_version: Option<u64>,
        /// Applied only while this hold is held.
        guard: Option<Guard>,
    },
    /// Add to a decimal integer.
    Increment {
        /// The key.
        key: LockName,
        /// Added.
        delta: i64,
        /// The writer, for quotas.
        uid: u32,
        /// Applied only while this hold is held.
        guard: Option<Guard>,
    },
    /// A write applied only while `lock` has a live hold with `fence`, of
    /// any session; answered `stale_fence` otherwise.
    Fenced {
        /// The lock.
        lock: LockName,
        /// The hold's fence.
        fence: u64,
        /// The write (a set, remove or increment without a guard).
        write: Box<Op>,
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
    size: Arc<StateSize>,
}

/// The store's keys and bytes as its quotas count them, published by its
/// thread after each request for the metrics to read.
#[derive(Debug, Default)]
pub struct StateSize {
    keys: AtomicU64,
    bytes: AtomicU64,
}

impl StateSize {
    pub(crate) fn publish(&self, keys: u64, bytes: u64) {
        self.keys.store(keys, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// `(keys, bytes)`, as last published.
    pub fn get(&self) -> (u64, u64) {
        (
            self.keys.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

impl State {
    /// Opens (or creates) the store, loading a state directory if
    /// configured. Returns the store and the fence epoch of this run.
    pub fn open(config: &StateConfig) -> Result<(State, u64), StartError> {
        let (store, epoch) = Store::open(config)?;
        let size = store.size();
        let (ops, rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lockbroker-state".into())
            .spawn(move || store.run(rx))
            .map_err(StartError::Thread)?;
        Ok((
            State {
                ops: Some(ops),
                thread: Some(thread),
                max_value_len: config.max_value_len,
                size,
            },
            epoch,
        ))
    }

    /// Sends `op`; its answer arrives on `reply`.
    pub fn submit(&self, op: Op, reply: ReplyTo) {
        if let Some(ops) = &self.ops
            && let Err(std_mpsc::SendError((_, reply))) = ops.send((op, reply))
        {
            reply.answer(Response::Error(ErrorInfo::new(
                ErrorCode::ShuttingDown,
                "the state store has stopped",
            )));
        }
    }

    /// Largest value accepted.
    pub fn max_value_len(&self) -> u32 {
        self.max_value_len
    }

    /// The store's size, as its thread last published it.
    pub fn size(&self) -> (u64, u64) {
        self.size.get()
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

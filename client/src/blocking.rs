//! The same surface for programs without a Tokio runtime:
//! [`blocking::Client`](Client), its handles, guards, state and watches,
//! each the async type of the same name with its waits blocking.
//!
//! A [`Client`] wraps the async [`crate::Client`] and owns a one-worker
//! multi-thread runtime: the connection task must keep running between
//! calls (to route answers and keep the session alive), which a
//! `current_thread` runtime would only do inside `block_on`. Guards share
//! the runtime, and dropping a guard never blocks: it queues the release.
//! Do not call these methods from async code.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use lockbroker_proto::{Inspection, LockKind, StateEntry, Versioned};
use tokio::runtime::Runtime;

use crate::connector::Connector;
use crate::error::{Error, Result};
use crate::state::{RemoveOutcome, WatchEvent, WatchOptions, WriteOptions, WriteOutcome};

/// A shared runtime that shuts down without waiting when the last user
/// drops it, so no drop can hang (or panic inside async code).
#[derive(Clone)]
struct RuntimeRef(Arc<OwnedRuntime>);

struct OwnedRuntime(Option<Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl RuntimeRef {
    fn new() -> Result<RuntimeRef> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lockbroker-client")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        Ok(RuntimeRef(Arc::new(OwnedRuntime(Some(rt)))))
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.0
            .0
            .as_ref()
            .expect("runtime lives until drop")
            .block_on(f)
    }
}

impl fmt::Debug for RuntimeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RuntimeRef")
    }
}

/// A blocking connection to the daemon; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    client: crate::Client,
    runtime: RuntimeRef,
}

impl Client {
    /// Connects with [`Connector`]'s defaults.
    pub fn connect() -> Result<Client> {
        Client::connect_with(&Connector::new())
    }

    /// Connects as `connector` says.
    pub fn connect_with(connector: &Connector) -> Result<Client> {
        let runtime = RuntimeRef::new()?;
        let client = runtime.block_on(connector.connect())?;
        Ok(Client { client, runtime })
    }

    /// The async client underneath (usable from the client's own runtime).
    pub fn as_async(&self) -> &crate::Client {
        &self.client
    }

    /// A mutex handle for `name`.
    pub fn mutex(&self, name: impl Into<String>) -> Mutex {
        Mutex {
            inner: self.client.mutex(name),
            runtime: self.runtime.clone(),
        }
    }

    /// A semaphore handle for `name` with `capacity` permits.
    pub fn semaphore(&self, name: impl Into<String>, capacity: u32) -> Semaphore {
        Semaphore {
            inner: self.client.semaphore(name, capacity),
            runtime: self.runtime.clone(),
        }
    }

    /// A read-write lock handle for `name`.
    pub fn rwlock(&self, name: impl Into<String>) -> RwLock {
        RwLock {
            inner: self.client.rwlock(name),
            runtime: self.runtime.clone(),
        }
    }

    /// The daemon's shared state.
    pub fn state(&self) -> State {
        State {
            inner: self.client.state(),
            runtime: self.runtime.clone(),
        }
    }

    /// This session's id.
    pub fn session_id(&self) -> u64 {
        self.client.session_id()
    }

    /// The daemon's software version.
    pub fn server_version(&self) -> &str {
        self.client.server_version()
    }

    /// Whether the connection is gone.
    pub fn is_lost(&self) -> bool {
        self.client.is_lost()
    }

    /// Round-trip time of one ping.
    pub fn ping(&self) -> Result<Duration> {
        self.runtime.block_on(self.client.ping())
    }

    /// See [`crate::Client::inspect`].
    pub fn inspect(&self, prefix: &str) -> Result<Inspection> {
        self.runtime.block_on(self.client.inspect(prefix))
    }

    /// See [`crate::Client::release_by_name`].
    pub fn release_by_name(&self, name: &str, count: u32) -> Result<u32> {
        self.runtime
            .block_on(self.client.release_by_name(name, count))
    }
}

/// Wraps the async result in a blocking guard.
fn wrap(runtime: &RuntimeRef, guard: crate::LockGuard) -> LockGuard {
    LockGuard {
        inner: guard,
        runtime: runtime.clone(),
    }
}

fn wrap_opt(runtime: &RuntimeRef, guard: Option<crate::LockGuard>) -> Option<LockGuard> {
    guard.map(|g| wrap(runtime, g))
}

/// A blocking [`crate::Mutex`].
#[derive(Debug, Clone)]
pub struct Mutex {
    inner: crate::Mutex,
    runtime: RuntimeRef,
}

impl Mutex {
    /// The lock's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// Blocks until the mutex is granted.
    pub fn acquire(&self) -> Result<LockGuard> {
        let g = self.runtime.block_on(self.inner.acquire())?;
        Ok(wrap(&self.runtime, g))
    }

    /// Takes the mutex only if it is free and nobody is queued.
    pub fn try_acquire(&self) -> Result<Option<LockGuard>> {
        let g = self.runtime.block_on(self.inner.try_acquire())?;
        Ok(wrap_opt(&self.runtime, g))
    }

    /// Blocks at most `timeout`; `Ok(None)` if it ran out.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        let g = self.runtime.block_on(self.inner.acquire_timeout(timeout))?;
        Ok(wrap_opt(&self.runtime, g))
    }
}

/// A blocking [`crate::Semaphore`].
#[derive(Debug, Clone)]
pub struct Semaphore {
    inner: crate::Semaphore,
    runtime: RuntimeRef,
}

impl Semaphore {
    /// The semaphore's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The capacity this handle asks for.
    pub fn capacity(&self) -> u32 {
        self.inner.capacity()
    }

    /// Blocks for one permit.
    pub fn acquire(&self) -> Result<LockGuard> {
        self.acquire_many(1)
    }

    /// Blocks for `permits` permits, granted together.
    pub fn acquire_many(&self, permits: u32) -> Result<LockGuard> {
        let g = self.runtime.block_on(self.inner.acquire_many(permits))?;
        Ok(wrap(&self.runtime, g))
    }

    /// Takes one permit only if free and nobody is queued.
    pub fn try_acquire(&self) -> Result<Option<LockGuard>> {
        self.try_acquire_many(1)
    }

    /// Blocks at most `timeout` for one permit.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        self.acquire_many_timeout(1, timeout)
    }

    /// Takes `permits` permits only if free and nobody is queued.
    pub fn try_acquire_many(&self, permits: u32) -> Result<Option<LockGuard>> {
        let g = self
            .runtime
            .block_on(self.inner.try_acquire_many(permits))?;
        Ok(wrap_opt(&self.runtime, g))
    }

    /// Blocks at most `timeout` for `permits` permits.
    pub fn acquire_many_timeout(
        &self,
        permits: u32,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        let g = self
            .runtime
            .block_on(self.inner.acquire_many_timeout(permits, timeout))?;
        Ok(wrap_opt(&self.runtime, g))
    }
}

/// A blocking [`crate::RwLock`].
#[derive(Debug, Clone)]
pub struct RwLock {
    inner: crate::RwLock,
    runtime: RuntimeRef,
}

impl RwLock {
    /// The lock's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// Blocks for shared access.
    pub fn read(&self) -> Result<LockGuard> {
        let g = self.runtime.block_on(self.inner.read())?;
        Ok(wrap(&self.runtime, g))
    }

    /// Shared access only if available and nobody is queued.
    pub fn try_read(&self) -> Result<Option<LockGuard>> {
        let g = self.runtime.block_on(self.inner.try_read())?;
        Ok(wrap_opt(&self.runtime, g))
    }

    /// Blocks at most `timeout` for shared access.
    pub fn read_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        let g = self.runtime.block_on(self.inner.read_timeout(timeout))?;
        Ok(wrap_opt(&self.runtime, g))
    }

    /// Blocks for exclusive access.
    pub fn write(&self) -> Result<LockGuard> {
        let g = self.runtime.block_on(self.inner.write())?;
        Ok(wrap(&self.runtime, g))
    }

    /// Exclusive access only if the lock is free and nobody is queued.
    pub fn try_write(&self) -> Result<Option<LockGuard>> {
        let g = self.runtime.block_on(self.inner.try_write())?;
        Ok(wrap_opt(&self.runtime, g))
    }

    /// Blocks at most `timeout` for exclusive access.
    pub fn write_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        let g = self.runtime.block_on(self.inner.write_timeout(timeout))?;
        Ok(wrap_opt(&self.runtime, g))
    }
}

/// A blocking [`crate::State`].
#[derive(Debug, Clone)]
pub struct State {
    inner: crate::State,
    runtime: RuntimeRef,
}

impl State {
    /// See [`crate::State::get`].
    pub fn get(&self, key: &str) -> Result<Option<Versioned>> {
        self.runtime.block_on(self.inner.get(key))
    }

    /// See [`crate::State::set`].
    pub fn set(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<u64> {
        self.runtime.block_on(self.inner.set(key, value))
    }

    /// See [`crate::State::set_with`].
    pub fn set_with(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        options: WriteOptions,
    ) -> Result<WriteOutcome> {
        self.runtime
            .block_on(self.inner.set_with(key, value, options))
    }

    /// See [`crate::State::compare_and_set`].
    pub fn compare_and_set(
        &self,
        key: &str,
        version: u64,
        value: impl Into<Vec<u8>>,
    ) -> Result<WriteOutcome> {
        self.runtime
            .block_on(self.inner.compare_and_set(key, version, value))
    }

    /// See [`crate::State::remove`].
    pub fn remove(&self, key: &str) -> Result<Option<Versioned>> {
        self.runtime.block_on(self.inner.remove(key))
    }

    /// See [`crate::State::remove_with`].
    pub fn remove_with(&self, key: &str, options: WriteOptions) -> Result<RemoveOutcome> {
        self.runtime.block_on(self.inner.remove_with(key, options))
    }

    /// See [`crate::State::increment`].
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64> {
        self.runtime.block_on(self.inner.increment(key, delta))
    }

    /// See [`crate::State::increment_fenced`].
    pub fn increment_fenced(&self, key: &str, delta: i64, lock: &str, fence: u64) -> Result<i64> {
        self.runtime
            .block_on(self.inner.increment_fenced(key, delta, lock, fence))
    }

    /// See [`crate::State::increment_guarded`].
    pub fn increment_guarded(&self, key: &str, delta: i64, guard: &LockGuard) -> Result<i64> {
        self.runtime
            .block_on(self.inner.increment_guarded(key, delta, &guard.inner))
    }

    /// See [`crate::State::list`].
    pub fn list(&self, prefix: &str, with_values: bool) -> Result<Vec<StateEntry>> {
        self.runtime.block_on(self.inner.list(prefix, with_values))
    }

    /// See [`crate::State::watch`].
    pub fn watch(&self, key: &str) -> Result<Watch> {
        let inner = self.runtime.block_on(self.inner.watch(key))?;
        Ok(Watch {
            inner,
            runtime: self.runtime.clone(),
        })
    }

    /// See [`crate::State::watch_prefix`].
    pub fn watch_prefix(&self, prefix: &str) -> Result<Watch> {
        let inner = self.runtime.block_on(self.inner.watch_prefix(prefix))?;
        Ok(Watch {
            inner,
            runtime: self.runtime.clone(),
        })
    }

    /// See [`crate::State::watch_with`].
    pub fn watch_with(&self, key: &str, options: WatchOptions) -> Result<Watch> {
        let inner = self.runtime.block_on(self.inner.watch_with(key, options))?;
        Ok(Watch {
            inner,
            runtime: self.runtime.clone(),
        })
    }

    /// See [`crate::State::get_json`].
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>> {
        self.runtime.block_on(self.inner.get_json(key))
    }

    /// See [`crate::State::set_json`].
    pub fn set_json<T: serde::Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<u64> {
        self.runtime.block_on(self.inner.set_json(key, value))
    }
}

/// A blocking [`crate::Watch`]: an iterator of changes that ends when the
/// connection does.
#[derive(Debug)]
pub struct Watch {
    inner: crate::Watch,
    runtime: RuntimeRef,
}

impl Watch {
    /// The next change, waiting at most `timeout`; `None` on timeout or a
    /// lost connection.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<WatchEvent> {
        let inner = &mut self.inner;
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, inner.next()).await })
            .ok()
            .flatten()
    }
}

impl Iterator for Watch {
    type Item = WatchEvent;

    fn next(&mut self) -> Option<WatchEvent> {
        let inner = &mut self.inner;
        self.runtime.block_on(inner.next())
    }
}

/// A [`crate::LockGuard`] for blocking code; see
/// [`Client`].
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    inner: crate::LockGuard,
    runtime: RuntimeRef,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// How the lock was taken.
    pub fn kind(&self) -> LockKind {
        self.inner.kind()
    }

    /// Permits held.
    pub fn permits(&self) -> u32 {
        self.inner.permits()
    }

    /// The hold's id in the daemon.
    pub fn hold_id(&self) -> u64 {
        self.inner.hold_id()
    }

    /// The fencing token; see [`crate::LockGuard::fence`].
    pub fn fence(&self) -> u64 {
        self.inner.fence()
    }

    /// The previous holder died holding the lock; see
    /// [`crate::LockGuard::abandoned`].
    pub fn abandoned(&self) -> bool {
        self.inner.abandoned()
    }

    /// Whether the connection, and so this hold, is gone.
    pub fn is_lost(&self) -> bool {
        self.inner.is_lost()
    }

    /// Blocks until the connection is lost or `timeout` passes; true if it
    /// was lost.
    pub fn wait_lost(&self, timeout: Duration) -> bool {
        // The timer must be made inside the runtime, hence the async block.
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, self.inner.lost()).await })
            .is_ok()
    }

    /// Releases the hold and waits for the daemon to confirm it.
    pub fn release(self) -> Result<()> {
        let LockGuard { inner, runtime } = self;
        runtime.block_on(inner.release())
    }
}

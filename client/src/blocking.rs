//! The same surface for programs without a Tokio runtime:
//! [`blocking::Client`](Client), its handles, guards, state and watches,
//! each the async type of the same name with its waits blocking.
//!
//! On Unix a [`Client`] has no runtime and no thread of its own: the
//! thread that asks writes its request and, unless another thread of the
//! same client is already reading, reads the socket itself until its
//! answer comes (handing answers and events meant for other threads to
//! them), so an uncontended acquire costs one write and one read, as a
//! bare socket does. Any number of threads may share one client. On
//! Windows a client wraps the async [`crate::Client`] on a one-worker
//! runtime of its own.
//!
//! Dropping a guard never waits for the daemon: it sends the release and
//! returns. A client, like its session, belongs to the process that made
//! it: a forked child makes its own. Do not call these methods from async
//! code.

#[cfg(windows)]
mod windows;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockbroker_proto::{Grant, Inspection, Limits, LockKind, Request, StateEntry, Versioned};

use crate::client::LockRequest;
use crate::connector::Connector;
#[cfg(unix)]
use crate::direct::{Conn, WatchHandle};
use crate::error::Result;
use crate::ops;
use crate::ops::Extras;
use crate::state::{RemoveOutcome, WatchEvent, WatchOptions, WriteOptions, WriteOutcome};
#[cfg(windows)]
use windows::{Conn, WatchHandle};

/// A blocking connection to the daemon — one session; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    conn: Arc<Conn>,
}

impl Client {
    /// Connects with [`Connector`]'s defaults.
    pub fn connect() -> Result<Client> {
        Client::connect_with(&Connector::new())
    }

    /// Connects as `connector` says.
    pub fn connect_with(connector: &Connector) -> Result<Client> {
        Ok(Client {
            conn: Conn::connect(connector)?,
        })
    }

    /// A mutex handle for `name`.
    pub fn mutex(&self, name: impl Into<String>) -> Mutex {
        Mutex {
            conn: Arc::clone(&self.conn),
            name: name.into(),
            extras: Extras::default(),
        }
    }

    /// A semaphore handle for `name` with `capacity` permits.
    pub fn semaphore(&self, name: impl Into<String>, capacity: u32) -> Semaphore {
        Semaphore {
            conn: Arc::clone(&self.conn),
            name: name.into(),
            capacity,
            extras: Extras::default(),
        }
    }

    /// A read-write lock handle for `name`.
    pub fn rwlock(&self, name: impl Into<String>) -> RwLock {
        RwLock {
            conn: Arc::clone(&self.conn),
            name: name.into(),
            extras: Extras::default(),
        }
    }

    /// The daemon's shared state.
    pub fn state(&self) -> State {
        State {
            conn: Arc::clone(&self.conn),
        }
    }

    /// This session's id.
    pub fn session_id(&self) -> u64 {
        self.conn.welcome().session_id
    }

    /// The daemon's software version.
    pub fn server_version(&self) -> &str {
        &self.conn.welcome().server_version
    }

    /// The limits the daemon applies to this session.
    pub fn limits(&self) -> &Limits {
        &self.conn.welcome().limits
    }

    /// Whether the connection is gone (and with it every hold).
    pub fn is_lost(&self) -> bool {
        self.conn.is_lost()
    }

    /// Round-trip time of one ping.
    pub fn ping(&self) -> Result<Duration> {
        let start = Instant::now();
        self.conn.run(ops::ping())?;
        Ok(start.elapsed())
    }

    /// See [`crate::Client::metrics`].
    pub fn metrics(&self) -> Result<String> {
        self.conn.run(ops::metrics())
    }

    /// See [`crate::Client::inspect`].
    pub fn inspect(&self, prefix: &str) -> Result<Inspection> {
        self.conn.run(ops::inspect(prefix, "", 0, false))
    }

    /// See [`crate::Client::inspect_after`].
    pub fn inspect_after(&self, prefix: &str, start_after: &str, limit: u32) -> Result<Inspection> {
        self.conn
            .run(ops::inspect(prefix, start_after, limit, true))
    }

    /// See [`crate::Client::release_by_name`].
    pub fn release_by_name(&self, name: &str, count: u32) -> Result<u32> {
        self.conn.run(ops::release_by_name(name, count))
    }

    /// See [`crate::Client::break_lock`].
    pub fn break_lock(&self, name: &str, hold_id: Option<u64>) -> Result<Vec<u64>> {
        let version = self.conn.welcome().version;
        if version < 4 {
            return Err(crate::client::too_old_to_break(name, version));
        }
        self.conn.run(ops::break_holds(name, hold_id)?)
    }
}

/// Asks for `lock` on `name`, with `extras`; the guard, if granted in
/// time.
fn acquire(
    conn: &Arc<Conn>,
    name: &str,
    lock: LockRequest,
    timeout: Option<Duration>,
    extras: Extras,
) -> Result<Option<LockGuard>> {
    let actors = conn.actors();
    let version = conn.welcome().version;
    let op = ops::acquire(
        name,
        lock,
        timeout,
        actors.current(version),
        extras,
        version,
    )?;
    let grant = conn.run(op)?;
    Ok(grant.map(|grant| LockGuard {
        conn: Arc::clone(conn),
        name: name.to_owned(),
        kind: lock.kind(),
        permits: lock.permits(),
        grant,
        released: false,
    }))
}

/// The guard of an acquire without a timeout, which always has one.
fn granted(guard: Option<LockGuard>) -> Result<LockGuard> {
    guard.ok_or_else(|| crate::Error::Protocol("an acquire without a timeout timed out".into()))
}

/// A blocking [`crate::Mutex`].
#[derive(Debug, Clone)]
pub struct Mutex {
    conn: Arc<Conn>,
    name: String,
    extras: Extras,
}

impl Mutex {
    /// Holds this handle acquires are told when someone waits behind them
    /// ([`LockGuard::wait_contended`]); see
    /// [`crate::Mutex::notify_contended`].
    pub fn notify_contended(mut self) -> Mutex {
        self.extras.notify_contended = true;
        self
    }

    /// Holds this handle acquires last at most `lease`; see
    /// [`crate::Mutex::lease`].
    pub fn lease(mut self, lease: Duration) -> Mutex {
        self.extras.lease = Some(lease);
        self
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Blocks until the mutex is granted.
    pub fn acquire(&self) -> Result<LockGuard> {
        granted(acquire(
            &self.conn,
            &self.name,
            LockRequest::Mutex,
            None,
            self.extras,
        )?)
    }

    /// Takes the mutex only if it is free and nobody is queued.
    pub fn try_acquire(&self) -> Result<Option<LockGuard>> {
        self.acquire_timeout(Duration::ZERO)
    }

    /// Blocks at most `timeout`; `Ok(None)` if it ran out.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        acquire(
            &self.conn,
            &self.name,
            LockRequest::Mutex,
            Some(timeout),
            self.extras,
        )
    }
}

/// A blocking [`crate::Semaphore`].
#[derive(Debug, Clone)]
pub struct Semaphore {
    conn: Arc<Conn>,
    name: String,
    capacity: u32,
    extras: Extras,
}

impl Semaphore {
    /// Holds this handle acquires are told when someone waits on the
    /// semaphore; see [`crate::Semaphore::notify_contended`].
    pub fn notify_contended(mut self) -> Semaphore {
        self.extras.notify_contended = true;
        self
    }

    /// Holds this handle acquires last at most `lease`; see
    /// [`crate::Semaphore::lease`].
    pub fn lease(mut self, lease: Duration) -> Semaphore {
        self.extras.lease = Some(lease);
        self
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The capacity this handle asks for.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn lock(&self, permits: u32) -> LockRequest {
        LockRequest::Semaphore {
            capacity: self.capacity,
            permits,
        }
    }

    /// Blocks for one permit.
    pub fn acquire(&self) -> Result<LockGuard> {
        self.acquire_many(1)
    }

    /// Blocks for `permits` permits, granted together.
    pub fn acquire_many(&self, permits: u32) -> Result<LockGuard> {
        granted(acquire(
            &self.conn,
            &self.name,
            self.lock(permits),
            None,
            self.extras,
        )?)
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
        self.acquire_many_timeout(permits, Duration::ZERO)
    }

    /// Blocks at most `timeout` for `permits` permits.
    pub fn acquire_many_timeout(
        &self,
        permits: u32,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        acquire(
            &self.conn,
            &self.name,
            self.lock(permits),
            Some(timeout),
            self.extras,
        )
    }
}

/// A blocking [`crate::RwLock`].
#[derive(Debug, Clone)]
pub struct RwLock {
    conn: Arc<Conn>,
    name: String,
    extras: Extras,
}

impl RwLock {
    /// Holds this handle acquires are told when someone waits on the lock;
    /// see [`crate::RwLock::notify_contended`].
    pub fn notify_contended(mut self) -> RwLock {
        self.extras.notify_contended = true;
        self
    }

    /// Holds this handle acquires last at most `lease`; see
    /// [`crate::RwLock::lease`].
    pub fn lease(mut self, lease: Duration) -> RwLock {
        self.extras.lease = Some(lease);
        self
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Blocks for shared access.
    pub fn read(&self) -> Result<LockGuard> {
        granted(acquire(
            &self.conn,
            &self.name,
            LockRequest::Shared,
            None,
            self.extras,
        )?)
    }

    /// Shared access only if available and nobody is queued.
    pub fn try_read(&self) -> Result<Option<LockGuard>> {
        self.read_timeout(Duration::ZERO)
    }

    /// Blocks at most `timeout` for shared access.
    pub fn read_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        acquire(
            &self.conn,
            &self.name,
            LockRequest::Shared,
            Some(timeout),
            self.extras,
        )
    }

    /// Blocks for exclusive access.
    pub fn write(&self) -> Result<LockGuard> {
        granted(acquire(
            &self.conn,
            &self.name,
            LockRequest::Exclusive,
            None,
            self.extras,
        )?)
    }

    /// Exclusive access only if the lock is free and nobody is queued.
    pub fn try_write(&self) -> Result<Option<LockGuard>> {
        self.write_timeout(Duration::ZERO)
    }

    /// Blocks at most `timeout` for exclusive access.
    pub fn write_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        acquire(
            &self.conn,
            &self.name,
            LockRequest::Exclusive,
            Some(timeout),
            self.extras,
        )
    }
}

/// A blocking [`crate::State`].
#[derive(Debug, Clone)]
pub struct State {
    conn: Arc<Conn>,
}

impl State {
    /// See [`crate::State::get`].
    pub fn get(&self, key: &str) -> Result<Option<Versioned>> {
        self.conn.run(ops::get(key)?)
    }

    /// See [`crate::State::set`].
    pub fn set(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<u64> {
        ops::written(self.set_with(key, value, WriteOptions::default())?)
    }

    /// See [`crate::State::set_with`].
    pub fn set_with(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        options: WriteOptions,
    ) -> Result<WriteOutcome> {
        self.conn.run(ops::set(key, value.into(), options)?)
    }

    /// See [`crate::State::compare_and_set`].
    pub fn compare_and_set(
        &self,
        key: &str,
        version: u64,
        value: impl Into<Vec<u8>>,
    ) -> Result<WriteOutcome> {
        self.set_with(key, value, WriteOptions::default().if_version(version))
    }

    /// See [`crate::State::remove`].
    pub fn remove(&self, key: &str) -> Result<Option<Versioned>> {
        ops::removed(self.remove_with(key, WriteOptions::default())?)
    }

    /// See [`crate::State::remove_with`].
    pub fn remove_with(&self, key: &str, options: WriteOptions) -> Result<RemoveOutcome> {
        self.conn.run(ops::remove(key, options)?)
    }

    /// See [`crate::State::increment`].
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64> {
        self.conn.run(ops::increment(key, delta, None, None)?)
    }

    /// See [`crate::State::increment_fenced`].
    pub fn increment_fenced(&self, key: &str, delta: i64, lock: &str, fence: u64) -> Result<i64> {
        let fence = Some((lock.to_owned(), fence));
        self.conn.run(ops::increment(key, delta, None, fence)?)
    }

    /// See [`crate::State::increment_guarded`].
    pub fn increment_guarded(&self, key: &str, delta: i64, guard: &LockGuard) -> Result<i64> {
        let hold = Some(guard.hold_id());
        self.conn.run(ops::increment(key, delta, hold, None)?)
    }

    /// See [`crate::State::list`].
    pub fn list(&self, prefix: &str, with_values: bool) -> Result<Vec<StateEntry>> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let (page, more) = self.list_page(prefix, &after, 0, with_values)?;
            if let Some(last) = page.last() {
                after = last.key.clone();
            }
            all.extend(page);
            if !more {
                return Ok(all);
            }
        }
    }

    /// See [`crate::State::list_page`].
    pub fn list_page(
        &self,
        prefix: &str,
        start_after: &str,
        limit: u32,
        with_values: bool,
    ) -> Result<(Vec<StateEntry>, bool)> {
        self.conn
            .run(ops::list_page(prefix, start_after, limit, with_values)?)
    }

    /// See [`crate::State::watch`].
    pub fn watch(&self, key: &str) -> Result<Watch> {
        self.watch_with(key, WatchOptions::values())
    }

    /// See [`crate::State::watch_prefix`].
    pub fn watch_prefix(&self, prefix: &str) -> Result<Watch> {
        let options = WatchOptions {
            prefix: true,
            ..WatchOptions::values()
        };
        self.watch_with(prefix, options)
    }

    /// See [`crate::State::watch_with`].
    pub fn watch_with(&self, key: &str, options: WatchOptions) -> Result<Watch> {
        let handle = self.conn.watch(ops::watch(key, &options)?)?;
        Ok(Watch {
            conn: Arc::clone(&self.conn),
            handle,
        })
    }

    /// See [`crate::State::get_json`].
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>> {
        ops::from_json(key, self.get(key)?)
    }

    /// See [`crate::State::set_json`].
    pub fn set_json<T: serde::Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<u64> {
        self.set(key, ops::to_json(key, value)?)
    }
}

/// A blocking [`crate::Watch`]: an iterator of changes that ends when the
/// connection does; unwatches when dropped.
#[derive(Debug)]
pub struct Watch {
    conn: Arc<Conn>,
    handle: WatchHandle,
}

impl Watch {
    /// The next change, waiting at most `timeout`; `None` on timeout or a
    /// lost connection.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<WatchEvent> {
        // A timeout too far to compute waits for ever.
        let deadline = Instant::now().checked_add(timeout);
        self.conn.next_event(&mut self.handle, deadline)
    }
}

impl Iterator for Watch {
    type Item = WatchEvent;

    fn next(&mut self) -> Option<WatchEvent> {
        self.conn.next_event(&mut self.handle, None)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.conn.unwatch(&mut self.handle);
    }
}

/// A held lock of a blocking [`Client`]; released when dropped.
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    conn: Arc<Conn>,
    name: String,
    kind: LockKind,
    permits: u32,
    grant: Grant,
    /// Whether the release has been sent already.
    released: bool,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the lock was taken.
    pub fn kind(&self) -> LockKind {
        self.kind
    }

    /// Permits held.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// The hold's id in the daemon.
    pub fn hold_id(&self) -> u64 {
        self.grant.hold_id
    }

    /// The fencing token; see [`crate::LockGuard::fence`].
    pub fn fence(&self) -> u64 {
        self.grant.fence
    }

    /// The previous holder died holding the lock; see
    /// [`crate::LockGuard::abandoned`].
    pub fn abandoned(&self) -> bool {
        self.grant.abandoned
    }

    /// Whether this hold is gone: its lease ran out, or the connection
    /// is lost.
    pub fn is_lost(&self) -> bool {
        self.conn.wait_hold_lost(self.grant.hold_id, Duration::ZERO)
    }

    /// Blocks until this hold is gone (its lease ran out, or the
    /// connection is lost) or `timeout` passes; true if it is gone.
    pub fn wait_lost(&self, timeout: Duration) -> bool {
        self.conn.wait_hold_lost(self.grant.hold_id, timeout)
    }

    /// Whether the daemon revoked this hold; see
    /// [`crate::LockGuard::is_revoked`].
    pub fn is_revoked(&self) -> bool {
        self.revocation().is_some()
    }

    /// Why the daemon revoked this hold, if it did; see
    /// [`crate::LockGuard::revocation`].
    pub fn revocation(&self) -> Option<String> {
        self.conn.revocation(self.grant.hold_id)
    }

    /// Makes this hold's lease end `lease` from now; see
    /// [`crate::LockGuard::extend`].
    pub fn extend(&self, lease: Duration) -> Result<()> {
        let version = self.conn.welcome().version;
        if version < 4 {
            let what = format!("lease extension on {:?}", self.name);
            return Err(crate::client::too_old(what, version));
        }
        self.conn
            .run(ops::extend_lease(&self.name, self.grant.hold_id, lease))
    }

    /// Whether the daemon told this hold that someone waits behind it;
    /// see [`crate::LockGuard::is_contended`].
    pub fn is_contended(&self) -> bool {
        self.conn.wait_contended(self.grant.hold_id, Duration::ZERO)
    }

    /// Blocks until someone waits behind this hold, or `timeout` passes;
    /// whether someone does. Only a hold acquired with `notify_contended`
    /// is ever told; see [`crate::LockGuard::contended`].
    pub fn wait_contended(&self, timeout: Duration) -> bool {
        self.conn.wait_contended(self.grant.hold_id, timeout)
    }

    /// Releases the hold and waits for the daemon to confirm it.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.conn.forget_hold(self.grant.hold_id);
        self.conn.run(ops::release(&self.name, self.grant.hold_id))
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.conn.forget_hold(self.grant.hold_id);
        if !self.released {
            self.conn.forget(Request::Release {
                hold_id: self.grant.hold_id,
            });
        }
    }
}

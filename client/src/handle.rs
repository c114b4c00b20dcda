//! Typed handles: [`Mutex`], [`Semaphore`] and [`RwLock`].
//!
//! A handle is just a name (and a capacity) bound to a [`Client`]; making
//! one sends nothing. Every acquire comes in three forms: wait as long as it
//! takes, try once without queueing, or wait at most a timeout (`Ok(None)`
//! when it runs out). Dropping a pending acquire's future cancels it on the
//! daemon.

use std::time::Duration;

use crate::client::{Client, LockRequest};
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::ops::Extras;

impl Client {
    /// A mutex handle for `name`.
    pub fn mutex(&self, name: impl Into<String>) -> Mutex {
        Mutex::new(self.clone(), name.into())
    }

    /// A semaphore handle for `name` with `capacity` permits. Every user of
    /// the name must agree on the capacity while it is in use.
    pub fn semaphore(&self, name: impl Into<String>, capacity: u32) -> Semaphore {
        Semaphore::new(self.clone(), name.into(), capacity)
    }

    /// A read-write lock handle for `name`.
    pub fn rwlock(&self, name: impl Into<String>) -> RwLock {
        RwLock::new(self.clone(), name.into())
    }
}

/// Asks `client` for `lock` on `name`; the hold, if granted in time.
async fn acquire(
    client: &Client,
    name: &str,
    lock: LockRequest,
    timeout: Option<Duration>,
    extras: Extras,
) -> Result<Option<LockGuard>> {
    let grant = client.acquire(name, lock, timeout, extras).await?;
    Ok(grant.map(|grant| {
        LockGuard::new(
            client.clone(),
            name.to_owned(),
            lock.kind(),
            lock.permits(),
            grant,
        )
    }))
}

/// A named mutex: one holder at a time, served in arrival order.
#[derive(Debug, Clone)]
pub struct Mutex {
    client: Client,
    name: String,
    extras: Extras,
}

impl Mutex {
    pub(crate) fn new(client: Client, name: String) -> Mutex {
        Mutex {
            client,
            name,
            extras: Extras::default(),
        }
    }

    /// Holds this handle acquires are told when someone waits behind
    /// them ([`LockGuard::contended`]); needs a daemon of protocol
    /// version 4 with its local backend, else the acquire is refused with
    /// `ErrorCode::Unsupported`.
    pub fn notify_contended(mut self) -> Mutex {
        self.extras.notify_contended = true;
        self
    }

    /// Holds this handle acquires last at most `lease` (whole milliseconds,
    /// rounded up): then the daemon revokes the hold (the guard's
    /// [`lost`](LockGuard::lost) completes) and tells the next holder it
    /// was abandoned, unless [`LockGuard::extend`] moved the end. Needs a
    /// daemon of protocol version 4 with its local backend, else the
    /// acquire is refused with `ErrorCode::Unsupported`.
    pub fn lease(mut self, lease: Duration) -> Mutex {
        self.extras.lease = Some(lease);
        self
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until the mutex is granted.
    pub async fn acquire(&self) -> Result<LockGuard> {
        let guard = self.acquire_with(None).await?;
        granted(guard)
    }

    /// Takes the mutex only if it is free and nobody is queued.
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>> {
        self.acquire_with(Some(Duration::ZERO)).await
    }

    /// Waits at most `timeout`; `Ok(None)` if it ran out.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        self.acquire_with(Some(timeout)).await
    }

    async fn acquire_with(&self, timeout: Option<Duration>) -> Result<Option<LockGuard>> {
        let lock = LockRequest::Mutex;
        acquire(&self.client, &self.name, lock, timeout, self.extras).await
    }
}

/// A named counting semaphore of fixed capacity; requests for several
/// permits are served in arrival order and never starved by smaller ones.
#[derive(Debug, Clone)]
pub struct Semaphore {
    client: Client,
    name: String,
    capacity: u32,
    extras: Extras,
}

impl Semaphore {
    pub(crate) fn new(client: Client, name: String, capacity: u32) -> Semaphore {
        Semaphore {
            client,
            name,
            capacity,
            extras: Extras::default(),
        }
    }

    /// Holds this handle acquires are told when someone waits on the
    /// semaphore ([`LockGuard::contended`]); as
    /// [`Mutex::notify_contended`].
    pub fn notify_contended(mut self) -> Semaphore {
        self.extras.notify_contended = true;
        self
    }

    /// Holds this handle acquires last at most `lease` (whole milliseconds,
    /// rounded up): then the daemon revokes the hold (the guard's
    /// [`lost`](LockGuard::lost) completes) and tells the next holder it
    /// was abandoned, unless [`LockGuard::extend`] moved the end. Needs a
    /// daemon of protocol version 4 with its local backend, else the
    /// acquire is refused with `ErrorCode::Unsupported`.
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

    /// Waits for one permit.
    pub async fn acquire(&self) -> Result<LockGuard> {
        self.acquire_many(1).await
    }

    /// Waits for `permits` permits, granted together.
    pub async fn acquire_many(&self, permits: u32) -> Result<LockGuard> {
        let guard = self.acquire_with(permits, None).await?;
        granted(guard)
    }

    /// Takes one permit only if it is free and nobody is queued.
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>> {
        self.try_acquire_many(1).await
    }

    /// Takes `permits` permits only if they are free and nobody is queued.
    pub async fn try_acquire_many(&self, permits: u32) -> Result<Option<LockGuard>> {
        self.acquire_with(permits, Some(Duration::ZERO)).await
    }

    /// Waits at most `timeout` for one permit.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        self.acquire_many_timeout(1, timeout).await
    }

    /// Waits at most `timeout` for `permits` permits.
    pub async fn acquire_many_timeout(
        &self,
        permits: u32,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        self.acquire_with(permits, Some(timeout)).await
    }

    async fn acquire_with(
        &self,
        permits: u32,
        timeout: Option<Duration>,
    ) -> Result<Option<LockGuard>> {
        let lock = LockRequest::Semaphore {
            capacity: self.capacity,
            permits,
        };
        acquire(&self.client, &self.name, lock, timeout, self.extras).await
    }
}

/// A named read-write lock: many readers or one writer. A writer at the
/// head of the queue blocks readers that come after it, so writers are not
/// starved.
#[derive(Debug, Clone)]
pub struct RwLock {
    client: Client,
    name: String,
    extras: Extras,
}

impl RwLock {
    pub(crate) fn new(client: Client, name: String) -> RwLock {
        RwLock {
            client,
            name,
            extras: Extras::default(),
        }
    }

    /// Holds this handle acquires (shared or exclusive) are told when
    /// someone waits on the lock ([`LockGuard::contended`]); as
    /// [`Mutex::notify_contended`].
    pub fn notify_contended(mut self) -> RwLock {
        self.extras.notify_contended = true;
        self
    }

    /// Holds this handle acquires last at most `lease` (whole milliseconds,
    /// rounded up): then the daemon revokes the hold (the guard's
    /// [`lost`](LockGuard::lost) completes) and tells the next holder it
    /// was abandoned, unless [`LockGuard::extend`] moved the end. Needs a
    /// daemon of protocol version 4 with its local backend, else the
    /// acquire is refused with `ErrorCode::Unsupported`.
    pub fn lease(mut self, lease: Duration) -> RwLock {
        self.extras.lease = Some(lease);
        self
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for shared access.
    pub async fn read(&self) -> Result<LockGuard> {
        let guard = self.acquire_with(LockRequest::Shared, None).await?;
        granted(guard)
    }

    /// Takes shared access only if it is available and nobody is queued.
    pub async fn try_read(&self) -> Result<Option<LockGuard>> {
        self.acquire_with(LockRequest::Shared, Some(Duration::ZERO))
            .await
    }

    /// Waits at most `timeout` for shared access.
    pub async fn read_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        self.acquire_with(LockRequest::Shared, Some(timeout)).await
    }

    /// Waits for exclusive access.
    pub async fn write(&self) -> Result<LockGuard> {
        let guard = self.acquire_with(LockRequest::Exclusive, None).await?;
        granted(guard)
    }

    /// Takes exclusive access only if the lock is free and nobody is queued.
    pub async fn try_write(&self) -> Result<Option<LockGuard>> {
        self.acquire_with(LockRequest::Exclusive, Some(Duration::ZERO))
            .await
    }

    /// Waits at most `timeout` for exclusive access.
    pub async fn write_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>> {
        self.acquire_with(LockRequest::Exclusive, Some(timeout))
            .await
    }

    async fn acquire_with(
        &self,
        lock: LockRequest,
        timeout: Option<Duration>,
    ) -> Result<Option<LockGuard>> {
        acquire(&self.client, &self.name, lock, timeout, self.extras).await
    }
}

/// An acquire without a timeout is granted or fails; a `TimedOut` answer to
/// one is the daemon's mistake.
fn granted(guard: Option<LockGuard>) -> Result<LockGuard> {
    guard.ok_or_else(|| {
        Error::Protocol("the daemon timed out an acquire that had no timeout".into())
    })
}

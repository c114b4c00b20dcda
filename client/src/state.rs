//! [`State`]: the daemon's versioned key/value store, and [`Watch`], a
//! stream of changes.
//!
//! Every key has a version that grows on every write, from one daemon-wide
//! counter. Writes can be conditional on the version (compare-and-set) and
//! *guarded* by a lock this client holds: the daemon applies a guarded
//! write only while the hold is still held. A write may also be *fenced*:
//! guarded by a lock name and the fence of a hold that any session holds,
//! so a child process can write under its parent's lock.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use lockbroker_proto::{ChangeKind, Event, StateEntry, Versioned};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::ops;

/// The result of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Applied; the key now has this version.
    Written {
        /// The new version.
        version: u64,
    },
    /// The key's version was not the one required; nothing changed.
    Conflict {
        /// The key's current version (0: absent).
        current: u64,
    },
}

/// The result of a conditional remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveOutcome {
    /// Removed (or already absent: `None`).
    Removed(Option<Versioned>),
    /// The key's version was not the one required; nothing changed.
    Conflict {
        /// The key's current version (0: absent).
        current: u64,
    },
}

/// Options of a write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Apply only if the key's version is this (0: the key must not exist).
    pub if_version: Option<u64>,
    /// The key disappears this long after the write.
    pub ttl: Option<Duration>,
    /// Apply only while this client still holds this hold (see
    /// [`LockGuard::hold_id`]).
    pub guard: Option<u64>,
    /// Apply only while lock `.0` has a live hold with fence `.1`, held by
    /// any session: what a command run under `lockbroker lock` gets in
    /// `LOCKBROKER_LOCK` and `LOCKBROKER_FENCE`.
    pub fence: Option<(String, u64)>,
}

impl WriteOptions {
    /// Only if the key's version is `version` (0: must not exist).
    pub fn if_version(mut self, version: u64) -> Self {
        self.if_version = Some(version);
        self
    }

    /// Expire after `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Only while `guard` is held.
    pub fn guard(mut self, guard: &LockGuard) -> Self {
        self.guard = Some(guard.hold_id());
        self
    }

    /// Only while `lock` has a live hold with `fence`, whichever session
    /// holds it (refused with [`ErrorCode::StaleFence`] otherwise).
    ///
    /// [`ErrorCode::StaleFence`]: lockbroker_proto::ErrorCode::StaleFence
    pub fn fence(mut self, lock: impl Into<String>, fence: u64) -> Self {
        self.fence = Some((lock.into(), fence));
        self
    }
}

/// A change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key changed.
    Changed {
        /// The key.
        key: String,
        /// The change's version.
        version: u64,
        /// Set, removed or expired.
        change: ChangeKind,
        /// The new value, if the watch asked for values.
        value: Option<Vec<u8>>,
    },
    /// Changes were missed (the watcher fell behind); read the current
    /// state to catch up. Later changes follow.
    Lagged,
}

/// What to watch and from when.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Watch every key starting with the key given.
    pub prefix: bool,
    /// 0: from now. N: every change with version >= N, replayed from the
    /// daemon's recent history first.
    pub from_version: u64,
    /// Events carry the new values.
    pub with_values: bool,
}

impl WatchOptions {
    /// A watch of one key from now on, with values.
    pub(crate) fn values() -> WatchOptions {
        WatchOptions {
            with_values: true,
            ..WatchOptions::default()
        }
    }
}

/// The shared state of the daemon, through this client's connection.
#[derive(Debug, Clone)]
pub struct State {
    client: Client,
}

impl Client {
    /// The daemon's shared state.
    pub fn state(&self) -> State {
        State {
            client: self.clone(),
        }
    }
}

impl State {
    /// The value and version at `key`, or `None`.
    pub async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        self.client.run(ops::get(key)?).await
    }

    /// Stores `value` at `key`; returns the new version.
    pub async fn set(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<u64> {
        ops::written(self.set_with(key, value, WriteOptions::default()).await?)
    }

    /// Stores `value` at `key` as `options` say.
    pub async fn set_with(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        options: WriteOptions,
    ) -> Result<WriteOutcome> {
        self.client.run(ops::set(key, value.into(), options)?).await
    }

    /// Stores `value` only if `key`'s version is `version` (0: absent).
    pub async fn compare_and_set(
        &self,
        key: &str,
        version: u64,
        value: impl Into<Vec<u8>>,
    ) -> Result<WriteOutcome> {
        self.set_with(key, value, WriteOptions::default().if_version(version))
            .await
    }

    /// Removes `key`; returns what it held.
    pub async fn remove(&self, key: &str) -> Result<Option<Versioned>> {
        ops::removed(self.remove_with(key, WriteOptions::default()).await?)
    }

    /// Removes `key` as `options` say (`ttl` is ignored).
    pub async fn remove_with(&self, key: &str, options: WriteOptions) -> Result<RemoveOutcome> {
        self.client.run(ops::remove(key, options)?).await
    }

    /// Adds `delta` to the decimal integer at `key` (absent counts as 0);
    /// returns the new value.
    pub async fn increment(&self, key: &str, delta: i64) -> Result<i64> {
        self.client
            .run(ops::increment(key, delta, None, None)?)
            .await
    }

    /// Like [`State::increment`], applied only while `guard` is held.
    pub async fn increment_guarded(&self, key: &str, delta: i64, guard: &LockGuard) -> Result<i64> {
        let op = ops::increment(key, delta, Some(guard.hold_id()), None)?;
        self.client.run(op).await
    }

    /// Like [`State::increment`], applied only while `lock` has a live hold
    /// with `fence` (see [`WriteOptions::fence`]).
    pub async fn increment_fenced(
        &self,
        key: &str,
        delta: i64,
        lock: &str,
        fence: u64,
    ) -> Result<i64> {
        let op = ops::increment(key, delta, None, Some((lock.to_owned(), fence)))?;
        self.client.run(op).await
    }

    /// Every key under `prefix`, in key order, with values if asked.
    pub async fn list(&self, prefix: &str, with_values: bool) -> Result<Vec<StateEntry>> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let (page, more) = self.list_page(prefix, &after, 0, with_values).await?;
            if let Some(last) = page.last() {
                after = last.key.clone();
            }
            all.extend(page);
            if !more {
                return Ok(all);
            }
        }
    }

    /// One page of keys under `prefix` after `start_after`; the flag says
    /// whether more follow.
    pub async fn list_page(
        &self,
        prefix: &str,
        start_after: &str,
        limit: u32,
        with_values: bool,
    ) -> Result<(Vec<StateEntry>, bool)> {
        let op = ops::list_page(prefix, start_after, limit, with_values)?;
        self.client.run(op).await
    }

    /// Watches `key` from now on, with values.
    pub async fn watch(&self, key: &str) -> Result<Watch> {
        self.watch_with(key, WatchOptions::values()).await
    }

    /// Watches every key under `prefix` from now on, with values.
    pub async fn watch_prefix(&self, prefix: &str) -> Result<Watch> {
        let options = WatchOptions {
            prefix: true,
            ..WatchOptions::values()
        };
        self.watch_with(prefix, options).await
    }

    /// Watches as `options` say.
    pub async fn watch_with(&self, key: &str, options: WatchOptions) -> Result<Watch> {
        self.watch_op(ops::watch(key, &options)?).await
    }

    /// Starts the watch `op` asks for.
    pub(crate) async fn watch_op(&self, op: ops::Op<()>) -> Result<Watch> {
        let (id, events, reply) = self.client.submit_watch(op.request)?;
        // From here on a Watch owns the id, so dropping this future (or an
        // error) ends the watch on the daemon too.
        let watch = Watch {
            client: self.client.clone(),
            id,
            events,
        };
        op.answer
            .read(reply.await.map_err(|_| Error::ConnectionLost)?)?;
        Ok(watch)
    }

    /// The value at `key` decoded from JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>> {
        ops::from_json(key, self.get(key).await?)
    }

    /// Stores `value` as JSON at `key`; returns the new version.
    pub async fn set_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<u64> {
        self.set(key, ops::to_json(key, value)?).await
    }
}

/// A stream of changes to a key or prefix; unwatches when dropped.
#[derive(Debug)]
pub struct Watch {
    client: Client,
    id: u64,
    /// The events the connection routes to this watch.
    events: mpsc::UnboundedReceiver<Event>,
}

impl WatchEvent {
    /// The event a watch's protocol event stands for.
    pub(crate) fn from_event(event: Event) -> Option<WatchEvent> {
        match event {
            Event::StateChanged {
                key,
                version,
                change,
                value,
                ..
            } => Some(WatchEvent::Changed {
                key,
                version,
                change,
                value,
            }),
            Event::WatchLagged { .. } => Some(WatchEvent::Lagged),
            // Only watch events are routed to a watch.
            Event::ShuttingDown | Event::Contended { .. } | Event::Revoked { .. } => None,
        }
    }
}

impl Watch {
    /// The next change; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(event) = WatchEvent::from_event(self.events.recv().await?) {
                return Some(event);
            }
        }
    }

    /// The watch id (the request id of the watch).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Stream for Watch {
    type Item = WatchEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        loop {
            match self.events.poll_recv(cx) {
                Poll::Ready(Some(event)) => {
                    if let Some(event) = WatchEvent::from_event(event) {
                        return Poll::Ready(Some(event));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.client.forget_watch(self.id);
    }
}

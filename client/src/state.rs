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
use lockbroker_proto::{
    ChangeKind, Event, LockName, Request, Response, StateEntry, StateSet, Versioned,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::{Error, Result, refused, unexpected};
use crate::guard::LockGuard;

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

/// `write`, wrapped in a fenced write when `fence` names one.
fn fenced(write: Request, fence: Option<(String, u64)>) -> Request {
    match fence {
        Some((lock, fence)) => Request::StateFenced {
            lock,
            fence,
            write: Box::new(write),
        },
        None => write,
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

/// The shared state of the daemon, through this client's connection.
#[derive(Debug, Clone)]
pub struct State {
    client: Client,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Client {
    /// The daemon's shared state.
    pub fn state(&self) -> State {
        State {
            client: self.clone(),
        }
    }
}

/// Checks a key as the daemon would (the rules of lock names), or a
/// prefix (which may also be empty), before anything is sent.
fn check_key(key: &str, prefix: bool) -> Result<()> {
    let checked = if prefix {
        lockbroker_proto::validate_prefix(key)
    } else {
        LockName::new(key).map(drop)
    };
    checked.map_err(|source| Error::InvalidName {
        name: key.to_owned(),
        source,
    })
}

impl State {
    async fn call(&self, what: &str, key: &str, request: Request) -> Result<Response> {
        let prefix = matches!(request, Request::StateList { .. });
        check_key(key, prefix)?;
        match self.client.call(request).await? {
            Response::Error(e) => Err(refused(format!("{what} of {key:?}"), e)),
            other => Ok(other),
        }
    }

    /// The value and version at `key`, or `None`.
    pub async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let request = Request::StateGet { key: key.into() };
        match self.call("get", key, request).await? {
            Response::StateValue(v) => Ok(v),
            other => Err(unexpected("get", other)),
        }
    }

    /// Stores `value` at `key`; returns the new version.
    pub async fn set(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<u64> {
        match self.set_with(key, value, WriteOptions::default()).await? {
            WriteOutcome::Written { version } => Ok(version),
            WriteOutcome::Conflict { .. } => Err(Error::Protocol(
                "an unconditional write reported a conflict".into(),
            )),
        }
    }

    /// Stores `value` at `key` as `options` say.
    pub async fn set_with(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        options: WriteOptions,
    ) -> Result<WriteOutcome> {
        let write = Request::StateSet(StateSet {
            key: key.into(),
            value: value.into(),
            if_version: options.if_version,
            ttl_ms: options.ttl.map(ms),
            guard: options.guard,
        });
        let request = fenced(write, options.fence);
        match self.call("set", key, request).await? {
            Response::StateWritten { version } => Ok(WriteOutcome::Written { version }),
            Response::StateConflict { current } => Ok(WriteOutcome::Conflict { current }),
            other => Err(unexpected("set", other)),
        }
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
        match self.remove_with(key, WriteOptions::default()).await? {
            RemoveOutcome::Removed(old) => Ok(old),
            RemoveOutcome::Conflict { .. } => Err(Error::Protocol(
                "an unconditional remove reported a conflict".into(),
            )),
        }
    }

    /// Removes `key` as `options` say (`ttl` is ignored).
    pub async fn remove_with(&self, key: &str, options: WriteOptions) -> Result<RemoveOutcome> {
        let write = Request::StateRemove {
            key: key.into(),
            if_version: options.if_version,
            guard: options.guard,
        };
        let request = fenced(write, options.fence);
        match self.call("remove", key, request).await? {
            Response::StateRemoved(old) => Ok(RemoveOutcome::Removed(old)),
            Response::StateConflict { current } => Ok(RemoveOutcome::Conflict { current }),
            other => Err(unexpected("remove", other)),
        }
    }

    /// Adds `delta` to the decimal integer at `key` (absent counts as 0);
    /// returns the new value.
    pub async fn increment(&self, key: &str, delta: i64) -> Result<i64> {
        self.increment_with(key, delta, None, None).await
    }

    /// Like [`State::increment`], applied only while `guard` is held.
    pub async fn increment_guarded(&self, key: &str, delta: i64, guard: &LockGuard) -> Result<i64> {
        self.increment_with(key, delta, Some(guard.hold_id()), None)
            .await
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
        self.increment_with(key, delta, None, Some((lock.to_owned(), fence)))
            .await
    }

    async fn increment_with(
        &self,
        key: &str,
        delta: i64,
        guard: Option<u64>,
        fence: Option<(String, u64)>,
    ) -> Result<i64> {
        let write = Request::StateIncrement {
            key: key.into(),
            delta,
            guard,
        };
        let request = fenced(write, fence);
        match self.call("increment", key, request).await? {
            Response::StateCounter { value, .. } => Ok(value),
            other => Err(unexpected("increment", other)),
        }
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
        let request = Request::StateList {
            prefix: prefix.into(),
            start_after: start_after.into(),
            limit,
            with_values,
        };
        match self.call("list", prefix, request).await? {
            Response::StateEntries { entries, more } => Ok((entries, more)),
            other => Err(unexpected("list", other)),
        }
    }

    /// Watches `key` from now on, with values.
    pub async fn watch(&self, key: &str) -> Result<Watch> {
        let options = WatchOptions {
            with_values: true,
            ..WatchOptions::default()
        };
        self.watch_with(key, options).await
    }

    /// Watches every key under `prefix` from now on, with values.
    pub async fn watch_prefix(&self, prefix: &str) -> Result<Watch> {
        let options = WatchOptions {
            prefix: true,
            with_values: true,
            ..WatchOptions::default()
        };
        self.watch_with(prefix, options).await
    }

    /// Watches as `options` say.
    pub async fn watch_with(&self, key: &str, options: WatchOptions) -> Result<Watch> {
        check_key(key, options.prefix)?;
        let request = Request::StateWatch {
            key: key.into(),
            prefix: options.prefix,
            from_version: options.from_version,
            with_values: options.with_values,
        };
        let (id, events, reply) = self.client.submit_watch(request)?;
        // From here on a Watch owns the id, so dropping this future (or an
        // error) ends the watch on the daemon too.
        let watch = Watch {
            client: self.client.clone(),
            id,
            events,
        };
        match reply.await.map_err(|_| Error::ConnectionLost)? {
            Response::Done => Ok(watch),
            Response::Error(e) => Err(refused(format!("watch of {key:?}"), e)),
            other => Err(unexpected("watch", other)),
        }
    }

    /// The value at `key` decoded from JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(v) => {
                let value = serde_json::from_slice(&v.value).map_err(|e| Error::Json {
                    key: key.into(),
                    source: e,
                })?;
                Ok(Some((value, v.version)))
            }
        }
    }

    /// Stores `value` as JSON at `key`; returns the new version.
    pub async fn set_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<u64> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Json {
            key: key.into(),
            source: e,
        })?;
        self.set(key, bytes).await
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
    fn from_event(event: Event) -> Option<WatchEvent> {
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
            Event::ShuttingDown => None,
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

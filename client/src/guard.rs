//! Guards: a held lock, released explicitly or on drop.
//!
//! `Drop` cannot wait, so dropping a guard *queues* the release and returns
//! at once (it never blocks, and never fails). To see errors, call
//! [`LockGuard::release`]. Either way the daemon is the backstop: everything
//! a connection held is released when the connection closes.

use std::time::Duration;

use lockbroker_proto::{Grant, LockKind, Request};

use crate::client::Client;
use crate::error::Result;

/// A granted hold on a lock.
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    client: Client,
    name: String,
    kind: LockKind,
    permits: u32,
    grant: Grant,
    /// Whether the release has been sent already.
    released: bool,
}

impl LockGuard {
    pub(crate) fn new(
        client: Client,
        name: String,
        kind: LockKind,
        permits: u32,
        grant: Grant,
    ) -> LockGuard {
        LockGuard {
            client,
            name,
            kind,
            permits,
            grant,
            released: false,
        }
    }

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

    /// The fencing token: strictly greater than every fence granted before
    /// for this name. A resource can refuse writes carrying an older fence.
    pub fn fence(&self) -> u64 {
        self.grant.fence
    }

    /// The previous holder's session ended while holding the lock, so the
    /// data it protects may be half-written.
    pub fn abandoned(&self) -> bool {
        self.grant.abandoned
    }

    /// Whether this hold is gone: the daemon revoked it (its lease ran
    /// out, or someone broke it), or the connection is lost.
    pub fn is_lost(&self) -> bool {
        self.client.is_revoked(self.grant.hold_id) || self.client.is_lost()
    }

    /// Whether the daemon revoked this hold: its lease ran out, or
    /// someone broke it (`Client::break_lock`).
    pub fn is_revoked(&self) -> bool {
        self.client.is_revoked(self.grant.hold_id)
    }

    /// Why the daemon revoked this hold, if it did: "the lease of 100 ms
    /// on \"x\" ran out", "broken by session 7 (pid 42, uid 0, …)".
    pub fn revocation(&self) -> Option<String> {
        self.client.revocation(self.grant.hold_id)
    }

    /// Completes when this hold is gone: the daemon revoked it, or the
    /// connection is lost.
    pub async fn lost(&self) {
        self.client.hold_lost(self.grant.hold_id).await
    }

    /// Makes this hold's lease end `lease` from now (later or sooner; a
    /// hold without a lease gets one). Refused with `ErrorCode::UnknownHold`
    /// once the lease has run out.
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        let version = self.client.welcome().version;
        if version < 4 {
            let what = format!("lease extension on {:?}", self.name);
            return Err(crate::client::too_old(what, version));
        }
        let op = crate::ops::extend_lease(&self.name, self.grant.hold_id, lease);
        self.client.run(op).await
    }

    /// Whether the daemon told this hold that someone waits behind it (a
    /// hold acquired through a handle made with `notify_contended`, e.g.
    /// [`Mutex::notify_contended`](crate::Mutex::notify_contended)).
    pub fn is_contended(&self) -> bool {
        self.client.is_contended(self.grant.hold_id)
    }

    /// Completes once someone waits behind this hold, so that a long
    /// holder can finish early or yield; at once if it already happened.
    /// Only for a hold acquired with `notify_contended`: any other never
    /// hears, and this never completes (nor once the connection is lost:
    /// `select!` it with [`lost`](LockGuard::lost)).
    pub async fn contended(&self) {
        self.client.contended(self.grant.hold_id).await
    }

    /// Releases the hold and waits for the daemon to confirm it.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.client.forget_hold(self.grant.hold_id);
        let op = crate::ops::release(&self.name, self.grant.hold_id);
        self.client.run(op).await
    }
}

impl LockGuard {
    /// Gives the hold up to the session without releasing it: it lasts
    /// until released by name or until the session ends (the connection's
    /// last copy closes). For a connection handed down to child processes.
    pub fn keep_until_session_ends(mut self) {
        self.released = true;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.client.forget_hold(self.grant.hold_id);
        if !self.released {
            self.client.forget(Request::Release {
                hold_id: self.grant.hold_id,
            });
        }
    }
}

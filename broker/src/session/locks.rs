//! A session's lock requests: acquire (granted, queued or refused), the
//! waits' deadlines and cancels, release by hold or by name, inspection a
//! chunk at a time, and the release of everything when the session ends.

use std::collections::{BTreeSet, HashMap, HashSet};

use std::time::Duration;

use lockbroker_proto::{
    Acquire, AcquireOption, ErrorCode, ErrorInfo, Event, Grant, LockKind, LockName, MAX_WITHIN,
    Response, frame,
};
use tokio::time::Instant;

use tokio::io::AsyncWrite;

use super::{Session, shrink_index};
use crate::backend::Applied;
use crate::config::{DEFAULT_INSPECT_LIMIT, MAX_INSPECT_LIMIT};
use crate::lock_table::{AcquireOutcome, AcquireSpec, Notice};

/// Entries a listing gathers per turn of the loop: a few hundred
/// microseconds of work at most, so others are served between turns.
pub const LIST_CHUNK: usize = 128;

/// Names of abandoned holds a session's warning lists; the rest are
/// counted.
const ABANDONED_LOGGED: usize = 8;

/// An `Inspect` or `InspectAfter` being gathered, a chunk per turn; each
/// chunk is encoded as it comes, so no turn encodes the whole answer.
#[derive(Debug)]
struct Listing {
    /// The request.
    id: u64,
    prefix: String,
    /// The cursor: the last name gathered (or the request's `start_after`).
    after: String,
    /// Entries still wanted.
    left: usize,
    /// The answer so far.
    frame: frame::InspectionFrame,
}

/// A hold of the session.
#[derive(Debug)]
struct Held {
    name: LockName,
    kind: LockKind,
    /// When it was granted, for the hold-time metric.
    since: Instant,
}

/// What an acquire asks for besides the lock (`AcquireAs`, `AcquireWith`).
#[derive(Debug, Default)]
pub(super) struct Options {
    /// On whose behalf (0: none).
    actor: u64,
    /// The actors `actor` runs within, nearest first.
    within: Vec<u64>,
    /// Tell the session when someone waits behind the hold.
    notify_contended: bool,
    /// The hold's lease, from its grant.
    lease: Option<Duration>,
}

impl Options {
    /// On behalf of `actor` alone (`AcquireAs`).
    pub(super) fn of_actor(actor: u64) -> Options {
        Options {
            actor,
            ..Options::default()
        }
    }

    /// The options of an `AcquireWith` of `acquire`, checked: each at most
    /// once, an actor not 0, `Within` bounded, without 0 and with an actor.
    pub(super) fn read(
        acquire: &Acquire,
        options: Vec<AcquireOption>,
    ) -> Result<Options, ErrorInfo> {
        let refuse = |why: String| {
            ErrorInfo::new(
                ErrorCode::InvalidArgument,
                format!("acquire of {:?}: {why}", acquire.name),
            )
        };
        let mut read = Options::default();
        let mut seen = [false; 4];
        for option in options {
            let index = match &option {
                AcquireOption::Actor(_) => 0,
                AcquireOption::Within(_) => 1,
                AcquireOption::NotifyContended => 2,
                AcquireOption::Lease(_) => 3,
            };
            if std::mem::replace(&mut seen[index], true) {
                return Err(refuse(format!("option {option:?} is given twice")));
            }
            match option {
                AcquireOption::Actor(0) => return Err(refuse("the actor 0 is no actor".into())),
                AcquireOption::Actor(actor) => read.actor = actor,
                AcquireOption::Within(within) => {
                    if within.len() > MAX_WITHIN || within.contains(&0) {
                        return Err(refuse(format!(
                            "an actor runs within at most {MAX_WITHIN} actors, none 0 ({} given)",
                            within.len()
                        )));
                    }
                    read.within = within;
                }
                AcquireOption::NotifyContended => read.notify_contended = true,
                AcquireOption::Lease(ms) => read.lease = Some(lease_of(ms).map_err(refuse)?),
            }
        }
        if !read.within.is_empty() && read.actor == 0 {
            return Err(refuse("`Within` needs an `Actor`".into()));
        }
        Ok(read)
    }
}

/// Longest lease, in milliseconds: about 35 years, far within `Instant`.
const MAX_LEASE_MS: u64 = 1 << 40;

/// A lease of `ms` milliseconds, checked.
fn lease_of(ms: u64) -> Result<Duration, String> {
    if ms == 0 || ms > MAX_LEASE_MS {
        return Err(format!(
            "a lease of {ms} ms: it must be from 1 ms to {MAX_LEASE_MS} ms"
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// A waiting acquire.
#[derive(Debug)]
struct Pending {
    name: LockName,
    kind: LockKind,
    /// When it started waiting, for the wait-time metric.
    since: Instant,
    deadline: Option<Instant>,
    /// A try, answered `TimedOut` if it cannot be granted at once; else
    /// an acquire that may not wait because the session is at its
    /// pending limit (both only from a backend that decides later).
    is_try: bool,
    /// It asked to be told of contention once granted.
    notify_contended: bool,
    /// The lease its hold is to have.
    lease: Option<Duration>,
}

/// The lock part of a session.
#[derive(Debug, Default)]
pub(super) struct Locks {
    /// hold id → name (and what the metrics want), for every hold the
    /// session has: a release names only the hold, and the table is keyed
    /// by name.
    holds: HashMap<u64, Held>,
    /// request id → waiting acquire.
    pending: HashMap<u64, Pending>,
    /// (deadline, request id) of waiting acquires with a timeout.
    deadlines: BTreeSet<(Instant, u64)>,
    /// (lease end, hold id) of holds with a lease.
    lease_ends: BTreeSet<(Instant, u64)>,
    /// hold id → lease end, for the holds with a lease only (a session
    /// may hold a great many names, few of them leased: `Held` stays
    /// small).
    lease_of: HashMap<u64, Instant>,
    /// The listing being gathered, if any.
    listing: Option<Listing>,
    /// The token of the page the backend will send the listing, while it
    /// is being fetched.
    listing_token: Option<u64>,
    /// Answers that wait for the change the backend applies later under
    /// their token.
    after_apply: HashMap<u64, Vec<(u64, Response)>>,
    /// The last token handed to the backend.
    last_token: u64,
    /// The client asked that its holds end as released, not abandoned,
    /// when the connection closes (`Request::ReleaseOnClose`).
    release_on_close: bool,
    /// Waiting acquires that asked to be told of contention.
    pending_notify: usize,
    /// Holds ended since the session last read all its notices: news of
    /// them still in the channel is late, not early.
    just_released: Vec<u64>,
    /// Holds broken before the session learnt of their grant (the table
    /// tells as it breaks; the grant may still be on its way), with who
    /// broke them: revoked once it arrives. Emptied when no acquire waits;
    /// at most `max_pending`.
    early_revoked: HashMap<u64, String>,
    /// Holds told of contention before the session learnt of their grant
    /// (the table tells as it queues a waiter; the grant may still be on
    /// its way): told once it arrives. Only holds of waiting acquires that
    /// asked can be early, so the set is emptied when none waits, and it
    /// keeps at most `max_pending` holds.
    early_contended: HashSet<u64>,
}

impl Locks {
    /// The earliest deadline of a waiting acquire or end of a lease.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let wait = self.deadlines.first().map(|(at, _)| *at);
        let lease = self.lease_ends.first().map(|(at, _)| *at);
        wait.into_iter().chain(lease).min()
    }

    /// Records hold `hold_id`, granted now with `lease`.
    fn hold(&mut self, hold_id: u64, name: LockName, kind: LockKind, lease: Option<Duration>) {
        let since = Instant::now();
        if let Some(at) = lease.map(|d| since + d) {
            self.lease_ends.insert((at, hold_id));
            self.lease_of.insert(hold_id, at);
        }
        self.holds.insert(hold_id, Held { name, kind, since });
    }

    /// Forgets hold `hold_id`: what it was, if the session had it.
    fn unhold(&mut self, hold_id: u64) -> Option<Held> {
        let held = self.holds.remove(&hold_id)?;
        if let Some(at) = self.lease_of.remove(&hold_id) {
            self.lease_ends.remove(&(at, hold_id));
            shrink_index(&mut self.lease_of);
        }
        shrink_index(&mut self.holds);
        self.just_released.push(hold_id);
        Some(held)
    }

    /// Forgets the holds released before the session's notices were last
    /// all read: any news the table sent of them (under its lock, before
    /// the release) has come and gone.
    pub(super) fn forget_released(&mut self) {
        if !self.just_released.is_empty() {
            self.just_released.clear();
            if self.just_released.capacity() > 64 {
                self.just_released = Vec::new();
            }
        }
    }

    /// Whether a listing is being gathered (the session then reads and
    /// carries out nothing else).
    pub(super) fn is_listing(&self) -> bool {
        self.listing.is_some()
    }

    /// Whether a change the backend applies later is still to be applied:
    /// the requests after it wait, so that each sees it (a try after a
    /// release finds the lock free).
    pub(super) fn is_applying(&self) -> bool {
        !self.after_apply.is_empty()
    }

    /// Whether the listing has its next page to gather now (not waiting
    /// for the backend to send it).
    pub(super) fn can_list(&self) -> bool {
        self.listing.is_some() && self.listing_token.is_none()
    }

    fn token(&mut self) -> u64 {
        self.last_token += 1;
        self.last_token
    }

    /// Whether `request_id` is a waiting acquire.
    pub(super) fn is_pending(&self, request_id: u64) -> bool {
        self.pending.contains_key(&request_id)
    }

    /// Whether the session has hold `hold_id`.
    pub(super) fn has_hold(&self, hold_id: u64) -> bool {
        self.holds.contains_key(&hold_id)
    }

    /// Holds end as released, not abandoned, when the connection closes.
    pub(super) fn release_on_close(&mut self) {
        self.release_on_close = true;
    }
}

impl<W: AsyncWrite + Unpin> Session<W> {
    /// `req`, with what `options` ask for.
    pub(super) fn acquire(&mut self, id: u64, req: lockbroker_proto::Acquire, options: Options) {
        if let Err(e) = self.try_acquire(id, req, options) {
            self.error(id, e);
        }
    }

    fn try_acquire(
        &mut self,
        id: u64,
        req: lockbroker_proto::Acquire,
        options: Options,
    ) -> Result<(), ErrorInfo> {
        if self.id_in_use(id) {
            return Err(ErrorInfo::new(
                ErrorCode::DuplicateRequestId,
                format!("request id {id} is already used by a request still being answered"),
            ));
        }
        let name = LockName::new(req.name).map_err(|e| {
            ErrorInfo::new(ErrorCode::InvalidName, format!("invalid lock name: {e}"))
        })?;
        let mut spec = AcquireSpec::validate(req.kind, req.capacity, req.permits, req.timeout_ms)?;
        spec.actor = options.actor;
        // An acquire of no actor is plain, whatever it runs within.
        if options.actor != 0 && !options.within.is_empty() {
            spec.within = Some(options.within.into());
        }
        if options.notify_contended && !self.broker.backend.tells_contention() {
            return Err(ErrorInfo::new(
                ErrorCode::Unsupported,
                format!(
                    "acquire of {:?}: this daemon's backend cannot tell a holder of contention",
                    name.as_str()
                ),
            ));
        }
        spec.notify_contended = options.notify_contended;
        if options.lease.is_some() && !self.broker.backend.has_leases() {
            return Err(ErrorInfo::new(
                ErrorCode::Unsupported,
                format!(
                    "acquire of {:?}: this daemon's backend has no leases (its holds end with their session's etcd lease)",
                    name.as_str()
                ),
            ));
        }
        let limits = self.broker.limits;
        if self.locks.holds.len() + self.locks.pending.len() >= limits.max_holds as usize {
            return Err(ErrorInfo::new(
                ErrorCode::TooManyHolds,
                format!(
                    "acquire of {:?}: this session already has {} holds and waiting acquires (limit {})",
                    name.as_str(),
                    self.locks.holds.len() + self.locks.pending.len(),
                    limits.max_holds
                ),
            ));
        }
        let at_pending_limit = self.locks.pending.len() >= limits.max_pending as usize;
        let is_try = !spec.may_wait;
        spec.may_wait &= !at_pending_limit;
        let kind = spec.kind;
        match self.broker.backend.acquire(&name, &self.peer, id, &spec)? {
            AcquireOutcome::Granted(grant) => {
                self.locks.hold(grant.hold_id, name, kind, options.lease);
                self.broker
                    .metrics
                    .granted(kind, Duration::ZERO, grant.abandoned);
                self.respond(id, Response::Granted(grant));
            }
            AcquireOutcome::WouldBlock if is_try => {
                self.broker.metrics.timed_out(kind);
                self.respond(id, Response::TimedOut);
            }
            AcquireOutcome::WouldBlock => return Err(self.too_many_pending(&name)),
            AcquireOutcome::Queued => {
                // A deadline too far to represent is no deadline; a try or
                // an acquire that may not wait has none (its backend says
                // at once, later, whether it was granted).
                let deadline = req.timeout_ms.filter(|_| spec.may_wait).and_then(|ms| {
                    Instant::now().checked_add(std::time::Duration::from_millis(ms))
                });
                if let Some(at) = deadline {
                    self.locks.deadlines.insert((at, id));
                }
                self.broker.metrics.queued(kind);
                self.locks.pending_notify += usize::from(spec.notify_contended);
                self.locks.pending.insert(
                    id,
                    Pending {
                        name,
                        kind,
                        since: Instant::now(),
                        deadline,
                        is_try,
                        notify_contended: spec.notify_contended,
                        lease: options.lease,
                    },
                );
            }
        }
        Ok(())
    }

    /// What the backend tells the session after the call that asked.
    pub(super) fn notice(&mut self, notice: Notice) {
        match notice {
            Notice::Granted {
                request_id,
                grant,
                sent,
            } => self.granted_while_waiting(request_id, grant, sent),
            Notice::WouldBlock { request_id } => {
                if let Some(p) = self.end_pending(request_id) {
                    let response = if p.is_try {
                        self.broker.metrics.timed_out(p.kind);
                        Response::TimedOut
                    } else {
                        Response::Error(self.too_many_pending(&p.name))
                    };
                    self.respond(request_id, response);
                }
            }
            Notice::Refused { request_id, error } => {
                if self.end_pending(request_id).is_some() {
                    self.error(request_id, error);
                }
            }
            Notice::Lost { error } => self.lost = Some(error),
            Notice::Contended { hold_id } => self.contended(hold_id),
            Notice::Revoked { hold_id, message } => self.revoked(hold_id, message),
            Notice::Applied { token } => {
                for (id, response) in self.locks.after_apply.remove(&token).unwrap_or_default() {
                    self.respond(id, response);
                }
                shrink_index(&mut self.locks.after_apply);
                self.run_deferred();
            }
            Notice::Listed {
                token,
                entries,
                more,
            } => {
                if self.locks.listing_token == Some(token) {
                    self.locks.listing_token = None;
                    self.listed(entries, more);
                    if !self.locks.is_listing() {
                        self.run_deferred();
                    }
                }
            }
        }
    }

    /// Answers `id` with `response` once `applied`.
    fn answer_when(&mut self, applied: Applied, token: u64, answers: Vec<(u64, Response)>) {
        match applied {
            Applied::Now => answers
                .into_iter()
                .for_each(|(id, response)| self.respond(id, response)),
            Applied::Later => {
                self.locks.after_apply.insert(token, answers);
            }
        }
    }

    /// Takes acquire `request_id` out of the waiting ones.
    fn end_pending(&mut self, request_id: u64) -> Option<Pending> {
        let p = self.locks.pending.remove(&request_id);
        match &p {
            Some(p) => {
                if let Some(at) = p.deadline {
                    self.locks.deadlines.remove(&(at, request_id));
                }
                if self.locks.pending.is_empty() && !self.locks.early_revoked.is_empty() {
                    // Every grant news could be early for has come.
                    self.locks.early_revoked = HashMap::new();
                }
                self.broker.metrics.dequeued(p.kind);
                shrink_index(&mut self.locks.pending);
                if p.notify_contended {
                    self.locks.pending_notify -= 1;
                    if self.locks.pending_notify == 0 {
                        // Every grant news could be early for has come:
                        // what is left is of holds already released.
                        self.locks.early_contended = HashSet::new();
                    }
                }
            }
            // Cannot happen: a waiter stays pending until it is answered.
            None => tracing::error!(request_id, "an answer for an acquire that is not pending"),
        }
        p
    }

    fn too_many_pending(&self, name: &LockName) -> ErrorInfo {
        let limit = self.broker.limits.max_pending;
        ErrorInfo::new(
            ErrorCode::TooManyPending,
            format!(
                "acquire of {:?}: this session already has {} acquires waiting (limit {limit})",
                name.as_str(),
                self.locks.pending.len(),
            ),
        )
    }

    /// A grant the table made while this session waited: records the hold
    /// of a waiting acquire now granted, and answers it unless the grant
    /// was `sent` to the peer already (`direct`).
    fn granted_while_waiting(&mut self, request_id: u64, grant: Grant, sent: bool) {
        // Before the acquire ends, which may empty the sets.
        let told_early = self.locks.early_contended.remove(&grant.hold_id);
        let broken_early = self.locks.early_revoked.remove(&grant.hold_id);
        let Some(p) = self.end_pending(request_id) else {
            return;
        };
        self.broker
            .metrics
            .granted(p.kind, p.since.elapsed(), grant.abandoned);
        self.locks.hold(grant.hold_id, p.name, p.kind, p.lease);
        if !sent {
            self.respond(request_id, Response::Granted(grant));
        }
        if p.notify_contended && told_early {
            self.event(Event::Contended {
                hold_id: grant.hold_id,
            });
        }
        if let Some(message) = broken_early {
            self.revoked(grant.hold_id, message);
        }
    }

    /// Hold `hold_id` was broken by another session (the table has let it
    /// go): forgotten, and the client told; or, if its grant is still on
    /// its way, once it arrives.
    fn revoked(&mut self, hold_id: u64, message: String) {
        match self.locks.unhold(hold_id) {
            Some(held) => {
                self.broker
                    .metrics
                    .hold_ended(held.kind, held.since.elapsed(), true);
                self.tell_revoked(hold_id, message);
            }
            None if !self.locks.pending.is_empty()
                && !self.locks.just_released.contains(&hold_id)
                && self.locks.early_revoked.len() < self.broker.limits.max_pending as usize =>
            {
                self.locks.early_revoked.insert(hold_id, message);
            }
            // Released meanwhile: nothing to tell.
            None => {}
        }
    }

    /// Tells the client hold `hold_id` is gone (`message`: why). A client
    /// of before protocol version 4 cannot read the event, and must not
    /// go on believing it holds the lock: its session ends (`holds_lost`;
    /// its other holds are released as abandoned).
    fn tell_revoked(&mut self, hold_id: u64, message: String) {
        if self.version >= 4 {
            self.event(Event::Revoked { hold_id, message });
        } else if self.lost.is_none() {
            self.lost = Some(ErrorInfo::new(
                ErrorCode::HoldsLost,
                format!(
                    "hold {hold_id} was {message}; a client of protocol version {} cannot be told of one hold, so its session ends",
                    self.version
                ),
            ));
        }
    }

    /// Breaks holds of `name` (hold `hold_id` only, if given) of other
    /// sessions, as this session's user may.
    pub(super) fn break_lock(&mut self, id: u64, name: String, hold_id: Option<u64>) {
        let name = match LockName::new(name) {
            Ok(name) => name,
            Err(e) => {
                return self.error(
                    id,
                    ErrorInfo::new(ErrorCode::InvalidName, format!("invalid lock name: {e}")),
                );
            }
        };
        let me = self.peer.info.clone();
        let admin = self
            .broker
            .admin_gid
            .is_some_and(|gid| crate::identity::in_group(&self.groups, me.gid, gid));
        let may = |holder: &lockbroker_proto::SessionInfo| may_break(&me, admin, holder);
        let who = describe_session(&me);
        let message = format!("broken by {who}");
        match self
            .broker
            .backend
            .break_holds(&name, hold_id, &may, &message)
        {
            Ok(hold_ids) => {
                super::warn_of(
                    &self.peer,
                    format_args!(
                        "broke {} hold(s) of {:?} ({hold_ids:?})",
                        hold_ids.len(),
                        name.as_str()
                    ),
                );
                self.respond(id, Response::Broken { hold_ids });
            }
            Err(e) => self.error(id, e),
        }
    }

    /// Someone waits behind hold `hold_id`, which asked to be told: told
    /// now if the session has it, or once its grant arrives.
    fn contended(&mut self, hold_id: u64) {
        if self.locks.holds.contains_key(&hold_id) {
            self.event(Event::Contended { hold_id });
        } else if self.locks.pending_notify > 0
            && !self.locks.just_released.contains(&hold_id)
            && self.locks.early_contended.len() < self.broker.limits.max_pending as usize
        {
            // Early news of a grant on its way: at most one per waiting
            // acquire that asked, kept until none waits.
            self.locks.early_contended.insert(hold_id);
        }
        // Else the hold was released before the news came: nobody is told.
    }

    /// Makes hold `hold_id`'s lease end `lease_ms` from now.
    pub(super) fn extend_lease(&mut self, id: u64, hold_id: u64, lease_ms: u64) {
        let result = (|| {
            if !self.broker.backend.has_leases() {
                return Err(ErrorInfo::new(
                    ErrorCode::Unsupported,
                    "this daemon's backend has no leases",
                ));
            }
            let lease = lease_of(lease_ms)
                .map_err(|why| ErrorInfo::new(ErrorCode::InvalidArgument, why))?;
            if !self.locks.holds.contains_key(&hold_id) {
                return Err(ErrorInfo::new(
                    ErrorCode::UnknownHold,
                    format!("this session has no hold {hold_id} (a lease that ran out ended it)"),
                ));
            }
            let end = Instant::now() + lease;
            if let Some(at) = self.locks.lease_of.insert(hold_id, end) {
                self.locks.lease_ends.remove(&(at, hold_id));
            }
            self.locks.lease_ends.insert((end, hold_id));
            Ok(())
        })();
        match result {
            Ok(()) => self.respond(id, Response::Done),
            Err(e) => self.error(id, e),
        }
    }

    /// Revokes every hold whose lease ends at or before `now`: released as
    /// abandoned, and the client told.
    fn end_leases(&mut self, now: Instant) {
        while let Some(&(at, hold_id)) = self.locks.lease_ends.first() {
            if at > now {
                break;
            }
            self.locks.lease_ends.pop_first();
            let Some(held) = self.locks.unhold(hold_id) else {
                continue;
            };
            let lease = at - held.since;
            self.broker
                .metrics
                .hold_ended(held.kind, held.since.elapsed(), true);
            // Gone either way: revoked now, or broken a moment ago (its
            // notice still on its way, and forgotten then).
            let revoked_now = self
                .broker
                .backend
                .revoke(held.name.as_str(), &self.peer, hold_id);
            let message = format!(
                "the lease of {} ms on {:?} ran out",
                lease.as_millis(),
                held.name.as_str()
            );
            if revoked_now {
                super::warn_of(&self.peer, format_args!("revoked: {message}"));
            }
            self.tell_revoked(hold_id, message);
        }
    }

    /// Times out every waiting acquire whose deadline is at or before
    /// `now`, and ends the leases that have run out.
    pub(super) fn expire(&mut self, now: Instant) {
        self.end_leases(now);
        while let Some(&(at, request_id)) = self.locks.deadlines.first() {
            if at > now {
                break;
            }
            self.locks.deadlines.pop_first();
            let token = self.locks.token();
            if let Some((applied, kind)) = self.withdraw(request_id, token) {
                self.broker.metrics.timed_out(kind);
                self.answer_when(applied, token, vec![(request_id, Response::TimedOut)]);
            }
            // Otherwise the grant won the race and is on its way.
        }
    }

    /// Takes waiting acquire `request_id` out of its queue (under `token`
    /// if the backend applies that later), and says what kind it was;
    /// `None` if it was already granted.
    fn withdraw(&mut self, request_id: u64, token: u64) -> Option<(Applied, LockKind)> {
        let p = self.locks.pending.get(&request_id)?;
        let applied = self
            .broker
            .backend
            .cancel(p.name.as_str(), &self.peer, request_id, token)?;
        let kind = p.kind;
        self.end_pending(request_id);
        Some((applied, kind))
    }

    pub(super) fn cancel(&mut self, id: u64, request_id: u64) {
        let token = self.locks.token();
        if let Some((applied, kind)) = self.withdraw(request_id, token) {
            self.broker.metrics.cancelled(kind);
            let answers = vec![(request_id, Response::Cancelled), (id, Response::Done)];
            self.answer_when(applied, token, answers);
        } else {
            self.error(
                id,
                ErrorInfo::new(
                    ErrorCode::NotPending,
                    format!("no waiting acquire has request id {request_id}"),
                ),
            );
        }
    }

    pub(super) fn release(&mut self, id: u64, hold_id: u64) {
        // The index and the table change together, so a hold is in both or
        // in neither: one answer for a hold this session does not have.
        let token = self.locks.token();
        let released = self.locks.unhold(hold_id).and_then(|held| {
            self.broker
                .metrics
                .hold_ended(held.kind, held.since.elapsed(), false);
            self.broker
                .backend
                .release(held.name.as_str(), &self.peer, hold_id, token)
        });
        match released {
            Some((permits, applied)) => {
                self.answer_when(applied, token, vec![(id, Response::Released { permits })])
            }
            None => self.error(
                id,
                ErrorInfo::new(
                    ErrorCode::UnknownHold,
                    format!("this session has no hold {hold_id}"),
                ),
            ),
        }
    }

    pub(super) fn release_by_name(&mut self, id: u64, name: String, count: u32) {
        let token = self.locks.token();
        let result = (|| {
            let name = LockName::new(name).map_err(|e| {
                ErrorInfo::new(ErrorCode::InvalidName, format!("invalid lock name: {e}"))
            })?;
            if count == 0 {
                return Err(ErrorInfo::new(
                    ErrorCode::InvalidPermits,
                    "a release must name at least one permit",
                ));
            }
            self.broker
                .backend
                .release_count(name.as_str(), &self.peer, count, token)
                .map_err(ErrorInfo::from)
        })();
        match result {
            Ok((ended, applied)) => {
                for hold_id in ended {
                    if let Some(held) = self.locks.unhold(hold_id) {
                        self.broker
                            .metrics
                            .hold_ended(held.kind, held.since.elapsed(), false);
                    }
                }
                let answer = (id, Response::Released { permits: count });
                self.answer_when(applied, token, vec![answer]);
            }
            Err(e) => self.error(id, e),
        }
    }

    /// Starts answering an `Inspect` (empty `start_after`) or
    /// `InspectAfter`; a small listing is answered at once.
    pub(super) fn inspect(&mut self, id: u64, prefix: String, start_after: String, limit: u32) {
        if let Err(e) = lockbroker_proto::validate_prefix(&prefix) {
            return self.error(
                id,
                ErrorInfo::new(ErrorCode::InvalidName, format!("invalid prefix: {e}")),
            );
        }
        let limit = match limit {
            0 => DEFAULT_INSPECT_LIMIT,
            n => n.min(MAX_INSPECT_LIMIT),
        };
        let server = self.broker.server_info();
        self.locks.listing = Some(Listing {
            id,
            prefix,
            after: start_after,
            left: limit as usize,
            frame: frame::InspectionFrame::new(
                id,
                server,
                self.broker.limits.max_frame_len,
                self.out.version(),
            ),
        });
        self.list_step();
    }

    /// Gathers the next chunk of the listing (or asks the backend for it).
    pub(super) fn list_step(&mut self) {
        let token = self.locks.token();
        let Some(l) = &self.locks.listing else {
            return;
        };
        let want = l.left.min(LIST_CHUNK);
        match (self.broker.backend).list(&l.prefix, &l.after, want, &self.peer, token) {
            Some((chunk, more)) => self.listed(chunk, more),
            None => self.locks.listing_token = Some(token),
        }
    }

    /// Encodes a chunk of the listing, and answers once it has all it
    /// asked for, or all there is.
    fn listed(&mut self, chunk: Vec<lockbroker_proto::EntryInfo>, more: bool) {
        let Some(mut l) = self.locks.listing.take() else {
            return;
        };
        l.left = l.left.saturating_sub(chunk.len());
        for entry in &chunk {
            if let Err(e) = l.frame.push(entry) {
                // Gathering the rest would only be thrown away.
                let message = format!("{e}; ask with a narrower prefix or a smaller limit");
                return self.error(l.id, ErrorInfo::new(ErrorCode::ResponseTooLarge, message));
            }
        }
        if let Some(last) = chunk.last() {
            l.after.clone_from(&last.name);
        }
        if more && l.left > 0 {
            self.locks.listing = Some(l);
            return;
        }
        l.frame.finish(more, self.out.queue_encoded());
    }

    /// Says, at warn level, which holds the session abandoned: the first
    /// [`ABANDONED_LOGGED`] by name, and how many more.
    fn log_abandoned(&self) {
        let mut names: Vec<&str> = self.locks.holds.values().map(|h| h.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let more = names.len().saturating_sub(ABANDONED_LOGGED);
        names.truncate(ABANDONED_LOGGED);
        let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        super::warn_of(
            &self.peer,
            format_args!(
                "abandoned: the session ended with {} holds, on {}{more}",
                self.locks.holds.len(),
                names.join(", ")
            ),
        );
    }

    /// Releases everything the session held (as abandoned, unless the
    /// client asked otherwise) and withdraws every wait; says which holds
    /// were abandoned, unless the daemon is `shutting_down`.
    pub(super) fn cleanup(&mut self, shutting_down: bool) {
        let abandon = !self.locks.release_on_close;
        let names: HashSet<&LockName> = self
            .locks
            .holds
            .values()
            .map(|h| &h.name)
            .chain(self.locks.pending.values().map(|p| &p.name))
            .collect();
        for name in names {
            self.broker
                .backend
                .end_session(name.as_str(), &self.peer, abandon);
        }
        self.broker.backend.session_ended(&self.peer, abandon);
        let metrics = &self.broker.metrics;
        for held in self.locks.holds.values() {
            metrics.hold_ended(held.kind, held.since.elapsed(), abandon);
        }
        // At shutdown every session ends holding what it held: not news.
        if abandon && !shutting_down && !self.locks.holds.is_empty() {
            self.log_abandoned();
        }
        for p in self.locks.pending.values() {
            metrics.dequeued(p.kind);
        }
        self.locks.holds.clear();
        self.locks.pending.clear();
        self.locks.deadlines.clear();
    }
}

/// Whether the session `me` (in the admin group if `admin`) may break a
/// hold of `holder`: of its own user, or as root or an admin.
fn may_break(
    me: &lockbroker_proto::SessionInfo,
    admin: bool,
    holder: &lockbroker_proto::SessionInfo,
) -> bool {
    let same_user = match (me.uid, holder.uid) {
        (Some(a), Some(b)) => a == b,
        // Windows: by account name.
        (None, None) => !me.user.is_empty() && me.user == holder.user,
        _ => false,
    };
    admin || me.uid == Some(0) || same_user
}

/// "session 7 (pid 42, uid 1000, \"alice\")": who a session is, for a
/// holder told that it broke its hold.
fn describe_session(info: &lockbroker_proto::SessionInfo) -> String {
    let mut parts = Vec::new();
    if let Some(pid) = info.pid {
        parts.push(format!("pid {pid}"));
    }
    if let Some(uid) = info.uid {
        parts.push(format!("uid {uid}"));
    }
    if !info.user.is_empty() {
        parts.push(format!("{:?}", info.user));
    }
    if !info.client_name.is_empty() {
        parts.push(format!("{:?}", info.client_name));
    }
    match parts.is_empty() {
        true => format!("session {}", info.session_id),
        false => format!("session {} ({})", info.session_id, parts.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use lockbroker_proto::SessionInfo;

    fn of(uid: Option<u32>, user: &str) -> SessionInfo {
        SessionInfo {
            uid,
            user: user.into(),
            ..SessionInfo::default()
        }
    }

    #[test]
    fn a_hold_may_be_broken_by_its_user_root_and_admins_only() {
        let alice = of(Some(1000), "alice");
        let bob = of(Some(1001), "bob");
        let root = of(Some(0), "root");
        assert!(super::may_break(&alice, false, &alice));
        assert!(!super::may_break(&bob, false, &alice));
        assert!(super::may_break(&bob, true, &alice), "an admin");
        assert!(super::may_break(&root, false, &alice));
        assert!(!super::may_break(&alice, false, &root));
        // Windows: no uids, by account; an unknown account is nobody's.
        let win = of(None, "HOST\\alice");
        assert!(super::may_break(&win, false, &of(None, "HOST\\alice")));
        assert!(!super::may_break(&win, false, &of(None, "HOST\\bob")));
        assert!(!super::may_break(&of(None, ""), false, &of(None, "")));
        assert!(!super::may_break(&of(None, "x"), false, &of(Some(5), "x")));
    }

    #[test]
    fn a_session_is_described_by_what_is_known_of_it() {
        let info = SessionInfo {
            session_id: 7,
            pid: Some(42),
            uid: Some(1000),
            user: "alice".into(),
            client_name: "deploy".into(),
            ..SessionInfo::default()
        };
        assert_eq!(
            super::describe_session(&info),
            "session 7 (pid 42, uid 1000, \"alice\", \"deploy\")"
        );
        let bare = SessionInfo {
            session_id: 3,
            ..SessionInfo::default()
        };
        assert_eq!(super::describe_session(&bare), "session 3");
    }
}

//! One session per connection: handshake, request loop, cleanup.
//!
//! A session is a single task. It `select!`s on four things: the peer's next
//! frame, grants the lock table made to it while it waited (sent by whichever
//! session released), the earliest deadline of its waiting acquires, and the
//! shutdown signal. Requests never block the loop — an acquire that must
//! wait is just recorded — so one connection serves many concurrent requests.
//! Answers are encoded into one buffer and written once per batch.
//!
//! An acquire ends exactly once. The table decides, under the entry's lock,
//! whether a waiter is granted or removed; a timeout or cancel that finds its
//! waiter already gone knows the grant is on its way and waits for it.
//!
//! An `Inspect` or `InspectAfter` is gathered [`LIST_CHUNK`] entries per
//! turn of the loop, yielding to the runtime between turns, so a listing of
//! any size never holds up the other sessions for long; the session reads
//! no further request until it is answered.
//!
//! What a session keeps is bounded whatever it does: holds and waits by its
//! limits, answers not yet written by `OUTPUT_HIGH_WATER`, requests held
//! back by `MAX_DEFERRED`, state requests the store has not answered by
//! `max_pending` and [`STATE_INFLIGHT_BYTES`] (past either, the session
//! stops reading until the store catches up), and its indexes give back
//! their room once mostly empty.
//!
//! When the loop ends, for any reason, every name the session held or waited
//! on is handed to [`LockTable::end_session`](crate::lock_table::LockTable::end_session); that also catches grants made
//! to it that it never read.

mod state_requests;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use lockbroker_proto::io::FrameReader;
use lockbroker_proto::{
    ClientMessage, ErrorCode, ErrorInfo, Event, FrameError, Grant, Limits, LockName, MAGIC,
    PROTOCOL_VERSION, Request, Response, ServerMessage, SessionInfo, Welcome, frame,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::state::{Change, Completion};

use crate::config::{DEFAULT_INSPECT_LIMIT, MAX_INSPECT_LIMIT};
use crate::lock_table::{AcquireOutcome, AcquireSpec, Peer, deliver};
use crate::server::Broker;
use crate::shutdown::Shutdown;
use crate::transport::PeerCred;

/// Runs one connection to completion.
pub async fn run<R, W>(
    reader: R,
    mut writer: W,
    cred: PeerCred,
    broker: Arc<Broker>,
    mut shutdown: Shutdown,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limits = broker.limits;
    let mut reader = FrameReader::new(reader, limits.max_frame_len);
    let hello = tokio::select! {
        hello = tokio::time::timeout(limits.handshake_timeout, reader.read_message()) => hello,
        _ = shutdown.recv() => return,
    };
    let client_name = match handshake(hello) {
        Ok(name) => name,
        Err(Some(fatal)) => {
            let _ = write_fatal(&mut writer, fatal, limits.max_frame_len).await;
            return;
        }
        Err(None) => return,
    };
    let session_id = broker.next_session_id();
    let (peer, grants) = Peer::new(SessionInfo {
        session_id,
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        client_name,
    });
    let _open = broker.session_opened();
    tracing::debug!(session_id, pid = ?cred.pid, uid = ?cred.uid, "session started");
    let (completions_tx, mut completions) = mpsc::unbounded_channel();
    let mut session = Session {
        broker: Arc::clone(&broker),
        peer,
        holds: HashMap::new(),
        pending: HashMap::new(),
        deadlines: BTreeSet::new(),
        out: Vec::new(),
        completions_tx,
        watches: HashMap::new(),
        watches_starting: HashMap::new(),
        changes: None,
        guarded: HashSet::new(),
        deferred: VecDeque::new(),
        state_inflight: HashMap::new(),
        state_inflight_bytes: 0,
        listing: None,
        release_on_close: false,
    };
    session.answer(ServerMessage::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        server_version: crate::VERSION.to_owned(),
        session_id,
        limits: Limits {
            max_frame_len: limits.max_frame_len,
            max_pending: limits.max_pending,
            max_holds: limits.max_holds,
        },
    }));
    let end = session
        .serve(
            &mut reader,
            &mut writer,
            grants,
            &mut completions,
            &mut shutdown,
        )
        .await;
    match &end {
        End::Fatal(e) => {
            tracing::debug!(session_id, code = %e.code, "session ended: {}", e.message)
        }
        End::Io(e) => tracing::debug!(session_id, "session ended: {e}"),
        End::PeerClosed | End::Shutdown => tracing::debug!(session_id, ?end, "session ended"),
    }
    session.finish_guarded_writes(&mut completions).await;
    session.cleanup();
}

/// Checks the first frame; `Err(Some)` is a fatal error to send, `Err(None)`
/// a connection to drop silently.
fn handshake(
    hello: Result<Result<Option<ClientMessage>, FrameError>, tokio::time::error::Elapsed>,
) -> Result<String, Option<ErrorInfo>> {
    let fatal = |code, msg: String| Err(Some(ErrorInfo::new(code, msg)));
    let hello = match hello {
        Err(_elapsed) => {
            return fatal(
                ErrorCode::HandshakeRequired,
                "no Hello within the handshake timeout".into(),
            );
        }
        Ok(Err(e)) => return Err(frame_fatal(&e)),
        Ok(Ok(None)) => return Err(None),
        Ok(Ok(Some(ClientMessage::Request { .. }))) => {
            return fatal(
                ErrorCode::HandshakeRequired,
                "the first frame must be a Hello".into(),
            );
        }
        Ok(Ok(Some(ClientMessage::Hello(hello)))) => hello,
    };
    if hello.magic != MAGIC {
        return fatal(
            ErrorCode::BadMagic,
            format!(
                "bad magic {:#010x}, expected {MAGIC:#010x}: not a lockbroker client",
                hello.magic
            ),
        );
    }
    if hello.version != PROTOCOL_VERSION {
        return fatal(
            ErrorCode::UnsupportedVersion,
            format!(
                "client speaks protocol version {}; this daemon speaks version {PROTOCOL_VERSION}",
                hello.version
            ),
        );
    }
    if let Err(e) = lockbroker_proto::validate_prefix(&hello.client_name) {
        return fatal(
            ErrorCode::InvalidArgument,
            format!("invalid client name: {e}"),
        );
    }
    Ok(hello.client_name)
}

/// The fatal error to send for a frame that could not be read, if any.
fn frame_fatal(e: &FrameError) -> Option<ErrorInfo> {
    match e {
        FrameError::TooLarge { .. } => {
            Some(ErrorInfo::new(ErrorCode::FrameTooLarge, e.to_string()))
        }
        FrameError::Malformed(_) => Some(ErrorInfo::new(ErrorCode::Malformed, e.to_string())),
        FrameError::Truncated { .. } | FrameError::Io(_) => None,
    }
}

async fn write_fatal<W: AsyncWrite + Unpin>(
    writer: &mut W,
    error: ErrorInfo,
    max_frame_len: u32,
) -> std::io::Result<()> {
    tracing::debug!(code = %error.code, message = %error.message, "closing connection");
    let mut buf = Vec::new();
    if frame::encode(&ServerMessage::Fatal(error), max_frame_len, &mut buf).is_ok() {
        writer.write_all(&buf).await?;
        writer.flush().await?;
    }
    writer.shutdown().await
}

/// Stop reading requests while this many answer bytes wait to be written.
const OUTPUT_HIGH_WATER: usize = 1 << 20;

/// Stop reading requests while this many wait behind a held-back release.
const MAX_DEFERRED: usize = 4096;

/// Output buffer capacity kept between bursts.
const OUTPUT_KEEP_CAPACITY: usize = 16 * 1024;

/// Stop reading requests while state values of this many bytes wait for
/// the store (a durable store commits each write to disk, and a client can
/// send faster than that).
pub const STATE_INFLIGHT_BYTES: usize = 4 * 1024 * 1024;

/// Entries a listing gathers per turn of the loop: a few hundred
/// microseconds of work at most, so others are served between turns.
pub const LIST_CHUNK: usize = 128;

/// A hash index with this many slots or more gives back its room when it
/// is less than a quarter full.
const INDEX_KEEP_CAPACITY: usize = 64;

/// Shrinks `map` once mostly empty, so a session that held many names
/// does not keep their room; halving at a quarter full keeps it amortised.
fn shrink_index<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() >= INDEX_KEEP_CAPACITY && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// Why a session's loop ended.
#[derive(Debug)]
enum End {
    /// The peer closed the connection.
    PeerClosed,
    /// The peer sent something that ends the connection.
    Fatal(ErrorInfo),
    /// Reading or writing failed.
    Io(String),
    /// The daemon is shutting down.
    Shutdown,
}

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

/// A waiting acquire.
#[derive(Debug)]
struct Pending {
    name: LockName,
    deadline: Option<Instant>,
}

struct Session {
    broker: Arc<Broker>,
    peer: Arc<Peer>,
    /// hold id → name, for every hold the session has.
    holds: HashMap<u64, LockName>,
    /// request id → waiting acquire.
    pending: HashMap<u64, Pending>,
    /// (deadline, request id) of waiting acquires with a timeout.
    deadlines: BTreeSet<(Instant, u64)>,
    /// Encoded frames not yet written.
    out: Vec<u8>,
    /// Where the state store sends this session's answers.
    completions_tx: mpsc::UnboundedSender<Box<Completion>>,
    /// Active watches by watch id (the `StateWatch` request id).
    watches: HashMap<u64, state_requests::Watch>,
    /// Watches the store has not confirmed yet.
    watches_starting: HashMap<u64, state_requests::Watch>,
    /// Every change the store publishes, once the session watches.
    changes: Option<broadcast::Receiver<Arc<Change>>>,
    /// Request ids of guarded writes the store has not answered yet. While
    /// there are any, releases wait in `deferred`, so a guarded write is
    /// applied only while its hold is held.
    guarded: HashSet<u64>,
    /// Requests held back, in order, behind a release that waits for the
    /// guarded writes before it.
    deferred: VecDeque<(u64, Request)>,
    /// Request ids of state requests the store has not answered yet, with
    /// the bytes of value each carries.
    state_inflight: HashMap<u64, usize>,
    /// Their sum.
    state_inflight_bytes: usize,
    /// The listing being gathered, if any.
    listing: Option<Listing>,
    /// The client asked that its holds end as released, not abandoned,
    /// when the connection closes (`Request::ReleaseOnClose`).
    release_on_close: bool,
}

impl Session {
    fn id(&self) -> u64 {
        self.peer.id()
    }

    /// Whether to read no further request for now: one waits for something
    /// the session is still doing, and reading on would only pile up.
    fn paused(&self) -> bool {
        self.deferred.len() >= MAX_DEFERRED
            || self.listing.is_some()
            || self.state_inflight.len() >= self.broker.limits.max_pending as usize
            || self.state_inflight_bytes >= STATE_INFLIGHT_BYTES
    }

    async fn serve<R, W>(
        &mut self,
        reader: &mut FrameReader<R>,
        writer: &mut W,
        mut grants: mpsc::UnboundedReceiver<(u64, Grant)>,
        completions: &mut mpsc::UnboundedReceiver<Box<Completion>>,
        shutdown: &mut Shutdown,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        // Bytes of `out` already written.
        let mut written = 0;
        loop {
            // Grants made by this session's own releases join the batch.
            while let Ok((request_id, grant)) = grants.try_recv() {
                self.granted_while_waiting(request_id, grant);
            }
            let next = self.deadlines.first().map(|(at, _)| *at);
            if next != armed {
                if let Some(at) = next {
                    timer.as_mut().reset(at);
                }
                armed = next;
            }
            // Reading and writing go on together, so neither side can block
            // the other; reading pauses while too much output is queued,
            // which pushes back on a peer that does not read its answers.
            let backlog = self.out.len() - written;
            tokio::select! {
                biased;
                _ = shutdown.recv() => {
                    self.event(Event::ShuttingDown);
                    let _ = writer.write_all(&self.out[written..]).await;
                    return End::Shutdown;
                }
                grant = grants.recv() => {
                    // The sender lives in `self.peer`, so this never ends.
                    if let Some((request_id, grant)) = grant {
                        self.granted_while_waiting(request_id, grant);
                    }
                }
                done = completions.recv() => {
                    // The sender lives in `self`, so this never ends.
                    if let Some(done) = done {
                        self.completed(*done);
                    }
                }
                // Changes wait while a watch is being set up (it decides
                // which changes are the new watch's) or output backs up
                // (a slow watcher then lags instead of growing this buffer).
                change = recv_change(&mut self.changes),
                    if self.changes.is_some() && self.watches_starting.is_empty() && backlog < OUTPUT_HIGH_WATER => {
                    self.changed(change);
                }
                () = &mut timer, if armed.is_some() => {
                    self.expire(Instant::now());
                }
                // One chunk of a listing per turn; yield_now lets every
                // other ready task run first.
                () = tokio::task::yield_now(), if self.listing.is_some() => {
                    self.list_step();
                    if self.listing.is_none() {
                        self.run_deferred();
                    }
                }
                n = writer.write(&self.out[written..]), if backlog > 0 => match n {
                    Ok(0) => return End::Io("the peer stopped reading".into()),
                    Ok(n) => {
                        written += n;
                        if written == self.out.len() {
                            self.out.clear();
                            written = 0;
                            // A burst's buffer is not kept by an idle session.
                            if self.out.capacity() > OUTPUT_KEEP_CAPACITY {
                                self.out.shrink_to(OUTPUT_KEEP_CAPACITY);
                            }
                        }
                    }
                    Err(e) => return End::Io(e.to_string()),
                },
                msg = reader.read_message::<ClientMessage>(),
                    if backlog < OUTPUT_HIGH_WATER && !self.paused() => {
                    let mut next = msg;
                    // Answer everything already buffered before writing.
                    loop {
                        match next {
                            Ok(Some(msg)) => {
                                if let Err(fatal) = self.message(msg) {
                                    let _ = writer.write_all(&self.out[written..]).await;
                                    self.out.clear();
                                    return self.fatal(writer, fatal).await;
                                }
                            }
                            Ok(None) => return End::PeerClosed,
                            Err(e) => return match frame_fatal(&e) {
                                Some(fatal) => {
                                    let _ = writer.write_all(&self.out[written..]).await;
                                    self.out.clear();
                                    self.fatal(writer, fatal).await
                                }
                                None => End::Io(e.to_string()),
                            },
                        }
                        if self.paused() {
                            break;
                        }
                        next = match reader.try_next() {
                            Ok(None) => break,
                            other => other,
                        };
                    }
                }
            }
        }
    }

    /// Sends a fatal error (after any answers already written).
    async fn fatal<W: AsyncWrite + Unpin>(&mut self, writer: &mut W, error: ErrorInfo) -> End {
        let _ = write_fatal(writer, error.clone(), self.broker.limits.max_frame_len).await;
        End::Fatal(error)
    }

    fn answer(&mut self, msg: ServerMessage) {
        let max = self.broker.limits.max_frame_len;
        if let Err(e) = frame::encode(&msg, max, &mut self.out) {
            // Only a response can grow past the limit (an inspection).
            let ServerMessage::Response { id, .. } = msg else {
                tracing::error!(error = %e, "could not encode a message");
                return;
            };
            let error = ErrorInfo::new(
                ErrorCode::ResponseTooLarge,
                format!("{e}; ask with a narrower prefix or a smaller limit"),
            );
            let msg = ServerMessage::Response {
                id,
                response: Response::Error(error),
            };
            frame::encode(&msg, max, &mut self.out).expect("an error response fits any frame");
        }
    }

    fn respond(&mut self, id: u64, response: Response) {
        self.answer(ServerMessage::Response { id, response });
    }

    fn error(&mut self, id: u64, error: ErrorInfo) {
        self.respond(id, Response::Error(error));
    }

    fn event(&mut self, event: Event) {
        self.answer(ServerMessage::Event(event));
    }

    /// Handles one message; `Err` ends the connection.
    fn message(&mut self, msg: ClientMessage) -> Result<(), ErrorInfo> {
        match msg {
            ClientMessage::Hello(_) => Err(ErrorInfo::new(
                ErrorCode::UnexpectedHello,
                "Hello may only be the first frame",
            )),
            ClientMessage::Request { id, request } => {
                // Requests are carried out in the order they were read: once
                // one waits (a release behind a guarded write), so do all
                // after it.
                if !self.deferred.is_empty()
                    || self.listing.is_some()
                    || self.must_wait_for_guarded_writes(&request)
                {
                    self.deferred.push_back((id, request));
                    return Ok(());
                }
                self.dispatch(id, request);
                Ok(())
            }
        }
    }

    fn dispatch(&mut self, id: u64, request: Request) {
        match request {
            Request::Acquire(a) => self.acquire(id, a),
            Request::Cancel { request_id } => self.cancel(id, request_id),
            Request::Release { hold_id } => self.release(id, hold_id),
            Request::ReleaseByName { name, count } => self.release_by_name(id, name, count),
            Request::Inspect { prefix, limit } => self.inspect(id, prefix, String::new(), limit),
            Request::InspectAfter {
                prefix,
                start_after,
                limit,
            } => self.inspect(id, prefix, start_after, limit),
            Request::Ping => self.respond(id, Response::Pong),
            Request::ReleaseOnClose => {
                self.release_on_close = true;
                self.respond(id, Response::Done);
            }
            other => self.state_request(id, other),
        }
    }

    /// Whether `id` names a request still being answered: a waiting
    /// acquire, a state request the store has not answered, or a watch.
    fn id_in_use(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
            || self.state_inflight.contains_key(&id)
            || self.watches.contains_key(&id)
            || self.watches_starting.contains_key(&id)
    }

    fn acquire(&mut self, id: u64, req: lockbroker_proto::Acquire) {
        if let Err(e) = self.try_acquire(id, req) {
            self.error(id, e);
        }
    }

    fn try_acquire(&mut self, id: u64, req: lockbroker_proto::Acquire) -> Result<(), ErrorInfo> {
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
        let limits = self.broker.limits;
        if self.holds.len() + self.pending.len() >= limits.max_holds as usize {
            return Err(ErrorInfo::new(
                ErrorCode::TooManyHolds,
                format!(
                    "this session already has {} holds and waiting acquires (limit {})",
                    self.holds.len() + self.pending.len(),
                    limits.max_holds
                ),
            ));
        }
        let at_pending_limit = self.pending.len() >= limits.max_pending as usize;
        let is_try = !spec.may_wait;
        spec.may_wait &= !at_pending_limit;
        match self.broker.table.acquire(&name, &self.peer, id, &spec)? {
            AcquireOutcome::Granted(grant) => {
                self.holds.insert(grant.hold_id, name);
                self.respond(id, Response::Granted(grant));
            }
            AcquireOutcome::WouldBlock if is_try => self.respond(id, Response::TimedOut),
            AcquireOutcome::WouldBlock => {
                return Err(ErrorInfo::new(
                    ErrorCode::TooManyPending,
                    format!(
                        "this session already has {} acquires waiting (limit {})",
                        self.pending.len(),
                        limits.max_pending
                    ),
                ));
            }
            AcquireOutcome::Queued => {
                // A deadline too far to represent is no deadline.
                let deadline = req.timeout_ms.and_then(|ms| {
                    Instant::now().checked_add(std::time::Duration::from_millis(ms))
                });
                if let Some(at) = deadline {
                    self.deadlines.insert((at, id));
                }
                self.pending.insert(id, Pending { name, deadline });
            }
        }
        Ok(())
    }

    /// A grant the table made while this session waited.
    fn granted_while_waiting(&mut self, request_id: u64, grant: Grant) {
        let Some(p) = self.pending.remove(&request_id) else {
            // Cannot happen: a waiter stays pending until its grant arrives.
            tracing::error!(request_id, "grant for an acquire that is not pending");
            return;
        };
        if let Some(at) = p.deadline {
            self.deadlines.remove(&(at, request_id));
        }
        self.holds.insert(grant.hold_id, p.name);
        self.respond(request_id, Response::Granted(grant));
        shrink_index(&mut self.pending);
    }

    /// Times out every waiting acquire whose deadline is at or before `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, request_id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if self.withdraw(request_id) {
                self.respond(request_id, Response::TimedOut);
            }
            // Otherwise the grant won the race and is on its way.
        }
    }

    /// Takes waiting acquire `request_id` out of its queue; false if it was
    /// already granted.
    fn withdraw(&mut self, request_id: u64) -> bool {
        let Some(p) = self.pending.get(&request_id) else {
            return false;
        };
        let (removed, deliveries) =
            self.broker
                .table
                .cancel(p.name.as_str(), self.id(), request_id);
        deliver(deliveries);
        if removed {
            if let Some(p) = self.pending.remove(&request_id) {
                if let Some(at) = p.deadline {
                    self.deadlines.remove(&(at, request_id));
                }
            }
            shrink_index(&mut self.pending);
        }
        removed
    }

    fn cancel(&mut self, id: u64, request_id: u64) {
        if self.withdraw(request_id) {
            self.respond(request_id, Response::Cancelled);
            self.respond(id, Response::Done);
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

    fn release(&mut self, id: u64, hold_id: u64) {
        let unknown = || {
            ErrorInfo::new(
                ErrorCode::UnknownHold,
                format!("this session has no hold {hold_id}"),
            )
        };
        let Some(name) = self.holds.remove(&hold_id) else {
            return self.error(id, unknown());
        };
        shrink_index(&mut self.holds);
        let (permits, deliveries) = self.broker.table.release(name.as_str(), self.id(), hold_id);
        deliver(deliveries);
        match permits {
            Some(permits) => self.respond(id, Response::Released { permits }),
            None => {
                tracing::error!(hold_id, "hold known to the session but not to the table");
                self.error(id, unknown());
            }
        }
    }

    fn release_by_name(&mut self, id: u64, name: String, count: u32) {
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
                .table
                .release_count(name.as_str(), self.id(), count)
        })();
        match result {
            Ok(released) => {
                for hold_id in released.ended {
                    self.holds.remove(&hold_id);
                }
                shrink_index(&mut self.holds);
                deliver(released.deliveries);
                self.respond(id, Response::Released { permits: count });
            }
            Err(e) => self.error(id, e),
        }
    }

    /// Starts answering an `Inspect` (empty `start_after`) or
    /// `InspectAfter`; a small listing is answered at once.
    fn inspect(&mut self, id: u64, prefix: String, start_after: String, limit: u32) {
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
        self.listing = Some(Listing {
            id,
            prefix,
            after: start_after,
            left: limit as usize,
            frame: frame::InspectionFrame::new(id, server, self.broker.limits.max_frame_len),
        });
        self.list_step();
    }

    /// Gathers and encodes the next chunk of the listing, and answers once
    /// it has all it asked for, or all there is.
    fn list_step(&mut self) {
        let Some(mut l) = self.listing.take() else {
            return;
        };
        let table = &self.broker.table;
        let (chunk, more) = table.list(&l.prefix, &l.after, l.left.min(LIST_CHUNK));
        l.left -= chunk.len();
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
            self.listing = Some(l);
            return;
        }
        l.frame.finish(more, &mut self.out);
    }

    /// Releases everything the session held (as abandoned, unless the
    /// client asked otherwise) and withdraws every wait.
    fn cleanup(&mut self) {
        let abandon = !self.release_on_close;
        let names: HashSet<&LockName> = self
            .holds
            .values()
            .chain(self.pending.values().map(|p| &p.name))
            .collect();
        for name in names {
            deliver(
                self.broker
                    .table
                    .end_session(name.as_str(), self.id(), abandon),
            );
        }
        self.holds.clear();
        self.pending.clear();
        self.deadlines.clear();
    }
}

/// The next change for a session that watches; pends forever otherwise (the
/// select guard keeps it from being polled then).
async fn recv_change(
    changes: &mut Option<broadcast::Receiver<Arc<Change>>>,
) -> Result<Arc<Change>, broadcast::error::RecvError> {
    match changes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session that held many names and released them gives the room of
    /// its hold index back, a little at a time.
    #[test]
    fn an_index_emptied_gives_back_its_room() {
        let mut holds: HashMap<u64, u64> = (0..65_536).map(|i| (i, i)).collect();
        let full = holds.capacity();
        for i in 10..65_536 {
            holds.remove(&i);
            shrink_index(&mut holds);
        }
        assert!(
            holds.capacity() < 100,
            "{} of {full} slots kept",
            holds.capacity()
        );
        assert_eq!(holds.len(), 10);
        // A small index is left alone.
        let mut small: HashMap<u64, u64> = HashMap::with_capacity(50);
        small.insert(1, 1);
        shrink_index(&mut small);
        assert!(small.capacity() >= 50);
    }
}

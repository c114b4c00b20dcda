//! One session per connection: the handshake and the I/O loop. What the
//! requests do is in two parts, each with its own fields: `locks`
//! (acquire, release, cancel, inspect, the cleanup at the end) and
//! `state_requests` (the store's requests, watches, guarded writes).
//!
//! A session is a single task. It `select!`s on the peer's next frame, what
//! the backend tells it later (grants made while it waited, sent by
//! whichever session released or by the etcd backend; changes applied;
//! listing pages), the state store's answers and changes, the earliest
//! deadline of its waiting acquires, and the shutdown signal. Requests never block the loop — an acquire that must
//! wait is just recorded — so one connection serves many concurrent requests.
//! Answers are encoded into one buffer and written once per batch.
//!
//! An acquire ends exactly once. The table decides, under the entry's lock,
//! whether a waiter is granted or removed; a timeout or cancel that finds its
//! waiter already gone knows the grant is on its way and waits for it.
//!
//! An `Inspect` or `InspectAfter` is gathered `LIST_CHUNK` entries per
//! turn of the loop, yielding to the runtime between turns, so a listing of
//! any size never holds up the other sessions for long; the session reads
//! no further request until it is answered.
//!
//! What a session keeps is bounded whatever it does: holds and waits by its
//! limits, answers not yet written by `OUTPUT_HIGH_WATER`, requests held
//! back by `MAX_DEFERRED`, state requests the store has not answered by
//! `max_pending` and `STATE_INFLIGHT_BYTES` (past either, the session
//! stops reading until the store catches up), and its indexes give back
//! their room once mostly empty.
//!
//! When the loop ends, for any reason, every name the session held or waited
//! on is handed to the backend's `end_session`, then the session to its
//! `session_ended`; that also catches grants made to it that it never read.

mod locks;
mod state_requests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use lockbroker_proto::io::{FrameReader, FrameWriter};
use lockbroker_proto::{
    ClientMessage, ErrorCode, ErrorInfo, Event, FrameError, Limits, MAGIC, OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION, Request, Response, ServerMessage, SessionInfo, Welcome,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::state::Completion;

use crate::broker::Broker;
use crate::direct::{DirectFd, Gated};
use crate::lock_table::{GrantsReceiver, Peer};
use crate::shutdown::Shutdown;
use crate::transport::PeerCred;
use locks::Options;

/// Runs one connection to completion.
pub async fn run<R, W>(
    reader: R,
    writer: W,
    cred: PeerCred,
    broker: Arc<Broker>,
    mut shutdown: Shutdown,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + DirectFd,
{
    let limits = broker.limits;
    let mut reader = FrameReader::new(reader, limits.max_frame_len);
    // Other sessions may write this one's grants into its socket
    // (`direct`), between its own frames.
    let (writer, gate) = Gated::new(writer, broker.ending());
    let mut out = FrameWriter::new(writer, limits.max_frame_len, OUTPUT_HIGH_WATER);
    let hello = tokio::select! {
        hello = tokio::time::timeout(limits.handshake_timeout, reader.read_message()) => hello,
        _ = shutdown.recv() => return,
    };
    let (version, client_name) = match handshake(hello) {
        Ok(agreed) => agreed,
        Err(Some(fatal)) => {
            broker.metrics.refused(fatal.code);
            let _ = write_fatal(&mut out, fatal).await;
            return;
        }
        Err(None) => return,
    };
    out.set_version(version);
    reader.set_version(version);
    let session_id = broker.next_session_id();
    let user = match (cred.user, cred.uid) {
        (Some(user), _) => user,
        (None, Some(uid)) => broker.accounts.name(uid).await.to_string(),
        (None, None) => String::new(),
    };
    let (peer, grants) = Peer::with_gate(
        SessionInfo {
            session_id,
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
            client_name,
            host: broker.host.clone(),
            user,
        },
        Some(gate),
    );
    let _open = broker.session_opened();
    tracing::debug!(session_id, pid = ?cred.pid, uid = ?cred.uid, "session started");
    let (completions_tx, mut completions) = mpsc::unbounded_channel();
    let mut session = Session {
        broker: Arc::clone(&broker),
        peer,
        out,
        deferred: VecDeque::new(),
        locks: locks::Locks::default(),
        state: state_requests::StateRequests::new(completions_tx),
        lost: None,
        version,
        groups: cred.groups.clone(),
    };
    session.answer(ServerMessage::Welcome(Welcome {
        version,
        server_version: crate::VERSION.to_owned(),
        session_id,
        limits: Limits {
            max_frame_len: limits.max_frame_len,
            max_pending: limits.max_pending,
            max_holds: limits.max_holds,
        },
    }));
    let end = session
        .serve(&mut reader, grants, &mut completions, &mut shutdown)
        .await;
    // Grants made from now on are caught by the cleanup, not written.
    session.peer.close_gate();
    match &end {
        End::Fatal(e) => {
            tracing::debug!(session_id, code = %e.code, "session ended: {}", e.message)
        }
        End::Io(e) => tracing::debug!(session_id, "session ended: {e}"),
        End::PeerClosed | End::Shutdown => tracing::debug!(session_id, ?end, "session ended"),
    }
    session.finish_guarded_writes(&mut completions).await;
    session.cleanup(matches!(end, End::Shutdown));
}

/// Checks the first frame: the version the session speaks and its client
/// name, or `Err(Some)`, a fatal error to send, or `Err(None)`, a
/// connection to drop silently.
fn handshake(
    hello: Result<Result<Option<ClientMessage>, FrameError>, tokio::time::error::Elapsed>,
) -> Result<(u16, String), Option<ErrorInfo>> {
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
    if !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
        return fatal(
            ErrorCode::UnsupportedVersion,
            format!(
                "client speaks protocol version {}; this daemon speaks versions {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
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
    Ok((hello.version, hello.client_name))
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

/// Polls `f` once, without a waker to call: its output if it is ready.
/// For cancel-safe futures only (the future is dropped if it is not).
fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Sends `error` after the answers already queued, and closes.
async fn write_fatal<W: AsyncWrite + Unpin>(
    out: &mut FrameWriter<W>,
    error: ErrorInfo,
) -> std::io::Result<()> {
    tracing::debug!(code = %error.code, message = %error.message, "closing connection");
    // A fatal error is small; one that did not fit would just not be sent.
    let _ = out.encode(&ServerMessage::Fatal(error));
    out.shutdown().await
}

/// Says `what` at warn level with who the session is: what an operator
/// chases (a limit, a quota, an abandonment) comes with whom to ask.
fn warn_of(peer: &Peer, what: std::fmt::Arguments<'_>) {
    let who = &peer.info;
    tracing::warn!(
        session_id = who.session_id,
        pid = who.pid,
        uid = who.uid,
        user = %who.user,
        client = %who.client_name,
        "{what}"
    );
}

/// Stop reading requests while this many answer bytes wait to be written.
const OUTPUT_HIGH_WATER: usize = 1 << 20;

/// How long a session whose peer can no longer read waits for each of the
/// requests it sent before (which a peer that closed has all sent: its
/// end follows at once).
const LAST_REQUESTS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Stop reading requests while this many wait behind a held-back release.
const MAX_DEFERRED: usize = 4096;

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

/// One connection's session: what the I/O loop needs, and the lock and
/// state parts, each with its own fields.
struct Session<W> {
    broker: Arc<Broker>,
    peer: Arc<Peer>,
    /// Answers and events, written in batches.
    out: FrameWriter<W>,
    /// Requests held back, in order, behind a release that waits for the
    /// guarded writes before it, a listing being gathered, or a change the
    /// backend has yet to apply.
    deferred: VecDeque<(u64, Request)>,
    /// Holds, waits and listings (`locks`).
    locks: locks::Locks,
    /// Requests to the store, watches and guarded writes
    /// (`state_requests`).
    state: state_requests::StateRequests,
    /// The backend lost the session's holds: the session ends with this.
    lost: Option<ErrorInfo>,
    /// The protocol version the handshake agreed.
    version: u16,
    /// The peer's supplementary groups, as its connection recorded them.
    groups: Vec<u32>,
}

impl<W: AsyncWrite + Unpin> Session<W> {
    fn id(&self) -> u64 {
        self.peer.id()
    }

    /// Whether to read no further request for now: one waits for something
    /// the session is still doing, and reading on would only pile up.
    fn paused(&self) -> bool {
        self.deferred.len() >= MAX_DEFERRED
            || self.locks.is_listing()
            || self
                .state
                .backed_up(self.broker.limits.max_pending as usize)
    }

    async fn serve<R>(
        &mut self,
        reader: &mut FrameReader<R>,
        mut grants: GrantsReceiver,
        completions: &mut mpsc::UnboundedReceiver<Box<Completion>>,
        shutdown: &mut Shutdown,
    ) -> End
    where
        R: AsyncRead + Unpin,
    {
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        // One future for the whole loop, not one registered and dropped per
        // turn.
        let stop = shutdown.recv();
        tokio::pin!(stop);
        let mut armed: Option<Instant> = None;
        loop {
            // Grants made by this session's own releases join the batch.
            while let Ok(notice) = grants.try_recv() {
                self.notice(notice);
            }
            // Every notice of a hold released before this point has come.
            self.locks.forget_released();
            if let Some(lost) = self.lost.take() {
                return self.fatal(lost).await;
            }
            let next = self.locks.next_deadline();
            if next != armed {
                if let Some(at) = next {
                    timer.as_mut().reset(at);
                }
                armed = next;
            }
            // Reading and writing go on together, so neither side can block
            // the other; reading pauses while too much output is queued,
            // which pushes back on a peer that does not read its answers.
            let backlog = self.out.backlog();
            tokio::select! {
                biased;
                () = &mut stop => {
                    // Nothing is granted through the socket after the event.
                    self.peer.close_gate();
                    self.event(Event::ShuttingDown);
                    let _ = self.out.flush().await;
                    return End::Shutdown;
                }
                grant = grants.recv() => {
                    // The sender lives in `self.peer`, so this never ends.
                    if let Some(notice) = grant {
                        self.notice(notice);
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
                change = self.state.next_change(),
                    if self.state.takes_changes() && !self.out.is_full() => {
                    self.changed(change);
                }
                () = &mut timer, if armed.is_some() => {
                    self.expire(Instant::now());
                }
                // One chunk of a listing per turn; yield_now lets every
                // other ready task run first.
                () = tokio::task::yield_now(), if self.locks.can_list() => {
                    self.list_step();
                    if !self.locks.is_listing() {
                        self.run_deferred();
                    }
                }
                // With nothing of its own to write, a flush finishes what
                // another session left of a grant it wrote here.
                written = async {
                    if backlog > 0 {
                        self.out.write_some().await
                    } else {
                        self.out.flush().await
                    }
                }, if backlog > 0 || self.peer.has_spill() => {
                    if let Err(e) = written {
                        self.take_last_requests(reader, &mut grants).await;
                        return End::Io(match e.kind() {
                            std::io::ErrorKind::WriteZero => "the peer stopped reading".into(),
                            _ => e.to_string(),
                        });
                    }
                }
                msg = reader.read_message::<ClientMessage>(),
                    if !self.out.is_full() && !self.paused() => {
                    let mut next = msg;
                    // Answer everything already buffered before writing.
                    loop {
                        match next {
                            Ok(Some(msg)) => {
                                // A grant another session wrote to the peer
                                // may be what this request names: record it
                                // first.
                                self.peer.barrier();
                                while let Ok(notice) = grants.try_recv() {
                                    self.notice(notice);
                                }
                                if let Err(fatal) = self.message(msg) {
                                    return self.fatal(fatal).await;
                                }
                            }
                            Ok(None) => return End::PeerClosed,
                            Err(e) => return match frame_fatal(&e) {
                                Some(fatal) => self.fatal(fatal).await,
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
                    // Answer in the same pass, before the runtime parks
                    // this task: one turn of the loop less per request.
                    if self.out.backlog() > 0
                        && let Some(Err(e)) = poll_once(self.out.write_some())
                    {
                        self.take_last_requests(reader, &mut grants).await;
                        return End::Io(e.to_string());
                    }
                }
            }
        }
    }

    /// The peer can no longer read (a write failed: it closed): carries
    /// out the requests it sent before, already here to be read, with no
    /// answers — so the releases a client sends just before it closes are
    /// releases, and the next holders are not told "abandoned".
    /// A peer that closed only its reading side is not waited for longer
    /// than [`LAST_REQUESTS_WAIT`] between requests.
    async fn take_last_requests<R>(
        &mut self,
        reader: &mut FrameReader<R>,
        grants: &mut GrantsReceiver,
    ) where
        R: AsyncRead + Unpin,
    {
        self.out.discard();
        while let Ok(Ok(Some(msg))) =
            tokio::time::timeout(LAST_REQUESTS_WAIT, reader.read_message::<ClientMessage>()).await
        {
            self.peer.barrier();
            while let Ok(notice) = grants.try_recv() {
                self.notice(notice);
            }
            let done = self.message(msg);
            self.out.discard();
            if done.is_err() || self.paused() {
                break;
            }
        }
    }

    /// Sends a fatal error (after any answers already written).
    async fn fatal(&mut self, error: ErrorInfo) -> End {
        self.broker.metrics.refused(error.code);
        let _ = write_fatal(&mut self.out, error.clone()).await;
        End::Fatal(error)
    }

    fn answer(&mut self, msg: ServerMessage) {
        if let ServerMessage::Response {
            response: Response::Error(e),
            ..
        } = &msg
        {
            self.broker.metrics.refused(e.code);
            // A limit or a quota (4xx) is what an operator raises or
            // chases: say who hit it. The message names the lock or key.
            if (400..500).contains(&e.code.as_u16()) {
                warn_of(
                    &self.peer,
                    format_args!("refused ({}): {}", e.code, e.message),
                );
            }
        }
        if let Err(e) = self.out.encode(&msg) {
            // Only a response can grow past the limit (an inspection).
            let ServerMessage::Response { id, .. } = msg else {
                tracing::error!(error = %e, "could not encode a message");
                return;
            };
            let error = ErrorInfo::new(
                ErrorCode::ResponseTooLarge,
                format!("{e}; ask with a narrower prefix or a smaller limit"),
            );
            self.broker.metrics.refused(error.code);
            let msg = ServerMessage::Response {
                id,
                response: Response::Error(error),
            };
            self.out
                .encode(&msg)
                .expect("an error response fits any frame");
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
                    || self.locks.is_listing()
                    || self.locks.is_applying()
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
        if let Some(acl) = &self.broker.acl
            && let Some((verb, name, prefix)) = crate::acl::access(&request)
            && let Err(refusal) = acl.check(&self.peer.info, &self.groups, verb, name, prefix)
        {
            warn_of(
                &self.peer,
                format_args!("refused (forbidden): {}", refusal.message),
            );
            return self.error(id, refusal);
        }
        match request {
            Request::Acquire(a) => self.acquire(id, a, Options::default()),
            Request::AcquireAs { actor, acquire } => {
                self.acquire(id, acquire, Options::of_actor(actor))
            }
            Request::AcquireWith { acquire, options } => match Options::read(&acquire, options) {
                Ok(options) => self.acquire(id, acquire, options),
                Err(e) => self.error(id, e),
            },
            Request::ExtendLease { hold_id, lease_ms } => self.extend_lease(id, hold_id, lease_ms),
            Request::Break { name, hold_id } => self.break_lock(id, name, hold_id),
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
            Request::Metrics => {
                let text = self.broker.metrics_text();
                self.respond(id, Response::Metrics { text });
            }
            Request::ReleaseOnClose => {
                self.locks.release_on_close();
                self.respond(id, Response::Done);
            }
            other => self.state_request(id, other),
        }
    }

    /// Whether `id` names a request still being answered: a waiting
    /// acquire, a state request the store has not answered, or a watch.
    fn id_in_use(&self, id: u64) -> bool {
        self.locks.is_pending(id) || self.state.uses_id(id)
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

//! The async [`Client`] and the task that owns its connection.
//!
//! A caller writes its own request: it registers a oneshot sender under a
//! fresh id, encodes the request into the connection's buffer and, when
//! nothing else waits to be written, writes it at once, without waking
//! any task (so an uncontended call costs the caller one write and the
//! connection task one read). The connection task reads every answer and
//! routes it to its caller by request id, and writes what a caller could
//! not (a full socket, or a batch behind a write in progress). When the
//! task ends, every pending caller gets [`Error::ConnectionLost`] (their
//! oneshot senders are dropped) and the `lost` flag is raised for guards
//! to see.
//!
//! A caller that stops waiting for an acquire (its future is dropped) sends
//! a `Cancel`; if the grant wins the race anyway, the task sees that nobody
//! wants it and releases the hold at once, so nothing leaks.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use lockbroker_proto::io::{FrameReader, FrameWriter};
use lockbroker_proto::{
    ClientMessage, ErrorInfo, Event, Grant, Inspection, Limits, LockKind, Request, Response,
    ServerMessage, Welcome,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::connector::Actors;
use crate::error::{Error, Result};
use crate::ops::{self, Op};
use crate::transport::{ReadHalf, WriteHalf};

/// A connection to the lockbroker daemon — one session — shared by every
/// clone. Cheap to clone; the connection closes (and the daemon releases
/// everything it held) when the last clone and the last guard are dropped.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// What callers and the connection task share; the task ends once
    /// this `Inner` is dropped (every client and guard is gone).
    conn: Arc<Conn>,
    next_id: AtomicU64,
    welcome: Welcome,
    /// On whose behalf acquires are made.
    actors: Actors,
    /// Raised by the connection task when it ends.
    lost: watch::Receiver<bool>,
    /// The connection's descriptor, for [`Client::connection_fd`].
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    /// The pipe's handle, for [`Client::connection_handle`] (an address,
    /// kept as a number so that the client stays `Send`).
    #[cfg(windows)]
    handle: usize,
}

/// The connection as callers and its task share it.
#[derive(Debug)]
struct Conn {
    io: Mutex<Io>,
    /// Wakes the task: bytes wait to be written, or the clients are gone.
    wake: Notify,
    /// Wakes guards waiting to hear of contention or revocation.
    contention: Notify,
}

/// What is touched under [`Conn`]'s lock.
#[derive(Debug)]
struct Io {
    /// Requests, encoded, and the writing half they go to.
    out: FrameWriter<WriteHalf>,
    /// request id → caller waiting for its answer.
    pending: HashMap<u64, oneshot::Sender<Response>>,
    /// watch id → where its events go.
    watches: HashMap<u64, mpsc::UnboundedSender<Event>>,
    /// Holds granted to this client whose guard has not gone: news of any
    /// other hold (one released before the news came) is ignored, so the
    /// sets below never outgrow the holds.
    live: HashSet<u64>,
    /// Holds told that someone waits behind them (`Event::Contended`,
    /// only ever for holds that asked), until their guard goes.
    contended: HashSet<u64>,
    /// Holds the daemon revoked (`Event::Revoked`), with why, until their
    /// guard goes.
    revoked: HashMap<u64, String>,
    /// The task has ended: nothing more is sent or answered.
    ended: bool,
    /// Every client and guard is gone: the task flushes and ends.
    dropped: bool,
}

impl Conn {
    fn io(&self) -> MutexGuard<'_, Io> {
        // Nothing panics while holding it with `Io` half-changed.
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Io {
    /// Encodes `request`, registering `reply` for its answer; a request
    /// too large for a frame is answered here, as the daemon would.
    fn queue(&mut self, id: u64, request: Request, reply: Option<oneshot::Sender<Response>>) {
        let msg = ClientMessage::Request { id, request };
        match self.out.encode(&msg) {
            Ok(()) => {
                if let Some(reply) = reply {
                    self.pending.insert(id, reply);
                }
            }
            Err(e) => {
                if let Some(reply) = reply {
                    let info = ErrorInfo::new(
                        lockbroker_proto::ErrorCode::FrameTooLarge,
                        format!("request not sent: {e}"),
                    );
                    let _ = reply.send(Response::Error(info));
                }
            }
        }
    }

    /// Writes what it can of the backlog now, without waiting; whether
    /// some is left for the task (or the write failed, which the task
    /// will meet again and end on).
    fn write_now(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        while self.out.backlog() > 0 {
            match std::pin::pin!(self.out.write_some()).poll(&mut cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) | Poll::Pending => return true,
            }
        }
        false
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last client and guard are gone: the task says goodbye by
        // closing, after the last releases are out.
        self.conn.io().dropped = true;
        self.conn.wake.notify_one();
    }
}

impl Client {
    /// Connects with [`Connector`](crate::Connector)'s defaults: the
    /// `LOCKBROKER_SOCKET` variable, else the local scope's socket.
    pub async fn connect() -> Result<Client> {
        crate::Connector::new().connect().await
    }

    pub(crate) fn start(
        reader: FrameReader<ReadHalf>,
        writer: WriteHalf,
        welcome: Welcome,
        actors: Actors,
    ) -> Client {
        #[cfg(unix)]
        let fd = std::os::fd::AsRawFd::as_raw_fd(writer.as_ref());
        #[cfg(windows)]
        let handle = {
            use std::os::windows::io::{AsHandle, AsRawHandle};
            writer.as_handle().as_raw_handle() as usize
        };
        let (lost_tx, lost) = watch::channel(false);
        let conn = Arc::new(Conn {
            io: Mutex::new(Io {
                // No high-water mark: a caller is never held back (its
                // request is encoded at once), and the daemon reads
                // requests as fast as it answers them.
                out: FrameWriter::new(writer, welcome.limits.max_frame_len, usize::MAX),
                pending: HashMap::new(),
                watches: HashMap::new(),
                live: HashSet::new(),
                contended: HashSet::new(),
                revoked: HashMap::new(),
                ended: false,
                dropped: false,
            }),
            wake: Notify::new(),
            contention: Notify::new(),
        });
        let task = Task {
            reader,
            conn: Arc::clone(&conn),
        };
        tokio::spawn(async move {
            let why = task.run().await;
            tracing::debug!(reason = %why, "lockbroker connection ended");
            let _ = lost_tx.send(true);
        });
        Client {
            inner: Arc::new(Inner {
                conn,
                next_id: AtomicU64::new(1),
                welcome,
                actors,
                lost,
                #[cfg(unix)]
                fd,
                #[cfg(windows)]
                handle,
            }),
        }
    }

    /// The connection's file descriptor. It is close-on-exec; a program
    /// that wants child processes to keep this session (and so its holds)
    /// alive after it dies clears that flag in the child, as `lockbroker
    /// lock` does. Valid while the connection is open; never read or write
    /// it directly. Dropping the last clone of the client shuts the socket
    /// down (for every process sharing it), so a program that leaves the
    /// session to its children exits without dropping it.
    #[cfg(unix)]
    pub fn connection_fd(&self) -> std::os::fd::RawFd {
        self.inner.fd
    }

    /// The pipe's handle (Windows), the counterpart of
    /// [`connection_fd`](Client::connection_fd): not inheritable; a
    /// program that wants child processes to keep this session alive after
    /// it dies makes it inheritable for their spawn, as `lockbroker lock`
    /// does. The session ends when every process holding the handle has
    /// closed it. Valid while the client lives; never read or write it.
    #[cfg(windows)]
    pub fn connection_handle(&self) -> std::os::windows::io::RawHandle {
        self.inner.handle as std::os::windows::io::RawHandle
    }

    /// Asks the daemon to end this session's holds as released, not
    /// abandoned, when the connection closes — for a connection that child
    /// processes share and close last.
    pub async fn release_on_close(&self) -> Result<()> {
        self.run(ops::release_on_close()).await
    }

    /// The daemon's greeting.
    pub(crate) fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// On whose behalf acquires are made.
    #[cfg_attr(unix, allow(dead_code))]
    pub(crate) fn actors(&self) -> &Actors {
        &self.inner.actors
    }

    /// This session's id, as `inspect` shows it.
    pub fn session_id(&self) -> u64 {
        self.inner.welcome.session_id
    }

    /// The daemon's software version.
    pub fn server_version(&self) -> &str {
        &self.inner.welcome.server_version
    }

    /// The limits the daemon applies to this session.
    pub fn limits(&self) -> &Limits {
        &self.inner.welcome.limits
    }

    /// Whether the connection is gone (and with it every hold).
    pub fn is_lost(&self) -> bool {
        *self.inner.lost.borrow()
    }

    /// Completes when the connection is lost.
    pub async fn lost(&self) {
        let mut lost = self.inner.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }

    /// Round-trip time of one ping.
    pub async fn ping(&self) -> Result<Duration> {
        let start = Instant::now();
        self.run(ops::ping()).await?;
        Ok(start.elapsed())
    }

    /// The daemon's metrics, in the OpenMetrics text format: what
    /// `lockbrokerd --metrics-listen` serves at `/metrics`. A daemon older
    /// than this request closes the connection
    /// ([`Error::ConnectionLost`](crate::Error::ConnectionLost)).
    pub async fn metrics(&self) -> Result<String> {
        self.run(ops::metrics()).await
    }

    /// Lock entries whose names start with `prefix`, in name order (at most
    /// the daemon's default number of them; see [`Client::inspect_limit`]).
    pub async fn inspect(&self, prefix: &str) -> Result<Inspection> {
        self.inspect_limit(prefix, 0).await
    }

    /// Like [`Client::inspect`], with at most `limit` entries.
    pub async fn inspect_limit(&self, prefix: &str, limit: u32) -> Result<Inspection> {
        self.run(ops::inspect(prefix, "", limit, false)).await
    }

    /// One page of the lock entries whose names start with `prefix` and
    /// come after `start_after` (from the first when it is empty), at most
    /// `limit` of them (0: the daemon's default). When the answer is
    /// `truncated`, more follow: ask again with `start_after` = the name of
    /// its last entry. Pages are small steps for the daemon, so listing a
    /// million names this way never holds up other sessions.
    pub async fn inspect_after(
        &self,
        prefix: &str,
        start_after: &str,
        limit: u32,
    ) -> Result<Inspection> {
        self.run(ops::inspect(prefix, start_after, limit, true))
            .await
    }

    /// Releases `count` permits this session holds on `name`, oldest holds
    /// first (all or nothing). Guards of fully released holds then release
    /// nothing when dropped, and report an error from
    /// [`LockGuard::release`](crate::LockGuard::release).
    pub async fn release_by_name(&self, name: &str, count: u32) -> Result<u32> {
        self.run(ops::release_by_name(name, count)).await
    }

    /// Revokes, from outside, the holds of `name` — hold `hold_id` only, if
    /// given — of whichever sessions have them: each holder's guard is
    /// lost and the next holder told the lock was abandoned. The ids
    /// broken. Allowed on holds of this process's own user; root and the
    /// daemon's `--admin-group` may break any. Refused, with nothing
    /// broken, with `ErrorCode::Forbidden` (another user's hold),
    /// `ErrorCode::NotHeld` (nobody holds it), `ErrorCode::Unsupported`
    /// (the etcd backend, or a daemon of before protocol version 4).
    pub async fn break_lock(&self, name: &str, hold_id: Option<u64>) -> Result<Vec<u64>> {
        if self.inner.welcome.version < 4 {
            return Err(too_old_to_break(name, self.inner.welcome.version));
        }
        self.run(ops::break_holds(name, hold_id)?).await
    }

    /// Asks for `lock` on `name`; `Ok(None)` when `timeout` ran out
    /// first. Dropping the future before the answer cancels the acquire
    /// on the daemon (and releases a grant that won the race).
    pub(crate) async fn acquire(
        &self,
        name: &str,
        lock: LockRequest,
        timeout: Option<Duration>,
        extras: ops::Extras,
    ) -> Result<Option<Grant>> {
        let version = self.inner.welcome.version;
        let actors = self.inner.actors.current(version);
        let op = ops::acquire(name, lock, timeout, actors, extras, version)?;
        let (id, reply) = self.submit(op.request)?;
        let mut wait = CancelOnDrop {
            client: self,
            id,
            reply: Some(reply),
        };
        let response = wait.answer().await;
        op.answer.read(response?)
    }

    /// Sends `op`'s request and reads its answer.
    pub(crate) async fn run<T>(&self, op: Op<T>) -> Result<T> {
        let response = self.call(op.request).await?;
        op.answer.read(response)
    }

    /// Sends `request` and waits for its answer.
    pub(crate) async fn call(&self, request: Request) -> Result<Response> {
        let (_, reply) = self.submit(request)?;
        reply.await.map_err(|_| Error::ConnectionLost)
    }

    fn submit(&self, request: Request) -> Result<(u64, oneshot::Receiver<Response>)> {
        let id = self.next_id();
        let (reply, rx) = oneshot::channel();
        self.send(id, request, Some(reply), None)?;
        Ok((id, rx))
    }

    /// Queues `request` (its answer to `reply`, a watch's events to
    /// `events`) and writes it now if nothing is ahead of it.
    fn send(
        &self,
        id: u64,
        request: Request,
        reply: Option<oneshot::Sender<Response>>,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<()> {
        let conn = &self.inner.conn;
        let mut io = conn.io();
        if io.ended {
            return Err(Error::ConnectionLost);
        }
        // Registered before the request is sent, so no event of the watch
        // can arrive unrouted.
        if let Some(events) = events {
            io.watches.insert(id, events);
        }
        let behind = io.out.backlog() > 0;
        io.queue(id, request, reply);
        // Behind a write the task has under way, the task writes this too.
        if behind || io.write_now() {
            drop(io);
            conn.wake.notify_one();
        }
        Ok(())
    }

    /// Sends a watch request; returns its id, its events and its answer.
    pub(crate) fn submit_watch(
        &self,
        request: Request,
    ) -> Result<(
        u64,
        mpsc::UnboundedReceiver<Event>,
        oneshot::Receiver<Response>,
    )> {
        let id = self.next_id();
        let (reply, rx) = oneshot::channel();
        // Unbounded: the connection task must never wait on a slow
        // consumer; the daemon tells a watcher that falls far behind.
        let (events, events_rx) = mpsc::unbounded_channel();
        self.send(id, request, Some(reply), Some(events))?;
        Ok((id, events_rx, rx))
    }

    /// Ends watch `id` without waiting.
    pub(crate) fn forget_watch(&self, id: u64) {
        self.inner.conn.io().watches.remove(&id);
        let _ = self.send(0, Request::StateUnwatch { watch_id: id }, None, None);
    }

    /// Whether hold `hold_id` was told that someone waits behind it.
    pub(crate) fn is_contended(&self, hold_id: u64) -> bool {
        self.inner.conn.io().contended.contains(&hold_id)
    }

    /// Completes once hold `hold_id` is told that someone waits behind it.
    pub(crate) async fn contended(&self, hold_id: u64) {
        loop {
            let told = self.inner.conn.contention.notified();
            tokio::pin!(told);
            // Registered before looking, so a wake between is not lost.
            told.as_mut().enable();
            if self.is_contended(hold_id) {
                return;
            }
            told.await;
        }
    }

    /// Why hold `hold_id` was revoked (its lease ran out, or it was
    /// broken), if it was.
    pub(crate) fn revocation(&self, hold_id: u64) -> Option<String> {
        self.inner.conn.io().revoked.get(&hold_id).cloned()
    }

    /// Whether hold `hold_id` was revoked.
    pub(crate) fn is_revoked(&self, hold_id: u64) -> bool {
        self.inner.conn.io().revoked.contains_key(&hold_id)
    }

    /// Completes once hold `hold_id` is revoked, or the connection lost.
    pub(crate) async fn hold_lost(&self, hold_id: u64) {
        let revoked = async {
            loop {
                let told = self.inner.conn.contention.notified();
                tokio::pin!(told);
                told.as_mut().enable();
                if self.is_revoked(hold_id) {
                    return;
                }
                told.await;
            }
        };
        tokio::select! {
            () = revoked => {}
            () = self.lost() => {}
        }
    }

    /// Forgets what was heard of hold `hold_id`, which is ending.
    pub(crate) fn forget_hold(&self, hold_id: u64) {
        let mut io = self.inner.conn.io();
        io.live.remove(&hold_id);
        io.contended.remove(&hold_id);
        io.revoked.remove(&hold_id);
    }

    /// Sends `request` without waiting for (or caring about) its answer.
    /// Never blocks; a lost connection already released everything.
    pub(crate) fn forget(&self, request: Request) {
        let id = self.next_id();
        let _ = self.send(id, request, None, None);
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// What an acquire asks for: each kind with only the numbers it has, so
/// that no request can give a mutex a capacity or a rwlock permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockRequest {
    /// The mutex.
    Mutex,
    /// `permits` of a semaphore of `capacity`.
    Semaphore {
        /// Permits every user of the name agrees on.
        capacity: u32,
        /// Permits wanted, granted together.
        permits: u32,
    },
    /// Shared access to a rwlock.
    Shared,
    /// Exclusive access to a rwlock.
    Exclusive,
}

impl LockRequest {
    /// The request's kind and permits as the protocol spells them.
    pub(crate) fn kind(self) -> LockKind {
        self.wire().0
    }

    /// Permits the hold will have.
    pub(crate) fn permits(self) -> u32 {
        self.wire().2
    }

    /// Kind, capacity and permits on the wire (PROTOCOL.md 4.7).
    pub(crate) fn wire(self) -> (LockKind, u32, u32) {
        match self {
            LockRequest::Mutex => (LockKind::Mutex, 1, 1),
            LockRequest::Semaphore { capacity, permits } => {
                (LockKind::Semaphore, capacity, permits)
            }
            LockRequest::Shared => (LockKind::RwShared, 0, 1),
            LockRequest::Exclusive => (LockKind::RwExclusive, 0, 1),
        }
    }
}

/// Waits for an acquire's answer; if dropped first, cancels the acquire
/// on the daemon, or releases the grant already routed to it.
struct CancelOnDrop<'a> {
    client: &'a Client,
    id: u64,
    /// Taken once the answer is read.
    reply: Option<oneshot::Receiver<Response>>,
}

impl CancelOnDrop<'_> {
    async fn answer(&mut self) -> Result<Response> {
        let reply = self.reply.as_mut().expect("the answer is read once");
        let response = reply.await.map_err(|_| Error::ConnectionLost);
        self.reply = None;
        response
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        let Some(mut reply) = self.reply.take() else {
            return;
        };
        // Closed first, so that an answer is either in the channel now or
        // refused from here on (and its grant released by the connection
        // task); a grant already in the channel is never read otherwise.
        reply.close();
        match reply.try_recv() {
            Ok(Response::Granted(grant)) => {
                self.client.forget_hold(grant.hold_id);
                self.client.forget(Request::Release {
                    hold_id: grant.hold_id,
                })
            }
            // Answered otherwise: nothing is waiting or held.
            Ok(_) => {}
            Err(_) => self.client.forget(Request::Cancel {
                request_id: self.id,
            }),
        }
    }
}

/// Writes some of `conn`'s backlog, waiting for the socket to take it; the
/// lock is held only while a write is tried.
async fn write_some(conn: &Conn) -> std::io::Result<()> {
    std::future::poll_fn(|cx| {
        let mut io = conn.io();
        if io.out.backlog() == 0 {
            return Poll::Ready(Ok(()));
        }
        std::pin::pin!(io.out.write_some()).poll(cx)
    })
    .await
}

/// The connection task: reads and routes every answer, and writes what
/// callers could not.
struct Task {
    reader: FrameReader<ReadHalf>,
    conn: Arc<Conn>,
}

impl Task {
    /// Runs until the connection fails or every `Client` and guard is gone;
    /// returns why. Either way nothing more is sent, and every caller
    /// still waiting is told the connection is lost.
    async fn run(mut self) -> String {
        let why = self.serve().await;
        let mut io = self.conn.io();
        io.ended = true;
        io.pending.clear();
        io.watches.clear();
        why
    }

    async fn serve(&mut self) -> String {
        loop {
            let (backlog, dropped) = {
                let io = self.conn.io();
                (io.out.backlog() > 0, io.dropped)
            };
            if dropped && !backlog {
                return "the client was dropped".into();
            }
            tokio::select! {
                biased;
                written = write_some(&self.conn), if backlog => {
                    if let Err(e) = written {
                        return match e.kind() {
                            std::io::ErrorKind::WriteZero => "the daemon stopped reading".into(),
                            _ => format!("write failed: {e}"),
                        };
                    }
                }
                msg = self.reader.read_message::<ServerMessage>() => match msg {
                    Ok(Some(msg)) => {
                        if let Err(why) = self.route(msg) {
                            return why;
                        }
                        loop {
                            match self.reader.try_next::<ServerMessage>() {
                                Ok(Some(msg)) => {
                                    if let Err(why) = self.route(msg) {
                                        return why;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => return e.to_string(),
                            }
                        }
                    }
                    Ok(None) => return "the daemon closed the connection".into(),
                    Err(e) => return e.to_string(),
                },
                () = self.conn.wake.notified() => {}
            }
        }
    }

    fn route(&mut self, msg: ServerMessage) -> Result<(), String> {
        match msg {
            ServerMessage::Response { id, response } => {
                let mut io = self.conn.io();
                let Some(reply) = io.pending.remove(&id) else {
                    // The answer to a forgotten request.
                    return Ok(());
                };
                if let Response::Granted(grant) = &response {
                    io.live.insert(grant.hold_id);
                }
                if let Err(Response::Granted(grant)) = reply.send(response) {
                    io.live.remove(&grant.hold_id);
                    // Its caller gave up (the future was dropped) but the
                    // grant won the race: give the hold back.
                    let release = Request::Release {
                        hold_id: grant.hold_id,
                    };
                    io.queue(0, release, None);
                    io.write_now();
                }
                Ok(())
            }
            ServerMessage::Event(Event::ShuttingDown) => {
                tracing::info!("the lockbroker daemon is shutting down");
                Ok(())
            }
            ServerMessage::Event(Event::Contended { hold_id }) => {
                let mut io = self.conn.io();
                if io.live.contains(&hold_id) {
                    io.contended.insert(hold_id);
                    self.conn.contention.notify_waiters();
                }
                Ok(())
            }
            ServerMessage::Event(Event::Revoked { hold_id, message }) => {
                let mut io = self.conn.io();
                if io.live.contains(&hold_id) {
                    tracing::warn!(hold_id, "lockbroker revoked a hold: {message}");
                    io.revoked.insert(hold_id, message);
                    self.conn.contention.notify_waiters();
                }
                Ok(())
            }
            ServerMessage::Event(
                event @ (Event::StateChanged { watch_id, .. } | Event::WatchLagged { watch_id }),
            ) => {
                let mut io = self.conn.io();
                if let Some(events) = io.watches.get(&watch_id)
                    && events.send(event).is_err()
                {
                    // The Watch was dropped; its Unwatch is on its way.
                    io.watches.remove(&watch_id);
                }
                Ok(())
            }
            ServerMessage::Fatal(e) => Err(format!("the daemon closed the connection: {e}")),
            ServerMessage::Welcome(_) => Err("unexpected second Welcome".into()),
        }
    }
}

/// The refusal of a `Break` to a daemon of protocol `version`, which
/// does not know it.
pub(crate) fn too_old_to_break(name: &str, version: u16) -> crate::Error {
    too_old(format!("break of {name:?}"), version)
}

/// The refusal of `what` (a request of version 4) to a daemon of
/// protocol `version`, which would end the session on it: nothing is sent.
pub(crate) fn too_old(what: String, version: u16) -> crate::Error {
    crate::Error::Refused {
        what,
        code: lockbroker_proto::ErrorCode::Unsupported,
        message: format!("the daemon speaks protocol version {version}; this needs version 4"),
    }
}

//! The blocking client's connection on Unix: no runtime and no thread of
//! its own, so an uncontended call costs one `send` and one `recv`, as a
//! bare socket does.
//!
//! A caller writes its request itself, then waits. One thread at a time
//! reads the socket: whoever holds the *reader* (the frame buffer). A
//! waiting thread that finds it free takes it and reads until what it
//! waits for has come, handing every frame meant for another thread to
//! that thread (and waking it); a thread that finds it taken sleeps until
//! the reader wakes it. Whoever leaves while the reader is free wakes one
//! sleeper, so while anyone waits someone reads. Frames nobody waits for —
//! the answers to releases sent by dropped guards — are read by the next
//! reader and dropped; a grant nobody waits for is released.
//!
//! A write never waits on a daemon that is waiting for us: if the socket
//! is full (the daemon stopped reading because its answers to us pile up
//! unread), the writer reads and routes them while it waits for room.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lockbroker_proto::io::FrameReader;
use lockbroker_proto::{
    ClientMessage, ErrorCode, ErrorInfo, Event, FrameError, Request, Response, ServerMessage,
    Welcome, frame,
};

use crate::connector::{Actors, Connector, HELLO_MAX, VERSIONS, hello, refused_version, welcome};
use crate::error::{Error, Result};
use crate::ops::Op;
use crate::state::WatchEvent;

/// One session, shared by every handle, guard and watch made from it.
#[derive(Debug)]
pub(crate) struct Conn {
    socket: OwnedFd,
    welcome: Welcome,
    /// On whose behalf acquires are made.
    actors: Actors,
    shared: Mutex<Shared>,
    /// The encoding buffer; held for a whole frame's write, so frames never
    /// interleave. Taken before `shared` when both are.
    out: Mutex<Vec<u8>>,
}

/// What the threads on one connection share.
#[derive(Debug)]
struct Shared {
    next_id: u64,
    /// The frame buffer; `None` while a thread reads.
    reader: Option<FrameReader<()>>,
    /// Requests waiting for their answer, and answers not yet taken.
    answers: HashMap<u64, Option<Response>>,
    /// Events of each open watch, not yet taken.
    watches: HashMap<u64, VecDeque<Event>>,
    /// Holds granted whose guard has not gone: news of any other hold is
    /// ignored, so the sets below never outgrow the holds.
    live: HashSet<u64>,
    /// Holds told that someone waits behind them (`Event::Contended`,
    /// only for holds that asked), until their guard goes.
    contended: HashSet<u64>,
    /// Holds the daemon revoked (`Event::Revoked`), with why, until their
    /// guard goes.
    revoked: HashMap<u64, String>,
    /// Threads asleep, and what each waits for.
    sleepers: Vec<Sleeper>,
    /// Why the connection is gone, once it is.
    lost: Option<String>,
}

#[derive(Debug)]
struct Sleeper {
    wake: Arc<Condvar>,
    waits_for: WaitsFor,
}

/// What a waiting thread waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitsFor {
    Answer(u64),
    Event(u64),
    /// News of contention for this hold.
    Contended(u64),
    /// The end of this hold (or of the connection).
    HoldLost(u64),
    /// Only the end of the connection.
    Loss,
}

/// What one read brought.
enum Read {
    Data,
    /// Nothing before the deadline.
    Nothing,
    Ended(String),
}

impl Shared {
    /// Wakes the sleepers waiting for `what`.
    fn wake(&self, what: WaitsFor) {
        for s in &self.sleepers {
            if s.waits_for == what {
                s.wake.notify_one();
            }
        }
    }

    /// Wakes one sleeper to take the reader, if it is free.
    fn pass_reader(&self) {
        if self.reader.is_some()
            && let Some(s) = self.sleepers.first()
        {
            s.wake.notify_one();
        }
    }
}

impl Conn {
    /// Connects and shakes hands as `connector` says, in the latest
    /// protocol version the daemon speaks.
    pub(crate) fn connect(connector: &Connector) -> Result<Arc<Conn>> {
        // One bound for connecting and the handshake (both tries), as the
        // async connector's.
        let deadline = Instant::now() + connector.connect_timeout();
        let mut versions = VERSIONS.into_iter().peekable();
        loop {
            let version = versions.next().expect("versions to try");
            match Conn::connect_as(connector, version, deadline) {
                Err(e) if refused_version(&e) && versions.peek().is_some() => continue,
                other => return other,
            }
        }
    }

    fn connect_as(connector: &Connector, version: u16, deadline: Instant) -> Result<Arc<Conn>> {
        let (path, name, trust) = connector.prepare()?;
        let failed = |source: io::Error| Error::Connect {
            path: path.clone(),
            source,
        };
        let left = || {
            // A zero timeout would mean none at all.
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let stream = connect_within(&path, left()).map_err(failed)?;
        // Before anything is sent: a Hello names this program.
        trust.verify(&path, peer_uid(stream.as_raw_fd()).map_err(failed)?)?;
        stream.set_read_timeout(Some(left())).map_err(failed)?;
        stream.set_write_timeout(Some(left())).map_err(failed)?;
        let mut bytes = Vec::new();
        let sent = frame::encode(&hello(name, version), HELLO_MAX, &mut bytes)
            .map_err(|e| e.to_string())
            .and_then(|()| send_all(stream.as_raw_fd(), &bytes).map_err(|e| e.to_string()));
        let mut reader = FrameReader::new((), frame::DEFAULT_MAX_FRAME_LEN);
        let answer = loop {
            match reader.try_next::<ServerMessage>() {
                Ok(Some(msg)) => break Ok(Some(msg)),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            match reader.fill_with(|buf| recv(stream.as_raw_fd(), buf, 0)) {
                Ok(0) if reader.has_partial() => {
                    break Err(FrameError::Truncated { buffered: 1 });
                }
                Ok(0) => break Ok(None),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(FrameError::Io(e)),
            }
        };
        let welcome = welcome(&path, answer, sent, version)?;
        reader.set_max_len(welcome.limits.max_frame_len);
        reader.set_version(welcome.version);
        stream.set_read_timeout(None).map_err(failed)?;
        stream.set_write_timeout(None).map_err(failed)?;
        Ok(Arc::new(Conn {
            socket: stream.into(),
            welcome,
            actors: connector.actors(),
            shared: Mutex::new(Shared {
                next_id: 1,
                reader: Some(reader),
                answers: HashMap::new(),
                watches: HashMap::new(),
                live: HashSet::new(),
                contended: HashSet::new(),
                revoked: HashMap::new(),
                sleepers: Vec::new(),
                lost: None,
            }),
            out: Mutex::new(Vec::new()),
        }))
    }

    /// The daemon's greeting.
    pub(crate) fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// On whose behalf acquires are made.
    pub(crate) fn actors(&self) -> &Actors {
        &self.actors
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        // A panic elsewhere never leaves `Shared` half-changed: every
        // change is one step.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `op`'s request and waits for its answer.
    pub(crate) fn run<T>(&self, op: Op<T>) -> Result<T> {
        let (_, response) = self.call(op.request, false)?;
        op.answer.read(response)
    }

    /// Sends `request`, first registering a watch under its id if it
    /// starts one, and waits for its answer; the id and the answer.
    fn call(&self, request: Request, watch: bool) -> Result<(u64, Response)> {
        let id = {
            let mut g = self.shared();
            if g.lost.is_some() {
                return Err(Error::ConnectionLost);
            }
            let id = g.next_id;
            g.next_id += 1;
            g.answers.insert(id, None);
            if watch {
                g.watches.insert(id, VecDeque::new());
            }
            id
        };
        if let Err(e) = self.send(id, request) {
            let mut g = self.shared();
            g.answers.remove(&id);
            g.watches.remove(&id);
            return match e {
                Sent::TooLarge(info) => Ok((id, Response::Error(info))),
                Sent::Lost => Err(Error::ConnectionLost),
            };
        }
        let answer = self.wait(WaitsFor::Answer(id), None, |g| {
            g.answers.get_mut(&id).and_then(Option::take)
        });
        let mut g = self.shared();
        g.answers.remove(&id);
        match answer {
            Some(response) => Ok((id, response)),
            None => {
                g.watches.remove(&id);
                Err(Error::ConnectionLost)
            }
        }
    }

    /// Sends a request whose answer nobody waits for (a guard's release).
    /// Never fails: a lost connection already released everything.
    pub(crate) fn forget(&self, request: Request) {
        let id = {
            let mut g = self.shared();
            if g.lost.is_some() {
                return;
            }
            let id = g.next_id;
            g.next_id += 1;
            id
        };
        let _ = self.send(id, request);
    }

    /// Starts the watch `op` asks for.
    pub(crate) fn watch(&self, op: Op<()>) -> Result<WatchHandle> {
        let (id, response) = self.call(op.request, true)?;
        match op.answer.read(response) {
            Ok(()) => Ok(WatchHandle(id)),
            Err(e) => {
                self.shared().watches.remove(&id);
                Err(e)
            }
        }
    }

    /// The next change `watch` sees, waiting until `deadline`; `None` if
    /// it passed, or the connection is gone.
    pub(crate) fn next_event(
        &self,
        watch: &mut WatchHandle,
        deadline: Option<Instant>,
    ) -> Option<WatchEvent> {
        let id = watch.0;
        loop {
            let event = self.wait(WaitsFor::Event(id), deadline, |g| {
                g.watches.get_mut(&id).and_then(VecDeque::pop_front)
            })?;
            if let Some(event) = WatchEvent::from_event(event) {
                return Some(event);
            }
        }
    }

    /// Stops `watch`, without waiting.
    pub(crate) fn unwatch(&self, watch: &mut WatchHandle) {
        self.shared().watches.remove(&watch.0);
        self.forget(Request::StateUnwatch { watch_id: watch.0 });
    }

    /// Waits at most `timeout` for hold `hold_id` to be told that someone
    /// waits behind it; whether it was (reads what has arrived to know).
    pub(crate) fn wait_contended(&self, hold_id: u64, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let told = |g: &mut Shared| g.contended.contains(&hold_id).then_some(());
        self.wait(WaitsFor::Contended(hold_id), deadline, told)
            .is_some()
    }

    /// Waits at most `timeout` for hold `hold_id` to be revoked or the
    /// connection lost; whether either happened.
    pub(crate) fn wait_hold_lost(&self, hold_id: u64, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let revoked = |g: &mut Shared| g.revoked.contains_key(&hold_id).then_some(());
        let _ = self.wait(WaitsFor::HoldLost(hold_id), deadline, revoked);
        let g = self.shared();
        g.revoked.contains_key(&hold_id) || g.lost.is_some()
    }

    /// Why hold `hold_id` was revoked, if it was (reads what has arrived).
    pub(crate) fn revocation(&self, hold_id: u64) -> Option<String> {
        let _ = self.wait_hold_lost(hold_id, Duration::ZERO);
        self.shared().revoked.get(&hold_id).cloned()
    }

    /// Forgets what was heard of hold `hold_id`, which is ending.
    pub(crate) fn forget_hold(&self, hold_id: u64) {
        let mut g = self.shared();
        g.live.remove(&hold_id);
        g.contended.remove(&hold_id);
        g.revoked.remove(&hold_id);
    }

    /// Whether the connection is gone; reads what has arrived to know.
    pub(crate) fn is_lost(&self) -> bool {
        self.wait_lost(Duration::ZERO)
    }

    /// Waits at most `timeout` for the connection to be lost; whether it
    /// was.
    pub(crate) fn wait_lost(&self, timeout: Duration) -> bool {
        // A timeout too far to compute waits for ever.
        let deadline = Instant::now().checked_add(timeout);
        let _: Option<()> = self.wait(WaitsFor::Loss, deadline, |_| None);
        self.shared().lost.is_some()
    }

    /// Waits until `ready` gives something, reading the socket while
    /// nobody else does; `None` if `deadline` passed first or the
    /// connection is gone. A deadline that has passed still reads once
    /// what has arrived, without waiting.
    fn wait<T>(
        &self,
        waits_for: WaitsFor,
        deadline: Option<Instant>,
        mut ready: impl FnMut(&mut Shared) -> Option<T>,
    ) -> Option<T> {
        let mut g = self.shared();
        let mut wake: Option<Arc<Condvar>> = None;
        let mut read_once = false;
        let found = loop {
            if let Some(t) = ready(&mut g) {
                break Some(t);
            }
            if g.lost.is_some() {
                break None;
            }
            let now = Instant::now();
            let expired = deadline.is_some_and(|d| d <= now);
            if expired && read_once {
                break None;
            }
            if let Some(mut reader) = g.reader.take() {
                drop(g);
                read_once = true;
                let read = self.read(&mut reader, deadline);
                g = self.shared();
                let orphans = self.absorb(&mut g, &mut reader, read);
                g.reader = Some(reader);
                if !orphans.is_empty() {
                    drop(g);
                    for hold_id in orphans {
                        self.forget(Request::Release { hold_id });
                    }
                    g = self.shared();
                }
                continue;
            }
            if expired {
                break None;
            }
            // Someone else reads: sleep until it hands us what we wait for,
            // the reader is free, or the deadline.
            let cv = wake.get_or_insert_with(|| Arc::new(Condvar::new())).clone();
            g.sleepers.push(Sleeper {
                wake: Arc::clone(&cv),
                waits_for,
            });
            g = match deadline {
                None => cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(now);
                    cv.wait_timeout(g, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            g.sleepers.retain(|s| !Arc::ptr_eq(&s.wake, &cv));
        };
        g.pass_reader();
        found
    }

    /// Reads once into `reader`, waiting until `deadline` at most.
    fn read(&self, reader: &mut FrameReader<()>, deadline: Option<Instant>) -> Read {
        loop {
            let flags = match deadline {
                // The common case: block in recv itself, one system call.
                // (Asleep in recv, the thread is also woken when the daemon
                // reads the request; that early wake readies this CPU for
                // the answer, which is worth more off the daemon's CPU than
                // the switch pair it costs on it: BENCHMARKS.md, issue 12.)
                None => 0,
                Some(d) => {
                    if !poll(self.fd(), libc::POLLIN, d) {
                        return Read::Nothing;
                    }
                    libc::MSG_DONTWAIT
                }
            };
            match reader.fill_with(|buf| recv(self.fd(), buf, flags)) {
                Ok(0) if reader.has_partial() => {
                    return Read::Ended("the connection broke in the middle of a frame".into());
                }
                Ok(0) => return Read::Ended("the daemon closed the connection".into()),
                Ok(_) => return Read::Data,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::Nothing,
                Err(e) => return Read::Ended(format!("reading from the daemon failed: {e}")),
            }
        }
    }

    /// Routes every whole frame `reader` holds after `read`; the holds
    /// granted to nobody, to release.
    fn absorb(&self, g: &mut Shared, reader: &mut FrameReader<()>, read: Read) -> Vec<u64> {
        let mut orphans = Vec::new();
        loop {
            match reader.try_next::<ServerMessage>() {
                Ok(Some(msg)) => {
                    if let Err(why) = route(g, msg, &mut orphans) {
                        self.end(g, why);
                        return orphans;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.end(g, e.to_string());
                    return orphans;
                }
            }
        }
        if let Read::Ended(why) = read {
            self.end(g, why);
        }
        orphans
    }

    /// Marks the connection lost and wakes everyone.
    fn end(&self, g: &mut Shared, why: String) {
        if g.lost.is_none() {
            tracing::debug!(reason = %why, "lockbroker connection ended");
            g.lost = Some(why);
            // Nobody can use it any more; the daemon sees it close too.
            // SAFETY: shutting down our own socket.
            unsafe { libc::shutdown(self.fd(), libc::SHUT_RDWR) };
        }
        for s in &g.sleepers {
            s.wake.notify_one();
        }
    }

    /// Encodes and writes one request.
    fn send(&self, id: u64, request: Request) -> std::result::Result<(), Sent> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.clear();
        let msg = ClientMessage::Request { id, request };
        if let Err(e) = frame::encode(&msg, self.welcome.limits.max_frame_len, &mut out) {
            let info = ErrorInfo::new(ErrorCode::FrameTooLarge, format!("request not sent: {e}"));
            return Err(Sent::TooLarge(info));
        }
        let mut orphans = Vec::new();
        let mut rest: &[u8] = &out;
        let sent = loop {
            if rest.is_empty() {
                break Ok(());
            }
            match send(self.fd(), rest, libc::MSG_DONTWAIT) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    orphans.extend(self.make_way());
                }
                Err(e) => {
                    let mut g = self.shared();
                    self.end(&mut g, format!("writing to the daemon failed: {e}"));
                    break Err(Sent::Lost);
                }
            }
        };
        if out.capacity() > 64 * 1024 {
            *out = Vec::new();
        }
        drop(out);
        for hold_id in orphans {
            self.forget(Request::Release { hold_id });
        }
        sent
    }

    /// The socket is full: read what the daemon sent if nobody else is
    /// reading (it may have stopped reading until we do), or wait a little
    /// for room; the holds granted to nobody, to release once the frame
    /// being written is out.
    fn make_way(&self) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_millis(10);
        let mut g = self.shared();
        let Some(mut reader) = g.reader.take() else {
            drop(g);
            poll(self.fd(), libc::POLLOUT, deadline);
            return Vec::new();
        };
        drop(g);
        // Room, or something to read (which the read below takes, not
        // waiting again).
        poll(self.fd(), libc::POLLIN | libc::POLLOUT, deadline);
        let read = self.read(&mut reader, Some(Instant::now()));
        g = self.shared();
        let orphans = self.absorb(&mut g, &mut reader, read);
        g.reader = Some(reader);
        g.pass_reader();
        orphans
    }
}

/// An open watch: its id, which is its request's.
#[derive(Debug)]
pub(crate) struct WatchHandle(u64);

/// Why a request was not sent.
enum Sent {
    /// Larger than the daemon's frame limit: answered here, as the daemon
    /// would.
    TooLarge(ErrorInfo),
    Lost,
}

/// Hands one frame to whoever waits for it; `Err` ends the connection.
fn route(
    g: &mut Shared,
    msg: ServerMessage,
    orphans: &mut Vec<u64>,
) -> std::result::Result<(), String> {
    match msg {
        ServerMessage::Response { id, response } => match g.answers.get_mut(&id) {
            Some(slot) => {
                let granted = match &response {
                    Response::Granted(grant) => Some(grant.hold_id),
                    _ => None,
                };
                *slot = Some(response);
                g.live.extend(granted);
                g.wake(WaitsFor::Answer(id));
            }
            // The answer to a forgotten request; a grant nobody waits for
            // (none is ever asked that way, but a hold must not leak).
            None => {
                if let Response::Granted(grant) = response {
                    orphans.push(grant.hold_id);
                }
            }
        },
        ServerMessage::Event(Event::ShuttingDown) => {
            tracing::info!("the lockbroker daemon is shutting down");
        }
        ServerMessage::Event(Event::Contended { hold_id }) if g.live.contains(&hold_id) => {
            g.contended.insert(hold_id);
            g.wake(WaitsFor::Contended(hold_id));
        }
        ServerMessage::Event(Event::Revoked { hold_id, message }) if g.live.contains(&hold_id) => {
            tracing::warn!(hold_id, "lockbroker revoked a hold: {message}");
            g.revoked.insert(hold_id, message);
            g.wake(WaitsFor::HoldLost(hold_id));
        }
        // News of a hold whose guard has gone.
        ServerMessage::Event(Event::Contended { .. } | Event::Revoked { .. }) => {}
        ServerMessage::Event(
            event @ (Event::StateChanged { watch_id, .. } | Event::WatchLagged { watch_id }),
        ) => {
            if let Some(events) = g.watches.get_mut(&watch_id) {
                events.push_back(event);
                g.wake(WaitsFor::Event(watch_id));
            }
        }
        ServerMessage::Fatal(e) => return Err(format!("the daemon closed the connection: {e}")),
        ServerMessage::Welcome(_) => return Err("unexpected second Welcome".into()),
    }
    Ok(())
}

fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn send(fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length. MSG_NOSIGNAL: a
    // closed connection is an error, not a SIGPIPE.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags | MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `send` until all of `buf` is written (the handshake's blocking socket).
fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match send(fd, buf, 0) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Connects to `path`, waiting at most `timeout`. A daemon whose listen
/// queue is full (too busy to accept) makes Linux's `connect` wait for
/// room, for as long as the socket's send timeout allows (`std`'s connect
/// sets no timeout, so it waited for ever).
fn connect_within(path: &std::path::Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long, or holds a NUL byte",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain socket call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, SOCK_CLOEXEC | libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    // SAFETY: sets a flag of our own descriptor.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // The send timeout is what bounds a connect waiting for room.
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        if unsafe { libc::connect(fd, (&raw const addr).cast(), len) } == 0 {
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            // Nothing was under way: asking again is asking afresh.
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the daemon's listen queue stayed full for {timeout:?}"),
                ));
            }
            _ => return Err(e),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
const SOCK_CLOEXEC: libc::c_int = libc::SOCK_CLOEXEC;
// Elsewhere the flag is set right after (no SOCK_CLOEXEC there).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SOCK_CLOEXEC: libc::c_int = 0;

#[cfg(any(target_os = "linux", target_os = "android"))]
const MSG_NOSIGNAL: libc::c_int = libc::MSG_NOSIGNAL;
// Elsewhere Rust ignores SIGPIPE for the whole program.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const MSG_NOSIGNAL: libc::c_int = 0;

/// Waits until `fd` has one of `events` (or an error or hang-up, which the
/// next read or write reports) or `deadline` passes; whether it has.
fn poll(fd: RawFd, events: libc::c_short, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up, so a wait never ends just before its deadline.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return n != 0;
        }
    }
}

/// The user id of the process that listens on the other end of `fd`.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn peer_uid(fd: RawFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for getsockopt to write.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The user id of the process that listens on the other end of `fd`.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn peer_uid(fd: RawFd) -> io::Result<u32> {
    let (mut uid, mut gid) = (0, 0);
    // SAFETY: `uid` and `gid` are valid for getpeereid to write.
    if unsafe { libc::getpeereid(fd, &mut uid, &mut gid) } == 0 {
        Ok(uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

"""One session with the daemon, shared safely by every thread of a process.

A :class:`Client` owns one connection (a Unix socket, or a named pipe on
Windows: :mod:`lockbroker.transport`):

* a caller allocates a request id, registers a :class:`_Call` in
  ``_pending`` and writes its frame (writes are serialized by
  ``_write_lock``), then waits for its own ``_Call`` only;
* one thread at a time reads: it decodes every frame the daemon sends and
  routes each ``Response`` to the ``_Call`` with its id, so an acquire that
  waits never delays another thread's request (PROTOCOL.md section 7);
* when the connection ends for any reason, the reader fails every pending
  call with :class:`ConnectionLost`, and every later call raises it too; a
  ``Client`` is one session and never reconnects (``client.lost`` tells).

Who reads. On a Unix socket the waiting caller reads itself: whoever finds
the frame buffer (``_buffer``) free takes it and reads until its own answer
has come, routing frames meant for other threads to them, while those
sleep on a condition of their own until their answer is routed or the
buffer is free; whoever leaves with the buffer free wakes a sleeper, so
while anyone waits someone reads. An uncontended call is then one
``sendall`` and one ``recv`` in the calling thread, with no thread switch.
``client.lost`` and ``client.shutting_down`` read what has arrived before
answering. On a Windows pipe a reader thread of the client's own reads
every frame instead, and callers block on their ``_Call``. A frame read is
always routed: an interrupt (``KeyboardInterrupt``) that lands while a
caller routes frames it read ends the session (so no answer or grant is
lost with it: the daemon releases everything, and every waiting call fails
with ``ConnectionLost``); one that lands while it waits in ``recv``
interrupts only its own call.

State watches (PROTOCOL.md 10.11) add a second routing table: a watch's
events carry its id (the ``StateWatch`` request id), and ``_watches`` maps
that id to the watch's own unbounded queue. The queue is registered under
the same lock hold that allocates the id, before the request is written, so
no event can arrive unrouted; the reader only ever ``put`` s into it, so a
slow consumer never blocks the reader. When the session ends, every queue
gets a :class:`_WatchEnd` carrying the :class:`ConnectionLost`. The
consumer side is :class:`lockbroker.state.Watch`.

A caller that stops waiting for an acquire (its local safety deadline ran
out, or ``KeyboardInterrupt``) removes its ``_Call`` and sends ``Cancel``;
from then on the acquire's id is unknown, and the reader releases any
``Granted`` that arrives for an unknown id (PROTOCOL.md 7 and 8.7). When
callers read for themselves, the one that cancels also waits (briefly) for
the answer to its ``Cancel``: a grant that raced it comes before, so it is
read and released then, not whenever the client is next used.

:func:`default_client` gives the process-wide client that ``Lock("x")`` uses
when no client is passed; it connects on first use and again after a fork
(the child must not share the parent's session) or after the session ended.

The rules of the session that are not I/O (trust checks, handshake, frame
routing, what an answer means) are :mod:`lockbroker._common`'s, which the
asyncio client (:mod:`lockbroker.aio`) follows too.

This module is below :mod:`lockbroker.primitives` and :mod:`lockbroker.state`,
which are built on it: it imports neither. ``client.state`` makes a
:class:`lockbroker.State` all the same, the class :mod:`lockbroker.state`
hands to :func:`_set_state_type` when it is imported.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import struct
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

from . import _common
from . import address as _address
from . import transport as _transport
from .errors import (
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    LockbrokerError,
    NoAnswer,
)
from .protocol import (
    Acquire,
    Break,
    Broken,
    Cancel,
    Contended,
    Done,
    EntryInfo,
    ExtendLease,
    FrameBuffer,
    Grant,
    Granted,
    HANDSHAKE_MAX_FRAME_LEN,
    Inspect,
    InspectAfter,
    Inspection,
    Limits,
    LockKind,
    Metrics,
    MetricsText,
    Ping,
    Pong,
    PROTOCOL_VERSION,
    Release,
    ReleaseByName,
    Released,
    Request,
    RequestMessage,
    Response,
    ResponseMessage,
    Revoked,
    StateChanged,
    StateUnwatch,
    StateWatch,
    WatchLagged,
    Welcome,
)

__all__ = ["Client", "default_client", "set_default_client", "ACQUIRE_GRACE"]

#: Seconds an acquire with a timeout waits beyond that timeout for the
#: daemon's answer before giving up locally. The daemon enforces the timeout
#: itself, so this only bounds the wait on a daemon that stopped answering.
ACQUIRE_GRACE = 10.0

#: Seconds a caller that cancels an acquire waits for the ``Cancel``'s
#: answer, when callers read for themselves (see the module's doc).
CANCEL_WAIT = 5.0

#: Seconds a caller's ``recv`` blocks at most (``SO_RCVTIMEO``) when
#: callers read for themselves: a wait with a deadline further away than
#: this reads without a ``poll`` first, and looks at its deadline again
#: when the ``recv`` gives up. Only a wait's safety bound is so coarse.
_RECV_SLICE = 0.25

#: Whether callers read the socket themselves (True) or a reader thread
#: does (False, always so on Windows). Tests set it to run the suite both
#: ways.
_READ_IN_CALLER = True


#: The requests that acquire: a wait given up is cancelled.
_ACQUIRES = _common.ACQUIRES


def _default_client_name() -> str:
    """``basename(argv[0])`` made valid: no control characters, <= 255 bytes."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    name = "".join(c for c in os.path.basename(argv0) if not _is_control(c)) or "python"
    data = name.encode("utf-8")[:255]
    return data.decode("utf-8", "ignore")


def _is_control(c: str) -> bool:
    """Unicode category Cc: U+0000-U+001F and U+007F-U+009F (PROTOCOL.md 8.1)."""
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F


class _Call:
    """One request waiting for its response.

    The reader thread calls ``resolve`` or ``fail`` exactly once, after
    removing the call from ``Client._pending``; the caller blocks in
    ``wait``. The signal is a plain lock, held until the outcome is set.
    """

    __slots__ = ("_signal", "response", "error")

    def __init__(self) -> None:
        self._signal = threading.Lock()
        self._signal.acquire()
        self.response: Optional[Response] = None
        self.error: Optional[BaseException] = None

    def resolve(self, response: Response) -> None:
        """Deliver the response (reader thread)."""
        self.response = response
        self._signal.release()

    def fail(self, error: BaseException) -> None:
        """Deliver a failure: the session ended (reader thread or writer)."""
        self.error = error
        self._signal.release()

    def wait(self, timeout: Optional[float]) -> bool:
        """Block until the outcome is set; False if ``timeout`` ran out first.

        Interruptible by signals (``KeyboardInterrupt``) on POSIX.
        """
        if timeout is None:
            return self._signal.acquire()
        return self._signal.acquire(timeout=max(timeout, 0.0))

    @property
    def done(self) -> bool:
        """Whether the outcome is set."""
        return self.response is not None or self.error is not None

    def outcome(self) -> Response:
        """The response, or raise the error the call failed with."""
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


#: The last item of a watch's queue (the asyncio client's too).
_WatchEnd = _common._WatchEnd


if TYPE_CHECKING:
    #: What a watch's queue holds: events, then possibly one end marker.
    _WatchQueue = queue.SimpleQueue[Union[StateChanged, WatchLagged, _WatchEnd]]


# What Client.state makes: lockbroker.state.State, set by that module when it
# is imported (see _set_state_type).
_state_type: Optional[Callable[["Client"], Any]] = None


def _set_state_type(make: Callable[["Client"], Any]) -> None:
    """Say what :attr:`Client.state` makes (``make(client)``).

    :mod:`lockbroker.state` is built on this module, so this module never
    imports it; it calls this when it is imported instead (and the package's
    ``__init__`` always imports it).
    """
    global _state_type
    _state_type = make


# Every live client, so that a forked child can drop its parent's sessions.
_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()


class Client:
    """One session with the lockbroker daemon, safe to share between threads.

    ``path``: the socket, or on Windows the pipe (else
    ``$LOCKBROKER_SOCKET``, else the default of ``scope``, ``"local"`` or
    ``"global"``; ``"self"`` has none). ``client_name`` is shown by
    Inspect (default: the program's name). ``connect_timeout`` bounds the
    connect and handshake; ``request_timeout`` bounds the wait for the
    answer to a request other than an acquire (None: no bound).

    The constructor connects and raises :class:`ConnectFailed` if no daemon
    answers, and :class:`Untrusted` if another user could be posing as the
    daemon: a scope default's directory that is not safe, or a daemon (on
    any address) running as a user not expected -- the local scope's must
    be this user; the global scope's root or the owner of
    ``/run/lockbroker``; one at an explicit path or ``$LOCKBROKER_SOCKET``
    this user or root. ``allow_uids`` opts in to daemons run by other users
    (e.g. a service account); it relaxes no directory check. On Windows the
    pipe server's process token is checked instead: the local scope's pipe
    must be served by this user, the global one by SYSTEM or an elevated
    process, an explicit or ``$LOCKBROKER_SOCKET`` pipe by any of them;
    ``allow_sids`` (SIDs, ``"S-1-5-..."``) opts in to others there.

    ``detect_deadlocks`` (off by default) asks the daemon to refuse, with
    :class:`Deadlock` (code 209), an acquire whose wait could never be
    granted (PROTOCOL.md 8.11): each acquire is then made on behalf of the
    calling thread (``AcquireAs``), which the daemon takes to release
    nothing while it waits -- so leave it off where one thread waits for a
    lock that another thread of the same client is to release. ``actor``
    (any 64-bit number but 0) makes every acquire of the client one of that
    actor, and turns detection on. With detection on, every acquire's actor
    runs within the actors ``$LOCKBROKER_ACTOR`` names (``lockbroker lock``
    sets it for the command it runs: its own actor, then those it runs
    within), sent as ``AcquireWith`` (protocol version 4): the daemon
    takes the wrapper to keep its lock while the command waits, so a
    command that waits for a lock whose holder waits for the wrapper's is
    refused too. A daemon of before protocol version 3 detects nothing:
    acquires are plain ``Acquire`` s there.

    A client belongs to the process that created it: in a forked
    child every call raises :class:`ConnectionLost` (use
    :func:`default_client`, or create a new ``Client`` in the child).
    Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        path: Optional[str] = None,
        *,
        scope: str = _address.LOCAL,
        client_name: Optional[str] = None,
        connect_timeout: float = 5.0,
        request_timeout: Optional[float] = 30.0,
        allow_uids: Iterable[int] = (),
        allow_sids: Iterable[str] = (),
        detect_deadlocks: bool = False,
        actor: Optional[int] = None,
    ) -> None:
        # On whose behalf acquires are made; checked before connecting.
        self._actors = _common.Actors(detect_deadlocks, actor)
        self.address = _address.resolve(path, scope)
        self.request_timeout = request_timeout
        # Guards _pending, _next_id and _ended; never held while blocking.
        self._lock = threading.Lock()
        # Serializes whole frames on the socket, so frames never interleave.
        self._write_lock = threading.Lock()
        self._pending: Dict[int, _Call] = {}
        # Active (or being set up) watches by id, and the ids of watches
        # nobody consumes any more, to unwatch when an event shows up.
        self._watches: Dict[int, _WatchQueue] = {}
        self._orphan_watches: Set[int] = set()
        # Holds told that someone waits behind them (Contended: only for
        # holds that asked), until released; and a condition on _lock that
        # a reader thread raises when one is told.
        # Holds granted and not released: news of others is ignored, so the
        # sets below never outgrow the holds.
        self._live: Set[int] = set()
        self._contended: Set[int] = set()
        self._contention = threading.Condition(self._lock)
        # Holds revoked (their lease ran out), until released or forgotten.
        self._revoked: Set[int] = set()
        self._state: Any = None
        self._next_id = 1
        self._ended: Optional[ConnectionLost] = None
        self._shutting_down = False
        self._pid = os.getpid()
        name = _default_client_name() if client_name is None else client_name
        # One bound for every try.
        deadline = time.monotonic() + connect_timeout
        version, left = PROTOCOL_VERSION, connect_timeout
        while True:
            try:
                self._sock, self.welcome, buffer = self._connect(name, left, allow_uids, allow_sids, version)
                break
            except ConnectFailed as e:
                # A daemon of before this version: ask in the next lower one.
                older = _common.fallback_version(e, version)
                if older is None:
                    raise
                version, left = older, max(deadline - time.monotonic(), 0.001)
        #: The protocol version of this session's frames.
        self._version = self.welcome.version
        self._max_send = self.welcome.limits.max_frame_len
        # Callers read for themselves on a socket; a pipe has a reader thread.
        self._direct = _READ_IN_CALLER and isinstance(self._sock, _transport.SocketConnection)
        # The frame buffer, held by nobody (None while a caller reads).
        self._buffer: Optional[FrameBuffer] = buffer if self._direct else None
        # Callers asleep while another reads, with what each waits for.
        self._sleepers: List[Tuple[threading.Condition, object]] = []
        self._reader: Optional[threading.Thread] = None
        try:
            if self._direct:
                assert isinstance(self._sock, _transport.SocketConnection)
                self._sock.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, int(_RECV_SLICE * 1e6))
                )
            else:
                self._reader = threading.Thread(
                    target=self._read_loop, args=(buffer,), name="lockbroker-reader", daemon=True
                )
                self._reader.start()
        except BaseException:
            # No session for anyone to close: do not leave its socket open.
            self._sock.close()
            raise
        _CLIENTS.add(self)

    # ----------------------------------------------------------------- state

    @property
    def path(self) -> str:
        """The socket path (pipe name on Windows) this client connected to."""
        return self.address.path

    @property
    def session_id(self) -> int:
        """This session's id, from the ``Welcome``."""
        return self.welcome.session_id

    @property
    def limits(self) -> Limits:
        """The limits this session runs under, from the ``Welcome``."""
        return self.welcome.limits

    @property
    def server_version(self) -> str:
        """The daemon's software version, from the ``Welcome``."""
        return self.welcome.server_version

    @property
    def protocol_version(self) -> int:
        """The protocol version the handshake agreed (4, or 3, 2 or 1 with
        an older daemon)."""
        return self.welcome.version

    @property
    def detects_deadlocks(self) -> bool:
        """Whether this session's acquires are checked for deadlock: asked
        for (``detect_deadlocks`` or ``actor``), and protocol version 3 or
        later."""
        return self._actors.detect and self._version >= 3

    @property
    def lost(self) -> bool:
        """True once the session ended other than by :meth:`close`.

        Every hold of the session is then gone, and every call raises
        :class:`ConnectionLost`.
        """
        self._read_arrived()
        ended = self._ended
        return ended is not None and not isinstance(ended, ClientClosed)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return isinstance(self._ended, ClientClosed)

    @property
    def lost_reason(self) -> Optional[ConnectionLost]:
        """Why the session ended (the exception calls raise), or None."""
        return self._ended

    @property
    def shutting_down(self) -> bool:
        """True once the daemon announced it is stopping (``ShuttingDown``)."""
        self._read_arrived()
        return self._shutting_down

    @property
    def state(self) -> Any:
        """The daemon's shared state through this session: a
        :class:`lockbroker.State`, the same as ``State(client)``, made on
        first use.

        Typed ``Any``: this module is below :mod:`lockbroker.state` (which
        imports it), so it cannot name ``State``; annotate
        ``state: lockbroker.State = client.state`` to have it checked.
        """
        state = self._state
        if state is None:
            make = _state_type
            if make is None:
                raise RuntimeError("lockbroker.state is not imported (import lockbroker)")
            state = self._state = make(self)
        return state

    @property
    def usable(self) -> bool:
        """True while the session is open and belongs to this process."""
        return self._ended is None and self._pid == os.getpid()

    def __repr__(self) -> str:
        state = "open" if self._ended is None else ("closed" if self.closed else "lost")
        return "<lockbroker.Client %s session=%d %s>" % (self.path, self.session_id, state)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the session: the daemon releases all its holds and waits.

        Pending calls fail with :class:`ClientClosed`. Idempotent.
        """
        if self._pid != os.getpid():
            return  # the parent's session is not ours to end
        if self._reader is None:
            # Callers read: mark the session closed and fail what waits in
            # one step (a waiter must never see it ended but not failed),
            # then shut the socket down, which wakes a caller in recv, and
            # close it once no caller reads it.
            self._abort(ClientClosed("the client was closed"))
            self._close_ended()
            return
        with self._lock:
            if self._ended is None:
                self._ended = ClientClosed("the client was closed")
        # Shutdown (not just close) wakes the reader thread from recv.
        self._sock.shutdown()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5.0)

    # ------------------------------------------------------- public requests

    def acquire(
        self,
        name: str,
        kind: LockKind,
        *,
        capacity: int = 0,
        permits: int = 1,
        timeout_ms: Optional[int] = None,
        notify_contended: bool = False,
        lease_ms: Optional[int] = None,
    ) -> Optional[Grant]:
        """Send ``Acquire`` and wait for its end (PROTOCOL.md 8.3-8.6).

        Returns the :class:`Grant`, or None if it timed out (a try that
        failed, or ``timeout_ms`` ran out). Raises a :class:`BrokerError`
        subclass if the daemon refused it (with deadlock detection on,
        :class:`Deadlock` for a wait that could never be granted),
        :class:`ConnectionLost` if the session ended. If the wait is
        interrupted (``KeyboardInterrupt``), the acquire is cancelled, and a
        grant that still arrives released. With deadlock detection on (see
        the class), it is sent as ``AcquireAs`` (or ``AcquireWith``) for
        the calling thread. With ``notify_contended`` the hold is told when
        someone waits behind it (:meth:`contended`, :meth:`wait_contended`;
        PROTOCOL.md 9.6); with ``lease_ms`` the hold lasts at most that
        long, then the daemon revokes it (:meth:`revoked`; PROTOCOL.md
        8.12). Either raises :class:`Unsupported` from a daemon that cannot
        (its etcd backend, or one of before protocol version 4).
        """
        # The daemon enforces timeout_ms; the local bound is only a safety net.
        local = None if timeout_ms is None else timeout_ms / 1000.0 + ACQUIRE_GRACE
        if local is not None and local > threading.TIMEOUT_MAX:
            local = None  # too far away for a local wait: as good as forever
        acquire = Acquire(name, LockKind(kind), capacity, permits, timeout_ms)
        request = self._actors.request(acquire, self._version, _common.thread_actor, notify_contended, lease_ms)
        rid, call = self._start(request)
        try:
            answered = self._await(call, local)
        except BaseException:
            self._interrupted(rid, call, cancel=True)
            raise
        if answered:
            response = call.outcome()
        else:
            late = self._give_up(rid, call, cancel=True)
            if late is None:
                return None
            response = late
        return _common.acquire_result(response)

    def release(self, hold_id: int) -> int:
        """Release one hold; returns the permits it still had (PROTOCOL.md 8.8).

        Raises :class:`NotHeld` (``unknown_hold``) if the session has no such hold.
        """
        with self._lock:
            self._live.discard(hold_id)
            self._contended.discard(hold_id)
            self._revoked.discard(hold_id)
        return _common.expect(self.call(Release(hold_id)), Released).permits

    def extend_lease(self, hold_id: int, lease_ms: int) -> None:
        """Make hold ``hold_id``'s lease end ``lease_ms`` from now (a hold
        without one gets one; PROTOCOL.md 8.12). Raises :class:`NotHeld`
        (``unknown_hold``) once it was revoked."""
        _common.need_version_4(self._version, "a lease")
        _common.expect(self.call(ExtendLease(hold_id, lease_ms)), Done)

    def break_lock(self, name: str, hold_id: Optional[int] = None) -> List[int]:
        """Revoke the holds of ``name`` (hold ``hold_id`` only, if given) of
        whichever sessions have them (PROTOCOL.md 8.13): each holder is
        told, the next holder that the lock was abandoned. The ids broken.
        Raises :class:`Forbidden` if one is another user's and this one is
        neither root nor in the daemon's admin group (nothing is broken),
        :class:`NotHeld` if nobody holds it."""
        _common.need_version_4(self._version, "breaking a lock")
        return list(_common.expect(self.call(Break(name, hold_id)), Broken).hold_ids)

    def revoked(self, hold_id: int) -> bool:
        """Whether hold ``hold_id`` was revoked: its lease ran out, and the
        session no longer has it."""
        self._read_arrived()
        with self._lock:
            return hold_id in self._revoked

    def contended(self, hold_id: int) -> bool:
        """Whether hold ``hold_id`` (acquired with ``notify_contended``)
        was told that someone waits behind it (PROTOCOL.md 9.6)."""
        self._read_arrived()
        with self._lock:
            return hold_id in self._contended

    def wait_contended(self, hold_id: int, timeout: Optional[float] = None) -> bool:
        """Wait at most ``timeout`` seconds (None: for ever) until hold
        ``hold_id``, acquired with ``notify_contended``, is told that
        someone waits behind it; whether it was. False at once if the
        session has ended; a hold that did not ask is never told."""
        told = lambda: hold_id in self._contended  # noqa: E731
        if self._direct:
            deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
            return self._lead(told, deadline, ("contended", hold_id))
        with self._contention:
            self._contention.wait_for(lambda: told() or self._ended is not None, timeout)
            return told()

    def release_by_name(self, name: str, count: int = 1) -> int:
        """Release ``count`` permits of ``name``, oldest hold first (PROTOCOL.md 8.9).

        For mutexes and rwlocks ``count`` counts holds. Raises
        :class:`NotHeld` (``not_held``) if the session holds fewer.
        """
        return _common.expect(self.call(ReleaseByName(name, count)), Released).permits

    def inspect(self, prefix: str = "", limit: int = 0) -> Inspection:
        """List lock entries whose name starts with ``prefix`` (PROTOCOL.md 9.1).

        ``limit`` 0 means the daemon's default (1000).
        """
        return _common.expect(self.call(Inspect(prefix, limit)), Inspection)

    def inspect_after(self, prefix: str = "", start_after: str = "", limit: int = 0) -> Inspection:
        """One page of the lock entries after ``start_after`` (PROTOCOL.md 9.1).

        When the answer is ``truncated``, more follow: ask again with
        ``start_after`` = the name of its last entry. ``limit`` 0 means the
        daemon's default (1000).
        """
        return _common.expect(self.call(InspectAfter(prefix, start_after, limit)), Inspection)

    def inspect_all(self, prefix: str = "", page: int = 1000) -> Iterator[EntryInfo]:
        """Every lock entry whose name starts with ``prefix``, in name order,
        read ``page`` entries at a time with :meth:`inspect_after`."""
        after = ""
        while True:
            inspection = self.inspect_after(prefix, after, page)
            yield from inspection.entries
            if not inspection.truncated or not inspection.entries:
                return
            after = inspection.entries[-1].name

    def ping(self) -> float:
        """Check the daemon and connection are alive; returns the round trip in seconds."""
        start = time.monotonic()
        _common.expect(self.call(Ping()), Pong)
        return time.monotonic() - start

    def metrics(self) -> str:
        """The daemon's metrics in the OpenMetrics text format (PROTOCOL.md 9.5).

        The text ends with ``# EOF``; the order of its lines is not fixed, and
        metrics this client does not know may appear. A daemon older than
        the request answers ``Fatal(malformed)`` and closes the connection:
        the session ends, and this (and every later call) raises
        :class:`ConnectionLost`, whose ``fatal.code`` is ``malformed``.
        """
        return _common.expect(self.call(Metrics()), MetricsText).text

    def open_watch(self, request: StateWatch, timeout: Optional[float] = -1.0) -> Tuple[int, "_WatchQueue"]:
        """Send ``StateWatch`` and wait for its ``Done``; the low-level watch API.

        Returns the watch id and the queue the reader thread puts the
        watch's events in (``StateChanged``, ``WatchLagged``, and a final
        ``_WatchEnd``). Most programs use :meth:`lockbroker.State.watch`,
        which wraps the queue in an iterator. Raises like :meth:`call`; if
        the wait is abandoned (timeout, interrupt), the watch is stopped.
        """
        events: _WatchQueue = queue.SimpleQueue()
        rid, call = self._start(request, events)
        bound = self.request_timeout if timeout == -1.0 else timeout
        try:
            answered = self._await(call, bound)
        except BaseException:
            self._orphan_watch(rid)
            raise
        try:
            if answered:
                response = call.outcome()
            else:
                late = self._give_up(rid, call, cancel=False)
                if late is None:
                    self._orphan_watch(rid)
                    raise NoAnswer("no answer from the daemon within %s s" % bound)
                response = late
            _common.expect(response, Done)
        except BaseException:
            self._drop_watch(rid)
            raise
        return rid, events

    def close_watch(self, watch_id: int) -> None:
        """Stop a watch (``StateUnwatch``) and wait for its ``Done``.

        Its queue gets a ``_WatchEnd(None)`` at once, and events still in
        flight are dropped. A watch that is already gone (``not_pending``),
        or a session that ended, is not an error.
        """
        self._drop_watch(watch_id)
        try:
            self.call(StateUnwatch(watch_id))
        except LockbrokerError as e:
            if not _common.watch_gone(e):
                raise

    def call(self, request: Request, timeout: Optional[float] = -1.0) -> Response:
        """Send any request and return its raw response; the low-level API.

        ``Response::Error`` is raised as a :class:`BrokerError` subclass.
        ``timeout`` bounds the wait in seconds (-1: ``request_timeout``;
        None: no bound); past it :class:`NoAnswer` is raised and a late
        answer is ignored. Use :meth:`acquire` for acquires: it also cancels
        and cleans up after an interrupted wait.
        """
        rid, call = self._start(request)
        bound = self.request_timeout if timeout == -1.0 else timeout
        try:
            answered = self._await(call, bound)
        except BaseException:
            self._interrupted(rid, call, cancel=isinstance(request, _ACQUIRES))
            raise
        if not answered:
            late = self._give_up(rid, call, cancel=isinstance(request, _ACQUIRES))
            if late is None:
                raise NoAnswer("no answer from the daemon within %s s" % bound)
            return self._check(late)
        return self._check(call.outcome())

    # -------------------------------------------------------------- plumbing

    def _connect(
        self,
        client_name: str,
        timeout: float,
        allow_uids: Iterable[int],
        allow_sids: Iterable[str],
        version: int,
    ) -> Tuple[_transport.Connection, Welcome, FrameBuffer]:
        """Connect, check who serves the socket or pipe (PROTOCOL.md 1), and
        handshake in protocol ``version`` (6.1); raises ConnectFailed."""
        path = self.address.path
        # Checks who serves it before returning: nothing is sent before.
        sock = _transport.connect(self.address, timeout, allow_uids, allow_sids)
        try:
            buffer = FrameBuffer(HANDSHAKE_MAX_FRAME_LEN)
            try:
                sock.sendall(_common.hello_frame(version, client_name))
            except OSError:
                # A full daemon may answer Fatal and close before reading the
                # Hello (PROTOCOL.md 6.1): read its answer anyway.
                pass
            welcome: Optional[Welcome] = None
            while welcome is None:
                try:
                    data = sock.recv(65536)
                except OSError as e:
                    raise _common.handshake_failed(path, e) from e
                welcome = _common.read_welcome(buffer, data, path, version)
            sock.settimeout(None)
            return sock, welcome, buffer
        except BaseException:
            sock.close()
            raise

    def _check_usable(self) -> None:
        """Raise if no request may be sent now. Called with ``_lock`` held."""
        if self._pid != os.getpid():
            raise ConnectionLost(
                "this Client belongs to process %d, not to this forked child; "
                "create a new Client (or use the default client) here" % self._pid
            )
        if self._ended is not None:
            raise self._ended

    def _start(self, request: Request, watch: "Optional[_WatchQueue]" = None) -> Tuple[int, _Call]:
        """Register a call under a fresh id and write its frame.

        ``watch``: the queue of a ``StateWatch``, registered under the id
        together with the call, before anything is written.
        """
        call = _Call()
        with self._lock:
            self._check_usable()
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = call
            if watch is not None:
                self._watches[rid] = watch
        try:
            self._write(RequestMessage(rid, request))
        except BaseException as e:
            if getattr(e, "_lockbroker_sent", False) and isinstance(request, _ACQUIRES):
                # Interrupted once the acquire was out: cancel it, as an
                # interrupted wait does.
                self._interrupted(rid, call, cancel=True)
                raise
            with self._lock:
                self._pending.pop(rid, None)
                self._watches.pop(rid, None)
            raise
        return rid, call

    def _write(self, message: RequestMessage) -> None:
        """Encode and write one frame; a failed write ends the session."""
        frame = _common.request_frame(message, self._max_send)
        try:
            self._write_frame(frame)
        finally:
            if self._ended is not None:
                # A write that ended the session closes the socket, unless
                # a caller still reads it (then that caller does).
                self._close_ended()

    def _write_frame(self, frame: bytes) -> None:
        """Write one whole frame, or end the session."""
        sock = self._sock
        with self._write_lock:
            if not isinstance(sock, _transport.SocketConnection):
                try:
                    sock.sendall(frame)
                except BaseException as e:
                    # A partly written frame would corrupt the stream: end it.
                    self._abort(ConnectionLost("writing to the daemon failed: %r" % (e,)))
                    if isinstance(e, OSError):
                        raise self._ended or ConnectionLost(str(e)) from e
                    raise
                return
            # socket.sendall raises an interrupt that arrives while it runs
            # even when every byte went out, so the bytes sent are counted
            # here instead -- by list.extend, in C, so an interrupt raised
            # as a send returns still finds its count in ``sent``.
            view = memoryview(frame)
            sent: List[int] = []
            try:
                while sum(sent) < len(view):
                    sent.extend(map(sock.sock.send, (view[sum(sent) :],)))
            except BaseException as e:
                done = sum(sent)
                if not isinstance(e, OSError) and done < len(view):
                    # Interrupted inside the frame: finish it, so the stream
                    # stays whole and the session goes on.
                    try:
                        sock.sendall(view[done:])
                        done = len(view)
                    except BaseException:
                        pass
                if isinstance(e, OSError) or done < len(view):
                    self._abort(ConnectionLost("writing to the daemon failed: %r" % (e,)))
                    if isinstance(e, OSError):
                        raise self._ended or ConnectionLost(str(e)) from e
                    raise
                # The whole frame is out: only the caller was interrupted.
                e._lockbroker_sent = True  # type: ignore[attr-defined]
                raise

    def _send_untracked(self, request: Request) -> None:
        """Send a request whose answer nobody waits for (it gets an unknown id)."""
        with self._lock:
            self._check_usable()
            rid = self._next_id
            self._next_id += 1
        self._write(RequestMessage(rid, request))

    def _give_up(self, rid: int, call: _Call, cancel: bool) -> Optional[Response]:
        """Stop waiting for request ``rid``.

        If it is still pending, forget it (its answer will have an unknown
        id), send ``Cancel`` if it is an acquire, and return None. If the
        reader already took it, its outcome is being set right now: wait for
        it and return the response (or raise its error).
        """
        with self._lock:
            still_pending = self._pending.pop(rid, None) is not None
        if still_pending:
            if cancel:
                try:
                    if self._direct:
                        # A grant that raced the cancel comes before its
                        # answer: read it now, so it is released now.
                        _, answer = self._start(Cancel(rid))
                        self._await(answer, CANCEL_WAIT)
                    else:
                        self._send_untracked(Cancel(rid))
                except (LockbrokerError, OSError):
                    pass  # session gone: nothing is held or waiting any more
            return None
        call.wait(None)
        return call.outcome()

    def _interrupted(self, rid: int, call: _Call, cancel: bool) -> None:
        """A caller was interrupted waiting for ``rid``: stop waiting (with a
        ``Cancel`` if ``cancel``) and release a grant that won the race."""
        try:
            late = self._give_up(rid, call, cancel=cancel)
        except LockbrokerError:
            late = None
        if isinstance(late, Granted):
            self._release_orphan(late.grant.hold_id)

    def _release_orphan(self, hold_id: int) -> None:
        """Release a hold nobody will use; errors mean it is gone anyway."""
        try:
            self._send_untracked(Release(hold_id))
        except (LockbrokerError, OSError):
            pass

    def _drop_watch(self, watch_id: int) -> None:
        """Unregister a watch's queue and end it as closed."""
        with self._lock:
            events = self._watches.pop(watch_id, None)
        if events is not None:
            events.put(_WatchEnd(None))

    def _orphan_watch(self, watch_id: int) -> None:
        """Give up a watch whose ``Done`` nobody waits for: drop its queue,
        send ``StateUnwatch``, and unwatch again at its first event (an
        unwatch read before the watch's ``Done`` may find nothing to stop)."""
        with self._lock:
            self._pending.pop(watch_id, None)
            self._orphan_watches.add(watch_id)
        self._drop_watch(watch_id)
        self._unwatch_orphan(watch_id)

    def _watch_finalized(self, watch_id: int) -> None:
        """A Watch was garbage-collected unclosed (any thread, during GC).

        Takes no lock (the collecting thread may hold one): marks the id an
        orphan, then forgets its queue (both single atomic operations, in
        that order so an event always finds one of them); the reader
        unwatches at the watch's next event.
        """
        self._orphan_watches.add(watch_id)
        self._watches.pop(watch_id, None)

    def _unwatch_orphan(self, watch_id: int) -> None:
        """Send ``StateUnwatch`` nobody waits for; errors mean it is gone anyway."""
        try:
            self._send_untracked(StateUnwatch(watch_id))
        except (LockbrokerError, OSError):
            pass

    _check = staticmethod(_common.checked)
    _unexpected = staticmethod(_common.unexpected)

    def _read_loop(self, buffer: FrameBuffer) -> None:
        """The reader thread (pipes): route every frame until the connection ends."""
        error: Optional[ConnectionLost] = None
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    error = _common.stream_end(buffer)
                    break
                buffer.feed(data)
                error = self._drain(buffer)
                if error is not None:
                    break
        except Exception as e:  # a bug here must not leave callers hanging
            error = _common.reader_failed(e)
        assert error is not None
        self._abort(error)

    def _drain(self, buffer: FrameBuffer) -> Optional[ConnectionLost]:
        """Route every whole frame in ``buffer``; an error that ends the session."""
        return _common.route_frames(buffer, self._version, self._route, self._route_event, self._on_shutting_down)

    def _on_shutting_down(self) -> None:
        """The daemon announced it is stopping: every hold is about to be lost."""
        self._shutting_down = True

    # ------------------------------------------------- callers that read

    def _await(self, call: _Call, timeout: Optional[float]) -> bool:
        """Wait at most ``timeout`` for ``call``'s outcome; whether it came."""
        if not self._direct:
            return call.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        return self._lead(lambda: call.done, deadline, call)

    def _watch_item(self, watch_id: int, events: "_WatchQueue", timeout: Optional[float]) -> Any:
        """The next item of a watch's queue, waiting at most ``timeout``;
        raises ``queue.Empty`` if none came."""
        if not self._direct:
            return events.get() if timeout is None else events.get(timeout=max(timeout, 0.0))
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        self._lead(lambda: not events.empty(), deadline, ("watch", watch_id))
        return events.get_nowait()

    def _read_arrived(self) -> None:
        """Route what the daemon has sent, without waiting, if nobody reads."""
        if self._direct and self._ended is None and self._pid == os.getpid():
            self._lead(lambda: False, time.monotonic(), None)

    def _lead(self, ready: Callable[[], bool], deadline: Optional[float], key: object) -> bool:
        """Wait until ``ready()`` (checked under ``_lock``) or ``deadline``:
        read while the buffer is free, else sleep until woken. Whether
        ``ready()`` became true. A deadline already passed still reads
        once, without waiting, what has arrived."""
        lock = self._lock
        cond: Optional[threading.Condition] = None
        read_once = False
        lock.acquire()
        try:
            while True:
                if ready():
                    return True
                if self._ended is not None:
                    return ready()
                now = time.monotonic()
                expired = deadline is not None and deadline <= now
                if expired and read_once:
                    return False
                buffer, self._buffer = self._buffer, None
                if buffer is not None:
                    lock.release()
                    try:
                        read_once = True
                        self._read_some(buffer, deadline)
                    finally:
                        lock.acquire()
                        self._buffer = buffer
                    continue
                if expired:
                    return False
                if cond is None:
                    cond = threading.Condition(lock)
                entry = (cond, key)
                self._sleepers.append(entry)
                try:
                    cond.wait(None if deadline is None else deadline - now)
                finally:
                    self._sleepers.remove(entry)
        finally:
            # Whoever leaves with the buffer free wakes a sleeper to read.
            if self._buffer is not None and self._sleepers:
                self._sleepers[0][0].notify()
            ended = self._ended is not None
            lock.release()
            if ended:
                # The last reader of an ended session closes its socket.
                self._close_ended()

    def _read_some(self, buffer: FrameBuffer, deadline: Optional[float]) -> None:
        """Read once, waiting until ``deadline`` at most, and route what came.
        Called without ``_lock``, by the one caller holding the buffer."""
        sock = self._sock
        assert isinstance(sock, _transport.SocketConnection)
        try:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < _RECV_SLICE:
                    poller = select.poll()
                    poller.register(sock.sock, select.POLLIN)
                    if not poller.poll(max(0, int(left * 1000.0 + 0.999))):
                        return
            data = sock.recv(65536)
        except BlockingIOError:
            return  # SO_RCVTIMEO ran out: the caller looks at its deadline
        except OSError as e:
            self._abort(_common.reader_failed(e))
            return
        # What was read is routed, or the session ends: an answer dropped by
        # an interrupt would leave its caller waiting, or a grant held.
        try:
            if not data:
                error: Optional[ConnectionLost] = _common.stream_end(buffer)
            else:
                buffer.feed(data)
                error = self._drain(buffer)
        except BaseException as e:
            self._abort(ConnectionLost("interrupted while routing the daemon's answers: %r" % (e,)))
            if isinstance(e, Exception):
                return  # a bug here must not leave callers hanging
            raise
        if error is not None:
            self._abort(error)

    def _wake(self, key: object) -> None:
        """Wake the sleepers waiting for ``key``. Called with ``_lock`` held."""
        for cond, waits_for in self._sleepers:
            if waits_for is key or waits_for == key:
                cond.notify()

    def _route(self, message: ResponseMessage) -> None:
        """Hand a response to the call waiting for its id."""
        response = message.response
        if _common.ignored(response):
            return
        with self._lock:
            call = self._pending.pop(message.id, None)
            if call is not None and isinstance(response, Granted):
                self._live.add(response.grant.hold_id)
            if call is not None and self._direct:
                # Under the lock, so a caller giving up sees it resolved.
                call.resolve(response)
                self._wake(call)
                return
        if call is not None:
            call.resolve(response)
            return
        hold_id = _common.stray_hold(response)
        if hold_id is not None:
            # Granted for an acquire nobody waits for any more: release it,
            # from another thread so the reader never blocks on a write.
            threading.Thread(
                target=self._release_orphan,
                args=(hold_id,),
                name="lockbroker-orphan-release",
                daemon=True,
            ).start()

    def _route_event(self, event: Union[StateChanged, WatchLagged, Contended, Revoked]) -> None:
        """Hand a watch's event to its queue (never blocks: the queue is
        unbounded); note a hold told of contention."""
        if isinstance(event, Contended):
            with self._lock:
                if event.hold_id in self._live:
                    self._contended.add(event.hold_id)
                    self._contention.notify_all()
                    self._wake(("contended", event.hold_id))
            return
        if isinstance(event, Revoked):
            with self._lock:
                if event.hold_id in self._live:
                    self._revoked.add(event.hold_id)
            return
        wid = event.watch_id
        with self._lock:
            events, orphan = _common.event_target(self._watches, self._orphan_watches, wid)
        if events is not None:
            events.put(event)
            if self._direct:
                with self._lock:
                    self._wake(("watch", wid))
        elif orphan:
            # Nobody consumes this watch any more: stop it, from another
            # thread so the reader never blocks on a write.
            threading.Thread(
                target=self._unwatch_orphan, args=(wid,), name="lockbroker-orphan-unwatch", daemon=True
            ).start()
        # Any other event of an unknown watch (one just closed) is ignored.

    def _abort(self, error: ConnectionLost) -> None:
        """End the session: fail every pending call and end every watch,
        shut the socket down (the reader thread also closes it; when callers
        read, :meth:`_close_ended` does)."""
        with self._lock:
            if self._ended is None:
                self._ended = error
            ended = self._ended
            pending, self._pending = self._pending, {}
            watches, self._watches = self._watches, {}
            for call in pending.values():
                call.fail(ended)
            for events in watches.values():
                events.put(_WatchEnd(ended))
            for cond, _ in self._sleepers:
                cond.notify()
            self._contended.clear()
            self._live.clear()
            self._contention.notify_all()
            if self._direct:
                # Under the lock, so it never races the close (_close_ended).
                self._sock.shutdown()
                return
        self._sock.shutdown()
        if threading.current_thread() is self._reader:
            self._sock.close()

    def _close_ended(self) -> None:
        """Callers read: close the socket of the ended session once nobody
        uses it. Nobody takes the frame buffer once the session has ended,
        so it closes now if the buffer is free, else the caller holding it
        closes it as it leaves :meth:`_lead`. Under ``_write_lock`` and
        ``_lock``, so no write, read or shutdown is on the descriptor as it
        closes; called holding neither."""
        if not self._direct:
            return  # the reader thread closes it as it ends
        with self._write_lock:
            with self._lock:
                if self._ended is not None and self._buffer is not None:
                    self._sock.close()

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's session without ending it.

        Closing our copy of the descriptor (never ``shutdown``) lets the
        session end when the parent's copy closes; a fork must not keep the
        parent's holds alive. Fresh locks: a parent thread may have held the
        old ones at the fork.
        """
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._contention = threading.Condition(self._lock)
        self._pending = {}
        self._watches = {}
        self._live = set()
        self._contended = set()
        self._revoked = set()
        try:
            self._sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------ default


_default_lock = threading.Lock()
_default: Optional[Client] = None


def default_client() -> Client:
    """The process-wide shared client, connected on first use.

    It is replaced by a new connection when the process is a fork child of
    the one that made it, or when its session ended (holds taken through the
    old one are gone: releasing them raises :class:`ConnectionLost`).
    """
    global _default
    with _default_lock:
        client = _default
        if client is None or not client.usable:
            client = Client()
            _default = client
        return client


def set_default_client(client: Optional[Client]) -> None:
    """Make ``client`` the default (None: connect a new one on next use)."""
    global _default
    with _default_lock:
        _default = client


def _after_fork_in_child() -> None:
    global _default_lock, _default
    _default_lock = threading.Lock()
    _default = None
    for client in list(_CLIENTS):
        client._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

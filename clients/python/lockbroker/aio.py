"""The lockbroker client for asyncio: locks, semaphores, rwlocks, shared
state and watches as coroutines.

The objects mirror the ``threading``-style ones of :mod:`lockbroker.primitives`
and :mod:`lockbroker.state`, with ``await`` where those block::

    from lockbroker import aio

    lock = aio.Lock("deploy/status")        # the event loop's default client
    async with lock:
        ...                                 # no other process holds it here
    if await lock.acquire(timeout=5):       # the daemon times the wait out
        try:
            ...
        finally:
            await lock.release()

What it is made of:

* :class:`Client`: one session over one Unix socket (the address the
  threading :class:`lockbroker.Client` would use, with the same trust
  checks), handshake in protocol version 3 with the fallback to version 2,
  then 1, and one reader task that routes every frame the daemon sends: a response
  to the future registered under its request id, a watch's event to that
  watch's queue. Frames are written with ``transport.write`` (synchronous),
  so a request is either wholly sent or not at all, whatever cancels the
  task that sends it. The codec is :mod:`lockbroker.protocol`'s; the
  rules of the session (trust checks, handshake, routing, what an answer
  means) are :mod:`lockbroker._common`'s, the threading client's too.
* :func:`default_client`: one connection per event loop, made on first use
  and again after it ended; ``Lock("x")`` without a client uses it.
* :class:`Lock`, :class:`BoundedSemaphore`, :class:`RWLock`: the
  ``threading`` arguments and errors, as coroutines, and ``async with``.
* :class:`State` and :class:`Watch`: the shared state, and watches as async
  iterators.

**Cancellation never leaks a hold.** When a task waiting in an acquire is
cancelled (``task.cancel()``, ``asyncio.wait_for``, ``asyncio.timeout``),
the client sends ``Cancel`` for it and waits (at most :data:`CANCEL_WAIT`
seconds, shielded from further cancellation) for the acquire's own answer,
which the daemon sends exactly once (PROTOCOL.md 8.5, 8.7): ``Cancelled``,
or a ``Granted`` that raced the cancel, which the client then releases;
then the ``CancelledError`` propagates. So once ``acquire`` has raised
``CancelledError``, the ``Release`` of a raced grant is already written:
every later request of the session is read by the daemon after it. The
acquire's future stays registered until its answer comes, so the release
happens exactly once even if that wait is itself cut short.

Timeouts (``timeout=``) are sent to the daemon, which times the wait out
(in whole milliseconds, rounded up), so they cost no cancel round trip and
keep their place in the FIFO queue for exactly that long.

**Windows.** Only Unix sockets: on Windows :class:`Client` raises
``NotImplementedError``; use the threading client
(:class:`lockbroker.Client`, named pipes) there, e.g. through
``asyncio.to_thread`` for calls that do not wait.

A :class:`Client` belongs to the event loop that connected it (using it
from another raises ``RuntimeError``) and to the process (in a forked child
every call raises :class:`~lockbroker.errors.ConnectionLost`).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import weakref
from collections import deque
from contextlib import asynccontextmanager
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Set,
    Tuple,
    Union,
)

from . import _common
from . import address as _address
from ._common import _WatchEnd
from .client import ACQUIRE_GRACE, _default_client_name
from .errors import (
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    LockbrokerError,
    LockTimeout,
    NoAnswer,
    NotHeld,
    VersionConflict,
)
from .primitives import _lock_timeout_ms, _semaphore_timeout_ms
from .protocol import (
    Acquire,
    Break,
    Broken,
    Cancel,
    Contended,
    Done,
    EntryInfo,
    ErrorCode,
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
    StateConflict,
    StateCounter,
    StateEntries,
    StateEntry,
    StateGet,
    StateIncrement,
    StateList,
    StateRemove,
    StateRemoved,
    StateSet,
    StateUnwatch,
    StateValue,
    StateWatch,
    StateWritten,
    Versioned,
    WatchLagged,
    Welcome,
)
from .state import TTL, Changed, Lagged, Value, WatchEvent, _check_value_len, _hold_id, _to_bytes, _ttl_ms

__all__ = [
    "Client",
    "connect",
    "default_client",
    "set_default_client",
    "Lock",
    "BoundedSemaphore",
    "RWLock",
    "State",
    "Watch",
    "Changed",
    "Lagged",
    "WatchEvent",
    "CANCEL_WAIT",
]

#: Seconds a cancelled acquire waits for the daemon's answer to it (the
#: ``Cancelled``, or a raced ``Granted`` to release) before its
#: ``CancelledError`` propagates. The answer normally takes one round trip;
#: past this bound the release still happens when the answer comes.
CANCEL_WAIT = 5.0

#: Bytes buffered in the transport above which a writer waits for the
#: socket to drain (flow control for large state values).
_DRAIN_ABOVE = 1 << 20

#: What a watch's queue holds: events, then possibly one end marker.
_WatchItem = Union[StateChanged, WatchLagged, _WatchEnd]


class _WatchQueue:
    """A watch's events, unbounded: the reader task only appends, so a slow
    consumer never holds up the other requests of the session."""

    def __init__(self) -> None:
        self.items: Deque[_WatchItem] = deque()
        self.signal = asyncio.Event()

    def put(self, item: _WatchItem) -> None:
        self.items.append(item)
        self.signal.set()

    async def get(self, timeout: Optional[float]) -> Optional[_WatchItem]:
        """The next item, or None if ``timeout`` seconds passed first.

        Waits on an event rather than a ``Queue.get`` so that a timeout or
        a cancel can never lose an item: items leave only here, after the
        wait.
        """
        if not self.items:
            try:
                if timeout is None:
                    await self.signal.wait()
                else:
                    await asyncio.wait_for(self.signal.wait(), max(timeout, 0.0))
            except asyncio.TimeoutError:
                pass
        if not self.items:
            return None
        item = self.items.popleft()
        if not self.items:
            self.signal.clear()
        return item


def _task_actor() -> int:
    """The calling task's actor (``id(asyncio.current_task())`` mixed as
    :func:`lockbroker._common.own_actor` does); outside a task, the calling
    thread's."""
    task = _current_task()
    if task is None:
        return _common.thread_actor()
    return _common.own_actor("task", id(task))


def _observe(future: "asyncio.Future[Any]") -> None:
    """Mark a future's exception retrieved, so an answer nobody awaits
    (the session ended under an abandoned call) is not logged as lost."""
    if not future.cancelled():
        future.exception()


class Client:
    """One session with the lockbroker daemon, for one asyncio event loop.

    The arguments are the threading :class:`lockbroker.Client`'s (minus the
    Windows-only ``allow_sids``): ``path`` (else ``$LOCKBROKER_SOCKET``,
    else the default of ``scope``), ``client_name`` (shown by Inspect;
    default the program's name), ``connect_timeout`` (bounds connect and
    handshake, both tries), ``request_timeout`` (bounds the wait for the
    answer to a request other than an acquire; None: no bound) and
    ``allow_uids`` (also trust daemons run by these users). The trust
    checks are the threading client's (:class:`Untrusted`).

    ``detect_deadlocks`` and ``actor`` are the threading client's too, with
    the task for the thread: with ``detect_deadlocks=True`` each acquire is
    made on behalf of the task that awaits it (``AcquireAs``), and the
    daemon refuses one whose wait could never be granted with
    :class:`~lockbroker.errors.Deadlock` (code 209, PROTOCOL.md 8.11). The
    daemon takes a waiting task to release nothing until its wait ends: leave
    detection off (the default) where a task holds a lock while it awaits
    another that only another task's release, or a timeout, would end.
    ``actor`` (any 64-bit number but 0) is, when given, the actor of every
    acquire, and turns detection on. With detection on, the actors
    ``$LOCKBROKER_ACTOR`` names (set by ``lockbroker lock`` for the command
    it runs) are those every acquire's actor runs within (``AcquireWith``,
    protocol version 4): the wrapper keeps its lock while the command
    waits. Acquires are plain with a daemon of before protocol version 3.

    The constructor does no I/O; ``await client.connect()`` (or
    ``async with Client(...) as client``, or :func:`connect`) opens the
    session, raising :class:`ConnectFailed` if no daemon answers. The
    session ends with :meth:`close` or when the connection ends; it is
    never reopened (``client.lost`` tells), and every later call raises
    :class:`ConnectionLost`. Unix sockets only: ``NotImplementedError`` on
    Windows (use the threading client there).
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
        detect_deadlocks: bool = False,
        actor: Optional[int] = None,
    ) -> None:
        if os.name == _address.WINDOWS or not hasattr(socket, "AF_UNIX"):
            raise NotImplementedError(
                "lockbroker.aio speaks to the daemon over Unix sockets only; on Windows use the "
                "threading client, lockbroker.Client (named pipes)"
            )
        # On whose behalf acquires are made.
        self._actors = _common.Actors(detect_deadlocks, actor)
        self.address = _address.resolve(path, scope)
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.client_name = _default_client_name() if client_name is None else client_name
        self._allow_uids = tuple(allow_uids)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reader_task: Optional["asyncio.Task[None]"] = None
        self._welcome: Optional[Welcome] = None
        self._version = PROTOCOL_VERSION
        self._pending: Dict[int, "asyncio.Future[Response]"] = {}
        self._watches: Dict[int, _WatchQueue] = {}
        # Watches nobody consumes any more: unwatched again at their next
        # event (an unwatch read before the watch's Done may stop nothing).
        self._orphan_watches: Set[int] = set()
        # Holds told that someone waits behind them (Contended), until
        # released; and an event set (then replaced) whenever one is told.
        # Holds granted and not released: news of others is ignored.
        self._live: Set[int] = set()
        self._contended: Set[int] = set()
        self._contention: Optional[asyncio.Event] = None
        # Holds revoked (their lease ran out), until released.
        self._revoked: Set[int] = set()
        self._next_id = 1
        self._ended: Optional[ConnectionLost] = None
        self._shutting_down = False
        self._connecting: Optional["asyncio.Future[None]"] = None
        self._drain_lock: Optional[asyncio.Lock] = None
        self._state: Optional[State] = None
        self._pid = os.getpid()
        #: How many grants nobody awaited (raced a cancel, or came for an
        #: unknown id) this client released; for tests and diagnostics.
        self.orphans_released = 0

    # ----------------------------------------------------------- connecting

    async def connect(self) -> "Client":
        """Open the session (idempotent); returns the client.

        Raises :class:`ConnectFailed` (or :class:`Untrusted`) if no session
        could be opened; a client that failed to connect can try again.
        """
        if self._welcome is not None:
            if self._ended is not None:
                raise self._ended
            return self
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            # Shielded: one caller's cancel must not fail the others' connect.
            await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                _observe(connecting)
                if connecting.cancelled() or connecting.exception() is not None:
                    self._connecting = None  # let a later connect try again
        return self

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        version, left = PROTOCOL_VERSION, self.connect_timeout
        while True:
            try:
                opened = await self._connect_once(version, left)
                break
            except ConnectFailed as e:
                # A daemon of before this version: ask in the next lower one.
                older = _common.fallback_version(e, version)
                if older is None:
                    raise
                version, left = older, max(deadline - loop.time(), 0.001)
        reader, writer, welcome, buffer = opened
        self._loop = loop
        self._writer = writer
        self._welcome = welcome
        self._version = welcome.version
        self._drain_lock = asyncio.Lock()
        self._reader_task = loop.create_task(self._read_loop(reader, buffer))

    async def _connect_once(
        self, version: int, timeout: float
    ) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter, Welcome, FrameBuffer]:
        """Connect, check who serves the socket (PROTOCOL.md 1) and handshake
        in protocol ``version`` (6.1), all within ``timeout``."""
        path = self.address.path
        expected = _common.expected_unix_server(self.address, self._allow_uids)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        writer: Optional[asyncio.StreamWriter] = None
        try:
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), timeout)
            except asyncio.TimeoutError:
                raise ConnectFailed("connecting to %s timed out after %s s" % (path, timeout), path) from None
            except OSError as e:
                raise _common.connect_failed(self.address, e) from e
            # Before the Hello, which names this program.
            _address.check_server(sock, path, expected)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            try:
                welcome, buffer = await asyncio.wait_for(self._handshake(reader, writer, version), timeout)
            except asyncio.TimeoutError:
                raise ConnectFailed("handshake with %s timed out after %s s" % (path, timeout), path) from None
            return reader, writer, welcome, buffer
        except BaseException:
            if writer is not None:
                writer.close()
            else:
                sock.close()
            raise

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int
    ) -> Tuple[Welcome, FrameBuffer]:
        path = self.address.path
        buffer = FrameBuffer(HANDSHAKE_MAX_FRAME_LEN)
        # A full daemon may answer Fatal and close before reading the Hello
        # (PROTOCOL.md 6.1): a failed write is not the end, its answer is.
        writer.write(_common.hello_frame(version, self.client_name))
        welcome: Optional[Welcome] = None
        while welcome is None:
            try:
                data = await reader.read(65536)
            except OSError as e:
                raise _common.handshake_failed(path, e) from e
            welcome = _common.read_welcome(buffer, data, path, version)
        return welcome, buffer

    async def __aenter__(self) -> "Client":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- state

    @property
    def welcome(self) -> Welcome:
        """The daemon's ``Welcome`` (``RuntimeError`` before :meth:`connect`)."""
        if self._welcome is None:
            raise RuntimeError("the client is not connected: await client.connect() first")
        return self._welcome

    @property
    def path(self) -> str:
        """The socket path this client connects to."""
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
        return self._actors.detect and self.welcome.version >= 3

    @property
    def lost(self) -> bool:
        """True once the session ended other than by :meth:`close`; every
        hold of the session is then gone."""
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
        return self._shutting_down

    @property
    def usable(self) -> bool:
        """True while the session is open and belongs to this process."""
        return self._welcome is not None and self._ended is None and self._pid == os.getpid()

    @property
    def loop(self) -> Optional[asyncio.AbstractEventLoop]:
        """The event loop the session belongs to (None before connecting)."""
        return self._loop

    @property
    def state(self) -> "State":
        """The daemon's shared state through this session (``State(client)``)."""
        if self._state is None:
            self._state = State(self)
        return self._state

    def __repr__(self) -> str:
        if self._welcome is None:
            return "<lockbroker.aio.Client %s not connected>" % self.path
        state = "open" if self._ended is None else ("closed" if self.closed else "lost")
        return "<lockbroker.aio.Client %s session=%d %s>" % (self.path, self.session_id, state)

    async def close(self) -> None:
        """End the session: the daemon releases all its holds and waits.

        Pending calls fail with :class:`ClientClosed`. Idempotent.
        """
        if self._pid != os.getpid() or self._welcome is None:
            return  # nothing opened, or the parent's session: not ours to end
        self._abort(ClientClosed("the client was closed"))
        task = self._reader_task
        if task is not None and task is not asyncio.current_task():
            # asyncio.wait: neither raises the task's outcome nor cancels it.
            await asyncio.wait((task,), timeout=5.0)
        writer = self._writer
        if writer is not None:
            try:
                await asyncio.wait_for(writer.wait_closed(), 5.0)
            except (OSError, asyncio.TimeoutError):
                pass

    # ------------------------------------------------------ public requests

    async def acquire(
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
        failed, or ``timeout_ms`` ran out at the daemon). With
        ``notify_contended`` the hold is told when someone waits behind it
        (:meth:`contended`, :meth:`wait_contended`; PROTOCOL.md 9.6); with
        ``lease_ms`` it lasts at most that long (:meth:`revoked`; 8.12). Raises a
        :class:`BrokerError` subclass if the daemon refused it (with deadlock
        detection on, :class:`~lockbroker.errors.Deadlock` for a wait that
        could never be granted), :class:`ConnectionLost` if the session
        ended. If the task is cancelled while waiting, the acquire is
        cancelled at the daemon and a grant that raced the cancel released
        before ``CancelledError`` propagates (see the module's doc). With
        deadlock detection on (see the class), it is sent as ``AcquireAs``
        (or ``AcquireWith``) for the calling task.
        """
        # The daemon enforces timeout_ms; the local bound is only a safety
        # net against a daemon that stopped answering.
        local = None if timeout_ms is None else timeout_ms / 1000.0 + ACQUIRE_GRACE
        acquire = Acquire(name, LockKind(kind), capacity, permits, timeout_ms)
        request = self._actors.request(acquire, self._version, _task_actor, notify_contended, lease_ms)
        rid, future = self._start(request)
        try:
            await self._drain()
            await asyncio.wait((future,), timeout=local)
        except asyncio.CancelledError:
            await self._give_up_acquire(rid, future)
            raise
        if not future.done():
            await self._give_up_acquire(rid, future)
            return None
        return _common.acquire_result(future.result())

    async def release(self, hold_id: int) -> int:
        """Release one hold; returns the permits it still had (PROTOCOL.md 8.8).

        Raises :class:`NotHeld` (``unknown_hold``) if the session has no
        such hold. The ``Release`` is written before the first ``await``,
        so a task cancelled in here still releases.
        """
        self._live.discard(hold_id)
        self._contended.discard(hold_id)
        self._revoked.discard(hold_id)
        return _common.expect(await self.call(Release(hold_id)), Released).permits

    async def extend_lease(self, hold_id: int, lease_ms: int) -> None:
        """Make hold ``hold_id``'s lease end ``lease_ms`` from now
        (PROTOCOL.md 8.12); :class:`NotHeld` once it was revoked."""
        _common.need_version_4(self._version, "a lease")
        _common.expect(await self.call(ExtendLease(hold_id, lease_ms)), Done)

    async def break_lock(self, name: str, hold_id: Optional[int] = None) -> List[int]:
        """Revoke the holds of ``name`` (hold ``hold_id`` only, if given);
        see :meth:`lockbroker.Client.break_lock`."""
        _common.need_version_4(self._version, "breaking a lock")
        return list(_common.expect(await self.call(Break(name, hold_id)), Broken).hold_ids)

    def revoked(self, hold_id: int) -> bool:
        """Whether hold ``hold_id`` was revoked: its lease ran out."""
        return hold_id in self._revoked

    def contended(self, hold_id: int) -> bool:
        """Whether hold ``hold_id`` (acquired with ``notify_contended``)
        was told that someone waits behind it (PROTOCOL.md 9.6)."""
        return hold_id in self._contended

    async def wait_contended(self, hold_id: int, timeout: Optional[float] = None) -> bool:
        """Wait at most ``timeout`` seconds (None: for ever) until hold
        ``hold_id``, acquired with ``notify_contended``, is told that
        someone waits behind it; whether it was. False once the session
        has ended; a hold that did not ask is never told."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(timeout, 0.0)
        while hold_id not in self._contended and self._ended is None:
            if self._contention is None:
                self._contention = asyncio.Event()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                break
            try:
                await asyncio.wait_for(self._contention.wait(), left)
            except asyncio.TimeoutError:
                break
        return hold_id in self._contended

    async def release_by_name(self, name: str, count: int = 1) -> int:
        """Release ``count`` permits of ``name``, oldest hold first (PROTOCOL.md 8.9).

        Raises :class:`NotHeld` (``not_held``) if the session holds fewer.
        """
        return _common.expect(await self.call(ReleaseByName(name, count)), Released).permits

    async def inspect(self, prefix: str = "", limit: int = 0) -> Inspection:
        """List lock entries whose name starts with ``prefix`` (PROTOCOL.md 9.1)."""
        return _common.expect(await self.call(Inspect(prefix, limit)), Inspection)

    async def inspect_after(self, prefix: str = "", start_after: str = "", limit: int = 0) -> Inspection:
        """One page of the lock entries after ``start_after`` (PROTOCOL.md 9.1)."""
        return _common.expect(await self.call(InspectAfter(prefix, start_after, limit)), Inspection)

    async def inspect_all(self, prefix: str = "", page: int = 1000) -> AsyncIterator[EntryInfo]:
        """Every lock entry whose name starts with ``prefix``, in name order,
        read ``page`` entries at a time (``async for``)."""
        after = ""
        while True:
            inspection = await self.inspect_after(prefix, after, page)
            for entry in inspection.entries:
                yield entry
            if not inspection.truncated or not inspection.entries:
                return
            after = inspection.entries[-1].name

    async def ping(self) -> float:
        """Check the daemon and connection are alive; the round trip in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        _common.expect(await self.call(Ping()), Pong)
        return loop.time() - start

    async def metrics(self) -> str:
        """The daemon's metrics in the OpenMetrics text format (PROTOCOL.md 9.5).

        The text ends with ``# EOF``; the order of its lines is not fixed. A
        daemon older than the request answers ``Fatal(malformed)`` and closes
        the connection: the session ends, and this (and every later call)
        raises :class:`ConnectionLost`, whose ``fatal.code`` is ``malformed``.
        """
        return _common.expect(await self.call(Metrics()), MetricsText).text

    async def call(self, request: Request, timeout: Optional[float] = -1.0) -> Response:
        """Send any request and return its raw response; the low-level API.

        ``Response::Error`` is raised as a :class:`BrokerError` subclass.
        ``timeout`` bounds the wait in seconds (-1: ``request_timeout``;
        None: no bound); past it :class:`NoAnswer` is raised and a late
        answer is ignored. Use :meth:`acquire` for acquires: it also
        cancels, and releases a raced grant, when the wait is abandoned.
        """
        if isinstance(request, _common.ACQUIRES):
            raise TypeError("send acquires with Client.acquire, which cleans up after a cancel")
        rid, future = self._start(request)
        bound = self.request_timeout if timeout == -1.0 else timeout
        try:
            await self._drain()
            await asyncio.wait((future,), timeout=bound)
        except asyncio.CancelledError:
            self._forget(rid, future)
            raise
        if not future.done():
            self._forget(rid, future)
            raise NoAnswer("no answer from the daemon within %s s" % bound)
        return self._check(future.result())

    async def open_watch(self, request: StateWatch, timeout: Optional[float] = -1.0) -> Tuple[int, _WatchQueue]:
        """Send ``StateWatch`` and wait for its ``Done``; the low-level watch API.

        Returns the watch id and its queue. Most programs use
        :meth:`State.watch`. If the wait is abandoned (cancel, timeout), the
        watch is stopped.
        """
        events = _WatchQueue()
        rid, future = self._start(request, events)
        bound = self.request_timeout if timeout == -1.0 else timeout
        try:
            await self._drain()
            await asyncio.wait((future,), timeout=bound)
        except asyncio.CancelledError:
            self._orphan_watch(rid, future)
            raise
        if not future.done():
            self._orphan_watch(rid, future)
            raise NoAnswer("no answer from the daemon within %s s" % bound)
        try:
            _common.expect(future.result(), Done)
        except BaseException:
            self._drop_watch(rid)
            raise
        return rid, events

    async def close_watch(self, watch_id: int) -> None:
        """Stop a watch (``StateUnwatch``) and wait for its ``Done``; a watch
        already gone, or a session that ended, is not an error."""
        self._drop_watch(watch_id)
        try:
            await self.call(StateUnwatch(watch_id))
        except LockbrokerError as e:
            if not _common.watch_gone(e):
                raise

    # ------------------------------------------------------------- plumbing

    def _check_usable(self) -> None:
        """Raise if no request may be sent now."""
        if self._welcome is None:
            raise RuntimeError("the client is not connected: await client.connect() first")
        if self._pid != os.getpid():
            raise ConnectionLost(
                "this lockbroker.aio.Client belongs to process %d, not to this forked child" % self._pid
            )
        if self._ended is not None:
            raise self._ended
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise RuntimeError("this lockbroker.aio.Client belongs to another event loop")

    def _start(
        self, request: Request, watch: Optional[_WatchQueue] = None
    ) -> Tuple[int, "asyncio.Future[Response]"]:
        """Register a future under a fresh id and write the request's frame.

        No ``await`` in here: registering and writing are one step, so a
        request is never sent unregistered, nor registered unsent.
        ``watch``: the queue of a ``StateWatch``, registered with it, so no
        event can arrive unrouted.
        """
        self._check_usable()
        assert self._loop is not None
        rid = self._next_id
        self._next_id += 1
        future: "asyncio.Future[Response]" = self._loop.create_future()
        self._pending[rid] = future
        if watch is not None:
            self._watches[rid] = watch
        try:
            self._write(RequestMessage(rid, request))
        except BaseException:
            self._pending.pop(rid, None)
            self._watches.pop(rid, None)
            raise
        return rid, future

    def _write(self, message: RequestMessage) -> None:
        """Encode one frame and hand it whole to the transport."""
        frame = _common.request_frame(message, self.welcome.limits.max_frame_len)
        writer = self._writer
        assert writer is not None
        if writer.transport.is_closing():
            error = ConnectionLost("the connection to the daemon is closed")
            self._abort(error)
            raise self._ended or error
        writer.write(frame)

    async def _drain(self) -> None:
        """Wait for the socket to take a large backlog (flow control).

        Serialized: Python 3.9's ``drain`` does not allow two waiters at once.
        A failure is the connection's end, which the reader task reports.
        """
        writer = self._writer
        if writer is None or writer.transport.get_write_buffer_size() <= _DRAIN_ABOVE:
            return
        assert self._drain_lock is not None
        async with self._drain_lock:
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                pass

    def _send_untracked(self, request: Request) -> None:
        """Send a request whose answer nobody waits for (an unknown id)."""
        if self._ended is not None or self._writer is None:
            return  # the session is gone, and with it what this would end
        rid = self._next_id
        self._next_id += 1
        try:
            self._write(RequestMessage(rid, request))
        except (LockbrokerError, OSError, ValueError):
            pass

    def _release_orphan(self, hold_id: int) -> None:
        """Release a hold nobody will use; if the session is gone, so is it."""
        self.orphans_released += 1
        self._send_untracked(Release(hold_id))

    def _answer_of_abandoned(self, future: "asyncio.Future[Response]") -> None:
        """The answer of an acquire nobody waits for: release a grant."""
        if future.cancelled() or future.exception() is not None:
            return
        response = future.result()
        if isinstance(response, Granted):
            self._release_orphan(response.grant.hold_id)

    async def _give_up_acquire(self, rid: int, future: "asyncio.Future[Response]") -> None:
        """Stop waiting for acquire ``rid``: cancel it, and release its
        grant if one comes (or came) anyway; exactly once.

        The future stays registered, so the acquire's own answer (the daemon
        sends exactly one) reaches :meth:`_answer_of_abandoned` whenever it
        comes; this waits for it, shielded, at most :data:`CANCEL_WAIT`.
        """
        if future.done():
            # Answered before the task could resume: ours to undo.
            self._answer_of_abandoned(future)
            return
        # Registered before the Cancel goes out, and before the wait below:
        # done-callbacks run in order, so the release is written before
        # this task resumes.
        future.add_done_callback(self._answer_of_abandoned)
        self._send_untracked(Cancel(rid))
        try:
            await asyncio.wait((future,), timeout=CANCEL_WAIT)
        except asyncio.CancelledError:
            pass  # cancelled again: the callback still releases a late grant

    def _forget(self, rid: int, future: "asyncio.Future[Response]") -> None:
        """Stop waiting for request ``rid`` (not an acquire): its answer, when
        it comes, has an unknown id and is ignored."""
        self._pending.pop(rid, None)
        future.add_done_callback(_observe)

    def _drop_watch(self, watch_id: int) -> None:
        """Unregister a watch's queue and end it as closed."""
        events = self._watches.pop(watch_id, None)
        if events is not None:
            events.put(_WatchEnd(None))

    def _orphan_watch(self, watch_id: int, future: "asyncio.Future[Response]") -> None:
        """Give up a watch whose ``Done`` nobody waits for: forget it, send
        ``StateUnwatch`` now and again at its first event."""
        self._forget(watch_id, future)
        self._orphan_watches.add(watch_id)
        self._drop_watch(watch_id)
        self._send_untracked(StateUnwatch(watch_id))

    def _watch_finalized(self, watch_id: int) -> None:
        """A Watch was garbage-collected unclosed: unwatch at its next event."""
        self._orphan_watches.add(watch_id)
        self._watches.pop(watch_id, None)

    _check = staticmethod(_common.checked)
    _unexpected = staticmethod(_common.unexpected)

    async def _read_loop(self, reader: asyncio.StreamReader, buffer: FrameBuffer) -> None:
        """The reader task: route every frame until the connection ends."""
        error: Optional[ConnectionLost] = None
        try:
            while error is None:
                data = await reader.read(65536)
                if not data:
                    error = _common.stream_end(buffer)
                    break
                buffer.feed(data)
                error = self._drain_frames(buffer)
        except asyncio.CancelledError:
            # The loop is being shut down (asyncio.run's end): the session ends.
            error = ConnectionLost("the client's reader task was cancelled (event loop shutting down?)")
            self._abort(error)
            raise
        except Exception as e:  # a bug here must not leave callers hanging
            error = _common.reader_failed(e)
        self._abort(error)

    def _drain_frames(self, buffer: FrameBuffer) -> Optional[ConnectionLost]:
        """Route every whole frame in ``buffer``; an error that ends the session."""
        return _common.route_frames(buffer, self._version, self._route, self._route_event, self._on_shutting_down)

    def _on_shutting_down(self) -> None:
        """The daemon announced it is stopping: every hold is about to be lost."""
        self._shutting_down = True

    def _route(self, message: ResponseMessage) -> None:
        """Hand a response to the future waiting for its id."""
        response = message.response
        if _common.ignored(response):
            return
        future = self._pending.pop(message.id, None)
        if future is not None and not future.done():
            if isinstance(response, Granted):
                self._live.add(response.grant.hold_id)
            future.set_result(response)
            return
        hold_id = _common.stray_hold(response)
        if hold_id is not None:
            # Granted for an acquire nobody waits for (PROTOCOL.md 7): release.
            self._release_orphan(hold_id)

    def _wake_contention(self) -> None:
        """Wakes every task in :meth:`wait_contended` to look again."""
        woken, self._contention = self._contention, None
        if woken is not None:
            woken.set()

    def _route_event(self, event: Union[StateChanged, WatchLagged, Contended, Revoked]) -> None:
        """Hand a watch's event to its queue (never blocks: unbounded);
        note a hold told of contention."""
        if isinstance(event, Contended):
            if event.hold_id in self._live:
                self._contended.add(event.hold_id)
                self._wake_contention()
            return
        if isinstance(event, Revoked):
            if event.hold_id in self._live:
                self._revoked.add(event.hold_id)
            return
        wid = event.watch_id
        events, orphan = _common.event_target(self._watches, self._orphan_watches, wid)
        if events is not None:
            events.put(event)
        elif orphan:
            self._send_untracked(StateUnwatch(wid))
        # Any other event of an unknown watch (one just closed) is ignored.

    def _abort(self, error: ConnectionLost) -> None:
        """End the session: fail every pending call, end every watch, close
        the connection. Idempotent; the first reason stays."""
        if self._ended is None:
            self._ended = error
        ended = self._ended
        pending, self._pending = self._pending, {}
        watches, self._watches = self._watches, {}
        self._contended.clear()
        self._live.clear()
        self._wake_contention()
        for future in pending.values():
            if not future.done():
                future.set_exception(ended)
                # Retrieved by whoever awaits it; not logged if nobody does.
                future.add_done_callback(_observe)
        for events in watches.values():
            events.put(_WatchEnd(ended))
        writer = self._writer
        if writer is not None:
            writer.close()
        _forget_default(self)


async def connect(path: Optional[str] = None, **kwargs: Any) -> Client:
    """``await Client(path, **kwargs).connect()``: a new session (e.g.
    ``await aio.connect(path, detect_deadlocks=True)``)."""
    return await Client(path, **kwargs).connect()


# ------------------------------------------------------------------ default

# One default client per event loop. Weak keys, so a loop that is gone takes
# its entry with it; a client that ends removes itself (it references its
# loop, which would otherwise keep the entry alive).
_defaults: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Client]" = weakref.WeakKeyDictionary()
_connecting: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[Client]]" = weakref.WeakKeyDictionary()


async def default_client() -> Client:
    """The running event loop's shared client, connected on first use.

    Every :class:`Lock`, :class:`State`, ... made without a client uses it,
    so a loop has one connection to the daemon however many objects it
    uses. It is replaced by a new connection when its session ended (holds
    taken through the old one are gone). Concurrent first uses share one
    connect.
    """
    loop = asyncio.get_running_loop()
    client = _defaults.get(loop)
    if client is not None and client.usable:
        return client
    task = _connecting.get(loop)
    if task is None:
        task = loop.create_task(Client().connect())
        _connecting[loop] = task

        def connected(done: "asyncio.Task[Client]") -> None:
            if _connecting.get(loop) is done:
                del _connecting[loop]
            if not done.cancelled() and done.exception() is None:
                _defaults[loop] = done.result()

        task.add_done_callback(connected)
    # Shielded: one caller's cancel must not fail the others' connect.
    client = await asyncio.shield(task)
    # The done-callback may not have run yet; make the entry visible now.
    if _defaults.get(loop) is not client and client.usable:
        _defaults[loop] = client
    return client


def set_default_client(client: Optional[Client], loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
    """Make ``client`` the default of ``loop`` (default: the running loop);
    None forgets it (a new one connects on next use; the old one stays open)."""
    loop = loop if loop is not None else asyncio.get_running_loop()
    if client is None:
        _defaults.pop(loop, None)
    else:
        _defaults[loop] = client


def _forget_default(client: Client) -> None:
    """A client ended: stop being its loop's default."""
    loop = client.loop
    if loop is not None and _defaults.get(loop) is client:
        del _defaults[loop]


# --------------------------------------------------------------- primitives


class _Primitive:
    """What every primitive shares: name, client choice, per-task grant."""

    def __init__(self, name: str, client: Optional[Client]) -> None:
        if not isinstance(name, str):
            raise TypeError("name must be a str, not %s" % type(name).__name__)
        self.name = name
        self._client = client
        # The last grant of each task, as the threading API keeps one per thread.
        self._grants: "weakref.WeakKeyDictionary[asyncio.Task[Any], Grant]" = weakref.WeakKeyDictionary()
        self._last: Optional[Grant] = None

    async def _get_client(self) -> Client:
        """The client the next acquire goes through."""
        if self._client is None:
            return await default_client()
        return await self._client.connect()

    @property
    def grant(self) -> Optional[Grant]:
        """The last grant the current task obtained through this object
        (outside a task: the last grant of any)."""
        task = _current_task()
        if task is None:
            return self._last
        return self._grants.get(task)

    @property
    def fence(self) -> Optional[int]:
        """The fencing token of :attr:`grant` (None before any grant)."""
        grant = self.grant
        return None if grant is None else grant.fence

    @property
    def abandoned(self) -> bool:
        """Whether :attr:`grant` said the previous holder died holding it."""
        grant = self.grant
        return False if grant is None else grant.abandoned

    async def _acquire(
        self,
        kind: LockKind,
        timeout_ms: Optional[int],
        capacity: int = 0,
        permits: int = 1,
        notify_contended: bool = False,
    ) -> Optional[Tuple[Client, Grant]]:
        client = await self._get_client()
        grant = await client.acquire(
            self.name, kind, capacity=capacity, permits=permits, timeout_ms=timeout_ms, notify_contended=notify_contended
        )
        if grant is None:
            return None
        task = _current_task()
        if task is not None:
            self._grants[task] = grant
        self._last = grant
        return client, grant

    def _guard_grant(self) -> Optional[Grant]:
        """The grant a state write guarded by this object names (PROTOCOL.md
        10.10): the current task's last grant; subclasses prefer a hold the
        object still has."""
        return self.grant

    async def _release_hold(self, hold: Tuple[Client, Grant]) -> None:
        client, grant = hold
        try:
            await client.release(grant.hold_id)
        except NotHeld as e:
            raise RuntimeError("release unlocked lock: %s" % e) from e

    async def _inspect_held(self) -> bool:
        """Ask the daemon whether anyone holds this name."""
        client = await self._get_client()
        # The exact name sorts first among the names it prefixes.
        entries = (await client.inspect(self.name, limit=1)).entries
        return bool(entries) and entries[0].name == self.name and bool(entries[0].holders)

    def __repr__(self) -> str:
        return "<lockbroker.aio.%s %r>" % (type(self).__name__, self.name)


def _current_task() -> "Optional[asyncio.Task[Any]]":
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


class Lock(_Primitive):
    """A named mutex, like :class:`lockbroker.Lock` with ``await``.

    ``await acquire(blocking=True, timeout=-1)`` returns True once held,
    False if a try (``blocking=False``) or the timeout failed; the daemon
    times the wait out and serves waiters in FIFO order (a try never jumps
    the queue). ``await release()`` may be called by any task of the same
    client; releasing an unheld lock raises ``RuntimeError``.
    ``async with lock:`` acquires and releases. Not re-entrant. A task
    cancelled while it waits holds nothing (see the module's doc). With
    ``notify_contended=True`` each hold is told when someone starts waiting
    for the lock: :attr:`contended`, ``await`` :meth:`wait_contended`.
    """

    def __init__(self, name: str, client: Optional[Client] = None, *, notify_contended: bool = False) -> None:
        super().__init__(name, client)
        self._hold: Optional[Tuple[Client, Grant]] = None
        self._notify_contended = bool(notify_contended)

    @property
    def contended(self) -> bool:
        """Whether someone waits behind this object's hold (it was made
        with ``notify_contended``); False while unheld."""
        hold = self._hold
        return hold is not None and hold[0].contended(hold[1].hold_id)

    async def wait_contended(self, timeout: Optional[float] = None) -> bool:
        """Wait at most ``timeout`` seconds (None: for ever) until someone
        waits behind this object's hold; whether someone does."""
        hold = self._hold
        return hold is not None and await hold[0].wait_contended(hold[1].hold_id, timeout)

    async def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock; the arguments of ``threading.Lock.acquire``."""
        timeout_ms = _lock_timeout_ms(blocking, timeout)
        hold = await self._acquire(LockKind.MUTEX, timeout_ms, notify_contended=self._notify_contended)
        if hold is None:
            return False
        self._hold = hold
        return True

    async def release(self) -> None:
        """Release the lock (any task of the holding client may)."""
        hold, self._hold = self._hold, None
        if hold is None:
            raise RuntimeError("release unlocked lock")
        await self._release_hold(hold)

    def _guard_grant(self) -> Optional[Grant]:
        hold = self._hold
        return hold[1] if hold is not None else self.grant

    async def locked(self) -> bool:
        """True if this object holds the lock, or the daemon says anyone does
        (a coroutine, unlike ``asyncio.Lock.locked``: it may ask the daemon)."""
        hold = self._hold
        if hold is not None and hold[0].usable:
            return True
        return await self._inspect_held()

    @property
    def held(self) -> bool:
        """True while this object holds the lock (no I/O)."""
        hold = self._hold
        return hold is not None and hold[0].usable

    async def __aenter__(self) -> bool:
        return await self.acquire()

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()

    def __repr__(self) -> str:
        state = "locked" if self._hold is not None else "unlocked"
        return "<lockbroker.aio.Lock %r %s>" % (self.name, state)


class BoundedSemaphore(_Primitive):
    """A named counting semaphore of ``value`` permits, like
    :class:`lockbroker.BoundedSemaphore` with ``await``.

    ``await acquire(blocking=True, timeout=None, *, n=1)`` takes ``n``
    permits at once; ``await release(n=1)`` gives back ``n`` (oldest holds
    first); releasing more than the client holds on this name raises
    ``ValueError("Semaphore released too many times")``. Permits are
    counted per session and name. Every user of a name must agree on
    ``value`` (else ``InvalidRequest``, ``capacity_mismatch``).
    """

    def __init__(self, name: str, value: int = 1, client: Optional[Client] = None) -> None:
        if value < 1:
            raise ValueError("semaphore initial value must be >= 1")
        super().__init__(name, client)
        self.value = value
        self._acquired_with: Optional[Client] = None

    async def acquire(self, blocking: bool = True, timeout: Optional[float] = None, *, n: int = 1) -> bool:
        """Take ``n`` permits; the arguments of ``threading.Semaphore.acquire``."""
        timeout_ms = _semaphore_timeout_ms(blocking, timeout)
        if n < 1:
            raise ValueError("n must be one or more")
        if n > self.value:
            raise ValueError("cannot take %d permits of a semaphore of %d" % (n, self.value))
        hold = await self._acquire(LockKind.SEMAPHORE, timeout_ms, capacity=self.value, permits=n)
        if hold is None:
            return False
        self._acquired_with = hold[0]
        return True

    async def release(self, n: int = 1) -> None:
        """Give back ``n`` permits (oldest holds first)."""
        if n < 1:
            raise ValueError("n must be one or more")
        client = self._acquired_with or await self._get_client()
        try:
            await client.release_by_name(self.name, n)
        except NotHeld as e:
            if e.code == ErrorCode.NOT_HELD:
                raise ValueError("Semaphore released too many times") from e
            raise

    async def __aenter__(self) -> bool:
        return await self.acquire()

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()

    def __repr__(self) -> str:
        return "<lockbroker.aio.BoundedSemaphore %r value=%d>" % (self.name, self.value)


class RWLock(_Primitive):
    """A named read-write lock, like :class:`lockbroker.RWLock` with ``await``.

    ``async with rw.shared():`` / ``async with rw.exclusive():`` hold one
    side for a block and give the :class:`Grant`; with ``timeout``
    (seconds) they raise :class:`LockTimeout` if not granted in time.
    ``acquire_shared`` / ``acquire_exclusive`` take ``(blocking=True,
    timeout=-1)`` and return a bool; ``release_shared`` releases this
    object's oldest shared hold, ``release_exclusive`` the exclusive one.
    A queued exclusive request blocks later shared ones.
    """

    def __init__(self, name: str, client: Optional[Client] = None) -> None:
        super().__init__(name, client)
        self._shared: Deque[Tuple[Client, Grant]] = deque()
        self._exclusive: Optional[Tuple[Client, Grant]] = None

    async def acquire_shared(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the shared (read) side."""
        hold = await self._acquire(LockKind.RW_SHARED, _lock_timeout_ms(blocking, timeout))
        if hold is None:
            return False
        self._shared.append(hold)
        return True

    async def release_shared(self) -> None:
        """Release this object's oldest shared hold."""
        if not self._shared:
            raise RuntimeError("release unlocked lock")
        await self._release_hold(self._shared.popleft())

    async def acquire_exclusive(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the exclusive (write) side."""
        hold = await self._acquire(LockKind.RW_EXCLUSIVE, _lock_timeout_ms(blocking, timeout))
        if hold is None:
            return False
        self._exclusive = hold
        return True

    async def release_exclusive(self) -> None:
        """Release the exclusive hold."""
        hold, self._exclusive = self._exclusive, None
        if hold is None:
            raise RuntimeError("release unlocked lock")
        await self._release_hold(hold)

    @asynccontextmanager
    async def shared(self, timeout: Optional[float] = None) -> AsyncIterator[Grant]:
        """Hold the shared side for an ``async with`` block; gives the grant."""
        if not await self.acquire_shared(timeout=-1 if timeout is None else timeout):
            raise LockTimeout("shared side of %r not granted within %s s" % (self.name, timeout))
        grant = self._shared[-1][1]
        try:
            yield grant
        finally:
            # Release exactly this block's hold, whichever is oldest.
            mine = next((h for h in self._shared if h[1].hold_id == grant.hold_id), None)
            if mine is None:
                raise RuntimeError("release unlocked lock")
            self._shared.remove(mine)
            await self._release_hold(mine)

    @asynccontextmanager
    async def exclusive(self, timeout: Optional[float] = None) -> AsyncIterator[Grant]:
        """Hold the exclusive side for an ``async with`` block; gives the grant."""
        if not await self.acquire_exclusive(timeout=-1 if timeout is None else timeout):
            raise LockTimeout("exclusive side of %r not granted within %s s" % (self.name, timeout))
        assert self._exclusive is not None
        grant = self._exclusive[1]
        try:
            yield grant
        finally:
            await self.release_exclusive()

    def _guard_grant(self) -> Optional[Grant]:
        exclusive = self._exclusive
        return exclusive[1] if exclusive is not None else self.grant

    def __repr__(self) -> str:
        return "<lockbroker.aio.RWLock %r shared=%d exclusive=%s>" % (
            self.name,
            len(self._shared),
            self._exclusive is not None,
        )


# -------------------------------------------------------------------- state

#: What may guard a write: a hold id, a grant, or the aio lock object holding it.
Guard = Union[int, Grant, _Primitive]


class State:
    """The daemon's shared state through one session, as coroutines: the
    operations of :class:`lockbroker.State` (same arguments, results and
    errors) with ``await``.

    ``client`` None uses the loop's :func:`default_client` at each call.
    Guards take a hold id, a :class:`Grant`, or an aio :class:`Lock` /
    :class:`BoundedSemaphore` / :class:`RWLock` taken through the same client.
    """

    def __init__(self, client: Optional[Client] = None) -> None:
        self._client = client

    async def _get_client(self) -> Client:
        if self._client is None:
            return await default_client()
        return await self._client.connect()

    def __repr__(self) -> str:
        return "<lockbroker.aio.State %s>" % ("default client" if self._client is None else repr(self._client))

    async def get(self, key: str) -> Optional[Versioned]:
        """The value and version at ``key``, or None if it does not exist."""
        client = await self._get_client()
        response = await client.call(StateGet(key))
        if isinstance(response, StateValue):
            return response.versioned
        raise client._unexpected(response)

    async def get_json(self, key: str) -> Optional[Tuple[Any, int]]:
        """``(json.loads(value), version)`` for ``key``, or None if absent."""
        current = await self.get(key)
        if current is None:
            return None
        return json.loads(current.value), current.version

    async def list(self, prefix: str = "", *, values: bool = False, page_size: int = 0) -> List[StateEntry]:
        """Every key starting with ``prefix``, in byte-wise order, read page
        by page (``page_size`` keys each; 0: the daemon's default)."""
        entries: List[StateEntry] = []
        start_after = ""
        while True:
            page, more = await self.list_page(prefix, start_after, limit=page_size, values=values)
            entries.extend(page)
            if not more or not page:
                return entries
            start_after = page[-1].key

    async def list_page(
        self, prefix: str = "", start_after: str = "", *, limit: int = 0, values: bool = False
    ) -> Tuple[List[StateEntry], bool]:
        """One page of :meth:`list`, and whether more follow."""
        client = await self._get_client()
        response = await client.call(StateList(prefix, start_after, limit, values))
        if isinstance(response, StateEntries):
            return response.entries, response.more
        raise client._unexpected(response)

    async def set(
        self,
        key: str,
        value: Value,
        *,
        if_version: Optional[int] = None,
        ttl: Optional[TTL] = None,
        guard: Optional[Guard] = None,
    ) -> int:
        """Store ``value`` at ``key``; the version of this write.

        ``if_version`` mismatches raise :class:`VersionConflict`; see
        :meth:`lockbroker.State.set`.
        """
        client = await self._get_client()
        data = _to_bytes(value)
        _check_value_len(client.limits, data)
        response = await client.call(StateSet(key, data, if_version, _ttl_ms(ttl), _hold_id(guard, "task")))
        if isinstance(response, StateWritten):
            return response.version
        if isinstance(response, StateConflict) and if_version is not None:
            raise VersionConflict(key, if_version, response.current)
        raise client._unexpected(response)

    async def set_json(
        self,
        key: str,
        obj: Any,
        *,
        if_version: Optional[int] = None,
        ttl: Optional[TTL] = None,
        guard: Optional[Guard] = None,
    ) -> int:
        """:meth:`set` of ``obj`` as compact JSON text."""
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        return await self.set(key, text, if_version=if_version, ttl=ttl, guard=guard)

    async def compare_and_set(
        self,
        key: str,
        version: int,
        value: Value,
        *,
        ttl: Optional[TTL] = None,
        guard: Optional[Guard] = None,
    ) -> bool:
        """Store ``value`` only if ``key`` is at ``version`` (0: absent);
        whether it was written."""
        try:
            await self.set(key, value, if_version=version, ttl=ttl, guard=guard)
        except VersionConflict:
            return False
        return True

    async def update(
        self,
        key: str,
        fn: Callable[[Optional[bytes]], Value],
        *,
        ttl: Optional[TTL] = None,
        guard: Optional[Guard] = None,
    ) -> Versioned:
        """Read-modify-write ``key``, retried on conflict; ``fn`` (a plain
        function, possibly called more than once) maps the value read (None:
        absent) to the value to store."""
        while True:
            current = await self.get(key)
            data = _to_bytes(fn(None if current is None else current.value))
            try:
                version = await self.set(
                    key, data, if_version=0 if current is None else current.version, ttl=ttl, guard=guard
                )
            except VersionConflict:
                continue
            return Versioned(data, version)

    async def remove(
        self, key: str, *, if_version: Optional[int] = None, guard: Optional[Guard] = None
    ) -> Optional[Versioned]:
        """Remove ``key``; the value it had, or None if it did not exist."""
        client = await self._get_client()
        response = await client.call(StateRemove(key, if_version, _hold_id(guard, "task")))
        if isinstance(response, StateRemoved):
            return response.removed
        if isinstance(response, StateConflict) and if_version is not None:
            raise VersionConflict(key, if_version, response.current)
        raise client._unexpected(response)

    async def increment(self, key: str, delta: int = 1, *, guard: Optional[Guard] = None) -> int:
        """Add ``delta`` to the decimal integer at ``key`` (absent: 0); the new value."""
        return (await self.increment_versioned(key, delta, guard=guard))[0]

    async def increment_versioned(self, key: str, delta: int = 1, *, guard: Optional[Guard] = None) -> Tuple[int, int]:
        """:meth:`increment`, returning ``(new value, version of the write)``."""
        client = await self._get_client()
        response = await client.call(StateIncrement(key, delta, _hold_id(guard, "task")))
        if isinstance(response, StateCounter):
            return response.value, response.version
        raise client._unexpected(response)

    def watch(self, key: str, *, prefix: bool = False, from_version: int = 0, values: bool = True) -> "Watch":
        """Watch ``key`` (or every key starting with it, if ``prefix``).

        Returns a :class:`Watch` to open with ``async with`` (closed on
        exit) or ``await`` (then :meth:`Watch.close` it)::

            async with state.watch("cfg/", prefix=True) as changes:
                async for event in changes:
                    ...

        Once open, changes after that point are delivered; ``from_version``
        and ``values`` as in :meth:`lockbroker.State.watch`.
        """
        return Watch(self, key, prefix, from_version, values)


class Watch:
    """The changes of a key or prefix as an async iterator; made by
    :meth:`State.watch`.

    * ``async for event in watch:`` waits for each :class:`Changed` or
      :class:`Lagged` event, in version order; it stops when the watch is
      closed, and raises :class:`~lockbroker.errors.ConnectionLost` when
      the session ended and the events that arrived before are consumed.
    * ``await watch.next_event(timeout)``: the same with a timeout (None if
      no event came).
    * ``async with`` opens and closes it; ``await watch`` opens it;
      ``await watch.close()`` stops it at the daemon.

    Events are queued without bound by the reader task: consume them, or
    close the watch. One garbage-collected unclosed is stopped at its next
    event.
    """

    def __init__(self, state: State, key: str, prefix: bool, from_version: int, values: bool) -> None:
        self.key = key
        self.prefix = prefix
        self._state = state
        self._request = StateWatch(key, prefix, from_version, values)
        self.client: Optional[Client] = None
        self._id = 0
        self._events: Optional[_WatchQueue] = None
        self._closed = False
        self._finalizer: Optional[weakref.finalize] = None

    async def open(self) -> "Watch":
        """Set the watch up at the daemon (idempotent); returns the watch."""
        if self._events is None:
            client = await self._state._get_client()
            watch_id, events = await client.open_watch(self._request)
            self.client, self._id, self._events = client, watch_id, events
            self._finalizer = weakref.finalize(self, client._watch_finalized, watch_id)
            self._finalizer.atexit = False
        return self

    def __await__(self) -> Any:
        return self.open().__await__()

    @property
    def id(self) -> int:
        """The watch id (the request id of its ``StateWatch``; 0 until open)."""
        return self._id

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    async def next_event(self, timeout: Optional[float] = None) -> Optional[WatchEvent]:
        """The next event; None if ``timeout`` seconds passed without one
        (None: wait as long as it takes), or once the watch is closed."""
        if self._closed:
            return None
        if self._events is None:
            raise RuntimeError("the watch is not open: use `async with` or `await` it first")
        events = self._events
        item = await events.get(None if timeout is None else float(timeout))
        if item is None or self._closed:
            return None
        if isinstance(item, _WatchEnd):
            # Put it back, so every later call sees the end.
            events.put(item)
            if item.error is not None:
                raise item.error
            return None
        if isinstance(item, StateChanged):
            return Changed(item.key, item.version, item.change, item.value)
        return Lagged()

    def __aiter__(self) -> "Watch":
        return self

    async def __anext__(self) -> WatchEvent:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def close(self) -> None:
        """Stop the watch and wait for the daemon to confirm; idempotent.

        Ends a pending iteration. Not an error if the session has ended.
        """
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        if self.client is not None:
            try:
                await self.client.close_watch(self._id)
            except ConnectionLost:
                pass

    async def __aenter__(self) -> "Watch":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        what = "prefix" if self.prefix else "key"
        state = "closed" if self._closed else ("open" if self._events is not None else "not open")
        return "<lockbroker.aio.Watch %d %s %r %s>" % (self._id, what, self.key, state)

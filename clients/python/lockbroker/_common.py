"""The rules of a session that the blocking client (:mod:`lockbroker.client`)
and the asyncio client (:mod:`lockbroker.aio`) share, without their I/O.

Each client reads and writes its own way (a blocking socket or pipe, or
asyncio streams); what it sends and how it reads what it gets back is
decided here, once:

* who may serve a Unix socket, checked before connecting
  (:func:`expected_unix_server`; the peer is checked after by
  :func:`lockbroker.address.check_server`), and the error of a connect
  that failed (:func:`connect_failed`);
* the handshake (PROTOCOL.md 6.1): the ``Hello`` (:func:`hello_frame`),
  the checks of the daemon's answer (:func:`read_welcome`), and the
  fallback, version by version, to the one a daemon of before the latest
  speaks (:func:`fallback_version`);
* on whose behalf acquires are made, for the daemon's deadlock detection
  (:class:`Actors`, :func:`own_actor`, ``LOCKBROKER_ACTOR``);
* the frames of the session: a request's frame within the daemon's limit
  (:func:`request_frame`), and the routing of every frame the daemon sends
  (:func:`route_frames`), with why a session ends (:func:`stream_end`,
  :func:`reader_failed`);
* what an answer means: to an id nobody waits for (:func:`ignored`,
  :func:`stray_hold`), to a watch (:func:`event_target`), to a request
  (:func:`expect`, :func:`checked`, :func:`unexpected`,
  :func:`acquire_result`, :func:`watch_gone`).

Where the daemon listens and whom to trust there are
:mod:`lockbroker.address`'s rules (:func:`~lockbroker.address.resolve`,
:func:`~lockbroker.address.expected_server`); :mod:`lockbroker.transport`
connects the blocking client with them, :mod:`lockbroker.aio` its own.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Type, TypeVar, Union

from . import address as _address
from .errors import ConnectFailed, ConnectionLost, LockbrokerError, NotHeld, Unsupported, Untrusted, broker_error
from .protocol import (
    ACQUIRE_AS_VERSION,
    ACQUIRE_WITH_VERSION,
    HANDSHAKE_MAX_FRAME_LEN,
    MAX_WITHIN,
    OLDEST_PROTOCOL_VERSION,
    Acquire,
    AcquireAs,
    AcquireOption,
    AcquireWith,
    Actor,
    Cancelled,
    Contended,
    DecodeError,
    ErrorCode,
    ErrorInfo,
    ErrorResponse,
    EventMessage,
    Fatal,
    FrameBuffer,
    Grant,
    Granted,
    Hello,
    Lease,
    NotifyContended,
    Request,
    RequestMessage,
    Response,
    ResponseMessage,
    ShuttingDown,
    StateChanged,
    TimedOut,
    WatchLagged,
    Welcome,
    Within,
    decode_server_message,
    encode_client_message,
    encode_frame,
    error_code_name,
)

R = TypeVar("R", bound=Response)
Q = TypeVar("Q")


class _WatchEnd:
    """The last item of a watch's queue: closed (``error`` None) or the
    session ended (``error`` says why)."""

    __slots__ = ("error",)

    def __init__(self, error: Optional[ConnectionLost]) -> None:
        self.error = error


# ------------------------------------------------------------- connecting


def expected_unix_server(address: _address.Address, allow_uids: Iterable[int]) -> Tuple[int, ...]:
    """The users who may serve the Unix socket at ``address``, after the
    checks of its directory (:func:`lockbroker.address.expected_server`):
    raises :class:`Untrusted`, or :class:`ConnectFailed` if the directory
    cannot be inspected."""
    try:
        return _address.expected_server(address, allowed=allow_uids)
    except Untrusted:
        raise
    except OSError as e:
        raise ConnectFailed("cannot inspect the directory of %s: %s" % (address.path, e), address.path) from e


def connect_failed(address: _address.Address, error: BaseException) -> ConnectFailed:
    """The error of a connect to ``address`` that failed with ``error``."""
    return ConnectFailed(
        "cannot connect to the lockbroker daemon at %s (%s source): %s" % (address.path, address.source, error),
        address.path,
    )


# ---------------------------------------------------------------- handshake


def hello_frame(version: int, client_name: str) -> bytes:
    """The frame of the ``Hello`` that opens a session in ``version``."""
    return encode_frame(encode_client_message(Hello(version=version, client_name=client_name)))


def handshake_failed(path: str, error: BaseException) -> ConnectFailed:
    """The error of a handshake with ``path`` that a read (or the frame
    read) broke with ``error``."""
    return ConnectFailed("handshake with %s failed: %s" % (path, error), path)


def read_welcome(buffer: FrameBuffer, data: bytes, path: str, version: int) -> Optional[Welcome]:
    """Feed ``buffer`` what a read of the handshake returned (``b""``: the
    end of the stream); the daemon's ``Welcome`` once its frame is whole,
    None until then.

    Raises :class:`ConnectFailed` if the daemon closed the connection,
    refused the session (``Fatal``: ``fatal`` says why), or answered other
    than a ``Welcome`` in ``version``. On success ``buffer`` is ready for
    the session's frames: its maximum is at least the announced one
    (PROTOCOL.md 2).
    """
    if not data:
        closed = ConnectFailed("the daemon at %s closed the connection during the handshake" % path, path)
        raise handshake_failed(path, closed) from closed
    try:
        buffer.feed(data)
        body = buffer.next_body()
        if body is None:
            return None
        message = decode_server_message(body)
    except DecodeError as e:
        raise handshake_failed(path, e) from e
    if isinstance(message, Fatal):
        info = message.error
        raise ConnectFailed(
            "the daemon at %s refused the session: %s (%d): %s"
            % (path, error_code_name(info.code), info.code, info.message),
            path,
            info,
        )
    if not isinstance(message, Welcome):
        raise ConnectFailed("handshake with %s: expected Welcome, got %r" % (path, message), path)
    if message.version != version:
        raise ConnectFailed(
            "handshake with %s: asked for protocol version %d, the daemon answered %d"
            % (path, version, message.version),
            path,
        )
    buffer.max_len = max(message.limits.max_frame_len, HANDSHAKE_MAX_FRAME_LEN)
    return message


def fallback_version(error: ConnectFailed, version: int) -> Optional[int]:
    """The version to handshake in again after a handshake in ``version``
    failed with ``error``: the next lower one (4, then 3, 2 and 1), if the
    daemon (one of before ``version``) refused the version as unsupported;
    else None (give up)."""
    if error.fatal is not None and error.fatal.code == ErrorCode.UNSUPPORTED_VERSION:
        if version > OLDEST_PROTOCOL_VERSION:
            return version - 1
    return None


# ------------------------------------------------------------------- actors

#: The environment variable naming the actors a command run by
#: ``lockbroker lock`` runs within: its wrapper's, then the wrapper's own
#: wrappers', nearest first, each as 16 hex digits, separated by commas. A
#: client of that command with deadlock detection on acquires within them,
#: so the daemon sees the wrapper keep its lock while the command waits.
ACTOR_ENV = "LOCKBROKER_ACTOR"

#: This process's own key for :func:`own_actor` (64 random bits): actors of
#: other processes are chosen with other keys (PROTOCOL.md 4.32: at random).
_ACTOR_KEY = os.urandom(8)


def own_actor(kind: str, ident: int) -> int:
    """The actor of the thread (``kind`` ``"thread"``, ``ident`` its
    ``threading.get_ident()``) or task (``"task"``, its ``id``) of this
    process that calls: ``ident`` mixed with the process id and this
    process's random key, so that no thread or task of another process (a
    forked child too) is likely to have it; never 0."""
    data = b"%s %d %d" % (kind.encode("ascii"), os.getpid(), ident)
    digest = hashlib.blake2b(data, digest_size=8, key=_ACTOR_KEY).digest()
    return int.from_bytes(digest, "little") or 1


def thread_actor() -> int:
    """The calling thread's actor (:func:`own_actor`)."""
    return own_actor("thread", threading.get_ident())


def env_within(environ: Mapping[str, str]) -> Tuple[int, ...]:
    """The actors ``LOCKBROKER_ACTOR`` names in ``environ``, nearest first
    (at most :data:`MAX_WITHIN`); none if it is unset or any of them is
    not 1 to 16 hex digits or is 0 (as the ``lockbroker`` tool reads it: a
    damaged variable takes no part rather than a wrong one)."""
    actors = []
    for text in environ.get(ACTOR_ENV, "").strip().split(","):
        text = text.strip()
        if not 0 < len(text) <= 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
            return ()
        actor = int(text, 16)
        if actor == 0:
            return ()
        actors.append(actor)
    return tuple(actors[:MAX_WITHIN])


def need_version_4(version: int, what: str) -> None:
    """Raise :class:`Unsupported` for ``what`` in a session of protocol
    ``version`` before 4, which would not know the request (and end the
    session on it): nothing is sent."""
    if version < ACQUIRE_WITH_VERSION:
        raise Unsupported(
            ErrorCode.UNSUPPORTED,
            "the daemon speaks protocol version %d; %s needs version %d" % (version, what, ACQUIRE_WITH_VERSION),
        )


#: The requests that acquire: answered by a grant, cancelled when given up.
ACQUIRES = (Acquire, AcquireAs, AcquireWith)


class Actors:
    """On whose behalf a client's acquires are made (``AcquireAs``,
    PROTOCOL.md 4.32, and ``AcquireWith``, 4.33), which the daemon's
    deadlock detection follows (8.11).

    ``detect_deadlocks`` False and ``actor`` None: nobody's (plain
    ``Acquire``, never checked). ``actor`` (any u64 but 0): that one's, for
    every acquire of the client; giving one turns detection on, as the Rust
    client's ``Connector::actor`` does. ``detect_deadlocks`` True alone:
    the calling thread's or task's own. Either way the actor runs within
    the actors ``LOCKBROKER_ACTOR`` names in ``environ`` (set by
    ``lockbroker lock`` for the command it runs). In a session of version 3
    an acquire names its actor alone; before 3 every acquire is a plain
    ``Acquire``.
    """

    __slots__ = ("detect", "fixed", "within")

    def __init__(
        self, detect_deadlocks: bool, actor: Optional[int], environ: Optional[Mapping[str, str]] = None
    ) -> None:
        if actor is not None:
            if isinstance(actor, bool) or not isinstance(actor, int) or not 0 < actor < 1 << 64:
                raise ValueError("actor must be an int from 1 to 2**64 - 1, not %r" % (actor,))
        #: Whether acquires name an actor at all.
        self.detect = actor is not None or bool(detect_deadlocks)
        #: The actor of every acquire, or None for the caller's own.
        self.fixed = actor
        #: The actors those run within, nearest first.
        self.within: Tuple[int, ...] = env_within(os.environ if environ is None else environ) if self.detect else ()

    def request(
        self,
        acquire: Acquire,
        version: int,
        own: Callable[[], int],
        notify_contended: bool = False,
        lease_ms: Optional[int] = None,
    ) -> Request:
        """What to send for ``acquire`` in a session of protocol
        ``version``: it as it is, or an ``AcquireAs`` (``AcquireWith``) of
        the fixed actor, else of ``own()`` (the caller's); with
        ``notify_contended`` or ``lease_ms``, an ``AcquireWith`` asking for
        them (:class:`Unsupported` before version 4)."""
        extras = notify_contended or lease_ms is not None
        if extras and version < ACQUIRE_WITH_VERSION:
            raise Unsupported(
                ErrorCode.UNSUPPORTED,
                "the daemon speaks protocol version %d; contention events and leases need version %d"
                % (version, ACQUIRE_WITH_VERSION),
            )
        options: List[AcquireOption] = []
        if self.detect and version >= ACQUIRE_AS_VERSION:
            actor = own() if self.fixed is None else self.fixed
            if not (self.within and version >= ACQUIRE_WITH_VERSION) and not extras:
                return AcquireAs(actor, acquire)
            options.append(Actor(actor))
            if self.within and version >= ACQUIRE_WITH_VERSION:
                options.append(Within(list(self.within)))
        if notify_contended:
            options.append(NotifyContended())
        if lease_ms is not None:
            options.append(Lease(lease_ms))
        if not options:
            return acquire
        return AcquireWith(acquire, options)

    def __repr__(self) -> str:
        if not self.detect:
            return "<Actors off>"
        who = "own" if self.fixed is None else "%016x" % self.fixed
        if self.within:
            who += " within " + ",".join("%016x" % a for a in self.within)
        return "<Actors %s>" % who


# ------------------------------------------------------------------- frames


def request_frame(message: RequestMessage, max_len: int) -> bytes:
    """The frame of ``message``; ``ValueError`` if its body is above the
    daemon's ``max_frame_len`` (``max_len``), which it would refuse."""
    body = encode_client_message(message)
    if len(body) > max_len:
        raise ValueError("request of %d bytes exceeds the daemon's max_frame_len of %d" % (len(body), max_len))
    return encode_frame(body)


def stream_end(buffer: FrameBuffer) -> ConnectionLost:
    """Why the session ended, at the end of the stream."""
    if buffer.has_partial():
        return ConnectionLost("the connection broke in the middle of a frame")
    return ConnectionLost("the daemon closed the connection")


def reader_failed(error: Exception) -> ConnectionLost:
    """Why the session ended when reading it raised ``error``: the
    connection failed (``OSError``), or the reader has a bug, which must
    end the session rather than leave callers waiting."""
    if isinstance(error, OSError):
        return ConnectionLost("the connection to the daemon failed: %s" % error)
    return ConnectionLost("the client's reader failed: %r" % (error,))


def fatal_lost(info: ErrorInfo) -> ConnectionLost:
    """The end of a session the daemon ended with ``Fatal(info)``."""
    return ConnectionLost(
        "the daemon ended the session: %s (%d): %s" % (error_code_name(info.code), info.code, info.message),
        info,
    )


def route_frames(
    buffer: FrameBuffer,
    version: int,
    respond: Callable[[ResponseMessage], None],
    notify: Callable[[Union[StateChanged, WatchLagged]], None],
    shutting_down: Callable[[], None],
) -> Optional[ConnectionLost]:
    """Route every whole frame in ``buffer`` (decoded in protocol
    ``version``): a response to ``respond``, a watch's event to ``notify``,
    ``ShuttingDown`` (every hold is about to be lost, PROTOCOL.md 9.3) to
    ``shutting_down``. Returns why the session ends, if a frame ends it
    (``Fatal``, or a frame that is not one), else None."""
    while True:
        try:
            body = buffer.next_body()
        except DecodeError as e:
            return ConnectionLost("bad frame from the daemon: %s" % e)
        if body is None:
            return None
        try:
            message = decode_server_message(body, version)
        except DecodeError as e:
            return ConnectionLost("undecodable frame from the daemon: %s" % e)
        if isinstance(message, ResponseMessage):
            respond(message)
        elif isinstance(message, EventMessage):
            event = message.event
            if isinstance(event, ShuttingDown):
                shutting_down()
            else:
                notify(event)
        elif isinstance(message, Fatal):
            return fatal_lost(message.error)
        else:
            return ConnectionLost("unexpected frame from the daemon: %r" % (message,))


# ------------------------------------------------------------------ answers


def ignored(response: Response) -> bool:
    """Whether an answer is routed to nobody: ``duplicate_request_id``
    carries the id of a still-waiting acquire, whose own answer is still
    to come (PROTOCOL.md 7); the clients never reuse an id anyway."""
    return isinstance(response, ErrorResponse) and response.error.code == ErrorCode.DUPLICATE_REQUEST_ID


def stray_hold(response: Response) -> Optional[int]:
    """The hold to release, of an answer to an id nobody waits for: a
    ``Granted``'s, for an acquire given up (PROTOCOL.md 7 and 8.7). None
    for any other (``Cancelled``, ``Done``, ``not_pending``, an untracked
    ``Release``'s ``Released``): those are ignored."""
    return response.grant.hold_id if isinstance(response, Granted) else None


def event_target(watches: Dict[int, Q], orphans: Set[int], watch_id: int) -> Tuple[Optional[Q], bool]:
    """Where an event of watch ``watch_id`` goes: ``(its queue, False)``;
    ``(None, True)`` for a watch nobody consumes any more, to stop (it
    leaves ``orphans``: stopped once); ``(None, False)`` to ignore (a
    watch just closed)."""
    events = watches.get(watch_id)
    if events is not None:
        return events, False
    if watch_id in orphans:
        orphans.discard(watch_id)
        return None, True
    return None, False


def unexpected(response: Response) -> LockbrokerError:
    """The error for an answer that is not the one asked for: the daemon's
    error as a :class:`BrokerError` subclass, or a :class:`LockbrokerError`."""
    if isinstance(response, ErrorResponse):
        return broker_error(response.error)
    return LockbrokerError("unexpected response from the daemon: %r" % (response,))


def checked(response: Response) -> Response:
    """``response``, unless it is an error: then that is raised."""
    if isinstance(response, ErrorResponse):
        raise broker_error(response.error)
    return response


def expect(response: Response, kind: Type[R]) -> R:
    """``response`` if it is a ``kind``; else raise what it says
    (:func:`unexpected`)."""
    if isinstance(response, kind):
        return response
    raise unexpected(response)


def acquire_result(response: Response) -> Optional[Grant]:
    """What an acquire's answer means: its grant, or None if it timed out
    (or was cancelled); raises the daemon's refusal."""
    if isinstance(response, Granted):
        return response.grant
    if isinstance(response, (TimedOut, Cancelled)):
        return None
    raise unexpected(response)


def watch_gone(error: LockbrokerError) -> bool:
    """Whether stopping a watch failed only because it is gone already:
    the session ended with it, or the daemon knows it no more
    (``not_pending``)."""
    if isinstance(error, ConnectionLost):
        return True
    return isinstance(error, NotHeld) and error.code == ErrorCode.NOT_PENDING

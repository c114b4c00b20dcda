"""Wire types, codec and framing of the lockbroker protocol, versions 1
to 4 (1 and 2 differ only in ``SessionInfo``: the codecs read and write
the version their reader or writer is for; 3 is 2 with the request
``AcquireAs`` appended, and 4 is 3 with ``AcquireWith`` and the event
``Contended``, which a client sends or asks for only in sessions of those
versions).

This module is the whole of PROTOCOL.md sections 2 to 5 in Python, and the
only place that knows the byte layout. It does no I/O.

Layout of the module:

* plain data classes, one per struct or enum variant of PROTOCOL.md
  section 4 (``Hello``, ``Acquire``, ``Granted``, ``StateSet``,
  ``StateChanged``, ...), and ``IntEnum`` s for the unit-only enums
  (``LockKind``, ``EntryKind``, ``ChangeKind``);
* one codec object per type (``_HELLO``, ``_ACQUIRE``, ...), built from small
  combinators (``_U32``, ``_I64``, ``_Str``, ``_Bytes``, ``_Opt``, ``_Vec``,
  ``_Struct``, ``_Variants``) that implement the fixed-width little-endian bincode 1.3.3
  encoding of PROTOCOL.md section 3;
* the entry points ``encode_client_message`` / ``decode_server_message``
  (what a client needs) and their mirrors ``decode_client_message`` /
  ``encode_server_message`` (for tests and tools), plus ``encode_frame`` and
  ``FrameBuffer`` for the length prefix of section 2.

Adding a request or response variant (a later protocol version) is three
steps: a data class, a ``_Struct`` codec listing its fields in wire order,
and one line appended to ``_REQUEST``, ``_RESPONSE`` or ``_EVENT``. Variants
are only ever appended: their position in those lists is their wire index.

Byte values (``bytes`` on the wire: state values) decode to ``bytes``; the
encoder also takes ``bytearray`` and ``memoryview``. Strings are ``str``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, Tuple, Type, TypeVar, Union

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "OLDEST_PROTOCOL_VERSION",
    "ACQUIRE_AS_VERSION",
    "ACQUIRE_WITH_VERSION",
    "MAX_WITHIN",
    "HANDSHAKE_MAX_FRAME_LEN",
    "DEFAULT_MAX_FRAME_LEN",
    "DecodeError",
    "EncodeError",
    "FrameTooLarge",
    "LockKind",
    "EntryKind",
    "ChangeKind",
    "ErrorCode",
    "error_code_name",
    "Hello",
    "Limits",
    "Welcome",
    "Acquire",
    "Cancel",
    "Release",
    "ReleaseByName",
    "Inspect",
    "Ping",
    "StateGet",
    "StateSet",
    "StateRemove",
    "StateIncrement",
    "StateList",
    "StateWatch",
    "StateUnwatch",
    "ReleaseOnClose",
    "StateFenced",
    "InspectAfter",
    "Metrics",
    "AcquireAs",
    "AcquireWith",
    "Actor",
    "Within",
    "NotifyContended",
    "Lease",
    "AcquireOption",
    "Contended",
    "Revoked",
    "ExtendLease",
    "Break",
    "Broken",
    "Request",
    "RequestMessage",
    "ClientMessage",
    "Grant",
    "Granted",
    "TimedOut",
    "Cancelled",
    "Released",
    "SessionInfo",
    "HolderInfo",
    "WaiterInfo",
    "EntryInfo",
    "ServerInfo",
    "Inspection",
    "Pong",
    "ErrorInfo",
    "ErrorResponse",
    "Done",
    "Versioned",
    "StateEntry",
    "StateValue",
    "StateWritten",
    "StateConflict",
    "StateRemoved",
    "StateCounter",
    "StateEntries",
    "MetricsText",
    "Response",
    "ResponseMessage",
    "ShuttingDown",
    "StateChanged",
    "WatchLagged",
    "Event",
    "EventMessage",
    "Fatal",
    "ServerMessage",
    "encode_client_message",
    "decode_client_message",
    "encode_server_message",
    "decode_server_message",
    "encode_frame",
    "FrameBuffer",
]

#: ``Hello.magic``: the ASCII bytes ``LKBR`` read as a little-endian u32.
MAGIC = 0x52424B4C
#: The latest protocol version this module speaks (and asks for).
PROTOCOL_VERSION = 4
#: The oldest one; a daemon that refuses a version is asked again in the
#: next lower one, down to this.
OLDEST_PROTOCOL_VERSION = 1
#: The first version with ``AcquireAs`` (deadlock detection).
ACQUIRE_AS_VERSION = 3
#: The first version with ``AcquireWith`` (and the event ``Contended``).
ACQUIRE_WITH_VERSION = 4
#: Most actors an acquire's ``Within`` may name.
MAX_WITHIN = 32
#: Largest body either side may send or expect before the ``Welcome``.
HANDSHAKE_MAX_FRAME_LEN = 4096
#: The daemon's default ``max_frame_len``.
DEFAULT_MAX_FRAME_LEN = 2097152


class DecodeError(ValueError):
    """A frame body is malformed (PROTOCOL.md section 2, error code 100)."""


class EncodeError(ValueError):
    """A value cannot be encoded (an integer out of its field's range, ...)."""


class FrameTooLarge(DecodeError):
    """A length prefix announces a body above the reader's maximum."""


# --------------------------------------------------------------------------
# Unit-only enums and error codes
# --------------------------------------------------------------------------


class LockKind(IntEnum):
    """``LockKind`` (PROTOCOL.md 4.8): what an acquire asks for."""

    MUTEX = 0
    SEMAPHORE = 1
    RW_SHARED = 2
    RW_EXCLUSIVE = 3


class EntryKind(IntEnum):
    """``EntryKind`` (PROTOCOL.md 4.9): the kind of an entry in Inspect."""

    MUTEX = 0
    SEMAPHORE = 1
    RWLOCK = 2


class ChangeKind(IntEnum):
    """``ChangeKind`` (PROTOCOL.md 4.30): what happened to a watched key."""

    SET = 0
    REMOVED = 1
    EXPIRED = 2


class ErrorCode(IntEnum):
    """The error codes protocol versions 1 to 3 define (PROTOCOL.md section 5).

    ``ErrorInfo.code`` is a plain ``int``, because a later daemon may send
    codes this enum does not know; compare it with these members.
    """

    MALFORMED = 100
    FRAME_TOO_LARGE = 101
    BAD_MAGIC = 102
    UNSUPPORTED_VERSION = 103
    HANDSHAKE_REQUIRED = 104
    UNEXPECTED_HELLO = 105
    TOO_MANY_CONNECTIONS = 106
    INVALID_NAME = 200
    INVALID_PERMITS = 201
    PERMITS_ABOVE_CAPACITY = 202
    INVALID_CAPACITY = 203
    CAPACITY_MISMATCH = 204
    KIND_MISMATCH = 205
    DUPLICATE_REQUEST_ID = 206
    INVALID_ARGUMENT = 207
    NOT_AN_INTEGER = 208
    DEADLOCK = 209
    UNSUPPORTED = 210
    FORBIDDEN = 211
    UNKNOWN_HOLD = 300
    NOT_HELD = 301
    NOT_PENDING = 302
    GUARD_NOT_HELD = 303
    STALE_FENCE = 304
    TOO_MANY_PENDING = 400
    TOO_MANY_HOLDS = 401
    RESPONSE_TOO_LARGE = 402
    VALUE_TOO_LARGE = 403
    QUOTA_EXCEEDED = 404
    SHUTTING_DOWN = 500
    INTERNAL = 501
    UNAVAILABLE = 502
    HOLDS_LOST = 503


def error_code_name(code: int) -> str:
    """The spec's name of ``code`` (``not_held``), or ``unknown_<code>``."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "unknown_%d" % code


# --------------------------------------------------------------------------
# Messages (PROTOCOL.md section 4), fields in wire order
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """``Hello``: the first frame of every connection (ClientMessage 0)."""

    magic: int = MAGIC
    version: int = PROTOCOL_VERSION
    client_name: str = ""


@dataclass(frozen=True)
class Limits:
    """``Limits``: the limits a session runs under, from its ``Welcome``."""

    max_frame_len: int
    max_pending: int
    max_holds: int


@dataclass(frozen=True)
class Welcome:
    """``Welcome``: the daemon accepted the ``Hello`` (ServerMessage 0)."""

    version: int
    server_version: str
    session_id: int
    limits: Limits


@dataclass(frozen=True)
class Acquire:
    """``Request::Acquire``: take ``permits`` of ``name``.

    ``timeout_ms``: None waits forever, 0 is a try, else milliseconds.
    """

    name: str
    kind: LockKind
    capacity: int = 0
    permits: int = 1
    timeout_ms: Optional[int] = None


@dataclass(frozen=True)
class Cancel:
    """``Request::Cancel``: cancel this session's waiting acquire."""

    request_id: int


@dataclass(frozen=True)
class Release:
    """``Request::Release``: release one hold by its id."""

    hold_id: int


@dataclass(frozen=True)
class ReleaseByName:
    """``Request::ReleaseByName``: release ``count`` permits, oldest hold first."""

    name: str
    count: int


@dataclass(frozen=True)
class Inspect:
    """``Request::Inspect``: list entries whose name starts with ``prefix``."""

    prefix: str = ""
    limit: int = 0


@dataclass(frozen=True)
class Ping:
    """``Request::Ping``: answered ``Pong``."""


@dataclass(frozen=True)
class StateGet:
    """``Request::StateGet``: read a key (PROTOCOL.md 10.5)."""

    key: str


@dataclass(frozen=True)
class StateSet:
    """``StateSet`` (PROTOCOL.md 4.20), the only field of ``Request::StateSet``.

    ``if_version``: None writes unconditionally, 0 only if the key does not
    exist, v only if the key's version is v (else ``StateConflict``).
    ``ttl_ms``: None never expires (clearing an earlier ttl). ``guard``: a
    ``hold_id`` the session must still hold (PROTOCOL.md 10.10).
    """

    key: str
    value: bytes
    if_version: Optional[int] = None
    ttl_ms: Optional[int] = None
    guard: Optional[int] = None


@dataclass(frozen=True)
class StateRemove:
    """``Request::StateRemove`` (PROTOCOL.md 4.21, 10.7)."""

    key: str
    if_version: Optional[int] = None
    guard: Optional[int] = None


@dataclass(frozen=True)
class StateIncrement:
    """``Request::StateIncrement``: add ``delta`` (an i64) to a decimal integer."""

    key: str
    delta: int = 1
    guard: Optional[int] = None


@dataclass(frozen=True)
class StateList:
    """``Request::StateList``: one page of the keys starting with ``prefix``.

    ``start_after`` is the last key of the previous page (exclusive);
    ``limit`` 0 means the daemon's default (1000).
    """

    prefix: str = ""
    start_after: str = ""
    limit: int = 0
    with_values: bool = False


@dataclass(frozen=True)
class StateWatch:
    """``Request::StateWatch``: push the changes of a key or prefix.

    The request's id names the watch (PROTOCOL.md 4.24, 10.11).
    ``from_version`` 0 starts with the changes after the watch is set up;
    N >= 1 first replays the retained changes with version >= N.
    """

    key: str
    prefix: bool = False
    from_version: int = 0
    with_values: bool = False


@dataclass(frozen=True)
class StateUnwatch:
    """``Request::StateUnwatch``: stop the watch with this id."""

    watch_id: int


@dataclass(frozen=True)
class ReleaseOnClose:
    """``Request::ReleaseOnClose``: end the holds as released, not abandoned,
    when the connection closes (PROTOCOL.md 6.3)."""


@dataclass(frozen=True)
class StateFenced:
    """``Request::StateFenced``: ``write`` (a StateSet, StateRemove or
    StateIncrement without a guard) applied only while ``lock`` has a live
    hold with ``fence``, whoever holds it (PROTOCOL.md 10.13)."""

    lock: str
    fence: int
    write: Any


@dataclass(frozen=True)
class InspectAfter:
    """``Request::InspectAfter``: one page of entries after ``start_after``.

    ``start_after`` is the last name of the previous page (exclusive; empty
    starts at the first); the answer's ``truncated`` says more follow.
    ``limit`` 0 means the daemon's default (1000).
    """

    prefix: str = ""
    start_after: str = ""
    limit: int = 0


@dataclass(frozen=True)
class Metrics:
    """``Request::Metrics``: answered ``MetricsText`` (PROTOCOL.md 9.5).

    A daemon older than the request answers ``Fatal(malformed)`` and closes
    the connection.
    """


@dataclass(frozen=True)
class AcquireAs:
    """``Request::AcquireAs`` (PROTOCOL.md 4.32, version 3 only): ``acquire``
    on behalf of ``actor``, a thread of control whose waits the daemon checks
    for deadlock (8.11).

    ``actor`` is any u64 but 0, the same for every acquire of one thread,
    task or command; a wait that could never be granted is refused with
    ``Error(deadlock)`` (209) and nothing is queued. Otherwise answered as
    ``Acquire`` is.
    """

    actor: int
    acquire: Acquire


@dataclass(frozen=True)
class Actor:
    """``AcquireOption::Actor``: on behalf of ``actor`` (not 0), as
    ``AcquireAs``."""

    actor: int


@dataclass(frozen=True)
class Within:
    """``AcquireOption::Within``: the actor runs within ``actors``
    (nearest first; at most :data:`MAX_WITHIN`, none 0), as a command run
    under a lock runs within its wrapper, which keeps the lock until the
    command ends."""

    actors: List[int]


@dataclass(frozen=True)
class NotifyContended:
    """``AcquireOption::NotifyContended``: tell the session, once, when
    someone waits on the name while the hold lasts (``Contended``)."""


@dataclass(frozen=True)
class Lease:
    """``AcquireOption::Lease``: hold the grant at most ``ms`` milliseconds
    (1 to 2**40), then it is revoked (``Revoked``, PROTOCOL.md 8.12)."""

    ms: int


#: Every variant of ``AcquireOption`` (PROTOCOL.md 4.33).
AcquireOption = Union[Actor, Within, NotifyContended, Lease]


@dataclass(frozen=True)
class AcquireWith:
    """``Request::AcquireWith`` (PROTOCOL.md 4.33, version 4 and later):
    ``acquire`` with ``options``, each at most once. Answered as ``Acquire``
    is."""

    acquire: Acquire
    options: List[AcquireOption]


@dataclass(frozen=True)
class ExtendLease:
    """``Request::ExtendLease`` (version 4): hold ``hold_id``'s lease ends
    ``lease_ms`` from now. Answered ``Done`` (PROTOCOL.md 8.12)."""

    hold_id: int
    lease_ms: int


@dataclass(frozen=True)
class Break:
    """``Request::Break`` (version 4): revoke the holds of ``name`` (hold
    ``hold_id`` only, if not None) of whichever sessions have them, as their
    user, root or the daemon's admin group may. Answered ``Broken``
    (PROTOCOL.md 8.13)."""

    name: str
    hold_id: Optional[int] = None


#: Every variant of ``Request``.
Request = Union[
    Acquire,
    Cancel,
    Release,
    ReleaseByName,
    Inspect,
    Ping,
    StateGet,
    StateSet,
    StateRemove,
    StateIncrement,
    StateList,
    StateWatch,
    StateUnwatch,
    ReleaseOnClose,
    StateFenced,
    InspectAfter,
    Metrics,
    AcquireAs,
    AcquireWith,
    ExtendLease,
    Break,
]


@dataclass(frozen=True)
class RequestMessage:
    """``ClientMessage::Request { id, request }`` (ClientMessage 1)."""

    id: int
    request: Request


#: Every frame a client sends.
ClientMessage = Union[Hello, RequestMessage]


@dataclass(frozen=True)
class Grant:
    """``Grant``: the hold an acquire created.

    ``fence`` only grows; ``abandoned`` says the previous holder's session
    ended while holding the lock (PROTOCOL.md 8.6).
    """

    hold_id: int
    fence: int
    abandoned: bool


@dataclass(frozen=True)
class Granted:
    """``Response::Granted``: the acquire succeeded."""

    grant: Grant


@dataclass(frozen=True)
class TimedOut:
    """``Response::TimedOut``: timeout ran out, or a try failed; nothing held."""


@dataclass(frozen=True)
class Cancelled:
    """``Response::Cancelled``: the acquire was cancelled; nothing held."""


@dataclass(frozen=True)
class Released:
    """``Response::Released``: how many permits were released."""

    permits: int


@dataclass(frozen=True)
class SessionInfo:
    """``SessionInfo``: a session as Inspect shows it.

    ``host`` (its daemon's host) and ``user`` (its account's name there)
    came with protocol version 2: empty from a version 1 daemon, or when
    unknown."""

    session_id: int
    pid: Optional[int]
    uid: Optional[int]
    gid: Optional[int]
    client_name: str
    host: str = ""
    user: str = ""


@dataclass(frozen=True)
class HolderInfo:
    """``HolderInfo``: one hold of an entry."""

    session: SessionInfo
    hold_id: int
    kind: LockKind
    permits: int
    fence: int
    since_ms: int


@dataclass(frozen=True)
class WaiterInfo:
    """``WaiterInfo``: one waiting acquire of an entry."""

    session: SessionInfo
    request_id: int
    kind: LockKind
    permits: int
    since_ms: int
    timeout_ms: Optional[int]


@dataclass(frozen=True)
class EntryInfo:
    """``EntryInfo``: one lock entry with its holders and queue."""

    name: str
    kind: EntryKind
    capacity: int
    abandoned: bool
    holders: List[HolderInfo] = field(default_factory=list)
    waiters: List[WaiterInfo] = field(default_factory=list)


@dataclass(frozen=True)
class ServerInfo:
    """``ServerInfo``: facts about the daemon."""

    version: str
    pid: int
    uptime_ms: int
    sessions: int


@dataclass(frozen=True)
class Inspection:
    """``Inspection`` (also the ``Response::Inspection`` variant itself)."""

    server: ServerInfo
    entries: List[EntryInfo]
    truncated: bool


@dataclass(frozen=True)
class Pong:
    """``Response::Pong``: the answer to ``Ping``."""


@dataclass(frozen=True)
class ErrorInfo:
    """``ErrorInfo``: an error code (a plain int) and a text for people."""

    code: int
    message: str


@dataclass(frozen=True)
class ErrorResponse:
    """``Response::Error``: the request failed and had no effect."""

    error: ErrorInfo


@dataclass(frozen=True)
class Done:
    """``Response::Done``: the request (``Cancel``) was carried out."""


@dataclass(frozen=True)
class Versioned:
    """``Versioned`` (PROTOCOL.md 4.25): a value and the version of the
    write that stored it."""

    value: bytes
    version: int


@dataclass(frozen=True)
class StateEntry:
    """``StateEntry`` (PROTOCOL.md 4.28): a key of a ``StateList`` page.

    ``value`` is None unless the list asked for values.
    """

    key: str
    version: int
    value: Optional[bytes] = None


@dataclass(frozen=True)
class StateValue:
    """``Response::StateValue``: the answer to ``StateGet`` (None: no such key)."""

    versioned: Optional[Versioned]


@dataclass(frozen=True)
class StateWritten:
    """``Response::StateWritten``: a ``StateSet`` was applied at ``version``."""

    version: int


@dataclass(frozen=True)
class StateConflict:
    """``Response::StateConflict``: the ``if_version`` did not match.

    ``current`` is the key's version (0: absent); nothing changed.
    """

    current: int


@dataclass(frozen=True)
class StateRemoved:
    """``Response::StateRemoved``: the removed value and its version, or
    None if there was no such key."""

    removed: Optional[Versioned]


@dataclass(frozen=True)
class StateCounter:
    """``Response::StateCounter``: the sum after a ``StateIncrement``, and
    the key's new version."""

    value: int
    version: int


@dataclass(frozen=True)
class StateEntries:
    """``Response::StateEntries``: one page of ``StateList``.

    ``more``: further keys match; ask again with ``start_after`` = the last key.
    """

    entries: List[StateEntry]
    more: bool


@dataclass(frozen=True)
class MetricsText:
    """``Response::Metrics``: the answer to ``Metrics`` (PROTOCOL.md 9.5).

    ``text`` is the daemon's metrics in the OpenMetrics text format, ending
    with ``# EOF``; the order of its lines is not fixed.
    """

    text: str


@dataclass(frozen=True)
class Broken:
    """``Response::Broken`` (version 4): the holds a ``Break`` revoked, in
    grant order."""

    hold_ids: List[int]


#: Every variant of ``Response``.
Response = Union[
    Granted,
    TimedOut,
    Cancelled,
    Released,
    Inspection,
    Pong,
    ErrorResponse,
    Done,
    StateValue,
    StateWritten,
    StateConflict,
    StateRemoved,
    StateCounter,
    StateEntries,
    MetricsText,
    Broken,
]


@dataclass(frozen=True)
class ResponseMessage:
    """``ServerMessage::Response { id, response }`` (ServerMessage 1)."""

    id: int
    response: Response


@dataclass(frozen=True)
class ShuttingDown:
    """``Event::ShuttingDown``: the daemon is stopping (PROTOCOL.md 9.3)."""


@dataclass(frozen=True)
class StateChanged:
    """``Event::StateChanged`` (PROTOCOL.md 4.29): a key watch ``watch_id``
    covers changed.

    ``value`` is the value written for a ``SET`` when the watch asked for
    values, else None.
    """

    watch_id: int
    key: str
    version: int
    change: ChangeKind
    value: Optional[bytes] = None


@dataclass(frozen=True)
class WatchLagged:
    """``Event::WatchLagged``: watch ``watch_id`` may have missed changes."""

    watch_id: int


@dataclass(frozen=True)
class Contended:
    """``Event::Contended`` (version 4): someone waits on the name of hold
    ``hold_id``, which asked (``NotifyContended``); once per hold."""

    hold_id: int


@dataclass(frozen=True)
class Revoked:
    """``Event::Revoked`` (version 4): hold ``hold_id`` ended without a
    release -- its lease ran out, or someone broke it (``message`` says
    which); the session no longer has it."""

    hold_id: int
    message: str


#: Every variant of ``Event`` (PROTOCOL.md 4.18).
Event = Union[ShuttingDown, StateChanged, WatchLagged, Contended, Revoked]


@dataclass(frozen=True)
class EventMessage:
    """``ServerMessage::Event`` (ServerMessage 2)."""

    event: Event


@dataclass(frozen=True)
class Fatal:
    """``ServerMessage::Fatal``: the daemon's last frame (ServerMessage 3)."""

    error: ErrorInfo


#: Every frame the daemon sends.
ServerMessage = Union[Welcome, ResponseMessage, EventMessage, Fatal]


# --------------------------------------------------------------------------
# Encoding primitives (PROTOCOL.md section 3)
# --------------------------------------------------------------------------

T = TypeVar("T")


class _Writer:
    """Accumulates the bytes of one body, of protocol ``version``."""

    def __init__(self, version: int = PROTOCOL_VERSION) -> None:
        self.parts: List[bytes] = []
        self.version = version

    def pack(self, fmt: str, value: int) -> None:
        try:
            self.parts.append(struct.pack(fmt, value))
        except struct.error as e:
            raise EncodeError("%r does not fit %s: %s" % (value, fmt, e)) from None

    def raw(self, data: bytes) -> None:
        self.parts.append(data)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    """Reads one body, of protocol ``version``; every read checks that the
    bytes are there."""

    def __init__(self, data: bytes, version: int = PROTOCOL_VERSION) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.version = version

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n > self.remaining():
            raise DecodeError("needs %d bytes at offset %d, body has %d left" % (n, self.pos, self.remaining()))
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, st: struct.Struct) -> int:
        value: int = st.unpack(self.take(st.size))[0]
        return value

    def finish(self) -> None:
        # Trailing bytes make a body malformed (PROTOCOL.md section 2).
        if self.remaining():
            raise DecodeError("%d trailing bytes after the message" % self.remaining())


class _Codec(Generic[T]):
    """Encodes and decodes values of one wire type."""

    def encode(self, w: _Writer, value: T) -> None:
        """Append the bytes of ``value``."""
        raise NotImplementedError

    def decode(self, r: _Reader) -> T:
        """Read one value; raise ``DecodeError`` if the bytes are malformed."""
        raise NotImplementedError


class _Int(_Codec[int]):
    """A fixed-width little-endian unsigned integer."""

    def __init__(self, fmt: str) -> None:
        self.st = struct.Struct(fmt)

    def encode(self, w: _Writer, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EncodeError("expected an int, got %r" % (value,))
        w.pack(self.st.format, value)

    def decode(self, r: _Reader) -> int:
        return r.unpack(self.st)


_U8 = _Int("<B")
_U16 = _Int("<H")
_U32 = _Int("<I")
_U64 = _Int("<Q")
_I64 = _Int("<q")


class _Bool(_Codec[bool]):
    """``bool``: one byte, 0 or 1; any other value is malformed."""

    def encode(self, w: _Writer, value: bool) -> None:
        w.raw(b"\x01" if value else b"\x00")

    def decode(self, r: _Reader) -> bool:
        b = r.unpack(_U8.st)
        if b > 1:
            raise DecodeError("bool byte %d is neither 0 nor 1" % b)
        return b == 1


class _Str(_Codec[str]):
    """``string``: u64 byte length, then UTF-8 (invalid UTF-8 is malformed)."""

    def encode(self, w: _Writer, value: str) -> None:
        if not isinstance(value, str):
            raise EncodeError("expected a str, got %r" % (value,))
        data = value.encode("utf-8")
        w.pack("<Q", len(data))
        w.raw(data)

    def decode(self, r: _Reader) -> str:
        n = r.unpack(_U64.st)
        raw = r.take(n)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError("invalid UTF-8 in a string: %s" % e) from None


class _Bytes(_Codec[bytes]):
    """``bytes`` (``Vec<u8>``): u64 length, then the bytes, any values."""

    def encode(self, w: _Writer, value: bytes) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise EncodeError("expected bytes, got %r" % (value,))
        data = bytes(value)
        w.pack("<Q", len(data))
        w.raw(data)

    def decode(self, r: _Reader) -> bytes:
        n = r.unpack(_U64.st)
        return bytes(r.take(n))


class _Opt(_Codec[Optional[T]]):
    """``Option<T>``: tag 0 (None) or tag 1 followed by the value."""

    def __init__(self, inner: _Codec[T]) -> None:
        self.inner = inner

    def encode(self, w: _Writer, value: Optional[T]) -> None:
        if value is None:
            w.raw(b"\x00")
        else:
            w.raw(b"\x01")
            self.inner.encode(w, value)

    def decode(self, r: _Reader) -> Optional[T]:
        tag = r.unpack(_U8.st)
        if tag == 0:
            return None
        if tag == 1:
            return self.inner.decode(r)
        raise DecodeError("Option tag %d is neither 0 nor 1" % tag)


class _Deferred(_Codec[Any]):
    """A codec looked up when first used: ``StateFenced`` holds a whole
    ``Request``, whose codec is defined after it."""

    def __init__(self, get: Callable[[], _Codec[Any]]) -> None:
        self.get = get

    def encode(self, w: _Writer, value: Any) -> None:
        self.get().encode(w, value)

    def decode(self, r: _Reader) -> Any:
        return self.get().decode(r)


class _Vec(_Codec[List[T]]):
    """``Vec<T>``: u64 element count, then the elements."""

    def __init__(self, inner: _Codec[T]) -> None:
        self.inner = inner

    def encode(self, w: _Writer, value: List[T]) -> None:
        w.pack("<Q", len(value))
        for item in value:
            self.inner.encode(w, item)

    def decode(self, r: _Reader) -> List[T]:
        n = r.unpack(_U64.st)
        # Every element type of v1 takes at least one byte, so a count above
        # the bytes left is malformed; checking first bounds the work.
        if n > r.remaining():
            raise DecodeError("vector of %d elements in %d bytes" % (n, r.remaining()))
        return [self.inner.decode(r) for _ in range(n)]


E = TypeVar("E", bound=IntEnum)


class _UnitEnum(_Codec[E]):
    """An enum of unit variants: the u32 variant index alone."""

    def __init__(self, cls: Type[E]) -> None:
        self.cls = cls

    def encode(self, w: _Writer, value: E) -> None:
        w.pack("<I", int(self.cls(value)))

    def decode(self, r: _Reader) -> E:
        index = r.unpack(_U32.st)
        try:
            return self.cls(index)
        except ValueError:
            raise DecodeError("unknown %s variant index %d" % (self.cls.__name__, index)) from None


class _Struct(_Codec[T]):
    """A struct (or the fields of an enum variant): fields in wire order."""

    def __init__(self, cls: Type[T], spec: Sequence[Tuple[str, _Codec[Any]]]) -> None:
        # The data class must declare exactly these fields in this order, so
        # that decoding can pass them positionally.
        declared = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        if declared != [name for name, _ in spec]:
            raise AssertionError("%s: fields %r, codec %r" % (cls.__name__, declared, spec))
        self.cls = cls
        self.spec = spec

    def encode(self, w: _Writer, value: T) -> None:
        if not isinstance(value, self.cls):
            raise EncodeError("expected a %s, got %r" % (self.cls.__name__, value))
        for name, codec in self.spec:
            codec.encode(w, getattr(value, name))

    def decode(self, r: _Reader) -> T:
        return self.cls(*[codec.decode(r) for _, codec in self.spec])


class _Variants(_Codec[Any]):
    """An enum with data: u32 variant index, then the variant's fields.

    ``variants[i]`` is the codec of variant ``i``; each is a ``_Struct`` over
    a distinct class, which is how encoding finds the index.
    """

    def __init__(self, name: str, variants: Sequence[_Struct[Any]]) -> None:
        self.name = name
        self.variants = list(variants)
        self.index: Dict[type, int] = {v.cls: i for i, v in enumerate(self.variants)}

    def encode(self, w: _Writer, value: Any) -> None:
        index = self.index.get(type(value))
        if index is None:
            raise EncodeError("%r is not a %s variant" % (value, self.name))
        w.pack("<I", index)
        self.variants[index].encode(w, value)

    def decode(self, r: _Reader) -> Any:
        index = r.unpack(_U32.st)
        if index >= len(self.variants):
            raise DecodeError("unknown %s variant index %d" % (self.name, index))
        return self.variants[index].decode(r)


# --------------------------------------------------------------------------
# One codec per type of PROTOCOL.md section 4
# --------------------------------------------------------------------------

_STR = _Str()
_BYTES = _Bytes()
_BOOL = _Bool()
_LOCK_KIND: _Codec[LockKind] = _UnitEnum(LockKind)
_ENTRY_KIND: _Codec[EntryKind] = _UnitEnum(EntryKind)
_CHANGE_KIND: _Codec[ChangeKind] = _UnitEnum(ChangeKind)

_HELLO = _Struct(Hello, [("magic", _U32), ("version", _U16), ("client_name", _STR)])
_LIMITS = _Struct(Limits, [("max_frame_len", _U32), ("max_pending", _U32), ("max_holds", _U32)])
_WELCOME = _Struct(
    Welcome, [("version", _U16), ("server_version", _STR), ("session_id", _U64), ("limits", _LIMITS)]
)
_ERROR_INFO = _Struct(ErrorInfo, [("code", _U16), ("message", _STR)])

_ACQUIRE = _Struct(
    Acquire,
    [
        ("name", _STR),
        ("kind", _LOCK_KIND),
        ("capacity", _U32),
        ("permits", _U32),
        ("timeout_ms", _Opt(_U64)),
    ],
)
_ACQUIRE_OPTION = _Variants(
    "AcquireOption",
    [
        _Struct(Actor, [("actor", _U64)]),  # 0
        _Struct(Within, [("actors", _Vec(_U64))]),  # 1
        _Struct(NotifyContended, []),  # 2
        _Struct(Lease, [("ms", _U64)]),  # 3
    ],
)

_REQUEST = _Variants(
    "Request",
    [
        _ACQUIRE,  # 0
        _Struct(Cancel, [("request_id", _U64)]),  # 1
        _Struct(Release, [("hold_id", _U64)]),  # 2
        _Struct(ReleaseByName, [("name", _STR), ("count", _U32)]),  # 3
        _Struct(Inspect, [("prefix", _STR), ("limit", _U32)]),  # 4
        _Struct(Ping, []),  # 5
        _Struct(StateGet, [("key", _STR)]),  # 6
        _Struct(  # 7: Request::StateSet(StateSet), encoded as the struct's fields
            StateSet,
            [
                ("key", _STR),
                ("value", _BYTES),
                ("if_version", _Opt(_U64)),
                ("ttl_ms", _Opt(_U64)),
                ("guard", _Opt(_U64)),
            ],
        ),
        _Struct(StateRemove, [("key", _STR), ("if_version", _Opt(_U64)), ("guard", _Opt(_U64))]),  # 8
        _Struct(StateIncrement, [("key", _STR), ("delta", _I64), ("guard", _Opt(_U64))]),  # 9
        _Struct(  # 10
            StateList,
            [("prefix", _STR), ("start_after", _STR), ("limit", _U32), ("with_values", _BOOL)],
        ),
        _Struct(  # 11
            StateWatch,
            [("key", _STR), ("prefix", _BOOL), ("from_version", _U64), ("with_values", _BOOL)],
        ),
        _Struct(StateUnwatch, [("watch_id", _U64)]),  # 12
        _Struct(ReleaseOnClose, []),  # 13
        _Struct(StateFenced, [("lock", _STR), ("fence", _U64), ("write", _Deferred(lambda: _REQUEST))]),  # 14
        _Struct(InspectAfter, [("prefix", _STR), ("start_after", _STR), ("limit", _U32)]),  # 15
        _Struct(Metrics, []),  # 16
        _Struct(AcquireAs, [("actor", _U64), ("acquire", _ACQUIRE)]),  # 17: version 3
        _Struct(AcquireWith, [("acquire", _ACQUIRE), ("options", _Vec(_ACQUIRE_OPTION))]),  # 18: version 4
        _Struct(ExtendLease, [("hold_id", _U64), ("lease_ms", _U64)]),  # 19: version 4
        _Struct(Break, [("name", _STR), ("hold_id", _Opt(_U64))]),  # 20: version 4
    ],
)

_GRANT = _Struct(Grant, [("hold_id", _U64), ("fence", _U64), ("abandoned", _BOOL)])


class _SessionInfoCodec(_Codec[SessionInfo]):
    """``SessionInfo``: five fields in version 1, ``host`` and ``user``
    appended from version 2 (PROTOCOL.md 4.17)."""

    V1 = [
        ("session_id", _U64),
        ("pid", _Opt(_U32)),
        ("uid", _Opt(_U32)),
        ("gid", _Opt(_U32)),
        ("client_name", _STR),
    ]
    V2 = V1 + [("host", _STR), ("user", _STR)]

    def spec(self, version: int) -> List[Tuple[str, _Codec[Any]]]:
        return self.V2 if version >= 2 else self.V1

    def encode(self, w: _Writer, value: SessionInfo) -> None:
        if not isinstance(value, SessionInfo):
            raise EncodeError("expected a SessionInfo, got %r" % (value,))
        for name, codec in self.spec(w.version):
            codec.encode(w, getattr(value, name))

    def decode(self, r: _Reader) -> SessionInfo:
        return SessionInfo(*[codec.decode(r) for _, codec in self.spec(r.version)])


_SESSION_INFO = _SessionInfoCodec()
_HOLDER_INFO = _Struct(
    HolderInfo,
    [
        ("session", _SESSION_INFO),
        ("hold_id", _U64),
        ("kind", _LOCK_KIND),
        ("permits", _U32),
        ("fence", _U64),
        ("since_ms", _U64),
    ],
)
_WAITER_INFO = _Struct(
    WaiterInfo,
    [
        ("session", _SESSION_INFO),
        ("request_id", _U64),
        ("kind", _LOCK_KIND),
        ("permits", _U32),
        ("since_ms", _U64),
        ("timeout_ms", _Opt(_U64)),
    ],
)
_ENTRY_INFO = _Struct(
    EntryInfo,
    [
        ("name", _STR),
        ("kind", _ENTRY_KIND),
        ("capacity", _U32),
        ("abandoned", _BOOL),
        ("holders", _Vec(_HOLDER_INFO)),
        ("waiters", _Vec(_WAITER_INFO)),
    ],
)
_SERVER_INFO = _Struct(
    ServerInfo, [("version", _STR), ("pid", _U32), ("uptime_ms", _U64), ("sessions", _U64)]
)
_INSPECTION = _Struct(
    Inspection, [("server", _SERVER_INFO), ("entries", _Vec(_ENTRY_INFO)), ("truncated", _BOOL)]
)
_VERSIONED = _Struct(Versioned, [("value", _BYTES), ("version", _U64)])
_STATE_ENTRY = _Struct(StateEntry, [("key", _STR), ("version", _U64), ("value", _Opt(_BYTES))])
_RESPONSE = _Variants(
    "Response",
    [
        _Struct(Granted, [("grant", _GRANT)]),  # 0
        _Struct(TimedOut, []),  # 1
        _Struct(Cancelled, []),  # 2
        _Struct(Released, [("permits", _U32)]),  # 3
        _INSPECTION,  # 4
        _Struct(Pong, []),  # 5
        _Struct(ErrorResponse, [("error", _ERROR_INFO)]),  # 6
        _Struct(Done, []),  # 7
        _Struct(StateValue, [("versioned", _Opt(_VERSIONED))]),  # 8
        _Struct(StateWritten, [("version", _U64)]),  # 9
        _Struct(StateConflict, [("current", _U64)]),  # 10
        _Struct(StateRemoved, [("removed", _Opt(_VERSIONED))]),  # 11
        _Struct(StateCounter, [("value", _I64), ("version", _U64)]),  # 12
        _Struct(StateEntries, [("entries", _Vec(_STATE_ENTRY)), ("more", _BOOL)]),  # 13
        _Struct(MetricsText, [("text", _STR)]),  # 14
        _Struct(Broken, [("hold_ids", _Vec(_U64))]),  # 15: version 4
    ],
)
_EVENT = _Variants(
    "Event",
    [
        _Struct(ShuttingDown, []),  # 0
        _Struct(  # 1
            StateChanged,
            [
                ("watch_id", _U64),
                ("key", _STR),
                ("version", _U64),
                ("change", _CHANGE_KIND),
                ("value", _Opt(_BYTES)),
            ],
        ),
        _Struct(WatchLagged, [("watch_id", _U64)]),  # 2
        _Struct(Contended, [("hold_id", _U64)]),  # 3: version 4
        _Struct(Revoked, [("hold_id", _U64), ("message", _STR)]),  # 4: version 4
    ],
)

_CLIENT_MESSAGE = _Variants(
    "ClientMessage",
    [
        _HELLO,  # 0
        _Struct(RequestMessage, [("id", _U64), ("request", _REQUEST)]),  # 1
    ],
)
_SERVER_MESSAGE = _Variants(
    "ServerMessage",
    [
        _WELCOME,  # 0
        _Struct(ResponseMessage, [("id", _U64), ("response", _RESPONSE)]),  # 1
        _Struct(EventMessage, [("event", _EVENT)]),  # 2
        _Struct(Fatal, [("error", _ERROR_INFO)]),  # 3
    ],
)


def _encode(codec: _Codec[Any], value: Any, version: int = PROTOCOL_VERSION) -> bytes:
    w = _Writer(version)
    codec.encode(w, value)
    return w.getvalue()


def _decode(codec: _Codec[Any], body: bytes, version: int = PROTOCOL_VERSION) -> Any:
    if not body:
        raise DecodeError("empty body")
    r = _Reader(body, version)
    value = codec.decode(r)
    r.finish()
    return value


# Fast paths for the frames of a lock's cycle -- Acquire (and AcquireAs) and
# Release, and their Granted and Released answers: the same bytes as the
# codecs above without walking them (the codec tests check that both agree).
# Anything unusual (a value out of range, a bool for an int) takes the
# codecs, which raise the errors.
_REQUEST_HEAD = struct.Struct("<IQI")  # ClientMessage::Request, id, variant
_RELEASE_INDEX = _REQUEST.index[Release]
_ACQUIRE_INDEX = _REQUEST.index[Acquire]
_ACQUIRE_AS_INDEX = _REQUEST.index[AcquireAs]
_RELEASE = struct.Struct("<IQIQ")  # ... then hold_id
_ACQUIRE_AS_HEAD = struct.Struct("<IQIQ")  # ... then the actor
_ACQUIRE_TAIL = struct.Struct("<III")  # kind, capacity, permits
_U64_ST = struct.Struct("<Q")
_RESPONSE_HEAD = struct.Struct("<IQI")  # ServerMessage::Response, id, variant
_GRANTED = struct.Struct("<QQB")
_RELEASED = struct.Struct("<I")


def _fast_acquire(a: Acquire) -> Optional[bytes]:
    """The bytes of an ``Acquire``'s fields, or None to take the codecs."""
    if not (type(a) is Acquire and type(a.name) is str and type(a.kind) is LockKind):
        return None
    if not (type(a.capacity) is int and type(a.permits) is int):
        return None
    name = a.name.encode("utf-8")
    t = a.timeout_ms
    if t is None:
        timeout = b"\x00"
    elif type(t) is int:
        timeout = b"\x01" + _U64_ST.pack(t)
    else:
        return None
    return b"".join((_U64_ST.pack(len(name)), name, _ACQUIRE_TAIL.pack(int(a.kind), a.capacity, a.permits), timeout))


def _fast_request(message: RequestMessage) -> Optional[bytes]:
    """The body of a common request, or None to take the codecs."""
    request = message.request
    rid = message.id
    if type(rid) is not int:
        return None
    kind = type(request)
    try:
        if kind is Release:
            hold = request.hold_id  # type: ignore[union-attr]
            if type(hold) is int:
                return _RELEASE.pack(1, rid, _RELEASE_INDEX, hold)
        elif kind is Acquire:
            fields_ = _fast_acquire(request)  # type: ignore[arg-type]
            if fields_ is not None:
                return _REQUEST_HEAD.pack(1, rid, _ACQUIRE_INDEX) + fields_
        elif kind is AcquireAs:
            actor = request.actor  # type: ignore[union-attr]
            if type(actor) is int:
                fields_ = _fast_acquire(request.acquire)  # type: ignore[union-attr]
                if fields_ is not None:
                    return _ACQUIRE_AS_HEAD.pack(1, rid, _ACQUIRE_AS_INDEX, actor) + fields_
    except struct.error:
        return None
    return None


def encode_client_message(message: ClientMessage) -> bytes:
    """The body (no length prefix) of a ``ClientMessage``."""
    if type(message) is RequestMessage:
        body = _fast_request(message)
        if body is not None:
            return body
    return _encode(_CLIENT_MESSAGE, message)


def decode_client_message(body: bytes) -> ClientMessage:
    """Decode a ``ClientMessage`` body; raises ``DecodeError`` if malformed."""
    message: ClientMessage = _decode(_CLIENT_MESSAGE, body)
    return message


def encode_server_message(message: ServerMessage, version: int = PROTOCOL_VERSION) -> bytes:
    """The body (no length prefix) of a ``ServerMessage`` of protocol
    ``version`` (tests and tools)."""
    return _encode(_SERVER_MESSAGE, message, version)


def decode_server_message(body: bytes, version: int = PROTOCOL_VERSION) -> ServerMessage:
    """Decode a ``ServerMessage`` body of protocol ``version`` (the one the
    handshake agreed); raises ``DecodeError`` if malformed."""
    n = len(body)
    if n >= _RESPONSE_HEAD.size:
        tag, rid, variant = _RESPONSE_HEAD.unpack_from(body)
        if tag == 1:
            if variant == 0 and n == _RESPONSE_HEAD.size + _GRANTED.size:
                hold, fence, abandoned = _GRANTED.unpack_from(body, _RESPONSE_HEAD.size)
                if abandoned <= 1:
                    return ResponseMessage(rid, Granted(Grant(hold, fence, abandoned == 1)))
            elif variant == 3 and n == _RESPONSE_HEAD.size + _RELEASED.size:
                (permits,) = _RELEASED.unpack_from(body, _RESPONSE_HEAD.size)
                return ResponseMessage(rid, Released(permits))
    message: ServerMessage = _decode(_SERVER_MESSAGE, body, version)
    return message


# --------------------------------------------------------------------------
# Framing (PROTOCOL.md section 2)
# --------------------------------------------------------------------------

_PREFIX = struct.Struct("<I")


def encode_frame(body: bytes) -> bytes:
    """``body`` with its 4-byte little-endian length prefix."""
    return _PREFIX.pack(len(body)) + body


class FrameBuffer:
    """Splits a byte stream into frame bodies.

    Feed it whatever a read returned; ``next_body`` yields complete bodies
    and leaves a partial frame buffered ("incomplete" is not an error). The
    length prefix is checked against ``max_len`` before any body byte is
    kept, so a hostile length never makes it allocate.
    """

    def __init__(self, max_len: int = HANDSHAKE_MAX_FRAME_LEN) -> None:
        self.max_len = max_len
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Append bytes read from the stream."""
        self._buf += data

    def next_body(self) -> Optional[bytes]:
        """The next complete body, or None until more bytes arrive.

        Raises ``FrameTooLarge`` when the prefix exceeds ``max_len``.
        """
        if len(self._buf) < _PREFIX.size:
            return None
        (n,) = _PREFIX.unpack_from(self._buf)
        if n > self.max_len:
            raise FrameTooLarge("frame of %d bytes above the maximum of %d" % (n, self.max_len))
        end = _PREFIX.size + n
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[_PREFIX.size : end])
        del self._buf[:end]
        return body

    def has_partial(self) -> bool:
        """True if a frame has started but not finished (a broken stream at EOF)."""
        return bool(self._buf)


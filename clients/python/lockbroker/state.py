"""The daemon's shared state: versioned keys, and watches as iterators.

:class:`State` reads and writes the daemon's key/value store (PROTOCOL.md
section 10) through a client's session::

    state = lockbroker.State()               # the default client; or client.state
    version = state.set("cfg/mode", "fast")  # str is stored as UTF-8
    state.get("cfg/mode")                    # Versioned(value=b'fast', version=...)

Every key has a version, from one daemon-wide counter, that changes with
every write. Values are bytes (``str`` is encoded as UTF-8 on the way in;
values always come back as ``bytes``).

Decisions worth knowing:

* **Conditional writes raise.** ``set(..., if_version=v)`` and
  ``remove(..., if_version=v)`` raise :class:`~lockbroker.errors.VersionConflict`
  (with ``.current``) when the key is not at version ``v`` (``0``: the key
  must not exist), since a write that did not happen must not look like one
  that did. :meth:`State.compare_and_set` is the boolean form, and
  :meth:`State.update` the whole read-modify-write loop.
* **Guards.** ``guard=`` takes a hold id (``int``), a
  :class:`~lockbroker.protocol.Grant`, or the
  :class:`~lockbroker.primitives.Lock` / ``BoundedSemaphore`` / ``RWLock``
  object holding it; the daemon applies the write only while this session
  still holds that hold, and otherwise raises
  :class:`~lockbroker.errors.GuardNotHeld`. The lock must have been taken
  through the same client as the write.
* **Times** (``ttl``) are seconds (``float`` or ``datetime.timedelta``),
  sent as whole milliseconds rounded up.
* **Watches** are iterators of :class:`Changed` and :class:`Lagged` events
  and context managers: ``with state.watch("cfg/", prefix=True) as w: for
  event in w: ...``. Events are queued per watch, without bound, by the
  client's reader thread, so a slow consumer never holds up other requests;
  :meth:`Watch.next_event` takes a timeout. Leaving the ``with`` block (or
  :meth:`Watch.close`) stops the watch; when the session ends, iteration
  raises :class:`~lockbroker.errors.ConnectionLost` once the events that
  arrived before are consumed.

This module is built on :mod:`lockbroker.client` (the session, and the queues
its reader thread fills for watches) and :mod:`lockbroker.primitives` (the
lock objects a guard may name); neither imports it. When imported it tells
the client module that ``client.state`` is a :class:`State`.
"""

from __future__ import annotations

import json
import math
import queue
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Tuple, Union

from .client import Client, _WatchEnd, _set_state_type, default_client
from .errors import ConnectionLost, ValueTooLarge, VersionConflict
from .primitives import _Primitive
from .protocol import (
    ChangeKind,
    ErrorCode,
    Grant,
    Limits,
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
    StateValue,
    StateWatch,
    StateWritten,
    Versioned,
    WatchLagged,
)

if TYPE_CHECKING:
    from .client import _WatchQueue

__all__ = [
    "State",
    "Watch",
    "Changed",
    "Lagged",
    "WatchEvent",
    "Versioned",
    "StateEntry",
    "ChangeKind",
    "Guard",
    "Value",
]

#: What a write stores: bytes as they are, ``str`` as UTF-8.
Value = Union[bytes, bytearray, memoryview, str]
#: What may guard a write: a hold id, a grant, or the lock object holding it.
Guard = Union[int, Grant, _Primitive]
#: A time to live: seconds, or a ``timedelta``.
TTL = Union[float, timedelta]

#: The daemon's value limit is at least this far below ``max_frame_len``
#: (PROTOCOL.md 10.1), so a longer value can never be stored.
_FRAME_MARGIN = 1024


@dataclass(frozen=True)
class Changed:
    """A watched key changed (``Event::StateChanged``, PROTOCOL.md 10.11).

    ``version`` is the change's own version; ``change`` is
    :attr:`ChangeKind.SET` (a set or an increment), ``REMOVED`` or
    ``EXPIRED``; ``value`` is the value written for a ``SET`` when the watch
    asked for values, else None.
    """

    key: str
    version: int
    change: ChangeKind
    value: Optional[bytes] = None


@dataclass(frozen=True)
class Lagged:
    """Changes the watch covers may have been missed (``Event::WatchLagged``).

    The watch goes on with later changes; read the state again
    (:meth:`State.get`, :meth:`State.list`) rather than trust a copy.
    """


#: What a :class:`Watch` yields.
WatchEvent = Union[Changed, Lagged]


def _to_bytes(value: Value) -> bytes:
    """A value as bytes: ``str`` is encoded as UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError("a state value must be bytes or str, not %s" % type(value).__name__)


def _ttl_ms(ttl: Optional[TTL]) -> Optional[int]:
    """Seconds (or a timedelta) to whole milliseconds, rounded up."""
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError("ttl must be a non-negative number of seconds, not %r" % (ttl,))
    if math.isinf(seconds):
        raise ValueError("ttl must be finite (None: the key does not expire)")
    # round() first drops float noise (0.29 * 1000 = 290.00000000000006).
    return int(math.ceil(round(seconds * 1000.0, 6)))


def _hold_id(guard: Any, holder: str = "thread") -> Optional[int]:
    """The ``hold_id`` a guard names (PROTOCOL.md 10.10): a hold id, a
    :class:`Grant`, or a lock object -- anything with a ``_guard_grant()``
    giving the grant it names (this package's primitives, and
    :mod:`lockbroker.aio`'s). ``holder``: whose grants a lock object keeps
    (``"thread"``, ``"task"``), for the error of one never acquired."""
    if guard is None:
        return None
    if isinstance(guard, bool):
        raise TypeError("guard must be a hold id, a Grant or a lock object, not a bool")
    if isinstance(guard, int):
        return guard
    if isinstance(guard, Grant):
        return guard.hold_id
    guard_grant = getattr(guard, "_guard_grant", None)
    if callable(guard_grant):
        grant = guard_grant()
        if grant is None:
            raise ValueError("%r cannot guard a write: it was never acquired (in this %s)" % (guard, holder))
        return grant.hold_id
    raise TypeError("guard must be a hold id, a Grant or a lock object, not %s" % type(guard).__name__)


class State:
    """The daemon's shared state, through one client's session.

    ``client``: the session to use; None uses
    :func:`~lockbroker.client.default_client` at each call (``client.state``
    is the same as ``State(client)``). Safe to share between threads; every
    method is one request (``list`` one per page), so concurrent calls from
    many threads go out on the one connection without waiting for each other.

    Errors from the daemon are :class:`~lockbroker.errors.BrokerError`
    subclasses carrying the daemon's ``code``: ``InvalidRequest``
    (``invalid_name``), ``NotAnInteger``, ``GuardNotHeld``,
    ``ValueTooLarge``, ``QuotaExceeded``, ``LimitExceeded``
    (``response_too_large``, ``too_many_pending``).
    """

    def __init__(self, client: Optional[Client] = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client the next request goes through."""
        return self._client if self._client is not None else default_client()

    def __repr__(self) -> str:
        return "<lockbroker.State %s>" % ("default client" if self._client is None else repr(self._client))

    # ------------------------------------------------------------ reading

    def get(self, key: str) -> Optional[Versioned]:
        """The value and version at ``key``, or None if it does not exist
        (or has expired). ``value`` is ``bytes``."""
        client = self.client
        response = client.call(StateGet(key))
        if isinstance(response, StateValue):
            return response.versioned
        raise client._unexpected(response)

    def get_json(self, key: str) -> Optional[Tuple[Any, int]]:
        """``(json.loads(value), version)`` for ``key``, or None if absent.

        Raises ``ValueError`` (``json.JSONDecodeError``) if the value is not
        JSON.
        """
        current = self.get(key)
        if current is None:
            return None
        return json.loads(current.value), current.version

    def list(self, prefix: str = "", *, values: bool = False, page_size: int = 0) -> List[StateEntry]:
        """Every key starting with ``prefix`` (empty: every key), in byte-wise
        key order, as :class:`StateEntry` (``key``, ``version``, ``value``:
        bytes if ``values`` is true, else None).

        Reads page after page (``page_size`` keys each; 0: the daemon's
        default, 1000). Each page is one moment; keys written while the list
        runs may or may not appear. With values, a page must fit in one
        frame (else ``LimitExceeded``, ``response_too_large``): use a small
        ``page_size`` for large values.
        """
        entries: List[StateEntry] = []
        start_after = ""
        while True:
            page, more = self.list_page(prefix, start_after, limit=page_size, values=values)
            entries.extend(page)
            if not more or not page:
                return entries
            start_after = page[-1].key

    def list_page(
        self, prefix: str = "", start_after: str = "", *, limit: int = 0, values: bool = False
    ) -> Tuple[List[StateEntry], bool]:
        """One page of :meth:`list`: the first ``limit`` keys (0: 1000) after
        ``start_after`` that start with ``prefix``, and whether more follow
        (then ask again with ``start_after`` = the last key returned)."""
        client = self.client
        response = client.call(StateList(prefix, start_after, limit, values))
        if isinstance(response, StateEntries):
            return response.entries, response.more
        raise client._unexpected(response)

    # ------------------------------------------------------------ writing

    def set(
        self,
        key: str,
        value: Value,
        *,
        if_version: Optional[int] = None,
        ttl: Optional[TTL] = None,
        guard: Optional[Guard] = None,
    ) -> int:
        """Store ``value`` at ``key``; returns the version of this write.

        ``if_version``: write only if the key is at this version (0: only if
        it does not exist), else raise :class:`VersionConflict` and change
        nothing. ``ttl``: the key expires this many seconds after the write
        (None: never; this also clears an earlier ttl). ``guard``: apply only
        while this session holds that lock (see the module's docs), else
        raise :class:`GuardNotHeld`. A value above the daemon's limit raises
        :class:`ValueTooLarge`.
        """
        client = self.client
        data = _to_bytes(value)
        _check_value_len(client.limits, data)
        response = client.call(StateSet(key, data, if_version, _ttl_ms(ttl), _hold_id(guard)))
        if isinstance(response, StateWritten):
            return response.version
        if isinstance(response, StateConflict) and if_version is not None:
            raise VersionConflict(key, if_version, response.current)
        raise client._unexpected(response)

    def set_json(
        self,
        key: str,
        obj: Any,
        *,
        if_version: Optional[int] = None,
        ttl: Optional[TTL] = None,
        guard: Optional[Guard] = None,
    ) -> int:
        """:meth:`set` of ``obj`` as compact JSON text; returns the version."""
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        return self.set(key, text, if_version=if_version, ttl=ttl, guard=guard)

    def compare_and_set(
        self,
        key: str,
        version: int,
        value: Value,
        *,
        ttl: Optional[TTL] = None,
        guard: Optional[Guard] = None,
    ) -> bool:
        """Store ``value`` only if ``key`` is at ``version`` (0: absent).

        True if written, False if another version was found (nothing
        changed). The boolean form of ``set(key, value, if_version=version)``.
        """
        try:
            self.set(key, value, if_version=version, ttl=ttl, guard=guard)
        except VersionConflict:
            return False
        return True

    def update(
        self,
        key: str,
        fn: Callable[[Optional[bytes]], Value],
        *,
        ttl: Optional[TTL] = None,
        guard: Optional[Guard] = None,
    ) -> Versioned:
        """Read-modify-write ``key`` atomically with respect to other writers.

        Calls ``fn(current value or None)`` and stores its result with
        ``if_version`` = the version read; on a conflict reads again and
        calls ``fn`` again, until a write succeeds. Returns what was stored
        and its version. ``fn`` may run several times: keep it free of side
        effects.
        """
        while True:
            current = self.get(key)
            data = _to_bytes(fn(None if current is None else current.value))
            try:
                version = self.set(
                    key, data, if_version=0 if current is None else current.version, ttl=ttl, guard=guard
                )
            except VersionConflict:
                continue
            return Versioned(data, version)

    def remove(
        self, key: str, *, if_version: Optional[int] = None, guard: Optional[Guard] = None
    ) -> Optional[Versioned]:
        """Remove ``key``; returns the value it had and that value's version,
        or None if it did not exist (not an error).

        ``if_version``: remove only if the key is at this version, else raise
        :class:`VersionConflict` (0 never removes anything: it only checks
        that the key is absent). ``guard`` as in :meth:`set`.
        """
        client = self.client
        response = client.call(StateRemove(key, if_version, _hold_id(guard)))
        if isinstance(response, StateRemoved):
            return response.removed
        if isinstance(response, StateConflict) and if_version is not None:
            raise VersionConflict(key, if_version, response.current)
        raise client._unexpected(response)

    def increment(self, key: str, delta: int = 1, *, guard: Optional[Guard] = None) -> int:
        """Add ``delta`` (negative to subtract) to the decimal integer at
        ``key``; returns the new value. An absent key counts as 0.

        Atomic: concurrent increments never lose an update. Raises
        :class:`NotAnInteger` (nothing changed) if the value is not a 64-bit
        decimal integer or the sum would overflow one; ``ValueError`` if
        ``delta`` does not fit in 64 bits. The key keeps its expiry time.
        """
        return self.increment_versioned(key, delta, guard=guard)[0]

    def increment_versioned(self, key: str, delta: int = 1, *, guard: Optional[Guard] = None) -> Tuple[int, int]:
        """:meth:`increment`, returning ``(new value, version of the write)``."""
        client = self.client
        response = client.call(StateIncrement(key, delta, _hold_id(guard)))
        if isinstance(response, StateCounter):
            return response.value, response.version
        raise client._unexpected(response)

    # ----------------------------------------------------------- watching

    def watch(self, key: str, *, prefix: bool = False, from_version: int = 0, values: bool = True) -> "Watch":
        """Watch ``key`` (or every key starting with it, if ``prefix``).

        Returns once the daemon has set the watch up; changes after that
        point are delivered. ``from_version`` N >= 1 first replays the
        changes with version >= N the daemon still retains (a
        :class:`Lagged` comes first if they do not reach back to N).
        ``values``: ``SET`` events carry the value written. Use as a context
        manager, or call :meth:`Watch.close`; a session may have at most
        ``client.limits.max_pending`` watches (``LimitExceeded``).

        To read and watch with no gap: open the watch first, then read; then
        apply only events whose version is above the one read for their key.
        """
        client = self.client
        watch_id, events = client.open_watch(StateWatch(key, prefix, from_version, values))
        return Watch(client, watch_id, events, key, prefix)


def _check_value_len(limits: Limits, data: bytes) -> None:
    """Refuse locally a value that could never fit in a session of these
    ``limits`` (PROTOCOL.md 10.1); :mod:`lockbroker.aio` checks with it too."""
    limit = limits.max_frame_len - _FRAME_MARGIN
    if len(data) > limit:
        raise ValueTooLarge(
            ErrorCode.VALUE_TOO_LARGE,
            "a value of %d bytes is above any value limit of this daemon (at most %d bytes; "
            "refused without asking it)" % (len(data), limit),
        )


class Watch:
    """The changes of a key or prefix, as an iterator; made by :meth:`State.watch`.

    * ``for event in watch:`` blocks for each :class:`Changed` or
      :class:`Lagged` event, in version order; it stops when the watch is
      closed (from any thread), and raises
      :class:`~lockbroker.errors.ConnectionLost` when the session has ended
      and every event that arrived before has been consumed.
    * :meth:`next_event` is the same with a timeout: None if none arrived.
    * ``with`` closes the watch on exit; :meth:`close` stops it at the
      daemon (``StateUnwatch``) and drops events not yet consumed.

    Events are queued for each watch without bound: consume them, or close
    the watch. A watch that is garbage-collected unclosed is stopped at its
    next event.
    """

    def __init__(self, client: Client, watch_id: int, events: "_WatchQueue", key: str, prefix: bool) -> None:
        self.client = client
        self.key = key
        self.prefix = prefix
        self._id = watch_id
        self._events = events
        self._closed = False
        self._finalizer = weakref.finalize(self, client._watch_finalized, watch_id)
        self._finalizer.atexit = False

    @property
    def id(self) -> int:
        """The watch id: the request id of its ``StateWatch``."""
        return self._id

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def next_event(self, timeout: Optional[float] = None) -> Optional[WatchEvent]:
        """The next event; None if ``timeout`` seconds passed without one
        (None: wait as long as it takes), or once the watch is closed.

        Raises :class:`~lockbroker.errors.ConnectionLost` when the session
        has ended and the events that arrived before it are consumed.
        """
        if self._closed:
            return None
        try:
            # On a socket the consumer itself may read the daemon's frames.
            item = self.client._watch_item(self._id, self._events, None if timeout is None else float(timeout))
        except queue.Empty:
            return None
        if isinstance(item, _WatchEnd):
            # Put it back, so every later call (any thread's) sees the end.
            self._events.put(item)
            if item.error is not None and not self._closed:
                raise item.error
            return None
        if self._closed:
            return None
        if isinstance(item, StateChanged):
            return Changed(item.key, item.version, item.change, item.value)
        assert isinstance(item, WatchLagged), item
        return Lagged()

    def __iter__(self) -> Iterator[WatchEvent]:
        return self

    def __next__(self) -> WatchEvent:
        event = self.next_event()
        if event is None:
            raise StopIteration
        return event

    def close(self) -> None:
        """Stop the watch and wait for the daemon to confirm; idempotent.

        Wakes a thread blocked on the watch (its iteration ends). Not an
        error if the session has already ended.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        try:
            self.client.close_watch(self._id)
        except ConnectionLost:
            pass

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        what = "prefix" if self.prefix else "key"
        state = "closed" if self._closed else "open"
        return "<lockbroker.Watch %d %s %r %s>" % (self._id, what, self.key, state)


# Client.state makes a State: the client module is below this one and never
# imports it, so this module tells it what to make.
_set_state_type(State)

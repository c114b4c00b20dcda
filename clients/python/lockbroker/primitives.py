"""``threading``-style locks served by the daemon.

:class:`Lock`, :class:`BoundedSemaphore` and :class:`RWLock` take the same
arguments and raise the same exceptions as their ``threading``
counterparts, so code switches by changing one line::

    lock = threading.Lock()            # before
    lock = lockbroker.Lock("deploy")   # after: one lock for every process

Differences that matter:

* each object names a lock in the daemon; every object of the same name,
  in any process, is the same lock;
* the lock belongs to the client *session* (one connection, shared by the
  threads of a process): like ``threading.Lock`` any thread of that client
  may release it, and like ``threading.Lock`` it is not re-entrant;
* each successful acquire records a :class:`~lockbroker.protocol.Grant`
  (``hold_id``, ``fence``, ``abandoned``); ``obj.grant``, ``obj.fence`` and
  ``obj.abandoned`` read the last grant *the calling thread* obtained
  through that object (None / False before any);
* when the session ends (daemon stopped, connection broken), the holds are
  gone; ``release()`` then raises :class:`~lockbroker.errors.ConnectionLost`;
* an object may be passed as the ``guard`` of a shared-state write
  (:class:`~lockbroker.state.State`): the write then names the hold the
  object has (for a :class:`Lock` its current hold, for an :class:`RWLock`
  its exclusive hold, else the calling thread's last grant), and the daemon
  applies it only while that hold is held.

With ``client=None`` an object uses :func:`~lockbroker.client.default_client`
at each acquire, and releases through the client it acquired with.

:class:`RLock` is re-entrant per thread, counted in the object over one
daemon mutex. Every primitive pickles (for ``multiprocessing`` with
``spawn``, say) as its name and settings, not its holds: the unpickled
object names the same lock, unheld, and takes it on the unpickling
process's own connection -- the default client, or, for an object made
with an explicit client, one shared client per daemon address in that
process (the address only: ``allow_uids`` and the like are not carried).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from contextlib import contextmanager
from typing import Any, Deque, Dict, Iterator, Optional, Tuple

from .client import Client, default_client
from .errors import LockTimeout, NotHeld
from .protocol import ErrorCode, Grant, LockKind

__all__ = ["Lock", "RLock", "BoundedSemaphore", "RWLock"]

# The clients of unpickled objects whose original had an explicit client:
# one per daemon address in this process (a fork child makes its own, as
# a client of the parent is not usable there).
_by_address_lock = threading.Lock()
_by_address: Dict[str, Client] = {}


def _client_at(path: str) -> Client:
    with _by_address_lock:
        client = _by_address.get(path)
        if client is None or not client.usable:
            client = Client(path)
            _by_address[path] = client
        return client


def _rebuild(
    cls: Any, name: str, args: Tuple[Any, ...], path: Optional[str], keywords: Optional[Dict[str, Any]] = None
) -> Any:
    """Unpickles a primitive: the same name and settings, no holds."""
    obj = cls(name, *args, **(keywords or {}))
    obj._path = path
    return obj


def _seconds_to_ms(timeout: float) -> int:
    """Seconds to whole milliseconds, rounded up so a tiny timeout is no try."""
    seconds = float(timeout)
    if math.isnan(seconds):
        raise ValueError("Invalid value NaN (not a number)")
    if seconds > threading.TIMEOUT_MAX:
        raise OverflowError("timeout value is too large")
    # round() first drops float noise (0.29 * 1000 = 290.00000000000006).
    return int(math.ceil(round(seconds * 1000.0, 6)))


def _lock_timeout_ms(blocking: bool, timeout: float) -> Optional[int]:
    """``threading.Lock.acquire`` arguments to ``timeout_ms`` (None: forever)."""
    if not blocking:
        if timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        return 0
    if timeout == -1:
        return None
    if timeout < 0:
        raise ValueError("timeout value must be a non-negative number")
    return _seconds_to_ms(timeout)


def _semaphore_timeout_ms(blocking: bool, timeout: Optional[float]) -> Optional[int]:
    """``threading.Semaphore.acquire`` arguments to ``timeout_ms``."""
    if not blocking:
        if timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        return 0
    if timeout is None:
        return None
    if timeout <= 0:
        return 0  # threading.Semaphore treats a timeout <= 0 as a try
    return _seconds_to_ms(timeout)


class _Primitive:
    """What every primitive shares: name, client choice, per-thread grant."""

    def __init__(self, name: str, client: Optional[Client]) -> None:
        if not isinstance(name, str):
            raise TypeError("name must be a str, not %s" % type(name).__name__)
        self.name = name
        self._client = client
        # The daemon address of an unpickled object's original client.
        self._path: Optional[str] = None
        # Guards this object's record of its holds; never held during I/O.
        self._state = threading.Lock()
        self._local = threading.local()

    @property
    def client(self) -> Client:
        """The client the next acquire goes through."""
        if self._client is not None:
            return self._client
        if self._path is not None:
            return _client_at(self._path)
        return default_client()

    def _settings(self) -> Tuple[Any, ...]:
        """The constructor's arguments after the name, for pickling."""
        return ()

    def _keywords(self) -> Dict[str, Any]:
        """The constructor's keyword arguments, for pickling."""
        return {}

    def __reduce__(self) -> Any:
        path = self._client.path if self._client is not None else self._path
        return (_rebuild, (type(self), self.name, self._settings(), path, self._keywords()))

    def _forget_holds(self) -> None:
        """Drops what this object holds (subclasses: their holds)."""

    def _at_fork_reinit(self) -> None:
        """Leaves the object unheld, as ``threading``'s locks are after a
        fork: in a fork child the parent's holds belong to the parent's
        session, and are forgotten; in the process that took them (a
        reset) they are released."""
        self._state = threading.Lock()
        self._local = threading.local()
        self._forget_holds()

    @property
    def grant(self) -> Optional[Grant]:
        """The last grant the calling thread obtained through this object."""
        grant: Optional[Grant] = getattr(self._local, "grant", None)
        return grant

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

    def _acquire(
        self,
        kind: LockKind,
        timeout_ms: Optional[int],
        capacity: int = 0,
        permits: int = 1,
        notify_contended: bool = False,
        lease_ms: Optional[int] = None,
    ) -> Optional[Tuple[Client, Grant]]:
        client = self.client
        if notify_contended or lease_ms is not None:
            grant = client.acquire(
                self.name,
                kind,
                capacity=capacity,
                permits=permits,
                timeout_ms=timeout_ms,
                notify_contended=notify_contended,
                lease_ms=lease_ms,
            )
        else:
            grant = client.acquire(self.name, kind, capacity=capacity, permits=permits, timeout_ms=timeout_ms)
        if grant is None:
            return None
        self._local.grant = grant
        return client, grant

    def _guard_grant(self) -> Optional[Grant]:
        """The grant a state write guarded by this object names (PROTOCOL.md
        10.10): the calling thread's last grant; subclasses prefer a hold the
        object still has. A released grant is still returned: the daemon
        then refuses the write (``guard_not_held``), as it should."""
        return self.grant

    def _inspect_held(self) -> bool:
        """Ask the daemon whether anyone holds this name."""
        # The exact name sorts first among the names it prefixes, so one
        # entry is enough.
        inspection = self.client.inspect(self.name, limit=1)
        entries = inspection.entries
        return bool(entries) and entries[0].name == self.name and bool(entries[0].holders)

    def __repr__(self) -> str:
        return "<lockbroker.%s %r>" % (type(self).__name__, self.name)


class Lock(_Primitive):
    """A named mutex that behaves like ``threading.Lock``.

    ``acquire(blocking=True, timeout=-1)`` returns True once held, False if
    a try (``blocking=False``) or the timeout failed; the daemon enforces the
    timeout and serves waiters in FIFO order. ``release()`` may be called by
    any thread of the same client; releasing an unheld lock raises
    ``RuntimeError``. ``with lock:`` acquires and releases.

    A mutex and the exclusive side of an :class:`RWLock` of the same name
    exclude each other (PROTOCOL.md 8.2).

    With ``notify_contended=True`` each hold is told when someone starts
    waiting for the lock (PROTOCOL.md 9.6): :attr:`contended` becomes True
    and :meth:`wait_contended` returns, so a long holder can finish early
    or yield. With ``lease`` (seconds) each hold lasts at most that long:
    then the daemon revokes it (:attr:`revoked`), and the next holder is
    told it was abandoned (PROTOCOL.md 8.12).
    """

    def __init__(
        self,
        name: str,
        client: Optional[Client] = None,
        *,
        notify_contended: bool = False,
        lease: Optional[float] = None,
    ) -> None:
        super().__init__(name, client)
        self._hold: Optional[Tuple[Client, Grant]] = None
        self._notify_contended = bool(notify_contended)
        if lease is not None and not lease > 0:
            raise ValueError("a lease must be positive, not %r" % (lease,))
        self._lease = lease
        self._lease_ms = None if lease is None else _seconds_to_ms(lease)

    def _keywords(self) -> Dict[str, Any]:
        keywords: Dict[str, Any] = {}
        if self._notify_contended:
            keywords["notify_contended"] = True
        if self._lease is not None:
            keywords["lease"] = self._lease
        return keywords

    @property
    def revoked(self) -> bool:
        """Whether this object's hold was revoked: its lease ran out (the
        lock is no longer held; :meth:`release` raises)."""
        with self._state:
            hold = self._hold
        return hold is not None and hold[0].revoked(hold[1].hold_id)

    def _forget_holds(self) -> None:
        hold, self._hold = self._hold, None
        _release_if_ours(hold)

    @property
    def contended(self) -> bool:
        """Whether someone waits behind this object's hold (it was made
        with ``notify_contended``); False while unheld."""
        with self._state:
            hold = self._hold
        return hold is not None and hold[0].contended(hold[1].hold_id)

    def wait_contended(self, timeout: Optional[float] = None) -> bool:
        """Wait at most ``timeout`` seconds (None: for ever) until someone
        waits behind this object's hold; whether someone does. False at once
        while unheld."""
        with self._state:
            hold = self._hold
        return hold is not None and hold[0].wait_contended(hold[1].hold_id, timeout)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock; see ``threading.Lock.acquire``."""
        timeout_ms = _lock_timeout_ms(blocking, timeout)
        hold = self._acquire(
            LockKind.MUTEX, timeout_ms, notify_contended=self._notify_contended, lease_ms=self._lease_ms
        )
        if hold is None:
            return False
        with self._state:
            self._hold = hold
        return True

    def release(self) -> None:
        """Release the lock (any thread of the holding client may)."""
        with self._state:
            hold, self._hold = self._hold, None
        if hold is None:
            raise RuntimeError("release unlocked lock")
        client, grant = hold
        try:
            client.release(grant.hold_id)
        except NotHeld as e:
            raise RuntimeError("release unlocked lock: %s" % e) from e

    def _guard_grant(self) -> Optional[Grant]:
        with self._state:
            hold = self._hold
        return hold[1] if hold is not None else self.grant

    def locked(self) -> bool:
        """True if this object holds the lock, or the daemon says anyone does."""
        with self._state:
            hold = self._hold
        if hold is not None and hold[0].usable:
            return True
        return self._inspect_held()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        # threading's shape: <locked _thread.lock object at 0x...>.
        state = "locked" if self._hold is not None else "unlocked"
        return "<%s lockbroker.Lock object %r at %#x>" % (state, self.name, id(self))


def _release_if_ours(hold: Optional[Tuple[Client, Grant]]) -> None:
    """Releases ``hold`` if its client belongs to this process."""
    if hold is None or not hold[0].usable:
        return
    try:
        hold[0].release(hold[1].hold_id)
    except NotHeld:
        pass


class RLock(_Primitive):
    """A named re-entrant lock that behaves like ``threading.RLock``.

    The thread that holds it may acquire it again; it is released when that
    thread has released it as many times. The count is kept in this object
    (the daemon sees one mutex hold of the name), so it is re-entrant for
    the thread that holds it through *this object*: another thread, or
    another object of the same name, waits for it like any other holder.
    Releasing it from a thread that does not own it raises
    ``RuntimeError``. It works with ``threading.Condition``.
    """

    def __init__(self, name: str, client: Optional[Client] = None) -> None:
        super().__init__(name, client)
        self._hold: Optional[Tuple[Client, Grant]] = None
        self._owner: Optional[int] = None
        self._count = 0

    def _forget_holds(self) -> None:
        hold, self._hold, self._owner, self._count = self._hold, None, None, 0
        _release_if_ours(hold)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock, or count once more if this thread holds it;
        see ``threading.RLock.acquire``."""
        timeout_ms = _lock_timeout_ms(blocking, timeout)
        me = threading.get_ident()
        with self._state:
            if self._owner == me:
                self._count += 1
                return True
        hold = self._acquire(LockKind.MUTEX, timeout_ms)
        if hold is None:
            return False
        with self._state:
            self._hold, self._owner, self._count = hold, me, 1
        return True

    __enter__ = acquire

    def release(self) -> None:
        """Count one release; the last one releases the lock."""
        with self._state:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release un-acquired lock")
            self._count -= 1
            if self._count:
                return
            hold, self._hold, self._owner = self._hold, None, None
        assert hold is not None
        try:
            hold[0].release(hold[1].hold_id)
        except NotHeld as e:
            raise RuntimeError("release unlocked lock: %s" % e) from e

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def locked(self) -> bool:
        """True if any thread holds it through this object, or the daemon
        says anyone holds the name."""
        with self._state:
            if self._owner is not None:
                return True
        return self._inspect_held()

    def _is_owned(self) -> bool:
        with self._state:
            return self._owner == threading.get_ident()

    def _recursion_count(self) -> int:
        with self._state:
            return self._count if self._owner == threading.get_ident() else 0

    def _release_save(self) -> Tuple[int, int]:
        # threading.Condition.wait: release fully, remember the count.
        with self._state:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release un-acquired lock")
            count, owner = self._count, self._owner
            self._count = 1
        self.release()
        return count, owner

    def _acquire_restore(self, saved: Tuple[int, int]) -> None:
        self.acquire()
        with self._state:
            self._count, self._owner = saved

    def _guard_grant(self) -> Optional[Grant]:
        with self._state:
            hold = self._hold
        return hold[1] if hold is not None else self.grant

    def __repr__(self) -> str:
        with self._state:
            owner, count = self._owner, self._count
        state = "locked" if owner is not None else "unlocked"
        return "<%s lockbroker.RLock object %r owner=%d count=%d at %#x>" % (
            state,
            self.name,
            owner or 0,
            count,
            id(self),
        )


class BoundedSemaphore(_Primitive):
    """A named counting semaphore of ``value`` permits, like
    ``threading.BoundedSemaphore``.

    ``acquire(blocking=True, timeout=None, *, n=1)`` takes ``n`` permits at
    once (``n`` is an extension; ``threading`` takes one). ``release(n=1)``
    gives back ``n`` permits; releasing more than the client holds on this
    name raises ``ValueError("Semaphore released too many times")``.

    Permits are counted per client session and name (the daemon releases
    the oldest holds first), so any object of this name on the same client
    may release them. Every user of a name must agree on ``value``: while
    the name is in use, another capacity is refused (``InvalidRequest``,
    ``capacity_mismatch``).
    """

    def __init__(self, name: str, value: int = 1, client: Optional[Client] = None) -> None:
        if value < 1:
            raise ValueError("semaphore initial value must be >= 1")
        super().__init__(name, client)
        self.value = value
        self._acquired_with: Optional[Client] = None
        # Permits taken through this object and not given back.
        self._held = 0

    def _settings(self) -> Tuple[Any, ...]:
        return (self.value,)

    def _forget_holds(self) -> None:
        client, self._acquired_with, held, self._held = self._acquired_with, None, self._held, 0
        if client is not None and client.usable and held:
            try:
                client.release_by_name(self.name, held)
            except NotHeld:
                pass

    def acquire(self, blocking: bool = True, timeout: Optional[float] = None, *, n: int = 1) -> bool:
        """Take ``n`` permits; see ``threading.Semaphore.acquire``."""
        timeout_ms = _semaphore_timeout_ms(blocking, timeout)
        if n < 1:
            raise ValueError("n must be one or more")
        if n > self.value:
            raise ValueError("cannot take %d permits of a semaphore of %d" % (n, self.value))
        hold = self._acquire(LockKind.SEMAPHORE, timeout_ms, capacity=self.value, permits=n)
        if hold is None:
            return False
        with self._state:
            self._acquired_with = hold[0]
            self._held += n
        return True

    def release(self, n: int = 1) -> None:
        """Give back ``n`` permits (oldest holds first)."""
        if n < 1:
            raise ValueError("n must be one or more")
        with self._state:
            client = self._acquired_with
        if client is None:
            client = self.client
        try:
            client.release_by_name(self.name, n)
        except NotHeld as e:
            if e.code == ErrorCode.NOT_HELD:
                raise ValueError("Semaphore released too many times") from e
            raise
        with self._state:
            self._held = max(self._held - n, 0)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        # threading's shape: <threading.BoundedSemaphore at 0x...: value=2/3>,
        # the free permits as far as this object knows (its own taken).
        with self._state:
            free = self.value - self._held
        return "<lockbroker.BoundedSemaphore at %#x %r: value=%d/%d>" % (
            id(self),
            self.name,
            free,
            self.value,
        )


class RWLock(_Primitive):
    """A named read-write lock: many shared holders or one exclusive holder.

    ``with rw.shared():`` / ``with rw.exclusive():`` hold one side for a
    block and yield the :class:`Grant`; with ``timeout`` (seconds) they
    raise :class:`LockTimeout` if not granted in time. The methods
    ``acquire_shared`` / ``acquire_exclusive`` take ``threading.Lock``-style
    ``(blocking=True, timeout=-1)`` and return a bool; ``release_shared``
    releases the oldest shared hold of this object, ``release_exclusive``
    the exclusive one. An exclusive request at the head of the queue blocks
    later shared ones, so writers are not starved.
    """

    def __init__(self, name: str, client: Optional[Client] = None) -> None:
        super().__init__(name, client)
        self._shared: Deque[Tuple[Client, Grant]] = deque()
        self._exclusive: Optional[Tuple[Client, Grant]] = None

    def _forget_holds(self) -> None:
        holds = list(self._shared) + ([self._exclusive] if self._exclusive else [])
        self._shared, self._exclusive = deque(), None
        for hold in holds:
            _release_if_ours(hold)

    def acquire_shared(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the shared (read) side; see ``threading.Lock.acquire``."""
        hold = self._acquire(LockKind.RW_SHARED, _lock_timeout_ms(blocking, timeout))
        if hold is None:
            return False
        with self._state:
            self._shared.append(hold)
        return True

    def release_shared(self) -> None:
        """Release this object's oldest shared hold."""
        with self._state:
            hold = self._shared.popleft() if self._shared else None
        if hold is None:
            raise RuntimeError("release unlocked lock")
        self._release(hold)

    def acquire_exclusive(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the exclusive (write) side; see ``threading.Lock.acquire``."""
        hold = self._acquire(LockKind.RW_EXCLUSIVE, _lock_timeout_ms(blocking, timeout))
        if hold is None:
            return False
        with self._state:
            self._exclusive = hold
        return True

    def release_exclusive(self) -> None:
        """Release the exclusive hold."""
        with self._state:
            hold, self._exclusive = self._exclusive, None
        if hold is None:
            raise RuntimeError("release unlocked lock")
        self._release(hold)

    @contextmanager
    def shared(self, timeout: Optional[float] = None) -> Iterator[Grant]:
        """Hold the shared side for a ``with`` block; yields the grant."""
        if not self.acquire_shared(timeout=-1 if timeout is None else timeout):
            raise LockTimeout("shared side of %r not granted within %s s" % (self.name, timeout))
        grant = self._local.grant
        try:
            yield grant
        finally:
            # Release exactly this block's hold, whichever is oldest.
            with self._state:
                mine = next((h for h in self._shared if h[1].hold_id == grant.hold_id), None)
                if mine is not None:
                    self._shared.remove(mine)
            if mine is None:
                raise RuntimeError("release unlocked lock")
            self._release(mine)

    @contextmanager
    def exclusive(self, timeout: Optional[float] = None) -> Iterator[Grant]:
        """Hold the exclusive side for a ``with`` block; yields the grant."""
        if not self.acquire_exclusive(timeout=-1 if timeout is None else timeout):
            raise LockTimeout("exclusive side of %r not granted within %s s" % (self.name, timeout))
        grant = self._local.grant
        try:
            yield grant
        finally:
            self.release_exclusive()

    def _guard_grant(self) -> Optional[Grant]:
        with self._state:
            exclusive = self._exclusive
        return exclusive[1] if exclusive is not None else self.grant

    def _release(self, hold: Tuple[Client, Grant]) -> None:
        client, grant = hold
        try:
            client.release(grant.hold_id)
        except NotHeld as e:
            raise RuntimeError("release unlocked lock: %s" % e) from e

    def __repr__(self) -> str:
        with self._state:
            shared, exclusive = len(self._shared), self._exclusive is not None
        return "<lockbroker.RWLock %r shared=%d exclusive=%s>" % (self.name, shared, exclusive)

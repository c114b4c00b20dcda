"""Exceptions raised by the lockbroker client.

Hierarchy::

    LockbrokerError
    ├── ConnectFailed (also ConnectionError)   no session could be opened
    │   └── Untrusted                          ... another user could pose as the daemon
    ├── ConnectionLost (also ConnectionError)  the session ended
    │   └── ClientClosed                       ... because close() was called
    ├── LockTimeout (also TimeoutError)        a context manager gave up
    ├── NoAnswer (also TimeoutError)           the daemon did not answer in time
    ├── VersionConflict                        a state write's if_version did not match
    └── BrokerError                            the daemon answered Error(code)
        ├── InvalidRequest (also ValueError)   codes 2xx
        │   ├── NotAnInteger                   208 not_an_integer
        │   ├── Deadlock                       209 deadlock
        │   ├── Unsupported                    210 unsupported
        │   └── Forbidden                      211 forbidden
        ├── NotHeld                            codes 3xx
        │   └── GuardNotHeld                   303 guard_not_held
        ├── LimitExceeded                      codes 4xx
        │   ├── ValueTooLarge                  403 value_too_large
        │   └── QuotaExceeded                  404 quota_exceeded
        └── DaemonShuttingDown (also ConnectionLost)  code 500

The ``threading``-compatible objects of :mod:`lockbroker.primitives` raise
``ValueError`` and ``RuntimeError`` where ``threading`` does; these classes
are for what ``threading`` cannot fail with.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type, Union

from .protocol import ErrorCode, ErrorInfo, error_code_name

__all__ = [
    "LockbrokerError",
    "ConnectFailed",
    "Untrusted",
    "ConnectionLost",
    "ClientClosed",
    "LockTimeout",
    "NoAnswer",
    "VersionConflict",
    "BrokerError",
    "InvalidRequest",
    "NotAnInteger",
    "Deadlock",
    "Unsupported",
    "Forbidden",
    "NotHeld",
    "GuardNotHeld",
    "LimitExceeded",
    "ValueTooLarge",
    "QuotaExceeded",
    "DaemonShuttingDown",
    "broker_error",
]


class LockbrokerError(Exception):
    """Base class of every exception this package raises on purpose."""


class ConnectFailed(LockbrokerError, ConnectionError):
    """The daemon could not be reached, or refused the handshake.

    ``path`` is the socket tried; ``fatal`` the daemon's ``Fatal`` if it
    sent one.
    """

    def __init__(self, message: str, path: str = "", fatal: Optional[ErrorInfo] = None) -> None:
        super().__init__(message)
        self.path = path
        self.fatal = fatal

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Untrusted(ConnectFailed):
    """The socket's directory, or the daemon behind the socket or pipe,
    belongs to a user this client does not trust (PROTOCOL.md section 1).
    Nothing was sent.

    ``path`` is the directory, socket or pipe checked; ``problem`` one of
    ``"symbolic_link"``, ``"not_a_directory"``, ``"owner"``, ``"mode"``
    (the directory is open to other users) or ``"server"`` (the daemon runs
    as another user); ``owner`` the user owning the directory or running
    the daemon; ``expected`` the users that were acceptable. On Unix users
    are user ids (``int``); for a Windows named pipe (always ``"server"``)
    they are SIDs in string form (``"S-1-5-21-..."``): ``owner`` is the
    user of the pipe server's process token.
    """

    def __init__(
        self,
        message: str,
        path: str,
        problem: str,
        owner: Union[int, str],
        expected: Tuple[Union[int, str], ...],
    ) -> None:
        super().__init__(message, path)
        self.problem = problem
        self.owner = owner
        self.expected = expected


class ConnectionLost(LockbrokerError, ConnectionError):
    """The session ended: every request without an answer failed, and every
    hold of the session is gone (PROTOCOL.md 6.3).

    ``fatal`` is the daemon's ``Fatal`` if it sent one before closing.
    """

    def __init__(self, message: str, fatal: Optional[ErrorInfo] = None) -> None:
        super().__init__(message)
        self.fatal = fatal

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ClientClosed(ConnectionLost):
    """The client was closed by its owner (``Client.close()``)."""


class LockTimeout(LockbrokerError, TimeoutError):
    """A context manager given a timeout could not acquire in time."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NoAnswer(LockbrokerError, TimeoutError):
    """The daemon did not answer a request within ``Client.request_timeout``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class VersionConflict(LockbrokerError):
    """A conditional state write (``if_version``) found the key at another
    version; nothing changed (``Response::StateConflict``, PROTOCOL.md 10.6).

    ``key`` is the key, ``expected`` the version the write required (0: the
    key must not exist), ``current`` the key's version (0: it does not exist).
    Not a :class:`BrokerError`: another writer came first, which is a normal
    outcome; read again and retry.
    """

    def __init__(self, key: str, expected: int, current: int) -> None:
        super().__init__(
            "state key %r is at version %d, not %d%s"
            % (key, current, expected, " (must not exist)" if expected == 0 else "")
        )
        self.key = key
        self.expected = expected
        self.current = current

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BrokerError(LockbrokerError):
    """The daemon answered a request with ``Error(code)``; it had no effect.

    ``code`` is the numeric code (possibly one this client does not know),
    ``code_name`` its name in PROTOCOL.md section 5, ``message`` the
    daemon's text (for people; never parse it).
    """

    def __init__(self, code: int, message: str) -> None:
        LockbrokerError.__init__(self, "%s (%d): %s" % (error_code_name(code), code, message))
        self.code = code
        self.code_name = error_code_name(code)
        self.message = message

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidRequest(BrokerError, ValueError):
    """Codes 2xx: the request was invalid (bad name, permits, capacity...)."""


class NotAnInteger(InvalidRequest):
    """Code 208: an increment found a value that is not a 64-bit decimal
    integer, or the sum would overflow one; nothing changed."""


class Unsupported(InvalidRequest):
    """Code 210: the daemon cannot do what the request asks -- a
    contention event (``notify_contended``), a lease or its extension, or
    a break, from a daemon with the etcd backend, or of before protocol
    version 4 (raised by the client then, with nothing sent); nothing was
    queued, held or broken."""


class Forbidden(InvalidRequest):
    """Code 211: the caller may not do this to what it names -- a
    :meth:`~lockbroker.Client.break_lock` of another user's hold, by a
    caller neither root nor in the daemon's admin group; nothing changed."""


class Deadlock(InvalidRequest):
    """Code 209: an acquire made with deadlock detection on
    (``detect_deadlocks=True``, protocol version 3 or later) would
    have to wait, and that wait could never be granted -- every holder it
    needs waits, directly or through others, for the caller itself (its
    thread, task or fixed actor) or for a ``lockbroker lock`` it runs
    under, or the caller waits behind its own hold or its wrapper's.
    Nothing was queued, and no hold or other wait was touched; ``message``
    names the locks and sessions of a cycle (PROTOCOL.md 8.11). Release
    something, and try again, or take the locks in one order."""


class NotHeld(BrokerError):
    """Codes 3xx: the request named a hold, wait or watch the session lacks."""


class GuardNotHeld(NotHeld):
    """Code 303: a guarded state write named a hold this session does not
    have (released, never granted, or another session's); nothing changed."""


class LimitExceeded(BrokerError):
    """Codes 4xx: a limit of the session or daemon was reached."""


class ValueTooLarge(LimitExceeded):
    """Code 403: a state value is longer than the daemon's value limit
    (default 1 MiB). Raised without asking the daemon for a value that could
    never fit in a frame."""


class QuotaExceeded(LimitExceeded):
    """Code 404: a state write would exceed a quota (keys or bytes, per user
    or in total); nothing changed."""


class DaemonShuttingDown(BrokerError, ConnectionLost):
    """Code 500: the daemon is stopping; the session is about to end."""

    def __init__(self, code: int, message: str) -> None:
        BrokerError.__init__(self, code, message)
        self.fatal = None


def broker_error(info: ErrorInfo) -> BrokerError:
    """The exception for a ``Response::Error``: a class of its own for some
    codes, else chosen by the code's hundred (PROTOCOL.md section 5 says to
    treat unknown codes that way)."""
    code = info.code
    if code == ErrorCode.SHUTTING_DOWN:
        return DaemonShuttingDown(code, info.message)
    cls = _BY_CODE.get(code) or _BY_HUNDRED.get(code // 100, BrokerError)
    return cls(code, info.message)


_BY_CODE: Dict[int, Type[BrokerError]] = {
    ErrorCode.NOT_AN_INTEGER: NotAnInteger,
    ErrorCode.DEADLOCK: Deadlock,
    ErrorCode.UNSUPPORTED: Unsupported,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.GUARD_NOT_HELD: GuardNotHeld,
    ErrorCode.VALUE_TOO_LARGE: ValueTooLarge,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceeded,
}
_BY_HUNDRED: Dict[int, Type[BrokerError]] = {2: InvalidRequest, 3: NotHeld, 4: LimitExceeded}

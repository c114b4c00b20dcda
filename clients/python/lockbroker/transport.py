"""How the client reaches the daemon: a Unix socket (POSIX) or a named pipe
(Windows), checked before anything is sent.

:func:`connect` resolves nothing (the :class:`~lockbroker.address.Address`
is given); it checks who may serve the address, connects within the
timeout, checks who does, and returns a :class:`Connection`: the few
operations :mod:`lockbroker.client` uses, the same on both platforms --
``sendall`` (the writers, one whole frame at a time), ``recv`` (the reader
thread; ``b""`` at the end of the stream), ``settimeout`` (the handshake),
``shutdown`` (ends the connection both ways and wakes a blocked ``recv``)
and ``close``.

* POSIX: an ``AF_UNIX`` stream socket (:class:`SocketConnection`); the
  scope directory is checked before connecting and the peer credentials
  (``SO_PEERCRED``) after (:func:`lockbroker._common.expected_unix_server`,
  :func:`lockbroker.address.check_server`), as :mod:`lockbroker.aio` does.
* Windows: the pipe's client end (:class:`lockbroker.pipe.PipeConnection`);
  the pipe server's process token is checked after connecting
  (:func:`lockbroker.address.expected_pipe_server`,
  :func:`~lockbroker.address.check_pipe_server`).

Both refuse with :class:`~lockbroker.errors.Untrusted`, and fail otherwise
with :class:`~lockbroker.errors.ConnectFailed`.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable, Optional, Protocol

from . import _common
from . import address as _address
from . import pipe as _pipe
from .errors import ConnectFailed

__all__ = ["Connection", "SocketConnection", "connect"]


class Connection(Protocol):
    """A connection to the daemon, as :class:`lockbroker.client.Client` uses it."""

    def sendall(self, data: bytes) -> None:
        """Write all of ``data``; ``OSError`` if the connection is gone."""

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` at the end of the stream."""

    def settimeout(self, timeout: Optional[float]) -> None:
        """Bound each later ``sendall`` / ``recv`` (None: no bound)."""

    def shutdown(self) -> None:
        """End the connection both ways, waking a blocked ``recv``; never
        raises ``OSError``."""

    def close(self) -> None:
        """Release the descriptor or handle."""


class SocketConnection:
    """A connected ``AF_UNIX`` stream socket as a :class:`Connection`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def settimeout(self, timeout: Optional[float]) -> None:
        self.sock.settimeout(timeout)

    def shutdown(self) -> None:
        try:
            # Shutdown (not just close) wakes a reader blocked in recv.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def connect(
    address: _address.Address,
    timeout: Optional[float],
    allow_uids: Iterable[int] = (),
    allow_sids: Iterable[str] = (),
    platform: Optional[str] = None,
) -> Connection:
    """Connect to the daemon at ``address`` and check who serves it.

    ``allow_uids`` (POSIX) and ``allow_sids`` (Windows) add users trusted
    besides the defaults. The connection returned still has ``timeout`` set
    for the handshake. ``platform``: ``os.name``'s value to act for (tests).
    """
    if (os.name if platform is None else platform) == _address.WINDOWS:
        return _connect_pipe(address, timeout, allow_sids)
    return _connect_unix(address, timeout, allow_uids)


def _connect_unix(address: _address.Address, timeout: Optional[float], allow_uids: Iterable[int]) -> Connection:
    path = address.path
    expected = _common.expected_unix_server(address, allow_uids)
    if not hasattr(socket, "AF_UNIX"):
        raise ConnectFailed("this platform has no Unix sockets (cannot reach %s)" % path, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise _common.connect_failed(address, e) from e
        # Before the Hello, which names this program.
        _address.check_server(sock, path, expected)
    except BaseException:
        sock.close()
        raise
    return SocketConnection(sock)


def _connect_pipe(address: _address.Address, timeout: Optional[float], allow_sids: Iterable[str]) -> Connection:
    path = address.path
    try:
        me = _pipe.current_identity()
    except OSError as e:
        raise ConnectFailed("cannot check who serves %s: reading this process's user: %s" % (path, e), path) from e
    expected = _address.expected_pipe_server(address, me.sid, allow_sids)
    try:
        handle = _pipe.open_pipe(path, timeout)
    except OSError as e:
        raise _common.connect_failed(address, e) from e
    connection = _pipe.PipeConnection(handle)
    try:
        # Before the Hello, which names this program.
        try:
            pid = _pipe.server_process_id(handle)
        except OSError as e:
            raise ConnectFailed("cannot check who serves %s: %s" % (path, e), path) from e
        try:
            server = _pipe.identity_of(pid)
        except OSError as e:
            raise ConnectFailed(
                "cannot check who serves %s: reading the user of the pipe's server, process %d: %s" % (path, pid, e),
                path,
            ) from e
        _address.check_pipe_server(path, server, expected)
        connection.settimeout(timeout)
    except BaseException:
        connection.close()
        raise
    return connection

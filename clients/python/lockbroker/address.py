"""Where the daemon listens (PROTOCOL.md section 1).

The first that applies wins: an explicit path, then ``LOCKBROKER_SOCKET``
(if set and not empty), then the default of the scope:

* ``local`` (default): ``$XDG_RUNTIME_DIR/lockbroker/broker.sock`` if
  ``XDG_RUNTIME_DIR`` is set and not empty, else
  ``/tmp/lockbroker-$UID/broker.sock``;
* ``global``: ``/run/lockbroker/broker.sock``.

Only Unix sockets are supported by this client (no Windows named pipes).

Whom to trust there (PROTOCOL.md section 1), the rules of the Rust client
and the daemon: :func:`expected_server` checks the directory of a scope's
default socket before connecting and says which users may run the daemon;
:func:`check_server` compares that with the connected socket's peer
credentials. Otherwise another user who creates ``/tmp/lockbroker-$UID``
first could answer this user's locks.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Tuple

from .errors import ConnectFailed, Untrusted

__all__ = [
    "LOCAL",
    "GLOBAL",
    "ENV_VAR",
    "Address",
    "resolve",
    "default_path",
    "dir_mode",
    "check_dir",
    "expected_server",
    "check_server",
]

#: The scope of one user's login session (the default).
LOCAL = "local"
#: The scope shared by every user of the machine.
GLOBAL = "global"
#: The environment variable that overrides the scope default.
ENV_VAR = "LOCKBROKER_SOCKET"


@dataclass(frozen=True)
class Address:
    """A resolved socket path and how it was found.

    ``source`` is ``"explicit"``, ``"env"`` or ``"scope"``; ``scope`` is
    the scope asked for.
    """

    path: str
    source: str
    scope: str


def default_path(scope: str = LOCAL, env: Optional[Mapping[str, str]] = None) -> str:
    """The default socket path of ``scope`` (``"local"`` or ``"global"``)."""
    environ = os.environ if env is None else env
    if scope == LOCAL:
        runtime = environ.get("XDG_RUNTIME_DIR", "")
        if runtime:
            return os.path.join(runtime, "lockbroker", "broker.sock")
        return "/tmp/lockbroker-%d/broker.sock" % os.getuid()
    if scope == GLOBAL:
        return "/run/lockbroker/broker.sock"
    raise ValueError("unknown scope %r (expected 'local' or 'global')" % (scope,))


def resolve(
    path: Optional[str] = None, scope: str = LOCAL, env: Optional[Mapping[str, str]] = None
) -> Address:
    """Resolve the daemon's address: ``path`` > ``$LOCKBROKER_SOCKET`` > scope default."""
    environ = os.environ if env is None else env
    if path:
        return Address(os.fspath(path), "explicit", scope)
    from_env = environ.get(ENV_VAR, "")
    if from_env:
        return Address(from_env, "env", scope)
    return Address(default_path(scope, environ), "scope", scope)


def dir_mode(scope: str) -> int:
    """The mode a scope directory is created with, the loosest accepted:
    nobody else may enter the local one (0700); the global one may be
    traversed by every user and written by its owner only (0755)."""
    return 0o755 if scope == GLOBAL else 0o700


def _uids(uids: Iterable[int]) -> str:
    return "uid " + " or ".join(str(u) for u in uids)


def check_dir(directory: str, scope: str, owner: Optional[int]) -> int:
    """Check a scope directory: a real directory (not a symbolic link),
    owned by ``owner`` (None: by anyone), no looser than :func:`dir_mode`.

    Returns its owner; raises :class:`Untrusted`, or ``OSError`` if it
    cannot be inspected.
    """
    st = os.lstat(directory)
    expected = () if owner is None else (owner,)

    def refuse(problem: str, message: str) -> Untrusted:
        return Untrusted(message, directory, problem, st.st_uid, expected)

    if stat.S_ISLNK(st.st_mode):
        raise refuse(
            "symbolic_link", "%s is a symbolic link (owned by uid %d), not a directory" % (directory, st.st_uid)
        )
    if not stat.S_ISDIR(st.st_mode):
        raise refuse("not_a_directory", "%s (owned by uid %d) is not a directory" % (directory, st.st_uid))
    if owner is not None and st.st_uid != owner:
        raise refuse(
            "owner", "directory %s is owned by uid %d, expected %s" % (directory, st.st_uid, _uids(expected))
        )
    mode = stat.S_IMODE(st.st_mode) & 0o777
    required = dir_mode(scope)
    if mode & ~required:
        raise refuse(
            "mode",
            "directory %s (owned by uid %d) is open to other users: its mode is %04o; it must be %04o (chmod %o %s)"
            % (directory, st.st_uid, mode, required, required, directory),
        )
    return st.st_uid


def expected_server(address: Address, user: Optional[int] = None, allowed: Iterable[int] = ()) -> Tuple[int, ...]:
    """The user ids accepted as the daemon at ``address`` (sorted), after
    checking the directory of a scope's default socket.

    * the local scope's default: the directory must be the user's and
      closed to others (0700); the daemon must run as the user;
    * the global scope's default: the directory must not be writable by
      others; the daemon must run as root or as the directory's owner
      (peer credentials name the process that called ``listen``: systemd,
      root, under the shipped units);
    * an explicit path or ``$LOCKBROKER_SOCKET``: no directory check; the
      daemon must run as the user or root.

    ``user`` defaults to the effective user id; ``allowed`` adds users the
    caller opted in to trust. A missing directory passes (connecting then
    fails). Raises :class:`Untrusted`, or ``OSError`` if the directory
    cannot be inspected.
    """
    me = os.geteuid() if user is None else user
    uids = set(allowed)
    directory = os.path.dirname(address.path) or "/"

    def checked(owner: Optional[int]) -> Optional[int]:
        try:
            return check_dir(directory, address.scope, owner)
        except FileNotFoundError:
            return None

    if address.source != "scope":
        uids.update((me, 0))
    elif address.scope == GLOBAL:
        uids.add(0)
        dir_owner = checked(None)
        if dir_owner is not None:
            uids.add(dir_owner)
    else:
        checked(me)
        uids.add(me)
    return tuple(sorted(uids))


def check_server(sock: socket.socket, path: str, expected: Tuple[int, ...]) -> None:
    """Refuse the daemon on the connected ``sock`` unless the user it runs
    as (its peer credentials, ``SO_PEERCRED``) is in ``expected``."""
    if not hasattr(socket, "SO_PEERCRED"):
        # Without peer credentials nothing proves who answers: refuse
        # rather than trust.
        raise ConnectFailed(
            "cannot check who serves %s: this platform has no SO_PEERCRED" % path, path
        )
    size = struct.calcsize("3i")
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
    except OSError as e:
        raise ConnectFailed("cannot check who serves %s: %s" % (path, e), path) from e
    if uid not in expected:
        raise Untrusted(
            "the daemon at %s runs as uid %d, expected %s" % (path, uid, _uids(expected)),
            path,
            "server",
            uid,
            expected,
        )

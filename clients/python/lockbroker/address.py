r"""Where the daemon listens (PROTOCOL.md section 1), and whom to trust there.

The first that applies wins, on every platform: an explicit address, then
``LOCKBROKER_SOCKET`` (if set and not empty), then the default of the
scope. The defaults:

=========  ==============================================  ==========================
scope      POSIX (a Unix socket)                           Windows (a named pipe)
=========  ==============================================  ==========================
``local``  ``$XDG_RUNTIME_DIR/lockbroker/broker.sock``,    ``\\.\pipe\lockbroker-%USERNAME%``
           else ``/tmp/lockbroker-$UID/broker.sock``       (``default`` without ``USERNAME``)
``global`` ``/run/lockbroker/broker.sock``                 ``\\.\pipe\lockbroker``
``self``   none: ``LOCKBROKER_SOCKET`` must name it        the same
=========  ==============================================  ==========================

``XDG_RUNTIME_DIR`` and the directory checks below do not apply on Windows.
Every function here is pure given its arguments: ``env`` and ``platform``
(``os.name``: ``"posix"`` or ``"nt"``) default to this process's, and tests
pass others (the Windows rules are tested on Linux that way).

Whom to trust (PROTOCOL.md section 1), the rules of the Rust client and the
daemon (``proto/src/address.rs``):

* Unix: :func:`expected_server` checks the directory of a scope's default
  socket before connecting and says which users may run the daemon;
  :func:`check_server` compares that with the connected socket's peer
  credentials. Otherwise another user who creates ``/tmp/lockbroker-$UID``
  first could answer this user's locks.
* Windows: :func:`expected_pipe_server` says which SIDs may serve the pipe;
  :func:`check_pipe_server` compares that with the user (or the token
  owner) of the pipe server's process, which :mod:`lockbroker.pipe` reads.
  Otherwise another user who creates ``\\.\pipe\lockbroker-<user>``
  first could answer this user's locks.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Tuple

from .errors import ConnectFailed, Untrusted

__all__ = [
    "PROCESS",
    "LOCAL",
    "GLOBAL",
    "SCOPES",
    "ENV_VAR",
    "POSIX",
    "WINDOWS",
    "Address",
    "resolve",
    "default_address",
    "default_path",
    "dir_mode",
    "check_dir",
    "expected_server",
    "check_server",
    "SYSTEM_SID",
    "ADMINISTRATORS_SID",
    "PipeIdentity",
    "windows_uid",
    "expected_pipe_server",
    "check_pipe_server",
]

#: The scope of one process tree: the private daemon ``lockbroker run``
#: starts and names in ``LOCKBROKER_SOCKET``. It has no default address.
PROCESS = "self"
#: The scope of one user's login session (the default).
LOCAL = "local"
#: The scope shared by every user of the machine.
GLOBAL = "global"
#: Every scope, by the names ``lockbroker --scope`` takes.
SCOPES = (PROCESS, LOCAL, GLOBAL)
#: The environment variable that overrides the scope default.
ENV_VAR = "LOCKBROKER_SOCKET"
#: ``platform`` values (those of ``os.name``): Unix sockets...
POSIX = "posix"
#: ... or named pipes.
WINDOWS = "nt"

#: The pipe of the global scope (Windows).
_GLOBAL_PIPE = "\\\\.\\pipe\\lockbroker"


@dataclass(frozen=True)
class Address:
    """A resolved socket path (pipe name on Windows) and how it was found.

    ``source`` is ``"explicit"``, ``"env"`` or ``"scope"``; ``scope`` is
    the scope asked for.
    """

    path: str
    source: str
    scope: str


def _uid(effective: bool) -> int:
    """This process's (effective) user id; Windows has none."""
    if sys.platform == "win32":
        raise OSError(errno.ENOSYS, "Windows has no user ids: the Unix socket rules do not apply")
    return os.geteuid() if effective else os.getuid()


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError("unknown scope %r (expected 'local', 'global' or 'self')" % (scope,))


def default_address(
    scope: str = LOCAL, env: Optional[Mapping[str, str]] = None, platform: Optional[str] = None
) -> Optional[str]:
    """The default address of ``scope``: a socket path on POSIX, a pipe
    name on Windows (``platform`` ``"nt"``); None for the self scope."""
    _check_scope(scope)
    environ = os.environ if env is None else env
    if scope == PROCESS:
        return None
    if (os.name if platform is None else platform) == WINDOWS:
        if scope == GLOBAL:
            return _GLOBAL_PIPE
        # As the Rust client: USERNAME as it is, "default" without it.
        user = environ.get("USERNAME")
        return _GLOBAL_PIPE + "-" + ("default" if user is None else user)
    if scope == LOCAL:
        runtime = environ.get("XDG_RUNTIME_DIR", "")
        if runtime:
            return os.path.join(runtime, "lockbroker", "broker.sock")
        return "/tmp/lockbroker-%d/broker.sock" % _uid(effective=False)
    return "/run/lockbroker/broker.sock"


def default_path(
    scope: str = LOCAL, env: Optional[Mapping[str, str]] = None, platform: Optional[str] = None
) -> str:
    """The default address of ``scope`` (``"local"`` or ``"global"``);
    ``ValueError`` for the self scope, which has none."""
    address = default_address(scope, env, platform)
    if address is None:
        raise ValueError("the %r scope has no default address" % (scope,))
    return address


def resolve(
    path: Optional[str] = None,
    scope: str = LOCAL,
    env: Optional[Mapping[str, str]] = None,
    platform: Optional[str] = None,
) -> Address:
    """Resolve the daemon's address: ``path`` > ``$LOCKBROKER_SOCKET`` > scope default.

    Raises ``ValueError`` for an unknown scope, and :class:`ConnectFailed`
    for the self scope without ``LOCKBROKER_SOCKET`` (nothing names its
    daemon).
    """
    _check_scope(scope)
    environ = os.environ if env is None else env
    if path:
        return Address(os.fspath(path), "explicit", scope)
    from_env = environ.get(ENV_VAR, "")
    if from_env:
        return Address(from_env, "env", scope)
    default = default_address(scope, environ, platform)
    if default is None:
        raise ConnectFailed(
            "no lockbroker address: the self scope needs LOCKBROKER_SOCKET, which `lockbroker run` sets"
        )
    return Address(default, "scope", scope)


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
    me = _uid(effective=True) if user is None else user
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


# ------------------------------------------------------------------ Windows

#: The SID of the local system account (services run as it).
SYSTEM_SID = "S-1-5-18"
#: The SID of the Administrators group (the owner of an elevated
#: process's token).
ADMINISTRATORS_SID = "S-1-5-32-544"


@dataclass(frozen=True)
class PipeIdentity:
    """The user a Windows process runs as, from its token.

    ``sid``: the user's SID in string form (``S-1-5-21-...``), what trust
    checks compare; ``owner_sid``: the owner SID of the token (the user, or
    :data:`ADMINISTRATORS_SID` for an elevated process); ``account``:
    ``DOMAIN\\user``, or the SID when the account cannot be looked up;
    ``uid``: the number the daemon reports as that user's ``uid``
    (:func:`windows_uid`), None if it has none.
    """

    sid: str
    owner_sid: str
    account: str
    uid: Optional[int] = None

    def __str__(self) -> str:
        return "%s (%s)" % (self.account, self.sid)


def windows_uid(sid: str, local: bool) -> Optional[int]:
    """The number a Windows peer's ``uid`` holds (PROTOCOL.md 4.17), from its
    SID, as Cygwin and MSYS2 number Windows accounts: a well-known
    ``S-1-5-N`` is N (SYSTEM: 18), a built-in ``S-1-5-32-N`` is
    0x20000 + N, an account of this machine (``local``: its domain is the
    computer's) 0x30000 + its RID, any other account 0x100000 + its RID;
    None for a SID of another shape (the daemon's rule, for comparing with
    ``SessionInfo.uid``)."""
    prefix = "S-1-5-"
    if not sid.startswith(prefix):
        return None
    parts: List[int] = []
    for part in sid[len(prefix):].split("-"):
        # As Rust's u32 parse: ASCII digits (one leading '+' allowed), < 2**32.
        digits = part[1:] if part.startswith("+") else part
        if not digits or not all("0" <= c <= "9" for c in digits) or int(digits) > 0xFFFFFFFF:
            return None
        parts.append(int(digits))
    rid = parts[-1]

    def offset(base: int, n: int) -> Optional[int]:
        return base + n if base + n <= 0xFFFFFFFF else None

    if len(parts) == 1:
        return rid
    if len(parts) == 2 and parts[0] == 32:
        return offset(0x20000, rid)
    if parts[0] == 21:
        return offset(0x30000 if local else 0x100000, rid)
    return None


def expected_pipe_server(address: Address, user: str, allowed: Iterable[str] = ()) -> Tuple[str, ...]:
    """The SIDs accepted as the server of the pipe at ``address``, for a
    client running as the user with SID ``user`` (Windows):

    * the local scope's default pipe: the user;
    * the global scope's default pipe: SYSTEM (the service) or an elevated
      process (its token owned by Administrators);
    * a pipe named explicitly or by ``$LOCKBROKER_SOCKET``: any of the three.

    ``allowed`` (first, in the order given) adds the SIDs the caller opted
    in to trust. The Rust client's ``expected_pipe_server``.
    """
    sids = list(allowed)
    if address.source != "scope":
        sids += [user, SYSTEM_SID, ADMINISTRATORS_SID]
    elif address.scope == GLOBAL:
        sids += [SYSTEM_SID, ADMINISTRATORS_SID]
    else:
        sids.append(user)
    return tuple(sids)


def check_pipe_server(path: str, server: PipeIdentity, expected: Tuple[str, ...]) -> None:
    """Refuse the server of the pipe ``path`` (:class:`Untrusted`, problem
    ``"server"``) unless its user, or its token's owner, is one of
    ``expected`` (SIDs, compared ignoring ASCII case)."""
    wanted = {sid.upper() for sid in expected}
    if server.sid.upper() in wanted or server.owner_sid.upper() in wanted:
        return
    raise Untrusted(
        "the daemon at %s runs as %s, expected %s" % (path, server, " or ".join(expected)),
        path,
        "server",
        server.sid,
        expected,
    )

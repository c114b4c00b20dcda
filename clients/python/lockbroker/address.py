"""Where the daemon listens (PROTOCOL.md section 1).

The first that applies wins: an explicit path, then ``LOCKBROKER_SOCKET``
(if set and not empty), then the default of the scope:

* ``local`` (default): ``$XDG_RUNTIME_DIR/lockbroker/broker.sock`` if
  ``XDG_RUNTIME_DIR`` is set and not empty, else
  ``/tmp/lockbroker-$UID/broker.sock``;
* ``global``: ``/run/lockbroker/broker.sock``.

Only Unix sockets are supported by this client (no Windows named pipes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = ["LOCAL", "GLOBAL", "ENV_VAR", "Address", "resolve", "default_path", "check_local_owner"]

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


def check_local_owner(address: Address) -> None:
    """Refuse the Local scope's default socket if its directory is not ours.

    PROTOCOL.md section 1: a Local-scope client SHOULD refuse a socket whose
    directory another user owns (someone could otherwise pose as the
    daemon). Explicit and ``$LOCKBROKER_SOCKET`` addresses are the user's
    own choice and are not checked. A missing directory is left to the
    connect, which reports it.
    """
    if address.source != "scope" or address.scope != LOCAL:
        return
    directory = os.path.dirname(address.path)
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return
    if st.st_uid != os.getuid():
        raise PermissionError(
            "refusing %s: its directory is owned by uid %d, not by this user (uid %d)"
            % (address.path, st.st_uid, os.getuid())
        )

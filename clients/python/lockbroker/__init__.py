"""lockbroker: named locks shared by every process of a machine.

A standard-library-only client for the lockbroker daemon (protocol
versions 1 to 3, ``PROTOCOL.md``). The objects behave like their
``threading`` counterparts::

    import lockbroker

    with lockbroker.Lock("deploy/status"):
        ...  # no other process holds deploy/status here

and the daemon keeps versioned shared state next to the locks::

    state = lockbroker.State()
    state.increment("stats/hits")
    with state.watch("cfg/", prefix=True) as changes:
        for change in changes:
            ...

Modules:

* :mod:`lockbroker.aio` -- the same for asyncio (imported on its own:
  ``from lockbroker import aio``), one connection per event loop;
* :mod:`lockbroker.primitives` -- ``Lock``, ``RLock``, ``BoundedSemaphore``,
  ``RWLock``;
* :mod:`lockbroker.state` -- ``State`` (get, set, remove, increment, list)
  and ``Watch``, an iterator of ``Changed`` / ``Lagged`` events;
* :mod:`lockbroker.client` -- ``Client``, one session shared by all threads,
  and the process-wide ``default_client()``;
* :mod:`lockbroker.transport` -- the connection: a Unix socket, or a
  named pipe on Windows, checked before anything is sent;
* :mod:`lockbroker.pipe` -- Windows named pipes (overlapped I/O) and who
  serves one;
* :mod:`lockbroker.address` -- where the daemon listens, and whom to trust;
* :mod:`lockbroker.protocol` -- wire types, codec and framing;
* :mod:`lockbroker.errors` -- exceptions.

They form layers: in ``state``, ``primitives``, ``client``, ``transport``,
``pipe``, ``address``, ``errors``, ``protocol``, each imports only modules
to its right, so none imports one that imports it back
(``tests/test_layering.py`` checks this).
"""

from __future__ import annotations

from .address import GLOBAL, LOCAL, PROCESS
from .client import Client, default_client, set_default_client
from .errors import (
    BrokerError,
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    DaemonShuttingDown,
    Deadlock,
    Unsupported,
    Forbidden,
    GuardNotHeld,
    InvalidRequest,
    LimitExceeded,
    LockbrokerError,
    LockTimeout,
    NoAnswer,
    NotAnInteger,
    NotHeld,
    QuotaExceeded,
    Untrusted,
    ValueTooLarge,
    VersionConflict,
)
from .primitives import BoundedSemaphore, Lock, RLock, RWLock
from .protocol import ChangeKind, EntryKind, ErrorCode, Grant, Inspection, LockKind, StateEntry, Versioned
from .state import Changed, Lagged, State, Watch, WatchEvent

__version__ = "0.1.0"

__all__ = [
    "LOCAL",
    "GLOBAL",
    "PROCESS",
    "Client",
    "default_client",
    "set_default_client",
    "Lock",
    "RLock",
    "BoundedSemaphore",
    "RWLock",
    "State",
    "Watch",
    "WatchEvent",
    "Changed",
    "Lagged",
    "Versioned",
    "StateEntry",
    "ChangeKind",
    "Grant",
    "Inspection",
    "LockKind",
    "EntryKind",
    "ErrorCode",
    "LockbrokerError",
    "ConnectFailed",
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
    "Untrusted",
    "DaemonShuttingDown",
]

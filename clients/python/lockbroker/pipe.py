r"""Named pipes (Windows): the daemon's connection over a pipe handle, and
who serves a pipe.

The daemon listens on a named pipe in byte mode (``\\.\pipe\lockbroker-<user>``
and the like, :mod:`lockbroker.address`); the frames on it are the same as
on a Unix socket. This module has three parts:

* :func:`open_pipe` opens the client end with ``CreateFileW``
  (``GENERIC_READ | GENERIC_WRITE``, ``OPEN_EXISTING``), retrying with
  ``WaitNamedPipeW`` while every instance is busy (``ERROR_PIPE_BUSY``),
  within the connect timeout.
* :class:`PipeConnection` gives the handle the operations the client uses
  on a socket: ``sendall``, ``recv``, ``settimeout``, ``shutdown``,
  ``close``. The handle is opened with ``FILE_FLAG_OVERLAPPED`` and every
  read and write is overlapped (``_winapi.ReadFile`` / ``WriteFile`` with
  ``overlapped=True``, completed by ``GetOverlappedResult``). A handle
  opened for synchronous I/O serialises its operations: the reader
  thread's ``ReadFile``, blocked until the daemon sends something, would
  hold up every ``WriteFile`` of the other threads -- a request could not
  be sent while nothing arrives. Overlapped operations on one handle run
  independently. :meth:`PipeConnection.shutdown` cancels the operations in
  flight (``CancelIoEx`` through ``Overlapped.cancel``), which wakes a
  pending read as the end of the stream, and the handle is closed once the
  last of them has finished, so no operation ever uses a closed (or
  reused) handle value. A pipe has no half-close: the connection ends when
  the handle is closed. ``ERROR_BROKEN_PIPE`` (and
  ``ERROR_PIPE_NOT_CONNECTED``) on a read is the daemon's end of the
  connection, a clean end of stream (``b""``).
* :func:`server_process_id`, :func:`identity_of` and
  :func:`current_identity` read, through ``ctypes`` (kernel32, advapi32),
  who serves a pipe: ``GetNamedPipeServerProcessId``, then ``OpenProcess``
  (``PROCESS_QUERY_LIMITED_INFORMATION``), the token's ``TokenUser`` and
  ``TokenOwner`` SIDs and the account name. The trust decision itself is
  :func:`lockbroker.address.check_pipe_server`, a pure function.

The pipe is opened with ``SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION``:
whoever serves it may learn who the client is (the daemon reads its
client's process token, not the pipe's impersonation token) but cannot act
as the client, even before the client checks who the server is.

This module imports on every platform (the Windows-only ``_winapi`` and
``ctypes.WinDLL`` are loaded only on Windows). :func:`open_pipe` and
:class:`PipeConnection` take the ``_winapi`` functions they call as an
argument (``api``), so the tests drive them on Linux with a fake that
behaves as ``_winapi`` does: framing across partial reads, a broken pipe,
``shutdown`` while a read is pending, busy pipes and timeouts. The real
``_winapi`` and the ``ctypes`` calls run only on Windows, and no Windows
Python runs in this repository's CI: they are not exercised by the tests.
"""

from __future__ import annotations

import errno
import math
import socket
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from .address import PipeIdentity, windows_uid

__all__ = [
    "PipeConnection",
    "open_pipe",
    "server_process_id",
    "identity_of",
    "current_identity",
]

if sys.platform == "win32":
    import _winapi

    _WINAPI: Any = _winapi
else:
    _WINAPI = None

# Win32 constants (winbase.h, winerror.h), here so that the fakes of the
# tests need no _winapi.
GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
OPEN_EXISTING = 3
FILE_FLAG_OVERLAPPED = 0x40000000
SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 0x00010000
NULL = 0
INFINITE = 0xFFFFFFFF
WAIT_OBJECT_0 = 0
WAIT_TIMEOUT = 258
ERROR_FILE_NOT_FOUND = 2
ERROR_BROKEN_PIPE = 109
ERROR_SEM_TIMEOUT = 121
ERROR_PIPE_BUSY = 231
ERROR_NO_DATA = 232
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_MORE_DATA = 234
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997

#: Read errors that mean the daemon ended the connection.
_END_OF_STREAM = (ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED)


def _winerror(e: OSError) -> Optional[int]:
    """The Windows error code of ``e`` (the attribute exists on Windows only)."""
    code = getattr(e, "winerror", None)
    return code if isinstance(code, int) else None


def _millis(seconds: float) -> int:
    """Seconds as the milliseconds of a Win32 wait: rounded up, at least 1
    (0 means "the default" to ``WaitNamedPipe``), below ``INFINITE``."""
    return int(min(max(math.ceil(seconds * 1000.0), 1), INFINITE - 1))


def _api(api: Any) -> Any:
    if api is not None:
        return api
    if _WINAPI is None:
        raise OSError(errno.ENOSYS, "named pipes are Windows-only")
    return _WINAPI


def open_pipe(name: str, timeout: Optional[float], api: Any = None) -> int:
    """Open the client end of the pipe ``name`` for overlapped I/O; returns
    its handle.

    While every instance of the pipe is busy, waits for one with
    ``WaitNamedPipe`` and tries again, until ``timeout`` seconds have passed
    (None: forever); then raises ``socket.timeout``. Other failures
    (``ERROR_FILE_NOT_FOUND``: no daemon) raise ``OSError`` at once.
    ``api``: the ``_winapi`` functions to call (tests pass a fake).
    """
    winapi = _api(api)
    deadline = None if timeout is None else time.monotonic() + timeout
    flags = FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION
    while True:
        try:
            handle: int = winapi.CreateFile(
                name, GENERIC_READ | GENERIC_WRITE, 0, NULL, OPEN_EXISTING, flags, NULL
            )
            return handle
        except OSError as e:
            if _winerror(e) != ERROR_PIPE_BUSY:
                raise
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise socket.timeout("every instance of the pipe %s stayed busy" % name)
        try:
            # Returns once an instance is free; another client may still
            # take it first, hence the loop.
            winapi.WaitNamedPipe(name, INFINITE if remaining is None else _millis(remaining))
        except OSError as e:
            # ERROR_SEM_TIMEOUT: the deadline check above says so next;
            # ERROR_FILE_NOT_FOUND: the pipe went away, which CreateFile says.
            if _winerror(e) not in (ERROR_SEM_TIMEOUT, ERROR_FILE_NOT_FOUND):
                raise


class PipeConnection:
    """One connection to the daemon over a pipe ``handle`` opened for
    overlapped I/O (:func:`open_pipe`), with a socket's operations.

    One thread may read while others write (each write whole, as the
    client's write lock ensures). ``recv`` returns ``b""`` at the end of
    the stream: the daemon closed the pipe, or :meth:`shutdown` was called.
    ``api``: the ``_winapi`` functions to call (tests pass a fake).
    """

    def __init__(self, handle: int, api: Any = None) -> None:
        self._api = _api(api)
        self._handle = handle
        self._timeout: Optional[float] = None
        # Guards everything below; never held while waiting for I/O.
        self._lock = threading.Lock()
        self._ended = False  # shutdown() or close() was called
        self._users = 0  # operations using the handle right now
        self._released = False  # the handle is closed
        self._in_flight: List[Any] = []  # their Overlapped objects

    @property
    def handle(self) -> int:
        """The pipe handle (for :func:`server_process_id`)."""
        return self._handle

    def settimeout(self, timeout: Optional[float]) -> None:
        """Bound each later ``recv`` and ``sendall`` to ``timeout`` seconds
        (None: no bound); past it they raise ``socket.timeout``."""
        self._timeout = timeout

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes, waiting for at least one; ``b""`` at the end."""
        while True:
            try:
                done = self._run(lambda: self._api.ReadFile(self._handle, size, overlapped=True))
            except OSError as e:
                if _winerror(e) in _END_OF_STREAM:
                    return b""
                raise
            if done is None:
                return b""  # shut down, as a socket after shutdown()
            ov, _transferred, err = done
            if err == ERROR_OPERATION_ABORTED:
                if self._ended:
                    return b""
                raise OSError(errno.ECANCELED, "a read of the pipe was cancelled")
            data = bytes(ov.getbuffer())
            if data:
                return data
            # A zero-byte read completes a zero-byte write, not the end of
            # the stream (which is an error above): read again.

    def sendall(self, data: bytes) -> None:
        """Write all of ``data``; ``OSError`` if the connection is gone."""
        rest = bytes(data)
        while rest:
            chunk = rest
            done = self._run(lambda: self._api.WriteFile(self._handle, chunk, overlapped=True))
            if done is None or done[2] == ERROR_OPERATION_ABORTED:
                raise BrokenPipeError(errno.EPIPE, "the connection to the daemon was shut down")
            written = done[1]
            if written <= 0:
                raise OSError(errno.EIO, "the pipe accepted no data")
            rest = rest[written:]

    def shutdown(self) -> None:
        """End the connection: cancel the reads and writes in flight (a
        pending ``recv`` returns ``b""``), refuse new ones, and close the
        handle once none uses it. Idempotent; never raises ``OSError``."""
        with self._lock:
            self._ended = True
            in_flight = list(self._in_flight)
        for ov in in_flight:
            self._cancel(ov)
        self._release_if_unused()

    def close(self) -> None:
        """The same as :meth:`shutdown`: a pipe has no half-close, and the
        connection ends when its handle is closed."""
        self.shutdown()

    # -------------------------------------------------------------- plumbing

    def _run(self, start: Callable[[], Tuple[Any, int]]) -> Optional[Tuple[Any, int, int]]:
        """Start an overlapped operation and wait for it: ``(overlapped,
        bytes transferred, error)``, or None if the connection was shut down
        before it started. Errors other than cancellation raise ``OSError``."""
        with self._lock:
            if self._ended:
                return None
            self._users += 1
        try:
            ov, err = start()
            with self._lock:
                self._in_flight.append(ov)
                # shutdown() between start() and here did not see it.
                ended = self._ended
            try:
                if ended:
                    self._cancel(ov)
                transferred, err = self._wait(ov, err)
            finally:
                with self._lock:
                    self._in_flight.remove(ov)
            return ov, transferred, err
        finally:
            with self._lock:
                self._users -= 1
            self._release_if_unused()

    def _wait(self, ov: Any, err: int) -> Tuple[int, int]:
        """Wait for ``ov`` to complete, within the timeout."""
        timeout = self._timeout
        if err == ERROR_IO_PENDING and timeout is not None:
            if self._api.WaitForSingleObject(ov.event, _millis(timeout)) == WAIT_TIMEOUT:
                self._cancel(ov)
                transferred, err = ov.GetOverlappedResult(True)
                if err == ERROR_OPERATION_ABORTED and not self._ended:
                    raise socket.timeout("timed out")
                return int(transferred), int(err)  # it completed all the same
        transferred, err = ov.GetOverlappedResult(True)
        return int(transferred), int(err)

    @staticmethod
    def _cancel(ov: Any) -> None:
        try:
            ov.cancel()  # CancelIoEx on this operation, if still pending
        except OSError:
            pass

    def _release_if_unused(self) -> None:
        with self._lock:
            release = self._ended and self._users == 0 and not self._released
            if release:
                self._released = True
        if release:
            try:
                self._api.CloseHandle(self._handle)
            except OSError:
                pass


# ---------------------------------------------------------------- identity


class _Win32:
    """The ``ctypes`` functions of kernel32 and advapi32 used here, typed."""

    def __init__(self) -> None:
        import ctypes
        from ctypes import wintypes

        self.ctypes = ctypes
        # getattr: WinDLL and WinError exist on Windows only.
        win_dll = getattr(ctypes, "WinDLL")
        k32 = win_dll("kernel32", use_last_error=True)
        adv = win_dll("advapi32", use_last_error=True)
        HANDLE, BOOL, DWORD = wintypes.HANDLE, wintypes.BOOL, wintypes.DWORD
        PDWORD = ctypes.POINTER(DWORD)

        def fn(dll: Any, name: str, restype: Any, *argtypes: Any) -> Any:
            f = getattr(dll, name)
            f.restype = restype
            f.argtypes = list(argtypes)
            return f

        self.GetNamedPipeServerProcessId = fn(k32, "GetNamedPipeServerProcessId", BOOL, HANDLE, PDWORD)
        self.OpenProcess = fn(k32, "OpenProcess", HANDLE, DWORD, BOOL, DWORD)
        self.GetCurrentProcessId = fn(k32, "GetCurrentProcessId", DWORD)
        self.CloseHandle = fn(k32, "CloseHandle", BOOL, HANDLE)
        self.LocalFree = fn(k32, "LocalFree", ctypes.c_void_p, ctypes.c_void_p)
        self.GetComputerNameW = fn(k32, "GetComputerNameW", BOOL, wintypes.LPWSTR, PDWORD)
        self.OpenProcessToken = fn(adv, "OpenProcessToken", BOOL, HANDLE, DWORD, ctypes.POINTER(HANDLE))
        self.GetTokenInformation = fn(
            adv, "GetTokenInformation", BOOL, HANDLE, ctypes.c_int, ctypes.c_void_p, DWORD, PDWORD
        )
        self.ConvertSidToStringSidW = fn(
            adv, "ConvertSidToStringSidW", BOOL, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        )
        self.LookupAccountSidW = fn(
            adv,
            "LookupAccountSidW",
            BOOL,
            wintypes.LPCWSTR,
            ctypes.c_void_p,
            wintypes.LPWSTR,
            PDWORD,
            wintypes.LPWSTR,
            PDWORD,
            ctypes.POINTER(ctypes.c_int),
        )

    def error(self) -> OSError:
        """The calling thread's last Win32 error, as ``OSError``."""
        e: OSError = getattr(self.ctypes, "WinError")(getattr(self.ctypes, "get_last_error")())
        return e


_win32_lock = threading.Lock()
_win32: Optional[_Win32] = None

PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
TOKEN_QUERY = 0x0008
_TOKEN_USER = 1
_TOKEN_OWNER = 4


def _dlls() -> _Win32:
    global _win32
    if sys.platform != "win32":
        raise OSError(errno.ENOSYS, "reading a process's user is Windows-only")
    with _win32_lock:
        if _win32 is None:
            _win32 = _Win32()
        return _win32


def server_process_id(handle: int) -> int:
    """The process id of the server of the pipe ``handle``
    (``GetNamedPipeServerProcessId``)."""
    w = _dlls()
    pid = w.ctypes.c_ulong(0)
    if not w.GetNamedPipeServerProcessId(handle, w.ctypes.byref(pid)):
        raise w.error()
    return int(pid.value)


def identity_of(pid: int) -> PipeIdentity:
    """The user process ``pid`` runs as, from its token (Windows)."""
    w = _dlls()
    ctypes = w.ctypes
    process = w.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not process:
        raise w.error()
    try:
        token = ctypes.c_void_p()
        if not w.OpenProcessToken(process, TOKEN_QUERY, ctypes.byref(token)):
            raise w.error()
        try:
            user = _token_info(w, token, _TOKEN_USER)
            owner = _token_info(w, token, _TOKEN_OWNER)
            # TOKEN_USER {SID_AND_ATTRIBUTES {PSID Sid; ...}} and
            # TOKEN_OWNER {PSID Owner}: a SID pointer first in both.
            user_sid = ctypes.c_void_p.from_buffer(user).value
            owner_sid = ctypes.c_void_p.from_buffer(owner).value
            sid = _sid_string(w, user_sid)
            account = _account_name(w, user_sid)
            computer = _computer_name(w)
            local = account is not None and computer is not None and account[0].upper() == computer.upper()
            if account is None:
                name = sid
            elif account[0]:
                name = "%s\\%s" % account
            else:
                name = account[1]
            return PipeIdentity(sid, _sid_string(w, owner_sid), name, windows_uid(sid, local))
        finally:
            w.CloseHandle(token)
    finally:
        w.CloseHandle(process)


def current_identity() -> PipeIdentity:
    """The user this process runs as (Windows)."""
    return identity_of(int(_dlls().GetCurrentProcessId()))


def _token_info(w: _Win32, token: Any, klass: int) -> Any:
    """One class of token information, in a buffer aligned for its struct."""
    ctypes = w.ctypes
    size = ctypes.c_ulong(0)
    w.GetTokenInformation(token, klass, None, 0, ctypes.byref(size))
    if size.value == 0:
        raise w.error()
    buf = (ctypes.c_uint64 * ((size.value + 7) // 8))()
    if not w.GetTokenInformation(token, klass, buf, size.value, ctypes.byref(size)):
        raise w.error()
    return buf


def _sid_string(w: _Win32, sid: Optional[int]) -> str:
    ctypes = w.ctypes
    wide = ctypes.c_void_p()
    if not w.ConvertSidToStringSidW(sid, ctypes.byref(wide)):
        raise w.error()
    try:
        text: str = ctypes.wstring_at(wide.value)
        return text
    finally:
        w.LocalFree(wide)


def _account_name(w: _Win32, sid: Optional[int]) -> Optional[Tuple[str, str]]:
    """The account's (domain, name), or None if it cannot be looked up."""
    ctypes = w.ctypes
    name_len, domain_len, kind = ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_int(0)
    w.LookupAccountSidW(None, sid, None, ctypes.byref(name_len), None, ctypes.byref(domain_len), ctypes.byref(kind))
    if name_len.value == 0:
        return None
    name = ctypes.create_unicode_buffer(name_len.value)
    domain = ctypes.create_unicode_buffer(max(domain_len.value, 1))
    if not w.LookupAccountSidW(
        None, sid, name, ctypes.byref(name_len), domain, ctypes.byref(domain_len), ctypes.byref(kind)
    ):
        return None
    return str(domain.value), str(name.value)


def _computer_name(w: _Win32) -> Optional[str]:
    """This machine's NetBIOS name, the domain of its local accounts."""
    ctypes = w.ctypes
    buf = ctypes.create_unicode_buffer(64)
    size = ctypes.c_ulong(64)
    if not w.GetComputerNameW(buf, ctypes.byref(size)):
        return None
    return str(buf.value)

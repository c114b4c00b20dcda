r"""The Windows named-pipe transport, driven on Linux by a fake ``_winapi``.

:class:`FakeWinapi` is the client end of one pipe as ``_winapi`` presents
it -- ``CreateFile``, ``WaitNamedPipe``, overlapped ``ReadFile`` /
``WriteFile`` returning ``(Overlapped, error)``, ``GetOverlappedResult``
raising ``OSError`` with ``winerror`` for a broken pipe and returning
``ERROR_OPERATION_ABORTED`` after ``cancel()`` -- and the test plays the
daemon's end. What is tested is this client's code over it: framing across
partial reads, the end of the stream, ``shutdown`` while a read is pending,
timeouts, busy pipes, the server check before the first byte, and a whole
``Client`` session. The real ``_winapi`` and the ``ctypes`` identity calls
are not run here (no Windows Python in this repository's CI): a fake that
is wrong about Windows makes these tests pass wrongly. No daemon is needed.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
import unittest
from typing import Any, Callable, List, Optional, Tuple
from unittest import mock

from lockbroker import ConnectFailed, ConnectionLost, Untrusted
from lockbroker import pipe as _pipe
from lockbroker import transport as _transport
from lockbroker.address import ADMINISTRATORS_SID, SYSTEM_SID, Address, PipeIdentity
from lockbroker.client import Client
from lockbroker.pipe import (
    ERROR_BROKEN_PIPE,
    ERROR_FILE_NOT_FOUND,
    ERROR_IO_PENDING,
    ERROR_NO_DATA,
    ERROR_OPERATION_ABORTED,
    ERROR_PIPE_BUSY,
    ERROR_SEM_TIMEOUT,
    FILE_FLAG_OVERLAPPED,
    GENERIC_READ,
    GENERIC_WRITE,
    OPEN_EXISTING,
    SECURITY_IDENTIFICATION,
    SECURITY_SQOS_PRESENT,
    WAIT_TIMEOUT,
    PipeConnection,
    open_pipe,
)
from lockbroker.protocol import (
    FrameBuffer,
    Hello,
    Limits,
    Ping,
    Pong,
    RequestMessage,
    ResponseMessage,
    Welcome,
    decode_client_message,
    encode_frame,
    encode_server_message,
)

#: Seconds any wait of these tests may take before the test fails.
WAIT = 10.0
HANDLE = 0x1234
ERROR_INVALID_HANDLE = 6
ERROR_IO_INCOMPLETE = 996


def win_error(code: int) -> OSError:
    """An ``OSError`` as ``_winapi`` raises it (``winerror`` set; on Linux
    the attribute must be set by hand)."""
    e = OSError(None, "[WinError %d]" % code)
    e.winerror = code  # type: ignore[attr-defined]
    return e


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.002)


class FakeOverlapped:
    """``_winapi.Overlapped``: one read or write, its event, its result."""

    def __init__(self, pipe: "FakeWinapi", handle: int, size: int = 0) -> None:
        self.pipe = pipe
        self.handle = handle
        self.size = size
        self.event = threading.Event()  # what WaitForSingleObject is given
        self.pending = False
        self._data = b""
        self._transferred = 0
        self._err = 0
        self._raise: Optional[int] = None

    def complete(self, data: bytes = b"", transferred: Optional[int] = None, err: int = 0, raise_: Optional[int] = None) -> None:
        """Finish the operation (the fake's lock held)."""
        self._data = data
        self._transferred = len(data) if transferred is None else transferred
        self._err = err
        self._raise = raise_
        self.pending = False
        self.event.set()

    def GetOverlappedResult(self, wait: bool) -> Tuple[int, int]:
        self.pipe.note_use(self.handle, "GetOverlappedResult")
        if not self.event.is_set():
            if not wait:
                return 0, ERROR_IO_INCOMPLETE
            if not self.event.wait(WAIT):
                raise AssertionError("GetOverlappedResult(True) waited %s s: nothing cancelled the operation" % WAIT)
        if self._raise is not None:
            raise win_error(self._raise)
        return self._transferred, self._err

    def getbuffer(self) -> bytes:
        if not self.event.is_set():
            raise ValueError("can't get read buffer before GetOverlappedResult() signals the operation completed")
        return self._data

    def cancel(self) -> None:
        self.pipe.note_use(self.handle, "cancel")
        with self.pipe.lock:
            self.pipe.cancels += 1
            if self.pending:
                if self in self.pipe.reads:
                    self.pipe.reads.remove(self)
                self.complete(err=ERROR_OPERATION_ABORTED)


class FakeWinapi:
    """The client end of one byte-mode pipe, as ``_winapi`` shows it; the
    ``server_*`` methods are the daemon's end."""

    def __init__(self, write_limit: Optional[int] = None) -> None:
        self.lock = threading.Lock()
        self.written = threading.Condition(self.lock)
        self.inbound = bytearray()  # sent by the server, not yet read
        self.outbound = bytearray()  # written by the client
        self.reads: List[FakeOverlapped] = []  # pending reads, oldest first
        self.server_closed = False
        # Every CreateFile opens a new handle; HANDLE is the first (and the
        # one the tests that make a PipeConnection themselves use).
        self.open_handles = {HANDLE}
        self.next_handle = HANDLE
        self.closed: List[int] = []
        self.closed_with_pending = False
        # Uses of a handle after it was closed (a bug: the value may be reused).
        self.misuse: List[str] = []
        self.cancels = 0
        self.write_limit = write_limit
        self.reads_started = 0
        # CreateFile's scripted outcomes (winerror, or None: open); then open.
        self.create_results: List[Optional[int]] = []
        self.create_calls: List[Tuple[Any, ...]] = []
        self.wait_results: List[Optional[int]] = []
        self.wait_calls: List[int] = []

    # -- _winapi

    def CreateFile(self, name: str, access: int, share: int, security: int, disposition: int, flags: int, template: int) -> int:
        self.create_calls.append((name, access, share, security, disposition, flags, template))
        outcome = self.create_results.pop(0) if self.create_results else None
        if outcome is not None:
            raise win_error(outcome)
        with self.lock:
            handle = self.next_handle
            self.next_handle += 4
            self.open_handles.add(handle)
            return handle

    def WaitNamedPipe(self, name: str, timeout: int) -> None:
        self.wait_calls.append(timeout)
        outcome = self.wait_results.pop(0) if self.wait_results else None
        if outcome is not None:
            raise win_error(outcome)

    def note_use(self, handle: int, what: str) -> None:
        with self.lock:
            if handle not in self.open_handles:
                self.misuse.append("%s on closed handle %#x" % (what, handle))

    def _check(self, handle: int) -> None:
        if handle not in self.open_handles:
            raise win_error(ERROR_INVALID_HANDLE)

    def ReadFile(self, handle: int, size: int, overlapped: bool = False) -> Tuple[FakeOverlapped, int]:
        assert overlapped, "every read must be overlapped"
        with self.lock:
            self._check(handle)
            self.reads_started += 1
            ov = FakeOverlapped(self, handle, size)
            if self.inbound:
                ov.complete(self._take(size))
                return ov, 0
            if self.server_closed:
                raise win_error(ERROR_BROKEN_PIPE)
            ov.pending = True
            self.reads.append(ov)
            return ov, ERROR_IO_PENDING

    def WriteFile(self, handle: int, data: bytes, overlapped: bool = False) -> Tuple[FakeOverlapped, int]:
        assert overlapped, "every write must be overlapped"
        with self.lock:
            self._check(handle)
            if self.server_closed:
                raise win_error(ERROR_NO_DATA)
            n = len(data) if self.write_limit is None else min(len(data), self.write_limit)
            self.outbound += data[:n]
            self.written.notify_all()
            ov = FakeOverlapped(self, handle)
            ov.complete(transferred=n)
            return ov, 0

    def WaitForSingleObject(self, event: threading.Event, milliseconds: int) -> int:
        return 0 if event.wait(milliseconds / 1000.0) else WAIT_TIMEOUT

    def CloseHandle(self, handle: int) -> None:
        with self.lock:
            self._check(handle)
            self.open_handles.discard(handle)
            self.closed.append(handle)
            if self.reads:
                # Windows would cancel them; this client must never do it.
                self.closed_with_pending = True
                for ov in self.reads:
                    ov.complete(err=ERROR_OPERATION_ABORTED)
                self.reads.clear()

    # -- the daemon's end

    def _take(self, size: int) -> bytes:
        data = bytes(self.inbound[:size])
        del self.inbound[:size]
        return data

    def _feed(self) -> None:
        while self.reads and self.inbound:
            ov = self.reads.pop(0)
            ov.complete(self._take(ov.size))

    def server_send(self, data: bytes) -> None:
        with self.lock:
            self.inbound += data
            self._feed()

    def server_close(self) -> None:
        """The daemon closes its handle: buffered bytes stay readable, then
        reads fail with ERROR_BROKEN_PIPE."""
        with self.lock:
            self.server_closed = True
            for ov in self.reads:
                ov.complete(raise_=ERROR_BROKEN_PIPE)
            self.reads.clear()

    def pending_reads(self) -> int:
        with self.lock:
            return len(self.reads)

    def take_written(self, at_least: int) -> bytes:
        """Wait until the client wrote ``at_least`` bytes; take them all."""
        with self.lock:
            if not self.written.wait_for(lambda: len(self.outbound) >= at_least, WAIT):
                raise AssertionError("the client wrote %d bytes, not %d" % (len(self.outbound), at_least))
            data = bytes(self.outbound)
            self.outbound.clear()
            return data


def background(fn: Callable[[], Any]) -> "Tuple[threading.Thread, List[Any]]":
    """Run ``fn`` on a thread; its result (or exception) lands in the list."""
    out: List[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


class PipeConnectionTest(unittest.TestCase):
    def setUp(self) -> None:
        self.api = FakeWinapi()
        self.conn = PipeConnection(HANDLE, self.api)
        self.addCleanup(lambda: self.assertEqual(self.api.misuse, []))

    def test_frames_split_across_partial_reads(self) -> None:
        stream = encode_frame(b"hello") + encode_frame(b"x" * 300)
        buffer = FrameBuffer(4096)
        bodies: List[bytes] = []

        def feed(data: bytes) -> None:
            buffer.feed(data)
            body = buffer.next_body()
            while body is not None:
                bodies.append(body)
                body = buffer.next_body()

        # The daemon's bytes arrive while a read is pending, in pieces that
        # cut a length prefix, a body, and the boundary between frames.
        for piece in (stream[:2], stream[2:6], stream[6:8], stream[8:11], stream[11:]):
            thread, out = background(lambda: self.conn.recv(65536))
            wait_until(lambda: self.api.pending_reads() == 1, "a pending read")
            self.api.server_send(piece)
            thread.join(WAIT)
            self.assertEqual(out, [piece])  # each read returns what arrived
            feed(out[0])
            if len(bodies) < 2:
                self.assertTrue(buffer.has_partial() or not bodies)
        self.assertEqual(bodies, [b"hello", b"x" * 300])
        self.assertFalse(buffer.has_partial())
        # Reads smaller than what is buffered take it a piece at a time.
        self.api.server_send(stream)
        while len(bodies) < 4:
            feed(self.conn.recv(7))
        self.assertEqual(bodies[2:], [b"hello", b"x" * 300])

    def test_a_read_completes_with_what_arrived(self) -> None:
        thread, out = background(lambda: self.conn.recv(65536))
        wait_until(lambda: self.api.pending_reads() == 1, "a pending read")
        self.api.server_send(b"\x05\x00")
        thread.join(WAIT)
        self.assertEqual(out, [b"\x05\x00"])
        self.api.server_send(b"\x00\x00ab")
        self.assertEqual(self.conn.recv(2), b"\x00\x00")
        self.assertEqual(self.conn.recv(65536), b"ab")

    def test_a_closed_pipe_is_a_clean_end_of_stream(self) -> None:
        # Bytes sent before the close are read first, then b"".
        self.api.server_send(b"last")
        self.api.server_close()
        self.assertEqual(self.conn.recv(65536), b"last")
        self.assertEqual(self.conn.recv(65536), b"")  # ReadFile raised ERROR_BROKEN_PIPE
        self.assertEqual(self.conn.recv(65536), b"")

    def test_a_close_during_a_pending_read_is_the_end_of_stream(self) -> None:
        thread, out = background(lambda: self.conn.recv(65536))
        wait_until(lambda: self.api.pending_reads() == 1, "a pending read")
        self.api.server_close()  # GetOverlappedResult raises ERROR_BROKEN_PIPE
        thread.join(WAIT)
        self.assertEqual(out, [b""])

    def test_shutdown_while_a_read_is_pending(self) -> None:
        thread, out = background(lambda: self.conn.recv(65536))
        wait_until(lambda: self.api.pending_reads() == 1, "a pending read")
        self.conn.shutdown()  # from another thread, as Client.close does
        thread.join(WAIT)
        self.assertFalse(thread.is_alive())
        self.assertEqual(out, [b""])
        self.assertEqual(self.api.cancels, 1)
        # Closed once, after the read finished (never under it).
        self.assertEqual(self.api.closed, [HANDLE])
        self.assertFalse(self.api.closed_with_pending)
        # Later calls neither touch the handle nor block.
        self.assertEqual(self.conn.recv(65536), b"")
        with self.assertRaises(BrokenPipeError):
            self.conn.sendall(b"x")
        self.conn.close()
        self.assertEqual(self.api.closed, [HANDLE])

    def test_shutdown_racing_the_start_of_a_read(self) -> None:
        # shutdown() runs after ReadFile started but before the read is
        # registered: the reader sees it and cancels its own read.
        real_read = self.api.ReadFile

        def read_then_shutdown(handle: int, size: int, overlapped: bool = False) -> Tuple[FakeOverlapped, int]:
            started = real_read(handle, size, overlapped)
            self.conn.shutdown()
            self.assertEqual(self.api.closed, [], "closed while a read was in flight")
            return started

        self.api.ReadFile = read_then_shutdown  # type: ignore[method-assign]
        thread, out = background(lambda: self.conn.recv(65536))
        thread.join(WAIT)
        self.assertEqual(out, [b""])
        self.assertEqual(self.api.closed, [HANDLE])
        self.assertFalse(self.api.closed_with_pending)

    def test_a_write_does_not_wait_for_a_pending_read(self) -> None:
        # The reader thread's read is pending; another thread writes.
        thread, out = background(lambda: self.conn.recv(65536))
        wait_until(lambda: self.api.pending_reads() == 1, "a pending read")
        self.conn.sendall(b"request")
        self.assertEqual(self.api.take_written(7), b"request")
        self.api.server_send(b"answer")
        thread.join(WAIT)
        self.assertEqual(out, [b"answer"])

    def test_sendall_writes_everything_across_short_writes(self) -> None:
        api = FakeWinapi(write_limit=3)
        conn = PipeConnection(HANDLE, api)
        frame = encode_frame(b"0123456789")
        conn.sendall(frame)
        self.assertEqual(api.take_written(len(frame)), frame)

    def test_a_write_to_a_closed_pipe_fails(self) -> None:
        self.api.server_close()
        with self.assertRaises(OSError) as cm:
            self.conn.sendall(b"x")
        self.assertEqual(getattr(cm.exception, "winerror", None), ERROR_NO_DATA)

    def test_a_read_times_out_and_is_cancelled(self) -> None:
        self.conn.settimeout(0.05)
        with self.assertRaises(socket.timeout):
            self.conn.recv(65536)
        self.assertEqual((self.api.cancels, self.api.pending_reads()), (1, 0))
        # The connection still works, without a bound now.
        self.conn.settimeout(None)
        self.api.server_send(b"late")
        self.assertEqual(self.conn.recv(65536), b"late")

    def test_a_read_that_completes_as_it_times_out_keeps_its_bytes(self) -> None:
        def wait_then_arrive(event: threading.Event, milliseconds: int) -> int:
            self.api.server_send(b"just in time")  # completes the read
            return WAIT_TIMEOUT  # ...but the wait had already timed out

        self.api.WaitForSingleObject = wait_then_arrive  # type: ignore[method-assign]
        self.conn.settimeout(1.0)
        self.assertEqual(self.conn.recv(65536), b"just in time")

    def test_an_empty_read_is_not_the_end(self) -> None:
        # A zero-byte read (the peer wrote nothing) is read past.
        thread, out = background(lambda: self.conn.recv(65536))
        wait_until(lambda: self.api.pending_reads() == 1, "a pending read")
        with self.api.lock:
            self.api.reads.pop(0).complete(b"")
        wait_until(lambda: self.api.pending_reads() == 1, "a second read")
        self.api.server_send(b"data")
        thread.join(WAIT)
        self.assertEqual(out, [b"data"])


class OpenPipeTest(unittest.TestCase):
    NAME = r"\\.\pipe\lockbroker-me"

    def test_the_handle_is_opened_for_overlapped_io_and_identification_only(self) -> None:
        api = FakeWinapi()
        self.assertEqual(open_pipe(self.NAME, 1.0, api), HANDLE)
        (name, access, share, security, disposition, flags, template), = api.create_calls
        self.assertEqual((name, access, share, disposition), (self.NAME, GENERIC_READ | GENERIC_WRITE, 0, OPEN_EXISTING))
        self.assertEqual(flags, FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION)
        self.assertEqual((security, template), (0, 0))

    def test_a_busy_pipe_is_waited_for(self) -> None:
        api = FakeWinapi()
        api.create_results = [ERROR_PIPE_BUSY, ERROR_PIPE_BUSY]
        api.wait_results = [None, ERROR_SEM_TIMEOUT]
        self.assertEqual(open_pipe(self.NAME, 5.0, api), HANDLE)
        self.assertEqual(len(api.create_calls), 3)
        self.assertEqual(len(api.wait_calls), 2)
        # Waits are bounded by what is left of the timeout, never 0 (the
        # pipe's default wait to WaitNamedPipe).
        self.assertTrue(all(1 <= ms <= 5000 for ms in api.wait_calls), api.wait_calls)

    def test_a_pipe_busy_past_the_timeout_times_out(self) -> None:
        api = FakeWinapi()
        api.create_results = [ERROR_PIPE_BUSY] * 1000

        def slow_wait(name: str, timeout: int) -> None:
            api.wait_calls.append(timeout)
            time.sleep(0.01)
            raise win_error(ERROR_SEM_TIMEOUT)

        api.WaitNamedPipe = slow_wait  # type: ignore[method-assign]
        with self.assertRaises(socket.timeout):
            open_pipe(self.NAME, 0.05, api)
        self.assertGreaterEqual(len(api.wait_calls), 1)

    def test_no_pipe_fails_at_once(self) -> None:
        api = FakeWinapi()
        api.create_results = [ERROR_FILE_NOT_FOUND]
        with self.assertRaises(OSError) as cm:
            open_pipe(self.NAME, 5.0, api)
        self.assertEqual(getattr(cm.exception, "winerror", None), ERROR_FILE_NOT_FOUND)
        self.assertEqual(api.wait_calls, [])

    def test_a_pipe_that_vanishes_while_waited_for_is_not_found(self) -> None:
        api = FakeWinapi()
        api.create_results = [ERROR_PIPE_BUSY, ERROR_FILE_NOT_FOUND]
        api.wait_results = [ERROR_FILE_NOT_FOUND]
        with self.assertRaises(OSError) as cm:
            open_pipe(self.NAME, 5.0, api)
        self.assertEqual(getattr(cm.exception, "winerror", None), ERROR_FILE_NOT_FOUND)

    def test_without_windows_there_is_no_winapi(self) -> None:
        if _pipe._WINAPI is not None:
            self.skipTest("this is Windows")
        with self.assertRaises(OSError):
            open_pipe(self.NAME, 1.0)
        with self.assertRaises(OSError):
            PipeConnection(HANDLE)
        with self.assertRaises(OSError):
            _pipe.current_identity()


ME = PipeIdentity("S-1-5-21-1-2-3-1001", "S-1-5-21-1-2-3-1001", "HOST\\me")
OTHER = PipeIdentity("S-1-5-21-1-2-3-1002", "S-1-5-21-1-2-3-1002", "HOST\\other")
SERVICE = PipeIdentity(SYSTEM_SID, SYSTEM_SID, "NT AUTHORITY\\SYSTEM")
ELEVATED = PipeIdentity(OTHER.sid, ADMINISTRATORS_SID, "HOST\\other")


class FakeDaemon:
    """The daemon's end of a :class:`FakeWinapi`: answers Hello and Ping,
    each answer written in pieces (partial frames for the client)."""

    def __init__(self, api: FakeWinapi) -> None:
        self.api = api
        self.requests: List[Any] = []
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send_in_pieces(self, data: bytes) -> None:
        for i in range(0, len(data), 5):
            self.api.server_send(data[i : i + 5])

    def _serve(self) -> None:
        buffer = FrameBuffer(1 << 20)
        while not self.stop:
            with self.api.lock:
                self.api.written.wait_for(lambda: bool(self.api.outbound) or self.stop, 0.05)
                data = bytes(self.api.outbound)
                self.api.outbound.clear()
            buffer.feed(data)
            body = buffer.next_body()
            while body is not None:
                message = decode_client_message(body)
                self.requests.append(message)
                if isinstance(message, Hello):
                    welcome = Welcome(message.version, "fake", 7, Limits(1 << 20, 1024, 1024))
                    self._send_in_pieces(encode_frame(encode_server_message(welcome)))
                elif isinstance(message, RequestMessage) and isinstance(message.request, Ping):
                    self._send_in_pieces(encode_frame(encode_server_message(ResponseMessage(message.id, Pong()))))
                body = buffer.next_body()

    def close(self) -> None:
        self.stop = True
        self.thread.join(WAIT)


class ClientOverPipeTest(unittest.TestCase):
    """A whole ``Client`` on the Windows path (``transport.connect`` for
    ``"nt"``), over the fake pipe, with the identity calls faked."""

    PIPE = r"\\.\pipe\lockbroker-test"

    def setUp(self) -> None:
        self.api = FakeWinapi()
        self.addCleanup(lambda: self.assertEqual(self.api.misuse, []))
        self.server = ME
        patches: List["mock._patch[Any]"] = [
            mock.patch.object(_pipe, "_WINAPI", self.api),
            mock.patch.object(_pipe, "current_identity", lambda: ME),
            mock.patch.object(_pipe, "server_process_id", lambda handle: 4242),
            mock.patch.object(_pipe, "identity_of", lambda pid: self.server),
            # The client's connect, for Windows: the pipe, not AF_UNIX.
            mock.patch.object(_transport, "connect", functools.partial(_transport.connect, platform="nt")),
        ]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)

    def daemon(self) -> FakeDaemon:
        daemon = FakeDaemon(self.api)
        self.addCleanup(daemon.close)
        return daemon

    def test_a_session_over_the_pipe(self) -> None:
        daemon = self.daemon()
        client = Client(self.PIPE, client_name="piped", connect_timeout=WAIT, request_timeout=WAIT)
        self.addCleanup(client.close)
        self.assertEqual((client.session_id, client.server_version, client.path), (7, "fake", self.PIPE))
        client.ping()
        client.ping()
        self.assertEqual(daemon.requests[0], Hello(client_name="piped"))
        self.assertEqual([type(m.request) for m in daemon.requests[1:]], [Ping, Ping])
        # close() wakes the reader from its pending read; the handle is
        # closed once, after it.
        client.close()
        self.assertFalse(client._reader.is_alive())
        self.assertEqual(self.api.closed, [HANDLE])
        self.assertFalse(self.api.closed_with_pending)
        self.assertTrue(client.closed)

    def test_the_daemon_closing_the_pipe_ends_the_session(self) -> None:
        self.daemon()
        client = Client(self.PIPE, connect_timeout=WAIT, request_timeout=WAIT)
        self.addCleanup(client.close)
        client.ping()
        self.api.server_close()
        client._reader.join(WAIT)
        self.assertTrue(client.lost)
        self.assertIn("the daemon closed the connection", str(client.lost_reason))
        with self.assertRaises(ConnectionLost):
            client.ping()
        self.assertEqual(self.api.closed, [HANDLE])

    def test_an_untrusted_server_gets_nothing(self) -> None:
        self.server = OTHER
        with self.assertRaises(Untrusted) as cm:
            Client(self.PIPE, connect_timeout=WAIT)
        e = cm.exception
        self.assertEqual((e.problem, e.owner, e.path), ("server", OTHER.sid, self.PIPE))
        self.assertEqual(e.expected, (ME.sid, SYSTEM_SID, ADMINISTRATORS_SID))
        self.assertIn("runs as HOST\\other (%s)" % OTHER.sid, str(e))
        self.assertEqual(bytes(self.api.outbound), b"", "something was sent to an untrusted server")
        self.assertEqual((self.api.closed, self.api.open_handles), ([HANDLE], set()))
        # Opting in to that user's SID lets the session start.
        self.daemon()
        Client(self.PIPE, connect_timeout=WAIT, allow_sids=[OTHER.sid]).close()

    def test_the_scope_defaults_need_their_own_servers(self) -> None:
        # The global pipe: SYSTEM or an elevated process; never the user.
        address = Address(r"\\.\pipe\lockbroker", "scope", "global")
        for server, trusted in ((SERVICE, True), (ELEVATED, True), (ME, False), (OTHER, False)):
            self.server = server
            if trusted:
                _transport.connect(address, WAIT).close()
            else:
                with self.assertRaises(Untrusted):
                    _transport.connect(address, WAIT)
            # Every handle opened is closed again.
            self.assertEqual(self.api.open_handles, set())
        # The local pipe: the user only.
        address = Address(r"\\.\pipe\lockbroker-me", "scope", "local")
        for server, trusted in ((ME, True), (SERVICE, False), (ELEVATED, False)):
            self.server = server
            if trusted:
                _transport.connect(address, WAIT).close()
            else:
                with self.assertRaises(Untrusted):
                    _transport.connect(address, WAIT)

    def test_no_daemon_is_a_clear_error(self) -> None:
        self.api.create_results = [ERROR_FILE_NOT_FOUND]
        with self.assertRaises(ConnectFailed) as cm:
            Client(self.PIPE, connect_timeout=WAIT)
        self.assertIn("cannot connect to the lockbroker daemon at %s (explicit source)" % self.PIPE, str(cm.exception))


if __name__ == "__main__":
    unittest.main()

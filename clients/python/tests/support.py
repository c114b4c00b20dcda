"""Test helpers: a real daemon per test, bounded waits, background calls.

The daemon binary is taken from the ``LOCKBROKERD`` environment variable
(``cargo test`` sets it through ``broker/tests/python_client.rs``). Every
wait here has a deadline; nothing sleeps to synchronise: helpers wait on
sockets, futures, exit statuses, or poll ``inspect`` until a condition holds.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import lockbroker
from lockbroker import Client, set_default_client
from lockbroker.protocol import EntryInfo

#: Directory of the ``lockbroker`` package (for subprocesses' PYTHONPATH).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: The repository root (clients/python/tests -> repo).
REPO_ROOT = PACKAGE_ROOT.parent.parent
#: Seconds any single wait in a test may take before the test fails.
WAIT = 20.0
#: Seconds a whole test may take before the watchdog kills the process.
WATCHDOG = 90.0

T = TypeVar("T")


def daemon_binary() -> str:
    """The daemon's path from ``LOCKBROKERD``, or fail with what to do."""
    path = os.environ.get("LOCKBROKERD", "")
    if not path:
        raise AssertionError(
            "LOCKBROKERD is not set: point it at a built lockbrokerd, e.g. "
            "`CARGO_TARGET_DIR=/tmp/t cargo build -p lockbrokerd && "
            "LOCKBROKERD=/tmp/t/debug/lockbrokerd python3 -m unittest ...`, "
            "or run `cargo test -p lockbrokerd --test python_client`"
        )
    if not os.access(path, os.X_OK):
        raise AssertionError("LOCKBROKERD=%s is not an executable file" % path)
    return path


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` (with a short pause) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.005)


def spawn(fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
    """Run ``fn`` in a daemon thread; its result or exception goes to a Future."""
    future: "Future[T]" = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


#: The user and group ``nobody`` / ``nogroup``: the other user of the tests
#: that check whom the client trusts.
NOBODY = 65534


def nobody_kwargs() -> Dict[str, Any]:
    """``subprocess.Popen`` arguments that run the child as nobody:nogroup
    without supplementary groups (the caller must be root)."""
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


class Daemon:
    """A ``lockbrokerd`` on a private socket in a temporary directory.

    ``path``: serve this socket instead (its directory is the caller's).
    ``as_nobody``: run the daemon as nobody (needs root); its temporary
    directory is then nobody's.
    """

    def __init__(self, *extra_args: str, path: Optional[str] = None, as_nobody: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="lockbroker-py-")
        self.path = path or os.path.join(self.dir, "broker.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self._log = open(self.log_path, "wb")
        user: Dict[str, Any] = {}
        if as_nobody:
            os.chown(self.dir, NOBODY, NOBODY)
            user = nobody_kwargs()
        self.proc = subprocess.Popen(
            [daemon_binary(), "--socket", self.path, *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            **user,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Wait until the socket accepts a connection (bounded)."""
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("lockbrokerd exited with %s:\n%s" % (self.proc.returncode, self.log()))
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("lockbrokerd did not listen on %s:\n%s" % (self.path, self.log()))
                time.sleep(0.005)
            finally:
                probe.close()

    def log(self) -> str:
        """The daemon's output so far."""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> int:
        """SIGTERM, then wait for the exit (SIGKILL if it hangs); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)
                raise AssertionError("lockbrokerd ignored SIGTERM:\n%s" % self.log())
        return self.proc.returncode

    def cleanup(self) -> None:
        """Stop the daemon and remove its directory."""
        try:
            self.stop()
        finally:
            self._log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class DaemonTestCase(unittest.TestCase):
    """A test case with its own daemon (``self.daemon``) and a watchdog.

    ``DAEMON_ARGS``: extra ``lockbrokerd`` flags for every test of the class.
    """

    DAEMON_ARGS: Tuple[str, ...] = ()

    def setUp(self) -> None:
        self.daemon = Daemon(*self.DAEMON_ARGS)
        self.addCleanup(self.daemon.cleanup)
        # If a test hangs despite its own deadlines, dump every thread's
        # stack, kill the daemon and end the process rather than hang.
        watchdog = threading.Timer(WATCHDOG, self._watchdog_fired)
        watchdog.daemon = True
        watchdog.start()
        self.addCleanup(watchdog.cancel)
        self._clients: List[Client] = []

    def _watchdog_fired(self) -> None:
        sys.stderr.write("\nWATCHDOG: %s still running after %.0f s; stacks:\n" % (self.id(), WATCHDOG))
        faulthandler.dump_traceback(all_threads=True)
        self.daemon.proc.kill()
        shutil.rmtree(self.daemon.dir, ignore_errors=True)
        os._exit(3)

    def tearDown(self) -> None:
        for client in self._clients:
            client.close()

    def client(self, name: str = "test") -> Client:
        """A new session with this test's daemon, closed after the test."""
        client = Client(self.daemon.path, client_name=name, connect_timeout=WAIT, request_timeout=WAIT)
        self._clients.append(client)
        return client

    def entry(self, client: Client, name: str) -> Optional[EntryInfo]:
        """The daemon's entry for exactly ``name``, or None."""
        for entry in client.inspect(name).entries:
            if entry.name == name:
                return entry
        return None

    def waiter_count(self, client: Client, name: str) -> int:
        """How many acquires wait on ``name``."""
        entry = self.entry(client, name)
        return 0 if entry is None else len(entry.waiters)

    def wait_waiters(self, client: Client, name: str, count: int) -> None:
        """Wait until exactly ``count`` acquires wait on ``name``."""
        wait_until(lambda: self.waiter_count(client, name) == count, "%d waiter(s) on %r" % (count, name))


class DefaultClientTestCase(DaemonTestCase):
    """A daemon test whose process-wide default client points at this
    test's daemon (through ``LOCKBROKER_SOCKET``), fresh for every test."""

    def setUp(self) -> None:
        super().setUp()
        self._saved_env = os.environ.get("LOCKBROKER_SOCKET")
        os.environ["LOCKBROKER_SOCKET"] = self.daemon.path
        set_default_client(None)

    def tearDown(self) -> None:
        client = lockbroker.client._default
        set_default_client(None)
        if client is not None:
            client.close()
        if self._saved_env is None:
            os.environ.pop("LOCKBROKER_SOCKET", None)
        else:
            os.environ["LOCKBROKER_SOCKET"] = self._saved_env
        super().tearDown()


def python_subprocess(code: str, *args: str) -> "subprocess.Popen[bytes]":
    """Start ``python -c code args`` with this package importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def read_line(proc: "subprocess.Popen[bytes]", timeout: float = WAIT) -> str:
    """One line of ``proc``'s stdout, waiting at most ``timeout``."""
    assert proc.stdout is not None
    future = spawn(proc.stdout.readline)
    try:
        line = future.result(timeout=timeout)
    except Exception:
        proc.kill()
        _, err = proc.communicate(timeout=WAIT)
        raise AssertionError("no line from the subprocess; stderr:\n%s" % err.decode("utf-8", "replace"))
    if not line:
        _, err = proc.communicate(timeout=WAIT)
        raise AssertionError("the subprocess ended early; stderr:\n%s" % err.decode("utf-8", "replace"))
    return line.decode("utf-8").strip()

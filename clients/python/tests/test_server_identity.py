"""Whom the client trusts to serve the socket (PROTOCOL.md section 1).

The other user is ``nobody``: as root, these tests run a daemon (the
attacker) or the client itself as nobody; otherwise they skip those parts
(unittest reports the skips with their reason).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from typing import Iterator, Optional, Sequence
from unittest import mock

from lockbroker import Client, Untrusted

from .support import NOBODY, PACKAGE_ROOT, WAIT, WATCHDOG, Daemon, nobody_kwargs

IS_ROOT = os.geteuid() == 0


class ServerIdentityTest(unittest.TestCase):
    def setUp(self) -> None:
        watchdog = threading.Timer(WATCHDOG, lambda: os._exit(3))
        watchdog.daemon = True
        watchdog.start()
        self.addCleanup(watchdog.cancel)

    def need_root(self, what: str) -> None:
        if not IS_ROOT:
            self.skipTest("%s: running a process as another user needs root" % what)

    def daemon(self, path: Optional[str] = None, as_nobody: bool = False) -> Daemon:
        daemon = Daemon(path=path, as_nobody=as_nobody)
        self.addCleanup(daemon.cleanup)
        return daemon

    def runtime(self) -> str:
        """A fresh XDG_RUNTIME_DIR that every user may traverse."""
        runtime = tempfile.mkdtemp(prefix="lockbroker-py-xdg-")
        self.addCleanup(shutil.rmtree, runtime, True)
        os.chmod(runtime, 0o755)
        return runtime

    def local_dir(self, runtime: str, owner: int, mode: int) -> str:
        """``runtime/lockbroker`` with ``mode``, given to ``owner``."""
        directory = os.path.join(runtime, "lockbroker")
        os.mkdir(directory)
        os.chmod(directory, mode)
        os.chown(directory, owner, owner)
        return directory

    def local_env(self, runtime: str) -> "mock._patch_dict":
        env = {k: v for k, v in os.environ.items() if k != "LOCKBROKER_SOCKET"}
        env["XDG_RUNTIME_DIR"] = runtime
        return mock.patch.dict(os.environ, env, clear=True)

    def connect(self, path: Optional[str] = None, allow_uids: Sequence[int] = ()) -> Client:
        client = Client(path, connect_timeout=WAIT, allow_uids=allow_uids)
        self.addCleanup(client.close)
        return client

    def test_an_explicit_socket_of_another_user_needs_allow_uids(self) -> None:
        self.need_root("the explicit socket of another user")
        attacker = self.daemon(as_nobody=True)
        with self.assertRaises(Untrusted) as cm:
            self.connect(attacker.path)
        e = cm.exception
        self.assertEqual((e.problem, e.owner, e.path), ("server", NOBODY, attacker.path))
        self.assertEqual(e.expected, (0,))
        self.assertIn("the daemon at %s runs as uid 65534, expected uid 0" % attacker.path, str(e))
        with mock.patch.dict(os.environ, {"LOCKBROKER_SOCKET": attacker.path}):
            with self.assertRaises(Untrusted):
                self.connect()
        self.connect(attacker.path, allow_uids=[NOBODY]).ping()

    def test_a_local_directory_of_another_user_is_refused(self) -> None:
        self.need_root("a local directory owned by another user")
        # The attack: nobody made our scope directory first and serves there.
        runtime = self.runtime()
        directory = self.local_dir(runtime, NOBODY, 0o700)
        self.daemon(os.path.join(directory, "broker.sock"), as_nobody=True)
        with self.local_env(runtime):
            for allowed in ([], [NOBODY]):
                with self.assertRaises(Untrusted) as cm:
                    self.connect(allow_uids=allowed)
                e = cm.exception
                self.assertEqual((e.problem, e.owner, e.path), ("owner", NOBODY, directory))
                self.assertIn("directory %s is owned by uid 65534" % directory, str(e))

    def test_a_local_directory_open_to_others_is_refused(self) -> None:
        runtime = self.runtime()
        directory = self.local_dir(runtime, os.geteuid(), 0o777)
        self.daemon(os.path.join(directory, "broker.sock"), as_nobody=IS_ROOT)
        with self.local_env(runtime):
            with self.assertRaises(Untrusted) as cm:
                self.connect()
        self.assertEqual(cm.exception.problem, "mode")
        self.assertIn("its mode is 0777", str(cm.exception))

    def test_a_daemon_of_another_user_in_our_directory_is_refused(self) -> None:
        self.need_root("a socket of another user in the user's directory")
        # The directory passes; only the peer credentials tell. nobody
        # binds in its own directory; root moves the socket into its own.
        runtime = self.runtime()
        directory = self.local_dir(runtime, os.geteuid(), 0o700)
        attacker = self.daemon(as_nobody=True)
        sock = os.path.join(directory, "broker.sock")
        os.rename(attacker.path, sock)
        with self.local_env(runtime):
            with self.assertRaises(Untrusted) as cm:
                self.connect()
            self.assertEqual((cm.exception.problem, cm.exception.owner), ("server", NOBODY))
            self.connect(allow_uids=[NOBODY]).ping()

    def test_a_same_user_local_daemon_is_accepted(self) -> None:
        runtime = self.runtime()
        directory = self.local_dir(runtime, os.geteuid(), 0o700)
        self.daemon(os.path.join(directory, "broker.sock"))
        with self.local_env(runtime):
            self.connect().ping()

    @unittest.skipIf(os.name == "nt", "lockbroker.aio speaks over Unix sockets only")
    def test_the_asyncio_client_makes_the_same_checks(self) -> None:
        from lockbroker import aio

        async def ping(path: Optional[str] = None, allow_uids: Sequence[int] = ()) -> None:
            client = aio.Client(path, connect_timeout=WAIT, allow_uids=allow_uids)
            try:
                await client.connect()
                await client.ping()
            finally:
                await client.close()

        # The scope directory, before connecting: Untrusted, as the
        # threading client raises (not a plain ConnectFailed).
        runtime = self.runtime()
        directory = self.local_dir(runtime, os.geteuid(), 0o777)
        self.daemon(os.path.join(directory, "broker.sock"), as_nobody=IS_ROOT)
        with self.local_env(runtime):
            with self.assertRaises(Untrusted) as cm:
                asyncio.run(ping())
        self.assertEqual((cm.exception.problem, cm.exception.path), ("mode", directory))
        if not IS_ROOT:
            return
        # The daemon's user, after connecting.
        attacker = self.daemon(as_nobody=True)
        with self.assertRaises(Untrusted) as cm:
            asyncio.run(ping(attacker.path))
        self.assertEqual((cm.exception.problem, cm.exception.owner), ("server", NOBODY))
        asyncio.run(ping(attacker.path, allow_uids=[NOBODY]))

    def test_an_unprivileged_client_gets_the_same_checks(self) -> None:
        self.need_root("running the client as nobody")
        python = self._python_for_nobody()
        code = (
            "import lockbroker\n"
            "try:\n"
            "    lockbroker.Client(connect_timeout=%r).ping()\n"
            "    print('ok')\n"
            "except lockbroker.Untrusted as e:\n"
            "    print(e.problem, e.owner)\n" % WAIT
        )
        # Root's directory where nobody's should be, root's daemon in it.
        runtime = self.runtime()
        directory = self.local_dir(runtime, 0, 0o700)
        self.daemon(os.path.join(directory, "broker.sock"))
        self.assertEqual(self._run_as_nobody(python, code, runtime), "owner 0")
        # nobody's own daemon in nobody's own directory.
        runtime = self.runtime()
        directory = self.local_dir(runtime, NOBODY, 0o700)
        self.daemon(os.path.join(directory, "broker.sock"), as_nobody=True)
        self.assertEqual(self._run_as_nobody(python, code, runtime), "ok")

    def _python_for_nobody(self) -> str:
        """A Python interpreter nobody may run (ours may sit under /root)."""
        for python in self._pythons():
            try:
                probe = subprocess.run(
                    [python, "-c", "import sys; assert sys.version_info >= (3, 9)"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd="/",
                    timeout=WAIT,
                    **nobody_kwargs(),
                )
            except PermissionError:
                continue
            if probe.returncode == 0:
                return python
        self.skipTest("running the client as nobody: no Python 3.9+ that nobody may run")

    @staticmethod
    def _pythons() -> Iterator[str]:
        yield sys.executable
        for name in ("/usr/bin/python3", "/usr/local/bin/python3"):
            if os.path.exists(name):
                yield name

    def _run_as_nobody(self, python: str, code: str, runtime: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "LOCKBROKER_SOCKET"}
        env.update(XDG_RUNTIME_DIR=runtime, PYTHONPATH=str(PACKAGE_ROOT))
        out = subprocess.run(
            [python, "-c", code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            cwd="/",
            timeout=WAIT,
            **nobody_kwargs(),
        )
        self.assertEqual(out.returncode, 0, out.stderr.decode("utf-8", "replace"))
        return out.stdout.decode().strip()


if __name__ == "__main__":
    unittest.main()

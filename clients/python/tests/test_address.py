"""Address resolution and directory checks (PROTOCOL.md section 1), and timeout conversion; no daemon."""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest

from lockbroker import ConnectFailed, Untrusted
from lockbroker.address import GLOBAL, LOCAL, Address, default_path, expected_server, resolve
from lockbroker.client import Client
from lockbroker.primitives import _lock_timeout_ms, _semaphore_timeout_ms


class ResolveTest(unittest.TestCase):
    """explicit > LOCKBROKER_SOCKET > scope default."""

    def test_explicit_wins(self) -> None:
        env = {"LOCKBROKER_SOCKET": "/env.sock", "XDG_RUNTIME_DIR": "/run/user/7"}
        self.assertEqual(resolve("/x.sock", LOCAL, env), Address("/x.sock", "explicit", LOCAL))

    def test_env_next(self) -> None:
        env = {"LOCKBROKER_SOCKET": "/env.sock", "XDG_RUNTIME_DIR": "/run/user/7"}
        self.assertEqual(resolve(None, LOCAL, env).path, "/env.sock")
        self.assertEqual(resolve(None, GLOBAL, env).path, "/env.sock")

    def test_empty_env_is_unset(self) -> None:
        env = {"LOCKBROKER_SOCKET": "", "XDG_RUNTIME_DIR": ""}
        self.assertEqual(resolve(None, LOCAL, env).path, "/tmp/lockbroker-%d/broker.sock" % os.getuid())

    def test_scope_defaults(self) -> None:
        self.assertEqual(default_path(LOCAL, {"XDG_RUNTIME_DIR": "/run/user/7"}), "/run/user/7/lockbroker/broker.sock")
        self.assertEqual(default_path(LOCAL, {}), "/tmp/lockbroker-%d/broker.sock" % os.getuid())
        self.assertEqual(default_path(GLOBAL, {"XDG_RUNTIME_DIR": "/run/user/7"}), "/run/lockbroker/broker.sock")
        with self.assertRaises(ValueError):
            default_path("galaxy", {})

    def _scope_dir(self, mode: int) -> str:
        """``TMP/lockbroker`` with ``mode``, removed after the test."""
        parent = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, parent, True)
        directory = os.path.join(parent, "lockbroker")
        os.mkdir(directory)
        os.chmod(directory, mode)
        return directory

    def test_the_local_default_needs_the_users_private_directory(self) -> None:
        me = os.geteuid()
        sock = os.path.join(self._scope_dir(0o700), "broker.sock")
        self.assertEqual(expected_server(Address(sock, "scope", LOCAL)), (me,))
        self.assertEqual(expected_server(Address(sock, "scope", LOCAL), allowed=[4242]), tuple(sorted((me, 4242))))
        # Our own directory, as another user sees it.
        with self.assertRaises(Untrusted) as cm:
            expected_server(Address(sock, "scope", LOCAL), user=me + 1)
        e = cm.exception
        self.assertEqual((e.problem, e.owner, e.expected, e.path), ("owner", me, (me + 1,), os.path.dirname(sock)))
        self.assertIn("is owned by uid %d, expected uid %d" % (me, me + 1), str(e))
        self.assertIsInstance(e, ConnectFailed)

        open_dir = self._scope_dir(0o777)
        with self.assertRaises(Untrusted) as cm:
            expected_server(Address(os.path.join(open_dir, "broker.sock"), "scope", LOCAL), allowed=[4242])
        self.assertEqual(cm.exception.problem, "mode")
        self.assertIn("its mode is 0777; it must be 0700", str(cm.exception))

    def test_a_symlink_is_not_a_scope_directory(self) -> None:
        directory = self._scope_dir(0o700)
        link = directory + "-link"
        os.symlink(directory, link)
        self.addCleanup(os.unlink, link)
        with self.assertRaises(Untrusted) as cm:
            expected_server(Address(os.path.join(link, "broker.sock"), "scope", LOCAL))
        self.assertEqual(cm.exception.problem, "symbolic_link")

    def test_a_missing_directory_is_left_to_the_connect(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            sock = os.path.join(d, "absent", "broker.sock")
            self.assertEqual(expected_server(Address(sock, "scope", LOCAL)), (os.geteuid(),))

    def test_the_global_default_trusts_root_and_the_directory_owner(self) -> None:
        sock = os.path.join(self._scope_dir(0o755), "broker.sock")
        self.assertEqual(expected_server(Address(sock, "scope", GLOBAL), user=4242), tuple(sorted({0, os.geteuid()})))
        with self.assertRaises(Untrusted) as cm:
            expected_server(Address(os.path.join(self._scope_dir(0o775), "broker.sock"), "scope", GLOBAL))
        self.assertEqual(cm.exception.problem, "mode")

    def test_an_explicit_address_trusts_the_user_and_root_only(self) -> None:
        for source in ("explicit", "env"):
            address = Address("/nonexistent/x.sock", source, LOCAL)
            self.assertEqual(expected_server(address, user=1000), (0, 1000))
            self.assertEqual(expected_server(address, user=1000, allowed=[65534]), (0, 1000, 65534))

    def test_no_daemon_is_a_clear_error(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "nobody.sock")
            with self.assertRaises(ConnectFailed) as cm:
                Client(path)
            self.assertIn(path, str(cm.exception))
            self.assertIsInstance(cm.exception, ConnectionError)


class TimeoutConversionTest(unittest.TestCase):
    """threading arguments to timeout_ms."""

    def test_lock(self) -> None:
        self.assertIsNone(_lock_timeout_ms(True, -1))
        self.assertEqual(_lock_timeout_ms(False, -1), 0)
        self.assertEqual(_lock_timeout_ms(True, 0), 0)
        self.assertEqual(_lock_timeout_ms(True, 0.0001), 1)  # rounded up: not a try
        self.assertEqual(_lock_timeout_ms(True, 0.29), 290)
        self.assertEqual(_lock_timeout_ms(True, 2), 2000)
        with self.assertRaises(OverflowError):
            _lock_timeout_ms(True, float("inf"))
        with self.assertRaises(ValueError):
            _lock_timeout_ms(True, float("nan"))

    def test_semaphore(self) -> None:
        self.assertIsNone(_semaphore_timeout_ms(True, None))
        self.assertEqual(_semaphore_timeout_ms(False, None), 0)
        self.assertEqual(_semaphore_timeout_ms(True, -5), 0)
        self.assertEqual(_semaphore_timeout_ms(True, 0.0001), 1)


if __name__ == "__main__":
    unittest.main()

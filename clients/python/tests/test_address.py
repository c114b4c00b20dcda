"""Address resolution (PROTOCOL.md section 1) and timeout conversion; no daemon."""

from __future__ import annotations

import os
import tempfile
import unittest

from lockbroker import ConnectFailed
from lockbroker.address import GLOBAL, LOCAL, Address, check_local_owner, default_path, resolve
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

    def test_local_owner_checked_for_the_default_only(self) -> None:
        # "/" belongs to root; refuse it unless we are root.
        default = Address("/broker.sock", "scope", LOCAL)
        if os.getuid() != 0:
            with self.assertRaises(PermissionError):
                check_local_owner(default)
        check_local_owner(Address("/broker.sock", "explicit", LOCAL))
        check_local_owner(Address("/broker.sock", "scope", GLOBAL))
        with tempfile.TemporaryDirectory() as d:
            check_local_owner(Address(os.path.join(d, "broker.sock"), "scope", LOCAL))

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

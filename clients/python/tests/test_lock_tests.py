"""CPython's own tests of its locks (``test.lock_tests``), run against
lockbroker's :class:`~lockbroker.Lock`, :class:`~lockbroker.RLock` and
:class:`~lockbroker.BoundedSemaphore`: the objects claim to behave like
``threading``'s, and these are the tests ``threading`` itself passes.

Each test gets a daemon of its own and a default client pointing at it;
each object a name of its own (the suites make objects without a name).
``test.lock_tests`` ships with CPython's test package; where a Python lacks
it (Debian's ``libpython3-testsuite`` not installed) this module is
skipped, unless ``LOCKBROKER_REQUIRE_PYTHON=1`` makes that a failure.
"""

from __future__ import annotations

import itertools
import os
import unittest
from typing import Any

import lockbroker

from .support import DefaultClientTestCase

try:
    from test import lock_tests
except ImportError:  # pragma: no cover - depends on the Python install
    lock_tests = None

if lock_tests is None and os.environ.get("LOCKBROKER_REQUIRE_PYTHON") == "1":
    raise ImportError("test.lock_tests is missing (CPython's test package) and the suite is required")

_names = itertools.count()


def _name(kind: str) -> str:
    return "cpython/%s/%d" % (kind, next(_names))


if lock_tests is not None:

    class _OnDaemon(DefaultClientTestCase):
        """A daemon per test, then CPython's own set-up and checks."""

        def setUp(self) -> None:
            DefaultClientTestCase.setUp(self)
            lock_tests.BaseTestCase.setUp(self)  # type: ignore[arg-type]

        def tearDown(self) -> None:
            DefaultClientTestCase.tearDown(self)
            lock_tests.BaseTestCase.tearDown(self)  # type: ignore[arg-type]

    class LockTests(_OnDaemon, lock_tests.LockTests):  # type: ignore[misc]
        """``threading.Lock``'s tests."""

        @staticmethod
        def locktype() -> Any:
            return lockbroker.Lock(_name("lock"))

    class RLockTests(_OnDaemon, lock_tests.RLockTests):  # type: ignore[misc]
        """``threading.RLock``'s tests."""

        @staticmethod
        def locktype() -> Any:
            return lockbroker.RLock(_name("rlock"))

    class BoundedSemaphoreTests(_OnDaemon, lock_tests.BoundedSemaphoreTests):  # type: ignore[misc]
        """``threading.BoundedSemaphore``'s tests."""

        @staticmethod
        def semtype(value: int = 1) -> Any:
            return lockbroker.BoundedSemaphore(_name("semaphore"), value)

    class ConditionWithRLockTests(_OnDaemon, lock_tests.ConditionTests):  # type: ignore[misc]
        """``threading.Condition``'s tests, over a lockbroker RLock."""

        @staticmethod
        def condtype(lock: Any = None) -> Any:
            import threading

            return threading.Condition(lock if lock is not None else lockbroker.RLock(_name("condition")))


if __name__ == "__main__":
    unittest.main()

"""The client, primitives and state suites again with a reader thread, as
the client reads a Windows pipe: on a socket callers read for themselves
(``lockbroker.client`` says how), so without this the threaded path would
run only on Windows."""

from __future__ import annotations

import unittest
from typing import Any

import lockbroker.client

from . import test_client, test_primitives, test_state


class _WithReaderThread(unittest.TestSuite):
    """Runs its tests with clients that read in a thread of their own."""

    def run(self, result: Any, debug: bool = False) -> Any:
        previous = lockbroker.client._READ_IN_CALLER
        lockbroker.client._READ_IN_CALLER = False
        try:
            return super().run(result, debug)
        finally:
            lockbroker.client._READ_IN_CALLER = previous


def load_tests(loader: unittest.TestLoader, tests: unittest.TestSuite, pattern: Any) -> unittest.TestSuite:
    suite = _WithReaderThread()
    for module in (test_client, test_primitives, test_state):
        suite.addTests(loader.loadTestsFromModule(module))
    return suite

"""lockbroker.aio against a real daemon: the asyncio client's primitives,
state, watches, default connection per loop, connection loss, and
cancellation that never leaks a hold.

Each test has its own daemon (``DaemonTestCase``) and runs in its own event
loop (``IsolatedAsyncioTestCase``), bounded by ``TEST_BOUND`` seconds on top
of the watchdog. Waiters are confirmed queued by polling ``inspect`` with a
deadline, never by sleeping; the cancel-race tests yield to the loop a
varying number of times (``asyncio.sleep(0)``) only to vary where a cancel
lands, and check their invariants through ``inspect`` afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import signal
import socket
import tempfile
import threading
import time
import unittest
from typing import Any, Awaitable, Callable, List, Optional, Tuple, TypeVar
from unittest import mock

import lockbroker
from lockbroker import _common, aio
from lockbroker.errors import (
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    Deadlock,
    GuardNotHeld,
    NotHeld,
    InvalidRequest,
    LockTimeout,
    NoAnswer,
    VersionConflict,
)
from lockbroker.protocol import (
    PROTOCOL_VERSION,
    Acquire,
    AcquireAs,
    ChangeKind,
    EntryInfo,
    EntryKind,
    ErrorCode,
    ErrorInfo,
    Fatal,
    FrameBuffer,
    Grant,
    Granted,
    HolderInfo,
    Inspect,
    Inspection,
    Limits,
    LockKind,
    RequestMessage,
    ResponseMessage,
    ServerInfo,
    SessionInfo,
    Welcome,
    decode_client_message,
    encode_frame,
    encode_server_message,
)

from .support import WAIT, DaemonTestCase, python_subprocess, read_line

#: Seconds a whole test's coroutine may take (the watchdog is the last resort).
TEST_BOUND = 60.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def bounded(test: F) -> F:
    """Fail the test (``asyncio.TimeoutError``) if it runs past ``TEST_BOUND``."""

    @functools.wraps(test)
    async def run(self: Any) -> None:
        await asyncio.wait_for(test(self), TEST_BOUND)

    return run  # type: ignore[return-value]


class AioTestCase(DaemonTestCase, unittest.IsolatedAsyncioTestCase):
    """A daemon per test, aio clients closed after it, async inspect helpers."""

    def setUp(self) -> None:
        super().setUp()
        self._aclients: List[aio.Client] = []

    async def asyncSetUp(self) -> None:
        # The test loop runs in debug mode; the blocking helpers of the tests
        # (starting a subprocess) are not what it should report.
        asyncio.get_running_loop().slow_callback_duration = 1.0

    async def asyncTearDown(self) -> None:
        for client in self._aclients:
            await client.close()

    async def aclient(self, name: str = "test") -> aio.Client:
        """A new aio session with this test's daemon, closed after the test."""
        client = aio.Client(self.daemon.path, client_name=name, connect_timeout=WAIT, request_timeout=WAIT)
        self._aclients.append(client)
        return await client.connect()

    async def aentry(self, client: aio.Client, name: str) -> Optional[EntryInfo]:
        """The daemon's entry for exactly ``name``, or None."""
        for entry in (await client.inspect(name)).entries:
            if entry.name == name:
                return entry
        return None

    async def holders(self, client: aio.Client, name: str) -> List[Tuple[int, int]]:
        """``(session id, permits)`` of every hold of ``name``."""
        entry = await self.aentry(client, name)
        return [] if entry is None else [(h.session.session_id, h.permits) for h in entry.holders]

    async def waiters(self, client: aio.Client, name: str) -> List[int]:
        """The session id of every acquire waiting on ``name``, in queue order."""
        entry = await self.aentry(client, name)
        return [] if entry is None else [w.session.session_id for w in entry.waiters]

    async def until(self, predicate: Callable[[], Any], what: str) -> None:
        """Poll ``predicate`` (a plain or async function) until true; fail
        after ``WAIT`` seconds."""
        deadline = time.monotonic() + WAIT
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            if time.monotonic() > deadline:
                self.fail("timed out after %.0f s waiting for %s" % (WAIT, what))
            await asyncio.sleep(0.005)

    async def wait_waiters(self, client: aio.Client, name: str, count: int) -> None:
        """Wait until exactly ``count`` acquires wait on ``name``."""

        async def queued() -> bool:
            return len(await self.waiters(client, name)) == count

        await self.until(queued, "%d waiter(s) on %r" % (count, name))


class LockTest(AioTestCase):
    """aio.Lock: the threading Lock's semantics as coroutines."""

    @bounded
    async def test_acquire_release_and_async_with(self) -> None:
        client = await self.aclient()
        lock = aio.Lock("deploy/status", client)
        self.assertIsNone(lock.fence)
        self.assertTrue(await lock.acquire(timeout=WAIT))
        self.assertTrue(await lock.locked())
        self.assertTrue(lock.held)
        first = lock.fence
        assert first is not None
        self.assertFalse(lock.abandoned)
        self.assertEqual(await self.holders(client, "deploy/status"), [(client.session_id, 1)])
        await lock.release()
        self.assertFalse(await lock.locked())
        self.assertIsNone(await self.aentry(client, "deploy/status"))
        async with lock as acquired:
            self.assertTrue(acquired)
            self.assertGreater(lock.fence or 0, first)  # fences only grow
            self.assertEqual(await self.holders(client, "deploy/status"), [(client.session_id, 1)])
        self.assertFalse(lock.held)
        self.assertIsNone(await self.aentry(client, "deploy/status"))
        # The block's exception propagates, and the lock is released anyway.
        with self.assertRaises(KeyError):
            async with lock:
                raise KeyError("inside")
        self.assertIsNone(await self.aentry(client, "deploy/status"))

    @bounded
    async def test_metrics_count_the_hold(self) -> None:
        client = await self.aclient("metrics")
        self.assertTrue(await aio.Lock("counted", client).acquire(timeout=WAIT))
        text = await client.metrics()
        self.assertTrue(text.endswith("# EOF\n"), text)
        # The order of the lines is not fixed.
        self.assertIn('lockbroker_holds{kind="mutex"} 1', text.splitlines())

    @bounded
    async def test_an_unconnected_client_connects_on_first_use(self) -> None:
        client = aio.Client(self.daemon.path, client_name="lazy", connect_timeout=WAIT, request_timeout=WAIT)
        self._aclients.append(client)
        self.assertFalse(client.usable)
        lock = aio.Lock("lazy", client)
        self.assertTrue(await lock.acquire(timeout=WAIT))
        self.assertTrue(client.usable)
        self.assertEqual(await self.holders(client, "lazy"), [(client.session_id, 1)])
        await lock.release()

    @bounded
    async def test_locked_sees_other_sessions(self) -> None:
        a, b = await self.aclient("a"), await self.aclient("b")
        held = aio.Lock("x", a)
        self.assertTrue(await held.acquire(timeout=WAIT))
        other = aio.Lock("x", b)
        self.assertTrue(await other.locked())
        self.assertFalse(other.held)
        await held.release()
        self.assertTrue(await aio.Lock("x/y", a).acquire(timeout=WAIT))
        self.assertFalse(await other.locked())  # "x/y" is not "x"

    @bounded
    async def test_timeout_returns_false_and_holds_nothing(self) -> None:
        a, b = await self.aclient("a"), await self.aclient("b")
        holder = aio.Lock("t", a)
        self.assertTrue(await holder.acquire(timeout=WAIT))
        lock = aio.Lock("t", b)
        start = time.monotonic()
        self.assertFalse(await lock.acquire(timeout=0.2))
        self.assertGreaterEqual(time.monotonic() - start, 0.19)
        self.assertFalse(await lock.acquire(blocking=False))
        self.assertEqual(await self.waiters(b, "t"), [])
        self.assertEqual(await self.holders(b, "t"), [(a.session_id, 1)])
        with self.assertRaises(RuntimeError):
            await lock.release()
        await holder.release()
        self.assertIsNone(await self.aentry(b, "t"))

    @bounded
    async def test_timeout_is_sent_to_the_daemon_in_ms_rounded_up(self) -> None:
        a, b = await self.aclient("a"), await self.aclient("b")
        self.assertTrue(await aio.Lock("r", a).acquire(timeout=WAIT))
        waiting = asyncio.ensure_future(aio.Lock("r", b).acquire(timeout=WAIT + 0.0001))
        await self.wait_waiters(b, "r", 1)
        entry = await self.aentry(b, "r")
        assert entry is not None
        self.assertEqual(entry.waiters[0].timeout_ms, int(WAIT * 1000) + 1)
        await a.close()  # the holder's session ends: the waiter gets it
        self.assertTrue(await waiting)

    @bounded
    async def test_try_does_not_jump_the_queue(self) -> None:
        a, b, c = await self.aclient("a"), await self.aclient("b"), await self.aclient("c")
        holder = aio.Lock("q", a)
        self.assertTrue(await holder.acquire(timeout=WAIT))
        waiting = asyncio.ensure_future(aio.Lock("q", b).acquire(timeout=WAIT))
        await self.wait_waiters(c, "q", 1)
        self.assertFalse(await aio.Lock("q", c).acquire(blocking=False))
        await holder.release()
        self.assertTrue(await waiting)
        self.assertEqual(await self.holders(c, "q"), [(b.session_id, 1)])

    @bounded
    async def test_fifo_among_tasks_of_one_connection(self) -> None:
        observer = await self.aclient("observer")
        shared = await self.aclient("tasks")
        holder = aio.Lock("fifo", observer)
        self.assertTrue(await holder.acquire(timeout=WAIT))
        order: List[int] = []
        fences: List[int] = []

        async def wait_turn(i: int) -> None:
            lock = aio.Lock("fifo", shared)
            if not await lock.acquire(timeout=WAIT):
                raise AssertionError("waiter %d timed out" % i)
            order.append(i)
            fences.append(lock.fence or 0)
            await lock.release()

        tasks = []
        for i in range(6):
            tasks.append(asyncio.ensure_future(wait_turn(i)))
            # Queue them one at a time: the next starts once this one is queued.
            await self.wait_waiters(observer, "fifo", i + 1)
        await holder.release()
        await asyncio.gather(*tasks)
        self.assertEqual(order, list(range(6)))
        self.assertEqual(fences, sorted(fences))
        self.assertEqual(len(set(fences)), len(fences))

    @bounded
    async def test_many_tasks_one_connection_exclude_each_other(self) -> None:
        client = await self.aclient()
        lock = aio.Lock("counter", client)
        counter = [0]
        inside = [0]

        async def work() -> None:
            for _ in range(10):
                async with lock:
                    inside[0] += 1
                    self.assertEqual(inside[0], 1)
                    value = counter[0]
                    await asyncio.sleep(0)  # invite a task switch inside the critical section
                    counter[0] = value + 1
                    inside[0] -= 1

        await asyncio.gather(*(work() for _ in range(16)))
        self.assertEqual(counter[0], 160)
        self.assertIsNone(await self.aentry(client, "counter"))

    @bounded
    async def test_release_from_another_task(self) -> None:
        client = await self.aclient()
        lock = aio.Lock("handoff", client)
        self.assertTrue(await asyncio.ensure_future(lock.acquire(timeout=WAIT)))
        await lock.release()  # this task releases what the other task took
        self.assertIsNone(await self.aentry(client, "handoff"))

    @bounded
    async def test_grant_is_per_task(self) -> None:
        client = await self.aclient()
        sem = aio.BoundedSemaphore("per-task", 2, client)

        async def take() -> Optional[int]:
            self.assertTrue(await sem.acquire(timeout=WAIT))
            return sem.fence

        first, second = await asyncio.gather(take(), take())
        self.assertNotEqual(first, second)
        self.assertIsNone(sem.fence)  # this task took nothing through it
        await sem.release(2)

    @bounded
    async def test_argument_errors_like_threading(self) -> None:
        lock = aio.Lock("args", await self.aclient())
        for kwargs, message in [
            ({"blocking": False, "timeout": 1}, "can't specify a timeout for a non-blocking call"),
            ({"timeout": -2}, "timeout value must be a non-negative number"),
        ]:
            with self.subTest(**kwargs):
                with self.assertRaises(ValueError) as cm:
                    await lock.acquire(**kwargs)  # type: ignore[arg-type]
                self.assertEqual(str(cm.exception), message)
        with self.assertRaises(RuntimeError) as cm2:
            await lock.release()
        self.assertEqual(str(cm2.exception), "release unlocked lock")
        with self.assertRaises(TypeError):
            aio.Lock(b"bytes")  # type: ignore[arg-type]
        self.assertTrue(await lock.acquire(False, -1))
        await lock.release()

    @bounded
    async def test_not_reentrant(self) -> None:
        lock = aio.Lock("again", await self.aclient())
        self.assertTrue(await lock.acquire(timeout=WAIT))
        self.assertFalse(await lock.acquire(blocking=False))
        self.assertFalse(await lock.acquire(timeout=0.05))
        await lock.release()


class BoundedSemaphoreTest(AioTestCase):
    """aio.BoundedSemaphore: k of N, n at once, errors like threading."""

    @bounded
    async def test_k_of_n(self) -> None:
        observer = await self.aclient("observer")
        clients = [await self.aclient("t%d" % i) for i in range(5)]
        sems = [aio.BoundedSemaphore("pool", 3, c) for c in clients]
        tasks = [asyncio.ensure_future(s.acquire(timeout=WAIT)) for s in sems]

        def granted() -> int:
            return sum(t.done() for t in tasks)

        await self.until(lambda: granted() == 3, "three grants")
        await self.wait_waiters(observer, "pool", 2)
        entry = await self.aentry(observer, "pool")
        assert entry is not None
        self.assertEqual(entry.capacity, 3)
        done = [i for i, t in enumerate(tasks) if t.done()]
        self.assertEqual({clients[i].session_id for i in done}, {h.session.session_id for h in entry.holders})
        await sems[done[0]].release()
        await self.until(lambda: granted() == 4, "a fourth grant")
        await self.wait_waiters(observer, "pool", 1)
        self.assertEqual(len(await self.holders(observer, "pool")), 3)
        (last,) = [i for i, t in enumerate(tasks) if not t.done()]
        for i in [i for i, t in enumerate(tasks) if t.done() and i != done[0]]:
            self.assertTrue(tasks[i].result())
            await sems[i].release()
        self.assertTrue(await tasks[last])
        self.assertEqual(await self.holders(observer, "pool"), [(clients[last].session_id, 1)])
        await sems[last].release()
        self.assertIsNone(await self.aentry(observer, "pool"))

    @bounded
    async def test_permits(self) -> None:
        a, b = await self.aclient("a"), await self.aclient("b")
        sem_a = aio.BoundedSemaphore("pool", 3, a)
        sem_b = aio.BoundedSemaphore("pool", 3, b)
        self.assertTrue(await sem_a.acquire(timeout=WAIT, n=2))
        self.assertTrue(await sem_b.acquire(timeout=WAIT))
        self.assertFalse(await sem_b.acquire(blocking=False))
        self.assertFalse(await sem_b.acquire(timeout=0.05))
        self.assertEqual(await self.holders(a, "pool"), [(a.session_id, 2), (b.session_id, 1)])
        await sem_a.release()  # one of its two permits: the hold shrinks
        self.assertEqual(await self.holders(a, "pool"), [(a.session_id, 1), (b.session_id, 1)])
        async with sem_b:
            self.assertIsNotNone(sem_b.fence)
        await sem_a.release()
        await sem_b.release()
        self.assertIsNone(await self.aentry(a, "pool"))

    @bounded
    async def test_try_does_not_jump_the_queue(self) -> None:
        a, b, c = await self.aclient("a"), await self.aclient("b"), await self.aclient("c")
        self.assertTrue(await aio.BoundedSemaphore("sem", 3, a).acquire(timeout=WAIT, n=2))
        waiting = asyncio.ensure_future(aio.BoundedSemaphore("sem", 3, b).acquire(timeout=WAIT, n=2))
        await self.wait_waiters(c, "sem", 1)
        small = aio.BoundedSemaphore("sem", 3, c)
        # One permit is free, but b is queued first: no jumping, try or not.
        self.assertFalse(await small.acquire(blocking=False))
        self.assertFalse(await small.acquire(timeout=0.05))
        await aio.BoundedSemaphore("sem", 3, a).release(2)
        self.assertTrue(await waiting)
        self.assertTrue(await small.acquire(blocking=False))

    @bounded
    async def test_over_release_and_argument_errors(self) -> None:
        client = await self.aclient()
        sem = aio.BoundedSemaphore("over", 2, client)
        with self.assertRaises(ValueError) as cm:
            await sem.release()
        self.assertEqual(str(cm.exception), "Semaphore released too many times")
        self.assertTrue(await sem.acquire(timeout=WAIT))
        with self.assertRaises(ValueError):
            await sem.release(2)  # holds 1: nothing is released
        self.assertEqual(len(await self.holders(client, "over")), 1)
        await sem.release()
        with self.assertRaises(ValueError) as cm:
            await sem.acquire(blocking=False, timeout=1)
        self.assertEqual(str(cm.exception), "can't specify timeout for non-blocking acquire")
        with self.assertRaises(ValueError):
            await sem.release(0)
        with self.assertRaises(ValueError):
            await sem.acquire(n=3)
        with self.assertRaises(ValueError):
            aio.BoundedSemaphore("zero", 0)
        self.assertTrue(await sem.acquire(timeout=-1))  # a timeout <= 0 is a try
        await sem.release()

    @bounded
    async def test_capacity_mismatch(self) -> None:
        client = await self.aclient()
        self.assertTrue(await aio.BoundedSemaphore("cap", 2, client).acquire(timeout=WAIT))
        with self.assertRaises(InvalidRequest) as cm:
            await aio.BoundedSemaphore("cap", 3, client).acquire(timeout=WAIT)
        self.assertEqual(cm.exception.code, ErrorCode.CAPACITY_MISMATCH)


class RWLockTest(AioTestCase):
    """aio.RWLock: shared readers, one writer, writers not starved."""

    @bounded
    async def test_shared_and_exclusive(self) -> None:
        a, b, c = await self.aclient("a"), await self.aclient("b"), await self.aclient("c")
        rw_a, rw_b, rw_c = aio.RWLock("cfg", a), aio.RWLock("cfg", b), aio.RWLock("cfg", c)
        async with rw_a.shared() as g1, rw_b.shared(timeout=WAIT) as g2:
            self.assertLess(g1.fence, g2.fence)
            entry = await self.aentry(a, "cfg")
            assert entry is not None
            self.assertEqual(entry.kind, EntryKind.RWLOCK)
            self.assertEqual([h.kind for h in entry.holders], [LockKind.RW_SHARED] * 2)
            self.assertFalse(await rw_c.acquire_exclusive(blocking=False))
            with self.assertRaises(LockTimeout):
                async with rw_c.exclusive(timeout=0.05):
                    pass
        async with rw_c.exclusive(timeout=WAIT) as g3:
            self.assertGreater(g3.fence, g2.fence)
            self.assertEqual(rw_c.fence, g3.fence)
            self.assertFalse(await rw_a.acquire_shared(blocking=False))
        self.assertIsNone(await self.aentry(a, "cfg"))

    @bounded
    async def test_queued_writer_blocks_later_readers(self) -> None:
        a, b, c = await self.aclient("a"), await self.aclient("b"), await self.aclient("c")
        reader = aio.RWLock("doc", a)
        self.assertTrue(await reader.acquire_shared(timeout=WAIT))
        writer = aio.RWLock("doc", b)
        writing = asyncio.ensure_future(writer.acquire_exclusive(timeout=WAIT))
        await self.wait_waiters(c, "doc", 1)
        late_reader = aio.RWLock("doc", c)
        self.assertFalse(await late_reader.acquire_shared(blocking=False))
        late = asyncio.ensure_future(late_reader.acquire_shared(timeout=WAIT))
        await self.wait_waiters(c, "doc", 2)
        await reader.release_shared()
        self.assertTrue(await writing)
        self.assertFalse(late.done())
        await writer.release_exclusive()
        self.assertTrue(await late)
        await late_reader.release_shared()

    @bounded
    async def test_release_errors(self) -> None:
        rw = aio.RWLock("none", await self.aclient())
        with self.assertRaises(RuntimeError):
            await rw.release_shared()
        with self.assertRaises(RuntimeError):
            await rw.release_exclusive()
        self.assertTrue(await rw.acquire_shared(timeout=WAIT))
        self.assertTrue(await rw.acquire_shared(timeout=WAIT))  # same session, two readers
        await rw.release_shared()
        await rw.release_shared()
        with self.assertRaises(RuntimeError):
            await rw.release_shared()


class AbandonedTest(AioTestCase):
    """The abandoned flag reaches the next aio holder once."""

    @bounded
    async def test_killed_holder_process_is_abandoned(self) -> None:
        code = (
            "import asyncio, sys\n"
            "from lockbroker import aio\n"
            "async def main():\n"
            "    lock = aio.Lock('job', await aio.connect(sys.argv[1], client_name='holder'))\n"
            "    assert await lock.acquire(timeout=20)\n"
            "    print(lock.fence, flush=True)\n"
            "    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)\n"
            "asyncio.run(main())\n"
        )
        proc = python_subprocess(code, self.daemon.path)

        def reap() -> None:
            proc.kill()
            proc.communicate(timeout=WAIT)

        self.addCleanup(reap)
        holder_fence = int(await asyncio.get_running_loop().run_in_executor(None, read_line, proc))
        client = await self.aclient("waiter")
        lock = aio.Lock("job", client)

        async def take() -> Tuple[bool, Optional[int], bool]:
            return await lock.acquire(timeout=WAIT), lock.fence, lock.abandoned

        waiting = asyncio.ensure_future(take())
        await self.wait_waiters(client, "job", 1)
        proc.kill()  # SIGKILL: no chance to release
        acquired, fence, abandoned = await waiting
        self.assertTrue(acquired)
        self.assertTrue(abandoned)
        assert fence is not None
        self.assertGreater(fence, holder_fence)
        await lock.release()
        # The flag is reported once.
        self.assertTrue(await lock.acquire(timeout=WAIT))
        self.assertFalse(lock.abandoned)
        await lock.release()

    @bounded
    async def test_connection_closed_while_holding_is_abandoned(self) -> None:
        other = await self.aclient("other")
        client = await self.aclient("next")
        self.assertTrue(await aio.Lock("db", other).acquire(timeout=WAIT))
        waiting = asyncio.ensure_future(aio.Lock("db", client).acquire(timeout=WAIT))
        await self.wait_waiters(client, "db", 1)
        await other.close()
        self.assertTrue(await waiting)
        lock = aio.Lock("db", client)
        # A grant in another object: read the flag through a fresh acquire.
        entry = await self.aentry(client, "db")
        assert entry is not None
        self.assertEqual([h.session.session_id for h in entry.holders], [client.session_id])
        await client.release_by_name("db")
        self.assertTrue(await lock.acquire(timeout=WAIT))
        self.assertFalse(lock.abandoned)  # once only: the waiter's grant had it
        await lock.release()

    @bounded
    async def test_abandoned_flag_on_the_first_grant(self) -> None:
        other = await self.aclient("other")
        client = await self.aclient("next")
        self.assertTrue(await aio.Lock("flag", other).acquire(timeout=WAIT))
        await other.close()
        lock = aio.Lock("flag", client)
        self.assertTrue(await lock.acquire(timeout=WAIT))
        self.assertTrue(lock.abandoned)
        await lock.release()


class CancelTest(AioTestCase):
    """A cancelled acquire sends Cancel, releases a grant that raced it, and
    propagates CancelledError; the session never keeps a hold."""

    async def assert_holds_nothing(self, client: aio.Client, name: str) -> None:
        # Through the same session: the daemon reads its requests in order,
        # so this Inspect comes after any Release the cancel wrote.
        entry = await self.aentry(client, name)
        if entry is not None:
            self.assertNotIn(client.session_id, [h.session.session_id for h in entry.holders])
            self.assertNotIn(client.session_id, [w.session.session_id for w in entry.waiters])

    @bounded
    async def test_cancel_while_queued_sends_cancel(self) -> None:
        a, b = await self.aclient("a"), await self.aclient("b")
        holder = aio.Lock("c", a)
        self.assertTrue(await holder.acquire(timeout=WAIT))
        task = asyncio.ensure_future(aio.Lock("c", b).acquire())
        await self.wait_waiters(b, "c", 1)
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await task
        self.assertEqual(await self.waiters(b, "c"), [])
        await holder.release()
        self.assertIsNone(await self.aentry(b, "c"))
        self.assertEqual(b.orphans_released, 0)

    @bounded
    async def test_wait_for_timeout_leaks_nothing(self) -> None:
        # The workaround of the threading API's issue, on aio: no leak.
        a, b, c = await self.aclient("a"), await self.aclient("b"), await self.aclient("c")
        holder = aio.Lock("w", a)
        self.assertTrue(await holder.acquire(timeout=WAIT))
        lock = aio.Lock("w", b)
        with self.assertRaises(asyncio.TimeoutError):
            await asyncio.wait_for(lock.acquire(), 0.5)
        self.assertFalse(lock.held)
        self.assertEqual(await self.waiters(b, "w"), [])
        await holder.release()
        self.assertIsNone(await self.aentry(b, "w"))
        self.assertTrue(await aio.Lock("w", c).acquire(blocking=False))

    @bounded
    async def test_grant_that_raced_the_cancel_is_released(self) -> None:
        b, c = await self.aclient("b"), await self.aclient("c")
        lock = aio.Lock("raced", b)
        # The lock is free: the daemon grants the acquire as it reads it,
        # before the Cancel that follows; the grant wins the race.
        task = asyncio.ensure_future(lock.acquire())
        await asyncio.sleep(0)  # the task runs until its Acquire is written
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await task
        self.assertEqual(b.orphans_released, 1)
        self.assertFalse(lock.held)
        await self.assert_holds_nothing(b, "raced")
        self.assertIsNone(await self.aentry(b, "raced"))
        self.assertTrue(await aio.Lock("raced", c).acquire(blocking=False))

    @bounded
    async def test_cancelled_again_during_the_cleanup_still_releases_once(self) -> None:
        b, c = await self.aclient("b"), await self.aclient("c")
        task = asyncio.ensure_future(aio.Lock("twice", b).acquire())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)  # the task is now in its cleanup: cancel that too
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await task

        async def released() -> bool:
            return await self.aentry(b, "twice") is None

        await self.until(released, "the raced grant released")
        self.assertEqual(b.orphans_released, 1)
        self.assertTrue(await aio.Lock("twice", c).acquire(blocking=False))

    @bounded
    async def test_cancel_races_never_leak_a_hold(self) -> None:
        a, b, c = await self.aclient("a"), await self.aclient("b"), await self.aclient("c")
        holder = aio.Lock("race", a)
        lock = aio.Lock("race", b)
        outcomes = {"acquired": 0, "timed_out": 0, "cancelled": 0}
        rounds = 300
        for i in range(rounds):
            self.assertTrue(await holder.acquire(timeout=WAIT), "round %d: the holder is blocked (a leak)" % i)
            if i % 2 == 0:
                # asyncio.wait_for with a tiny timeout, 0.1 ms to 3 ms.
                timeout = 0.0001 * (1 + (i * 7) % 30)
                task = asyncio.ensure_future(asyncio.wait_for(lock.acquire(), timeout))
            else:
                task = asyncio.ensure_future(lock.acquire())
            for _ in range(i % 5):
                await asyncio.sleep(0)
            await holder.release()
            if i % 2 == 1:
                # A plain cancel, landing at a varying point after the release.
                for _ in range((i // 2) % 7):
                    await asyncio.sleep(0)
                task.cancel()
            try:
                got = await task
            except asyncio.TimeoutError:
                outcomes["timed_out"] += 1
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            else:
                self.assertTrue(got)
                outcomes["acquired"] += 1
                self.assertTrue(lock.held)
                await lock.release()
            self.assertFalse(lock.held)
            await self.assert_holds_nothing(b, "race")
        self.assertEqual(sum(outcomes.values()), rounds)
        self.assertIsNone(await self.aentry(b, "race"))
        self.assertTrue(await aio.Lock("race", c).acquire(blocking=False))
        # The races went more than one way (a timeout or cancel, and a grant).
        self.assertGreater(outcomes["timed_out"] + outcomes["cancelled"], 0, outcomes)
        self.assertGreater(outcomes["acquired"] + b.orphans_released, 0, outcomes)

    @bounded
    async def test_cancel_races_on_a_semaphore(self) -> None:
        a, b = await self.aclient("a"), await self.aclient("b")
        holder = aio.BoundedSemaphore("sem-race", 2, a)
        sem = aio.BoundedSemaphore("sem-race", 2, b)
        for i in range(100):
            self.assertTrue(await holder.acquire(timeout=WAIT, n=2))
            task = asyncio.ensure_future(asyncio.wait_for(sem.acquire(n=2), 0.0002 * (1 + i % 10)))
            for _ in range(i % 4):
                await asyncio.sleep(0)
            await holder.release(2)
            try:
                if await task:
                    await sem.release(2)
            except asyncio.TimeoutError:
                pass
            await self.assert_holds_nothing(b, "sem-race")
        self.assertIsNone(await self.aentry(b, "sem-race"))


class StateTest(AioTestCase):
    """aio.State: the threading State's operations as coroutines."""

    @bounded
    async def test_get_set_cas_remove(self) -> None:
        client = await self.aclient()
        state = client.state
        self.assertIs(state, client.state)
        self.assertIsNone(await state.get("cfg/mode"))
        v1 = await state.set("cfg/mode", "fast")
        item = await state.get("cfg/mode")
        assert item is not None
        self.assertEqual((item.value, item.version), (b"fast", v1))
        v2 = await state.set("cfg/mode", b"\x00\x01")
        self.assertGreater(v2, v1)
        with self.assertRaises(VersionConflict) as cm:
            await state.set("cfg/mode", "x", if_version=v1)
        self.assertEqual(cm.exception.current, v2)
        with self.assertRaises(VersionConflict):
            await state.set("cfg/mode", "x", if_version=0)
        self.assertFalse(await state.compare_and_set("cfg/mode", v1, "slow"))
        self.assertTrue(await state.compare_and_set("cfg/mode", v2, "slow"))
        self.assertTrue(await state.compare_and_set("cfg/new", 0, "created"))
        updated = await state.update("cfg/list", lambda old: (old or b"") + b",x")
        self.assertEqual(updated.value, b",x")
        removed = await state.remove("cfg/mode")
        assert removed is not None
        self.assertEqual(removed.value, b"slow")
        self.assertIsNone(await state.remove("cfg/mode"))
        await state.set_json("cfg/app", {"workers": 4})
        got = await state.get_json("cfg/app")
        assert got is not None
        self.assertEqual(got[0], {"workers": 4})
        keys = [e.key for e in await state.list("cfg/")]
        self.assertEqual(keys, ["cfg/app", "cfg/list", "cfg/new"])
        paged = await state.list("cfg/", values=True, page_size=1)
        self.assertEqual([e.value for e in paged], [b'{"workers":4}', b",x", b"created"])
        with self.assertRaises(InvalidRequest):
            await state.set("", "x")

    @bounded
    async def test_increment_from_many_tasks(self) -> None:
        client = await self.aclient()
        state = aio.State(client)
        self.assertEqual(await state.increment("hits"), 1)
        self.assertEqual(await state.increment("hits", -5), -4)
        await asyncio.gather(*(state.increment("hits") for _ in range(100)))
        value, version = await state.increment_versioned("hits", 0)
        self.assertEqual(value, 96)
        self.assertGreater(version, 0)
        await state.set("text", "abc")
        with self.assertRaises(lockbroker.NotAnInteger):
            await state.increment("text")

    @bounded
    async def test_guarded_writes(self) -> None:
        client = await self.aclient()
        state = client.state
        lock = aio.Lock("leader", client)
        async with lock:
            await state.set("leader/addr", "10.0.0.7", guard=lock)
            assert lock.grant is not None
            await state.set("leader/addr", "10.0.0.8", guard=lock.grant)
        with self.assertRaises(GuardNotHeld):
            await state.set("leader/addr", "10.0.0.9", guard=lock)
        item = await state.get("leader/addr")
        assert item is not None
        self.assertEqual(item.value, b"10.0.0.8")
        with self.assertRaises(ValueError):
            await state.set("k", "v", guard=aio.Lock("never", client))

    @bounded
    async def test_watch_as_async_iterator(self) -> None:
        watcher, writer = await self.aclient("watcher"), await self.aclient("writer")
        async with watcher.state.watch("cfg/", prefix=True) as changes:
            self.assertGreater(changes.id, 0)
            v1 = await writer.state.set("cfg/a", "1")
            await writer.state.remove("cfg/a")
            seen = []
            async for event in changes:
                seen.append(event)
                if len(seen) == 2:
                    break
        self.assertEqual(
            seen,
            [aio.Changed("cfg/a", v1, ChangeKind.SET, b"1"), aio.Changed("cfg/a", seen[1].version, ChangeKind.REMOVED)],  # type: ignore[union-attr]
        )
        self.assertTrue(changes.closed)
        self.assertIsNone(await changes.next_event(0))

    @bounded
    async def test_watch_next_event_timeout_replay_and_close(self) -> None:
        client = await self.aclient()
        state = client.state
        v1 = await state.set("job", "a")
        await state.set("job", "b")
        watch = await state.watch("job", from_version=v1, values=False)
        try:
            first = await watch.next_event(WAIT)
            second = await watch.next_event(WAIT)
            assert isinstance(first, aio.Changed) and isinstance(second, aio.Changed)
            self.assertEqual((first.version, first.value), (v1, None))
            self.assertGreater(second.version, v1)
            self.assertIsNone(await watch.next_event(0.05))  # nothing more
            waiting = asyncio.ensure_future(watch.next_event())
            await asyncio.sleep(0)
        finally:
            await watch.close()
        self.assertIsNone(await waiting)  # close ends a pending wait
        await state.set("job", "c")
        self.assertEqual(await client.ping() >= 0, True)

    @bounded
    async def test_cancelled_next_event_loses_nothing(self) -> None:
        client = await self.aclient()
        state = client.state
        async with state.watch("k") as watch:
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(watch.next_event(), 0.01)
            version = await state.set("k", "v")
            event = await watch.next_event(WAIT)
            assert isinstance(event, aio.Changed)
            self.assertEqual(event.version, version)

    @bounded
    async def test_session_end_ends_a_watch_after_its_events(self) -> None:
        watcher, writer = await self.aclient("watcher"), await self.aclient("writer")
        async with watcher.state.watch("k") as watch:
            version = await writer.state.set("k", "v")

            async def arrived() -> bool:
                return bool(watch._events and watch._events.items)

            await self.until(arrived, "the change to arrive")
            self.daemon.proc.kill()
            event = await watch.next_event(WAIT)
            assert isinstance(event, aio.Changed)
            self.assertEqual(event.version, version)
            with self.assertRaises(ConnectionLost):
                await watch.next_event(WAIT)


class DefaultClientTest(AioTestCase):
    """One connection per event loop, through LOCKBROKER_SOCKET."""

    def setUp(self) -> None:
        super().setUp()
        saved = os.environ.get("LOCKBROKER_SOCKET")
        os.environ["LOCKBROKER_SOCKET"] = self.daemon.path

        def restore() -> None:
            if saved is None:
                os.environ.pop("LOCKBROKER_SOCKET", None)
            else:
                os.environ["LOCKBROKER_SOCKET"] = saved

        self.addCleanup(restore)

    async def asyncTearDown(self) -> None:
        client = aio._defaults.get(asyncio.get_running_loop())
        if client is not None:
            await client.close()
        await super().asyncTearDown()

    @bounded
    async def test_objects_of_one_loop_share_one_connection(self) -> None:
        first, second = aio.Lock("one"), aio.Lock("two")
        sem = aio.BoundedSemaphore("three", 2)
        self.assertTrue(await first.acquire(timeout=WAIT))
        self.assertTrue(await second.acquire(timeout=WAIT))
        self.assertTrue(await sem.acquire(timeout=WAIT))
        await aio.State().set("four", "x")
        clients = await asyncio.gather(*(aio.default_client() for _ in range(5)))
        client = clients[0]
        self.assertTrue(all(c is client for c in clients))
        sessions = {h.session.session_id for e in (await client.inspect()).entries for h in e.holders}
        self.assertEqual(sessions, {client.session_id})
        await first.release()
        await second.release()
        await sem.release()
        # An ended default is replaced on next use.
        await client.close()
        replacement = await aio.default_client()
        self.assertIsNot(replacement, client)
        self.assertTrue(replacement.usable)

    @bounded
    async def test_concurrent_first_uses_share_one_connect(self) -> None:
        locks = [aio.Lock("l%d" % i) for i in range(8)]
        self.assertEqual(await asyncio.gather(*(l.acquire(timeout=WAIT) for l in locks)), [True] * 8)
        client = await aio.default_client()
        entries = (await client.inspect("l")).entries
        self.assertEqual({h.session.session_id for e in entries for h in e.holders}, {client.session_id})
        self.assertEqual(len(entries), 8)

    @bounded
    async def test_a_second_loop_gets_its_own(self) -> None:
        mine = aio.Lock("mine")
        self.assertTrue(await mine.acquire(timeout=WAIT))
        here = await aio.default_client()
        there: List[aio.Client] = []

        async def other_loop() -> Tuple[int, bool]:
            lock = aio.Lock("theirs")
            acquired = await lock.acquire(timeout=WAIT)
            client = await aio.default_client()
            there.append(client)
            # Its session is not the first loop's, which holds "mine".
            holders = (await client.inspect("mine")).entries[0].holders
            return client.session_id, acquired and holders[0].session.session_id != client.session_id

        session, ok = await asyncio.get_running_loop().run_in_executor(None, asyncio.run, other_loop())
        self.assertTrue(ok)
        self.assertNotEqual(session, here.session_id)
        # The other loop's end (asyncio.run cancels the reader task) ended
        # its connection, and with it its hold: abandoned, as any session
        # that ends holding.
        self.assertFalse(there[0].usable)

        async def freed() -> bool:
            # The daemon sees the other session's end in its own time.
            entry = await self.aentry(here, "theirs")
            assert entry is not None
            return not entry.holders

        await self.until(freed, "the other loop's hold to go")
        entry = await self.aentry(here, "theirs")
        assert entry is not None
        self.assertTrue(entry.abandoned)
        self.assertIs(await aio.default_client(), here)
        with self.assertRaises(ConnectionLost):
            await there[0].ping()  # its session is over

    @bounded
    async def test_a_client_is_bound_to_its_loop(self) -> None:
        client = await self.aclient()

        async def elsewhere() -> None:
            await client.ping()

        with self.assertRaises(RuntimeError) as cm:
            await asyncio.get_running_loop().run_in_executor(None, asyncio.run, elsewhere())
        self.assertIn("another event loop", str(cm.exception))
        self.assertGreaterEqual(await client.ping(), 0.0)


class DeadlockTest(AioTestCase):
    """Deadlock detection (protocol version 3, PROTOCOL.md 8.11): with
    ``detect_deadlocks`` each task acquires as its own actor, and the wait
    that would close a cycle is refused with ``deadlock``; off, it queues."""

    async def detecting(self, name: str, **kwargs: Any) -> aio.Client:
        """A new aio session that detects deadlocks, closed after the test."""
        client = aio.Client(
            self.daemon.path,
            client_name=name,
            connect_timeout=WAIT,
            request_timeout=WAIT,
            detect_deadlocks=True,
            **kwargs,
        )
        self._aclients.append(client)
        return await client.connect()

    async def opposite_orders(self, a: aio.Client, main: aio.Client, timeout_ms: Optional[int] = None) -> Any:
        """Task A takes x, the test's task takes y, A waits for y (seen
        queued), then the test's task asks for x: what that acquire returns
        (or raises, as the exception), once A has been served after it."""
        holds_y = await main.acquire("y", LockKind.MUTEX)
        assert holds_y is not None

        async def task_a() -> Grant:
            x = await a.acquire("x", LockKind.MUTEX)
            assert x is not None
            y = await a.acquire("y", LockKind.MUTEX)  # waits for main
            assert y is not None
            await a.release(y.hold_id)
            return x

        waiting = asyncio.ensure_future(task_a())
        await self.wait_waiters(main, "y", 1)  # A holds x, and waits for y
        try:
            outcome: Any = await main.acquire("x", LockKind.MUTEX, timeout_ms=timeout_ms)
        except Deadlock as e:
            outcome = e
        # Nothing else moved: no waiter on x, A holds it, A still waits.
        self.assertEqual(await self.waiters(main, "x"), [])
        self.assertEqual(await self.holders(main, "x"), [(a.session_id, 1)])
        self.assertEqual(len(await self.waiters(main, "y")), 1)
        self.assertFalse(waiting.done())
        # Main gives way; A is served.
        await main.release(holds_y.hold_id)
        x = await asyncio.wait_for(waiting, WAIT)
        await a.release(x.hold_id)
        return outcome

    @bounded
    async def test_opposite_orders_in_two_clients_one_is_refused(self) -> None:
        a, main = await self.detecting("task a"), await self.detecting("main")
        self.assertEqual(a.protocol_version, 4)
        self.assertTrue(a.detects_deadlocks and main.detects_deadlocks)
        refused = await self.opposite_orders(a, main)
        self.assertIsInstance(refused, Deadlock)
        self.assertIsInstance(refused, InvalidRequest)  # codes 2xx
        self.assertEqual((refused.code, refused.code_name), (ErrorCode.DEADLOCK, "deadlock"))
        self.assertIn('waiting for "x" would deadlock', refused.message)
        self.assertIn('"task a"', refused.message)
        # The session goes on, and x is free again.
        self.assertIsNotNone(await main.acquire("x", LockKind.MUTEX, timeout_ms=0))

    @bounded
    async def test_opposite_orders_in_one_client_one_is_refused(self) -> None:
        # Each task is its own actor, even in one shared session.
        shared = await self.detecting("shared")
        self.assertIsInstance(await self.opposite_orders(shared, shared), Deadlock)

    @bounded
    async def test_a_primitive_refused_raises_and_holds_nothing(self) -> None:
        client = await self.detecting("self")
        lock = aio.Lock("mine", client)
        self.assertTrue(await lock.acquire())
        with self.assertRaises(Deadlock):
            await lock.acquire(timeout=WAIT)  # not re-entrant: it could wait forever
        self.assertEqual(await self.holders(client, "mine"), [(client.session_id, 1)])
        self.assertEqual(await self.waiters(client, "mine"), [])
        await lock.release()

    @bounded
    async def test_a_command_runs_within_the_actors_from_the_environment(self) -> None:
        actor = 0xFEDCBA9876543210
        holder = await self.detecting("holder", actor=actor)
        with mock.patch.dict(os.environ, {"LOCKBROKER_ACTOR": "%016x" % actor}):
            command = aio.Client(self.daemon.path, connect_timeout=WAIT, detect_deadlocks=True)
        self._aclients.append(command)
        await command.connect()
        self.assertEqual(command.protocol_version, 4)
        self.assertTrue(await aio.Lock("held", holder).acquire())
        # A task of a command waiting for its wrapper's lock: a deadlock.
        with self.assertRaises(Deadlock):
            await asyncio.ensure_future(command.acquire("held", LockKind.MUTEX))
        # Two tasks of the command take a lock in turn: the second queues.
        self.assertTrue(await aio.Lock("inner", command).acquire())
        waiting = asyncio.ensure_future(command.acquire("inner", LockKind.MUTEX, timeout_ms=50))
        self.assertIsNone(await waiting)
        with self.assertRaises(ValueError):
            aio.Client(self.daemon.path, actor=0)

    @bounded
    async def test_without_detection_the_waits_queue(self) -> None:
        a, main = await self.aclient("a"), await self.aclient("main")
        self.assertFalse(a.detects_deadlocks or main.detects_deadlocks)

        async def x_waited_for() -> None:
            await self.wait_waiters(a, "x", 1)

        # Main's wait for x queues (behind A, which waits for main), seen
        # waiting there, until its timeout ends it.
        watcher = asyncio.ensure_future(x_waited_for())
        self.assertIsNone(await self.opposite_orders(a, main, timeout_ms=1000))
        await asyncio.wait_for(watcher, WAIT)


class ContentionTest(AioTestCase):
    """Contention events (protocol version 4, PROTOCOL.md 9.6) in aio."""

    @bounded
    async def test_a_holder_is_told_when_someone_waits(self) -> None:
        holder, other = await self.aclient("holder"), await self.aclient("other")
        grant = await holder.acquire("c", LockKind.MUTEX, notify_contended=True)
        assert grant is not None
        self.assertIsNone(await other.acquire("c", LockKind.MUTEX, timeout_ms=0))  # a try
        await holder.inspect()
        self.assertFalse(holder.contended(grant.hold_id))
        self.assertFalse(await holder.wait_contended(grant.hold_id, timeout=0.01))
        waiting = asyncio.ensure_future(other.acquire("c", LockKind.MUTEX))
        self.assertTrue(await holder.wait_contended(grant.hold_id))
        self.assertTrue(holder.contended(grant.hold_id))
        await holder.release(grant.hold_id)
        self.assertFalse(holder.contended(grant.hold_id))
        self.assertIsNotNone(await waiting)

    @bounded
    async def test_a_lock_made_to_notify_says_it_is_contended(self) -> None:
        holder, other = await self.aclient("holder"), await self.aclient("other")
        lock = aio.Lock("cl", holder, notify_contended=True)
        self.assertTrue(await lock.acquire())
        self.assertFalse(lock.contended)
        waiting = asyncio.ensure_future(aio.Lock("cl", other).acquire())
        self.assertTrue(await lock.wait_contended())
        self.assertTrue(lock.contended)
        await lock.release()
        self.assertTrue(await waiting)


class LeaseTest(AioTestCase):
    """Leases (protocol version 4, PROTOCOL.md 8.12) in aio."""

    @bounded
    async def test_a_lease_that_runs_out_revokes_the_hold(self) -> None:
        holder, other = await self.aclient("holder"), await self.aclient("other")
        grant = await holder.acquire("l", LockKind.MUTEX, lease_ms=3_600_000)
        assert grant is not None
        await holder.extend_lease(grant.hold_id, 20)
        nxt = await other.acquire("l", LockKind.MUTEX)
        assert nxt is not None
        self.assertTrue(nxt.abandoned)
        await holder.inspect()
        self.assertTrue(holder.revoked(grant.hold_id))
        with self.assertRaises(NotHeld):
            await holder.release(grant.hold_id)


class ConnectionLossTest(AioTestCase):
    """A session that ends fails every wait with ConnectionLost."""

    @bounded
    async def test_daemon_killed_mid_wait(self) -> None:
        a, b = await self.aclient("a"), await self.aclient("b")
        self.assertTrue(await aio.Lock("x", a).acquire(timeout=WAIT))
        lock = aio.Lock("x", b)
        waiting = asyncio.ensure_future(lock.acquire())
        await self.wait_waiters(b, "x", 1)
        self.daemon.proc.kill()
        with self.assertRaises(ConnectionLost):
            await waiting
        self.assertTrue(b.lost)
        self.assertFalse(b.usable)
        self.assertIsInstance(b.lost_reason, ConnectionLost)
        with self.assertRaises(ConnectionLost):
            await lock.acquire()
        with self.assertRaises(ConnectionLost):
            await b.state.get("k")

    @bounded
    async def test_daemon_stopped_mid_wait(self) -> None:
        # One session holds and waits: a daemon that closes sessions one by
        # one while stopping could otherwise grant the waiter another
        # session's hold just before closing the waiter's.
        b = await self.aclient("b")
        held = aio.Lock("x", b)
        self.assertTrue(await held.acquire(timeout=WAIT))
        waiting = asyncio.ensure_future(aio.Lock("x", b).acquire())
        await self.wait_waiters(b, "x", 1)
        await asyncio.get_running_loop().run_in_executor(None, self.daemon.stop)
        with self.assertRaises(ConnectionLost):  # DaemonShuttingDown is one too
            await waiting
        with self.assertRaises(ConnectionLost):
            await held.release()  # the hold went with the session

    @bounded
    async def test_close_fails_waiters_with_client_closed(self) -> None:
        a, b = await self.aclient("a"), await self.aclient("b")
        self.assertTrue(await aio.Lock("x", a).acquire(timeout=WAIT))
        waiting = asyncio.ensure_future(aio.Lock("x", b).acquire())
        await self.wait_waiters(b, "x", 1)
        await b.close()
        with self.assertRaises(ClientClosed):
            await waiting
        self.assertTrue(b.closed)
        self.assertFalse(b.lost)
        await self.wait_waiters(a, "x", 0)

    @bounded
    async def test_no_daemon(self) -> None:
        with self.assertRaises(ConnectFailed):
            await aio.connect(os.path.join(self.daemon.dir, "absent.sock"), connect_timeout=WAIT)

    @unittest.skipUnless(os.path.exists("/proc/self/stat"), "needs /proc to see the daemon stopped")
    @bounded
    async def test_request_timeout(self) -> None:
        client = await self.aclient()
        self.daemon.proc.send_signal(signal.SIGSTOP)  # the daemon answers nothing
        self.addCleanup(self.daemon.proc.send_signal, signal.SIGCONT)  # before the cleanup's SIGTERM

        def stopped() -> bool:
            # A signal is delivered asynchronously: wait until the kernel
            # shows the process stopped ("T"), else it may still answer.
            with open("/proc/%d/stat" % self.daemon.proc.pid) as f:
                return f.read().rpartition(")")[2].split()[0] == "T"

        await self.until(stopped, "the daemon to stop")
        with self.assertRaises(NoAnswer):
            await client.call(lockbroker.protocol.Ping(), timeout=0.1)
        self.daemon.proc.send_signal(signal.SIGCONT)
        self.assertGreaterEqual(await client.ping(), 0.0)  # the late Pong was ignored


class OldDaemonTest(unittest.IsolatedAsyncioTestCase):
    """A daemon of before protocol version 3 (or 2), by hand: it refuses a
    Hello of a later version with ``unsupported_version``, welcomes its own,
    answers an acquire with a grant and every other request with an
    Inspection of its version, and records what it was sent."""

    def fake_daemon(self, speaks: int) -> Tuple[str, List[int], List[object], threading.Thread]:
        """Serve a daemon of version ``speaks`` until a client's session
        ends: its socket, the Hello versions and the requests it got, and
        its thread."""
        self.session = SessionInfo(7, pid=77, uid=None, gid=None, client_name="before")
        holder = HolderInfo(self.session, hold_id=1, kind=LockKind.MUTEX, permits=1, fence=1, since_ms=0)
        entry = EntryInfo("old", EntryKind.MUTEX, 1, False, [holder], [])
        inspection = Inspection(ServerInfo("0.1.0", 1, 1, 1), [entry], False)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "old.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        listener.settimeout(WAIT)
        self.addCleanup(listener.close)
        versions: List[int] = []
        requests: List[object] = []

        def frames(conn: socket.socket) -> List[bytes]:
            buffer = FrameBuffer()
            while True:
                body = buffer.next_body()
                if body is not None:
                    return [body]
                data = conn.recv(65536)
                if not data:
                    return []
                buffer.feed(data)

        def serve() -> None:
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(WAIT)
                    (hello,) = frames(conn)
                    version = decode_client_message(hello).version  # type: ignore[union-attr]
                    versions.append(version)
                    if version > speaks:
                        refusal = ErrorInfo(ErrorCode.UNSUPPORTED_VERSION, "this daemon speaks %d" % speaks)
                        conn.sendall(encode_frame(encode_server_message(Fatal(refusal), 1)))
                        continue
                    welcome = Welcome(version, "0.1.0", 1, Limits(2097152, 1024, 65536))
                    conn.sendall(encode_frame(encode_server_message(welcome, version)))
                    for body in iter(lambda: frames(conn), []):
                        message = decode_client_message(body[0])
                        assert isinstance(message, RequestMessage)
                        requests.append(message.request)
                        answer: Any = inspection
                        if isinstance(message.request, _common.ACQUIRES):
                            answer = Granted(Grant(len(requests), len(requests), False))
                        reply = ResponseMessage(message.id, answer)
                        conn.sendall(encode_frame(encode_server_message(reply, version)))
                    return

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        return path, versions, requests, server

    @bounded
    async def test_the_client_falls_back_to_version_1(self) -> None:
        path, versions, _, server = self.fake_daemon(1)
        client = await aio.connect(
            path, client_name="new", connect_timeout=WAIT, request_timeout=WAIT, detect_deadlocks=True
        )
        try:
            self.assertEqual(client.protocol_version, 1)
            self.assertFalse(client.detects_deadlocks)
            seen = await client.inspect()
            self.assertEqual(seen.entries[0].holders[0].session, self.session)
        finally:
            await client.close()
        await asyncio.get_running_loop().run_in_executor(None, server.join, WAIT)
        self.assertEqual(versions, [PROTOCOL_VERSION, 3, 2, 1])

    @bounded
    async def test_the_client_falls_back_to_version_2_and_acquires_plainly(self) -> None:
        # A daemon of version 2 cannot decode AcquireAs: detection asked
        # for, acquires are plain ones all the same.
        path, versions, requests, server = self.fake_daemon(2)
        client = await aio.connect(
            path, client_name="new", connect_timeout=WAIT, request_timeout=WAIT, detect_deadlocks=True
        )
        try:
            self.assertEqual(client.protocol_version, 2)
            self.assertFalse(client.detects_deadlocks)
            self.assertIsNotNone(await client.acquire("x", LockKind.MUTEX))
            self.assertTrue(await aio.Lock("y", client).acquire(timeout=WAIT))
            seen = await client.inspect()
            self.assertEqual(seen.entries[0].holders[0].session, self.session)
        finally:
            await client.close()
        await asyncio.get_running_loop().run_in_executor(None, server.join, WAIT)
        self.assertEqual(versions, [4, 3, 2])
        self.assertEqual([type(r) for r in requests], [Acquire, Acquire, Inspect])

    @bounded
    async def test_the_client_falls_back_to_version_3_and_acquires_as_its_actor_alone(self) -> None:
        # A daemon of version 3 cannot decode AcquireWith: a command's
        # acquires name their actor, not the wrapper's.
        path, versions, requests, server = self.fake_daemon(3)
        with mock.patch.dict(os.environ, {"LOCKBROKER_ACTOR": "000000000000002a"}):
            client = await aio.connect(
                path, client_name="new", connect_timeout=WAIT, request_timeout=WAIT, detect_deadlocks=True
            )
        try:
            self.assertEqual(client.protocol_version, 3)
            self.assertTrue(client.detects_deadlocks)
            # Contention events need version 4: refused before anything is sent.
            with self.assertRaises(lockbroker.Unsupported):
                await client.acquire("z", LockKind.MUTEX, notify_contended=True)
            with self.assertRaises(lockbroker.Unsupported):
                await client.acquire("z", LockKind.MUTEX, lease_ms=1000)
            with self.assertRaises(lockbroker.Unsupported):
                await client.break_lock("z")
            with self.assertRaises(lockbroker.Unsupported):
                await client.extend_lease(1, 1000)
            self.assertTrue(await aio.Lock("y", client).acquire(timeout=WAIT))
        finally:
            await client.close()
        await asyncio.get_running_loop().run_in_executor(None, server.join, WAIT)
        self.assertEqual(versions, [4, 3])
        self.assertEqual([type(r) for r in requests], [AcquireAs])


class WindowsTest(unittest.TestCase):
    """On Windows the aio client refuses clearly, naming the threading one."""

    def test_not_implemented_on_windows(self) -> None:
        with mock.patch.object(aio.os, "name", "nt"):
            with self.assertRaises(NotImplementedError) as cm:
                aio.Client("/nowhere.sock")
        self.assertIn("lockbroker.Client", str(cm.exception))


if __name__ == "__main__":
    unittest.main()

"""Lock, BoundedSemaphore and RWLock against a real daemon.

Each test has its own daemon (``DaemonTestCase``). Waiters are confirmed
queued through ``inspect`` before the test goes on, never by sleeping.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time
import unittest
from typing import Any, List, Tuple

import lockbroker
from lockbroker import BoundedSemaphore, InvalidRequest, Lock, LockKind, RWLock

from .support import WAIT, DaemonTestCase, DefaultClientTestCase, python_subprocess, read_line, spawn


class LockTest(DaemonTestCase):
    """lockbroker.Lock behaves like threading.Lock, across processes."""

    def test_acquire_release(self) -> None:
        client = self.client()
        lock = Lock("deploy/status", client)
        self.assertIsNone(lock.fence)
        self.assertTrue(lock.acquire(timeout=WAIT))
        self.assertTrue(lock.locked())
        first = lock.fence
        assert first is not None
        self.assertFalse(lock.abandoned)
        entry = self.entry(client, "deploy/status")
        assert entry is not None
        self.assertEqual([h.session.session_id for h in entry.holders], [client.session_id])
        lock.release()
        self.assertFalse(lock.locked())
        self.assertIsNone(self.entry(client, "deploy/status"))
        with lock as acquired:
            self.assertTrue(acquired)
            self.assertGreater(lock.fence or 0, first)  # fences only grow
        self.assertFalse(lock.locked())

    def test_locked_sees_other_processes(self) -> None:
        a, b = self.client("a"), self.client("b")
        held = Lock("x", a)
        self.assertTrue(held.acquire(timeout=WAIT))
        other = Lock("x", b)
        self.assertTrue(other.locked())
        # "x/y" sorts after "x": a holder of "x/y" must not make "x" locked.
        held.release()
        Lock("x/y", a).acquire(timeout=WAIT)
        self.assertFalse(other.locked())

    def test_timeout_returns_false_and_holds_nothing(self) -> None:
        a, b = self.client("a"), self.client("b")
        holder = Lock("t", a)
        self.assertTrue(holder.acquire(timeout=WAIT))
        lock = Lock("t", b)
        start = time.monotonic()
        self.assertFalse(lock.acquire(timeout=0.2))
        self.assertGreaterEqual(time.monotonic() - start, 0.19)
        self.assertFalse(lock.acquire(blocking=False))
        entry = self.entry(b, "t")
        assert entry is not None
        self.assertEqual(entry.waiters, [])
        self.assertEqual([h.session.session_id for h in entry.holders], [a.session_id])
        with self.assertRaises(RuntimeError):
            lock.release()
        holder.release()
        self.assertIsNone(self.entry(b, "t"))

    def test_timeout_is_sent_in_ms_rounded_up(self) -> None:
        a, b = self.client("a"), self.client("b")
        Lock("r", a).acquire(timeout=WAIT)
        waiting = spawn(Lock("r", b).acquire, timeout=WAIT + 0.0001)
        self.wait_waiters(b, "r", 1)
        entry = self.entry(b, "r")
        assert entry is not None
        self.assertEqual(entry.waiters[0].timeout_ms, int(WAIT * 1000) + 1)
        a.close()  # ends the holder's session: the waiter gets it
        self.assertTrue(waiting.result(timeout=WAIT))

    def test_try_does_not_jump_the_queue(self) -> None:
        a, b, c = self.client("a"), self.client("b"), self.client("c")
        holder = Lock("q", a)
        holder.acquire(timeout=WAIT)
        waiter = Lock("q", b)
        waiting = spawn(waiter.acquire, timeout=WAIT)
        self.wait_waiters(c, "q", 1)
        self.assertFalse(Lock("q", c).acquire(blocking=False))
        holder.release()
        self.assertTrue(waiting.result(timeout=WAIT))
        entry = self.entry(c, "q")
        assert entry is not None
        self.assertEqual([h.session.session_id for h in entry.holders], [b.session_id])

    def test_release_from_another_thread(self) -> None:
        client = self.client()
        lock = Lock("handoff", client)
        self.assertTrue(spawn(lock.acquire, timeout=WAIT).result(timeout=WAIT))
        lock.release()  # main thread releases what the other thread took
        self.assertIsNone(self.entry(client, "handoff"))
        self.assertTrue(lock.acquire(timeout=WAIT))
        spawn(lock.release).result(timeout=WAIT)
        self.assertIsNone(self.entry(client, "handoff"))

    def test_many_threads_one_connection(self) -> None:
        client = self.client()
        lock = Lock("counter", client)
        counter = [0]
        threads, rounds = 16, 25

        def work() -> None:
            for _ in range(rounds):
                if not lock.acquire(timeout=WAIT):
                    raise AssertionError("acquire timed out")
                try:
                    value = counter[0]
                    time.sleep(0)  # invite a thread switch inside the critical section
                    counter[0] = value + 1
                finally:
                    lock.release()

        futures = [spawn(work) for _ in range(threads)]
        for future in futures:
            future.result(timeout=WAIT * 2)
        self.assertEqual(counter[0], threads * rounds)
        self.assertIsNone(self.entry(client, "counter"))

    def test_argument_errors_like_threading(self) -> None:
        lock = Lock("args", self.client())
        for kwargs, message in [
            ({"blocking": False, "timeout": 1}, "can't specify a timeout for a non-blocking call"),
            ({"timeout": -2}, "timeout value must be a non-negative number"),
        ]:
            with self.subTest(**kwargs):
                with self.assertRaises(ValueError) as cm:
                    lock.acquire(**kwargs)  # type: ignore[arg-type]
                self.assertEqual(str(cm.exception), message)
                with self.assertRaises(ValueError):  # threading agrees on the type
                    threading.Lock().acquire(**kwargs)  # type: ignore[arg-type]
        with self.assertRaises(RuntimeError) as cm2:
            lock.release()
        self.assertEqual(str(cm2.exception), "release unlocked lock")
        self.assertTrue(lock.acquire(False, -1))  # -1 is "no timeout" even when not blocking
        lock.release()

    def test_not_reentrant(self) -> None:
        lock = Lock("again", self.client())
        self.assertTrue(lock.acquire(timeout=WAIT))
        self.assertFalse(lock.acquire(blocking=False))
        self.assertFalse(lock.acquire(timeout=0.05))
        lock.release()

    def test_fifo_order(self) -> None:
        observer = self.client("observer")
        holder = Lock("fifo", observer)
        holder.acquire(timeout=WAIT)
        order: List[int] = []
        grants: List[Tuple[int, int]] = []
        futures = []

        def wait_turn(i: int, lock: Lock) -> None:
            if not lock.acquire(timeout=WAIT):
                raise AssertionError("waiter %d timed out" % i)
            order.append(i)
            grants.append((i, lock.fence or 0))
            lock.release()

        for i in range(6):
            client = self.client("w%d" % i)
            futures.append(spawn(wait_turn, i, Lock("fifo", client)))
            # Queue them one at a time: the next starts once this one is queued.
            self.wait_waiters(observer, "fifo", i + 1)
            entry = self.entry(observer, "fifo")
            assert entry is not None
            self.assertEqual(entry.waiters[-1].session.session_id, client.session_id)
        holder.release()
        for future in futures:
            future.result(timeout=WAIT)
        self.assertEqual(order, list(range(6)))
        fences = [fence for _, fence in grants]
        self.assertEqual(fences, sorted(fences))
        self.assertEqual(len(set(fences)), len(fences))

    def test_killed_holder_process_is_abandoned(self) -> None:
        code = (
            "import sys, lockbroker\n"
            "lock = lockbroker.Lock('job', lockbroker.Client(sys.argv[1], client_name='holder'))\n"
            "assert lock.acquire(timeout=20)\n"
            "print(lock.fence, flush=True)\n"
            "sys.stdin.read()\n"
        )
        proc = python_subprocess(code, self.daemon.path)

        def reap() -> None:
            proc.kill()
            proc.communicate(timeout=WAIT)

        self.addCleanup(reap)
        holder_fence = int(read_line(proc))
        client = self.client("waiter")
        lock = Lock("job", client)

        def take() -> Tuple[bool, object, bool]:
            return lock.acquire(timeout=WAIT), lock.fence, lock.abandoned

        waiting = spawn(take)
        self.wait_waiters(client, "job", 1)
        proc.kill()  # SIGKILL: no chance to release
        proc.wait(timeout=WAIT)
        acquired, fence, abandoned = waiting.result(timeout=WAIT)
        self.assertTrue(acquired)
        self.assertTrue(abandoned)
        assert isinstance(fence, int)
        self.assertGreater(fence, holder_fence)
        # The flag is reported once.
        spawn(lock.release).result(timeout=WAIT)
        self.assertTrue(lock.acquire(timeout=WAIT))
        self.assertFalse(lock.abandoned)
        lock.release()


class BoundedSemaphoreTest(DaemonTestCase):
    """lockbroker.BoundedSemaphore behaves like threading.BoundedSemaphore."""

    def test_permits(self) -> None:
        a, b = self.client("a"), self.client("b")
        sem_a = BoundedSemaphore("pool", 3, a)
        sem_b = BoundedSemaphore("pool", 3, b)
        self.assertTrue(sem_a.acquire(timeout=WAIT, n=2))
        self.assertTrue(sem_b.acquire(timeout=WAIT))
        self.assertFalse(sem_b.acquire(blocking=False))
        self.assertFalse(sem_b.acquire(timeout=0.05))
        entry = self.entry(a, "pool")
        assert entry is not None
        self.assertEqual(entry.capacity, 3)
        self.assertEqual([(h.session.session_id, h.permits) for h in entry.holders], [(a.session_id, 2), (b.session_id, 1)])
        sem_a.release()  # one of its two permits: the hold shrinks
        entry = self.entry(a, "pool")
        assert entry is not None
        self.assertEqual([h.permits for h in entry.holders], [1, 1])
        with sem_b:
            self.assertIsNotNone(sem_b.fence)
        sem_a.release()
        sem_b.release()
        self.assertIsNone(self.entry(a, "pool"))

    def test_try_does_not_jump_the_queue(self) -> None:
        a, b, c = self.client("a"), self.client("b"), self.client("c")
        self.assertTrue(BoundedSemaphore("sem", 3, a).acquire(timeout=WAIT, n=2))
        big = BoundedSemaphore("sem", 3, b)
        waiting = spawn(big.acquire, timeout=WAIT, n=2)
        self.wait_waiters(c, "sem", 1)
        small = BoundedSemaphore("sem", 3, c)
        # One permit is free, but b is queued first: no jumping, try or not.
        self.assertFalse(small.acquire(blocking=False))
        self.assertFalse(small.acquire(timeout=0.05))
        BoundedSemaphore("sem", 3, a).release(2)
        self.assertTrue(waiting.result(timeout=WAIT))
        self.assertTrue(small.acquire(blocking=False))

    def test_over_release(self) -> None:
        client = self.client()
        sem = BoundedSemaphore("over", 2, client)
        with self.assertRaises(ValueError) as cm:
            sem.release()
        self.assertEqual(str(cm.exception), "Semaphore released too many times")
        self.assertTrue(sem.acquire(timeout=WAIT))
        with self.assertRaises(ValueError):
            sem.release(2)  # holds 1: nothing is released
        entry = self.entry(client, "over")
        assert entry is not None
        self.assertEqual(len(entry.holders), 1)
        sem.release()
        with self.assertRaises(ValueError):
            threading.BoundedSemaphore(2).release()  # the same type as threading

    def test_argument_errors_like_threading(self) -> None:
        sem = BoundedSemaphore("args", 2, self.client())
        with self.assertRaises(ValueError) as cm:
            sem.acquire(blocking=False, timeout=1)
        self.assertEqual(str(cm.exception), "can't specify timeout for non-blocking acquire")
        with self.assertRaises(ValueError) as cm:
            sem.release(0)
        self.assertEqual(str(cm.exception), "n must be one or more")
        with self.assertRaises(ValueError):
            sem.acquire(n=3)
        with self.assertRaises(ValueError):
            BoundedSemaphore("zero", 0)
        # A negative timeout is a try, as in threading.Semaphore.
        self.assertTrue(sem.acquire(timeout=-1))
        sem.release()

    def test_capacity_mismatch(self) -> None:
        client = self.client()
        self.assertTrue(BoundedSemaphore("cap", 2, client).acquire(timeout=WAIT))
        with self.assertRaises(InvalidRequest) as cm:
            BoundedSemaphore("cap", 3, client).acquire(timeout=WAIT)
        self.assertEqual(cm.exception.code, lockbroker.ErrorCode.CAPACITY_MISMATCH)


class RWLockTest(DaemonTestCase):
    """lockbroker.RWLock: shared readers, one writer, writers not starved."""

    def test_shared_and_exclusive(self) -> None:
        a, b, c = self.client("a"), self.client("b"), self.client("c")
        rw_a, rw_b, rw_c = RWLock("cfg", a), RWLock("cfg", b), RWLock("cfg", c)
        with rw_a.shared() as g1, rw_b.shared(timeout=WAIT) as g2:
            self.assertLess(g1.fence, g2.fence)
            entry = self.entry(a, "cfg")
            assert entry is not None
            self.assertEqual(entry.kind, lockbroker.EntryKind.RWLOCK)
            self.assertEqual([h.kind for h in entry.holders], [LockKind.RW_SHARED] * 2)
            self.assertFalse(rw_c.acquire_exclusive(blocking=False))
            with self.assertRaises(lockbroker.LockTimeout):
                with rw_c.exclusive(timeout=0.05):
                    pass
        with rw_c.exclusive(timeout=WAIT) as g3:
            self.assertGreater(g3.fence, g2.fence)
            self.assertFalse(rw_a.acquire_shared(blocking=False))
        self.assertIsNone(self.entry(a, "cfg"))

    def test_queued_writer_blocks_later_readers(self) -> None:
        a, b, c = self.client("a"), self.client("b"), self.client("c")
        reader = RWLock("doc", a)
        self.assertTrue(reader.acquire_shared(timeout=WAIT))
        writer = RWLock("doc", b)
        writing = spawn(writer.acquire_exclusive, timeout=WAIT)
        self.wait_waiters(c, "doc", 1)
        late_reader = RWLock("doc", c)
        self.assertFalse(late_reader.acquire_shared(blocking=False))
        late = spawn(late_reader.acquire_shared, timeout=WAIT)
        self.wait_waiters(c, "doc", 2)
        reader.release_shared()
        self.assertTrue(writing.result(timeout=WAIT))
        self.assertFalse(late.done())
        spawn(writer.release_exclusive).result(timeout=WAIT)
        self.assertTrue(late.result(timeout=WAIT))
        late_reader.release_shared()

    def test_release_errors(self) -> None:
        rw = RWLock("none", self.client())
        with self.assertRaises(RuntimeError):
            rw.release_shared()
        with self.assertRaises(RuntimeError):
            rw.release_exclusive()
        self.assertTrue(rw.acquire_shared(timeout=WAIT))
        self.assertTrue(rw.acquire_shared(timeout=WAIT))  # same session, two readers
        rw.release_shared()
        rw.release_shared()
        with self.assertRaises(RuntimeError):
            rw.release_shared()


if __name__ == "__main__":
    unittest.main()


class RLockTest(DaemonTestCase):
    """lockbroker.RLock: re-entrant for the thread that holds it, one lock
    for every other thread and process (CPython's own RLock tests run in
    ``test_lock_tests``)."""

    def test_reentrant_for_its_thread_exclusive_for_others(self) -> None:
        client = self.client()
        rlock = lockbroker.RLock("nested", client)
        other = Lock("nested", self.client("other"))
        self.assertTrue(rlock.acquire(timeout=WAIT))
        with rlock:  # again, from the same thread
            self.assertEqual(rlock._recursion_count(), 2)
            self.assertFalse(other.acquire(blocking=False))
            # Another thread of the same object waits like anyone else.
            self.assertFalse(spawn(rlock.acquire, False).result(WAIT))
        entry = self.entry(client, "nested")
        assert entry is not None
        self.assertEqual(len(entry.holders), 1, "one daemon hold however deep")
        self.assertFalse(other.acquire(blocking=False), "still held once")
        rlock.release()
        self.assertTrue(other.acquire(blocking=False), "released by the last release")
        other.release()
        with self.assertRaises(RuntimeError):
            rlock.release()


def _hold_in_child(lock: Any, holding: Any, done: Any) -> None:
    """A ``spawn`` child: takes the unpickled lock on its own connection,
    says which session holds it, and keeps it until told."""
    lock.acquire()
    holding.put(lock.client.session_id)
    done.wait(WAIT)
    lock.release()


class PicklingTest(DefaultClientTestCase):
    """A pickled primitive is its name and settings: the unpickled object
    takes the same lock on the unpickling process's own connection."""

    def test_round_trip_keeps_name_and_settings_not_holds(self) -> None:
        sem = BoundedSemaphore("pool", 3)
        self.assertTrue(sem.acquire(timeout=WAIT))
        copy = pickle.loads(pickle.dumps(sem))
        self.assertIsInstance(copy, BoundedSemaphore)
        self.assertEqual((copy.name, copy.value), ("pool", 3))
        self.assertIn("value=3/3", repr(copy), "the copy holds nothing")
        sem.release()
        for obj in (Lock("a"), lockbroker.RLock("b"), RWLock("c")):
            copy = pickle.loads(pickle.dumps(obj))
            self.assertEqual((type(copy), copy.name), (type(obj), obj.name))

    def test_a_spawn_child_takes_the_same_lock_on_its_own_connection(self) -> None:
        context = multiprocessing.get_context("spawn")
        explicit = self.client("explicit")
        for lock in (Lock("shared/job"), Lock("shared/job", explicit)):
            holding, done = context.Queue(), context.Event()
            child = context.Process(target=_hold_in_child, args=(lock, holding, done))
            child.start()
            self.addCleanup(child.kill)
            session = holding.get(timeout=WAIT)
            self.assertNotIn(session, (lockbroker.default_client().session_id, explicit.session_id))
            entry = self.entry(explicit, "shared/job")
            assert entry is not None
            self.assertEqual([h.session.session_id for h in entry.holders], [session])
            self.assertFalse(lock.acquire(blocking=False), "the child's hold is the same lock")
            done.set()
            child.join(WAIT)
            self.assertEqual(child.exitcode, 0)
            self.assertTrue(lock.acquire(timeout=WAIT))
            lock.release()

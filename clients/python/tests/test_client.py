"""The Client: one connection for many threads, cancel, loss, fork, default client."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import tempfile
import threading
import time
import unittest
from unittest import mock

import lockbroker
from lockbroker import _common
from lockbroker import (
    ConnectionLost,
    Deadlock,
    InvalidRequest,
    Lock,
    LockKind,
    NotHeld,
    default_client,
)
from lockbroker.protocol import (
    PROTOCOL_VERSION,
    Acquire,
    AcquireAs,
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
    RequestMessage,
    ResponseMessage,
    ServerInfo,
    SessionInfo,
    Welcome,
    decode_client_message,
    encode_frame,
    encode_server_message,
)

from .support import WAIT, Daemon, DaemonTestCase, DefaultClientTestCase, spawn, wait_until


class ClientTest(DaemonTestCase):
    """Requests, errors, and threads sharing one session."""

    def test_handshake_and_ping(self) -> None:
        client = self.client("handshake")
        self.assertEqual(client.welcome.version, PROTOCOL_VERSION)
        self.assertGreaterEqual(client.limits.max_frame_len, 4096)
        self.assertGreaterEqual(client.ping(), 0.0)
        server = client.inspect().server
        self.assertEqual(server.version, client.server_version)
        self.assertEqual(server.pid, self.daemon.proc.pid)
        self.assertEqual(server.sessions, 1)

    def test_inspect_prefix_and_limit(self) -> None:
        client = self.client("inspector")
        for name in ["app/a", "app/b", "other"]:
            self.assertIsNotNone(client.acquire(name, LockKind.MUTEX, timeout_ms=0))
        self.assertEqual([e.name for e in client.inspect("app/").entries], ["app/a", "app/b"])
        inspection = client.inspect("", limit=1)
        self.assertEqual([e.name for e in inspection.entries], ["app/a"])
        self.assertTrue(inspection.truncated)
        holder = inspection.entries[0].holders[0]
        self.assertEqual(holder.session.client_name, "inspector")
        self.assertEqual(holder.session.pid, os.getpid())
        # Version 2: the host and the account, as the system names them.
        self.assertEqual(holder.session.host, socket.gethostname())
        self.assertEqual(holder.session.user, pwd.getpwuid(os.getuid()).pw_name)

    def test_inspect_after_pages(self) -> None:
        client = self.client("pager")
        names = ["page/%04d" % i for i in range(25)]
        for name in names + ["zz"]:
            self.assertIsNotNone(client.acquire(name, LockKind.MUTEX, timeout_ms=0))
        first = client.inspect_after("page/", "", limit=10)
        self.assertEqual([e.name for e in first.entries], names[:10])
        self.assertTrue(first.truncated)
        rest = client.inspect_after("page/", first.entries[-1].name, limit=100)
        self.assertEqual([e.name for e in rest.entries], names[10:])
        self.assertFalse(rest.truncated)
        self.assertEqual([e.name for e in client.inspect_all("page/", page=7)], names)

    def test_metrics(self) -> None:
        client = self.client("metrics")
        self.assertTrue(Lock("counted", client).acquire(timeout=WAIT))
        text = client.metrics()
        self.assertTrue(text.endswith("# EOF\n"), text)
        # The order of the lines is not fixed.
        self.assertIn('lockbroker_holds{kind="mutex"} 1', text.splitlines())

    def test_release_by_name(self) -> None:
        client = self.client()
        first = client.acquire("pool", LockKind.SEMAPHORE, capacity=5, permits=3, timeout_ms=0)
        second = client.acquire("pool", LockKind.SEMAPHORE, capacity=5, permits=2, timeout_ms=0)
        assert first is not None and second is not None
        self.assertEqual(client.release_by_name("pool", 4), 4)
        entry = self.entry(client, "pool")
        assert entry is not None
        self.assertEqual([(h.hold_id, h.permits) for h in entry.holders], [(second.hold_id, 1)])
        with self.assertRaises(NotHeld) as cm:
            client.release_by_name("pool", 2)
        self.assertEqual(cm.exception.code, ErrorCode.NOT_HELD)
        self.assertEqual(client.release(second.hold_id), 1)
        with self.assertRaises(NotHeld) as cm:
            client.release(second.hold_id)
        self.assertEqual(cm.exception.code_name, "unknown_hold")

    def test_errors_keep_the_session(self) -> None:
        client = self.client()
        with self.assertRaises(InvalidRequest) as cm:
            Lock("", client).acquire(timeout=WAIT)
        self.assertEqual(cm.exception.code, ErrorCode.INVALID_NAME)
        self.assertIsInstance(cm.exception, ValueError)
        self.assertIsNotNone(client.acquire("kind", LockKind.MUTEX, timeout_ms=0))
        with self.assertRaises(InvalidRequest) as cm:
            lockbroker.BoundedSemaphore("kind", 2, client).acquire(timeout=WAIT)
        self.assertEqual(cm.exception.code, ErrorCode.KIND_MISMATCH)
        client.ping()
        self.assertFalse(client.lost)

    def test_waiting_acquire_does_not_block_other_threads(self) -> None:
        a, b = self.client("a"), self.client("b")
        Lock("busy", a).acquire(timeout=WAIT)
        waiting = spawn(Lock("busy", b).acquire, timeout=WAIT)
        self.wait_waiters(b, "busy", 1)
        # The same connection still answers everything else at once.
        b.ping()
        other = Lock("free", b)
        self.assertTrue(other.acquire(timeout=WAIT))
        other.release()
        self.assertFalse(waiting.done())
        a.close()
        self.assertTrue(waiting.result(timeout=WAIT))

    def test_interrupted_acquire_is_cancelled(self) -> None:
        a, b = self.client("a"), self.client("b")
        Lock("int", a).acquire(timeout=WAIT)
        lock = Lock("int", b)

        def interrupt_when_queued() -> None:
            self.wait_waiters(a, "int", 1)
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt in the main thread

        # A shell may start us with SIGINT ignored (a background job): make
        # sure SIGINT raises KeyboardInterrupt for this test.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        self.addCleanup(signal.signal, signal.SIGINT, previous)
        interrupter = spawn(interrupt_when_queued)
        with self.assertRaises(KeyboardInterrupt):
            lock.acquire(timeout=WAIT)  # the daemon would answer only after WAIT
        interrupter.result(timeout=WAIT)
        # The Cancel removed the waiter, and nothing is held by b.
        self.wait_waiters(a, "int", 0)
        entry = self.entry(a, "int")
        assert entry is not None
        self.assertEqual([h.session.session_id for h in entry.holders], [a.session_id])
        b.ping()

    def test_local_give_up_cancels(self) -> None:
        a, b = self.client("a"), self.client("b")
        Lock("slow", a).acquire(timeout=WAIT)
        # Make the client's safety deadline run out long before the daemon's
        # timeout, as if the daemon had stopped answering.
        original = lockbroker.client.ACQUIRE_GRACE
        lockbroker.client.ACQUIRE_GRACE = -(WAIT - 0.1)
        self.addCleanup(setattr, lockbroker.client, "ACQUIRE_GRACE", original)
        self.assertFalse(Lock("slow", b).acquire(timeout=WAIT))
        self.wait_waiters(a, "slow", 0)  # the Cancel reached the daemon
        b.ping()

    def test_grant_for_an_unknown_id_is_released(self) -> None:
        client = self.client()
        # An acquire nobody waits for, as after a give-up that lost the race
        # with the grant: the client must release what arrives.
        client._send_untracked(Acquire("orphan", LockKind.MUTEX, timeout_ms=None))
        wait_until(lambda: client.inspect("orphan").entries == [], "the orphan grant to be released")
        lock = Lock("orphan", client)
        self.assertTrue(lock.acquire(blocking=False))
        lock.release()


class CallersThatReadTest(DaemonTestCase):
    """Threads sharing a client while one of them reads for all."""

    def test_others_are_answered_while_one_waits_for_a_grant(self) -> None:
        holder, client = self.client("holder"), self.client("shared")
        self.assertTrue(Lock("busy", holder).acquire(timeout=WAIT))
        waiting = spawn(Lock("busy", client).acquire, timeout=WAIT)
        self.wait_waiters(holder, "busy", 1)
        watch = client.state.watch("w")
        # A timed wait ends on time whoever reads.
        started = time.monotonic()
        self.assertIsNone(watch.next_event(timeout=0.1))
        self.assertGreaterEqual(time.monotonic() - started, 0.1)

        def calls(i: int) -> int:
            done = 0
            for n in range(40):
                self.assertEqual(client.state.increment("c/%d" % i), n + 1)
                done += 1
            return done

        workers = [spawn(calls, i) for i in range(6)]
        holder.state.set("w", "x")
        event = watch.next_event(timeout=WAIT)
        self.assertIsNotNone(event)
        self.assertEqual(sum(w.result(timeout=WAIT * 2) for w in workers), 240)
        self.assertFalse(waiting.done())
        holder.close()
        self.assertTrue(waiting.result(timeout=WAIT))
        watch.close()

    def test_lost_is_seen_without_a_call(self) -> None:
        client = self.client()
        self.assertFalse(client.lost)
        self.assertEqual(self.daemon.stop(), 0)
        wait_until(lambda: client.lost, "the client to see the daemon gone")


class ConnectionLossTest(DaemonTestCase):
    """A stopped daemon fails waiting callers and marks the client lost."""

    def test_daemon_stopped(self) -> None:
        a, b = self.client("a"), self.client("b")
        # b waits behind its own hold: when another session's end frees a
        # lock during the shutdown, a waiter may still be granted first, but
        # nothing can free b's own hold before b's session ends.
        held = Lock("x", b)
        held.acquire(timeout=WAIT)
        waiting = spawn(Lock("x", b).acquire)  # no timeout: only the loss ends it
        self.wait_waiters(a, "x", 1)
        self.assertEqual(self.daemon.stop(), 0)
        with self.assertRaises(ConnectionLost):
            waiting.result(timeout=WAIT)
        wait_until(lambda: a.lost and b.lost, "both clients to see the loss")
        self.assertTrue(b.shutting_down)  # the ShuttingDown event came first
        self.assertFalse(b.closed)
        self.assertIsInstance(b.lost_reason, ConnectionLost)
        with self.assertRaises(ConnectionLost):
            b.ping()
        with self.assertRaises(ConnectionLost):
            held.release()  # the hold went with the session
        with self.assertRaises(ConnectionLost):
            Lock("y", a).acquire(timeout=WAIT)

    def test_close_fails_waiters(self) -> None:
        a, b = self.client("a"), self.client("b")
        Lock("c", a).acquire(timeout=WAIT)
        waiting = spawn(Lock("c", b).acquire)
        self.wait_waiters(a, "c", 1)
        b.close()
        with self.assertRaises(lockbroker.ClientClosed):
            waiting.result(timeout=WAIT)
        self.assertTrue(b.closed)
        self.assertFalse(b.lost)
        self.wait_waiters(a, "c", 0)


class DeadlockTest(DaemonTestCase):
    """Deadlock detection (protocol version 3, PROTOCOL.md 8.11): with
    ``detect_deadlocks`` each thread acquires as its own actor, and the wait
    that would close a cycle is refused with ``deadlock``; off, it queues."""

    def detecting(self, name: str, **kwargs: object) -> lockbroker.Client:
        """A new session that detects deadlocks, closed after the test."""
        client = lockbroker.Client(
            self.daemon.path,
            client_name=name,
            connect_timeout=WAIT,
            request_timeout=WAIT,
            detect_deadlocks=True,
            **kwargs,  # type: ignore[arg-type]
        )
        self._clients.append(client)
        return client

    def opposite_orders(self, a: lockbroker.Client, main: lockbroker.Client, timeout_ms: "int | None" = None):
        """Thread A takes x, main takes y, A waits for y (seen queued), then
        main asks for x: what main's acquire returns (or raises, as the
        exception), and A's outcome once main lets y go."""
        holds_y = main.acquire("y", LockKind.MUTEX)
        assert holds_y is not None

        def thread_a() -> "tuple[object, object]":
            x = a.acquire("x", LockKind.MUTEX)
            assert x is not None
            y = a.acquire("y", LockKind.MUTEX)  # waits for main
            assert y is not None
            a.release(y.hold_id)
            return x, y

        waiting = spawn(thread_a)
        self.wait_waiters(main, "y", 1)  # A holds x, and waits for y
        try:
            outcome: object = main.acquire("x", LockKind.MUTEX, timeout_ms=timeout_ms)
        except Deadlock as e:
            outcome = e
        # Nothing else moved: no waiter on x, A holds it, A still waits.
        entry = self.entry(main, "x")
        assert entry is not None
        self.assertEqual(entry.waiters, [])
        self.assertEqual([h.session.session_id for h in entry.holders], [a.session_id])
        self.assertEqual(self.waiter_count(main, "y"), 1)
        # Main gives way; A is served.
        main.release(holds_y.hold_id)
        x, _ = waiting.result(timeout=WAIT)
        a.release(x.hold_id)  # type: ignore[attr-defined]
        return outcome

    def test_opposite_orders_in_two_clients_one_is_refused(self) -> None:
        a, main = self.detecting("thread a"), self.detecting("main")
        self.assertEqual(a.protocol_version, 4)
        self.assertTrue(a.detects_deadlocks and main.detects_deadlocks)
        refused = self.opposite_orders(a, main)
        self.assertIsInstance(refused, Deadlock)
        assert isinstance(refused, Deadlock)
        self.assertIsInstance(refused, InvalidRequest)  # codes 2xx
        self.assertEqual((refused.code, refused.code_name), (ErrorCode.DEADLOCK, "deadlock"))
        self.assertIn('waiting for "x" would deadlock', refused.message)
        self.assertIn('"thread a"', refused.message)
        # The session goes on, and x is free again.
        self.assertIsNotNone(main.acquire("x", LockKind.MUTEX, timeout_ms=0))

    def test_opposite_orders_in_one_client_one_is_refused(self) -> None:
        # Each thread is its own actor, even in one shared session.
        shared = self.detecting("shared")
        refused = self.opposite_orders(shared, shared)
        self.assertIsInstance(refused, Deadlock)

    def test_a_timeout_does_not_hide_the_deadlock(self) -> None:
        a, main = self.detecting("a"), self.detecting("main")
        self.assertIsInstance(self.opposite_orders(a, main, timeout_ms=int(WAIT * 1000)), Deadlock)

    def test_without_detection_the_waits_queue(self) -> None:
        a, main = self.client("a"), self.client("main")
        self.assertFalse(a.detects_deadlocks or main.detects_deadlocks)
        # Main's wait for x queues (behind A, which waits for main), seen
        # waiting there, until its timeout ends it.
        watcher = spawn(self.wait_waiters, a, "x", 1)
        started = time.monotonic()
        self.assertIsNone(self.opposite_orders(a, main, timeout_ms=1000))
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        watcher.result(timeout=WAIT)

    def test_a_lock_waiting_behind_its_own_hold(self) -> None:
        client = self.detecting("self")
        lock = Lock("mine", client)
        self.assertTrue(lock.acquire(timeout=WAIT))
        # Not re-entrant: the same thread waiting for it could wait forever.
        with self.assertRaises(Deadlock):
            lock.acquire(timeout=WAIT)
        self.assertFalse(lock.acquire(blocking=False))  # a try is never checked
        lock.release()

    def test_a_fixed_actor_is_shared_across_sessions(self) -> None:
        actor = 0x0123456789ABCDEF
        holder = self.detecting("holder", actor=actor)
        other = self.detecting("other", actor=actor)
        self.assertTrue(Lock("held", holder).acquire(timeout=WAIT))
        # Another thread, another session, the same actor: a self-wait.
        with self.assertRaises(Deadlock):
            spawn(other.acquire, "held", LockKind.MUTEX).result(timeout=WAIT)

    def test_a_command_runs_within_the_actors_lockbroker_lock_names(self) -> None:
        wrapper = 0x0123456789ABCDEF
        holder = self.detecting("wrapper", actor=wrapper)
        self.assertTrue(Lock("held", holder).acquire(timeout=WAIT))
        # As `lockbroker lock held -- python …` hands its actor down: the
        # command waiting for its wrapper's lock would wait forever.
        chain = {"LOCKBROKER_ACTOR": "%016x,000000000000002a" % wrapper}
        with mock.patch.dict(os.environ, chain):
            command = self.detecting("command")
        self.assertEqual(command.protocol_version, 4)
        with self.assertRaises(Deadlock) as refused:
            spawn(command.acquire, "held", LockKind.MUTEX).result(timeout=WAIT)
        self.assertIn("on whose behalf this session acts", str(refused.exception))
        # Two commands within one wrapper (two threads here) take another
        # lock in turn: no deadlock, the second queues.
        with mock.patch.dict(os.environ, chain):
            second = self.detecting("second")
        self.assertTrue(Lock("inner", command).acquire(timeout=WAIT))
        queued = spawn(second.acquire, "inner", LockKind.MUTEX, timeout_ms=50)
        self.assertIsNone(queued.result(timeout=WAIT))
        # Without detection the variable is ignored: the wait queues.
        with mock.patch.dict(os.environ, chain):
            plain = self.client("plain")
        self.assertIsNone(plain.acquire("held", LockKind.MUTEX, timeout_ms=50))

    def test_actor_arguments(self) -> None:
        for bad in (0, -1, 2**64, True, "1"):
            with self.assertRaises(ValueError):
                lockbroker.Client(self.daemon.path, actor=bad)  # type: ignore[arg-type]
        self.assertTrue(self.detecting("fixed", actor=2**64 - 1).detects_deadlocks)
        only_actor = lockbroker.Client(self.daemon.path, actor=5, connect_timeout=WAIT)
        self._clients.append(only_actor)
        self.assertTrue(only_actor.detects_deadlocks)

        env = "LOCKBROKER_ACTOR"
        self.assertEqual(_common.env_within({env: " 00000000000000ff\n"}), (255,))
        self.assertEqual(_common.env_within({env: "2a, 00c0ffee00c0ffee"}), (42, 0xC0FFEE00C0FFEE))
        self.assertEqual(len(_common.env_within({env: ",".join(["1"] * 40)})), 32)
        for bad_text in ("", "0000000000000000", "xyz", "1" * 17, "-1", "2a,,3", "2a,0", "+2a"):
            self.assertEqual(_common.env_within({env: bad_text}), (), bad_text)
        self.assertEqual(_common.Actors(True, None, {env: "2a"}).within, (42,))
        self.assertIsNone(_common.Actors(True, None, {env: "2a"}).fixed)
        self.assertEqual(_common.Actors(True, 7, {env: "2a"}).fixed, 7)
        self.assertEqual(_common.Actors(True, 7, {env: "2a"}).within, (42,))
        self.assertIsNone(_common.Actors(True, None, {}).fixed)
        self.assertFalse(_common.Actors(False, None, {env: "2a"}).detect)
        self.assertEqual(_common.Actors(False, None, {env: "2a"}).within, ())
        # Each thread its own actor, the same on every call, never 0.
        mine = _common.thread_actor()
        self.assertEqual(mine, _common.thread_actor())
        self.assertNotEqual(spawn(_common.thread_actor).result(timeout=WAIT), mine)
        self.assertTrue(0 < mine < 2**64)


class ContentionTest(DaemonTestCase):
    """Contention events (protocol version 4, PROTOCOL.md 9.6): a hold that
    asked is told once someone waits behind it; a try does not count."""

    def test_a_holder_is_told_when_someone_waits(self) -> None:
        holder, other = self.client("holder"), self.client("other")
        grant = holder.acquire("c", LockKind.MUTEX, notify_contended=True)
        assert grant is not None
        self.assertIsNone(other.acquire("c", LockKind.MUTEX, timeout_ms=0))  # a try
        holder.inspect()  # what the daemon said of the hold came before this
        self.assertFalse(holder.contended(grant.hold_id))
        self.assertFalse(holder.wait_contended(grant.hold_id, timeout=0.01))
        waiting = spawn(other.acquire, "c", LockKind.MUTEX)
        self.assertTrue(holder.wait_contended(grant.hold_id, timeout=WAIT))
        self.assertTrue(holder.contended(grant.hold_id))
        holder.release(grant.hold_id)
        self.assertFalse(holder.contended(grant.hold_id))  # forgotten with the hold
        self.assertIsNotNone(waiting.result(timeout=WAIT))

    def test_a_lock_made_to_notify_says_it_is_contended(self) -> None:
        holder, other = self.client("holder"), self.client("other")
        lock = Lock("cl", holder, notify_contended=True)
        self.assertFalse(lock.wait_contended(0))  # unheld
        self.assertTrue(lock.acquire(timeout=WAIT))
        self.assertFalse(lock.contended)
        waiting = spawn(Lock("cl", other).acquire, timeout=WAIT)
        self.assertTrue(lock.wait_contended(WAIT))
        self.assertTrue(lock.contended)
        lock.release()
        self.assertFalse(lock.contended)
        self.assertTrue(waiting.result(timeout=WAIT))
        # It pickles with its setting.
        import pickle

        self.assertTrue(pickle.loads(pickle.dumps(lock))._notify_contended)

    def test_a_hold_granted_while_others_wait_is_told_at_once(self) -> None:
        holder, second, third = self.client("holder"), self.client("second"), self.client("third")
        first = holder.acquire("q", LockKind.MUTEX)
        assert first is not None
        got_second = spawn(second.acquire, "q", LockKind.MUTEX, notify_contended=True)
        self.wait_waiters(holder, "q", 1)
        got_third = spawn(third.acquire, "q", LockKind.MUTEX)
        self.wait_waiters(holder, "q", 2)
        holder.release(first.hold_id)
        grant = got_second.result(timeout=WAIT)
        self.assertTrue(second.wait_contended(grant.hold_id, timeout=WAIT))
        second.release(grant.hold_id)
        self.assertIsNotNone(got_third.result(timeout=WAIT))


class LeaseTest(DaemonTestCase):
    """Leases (protocol version 4, PROTOCOL.md 8.12): a hold whose lease
    runs out is revoked, and the next holder is told it was abandoned."""

    def test_a_lease_that_runs_out_revokes_the_hold(self) -> None:
        holder, other = self.client("holder"), self.client("other")
        grant = holder.acquire("l", LockKind.MUTEX, lease_ms=3_600_000)
        assert grant is not None
        self.assertFalse(holder.revoked(grant.hold_id))
        holder.extend_lease(grant.hold_id, 20)
        nxt = other.acquire("l", LockKind.MUTEX, timeout_ms=int(WAIT * 1000))
        assert nxt is not None
        self.assertTrue(nxt.abandoned)
        holder.inspect()  # the Revoked event came before this answer
        self.assertTrue(holder.revoked(grant.hold_id))
        with self.assertRaises(NotHeld):
            holder.release(grant.hold_id)
        with self.assertRaises(NotHeld):
            holder.extend_lease(grant.hold_id, 1000)
        with self.assertRaises(InvalidRequest):
            holder.acquire("m", LockKind.MUTEX, lease_ms=0)
        self.assertIsNone(self.entry(other, "m"))

    def test_breaking_a_lock_revokes_its_holds(self) -> None:
        holder, breaker = self.client("holder"), self.client("breaker")
        first = holder.acquire("br", LockKind.SEMAPHORE, capacity=2)
        second = holder.acquire("br", LockKind.SEMAPHORE, capacity=2)
        assert first is not None and second is not None
        self.assertEqual(breaker.break_lock("br", first.hold_id), [first.hold_id])
        holder.inspect()
        self.assertTrue(holder.revoked(first.hold_id))
        self.assertFalse(holder.revoked(second.hold_id))
        self.assertEqual(breaker.break_lock("br"), [second.hold_id])
        with self.assertRaises(NotHeld):
            breaker.break_lock("br")
        nxt = breaker.acquire("br", LockKind.SEMAPHORE, capacity=2)
        assert nxt is not None
        self.assertTrue(nxt.abandoned)

    def test_a_lock_with_a_lease(self) -> None:
        holder, other = self.client("holder"), self.client("other")
        lock = Lock("ll", holder, lease=0.02)
        self.assertTrue(lock.acquire(timeout=WAIT))
        self.assertTrue(Lock("ll", other).acquire(timeout=WAIT))  # after the lease
        holder.inspect()
        self.assertTrue(lock.revoked)
        with self.assertRaises(RuntimeError):
            lock.release()
        with self.assertRaises(ValueError):
            Lock("ll", holder, lease=0)
        import pickle

        self.assertEqual(pickle.loads(pickle.dumps(lock))._lease, 0.02)


class DefaultClientTest(DefaultClientTestCase):
    """Lock("x") without a client; a forked child gets its own session."""

    def test_default_client_from_env(self) -> None:
        lock = Lock("default")
        self.assertTrue(lock.acquire(timeout=WAIT))
        self.assertIs(lock.client, default_client())
        self.assertEqual(default_client().path, self.daemon.path)
        lock.release()

    def test_fork_gets_a_new_session(self) -> None:
        parent = default_client()
        explicit = self.client("explicit")
        held = Lock("parent-holds")
        self.assertTrue(held.acquire(timeout=WAIT))
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return
            status = 1
            try:
                os.close(read_fd)
                child = default_client()
                report = "%d %d" % (child.session_id, child.session_id != parent.session_id)
                try:
                    explicit.ping()
                    report += " explicit-usable"
                except ConnectionLost:
                    report += " explicit-refused"
                lock = Lock("child")
                report += " %s" % lock.acquire(timeout=WAIT)
                lock.release()
                os.write(write_fd, report.encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = spawn(pipe.read).result(timeout=WAIT).decode()
        deadline = time.monotonic() + WAIT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            self.assertLess(time.monotonic(), deadline, "the forked child did not exit")
            time.sleep(0.005)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        session, differs, explicit_state, acquired = report.split()
        self.assertEqual(differs, "1")
        self.assertEqual(explicit_state, "explicit-refused")
        self.assertEqual(acquired, "True")
        # The child's exit closed its copy of the socket only: the parent's
        # session and its hold live on.
        self.assertIs(default_client(), parent)
        parent.ping()
        explicit.ping()
        entry = self.entry(parent, "parent-holds")
        assert entry is not None
        self.assertEqual([h.session.session_id for h in entry.holders], [parent.session_id])
        self.assertNotEqual(int(session), parent.session_id)
        held.release()


class OldDaemonTest(unittest.TestCase):
    """A daemon of before protocol version 3 (or 2), by hand: it refuses a
    Hello of a later version with ``unsupported_version``, welcomes its own,
    answers an acquire with a grant and every other request with an
    Inspection of its version, and records what it was sent."""

    def fake_daemon(self, speaks: int) -> "tuple[str, list, list, threading.Thread]":
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
        versions: "list[int]" = []
        requests: "list[object]" = []

        def frames(conn: socket.socket) -> "list[bytes]":
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
                        if isinstance(message.request, _common.ACQUIRES):
                            answer: object = Granted(Grant(len(requests), len(requests), False))
                        else:
                            answer = inspection
                        reply = ResponseMessage(message.id, answer)  # type: ignore[arg-type]
                        conn.sendall(encode_frame(encode_server_message(reply, version)))
                    return

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        return path, versions, requests, server

    def test_the_client_falls_back_to_version_1(self) -> None:
        path, versions, requests, server = self.fake_daemon(1)
        client = lockbroker.Client(
            path, client_name="new", connect_timeout=WAIT, request_timeout=WAIT, detect_deadlocks=True
        )
        try:
            self.assertEqual(client.welcome.version, 1)
            self.assertFalse(client.detects_deadlocks)
            seen = client.inspect()
            self.assertEqual(seen.entries[0].holders[0].session, self.session)
        finally:
            client.close()
        server.join(WAIT)
        self.assertEqual(versions, [PROTOCOL_VERSION, 3, 2, 1])

    def test_the_client_falls_back_to_version_2_and_acquires_plainly(self) -> None:
        # A daemon of version 2 cannot decode AcquireAs: detection asked
        # for, acquires are plain ones all the same.
        path, versions, requests, server = self.fake_daemon(2)
        client = lockbroker.Client(
            path, client_name="new", connect_timeout=WAIT, request_timeout=WAIT, detect_deadlocks=True
        )
        try:
            self.assertEqual(client.protocol_version, 2)
            self.assertFalse(client.detects_deadlocks)
            self.assertIsNotNone(client.acquire("x", LockKind.MUTEX))
            self.assertTrue(Lock("y", client).acquire(timeout=WAIT))
            seen = client.inspect()
            self.assertEqual(seen.entries[0].holders[0].session, self.session)
        finally:
            client.close()
        server.join(WAIT)
        self.assertEqual(versions, [4, 3, 2])
        self.assertEqual([type(r) for r in requests], [Acquire, Acquire, Inspect])

    def test_the_client_falls_back_to_version_3_and_acquires_as_its_actor_alone(self) -> None:
        # A daemon of version 3 cannot decode AcquireWith: a command's
        # acquires name their actor, not the wrapper's.
        path, versions, requests, server = self.fake_daemon(3)
        with mock.patch.dict(os.environ, {"LOCKBROKER_ACTOR": "000000000000002a"}):
            client = lockbroker.Client(
                path, client_name="new", connect_timeout=WAIT, request_timeout=WAIT, detect_deadlocks=True
            )
        try:
            self.assertEqual(client.protocol_version, 3)
            self.assertTrue(client.detects_deadlocks)
            # Contention events need version 4: refused before anything is sent.
            with self.assertRaises(lockbroker.Unsupported):
                client.acquire("z", LockKind.MUTEX, notify_contended=True)
            with self.assertRaises(lockbroker.Unsupported):
                client.acquire("z", LockKind.MUTEX, lease_ms=1000)
            with self.assertRaises(lockbroker.Unsupported):
                client.break_lock("z")
            with self.assertRaises(lockbroker.Unsupported):
                client.extend_lease(1, 1000)
            self.assertTrue(Lock("y", client).acquire(timeout=WAIT))
        finally:
            client.close()
        server.join(WAIT)
        self.assertEqual(versions, [4, 3])
        self.assertEqual([type(r) for r in requests], [AcquireAs])


if __name__ == "__main__":
    unittest.main()

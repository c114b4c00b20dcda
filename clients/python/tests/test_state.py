"""Shared state (PROTOCOL.md section 10) against a real daemon.

Each test has its own daemon, so versions start at 1. Nothing sleeps to
synchronise: expiry is observed through a watch's events, and every wait on
a watch has a deadline (``WAIT``).
"""

from __future__ import annotations

import gc
import random
import threading
import unittest
from concurrent.futures import Future
from datetime import timedelta
from typing import List, Optional

import lockbroker
from lockbroker import (
    BoundedSemaphore,
    ChangeKind,
    Changed,
    ClientClosed,
    ConnectionLost,
    GuardNotHeld,
    InvalidRequest,
    Lagged,
    LimitExceeded,
    Lock,
    NotAnInteger,
    NotHeld,
    QuotaExceeded,
    RWLock,
    State,
    StateEntry,
    ValueTooLarge,
    Versioned,
    VersionConflict,
    Watch,
    WatchEvent,
)
from lockbroker.protocol import ErrorCode, StateSet, StateUnwatch, StateWritten

from .support import WAIT, DaemonTestCase, DefaultClientTestCase, spawn, wait_until

#: The daemon's default value limit (``--max-value-len``).
MAX_VALUE_LEN = 1048576
#: The daemon's default StateList page when ``limit`` is 0.
DEFAULT_PAGE = 1000


def next_change(watch: Watch) -> Changed:
    """The watch's next event, which must be a change, within ``WAIT``."""
    event = watch.next_event(timeout=WAIT)
    if event is None:
        raise AssertionError("no event on %r within %.0f s" % (watch, WAIT))
    if not isinstance(event, Changed):
        raise AssertionError("expected a Changed event, got %r" % (event,))
    return event


def next_events(watch: Watch, count: int) -> List[WatchEvent]:
    """The watch's next ``count`` events, each within ``WAIT``."""
    events: List[WatchEvent] = []
    for _ in range(count):
        event = watch.next_event(timeout=WAIT)
        if event is None:
            raise AssertionError("only %d of %d events within %.0f s: %r" % (len(events), count, WAIT, events))
        events.append(event)
    return events


class StateTest(DaemonTestCase):
    """get, set, remove, increment, list and JSON, one session or several."""

    def setUp(self) -> None:
        super().setUp()
        self.c = self.client("state")
        self.state = self.c.state

    def test_get_and_set(self) -> None:
        state = self.state
        self.assertIsNone(state.get("cfg/mode"))
        first = state.set("cfg/mode", "fast")
        self.assertGreaterEqual(first, 1)
        self.assertEqual(state.get("cfg/mode"), Versioned(b"fast", first))
        # Every write takes the next version of the one daemon-wide counter,
        # even one that stores the same value, and on another key.
        self.assertEqual(state.set("cfg/mode", "fast"), first + 1)
        self.assertEqual(state.set("cfg/other", b"x"), first + 2)
        # Values are bytes, any bytes; str goes in as UTF-8; empty is a value.
        raw = bytes(range(256))
        version = state.set("bin", bytearray(raw))
        self.assertEqual(state.get("bin"), Versioned(raw, version))
        state.set("text", "h\u00e9\u2603")
        got = state.get("text")
        assert got is not None
        self.assertEqual(got.value, "h\u00e9\u2603".encode("utf-8"))
        self.assertIs(type(got.value), bytes)
        state.set("empty", memoryview(b""))
        self.assertEqual(state.get("empty"), Versioned(b"", version + 2))
        with self.assertRaises(TypeError):
            state.set("n", 5)  # type: ignore[arg-type]
        # The client object and State(client) are the same store.
        self.assertEqual(State(self.c).get("empty"), state.get("empty"))
        self.assertIs(self.c.state, state)

    def test_other_sessions_see_writes(self) -> None:
        other = self.client("other").state
        version = self.state.set("shared", "v")
        self.assertEqual(other.get("shared"), Versioned(b"v", version))

    def test_invalid_keys(self) -> None:
        for key in ["", "a\nb", "x" * 256]:
            with self.subTest(key=key[:8]):
                with self.assertRaises(InvalidRequest) as cm:
                    self.state.set(key, "v")
                self.assertEqual(cm.exception.code, ErrorCode.INVALID_NAME)
        with self.assertRaises(InvalidRequest):
            self.state.get("")
        self.assertEqual(self.state.list(), [])
        self.c.ping()

    def test_if_version_conflicts(self) -> None:
        state = self.state
        # if_version 0: only if the key does not exist.
        created = state.set("cas", "a", if_version=0)
        with self.assertRaises(VersionConflict) as cm:
            state.set("cas", "b", if_version=0)
        self.assertEqual((cm.exception.key, cm.exception.expected, cm.exception.current), ("cas", 0, created))
        # if_version v: only at version v.
        second = state.set("cas", "b", if_version=created)
        with self.assertRaises(VersionConflict) as cm:
            state.set("cas", "stale", if_version=created)
        self.assertEqual(cm.exception.current, second)
        with self.assertRaises(VersionConflict) as cm:
            state.set("absent", "x", if_version=3)
        self.assertEqual(cm.exception.current, 0)
        # Nothing changed, and a conflict takes no version.
        self.assertEqual(state.get("cas"), Versioned(b"b", second))
        self.assertIsNone(state.get("absent"))
        self.assertEqual(state.set("next", "n"), second + 1)
        # The boolean form.
        self.assertFalse(state.compare_and_set("cas", created, "c"))
        self.assertTrue(state.compare_and_set("cas", second, "c"))
        self.assertTrue(state.compare_and_set("fresh", 0, "f"))
        self.assertFalse(state.compare_and_set("fresh", 0, "f"))
        self.assertEqual(state.get("cas"), Versioned(b"c", second + 2))

    def test_update_retries_after_a_conflict(self) -> None:
        state, other = self.state, self.client("other").state
        state.set("counter", "10")
        seen: List[Optional[bytes]] = []

        def add_one(old: Optional[bytes]) -> str:
            seen.append(old)
            if len(seen) == 1:
                other.set("counter", "20")  # another writer comes first
            assert old is not None
            return str(int(old) + 1)

        result = state.update("counter", add_one)
        self.assertEqual(seen, [b"10", b"20"])
        self.assertEqual(result.value, b"21")
        self.assertEqual(state.get("counter"), result)
        created = state.update("new", lambda old: "created" if old is None else "again")
        self.assertEqual(state.get("new"), created)
        self.assertEqual(created.value, b"created")

    def test_remove_returns_the_old_value(self) -> None:
        state = self.state
        self.assertIsNone(state.remove("gone"))  # absent: not an error
        version = state.set("gone", "old")
        self.assertEqual(state.remove("gone"), Versioned(b"old", version))
        self.assertIsNone(state.get("gone"))
        self.assertIsNone(state.remove("gone"))
        # The removal took a version of its own (only watches see it).
        self.assertEqual(state.set("probe", "p"), version + 2)
        # Conditional removes.
        version = state.set("cond", "c")
        with self.assertRaises(VersionConflict) as cm:
            state.remove("cond", if_version=version - 1)
        self.assertEqual(cm.exception.current, version)
        with self.assertRaises(VersionConflict):
            state.remove("cond", if_version=0)  # 0: only checks that it is absent
        self.assertEqual(state.get("cond"), Versioned(b"c", version))
        self.assertEqual(state.remove("cond", if_version=version), Versioned(b"c", version))
        self.assertIsNone(state.remove("cond", if_version=0))

    def test_increment(self) -> None:
        state = self.state
        self.assertEqual(state.increment("hits"), 1)  # absent counts as 0
        self.assertEqual(state.increment("hits", 41), 42)
        self.assertEqual(state.increment("hits", -50), -8)
        value, version = state.increment_versioned("hits", 0)  # a write even with 0
        self.assertEqual(state.get("hits"), Versioned(b"-8", version))
        self.assertEqual(value, -8)
        # Stored as canonical decimal text, any valid input accepted.
        state.set("padded", "+007")
        self.assertEqual(state.increment("padded"), 8)
        self.assertEqual(state.get("padded"), Versioned(b"8", version + 2))

    def test_increment_refuses_non_integers_and_overflow(self) -> None:
        state = self.state
        for text in ["abc", "1.5", " 1", "1\n", "", "9223372036854775808"]:
            with self.subTest(value=text):
                version = state.set("bad", text)
                with self.assertRaises(NotAnInteger) as cm:
                    state.increment("bad")
                self.assertEqual(cm.exception.code, ErrorCode.NOT_AN_INTEGER)
                self.assertEqual(cm.exception.code_name, "not_an_integer")
                self.assertIsInstance(cm.exception, InvalidRequest)
                self.assertEqual(state.get("bad"), Versioned(text.encode(), version))
        # Overflow either way: an error, with nothing changed.
        top = state.set("big", str(2**63 - 1))
        with self.assertRaises(NotAnInteger):
            state.increment("big", 1)
        self.assertEqual(state.get("big"), Versioned(b"9223372036854775807", top))
        bottom = state.set("small", str(-(2**63)))
        with self.assertRaises(NotAnInteger):
            state.increment("small", -1)
        self.assertEqual(state.get("small"), Versioned(b"-9223372036854775808", bottom))
        self.assertEqual(state.increment("small", 2**63 - 1), -1)
        # A delta that does not fit in an i64 never leaves the client.
        with self.assertRaises(ValueError):
            state.increment("big", 2**63)
        # Nothing took a version in between.
        self.assertEqual(state.set("probe", "p"), bottom + 2)

    def test_many_threads_increment_one_key_over_one_connection(self) -> None:
        threads, per_thread = 8, 200
        results: List[List[int]] = [[] for _ in range(threads)]
        start = threading.Barrier(threads)

        def work(i: int) -> None:
            start.wait(timeout=WAIT)
            for _ in range(per_thread):
                results[i].append(self.state.increment("total"))

        futures = [spawn(work, i) for i in range(threads)]
        for future in futures:
            future.result(timeout=WAIT)
        total = threads * per_thread
        got = self.state.get("total")
        assert got is not None
        self.assertEqual(got.value, str(total).encode())
        # No update lost, none applied twice: every intermediate sum once.
        self.assertEqual(sorted(v for r in results for v in r), list(range(1, total + 1)))
        for r in results:
            self.assertEqual(r, sorted(r))  # one thread's increments apply in order

    def test_list_order_prefix_and_values(self) -> None:
        state = self.state
        keys = ["k/b", "k/a", "k/\u00e9", "k/Z", "k/a/b", "k/", "k0", "j", "l"]
        random.Random(5).shuffle(keys)
        versions = {key: state.set(key, "v:" + key) for key in keys}
        listed = state.list("k/")
        expected = sorted((k for k in keys if k.startswith("k/")), key=lambda k: k.encode("utf-8"))
        self.assertEqual([e.key for e in listed], expected)  # byte-wise: Z < a < a/b < b < é
        self.assertEqual(listed[0], StateEntry("k/", versions["k/"], None))
        self.assertTrue(all(e.value is None and e.version == versions[e.key] for e in listed))
        with_values = state.list("k/", values=True)
        self.assertEqual([(e.key, e.value) for e in with_values], [(k, ("v:" + k).encode()) for k in expected])
        self.assertEqual([e.key for e in state.list()], sorted(keys, key=lambda k: k.encode("utf-8")))
        self.assertEqual(state.list("nothing/"), [])
        state.remove("k/a")
        self.assertNotIn("k/a", [e.key for e in state.list("k/")])

    def test_list_reads_every_page(self) -> None:
        state = self.state
        count = DEFAULT_PAGE + 3  # more than one page of the daemon's default
        pending = [self.c._start(StateSet("p/%05d" % i, b"%d" % i)) for i in range(count)]
        for _, call in pending:  # sent back to back, without waiting
            self.assertTrue(self.c._await(call, WAIT))
            self.assertIsInstance(call.outcome(), StateWritten)
        state.set("q", "outside the prefix")
        page, more = state.list_page("p/")
        self.assertEqual((len(page), more), (DEFAULT_PAGE, True))
        rest, more = state.list_page("p/", page[-1].key)
        self.assertEqual((len(rest), more), (3, False))
        expected = ["p/%05d" % i for i in range(count)]
        self.assertEqual([e.key for e in state.list("p/")], expected)
        small = state.list("p/", values=True, page_size=97)
        self.assertEqual([e.key for e in small], expected)
        self.assertEqual(small[1234 % count].value, b"%d" % (1234 % count))
        self.assertEqual(len(state.list()), count + 1)

    def test_json_helpers(self) -> None:
        state = self.state
        self.assertIsNone(state.get_json("cfg"))
        config = {"mode": "fast", "workers": [1, 2], "name": "caf\u00e9", "none": None}
        version = state.set_json("cfg", config)
        self.assertEqual(state.get_json("cfg"), (config, version))
        got = state.get("cfg")
        assert got is not None
        self.assertEqual(got.value, '{"mode":"fast","workers":[1,2],"name":"caf\u00e9","none":null}'.encode())
        with self.assertRaises(VersionConflict):
            state.set_json("cfg", {}, if_version=0)
        state.set("cfg", "not json")
        with self.assertRaises(ValueError):
            state.get_json("cfg")

    def test_value_too_large(self) -> None:
        state = self.state
        version = state.set("big", "small")
        with self.assertRaises(ValueTooLarge) as cm:
            state.set("big", bytes(MAX_VALUE_LEN + 1))
        self.assertEqual(cm.exception.code, ErrorCode.VALUE_TOO_LARGE)
        self.assertIsInstance(cm.exception, LimitExceeded)
        self.assertEqual(state.get("big"), Versioned(b"small", version))
        # The limit itself is allowed.
        written = state.set("big", bytes(MAX_VALUE_LEN))
        got = state.get("big")
        assert got is not None
        self.assertEqual((len(got.value), got.version), (MAX_VALUE_LEN, written))
        # Beyond any possible limit: refused locally, the session untouched.
        with self.assertRaises(ValueTooLarge) as cm:
            state.set("big", bytes(self.c.limits.max_frame_len))
        self.assertEqual(cm.exception.code, ErrorCode.VALUE_TOO_LARGE)
        self.assertFalse(self.c.lost)
        self.assertEqual(state.get("big"), got)


class GuardTest(DaemonTestCase):
    """Writes guarded by a lock this session holds (PROTOCOL.md 10.10)."""

    def test_guarded_writes_and_refusal_after_release(self) -> None:
        c = self.client("guarded")
        state = c.state
        lock = Lock("leader", c)
        self.assertTrue(lock.acquire(timeout=WAIT))
        grant = lock.grant
        assert grant is not None
        # The object, its grant, or the hold id: all name the same hold.
        written = state.set("leader/addr", "10.0.0.1", guard=lock)
        self.assertEqual(state.increment("leader/term", guard=grant), 1)
        state.set("leader/tmp", "t", guard=grant.hold_id)
        self.assertEqual(state.remove("leader/tmp", guard=lock), Versioned(b"t", written + 2))
        lock.release()
        # After the release every guarded write is refused, and changes nothing.
        before = state.list("leader/", values=True)
        for attempt in (
            lambda: state.set("leader/addr", "10.0.0.2", guard=lock),
            lambda: state.set("leader/new", "n", guard=grant.hold_id),
            lambda: state.increment("leader/term", guard=lock),
            lambda: state.remove("leader/addr", guard=grant),
        ):
            with self.assertRaises(GuardNotHeld) as cm:
                attempt()
            self.assertEqual(cm.exception.code, ErrorCode.GUARD_NOT_HELD)
            self.assertIsInstance(cm.exception, NotHeld)
        self.assertEqual(state.list("leader/", values=True), before)
        self.assertEqual(state.get("leader/addr"), Versioned(b"10.0.0.1", written))
        # Nothing took a version.
        self.assertEqual(state.set("probe", "p"), written + 4)

    def test_guard_of_another_session_is_refused(self) -> None:
        a, b = self.client("a"), self.client("b")
        lock = Lock("mine", a)
        self.assertTrue(lock.acquire(timeout=WAIT))
        with self.assertRaises(GuardNotHeld):
            b.state.set("k", "v", guard=lock)
        self.assertIsNone(b.state.get("k"))
        a.state.set("k", "v", guard=lock)

    def test_every_kind_of_hold_guards(self) -> None:
        c = self.client()
        sem = BoundedSemaphore("pool", 3, c)
        self.assertTrue(sem.acquire(timeout=WAIT))
        c.state.set("s", "1", guard=sem)
        rw = RWLock("cfg", c)
        with rw.exclusive(timeout=WAIT) as grant:
            c.state.set("x", "1", guard=rw)
            c.state.set("x", "2", guard=grant)
        with rw.shared(timeout=WAIT):
            c.state.set("x", "3", guard=rw)  # the calling thread's shared grant
        with self.assertRaises(GuardNotHeld):
            c.state.set("x", "4", guard=rw)
        got = c.state.get("x")
        assert got is not None
        self.assertEqual(got.value, b"3")
        # Local mistakes never reach the daemon.
        with self.assertRaises(ValueError):
            c.state.set("x", "5", guard=Lock("never-acquired", c))
        with self.assertRaises(TypeError):
            c.state.set("x", "5", guard=True)
        with self.assertRaises(TypeError):
            c.state.set("x", "5", guard="leader")  # type: ignore[arg-type]

    def test_release_sent_right_behind_a_guarded_write(self) -> None:
        c, other = self.client("writer"), self.client("other")
        lock = Lock("order", c)
        self.assertTrue(lock.acquire(timeout=WAIT))
        assert lock.grant is not None
        # The write is sent, then the release, without waiting in between:
        # the daemon applies the write while the lock is still held.
        _, write = c._start(StateSet("ordered", b"v", guard=lock.grant.hold_id))
        lock.release()
        self.assertTrue(c._await(write, WAIT))
        self.assertIsInstance(write.outcome(), StateWritten)
        self.assertTrue(Lock("order", other).acquire(timeout=WAIT))
        got = other.state.get("ordered")
        assert got is not None
        self.assertEqual(got.value, b"v")


class WatchTest(DaemonTestCase):
    """Watches: events in version order, replay, expiry, close, loss."""

    def setUp(self) -> None:
        super().setUp()
        self.c = self.client("watcher")
        self.state = self.c.state

    def test_key_watch(self) -> None:
        state = self.state
        with state.watch("cfg/mode") as watch:
            self.assertIsInstance(watch.id, int)
            v1 = state.set("cfg/mode", "fast")
            state.set("cfg/other", "not watched")
            v2 = state.set("cfg/mode", b"slow")
            self.assertEqual(next_change(watch), Changed("cfg/mode", v1, ChangeKind.SET, b"fast"))
            self.assertEqual(next_change(watch), Changed("cfg/mode", v2, ChangeKind.SET, b"slow"))
            self.assertIsNone(watch.next_event(timeout=0))  # nothing else queued
        self.assertTrue(watch.closed)

    def test_prefix_watch_sees_creation_and_removal_in_version_order(self) -> None:
        state, writer = self.state, self.client("writer").state
        with state.watch("jobs/", prefix=True) as watch:
            va = writer.set("jobs/a", "queued")
            vb = writer.set("jobs/b", "running")
            writer.set("jobsx", "outside the prefix")
            writer.remove("jobs/a")
            counter, vc = writer.increment_versioned("jobs/count")
            events = next_events(watch, 4)
        self.assertEqual(
            [(e.key, e.change, e.value) for e in events if isinstance(e, Changed)],
            [
                ("jobs/a", ChangeKind.SET, b"queued"),
                ("jobs/b", ChangeKind.SET, b"running"),
                ("jobs/a", ChangeKind.REMOVED, None),
                ("jobs/count", ChangeKind.SET, b"1"),
            ],
        )
        versions = [e.version for e in events if isinstance(e, Changed)]
        self.assertEqual(versions, sorted(versions))
        self.assertEqual((versions[0], versions[1], versions[3]), (va, vb, vc))
        self.assertGreater(versions[2], vb)  # the removal took a version of its own
        self.assertEqual(counter, 1)

    def test_watch_without_values(self) -> None:
        with self.state.watch("", prefix=True, values=False) as watch:
            version = self.state.set("k", "v")
            self.assertEqual(next_change(watch), Changed("k", version, ChangeKind.SET, None))

    def test_watch_from_an_older_version_replays(self) -> None:
        state = self.state
        versions = [state.set("seq", str(i)) for i in range(1, 5)]
        with state.watch("seq", from_version=versions[1]) as watch:
            replayed = next_events(watch, 3)
            self.assertEqual(
                replayed,
                [Changed("seq", versions[i], ChangeKind.SET, str(i + 1).encode()) for i in (1, 2, 3)],
            )
            live = state.set("seq", "5")  # then the live changes, no gap, no duplicate
            self.assertEqual(next_change(watch), Changed("seq", live, ChangeKind.SET, b"5"))

    def test_ttl_expiry_seen_by_get_list_and_watch(self) -> None:
        state = self.state
        with state.watch("tmp/", prefix=True) as watch:
            # "kept" is given a ttl, then rewritten without one, which clears
            # it; "short" expires after "kept" would have.
            state.set("tmp/kept", "k", ttl=0.05)
            kept = state.set("tmp/kept", "k")
            long_lived = state.set("tmp/long", "l", ttl=timedelta(minutes=10))
            written = state.set("tmp/short", "s", ttl=0.1)
            events: List[Changed] = []
            while not events or events[-1].change != ChangeKind.EXPIRED or events[-1].key != "tmp/short":
                events.append(next_change(watch))  # waits for the daemon's expiry
        expired = events[-1]
        self.assertEqual(expired.value, None)
        self.assertGreater(expired.version, written)
        sets = [(e.key, e.version) for e in events if e.change == ChangeKind.SET]
        self.assertEqual(sets[1:], [("tmp/kept", kept), ("tmp/long", long_lived), ("tmp/short", written)])
        versions = [e.version for e in events]
        self.assertEqual(versions, sorted(versions))
        # Only a stalled test could see "kept" expire, and only before its rewrite.
        self.assertTrue(all(e.version < kept for e in events if e.change == ChangeKind.EXPIRED and e.key == "tmp/kept"))
        # tmp/kept's old expiry time came before tmp/short's, which has passed.
        self.assertIsNone(state.get("tmp/short"))
        self.assertEqual(state.get("tmp/kept"), Versioned(b"k", kept))
        self.assertEqual(state.get("tmp/long"), Versioned(b"l", long_lived))
        self.assertEqual([e.key for e in state.list("tmp/")], ["tmp/kept", "tmp/long"])
        self.assertIsNone(state.remove("tmp/short"))
        state.set("tmp/short", "again", if_version=0)  # absent for if_version too
        with self.assertRaises(ValueError):
            state.set("tmp/x", "x", ttl=-1)

    def test_close_stops_the_watch(self) -> None:
        state = self.state
        watch = state.watch("k")
        blocked: "Future[List[WatchEvent]]" = spawn(list, watch)  # iterates until the watch is closed
        watch.close()
        self.assertEqual(blocked.result(timeout=WAIT), [])
        self.assertTrue(watch.closed)
        self.assertIsNone(watch.next_event())  # closed: never blocks
        self.assertEqual(list(watch), [])
        watch.close()  # idempotent
        self.assertEqual(self.c._watches, {})
        # The daemon no longer has it.
        with self.assertRaises(NotHeld) as cm:
            self.c.call(StateUnwatch(watch.id))
        self.assertEqual(cm.exception.code, ErrorCode.NOT_PENDING)
        # Events queued but not consumed are dropped by close.
        with state.watch("k") as second:
            state.set("k", "v")
            wait_until(lambda: not second._events.empty(), "the event to be queued")
        self.assertIsNone(second.next_event(timeout=0))

    def test_iteration(self) -> None:
        state = self.state
        seen: List[WatchEvent] = []
        with state.watch("it/", prefix=True) as watch:
            for i in range(3):
                state.set("it/%d" % i, str(i))
            for event in watch:
                seen.append(event)
                if len(seen) == 3:
                    break
        self.assertEqual([e.key for e in seen if isinstance(e, Changed)], ["it/0", "it/1", "it/2"])

    def test_a_slow_consumer_never_blocks_the_reader(self) -> None:
        state = self.state
        count = 1500
        with state.watch("n") as watch:
            for _ in range(count):
                state.increment("n")  # every answer comes through the same reader
            self.assertGreaterEqual(self.c.ping(), 0.0)
            values = [e.value for e in next_events(watch, count) if isinstance(e, Changed)]
        self.assertEqual(values, [str(i).encode() for i in range(1, count + 1)])

    def test_session_end_ends_iteration_after_the_queued_events(self) -> None:
        state = self.state
        watch = state.watch("k")
        version = state.set("k", "last")
        # Read what arrived (callers read for themselves on a socket).
        wait_until(lambda: self.c._read_arrived() or not watch._events.empty(), "the event to be queued")
        self.c.close()
        self.assertEqual(next_change(watch), Changed("k", version, ChangeKind.SET, b"last"))
        for _ in range(2):  # and again: the end is not consumed
            with self.assertRaises(ClientClosed):
                watch.next_event(timeout=WAIT)
        with self.assertRaises(ConnectionLost):
            next(iter(watch))
        watch.close()  # the session is gone: nothing to stop, no error

    def test_daemon_stop_wakes_a_blocked_iterator(self) -> None:
        watch = self.state.watch("k")
        blocked: "Future[List[WatchEvent]]" = spawn(list, watch)
        self.assertEqual(self.daemon.stop(), 0)
        with self.assertRaises(ConnectionLost):
            blocked.result(timeout=WAIT)

    def test_refused_watch(self) -> None:
        with self.assertRaises(InvalidRequest) as cm:
            self.state.watch("")  # a key watch needs a key
        self.assertEqual(cm.exception.code, ErrorCode.INVALID_NAME)
        self.assertEqual(self.c._watches, {})
        with self.state.watch("", prefix=True):  # every key: allowed
            pass


class WatchLimitTest(DaemonTestCase):
    """At most max_pending watches per session; unclosed watches are stopped."""

    DAEMON_ARGS = ("--max-pending", "2")

    def test_too_many_watches(self) -> None:
        c = self.client()
        first, second = c.state.watch("a"), c.state.watch("b")
        with self.assertRaises(LimitExceeded) as cm:
            c.state.watch("c")
        self.assertEqual(cm.exception.code, ErrorCode.TOO_MANY_PENDING)
        self.assertEqual(sorted(c._watches), sorted([first.id, second.id]))
        first.close()
        with c.state.watch("c"):
            pass
        second.close()

    def test_an_unclosed_watch_is_stopped_at_its_next_event(self) -> None:
        c = self.client()
        c.state.watch("x")
        c.state.watch("y")
        gc.collect()  # both Watch objects are gone, never closed
        self.assertEqual(c._watches, {})
        c.state.set("x", "1")  # the daemon still sends x's event: it unwatches x

        def watch_fits() -> bool:
            try:
                c.state.watch("z").close()
            except LimitExceeded:
                return False
            return True

        wait_until(watch_fits, "an orphan watch to be stopped")


class WatchHistoryTest(DaemonTestCase):
    """A replay that does not reach back far enough starts with Lagged."""

    DAEMON_ARGS = ("--watch-history", "4")

    def test_lagged_then_replay(self) -> None:
        c = self.client()
        versions = [c.state.set("h/%d" % i, str(i)) for i in range(10)]
        with c.state.watch("h/", prefix=True, from_version=versions[0]) as watch:
            first = watch.next_event(timeout=WAIT)
            self.assertEqual(first, Lagged())
            live = c.state.set("h/live", "now")
            replayed: List[Changed] = []
            while not replayed or replayed[-1].version != live:
                event = watch.next_event(timeout=WAIT)
                self.assertIsNotNone(event, "no event within %.0f s" % WAIT)
                if isinstance(event, Changed):  # (a further Lagged would be allowed)
                    replayed.append(event)
        got = [e.version for e in replayed]
        self.assertEqual(got, sorted(got))
        self.assertGreater(got[0], versions[0])  # the oldest were not retained
        self.assertEqual(got[-2:], [versions[-1], live])


class QuotaTest(DaemonTestCase):
    """quota_exceeded (PROTOCOL.md 10.12)."""

    DAEMON_ARGS = ("--state-keys-per-user", "3")

    def test_key_quota(self) -> None:
        state = self.client().state
        for key in "abc":
            state.set(key, "v")
        with self.assertRaises(QuotaExceeded) as cm:
            state.set("d", "v")
        self.assertEqual(cm.exception.code, ErrorCode.QUOTA_EXCEEDED)
        with self.assertRaises(QuotaExceeded):
            state.increment("d")
        self.assertIsNone(state.get("d"))
        state.set("a", "overwrite is fine")
        state.remove("a")
        state.set("d", "fits again")


class DefaultStateTest(DefaultClientTestCase):
    """lockbroker.State() uses the default client."""

    def test_default_client(self) -> None:
        state = State()
        with state.watch("d") as watch:
            version = state.set("d", "v")
            self.assertEqual(next_change(watch).version, version)
        self.assertIs(state.client, lockbroker.default_client())
        self.assertEqual(self.client().state.get("d"), Versioned(b"v", version))


if __name__ == "__main__":
    unittest.main()

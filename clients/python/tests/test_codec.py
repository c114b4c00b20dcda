"""The codec against the golden vectors of proto/golden/v1.txt to v4.txt,
and on bad input.

Every vector of PROTOCOL.md section 13's table -- lock and shared-state
messages alike -- has its hand-built Python message here, and every vector
of the file must have one (none is skipped): c2s vectors are encoded by the
client encoder and compared with the bytes, then decoded back; s2c vectors
are decoded by the client decoder and compared with the message, then
encoded back by the (test and tool) server encoder.
"""

from __future__ import annotations

import unittest
from dataclasses import replace
from typing import Dict, List, Tuple, Union

from lockbroker.protocol import (
    MAGIC,
    Acquire,
    AcquireAs,
    AcquireWith,
    Actor,
    Break,
    Broken,
    Contended,
    ExtendLease,
    Lease,
    Revoked,
    NotifyContended,
    Within,
    Cancel,
    Cancelled,
    ChangeKind,
    DecodeError,
    Done,
    EncodeError,
    EntryInfo,
    EntryKind,
    ErrorCode,
    ErrorInfo,
    ErrorResponse,
    EventMessage,
    Fatal,
    FrameBuffer,
    FrameTooLarge,
    Grant,
    Granted,
    Hello,
    HolderInfo,
    Inspect,
    InspectAfter,
    Inspection,
    Limits,
    LockKind,
    Metrics,
    MetricsText,
    Ping,
    Pong,
    Release,
    ReleaseByName,
    Released,
    RequestMessage,
    ResponseMessage,
    ServerInfo,
    SessionInfo,
    ShuttingDown,
    StateChanged,
    StateConflict,
    StateCounter,
    StateEntries,
    StateEntry,
    StateGet,
    StateIncrement,
    StateList,
    StateRemove,
    StateRemoved,
    StateSet,
    StateUnwatch,
    ReleaseOnClose,
    StateFenced,
    StateValue,
    StateWatch,
    StateWritten,
    TimedOut,
    Versioned,
    WaiterInfo,
    WatchLagged,
    Welcome,
    decode_client_message,
    decode_server_message,
    encode_client_message,
    encode_frame,
    encode_server_message,
    error_code_name,
)

from .support import REPO_ROOT

GOLDEN = REPO_ROOT / "proto" / "golden" / "v1.txt"

Message = Union[Hello, RequestMessage, Welcome, ResponseMessage, EventMessage, Fatal]

#: The message of every vector, as PROTOCOL.md section 12 describes it.
EXPECTED: Dict[str, Tuple[str, Message]] = {
    "hello": ("c2s", Hello(magic=MAGIC, version=1, client_name="demo")),
    "welcome": (
        "s2c",
        Welcome(
            version=1,
            server_version="0.1.0",
            session_id=1,
            limits=Limits(max_frame_len=2097152, max_pending=1024, max_holds=65536),
        ),
    ),
    "acquire_mutex": (
        "c2s",
        RequestMessage(1, Acquire("deploy/status", LockKind.MUTEX, capacity=0, permits=1, timeout_ms=5000)),
    ),
    "granted": ("s2c", ResponseMessage(1, Granted(Grant(hold_id=1, fence=1, abandoned=False)))),
    "release": ("c2s", RequestMessage(2, Release(hold_id=1))),
    "released": ("s2c", ResponseMessage(2, Released(permits=1))),
    "acquire_semaphore": (
        "c2s",
        RequestMessage(3, Acquire("pool/db", LockKind.SEMAPHORE, capacity=4, permits=2, timeout_ms=None)),
    ),
    "cancel": ("c2s", RequestMessage(4, Cancel(request_id=3))),
    "cancelled": ("s2c", ResponseMessage(3, Cancelled())),
    "done": ("s2c", ResponseMessage(4, Done())),
    "acquire_rw_shared_try": (
        "c2s",
        RequestMessage(5, Acquire("config", LockKind.RW_SHARED, capacity=0, permits=1, timeout_ms=0)),
    ),
    "timed_out": ("s2c", ResponseMessage(5, TimedOut())),
    "acquire_rw_exclusive": (
        "c2s",
        RequestMessage(6, Acquire("config", LockKind.RW_EXCLUSIVE, capacity=0, permits=1, timeout_ms=250)),
    ),
    "granted_abandoned": ("s2c", ResponseMessage(6, Granted(Grant(hold_id=7, fence=42, abandoned=True)))),
    "release_by_name": ("c2s", RequestMessage(7, ReleaseByName("pool/db", 2))),
    "error_not_held": (
        "s2c",
        ResponseMessage(7, ErrorResponse(ErrorInfo(301, "holds 0 of 2 permits on pool/db"))),
    ),
    "inspect": ("c2s", RequestMessage(8, Inspect(prefix="deploy/", limit=100))),
    "inspection": (
        "s2c",
        ResponseMessage(
            8,
            Inspection(
                server=ServerInfo(version="0.1.0", pid=4242, uptime_ms=90000, sessions=2),
                entries=[
                    EntryInfo(
                        name="deploy/status",
                        kind=EntryKind.MUTEX,
                        capacity=1,
                        abandoned=False,
                        holders=[
                            HolderInfo(
                                session=SessionInfo(1, pid=1234, uid=1000, gid=1000, client_name="demo"),
                                hold_id=1,
                                kind=LockKind.MUTEX,
                                permits=1,
                                fence=1,
                                since_ms=1700000000000,
                            )
                        ],
                        waiters=[
                            WaiterInfo(
                                session=SessionInfo(2, pid=5678, uid=None, gid=None, client_name="worker"),
                                request_id=1,
                                kind=LockKind.MUTEX,
                                permits=1,
                                since_ms=1700000000250,
                                timeout_ms=None,
                            )
                        ],
                    )
                ],
                truncated=False,
            ),
        ),
    ),
    "ping": ("c2s", RequestMessage(9, Ping())),
    "pong": ("s2c", ResponseMessage(9, Pong())),
    "error_unknown_code": ("s2c", ResponseMessage(10, ErrorResponse(ErrorInfo(999, "from a later version")))),
    "event_shutting_down": ("s2c", EventMessage(ShuttingDown())),
    "fatal_bad_magic": ("s2c", Fatal(ErrorInfo(102, "bad magic"))),
    # Shared state (PROTOCOL.md section 10): one imaginary session, hold 1 held.
    "state_get": ("c2s", RequestMessage(11, StateGet("cfg/mode"))),
    "state_value": ("s2c", ResponseMessage(11, StateValue(Versioned(b"fast", 7)))),
    "state_get_absent": ("c2s", RequestMessage(12, StateGet("cfg/none"))),
    "state_value_none": ("s2c", ResponseMessage(12, StateValue(None))),
    "state_set": (
        "c2s",
        RequestMessage(13, StateSet("cfg/mode", b"slow", if_version=7, ttl_ms=60000, guard=1)),
    ),
    "state_written": ("s2c", ResponseMessage(13, StateWritten(8))),
    "state_set_plain": (
        "c2s",
        RequestMessage(14, StateSet("cfg/mode", b"fast", if_version=None, ttl_ms=None, guard=None)),
    ),
    "state_remove_if_version": ("c2s", RequestMessage(15, StateRemove("cfg/mode", if_version=8, guard=1))),
    "state_conflict": ("s2c", ResponseMessage(15, StateConflict(current=9))),
    "state_remove": ("c2s", RequestMessage(16, StateRemove("cfg/mode", if_version=None, guard=None))),
    "state_removed": ("s2c", ResponseMessage(16, StateRemoved(Versioned(b"fast", 9)))),
    "state_remove_if_absent": ("c2s", RequestMessage(17, StateRemove("cfg/mode", if_version=0, guard=None))),
    "state_removed_none": ("s2c", ResponseMessage(17, StateRemoved(None))),
    "state_increment": ("c2s", RequestMessage(18, StateIncrement("stats/hits", delta=-3, guard=None))),
    "state_counter": ("s2c", ResponseMessage(18, StateCounter(value=39, version=11))),
    "state_increment_guarded": ("c2s", RequestMessage(19, StateIncrement("stats/hits", delta=1, guard=7))),
    "error_guard_not_held": (
        "s2c",
        ResponseMessage(19, ErrorResponse(ErrorInfo(303, "this session does not hold 7"))),
    ),
    "state_list": (
        "c2s",
        RequestMessage(20, StateList(prefix="stats/", start_after="stats/a", limit=2, with_values=True)),
    ),
    "state_entries": (
        "s2c",
        ResponseMessage(
            20,
            StateEntries(
                entries=[StateEntry("stats/b", 5, b"1"), StateEntry("stats/hits", 11, None)],
                more=True,
            ),
        ),
    ),
    "state_watch": (
        "c2s",
        RequestMessage(21, StateWatch("cfg/", prefix=True, from_version=8, with_values=True)),
    ),
    "event_state_changed": (
        "s2c",
        EventMessage(StateChanged(21, "cfg/mode", 8, ChangeKind.SET, b"slow")),
    ),
    "event_state_removed": (
        "s2c",
        EventMessage(StateChanged(21, "cfg/mode", 10, ChangeKind.REMOVED, None)),
    ),
    "event_watch_lagged": ("s2c", EventMessage(WatchLagged(21))),
    "event_state_expired": (
        "s2c",
        EventMessage(StateChanged(21, "cfg/tmp", 12, ChangeKind.EXPIRED, None)),
    ),
    "state_watch_key": (
        "c2s",
        RequestMessage(22, StateWatch("stats/hits", prefix=False, from_version=0, with_values=False)),
    ),
    "state_unwatch": ("c2s", RequestMessage(23, StateUnwatch(watch_id=21))),
    "release_on_close": ("c2s", RequestMessage(24, ReleaseOnClose())),
    "state_fenced_set": (
        "c2s",
        RequestMessage(
            25,
            StateFenced(
                lock="deploy",
                fence=42,
                write=StateSet("deploy/status", b"step 3", if_version=None, ttl_ms=None, guard=None),
            ),
        ),
    ),
    "error_stale_fence": (
        "s2c",
        ResponseMessage(25, ErrorResponse(ErrorInfo(304, "stale fence 42"))),
    ),
    "inspect_after": ("c2s", RequestMessage(26, InspectAfter("deploy/", "deploy/a", limit=100))),
    "metrics": ("c2s", RequestMessage(27, Metrics())),
    "metrics_text": ("s2c", ResponseMessage(27, MetricsText("lockbroker_sessions 2\n# EOF\n"))),
}


def _inspection_v2() -> ResponseMessage:
    """The ``inspection`` vector's message with version 2's host and user."""
    message = EXPECTED["inspection"][1]
    assert isinstance(message, ResponseMessage) and isinstance(message.response, Inspection)
    entry = message.response.entries[0]
    holder = replace(entry.holders[0], session=replace(entry.holders[0].session, host="build-1", user="alice"))
    waiter = replace(entry.waiters[0], session=replace(entry.waiters[0].session, host="build-2"))
    entries = [replace(entry, holders=[holder], waiters=[waiter])]
    return ResponseMessage(8, replace(message.response, entries=entries))


#: The messages of version 2's vectors (proto/golden/v2.txt), as PROTOCOL.md
#: section 13.1 describes them.
EXPECTED_V2: Dict[str, Tuple[str, Message]] = {
    "hello_v2": ("c2s", Hello(magic=MAGIC, version=2, client_name="demo")),
    "welcome_v2": ("s2c", replace(EXPECTED["welcome"][1], version=2)),  # type: ignore[type-var]
    "inspection_v2": ("s2c", _inspection_v2()),
}

#: The messages of version 3's vectors (proto/golden/v3.txt), as PROTOCOL.md
#: section 13.2 describes them.
EXPECTED_V3: Dict[str, Tuple[str, Message]] = {
    "hello_v3": ("c2s", Hello(magic=MAGIC, version=3, client_name="demo")),
    "welcome_v3": ("s2c", replace(EXPECTED["welcome"][1], version=3)),  # type: ignore[type-var]
    "acquire_as": (
        "c2s",
        RequestMessage(
            30,
            AcquireAs(
                actor=0x0123456789ABCDEF,
                acquire=Acquire("deploy", LockKind.MUTEX, capacity=1, permits=1, timeout_ms=None),
            ),
        ),
    ),
    "error_deadlock": (
        "s2c",
        ResponseMessage(30, ErrorResponse(ErrorInfo(ErrorCode.DEADLOCK, 'waiting for "deploy" would deadlock'))),
    ),
}

#: The messages of version 4's vectors (proto/golden/v4.txt), as PROTOCOL.md
#: section 13.3 describes them.
EXPECTED_V4: Dict[str, Tuple[str, Message]] = {
    "hello_v4": ("c2s", Hello(magic=MAGIC, version=4, client_name="demo")),
    "welcome_v4": ("s2c", replace(EXPECTED["welcome"][1], version=4)),  # type: ignore[type-var]
    "acquire_with": (
        "c2s",
        RequestMessage(
            31,
            AcquireWith(
                acquire=Acquire("deploy", LockKind.MUTEX, capacity=1, permits=1, timeout_ms=None),
                options=[Actor(0x0123456789ABCDEF), Within([0x2A, 0xFEDCBA9876543210]), NotifyContended()],
            ),
        ),
    ),
    "event_contended": ("s2c", EventMessage(Contended(7))),
    "acquire_leased": (
        "c2s",
        RequestMessage(
            32,
            AcquireWith(
                acquire=Acquire("deploy", LockKind.MUTEX, capacity=1, permits=1, timeout_ms=1000),
                options=[Lease(30000)],
            ),
        ),
    ),
    "extend_lease": ("c2s", RequestMessage(33, ExtendLease(hold_id=7, lease_ms=60000))),
    "event_revoked": ("s2c", EventMessage(Revoked(7, "its lease of 60s ran out"))),
    "break": ("c2s", RequestMessage(34, Break("deploy", 7))),
    "broken": ("s2c", ResponseMessage(34, Broken([7]))),
    "error_forbidden": (
        "s2c",
        ResponseMessage(34, ErrorResponse(ErrorInfo(ErrorCode.FORBIDDEN, 'hold 7 of "deploy" is of uid 1000'))),
    ),
}

#: Each version's file and messages.
VERSIONS: Dict[int, Tuple[object, Dict[str, Tuple[str, Message]]]] = {
    1: (GOLDEN, EXPECTED),
    2: (REPO_ROOT / "proto" / "golden" / "v2.txt", EXPECTED_V2),
    3: (REPO_ROOT / "proto" / "golden" / "v3.txt", EXPECTED_V3),
    4: (REPO_ROOT / "proto" / "golden" / "v4.txt", EXPECTED_V4),
}


def read_vectors(version: int = 1) -> List[Tuple[str, str, bytes]]:
    """``(name, direction, frame)`` for every vector line of ``version``'s
    golden file."""
    vectors = []
    path = VERSIONS[version][0]
    with open(path, encoding="utf-8") as f:  # type: ignore[call-overload]
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(" ")
            if len(parts) != 3:
                raise AssertionError("%s:%d: expected NAME DIRECTION HEX" % (path, number))
            name, direction, hexdata = parts
            vectors.append((name, direction, bytes.fromhex(hexdata)))
    return vectors


class GoldenVectorTest(unittest.TestCase):
    """Every golden vector, both ways."""

    def test_every_message_has_its_vector(self) -> None:
        for version, (path, expected) in VERSIONS.items():
            names = [name for name, _, _ in read_vectors(version)]
            self.assertEqual(len(names), len(set(names)), "duplicate vector names")
            missing = sorted(set(expected) - set(names))
            self.assertEqual(missing, [], "vectors missing from %s" % path)

    def test_every_vector_has_its_message(self) -> None:
        # No vector is skipped: one appended to the file without its Python
        # message here fails, so the client cannot fall behind the protocol.
        for version, (path, expected) in VERSIONS.items():
            unknown = sorted(name for name, _, _ in read_vectors(version) if name not in expected)
            self.assertEqual(unknown, [], "vectors of %s without a message" % path)

    def test_vectors(self) -> None:
        for version, (_, expected) in VERSIONS.items():
            vectors = read_vectors(version)
            self.assertGreater(len(vectors), 0)
            checked = 0
            for name, direction, frame in vectors:
                if name not in expected:
                    continue  # reported by test_every_vector_has_its_message
                checked += 1
                with self.subTest(vector=name):
                    expected_direction, message = expected[name]
                    self.assertEqual(direction, expected_direction)
                    body = frame[4:]
                    self.assertEqual(int.from_bytes(frame[:4], "little"), len(body), "length prefix")
                    buffer = FrameBuffer(max_len=len(body))
                    buffer.feed(frame)
                    self.assertEqual(buffer.next_body(), body)
                    if direction == "c2s":
                        encoded = encode_client_message(message)  # type: ignore[arg-type]
                        self.assertEqual(encode_frame(encoded).hex(), frame.hex())
                        self.assertEqual(decode_client_message(body), message)
                    else:
                        decoded = decode_server_message(body, version)
                        self.assertEqual(decoded, message)
                        self.assertEqual(encode_frame(encode_server_message(decoded, version)).hex(), frame.hex())
                        # Built by hand, not only decoded: encode the expected message too.
                        rebuilt = encode_server_message(message, version)  # type: ignore[arg-type]
                        self.assertEqual(encode_frame(rebuilt).hex(), frame.hex())
            self.assertEqual(checked, len(expected))

    def test_an_inspection_decodes_only_in_its_own_version(self) -> None:
        # The layouts differ: a peer decodes in the version of the handshake.
        one = dict((n, f) for n, _, f in read_vectors(1))["inspection"][4:]
        two = dict((n, f) for n, _, f in read_vectors(2))["inspection_v2"][4:]
        with self.assertRaises(DecodeError):
            decode_server_message(two, 1)
        with self.assertRaises(DecodeError):
            decode_server_message(one, 2)

    def test_unknown_error_code_is_kept(self) -> None:
        frame = dict((n, f) for n, _, f in read_vectors())["error_unknown_code"]
        message = decode_server_message(frame[4:])
        assert isinstance(message, ResponseMessage) and isinstance(message.response, ErrorResponse)
        self.assertEqual(message.response.error.code, 999)
        self.assertEqual(error_code_name(999), "unknown_999")
        self.assertEqual(error_code_name(301), "not_held")
        self.assertEqual(error_code_name(208), "not_an_integer")
        self.assertEqual(error_code_name(209), "deadlock")
        self.assertEqual(error_code_name(303), "guard_not_held")
        self.assertEqual(error_code_name(403), "value_too_large")
        self.assertEqual(error_code_name(404), "quota_exceeded")

    def test_version_3_is_version_2_plus_acquire_as(self) -> None:
        # The same layouts: version 2's Inspection decodes the same in 3.
        two = dict((n, f) for n, _, f in read_vectors(2))["inspection_v2"][4:]
        self.assertEqual(decode_server_message(two, 3), decode_server_message(two, 2))
        self.assertEqual(encode_server_message(decode_server_message(two, 2), 3), two)
        # An AcquireAs's acquire is an Acquire's fields, after the actor.
        frames = dict((n, f) for n, _, f in read_vectors(3))
        body = frames["acquire_as"][4:]
        plain = encode_client_message(RequestMessage(30, Acquire("deploy", LockKind.MUTEX, 1, 1, None)))
        self.assertEqual(body[:12], plain[:12])
        self.assertEqual(body[12:16], (17).to_bytes(4, "little"))
        self.assertEqual(body[24:], plain[16:])
        # The deadlock refusal is a BrokerError of its own, an InvalidRequest.
        from lockbroker.errors import Deadlock, InvalidRequest, broker_error

        message = decode_server_message(frames["error_deadlock"][4:], 3)
        assert isinstance(message, ResponseMessage) and isinstance(message.response, ErrorResponse)
        error = broker_error(message.response.error)
        self.assertIsInstance(error, Deadlock)
        self.assertIsInstance(error, InvalidRequest)
        self.assertEqual((error.code, error.code_name), (209, "deadlock"))

    def test_version_4_refusals_are_errors_of_their_own(self) -> None:
        from lockbroker.errors import Forbidden, InvalidRequest, Unsupported, broker_error

        frames = dict((n, f) for n, _, f in read_vectors(4))
        message = decode_server_message(frames["error_forbidden"][4:], 4)
        assert isinstance(message, ResponseMessage) and isinstance(message.response, ErrorResponse)
        error = broker_error(message.response.error)
        self.assertIsInstance(error, Forbidden)
        self.assertIsInstance(error, InvalidRequest)
        self.assertEqual((error.code, error.code_name), (211, "forbidden"))
        unsupported = broker_error(ErrorInfo(ErrorCode.UNSUPPORTED, "no"))
        self.assertIsInstance(unsupported, Unsupported)
        self.assertEqual(unsupported.code_name, "unsupported")

    def test_decoded_values_are_bytes(self) -> None:
        frames = dict((n, f) for n, _, f in read_vectors())
        message = decode_server_message(frames["state_value"][4:], 1)
        assert isinstance(message, ResponseMessage) and isinstance(message.response, StateValue)
        assert message.response.versioned is not None
        self.assertIs(type(message.response.versioned.value), bytes)
        event = decode_server_message(frames["event_state_changed"][4:])
        assert isinstance(event, EventMessage) and isinstance(event.event, StateChanged)
        self.assertIs(type(event.event.value), bytes)
        self.assertIs(type(event.event.change), ChangeKind)


class MalformedTest(unittest.TestCase):
    """Bodies PROTOCOL.md sections 2 and 3 call malformed are rejected."""

    def setUp(self) -> None:
        vectors = dict((n, f[4:]) for n, _, f in read_vectors())
        self.granted = vectors["granted"]
        self.welcome = vectors["welcome"]

    def test_empty_body(self) -> None:
        with self.assertRaises(DecodeError):
            decode_server_message(b"")

    def test_trailing_bytes(self) -> None:
        with self.assertRaises(DecodeError):
            decode_server_message(self.granted + b"\x00")

    def test_truncated(self) -> None:
        for n in range(1, len(self.granted)):
            with self.assertRaises(DecodeError):
                decode_server_message(self.granted[:n])

    def test_bool_other_than_0_or_1(self) -> None:
        with self.assertRaises(DecodeError):
            decode_server_message(self.granted[:-1] + b"\x02")

    def test_unknown_variant(self) -> None:
        with self.assertRaises(DecodeError):
            decode_server_message(b"\x04\x00\x00\x00")
        with self.assertRaises(DecodeError):
            decode_server_message(b"\x02\x00\x00\x00\x03\x00\x00\x00")  # Event 3
        with self.assertRaises(DecodeError):
            decode_client_message(b"\x01\x00\x00\x00" + bytes(8) + b"\x63\x00\x00\x00")  # Request 99
        with self.assertRaises(DecodeError):
            decode_server_message(b"\x01\x00\x00\x00" + bytes(8) + b"\x0e\x00\x00\x00")  # Response 14

    def test_unknown_change_kind(self) -> None:
        body = encode_server_message(EventMessage(StateChanged(1, "k", 2, ChangeKind.EXPIRED, None)))
        # ServerMessage + Event indexes, watch_id, key length, "k", version.
        index = 4 + 4 + 8 + 8 + 1 + 8
        self.assertEqual(body[index : index + 4], b"\x02\x00\x00\x00")  # change = Expired
        with self.assertRaises(DecodeError):
            decode_server_message(body[:index] + b"\x03" + body[index + 1 :])

    def test_option_tag(self) -> None:
        body = encode_client_message(RequestMessage(1, Acquire("x", LockKind.MUTEX, timeout_ms=None)))
        self.assertEqual(body[-1:], b"\x00")
        with self.assertRaises(DecodeError):
            decode_client_message(body[:-1] + b"\x02")

    def test_invalid_utf8(self) -> None:
        body = bytearray(self.welcome)
        body[14] = 0xFF  # first byte of "0.1.0"
        with self.assertRaises(DecodeError):
            decode_server_message(bytes(body))

    def test_length_past_the_body(self) -> None:
        body = bytearray(self.welcome)
        body[6] = 0xFF  # server_version length 5 -> 255
        with self.assertRaises(DecodeError):
            decode_server_message(bytes(body))

    def test_encode_out_of_range(self) -> None:
        with self.assertRaises(EncodeError):
            encode_client_message(RequestMessage(-1, Ping()))
        with self.assertRaises(EncodeError):
            encode_client_message(RequestMessage(1, ReleaseByName("x", 2**32)))
        with self.assertRaises(EncodeError):
            encode_client_message(RequestMessage(1, StateIncrement("x", 2**63)))
        with self.assertRaises(EncodeError):
            encode_client_message(RequestMessage(1, StateIncrement("x", -(2**63) - 1)))
        with self.assertRaises(EncodeError):
            encode_client_message(RequestMessage(1, StateSet("x", "text")))  # type: ignore[arg-type]

    def test_i64_extremes_and_byte_values(self) -> None:
        for delta in (-(2**63), -1, 0, 2**63 - 1):
            message = RequestMessage(1, StateIncrement("x", delta))
            self.assertEqual(decode_client_message(encode_client_message(message)), message)
        value = bytes(range(256))
        message = RequestMessage(2, StateSet("x", value))
        self.assertEqual(decode_client_message(encode_client_message(message)), message)
        body = encode_client_message(RequestMessage(2, StateSet("x", bytearray(value))))  # type: ignore[arg-type]
        self.assertEqual(body, encode_client_message(message))

    def test_byte_length_past_the_body(self) -> None:
        body = encode_server_message(ResponseMessage(1, StateValue(Versioned(b"abc", 1))))
        with self.assertRaises(DecodeError):
            decode_server_message(body[:-9])  # cut inside the value: length 3, fewer bytes left


class FastPathTest(unittest.TestCase):
    """The lock cycle's frames skip the codecs: the bytes must be the same."""

    def test_fast_requests_are_the_codecs_bytes(self) -> None:
        from lockbroker import protocol

        messages = [
            RequestMessage(i, request)
            for i in (0, 1, 2**64 - 1)
            for request in (
                Release(0),
                Release(2**64 - 1),
                Acquire("x", LockKind.MUTEX, 1, 1, None),
                Acquire("caf\u00e9/\U0001f512", LockKind.SEMAPHORE, 2**32 - 1, 7, 0),
                Acquire("", LockKind.RW_SHARED, 0, 1, 2**64 - 1),
                Acquire("n" * 300, LockKind.RW_EXCLUSIVE, 0, 1, 5),
                AcquireAs(1, Acquire("x", LockKind.MUTEX, 1, 1, None)),
                AcquireAs(2**64 - 1, Acquire("caf\u00e9", LockKind.SEMAPHORE, 9, 3, 2**64 - 1)),
            )
        ]
        for message in messages:
            fast = protocol._fast_request(message)
            self.assertIsNotNone(fast, message)
            self.assertEqual(fast, protocol._encode(protocol._CLIENT_MESSAGE, message), message)
            self.assertEqual(decode_client_message(encode_client_message(message)), message)
        # What the fast path does not take, the codecs refuse as before.
        for bad in (
            Release(-1),
            Release(2**64),
            Release(True),
            Acquire("x", LockKind.MUTEX, 1, 1, -5),
            AcquireAs(2**64, Acquire("x", LockKind.MUTEX)),
            AcquireAs(True, Acquire("x", LockKind.MUTEX)),
            AcquireAs(1, Acquire("x", LockKind.MUTEX, 1, 1, -5)),
        ):
            with self.assertRaises(EncodeError):
                encode_client_message(RequestMessage(1, bad))  # type: ignore[arg-type]

    def test_fast_answers_are_the_codecs_values(self) -> None:
        from lockbroker import protocol

        for message in (
            ResponseMessage(5, Granted(Grant(1, 2, False))),
            ResponseMessage(2**64 - 1, Granted(Grant(2**64 - 1, 2**64 - 1, True))),
            ResponseMessage(3, Released(0)),
            ResponseMessage(3, Released(2**32 - 1)),
        ):
            body = encode_server_message(message)
            self.assertEqual(decode_server_message(body), message)
            self.assertEqual(protocol._decode(protocol._SERVER_MESSAGE, body), message)
        # A bool other than 0 or 1 is still malformed, and so is a cut body.
        body = bytearray(encode_server_message(ResponseMessage(5, Granted(Grant(1, 2, True)))))
        body[-1] = 2
        with self.assertRaises(DecodeError):
            decode_server_message(bytes(body))
        with self.assertRaises(DecodeError):
            decode_server_message(bytes(body[:-1]))


class FrameBufferTest(unittest.TestCase):
    """Framing: split and merged reads, the maximum checked before the body."""

    def test_split_and_merged(self) -> None:
        frames = [f for _, _, f in read_vectors()]
        stream = b"".join(frames)
        buffer = FrameBuffer(max_len=4096)
        bodies = []
        for i in range(0, len(stream), 3):
            buffer.feed(stream[i : i + 3])
            body = buffer.next_body()
            while body is not None:
                bodies.append(body)
                body = buffer.next_body()
        self.assertEqual(bodies, [f[4:] for f in frames])
        self.assertFalse(buffer.has_partial())

    def test_too_large_before_the_body(self) -> None:
        buffer = FrameBuffer(max_len=10)
        buffer.feed((10).to_bytes(4, "little"))
        self.assertIsNone(buffer.next_body())  # equal to the maximum: allowed
        buffer = FrameBuffer(max_len=10)
        buffer.feed((11).to_bytes(4, "little"))
        with self.assertRaises(FrameTooLarge):
            buffer.next_body()


if __name__ == "__main__":
    unittest.main()

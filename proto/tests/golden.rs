//! Golden vectors of protocols v1 to v4: the bytes every implementation
//! must produce and accept.
//!
//! Three places hold the same frames, for each version N:
//!
//! - `proto/golden/vN.txt`, one vector per line as `NAME DIRECTION HEX`
//!   (read by the tests of every other-language client too);
//! - `PROTOCOL.md`, whose "Golden vectors" section repeats those lines in a
//!   fenced block opened by ` ```golden-vN `, names each vector in a table,
//!   and whose annotated blocks (opened by ` ```session-v1 ` and
//!   ` ```session-v1-state `) show some of v1's byte by byte;
//! - [`vectors`] below, which builds each named message in Rust.
//!
//! The tests check that encoding each message in its version gives the
//! file's bytes, that decoding the file's bytes in that version gives the
//! message back using every byte, and that the files, this test and
//! `PROTOCOL.md` name the same vectors with the same bytes, so none of them
//! can drift from the others.
//!
//! To add a vector, add it to [`vectors`] and run this test: its failure
//! prints the new line, to paste into `proto/golden/vN.txt` and into the
//! `golden-vN` block of `PROTOCOL.md`, with a row for it in that section's
//! table.

use std::collections::BTreeSet;
use std::path::PathBuf;

use lockbroker_proto::frame::{decode_in, encode_in};
use lockbroker_proto::{
    Acquire, AcquireOption, ChangeKind, ClientMessage, DEFAULT_MAX_FRAME_LEN, EntryInfo, EntryKind,
    ErrorCode, ErrorInfo, Event, Grant, HEADER_LEN, Hello, HolderInfo, Inspection, Limits,
    LockKind, MAGIC, PROTOCOL_VERSION, Request, Response, ServerInfo, ServerMessage, SessionInfo,
    StateEntry, StateSet, Versioned, WaiterInfo, Welcome,
};

/// A message of either direction.
#[derive(Debug)]
enum Message {
    /// Client to daemon.
    C2s(ClientMessage),
    /// Daemon to client.
    S2c(ServerMessage),
}

impl Message {
    fn direction(&self) -> &'static str {
        match self {
            Message::C2s(_) => "c2s",
            Message::S2c(_) => "s2c",
        }
    }

    /// Its frame in protocol `version`.
    fn to_frame(&self, version: u16) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::C2s(m) => encode_in(version, m, DEFAULT_MAX_FRAME_LEN, &mut out),
            Message::S2c(m) => encode_in(version, m, DEFAULT_MAX_FRAME_LEN, &mut out),
        }
        .expect("golden messages encode");
        out
    }

    /// Decodes `frame` as a message of this one's direction in protocol
    /// `version` and checks that it equals this one and used every byte.
    fn assert_decodes_from(&self, version: u16, name: &str, frame: &[u8]) {
        match self {
            Message::C2s(want) => {
                let (got, used) = decode_in::<ClientMessage>(version, frame, DEFAULT_MAX_FRAME_LEN)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
                    .unwrap_or_else(|| panic!("{name}: incomplete frame"));
                assert_eq!(&got, want, "{name}: decoded message");
                assert_eq!(used, frame.len(), "{name}: bytes used");
            }
            Message::S2c(want) => {
                let (got, used) = decode_in::<ServerMessage>(version, frame, DEFAULT_MAX_FRAME_LEN)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
                    .unwrap_or_else(|| panic!("{name}: incomplete frame"));
                assert_eq!(&got, want, "{name}: decoded message");
                assert_eq!(used, frame.len(), "{name}: bytes used");
            }
        }
    }
}

fn request(id: u64, request: Request) -> Message {
    Message::C2s(ClientMessage::Request { id, request })
}

fn response(id: u64, response: Response) -> Message {
    Message::S2c(ServerMessage::Response { id, response })
}

/// The annotated session's `Hello`, in protocol `version`.
fn hello(version: u16) -> Message {
    Message::C2s(ClientMessage::Hello(Hello {
        magic: MAGIC,
        version,
        client_name: "demo".into(),
    }))
}

/// The annotated session's `Welcome`, in protocol `version`.
fn welcome(version: u16) -> Message {
    Message::S2c(ServerMessage::Welcome(Welcome {
        version,
        server_version: "0.1.0".into(),
        session_id: 1,
        limits: Limits {
            max_frame_len: 2_097_152,
            max_pending: 1024,
            max_holds: 65_536,
        },
    }))
}

/// The versions with golden vectors: each has `proto/golden/vN.txt` and a
/// ` ```golden-vN ` block in `PROTOCOL.md`.
const VERSIONS: [u16; 4] = [1, 2, 3, PROTOCOL_VERSION];

/// Every golden vector of `version`, in the order of its file.
fn vectors(version: u16) -> Vec<(&'static str, Message)> {
    match version {
        1 => vectors_v1(),
        2 => vectors_v2(),
        3 => vectors_v3(),
        4 => vectors_v4(),
        _ => unreachable!("no vectors for version {version}"),
    }
}

/// What version 2 changed: the handshake's version, and `SessionInfo`
/// (two fields appended) in an `Inspection`. Every other message keeps
/// its version 1 bytes.
fn vectors_v2() -> Vec<(&'static str, Message)> {
    let mut inspection = inspection();
    let entry = &mut inspection.entries[0];
    entry.holders[0].session.host = "build-1".into();
    entry.holders[0].session.user = "alice".into();
    entry.waiters[0].session.host = "build-2".into();
    vec![
        ("hello_v2", hello(2)),
        ("welcome_v2", welcome(2)),
        (
            "inspection_v2",
            response(8, Response::Inspection(inspection)),
        ),
    ]
}

/// What version 3 added: `AcquireAs`, answered as `Acquire` is, and the
/// `deadlock` refusal. Every other message keeps its version 2 bytes.
fn vectors_v3() -> Vec<(&'static str, Message)> {
    vec![
        ("hello_v3", hello(3)),
        ("welcome_v3", welcome(3)),
        (
            "acquire_as",
            request(
                30,
                Request::AcquireAs {
                    actor: 0x0123_4567_89ab_cdef,
                    acquire: Acquire {
                        name: "deploy".into(),
                        kind: LockKind::Mutex,
                        capacity: 1,
                        permits: 1,
                        timeout_ms: None,
                    },
                },
            ),
        ),
        (
            "error_deadlock",
            response(
                30,
                Response::Error(ErrorInfo::new(
                    ErrorCode::Deadlock,
                    "waiting for \"deploy\" would deadlock",
                )),
            ),
        ),
    ]
}

/// What version 4 added: `AcquireWith`, answered as `Acquire` is, and the
/// event `Contended`. Every other message keeps its version 3 bytes.
fn vectors_v4() -> Vec<(&'static str, Message)> {
    vec![
        ("hello_v4", hello(4)),
        ("welcome_v4", welcome(4)),
        (
            "acquire_with",
            request(
                31,
                Request::AcquireWith {
                    acquire: Acquire {
                        name: "deploy".into(),
                        kind: LockKind::Mutex,
                        capacity: 1,
                        permits: 1,
                        timeout_ms: None,
                    },
                    options: vec![
                        AcquireOption::Actor(0x0123_4567_89ab_cdef),
                        AcquireOption::Within(vec![0x2a, 0xfedc_ba98_7654_3210]),
                        AcquireOption::NotifyContended,
                    ],
                },
            ),
        ),
        (
            "event_contended",
            Message::S2c(ServerMessage::Event(Event::Contended { hold_id: 7 })),
        ),
        (
            "acquire_leased",
            request(
                32,
                Request::AcquireWith {
                    acquire: Acquire {
                        name: "deploy".into(),
                        kind: LockKind::Mutex,
                        capacity: 1,
                        permits: 1,
                        timeout_ms: Some(1000),
                    },
                    options: vec![AcquireOption::Lease(30_000)],
                },
            ),
        ),
        (
            "extend_lease",
            request(
                33,
                Request::ExtendLease {
                    hold_id: 7,
                    lease_ms: 60_000,
                },
            ),
        ),
        (
            "event_revoked",
            Message::S2c(ServerMessage::Event(Event::Revoked {
                hold_id: 7,
                message: "its lease of 60s ran out".into(),
            })),
        ),
        (
            "break",
            request(
                34,
                Request::Break {
                    name: "deploy".into(),
                    hold_id: Some(7),
                },
            ),
        ),
        (
            "broken",
            response(34, Response::Broken { hold_ids: vec![7] }),
        ),
        (
            "error_forbidden",
            response(
                34,
                Response::Error(ErrorInfo::new(
                    ErrorCode::Forbidden,
                    "hold 7 of \"deploy\" is of uid 1000",
                )),
            ),
        ),
    ]
}

/// Every golden vector of version 1, in the order of `proto/golden/v1.txt`.
///
/// The first six are the annotated session of `PROTOCOL.md`; the ids of the
/// rest follow one imaginary session so that each answer matches a request.
fn vectors_v1() -> Vec<(&'static str, Message)> {
    vec![
        ("hello", hello(1)),
        ("welcome", welcome(1)),
        (
            "acquire_mutex",
            request(
                1,
                Request::Acquire(Acquire {
                    name: "deploy/status".into(),
                    kind: LockKind::Mutex,
                    capacity: 0,
                    permits: 1,
                    timeout_ms: Some(5000),
                }),
            ),
        ),
        (
            "granted",
            response(
                1,
                Response::Granted(Grant {
                    hold_id: 1,
                    fence: 1,
                    abandoned: false,
                }),
            ),
        ),
        ("release", request(2, Request::Release { hold_id: 1 })),
        ("released", response(2, Response::Released { permits: 1 })),
        (
            "acquire_semaphore",
            request(
                3,
                Request::Acquire(Acquire {
                    name: "pool/db".into(),
                    kind: LockKind::Semaphore,
                    capacity: 4,
                    permits: 2,
                    timeout_ms: None,
                }),
            ),
        ),
        ("cancel", request(4, Request::Cancel { request_id: 3 })),
        ("cancelled", response(3, Response::Cancelled)),
        ("done", response(4, Response::Done)),
        (
            "acquire_rw_shared_try",
            request(
                5,
                Request::Acquire(Acquire {
                    name: "config".into(),
                    kind: LockKind::RwShared,
                    capacity: 0,
                    permits: 1,
                    timeout_ms: Some(0),
                }),
            ),
        ),
        ("timed_out", response(5, Response::TimedOut)),
        (
            "acquire_rw_exclusive",
            request(
                6,
                Request::Acquire(Acquire {
                    name: "config".into(),
                    kind: LockKind::RwExclusive,
                    capacity: 0,
                    permits: 1,
                    timeout_ms: Some(250),
                }),
            ),
        ),
        (
            "granted_abandoned",
            response(
                6,
                Response::Granted(Grant {
                    hold_id: 7,
                    fence: 42,
                    abandoned: true,
                }),
            ),
        ),
        (
            "release_by_name",
            request(
                7,
                Request::ReleaseByName {
                    name: "pool/db".into(),
                    count: 2,
                },
            ),
        ),
        (
            "error_not_held",
            response(
                7,
                Response::Error(ErrorInfo::new(
                    ErrorCode::NotHeld,
                    "holds 0 of 2 permits on pool/db",
                )),
            ),
        ),
        (
            "inspect",
            request(
                8,
                Request::Inspect {
                    prefix: "deploy/".into(),
                    limit: 100,
                },
            ),
        ),
        (
            "inspection",
            response(8, Response::Inspection(inspection())),
        ),
        ("ping", request(9, Request::Ping)),
        ("pong", response(9, Response::Pong)),
        (
            "error_unknown_code",
            response(
                10,
                Response::Error(ErrorInfo::new(
                    ErrorCode::Other(999),
                    "from a later version",
                )),
            ),
        ),
        (
            "event_shutting_down",
            Message::S2c(ServerMessage::Event(Event::ShuttingDown)),
        ),
        (
            "fatal_bad_magic",
            Message::S2c(ServerMessage::Fatal(ErrorInfo::new(
                ErrorCode::BadMagic,
                "bad magic",
            ))),
        ),
        // Shared state. The session goes on: hold 1 is held again.
        (
            "state_get",
            request(
                11,
                Request::StateGet {
                    key: "cfg/mode".into(),
                },
            ),
        ),
        (
            "state_value",
            response(
                11,
                Response::StateValue(Some(Versioned {
                    value: b"fast".to_vec(),
                    version: 7,
                })),
            ),
        ),
        (
            "state_get_absent",
            request(
                12,
                Request::StateGet {
                    key: "cfg/none".into(),
                },
            ),
        ),
        ("state_value_none", response(12, Response::StateValue(None))),
        (
            "state_set",
            request(
                13,
                Request::StateSet(StateSet {
                    key: "cfg/mode".into(),
                    value: b"slow".to_vec(),
                    if_version: Some(7),
                    ttl_ms: Some(60_000),
                    guard: Some(1),
                }),
            ),
        ),
        (
            "state_written",
            response(13, Response::StateWritten { version: 8 }),
        ),
        (
            "state_set_plain",
            request(
                14,
                Request::StateSet(StateSet {
                    key: "cfg/mode".into(),
                    value: b"fast".to_vec(),
                    if_version: None,
                    ttl_ms: None,
                    guard: None,
                }),
            ),
        ),
        (
            "state_remove_if_version",
            request(
                15,
                Request::StateRemove {
                    key: "cfg/mode".into(),
                    if_version: Some(8),
                    guard: Some(1),
                },
            ),
        ),
        (
            "state_conflict",
            response(15, Response::StateConflict { current: 9 }),
        ),
        (
            "state_remove",
            request(
                16,
                Request::StateRemove {
                    key: "cfg/mode".into(),
                    if_version: None,
                    guard: None,
                },
            ),
        ),
        (
            "state_removed",
            response(
                16,
                Response::StateRemoved(Some(Versioned {
                    value: b"fast".to_vec(),
                    version: 9,
                })),
            ),
        ),
        (
            "state_remove_if_absent",
            request(
                17,
                Request::StateRemove {
                    key: "cfg/mode".into(),
                    if_version: Some(0),
                    guard: None,
                },
            ),
        ),
        (
            "state_removed_none",
            response(17, Response::StateRemoved(None)),
        ),
        (
            "state_increment",
            request(
                18,
                Request::StateIncrement {
                    key: "stats/hits".into(),
                    delta: -3,
                    guard: None,
                },
            ),
        ),
        (
            "state_counter",
            response(
                18,
                Response::StateCounter {
                    value: 39,
                    version: 11,
                },
            ),
        ),
        (
            "state_increment_guarded",
            request(
                19,
                Request::StateIncrement {
                    key: "stats/hits".into(),
                    delta: 1,
                    guard: Some(7),
                },
            ),
        ),
        (
            "error_guard_not_held",
            response(
                19,
                Response::Error(ErrorInfo::new(
                    ErrorCode::GuardNotHeld,
                    "this session does not hold 7",
                )),
            ),
        ),
        (
            "state_list",
            request(
                20,
                Request::StateList {
                    prefix: "stats/".into(),
                    start_after: "stats/a".into(),
                    limit: 2,
                    with_values: true,
                },
            ),
        ),
        (
            "state_entries",
            response(
                20,
                Response::StateEntries {
                    // One entry with a value and one without, to show both
                    // encodings; a daemon sends values for all or none.
                    entries: vec![
                        StateEntry {
                            key: "stats/b".into(),
                            version: 5,
                            value: Some(b"1".to_vec()),
                        },
                        StateEntry {
                            key: "stats/hits".into(),
                            version: 11,
                            value: None,
                        },
                    ],
                    more: true,
                },
            ),
        ),
        (
            "state_watch",
            request(
                21,
                Request::StateWatch {
                    key: "cfg/".into(),
                    prefix: true,
                    from_version: 8,
                    with_values: true,
                },
            ),
        ),
        (
            "event_state_changed",
            Message::S2c(ServerMessage::Event(Event::StateChanged {
                watch_id: 21,
                key: "cfg/mode".into(),
                version: 8,
                change: ChangeKind::Set,
                value: Some(b"slow".to_vec()),
            })),
        ),
        (
            "event_state_removed",
            Message::S2c(ServerMessage::Event(Event::StateChanged {
                watch_id: 21,
                key: "cfg/mode".into(),
                version: 10,
                change: ChangeKind::Removed,
                value: None,
            })),
        ),
        (
            "event_watch_lagged",
            Message::S2c(ServerMessage::Event(Event::WatchLagged { watch_id: 21 })),
        ),
        (
            "event_state_expired",
            Message::S2c(ServerMessage::Event(Event::StateChanged {
                watch_id: 21,
                key: "cfg/tmp".into(),
                version: 12,
                change: ChangeKind::Expired,
                value: None,
            })),
        ),
        (
            "state_watch_key",
            request(
                22,
                Request::StateWatch {
                    key: "stats/hits".into(),
                    prefix: false,
                    from_version: 0,
                    with_values: false,
                },
            ),
        ),
        (
            "state_unwatch",
            request(23, Request::StateUnwatch { watch_id: 21 }),
        ),
        ("release_on_close", request(24, Request::ReleaseOnClose)),
        (
            "state_fenced_set",
            request(
                25,
                Request::StateFenced {
                    lock: "deploy".into(),
                    fence: 42,
                    write: Box::new(Request::StateSet(StateSet {
                        key: "deploy/status".into(),
                        value: b"step 3".to_vec(),
                        if_version: None,
                        ttl_ms: None,
                        guard: None,
                    })),
                },
            ),
        ),
        (
            "error_stale_fence",
            response(
                25,
                Response::Error(ErrorInfo::new(ErrorCode::StaleFence, "stale fence 42")),
            ),
        ),
        (
            "inspect_after",
            request(
                26,
                Request::InspectAfter {
                    prefix: "deploy/".into(),
                    start_after: "deploy/a".into(),
                    limit: 100,
                },
            ),
        ),
        ("metrics", request(27, Request::Metrics)),
        (
            "metrics_text",
            response(
                27,
                Response::Metrics {
                    text: "lockbroker_sessions 2\n# EOF\n".into(),
                },
            ),
        ),
    ]
}

/// One mutex with one holder (every peer id known) and one waiter (pid
/// only, as on Windows).
fn inspection() -> Inspection {
    Inspection {
        server: ServerInfo {
            version: "0.1.0".into(),
            pid: 4242,
            uptime_ms: 90_000,
            sessions: 2,
        },
        entries: vec![EntryInfo {
            name: "deploy/status".into(),
            kind: EntryKind::Mutex,
            capacity: 1,
            abandoned: false,
            holders: vec![HolderInfo {
                session: SessionInfo {
                    session_id: 1,
                    pid: Some(1234),
                    uid: Some(1000),
                    gid: Some(1000),
                    client_name: "demo".into(),
                    ..SessionInfo::default()
                },
                hold_id: 1,
                kind: LockKind::Mutex,
                permits: 1,
                fence: 1,
                since_ms: 1_700_000_000_000,
            }],
            waiters: vec![WaiterInfo {
                session: SessionInfo {
                    session_id: 2,
                    pid: Some(5678),
                    uid: None,
                    gid: None,
                    client_name: "worker".into(),
                    ..SessionInfo::default()
                },
                request_id: 1,
                kind: LockKind::Mutex,
                permits: 1,
                since_ms: 1_700_000_000_250,
                timeout_ms: None,
            }],
        }],
        truncated: false,
    }
}

/// One line of a vector file: `NAME DIRECTION HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vector {
    name: String,
    direction: String,
    bytes: Vec<u8>,
}

fn repo_file(relative: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

fn hex_to_bytes(hex: &str, context: &str) -> Vec<u8> {
    assert!(
        hex.len().is_multiple_of(2),
        "{context}: odd number of hex digits in {hex}"
    );
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{context}: hex must be lowercase 0-9a-f: {hex}"
    );
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex"))
        .collect()
}

fn bytes_to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `NAME DIRECTION HEX` lines; `#` comments and blank lines are
/// skipped.
fn parse_vectors<'a>(lines: impl Iterator<Item = &'a str>, source: &str) -> Vec<Vector> {
    let mut out = Vec::new();
    for (number, line) in lines.enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let context = format!("{source}, vector line {}", number + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, direction, hex] = fields[..] else {
            panic!("{context}: expected `NAME DIRECTION HEX`, got {line:?}");
        };
        assert!(
            direction == "c2s" || direction == "s2c",
            "{context}: direction must be c2s or s2c, got {direction:?}"
        );
        out.push(Vector {
            name: name.to_owned(),
            direction: direction.to_owned(),
            bytes: hex_to_bytes(hex, &context),
        });
    }
    out
}

fn file_vectors(version: u16) -> Vec<Vector> {
    let (path, text) = repo_file(&format!("golden/v{version}.txt"));
    parse_vectors(text.lines(), &path.display().to_string())
}

fn protocol_md() -> String {
    repo_file("../PROTOCOL.md").1
}

/// The lines of the fenced block of `doc` opened by ```` ```tag ````.
fn fenced_block<'a>(doc: &'a str, tag: &str) -> Vec<&'a str> {
    let opening = format!("```{tag}");
    let mut lines = doc.lines().skip_while(|l| l.trim_end() != opening);
    assert!(
        lines.next().is_some(),
        "PROTOCOL.md has no block opened by {opening}"
    );
    let block: Vec<&str> = lines
        .by_ref()
        .take_while(|l| l.trim_end() != "```")
        .collect();
    block
}

fn unique_names<'a>(names: impl Iterator<Item = &'a str>, source: &str) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    for name in names {
        assert!(seen.insert(name), "{source}: vector {name} appears twice");
    }
    seen
}

#[test]
fn every_vector_encodes_to_and_decodes_from_the_file_bytes() {
    for version in VERSIONS {
        let file = file_vectors(version);
        for (name, message) in vectors(version) {
            let Some(vector) = file.iter().find(|v| v.name == name) else {
                panic!("proto/golden/v{version}.txt has no vector {name}");
            };
            assert_eq!(vector.direction, message.direction(), "{name}: direction");
            let encoded = message.to_frame(version);
            assert_eq!(
                bytes_to_hex(&encoded),
                bytes_to_hex(&vector.bytes),
                "{name}: encoding differs from the file"
            );
            let body_len = u32::from_le_bytes(vector.bytes[..HEADER_LEN].try_into().unwrap());
            assert_eq!(
                body_len as usize,
                vector.bytes.len() - HEADER_LEN,
                "{name}: length prefix"
            );
            message.assert_decodes_from(version, name, &vector.bytes);
        }
    }
}

/// A version 1 inspection decodes in version 2 to something else (the
/// layouts differ), and version 2 bytes are refused in version 1: a peer
/// must decode in the version agreed at the handshake.
#[test]
fn an_inspection_decodes_only_in_its_own_version() {
    let v1 = &file_vectors(1);
    let v2 = &file_vectors(2);
    let bytes = |file: &[Vector], name: &str| {
        file.iter()
            .find(|v| v.name == name)
            .expect("a vector")
            .bytes
            .clone()
    };
    let one = bytes(v1, "inspection");
    let two = bytes(v2, "inspection_v2");
    assert!(decode_in::<ServerMessage>(1, &two, DEFAULT_MAX_FRAME_LEN).is_err());
    assert!(decode_in::<ServerMessage>(2, &one, DEFAULT_MAX_FRAME_LEN).is_err());
}

#[test]
fn the_file_and_this_test_have_the_same_vectors_in_the_same_order() {
    for version in VERSIONS {
        let file = file_vectors(version);
        let ours = vectors(version);
        let source = format!("proto/golden/v{version}.txt");
        unique_names(file.iter().map(|v| v.name.as_str()), &source);
        unique_names(ours.iter().map(|(n, _)| *n), "vectors()");
        let file_names: Vec<&str> = file.iter().map(|v| v.name.as_str()).collect();
        let our_names: Vec<&str> = ours.iter().map(|(n, _)| *n).collect();
        // A vector added here but not to the file: say the line to paste.
        let lines: Vec<String> = ours
            .iter()
            .filter(|(name, _)| !file_names.contains(name))
            .map(|(name, message)| vector_line(version, name, message))
            .collect();
        assert_eq!(
            file_names,
            our_names,
            "lines for the vectors missing from {source} (and the golden-v{version} block of PROTOCOL.md):\n{}",
            lines.join("\n")
        );
    }
}

/// `message`'s line in `proto/golden/v{version}.txt`.
fn vector_line(version: u16, name: &str, message: &Message) -> String {
    format!(
        "{name} {} {}",
        message.direction(),
        bytes_to_hex(&message.to_frame(version))
    )
}

#[test]
fn protocol_md_repeats_the_file_vectors() {
    let doc = protocol_md();
    for version in VERSIONS {
        let tag = format!("golden-v{version}");
        let in_doc = parse_vectors(
            fenced_block(&doc, &tag).into_iter(),
            &format!("PROTOCOL.md {tag} block"),
        );
        assert_eq!(in_doc, file_vectors(version));
    }
}

#[test]
fn protocol_md_table_names_every_vector() {
    let doc = protocol_md();
    // Rows of the table in the golden-vector section: | `name` | dir | ... |
    let mut section = doc
        .lines()
        .skip_while(|l| !(l.starts_with("## ") && l.trim_end().ends_with("Golden vectors")));
    assert!(
        section.next().is_some(),
        "PROTOCOL.md has no `## ... Golden vectors` section"
    );
    let mut rows = Vec::new();
    for line in section.take_while(|l| !l.starts_with("## ")) {
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let (name, rest) = rest.split_once('`').expect("closing backtick");
        let direction = rest
            .trim_start_matches([' ', '|'])
            .split_whitespace()
            .next()
            .unwrap_or_default();
        rows.push((name, direction));
    }
    // The tables of every version, in order.
    let files: Vec<Vector> = VERSIONS.into_iter().flat_map(file_vectors).collect();
    let expected: Vec<(&str, &str)> = files
        .iter()
        .map(|v| (v.name.as_str(), v.direction.as_str()))
        .collect();
    assert_eq!(rows, expected);
}

/// The frames of an annotated block of `PROTOCOL.md`: a header line
/// `c2s NAME` or `s2c NAME` per frame, then lines of space-separated byte
/// pairs, two spaces, and a comment. Returns (direction, name, bytes).
fn annotated_frames(doc: &str, tag: &str) -> Vec<(String, String, Vec<u8>)> {
    let mut frames: Vec<(String, String, Vec<u8>)> = Vec::new();
    for line in fenced_block(doc, tag) {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(name) = line
            .strip_prefix("c2s ")
            .or_else(|| line.strip_prefix("s2c "))
        {
            let name = name.split_whitespace().next().expect("a vector name");
            frames.push((line[..3].to_owned(), name.to_owned(), Vec::new()));
            continue;
        }
        let (hex, _comment) = line.split_once("  ").unwrap_or((line, ""));
        let frame = frames
            .last_mut()
            .unwrap_or_else(|| panic!("{tag}: bytes before the first frame header: {line:?}"));
        for pair in hex.split(' ') {
            assert_eq!(pair.len(), 2, "{tag}: byte {pair:?} in {line:?}");
            frame.2.extend(hex_to_bytes(pair, line));
        }
    }
    frames
}

/// Checks that the annotated block `tag` shows exactly the vectors `names`,
/// in order, with the file's bytes.
fn check_annotated_block(tag: &str, names: &[&str]) {
    let doc = protocol_md();
    let file = file_vectors(1);
    let frames = annotated_frames(&doc, tag);
    let found: Vec<&str> = frames.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(found, names, "{tag}: frames");
    for (direction, name, bytes) in &frames {
        let vector = file
            .iter()
            .find(|v| &v.name == name)
            .unwrap_or_else(|| panic!("{tag}: no vector {name}"));
        assert_eq!(direction, &vector.direction, "{tag}: {name}: direction");
        assert_eq!(
            bytes_to_hex(bytes),
            bytes_to_hex(&vector.bytes),
            "{tag}: {name}: annotated bytes"
        );
    }
}

/// The annotated session of `PROTOCOL.md` (a block opened by
/// ` ```session-v1 `).
#[test]
fn protocol_md_annotated_session_matches_the_vectors() {
    check_annotated_block(
        "session-v1",
        &[
            "hello",
            "welcome",
            "acquire_mutex",
            "granted",
            "release",
            "released",
        ],
    );
}

/// The annotated shared-state frames of `PROTOCOL.md` (a block opened by
/// ` ```session-v1-state `).
#[test]
fn protocol_md_annotated_state_frames_match_the_vectors() {
    check_annotated_block(
        "session-v1-state",
        &[
            "state_set",
            "state_increment",
            "state_entries",
            "event_state_changed",
        ],
    );
}

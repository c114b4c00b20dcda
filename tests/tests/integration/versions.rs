//! Protocol versions: a daemon speaks 1 and 2, and answers each session in
//! its own; version 2's `Inspect` names each session's host and user; the
//! clients fall back to version 1 with a daemon of before version 2.

use std::path::Path;
use std::time::Duration;

use lockbroker::{Client, Connector, LockKind, blocking};
use lockbroker_proto::frame::{self, decode_in};
use lockbroker_proto::{
    ClientMessage, DEFAULT_MAX_FRAME_LEN, EntryInfo, EntryKind, ErrorCode, ErrorInfo, HolderInfo,
    Inspection, Limits, Request, Response, ServerInfo, ServerMessage, SessionInfo, Welcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::util::{Raw, acquire, bounded, on_both_backends};

/// This host's name and this process's account name, from the system
/// files rather than the daemon's own calls.
fn host_and_user() -> (String, String) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("the host name")
        .trim()
        .to_owned();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() }.to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let user = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&uid.as_str()))
        .map_or_else(String::new, |fields| fields[0].to_owned());
    (host, user)
}

on_both_backends! {
/// Holders and waiters are named by host and user, as a version 2 session
/// sees them (over etcd: from the record the holder's daemon wrote).
async fn inspect_names_the_host_and_user_of_each_session(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let holder = daemon.client().await;
        let waiter = daemon.client().await;
        let _held = holder.mutex("who").acquire().await.unwrap();
        let waiting = waiter.mutex("who");
        let _pending = tokio::spawn(async move { waiting.acquire().await });
        crate::util::waiters(&holder, "who", 1).await;
        let (host, user) = host_and_user();
        let entry = &holder.inspect("who").await.unwrap().entries[0];
        for session in [&entry.holders[0].session, &entry.waiters[0].session] {
            assert_eq!(session.host, host, "{session:?}");
            if !user.is_empty() {
                assert_eq!(session.user, user, "{session:?}");
            }
            assert_eq!(session.pid, Some(std::process::id()));
        }
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// A version 1 session is welcomed in version 1 and its `Inspect` answered
/// in version 1's layout (decoded here in version 1: version 2 bytes would
/// not decode), so clients of before version 2 keep working.
async fn a_version_1_session_is_answered_in_version_1(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut old = Raw::connect(&daemon.socket).await;
        old.hello_in(1).await;
        let granted = old.call(1, acquire("v1", LockKind::Mutex, 0, 1, None)).await;
        assert!(matches!(granted, Response::Granted(_)), "{granted:?}");
        let Response::Inspection(seen) = old
            .call(2, lockbroker_proto::Request::Inspect { prefix: "v1".into(), limit: 0 })
            .await
        else {
            panic!("expected an inspection");
        };
        let session = &seen.entries[0].holders[0].session;
        assert_eq!(session.client_name, "raw");
        assert_eq!((session.host.as_str(), session.user.as_str()), ("", ""));
        // The same daemon answers a version 2 session with host and user.
        let client = daemon.client().await;
        let entry = &client.inspect("v1").await.unwrap().entries[0];
        assert_eq!(entry.holders[0].session.host, host_and_user().0);
        daemon.stop().await;
    })
    .await
}
}

/// A daemon of version `speaks` (1 to 3), by hand: it refuses a later
/// `Hello` with `unsupported_version`, as such daemons do, welcomes its
/// own, and answers every `Inspect` with one holder, in its layout, and
/// every other request with `Error(malformed)`, as if it could not decode
/// it (an `AcquireAs` or `AcquireWith`, which only versions 3 and 4
/// have, would be a fatal one before them). It
/// serves `connections` connections, one after another.
async fn old_daemon(listener: UnixListener, connections: usize, speaks: u16) {
    for _ in 0..connections {
        let (mut stream, _) = listener.accept().await.unwrap();
        let version = match read(&mut stream, 2).await {
            Some(ClientMessage::Hello(hello)) => hello.version,
            other => panic!("expected a hello, got {other:?}"),
        };
        if version != speaks {
            let refusal = ErrorInfo::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "client speaks protocol version {version}; this daemon speaks version {speaks}"
                ),
            );
            write(&mut stream, &ServerMessage::Fatal(refusal), 1).await;
            continue;
        }
        write(
            &mut stream,
            &ServerMessage::Welcome(Welcome {
                version: speaks,
                server_version: "0.1.0".into(),
                session_id: 1,
                limits: Limits {
                    max_frame_len: DEFAULT_MAX_FRAME_LEN,
                    max_pending: 1024,
                    max_holds: 65536,
                },
            }),
            speaks,
        )
        .await;
        while let Some(ClientMessage::Request { id, request }) = read(&mut stream, speaks).await {
            let response = match request {
                Request::Inspect { .. } => Response::Inspection(old_inspection()),
                other => Response::Error(ErrorInfo::new(
                    ErrorCode::Malformed,
                    format!("not for this test: {other:?}"),
                )),
            };
            write(
                &mut stream,
                &ServerMessage::Response { id, response },
                speaks,
            )
            .await;
        }
    }
}

fn old_inspection() -> Inspection {
    Inspection {
        server: ServerInfo {
            version: "0.1.0".into(),
            pid: 1,
            uptime_ms: 1,
            sessions: 1,
        },
        entries: vec![EntryInfo {
            name: "old".into(),
            kind: EntryKind::Mutex,
            capacity: 1,
            abandoned: false,
            holders: vec![HolderInfo {
                session: SessionInfo {
                    session_id: 7,
                    pid: Some(77),
                    client_name: "before".into(),
                    ..SessionInfo::default()
                },
                hold_id: 1,
                kind: LockKind::Mutex,
                permits: 1,
                fence: 1,
                since_ms: 0,
            }],
            waiters: Vec::new(),
        }],
        truncated: false,
    }
}

/// One frame from `stream`, decoded in `version`; `None` at its end.
async fn read(stream: &mut UnixStream, version: u16) -> Option<ClientMessage> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.ok()?;
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
    stream.read_exact(&mut frame[4..]).await.ok()?;
    let (msg, _) = decode_in(version, &frame, DEFAULT_MAX_FRAME_LEN)
        .unwrap()
        .unwrap();
    Some(msg)
}

async fn write(stream: &mut UnixStream, msg: &ServerMessage, version: u16) {
    let mut frame = Vec::new();
    frame::encode_in(version, msg, DEFAULT_MAX_FRAME_LEN, &mut frame).unwrap();
    // The client may have closed after a Fatal.
    let _ = stream.write_all(&frame).await;
}

fn old_connector(socket: &Path) -> Connector {
    Connector::new().socket(socket).client_name("new")
}

/// The async and the blocking client, refused versions 4, 3 and 2, connect
/// again in version 1 and read the daemon's answers in its layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_speak_version_1_with_a_daemon_of_before_version_2() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("old.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // Each client: three refused connections, then one in version 1.
        let server = tokio::spawn(old_daemon(listener, 8, 1));
        let client: Client = old_connector(&socket).connect().await.unwrap();
        let seen = client.inspect("").await.unwrap();
        assert_eq!(seen.entries[0].holders[0].session.client_name, "before");
        assert_eq!(seen.entries[0].holders[0].session.pid, Some(77));
        drop(client);
        let connector = old_connector(&socket);
        let seen = tokio::task::spawn_blocking(move || {
            let client = blocking::Client::connect_with(&connector).unwrap();
            client.inspect("").unwrap()
        })
        .await
        .unwrap();
        assert_eq!(seen.entries[0].holders[0].session.client_name, "before");
        server.await.unwrap();
    })
    .await
}

/// A client asking for deadlock detection, refused versions 4 and 3, speaks
/// version 2 with the daemon and sends it plain `Acquire`s, which it
/// knows: the request is answered, not the connection ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_daemon_gets_plain_acquires() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("v2.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(old_daemon(listener, 3, 2));
        let client: Client = old_connector(&socket)
            .detect_deadlocks(true)
            .connect()
            .await
            .unwrap();
        let err = client.mutex("x").acquire().await.unwrap_err();
        // The stand-in daemon answers every acquire so; what matters is
        // that it could read it, and the session goes on.
        assert_eq!(err.code(), Some(ErrorCode::Malformed), "{err:?}");
        assert!(err.to_string().contains("Acquire(Acquire"), "{err}");
        client.inspect("").await.unwrap();
        drop(client);
        server.await.unwrap();
    })
    .await
}

/// A client whose actor runs within others, refused version 4, speaks
/// version 3 and sends `AcquireAs` of its actor alone, which such a daemon
/// knows (a cycle through the wrapper is then not seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_daemon_gets_the_actor_alone() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("v3.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(old_daemon(listener, 2, 3));
        let client: Client = old_connector(&socket)
            .actor(5)
            .within([7, 8])
            .connect()
            .await
            .unwrap();
        let err = client.mutex("x").acquire().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Malformed), "{err:?}");
        assert!(err.to_string().contains("AcquireAs { actor: 5,"), "{err}");
        // What version 4 added is refused before anything is sent.
        let err = client.break_lock("x", None).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unsupported), "{err:?}");
        let err = client
            .mutex("x")
            .lease(Duration::from_secs(1))
            .acquire()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unsupported), "{err:?}");
        let err = client
            .mutex("x")
            .notify_contended()
            .acquire()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unsupported), "{err:?}");
        client.inspect("").await.unwrap();
        drop(client);
        server.await.unwrap();
    })
    .await
}

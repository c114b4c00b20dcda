//! Bad input: each gets its documented error, the daemon never falls over,
//! and another session keeps working throughout.

use lockbroker::{ErrorCode, LockGuard, LockKind};
use lockbroker_proto::{ClientMessage, Hello, MAGIC, Request, Response, ServerMessage};

use crate::util::{Daemon, Raw, acquire, bounded, hold_over_raw};

/// A bystander session holding a lock; checked after every bad input.
struct Bystander {
    client: lockbroker::Client,
    guard: LockGuard,
}

impl Bystander {
    async fn new(daemon: &Daemon) -> Bystander {
        let client = daemon.client().await;
        let guard = client.mutex("bystander").acquire().await.unwrap();
        Bystander { client, guard }
    }

    async fn still_fine(&self) {
        self.client.ping().await.expect("bystander can ping");
        let info = self.client.inspect("bystander").await.unwrap();
        assert_eq!(
            info.entries[0].holders[0].hold_id,
            self.guard.hold_id(),
            "hold kept"
        );
    }
}

/// Expects a fatal error with `code`, then the connection closed.
async fn expect_fatal(raw: &mut Raw, code: ErrorCode) {
    match raw.recv().await {
        Some(ServerMessage::Fatal(e)) => assert_eq!(e.code, code, "{}", e.message),
        other => panic!("expected fatal {code}, got {other:?}"),
    }
    assert!(
        raw.recv().await.is_none(),
        "connection stays open after a fatal error"
    );
}

fn hello(magic: u32, version: u16, name: &str) -> ClientMessage {
    ClientMessage::Hello(Hello {
        magic,
        version,
        client_name: name.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_handshakes_close_only_their_connection() {
    bounded(async {
        let daemon = Daemon::start().await;
        let bystander = Bystander::new(&daemon).await;

        // An oversized length: refused before any body is read.
        let mut raw = Raw::connect(&daemon.socket).await;
        raw.send_bytes(&u32::MAX.to_le_bytes()).await;
        expect_fatal(&mut raw, ErrorCode::FrameTooLarge).await;
        bystander.still_fine().await;

        // Garbage that is not a message.
        let mut raw = Raw::connect(&daemon.socket).await;
        raw.send_bytes(&[5, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0xff])
            .await;
        expect_fatal(&mut raw, ErrorCode::Malformed).await;
        bystander.still_fine().await;

        // A valid hello followed by garbage: after the handshake too.
        let mut raw = daemon.raw().await;
        raw.send_bytes(&[3, 0, 0, 0, 9, 9, 9]).await;
        expect_fatal(&mut raw, ErrorCode::Malformed).await;

        // A zero-length frame.
        let mut raw = daemon.raw().await;
        raw.send_bytes(&[0, 0, 0, 0]).await;
        expect_fatal(&mut raw, ErrorCode::Malformed).await;

        // A truncated frame, then the client half-closes: the daemon
        // closes too. (A pipe has no half-close; on both platforms
        // `a_client_gone_mid_frame_loses_its_holds` closes the whole
        // connection instead.)
        #[cfg(unix)]
        {
            let mut raw = Raw::connect(&daemon.socket).await;
            raw.send_bytes(&[100, 0, 0, 0, 1, 2, 3]).await;
            raw.shutdown_write().await;
            assert!(raw.recv().await.is_none());
            bystander.still_fine().await;
        }

        // Wrong magic, wrong version, a bad client name.
        let mut raw = Raw::connect(&daemon.socket).await;
        raw.send(&hello(0x1234_5678, 1, "x")).await;
        expect_fatal(&mut raw, ErrorCode::BadMagic).await;
        for version in [0, lockbroker_proto::PROTOCOL_VERSION + 1] {
            let mut raw = Raw::connect(&daemon.socket).await;
            raw.send(&hello(MAGIC, version, "x")).await;
            expect_fatal(&mut raw, ErrorCode::UnsupportedVersion).await;
        }
        let mut raw = Raw::connect(&daemon.socket).await;
        raw.send(&hello(MAGIC, 1, "bad\nname")).await;
        expect_fatal(&mut raw, ErrorCode::InvalidArgument).await;

        // A request before the handshake.
        let mut raw = Raw::connect(&daemon.socket).await;
        raw.request(1, Request::Ping).await;
        expect_fatal(&mut raw, ErrorCode::HandshakeRequired).await;

        // A second hello.
        let mut raw = daemon.raw().await;
        raw.send(&hello(MAGIC, 1, "again")).await;
        expect_fatal(&mut raw, ErrorCode::UnexpectedHello).await;

        bystander.still_fine().await;
        daemon.stop().await;
    })
    .await
}

/// A client that goes away in the middle of a frame (the whole connection
/// closed, as a killed process closes a pipe) loses what it held: the
/// waiter is granted, told the lock was abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_frame_loses_its_holds() {
    bounded(async {
        let daemon = Daemon::start().await;
        let mut raw = hold_over_raw(&daemon.socket, "held").await;
        let client = daemon.client().await;
        let waiter = client.mutex("held");
        let waiting = tokio::spawn(async move { waiter.acquire().await });
        raw.send_bytes(&[100, 0, 0, 0, 1, 2, 3]).await;
        drop(raw);
        let g = waiting.await.unwrap().unwrap();
        assert!(g.abandoned());
        daemon.stop().await;
    })
    .await
}

/// A fatal error still frees what the session held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_releases_the_sessions_holds() {
    bounded(async {
        let daemon = Daemon::start().await;
        let mut raw = daemon.raw().await;
        assert!(matches!(
            raw.call(1, acquire("held", LockKind::Mutex, 0, 1, None))
                .await,
            Response::Granted(_)
        ));
        raw.send_bytes(&u32::MAX.to_le_bytes()).await;
        expect_fatal(&mut raw, ErrorCode::FrameTooLarge).await;
        let client = daemon.client().await;
        let g = client.mutex("held").acquire().await.unwrap();
        assert!(g.abandoned());
        daemon.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_connection_stays_usable() {
    bounded(async {
        let daemon = Daemon::start().await;
        let bystander = Bystander::new(&daemon).await;
        let mut raw = daemon.raw().await;
        // Make "sem" a busy semaphore of capacity 2 and "mx" a busy mutex.
        assert!(matches!(
            raw.call(1, acquire("sem", LockKind::Semaphore, 2, 1, None))
                .await,
            Response::Granted(_)
        ));
        assert!(matches!(
            raw.call(2, acquire("mx", LockKind::Mutex, 0, 1, None))
                .await,
            Response::Granted(_)
        ));
        let cases: Vec<(Request, ErrorCode)> = vec![
            (
                acquire("", LockKind::Mutex, 0, 1, None),
                ErrorCode::InvalidName,
            ),
            (
                acquire(&"n".repeat(256), LockKind::Mutex, 0, 1, None),
                ErrorCode::InvalidName,
            ),
            (
                acquire("nul\0", LockKind::Mutex, 0, 1, None),
                ErrorCode::InvalidName,
            ),
            (
                acquire("ok", LockKind::Mutex, 0, 0, None),
                ErrorCode::InvalidPermits,
            ),
            (
                acquire("ok", LockKind::Mutex, 0, 2, None),
                ErrorCode::PermitsAboveCapacity,
            ),
            (
                acquire("ok", LockKind::Semaphore, 0, 1, None),
                ErrorCode::InvalidCapacity,
            ),
            (
                acquire("ok", LockKind::Semaphore, 3, 4, None),
                ErrorCode::PermitsAboveCapacity,
            ),
            (
                acquire("ok", LockKind::RwShared, 0, 2, None),
                ErrorCode::InvalidPermits,
            ),
            (
                acquire("sem", LockKind::Semaphore, 3, 1, None),
                ErrorCode::CapacityMismatch,
            ),
            (
                acquire("sem", LockKind::Mutex, 0, 1, None),
                ErrorCode::KindMismatch,
            ),
            (
                acquire("mx", LockKind::Semaphore, 2, 1, None),
                ErrorCode::KindMismatch,
            ),
            (
                acquire("sem", LockKind::RwShared, 0, 1, None),
                ErrorCode::KindMismatch,
            ),
            (Request::Release { hold_id: 424242 }, ErrorCode::UnknownHold),
            (
                Request::ReleaseByName {
                    name: "mx".into(),
                    count: 2,
                },
                ErrorCode::NotHeld,
            ),
            (
                Request::ReleaseByName {
                    name: "none".into(),
                    count: 1,
                },
                ErrorCode::NotHeld,
            ),
            (
                Request::ReleaseByName {
                    name: "mx".into(),
                    count: 0,
                },
                ErrorCode::InvalidPermits,
            ),
            (
                Request::ReleaseByName {
                    name: "".into(),
                    count: 1,
                },
                ErrorCode::InvalidName,
            ),
            (Request::Cancel { request_id: 77 }, ErrorCode::NotPending),
            (
                Request::Inspect {
                    prefix: "\u{7}".into(),
                    limit: 0,
                },
                ErrorCode::InvalidName,
            ),
        ];
        for (i, (request, code)) in cases.into_iter().enumerate() {
            let id = 100 + i as u64;
            match raw.call(id, request.clone()).await {
                Response::Error(e) => assert_eq!(e.code, code, "{request:?}: {}", e.message),
                other => panic!("{request:?} gave {other:?}"),
            }
            assert_eq!(raw.call(1000 + id, Request::Ping).await, Response::Pong);
        }
        // Another session's hold cannot be released by this one.
        match raw
            .call(
                9,
                Request::Release {
                    hold_id: bystander.guard.hold_id(),
                },
            )
            .await
        {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::UnknownHold),
            other => panic!("{other:?}"),
        }
        // A duplicate id of a waiting acquire is refused; the first goes on.
        raw.request(10, acquire("bystander", LockKind::Mutex, 0, 1, None))
            .await;
        match raw
            .call(10, acquire("other", LockKind::Mutex, 0, 1, None))
            .await
        {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::DuplicateRequestId),
            other => panic!("{other:?}"),
        }
        let info = bystander.client.inspect("bystander").await.unwrap();
        assert_eq!(info.entries[0].waiters[0].request_id, 10);
        bystander.still_fine().await;
        daemon.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_clear_errors_not_hangs() {
    bounded(async {
        let daemon = Daemon::start_with(|c| {
            c.max_connections = 3;
            c.limits.max_pending = 2;
            c.limits.max_holds = 3;
        })
        .await;
        let bystander = Bystander::new(&daemon).await; // connection 1
        let mut raw = daemon.raw().await; // connection 2
        // Two waits are allowed, a third is refused; a try is still fine.
        for id in 1..=2 {
            raw.request(id, acquire("bystander", LockKind::Mutex, 0, 1, None))
                .await;
        }
        match raw
            .call(3, acquire("bystander", LockKind::Mutex, 0, 1, None))
            .await
        {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::TooManyPending),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            raw.call(4, acquire("bystander", LockKind::Mutex, 0, 1, Some(0)))
                .await,
            Response::TimedOut
        );
        // Holds plus waits are capped at three.
        assert!(matches!(
            raw.call(5, acquire("free", LockKind::Mutex, 0, 1, None))
                .await,
            Response::Granted(_)
        ));
        match raw
            .call(6, acquire("free2", LockKind::Mutex, 0, 1, None))
            .await
        {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::TooManyHolds),
            other => panic!("{other:?}"),
        }
        // Connection 3 is fine, connection 4 is refused with a reason.
        let _third = daemon.raw().await;
        let mut fourth = Raw::connect(&daemon.socket).await;
        expect_fatal(&mut fourth, ErrorCode::TooManyConnections).await;
        let err = daemon.connector().connect().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::TooManyConnections), "{err}");
        bystander.still_fine().await;
        daemon.stop().await;
    })
    .await
}

/// A response too large for a frame becomes an error, not a dead session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_inspection_is_an_error() {
    bounded(async {
        let daemon = Daemon::start_with(|c| c.limits.max_frame_len = 4096).await;
        let client = daemon.client().await;
        let mut guards = Vec::new();
        for i in 0..100 {
            guards.push(
                client
                    .mutex(format!("lock/{i:03}"))
                    .acquire()
                    .await
                    .unwrap(),
            );
        }
        let err = client.inspect("lock/").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::ResponseTooLarge), "{err}");
        let some = client.inspect_limit("lock/", 5).await.unwrap();
        assert_eq!(some.entries.len(), 5);
        assert!(some.truncated);
        assert_eq!(some.entries[0].name, "lock/000");
        daemon.stop().await;
    })
    .await
}

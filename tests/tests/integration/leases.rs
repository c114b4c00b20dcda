//! Leases (`AcquireWith` with `Lease`, `ExtendLease`, protocol version 4):
//! a hold whose lease runs out is revoked — its guard is lost, the client
//! told, the next holder granted with `abandoned` — and `extend` moves the
//! end; a lease racing a release ends the hold once, either way; bad
//! leases and the etcd backend are refused.

use std::time::Duration;

use lockbroker::ErrorCode;
use lockbroker_proto::{Acquire, AcquireOption, LockKind, Request, Response};

use crate::util::{Backend, bounded, waiters};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_lease_runs_out_is_revoked_and_the_next_told_abandoned() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let holder = daemon.client().await;
        let guard = holder
            .mutex("l")
            .lease(Duration::from_millis(50))
            .acquire()
            .await
            .unwrap();
        assert!(!guard.is_lost());
        let next = daemon.client().await;
        let m = next.mutex("l");
        let waiting = tokio::spawn(async move { m.acquire().await });
        waiters(&holder, "l", 1).await;
        guard.lost().await;
        assert!(guard.is_revoked() && guard.is_lost());
        assert!(!holder.is_lost(), "the session goes on");
        let granted = waiting.await.unwrap().unwrap();
        assert!(granted.abandoned(), "the next holder is told");
        assert!(granted.fence() > guard.fence());
        // The revoked hold is the session's no more.
        let err = guard.release().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::UnknownHold), "{err:?}");
        granted.release().await.unwrap();
        // A hold without a lease is never revoked; nor is one whose
        // lease was extended past the other's end.
        let plain = holder.mutex("p").acquire().await.unwrap();
        let long = holder
            .mutex("q")
            .lease(Duration::from_secs(3600))
            .acquire()
            .await
            .unwrap();
        let short = holder
            .mutex("r")
            .lease(Duration::from_secs(3600))
            .acquire()
            .await
            .unwrap();
        short.extend(Duration::from_millis(20)).await.unwrap();
        short.lost().await;
        holder.inspect("").await.unwrap();
        assert!(!plain.is_lost() && !long.is_lost());
        // `extend` gives a lease to a hold that had none.
        plain.extend(Duration::from_millis(20)).await.unwrap();
        plain.lost().await;
        assert!(plain.is_revoked());
        let err = plain.extend(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::UnknownHold), "{err:?}");
        daemon.stop().await;
    })
    .await;
}

/// A lease that runs out as its holder releases: the hold ends once —
/// released, or revoked with the client told — and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_racing_a_release_ends_the_hold_once() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let client = daemon.client().await;
        let (mut released, mut revoked) = (0, 0);
        for i in 0..200u64 {
            let guard = client
                .mutex("race")
                .lease(Duration::from_millis(1 + i % 3))
                .acquire()
                .await
                .unwrap();
            if i % 2 == 0 {
                tokio::task::yield_now().await;
            }
            let seen_revoked = guard.is_revoked();
            match guard.release().await {
                Ok(()) => {
                    assert!(!seen_revoked, "released after it was revoked");
                    released += 1;
                }
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::UnknownHold), "{e:?}");
                    revoked += 1;
                }
            }
        }
        assert_eq!(released + revoked, 200);
        let seen = client.inspect("race").await.unwrap();
        assert!(seen.entries.iter().all(|e| e.holders.is_empty()));
        assert!(client.mutex("race").try_acquire().await.unwrap().is_some());
        daemon.stop().await;
    })
    .await;
}

/// A lease of 0 or too long, and `ExtendLease` of 0 or of a hold the
/// session does not have, are refused; nothing is held; the session goes
/// on. The etcd backend refuses leases with `unsupported`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_leases_are_refused() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let mut raw = daemon.raw().await;
        for (id, ms) in [(1, 0), (2, (1 << 40) + 1)] {
            let request = Request::AcquireWith {
                acquire: Acquire {
                    name: "b".into(),
                    kind: LockKind::Mutex,
                    capacity: 1,
                    permits: 1,
                    timeout_ms: None,
                },
                options: vec![AcquireOption::Lease(ms)],
            };
            match raw.call(id, request).await {
                Response::Error(e) => {
                    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
                    assert!(e.message.contains("a lease of"), "{}", e.message);
                }
                other => panic!("expected invalid_argument, got {other:?}"),
            }
        }
        let extend = |hold_id, lease_ms| Request::ExtendLease { hold_id, lease_ms };
        match raw.call(3, extend(99, 1000)).await {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::UnknownHold, "{e:?}"),
            other => panic!("expected unknown_hold, got {other:?}"),
        }
        match raw.call(4, extend(99, 0)).await {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}"),
            other => panic!("expected invalid_argument, got {other:?}"),
        }
        assert_eq!(raw.call(5, Request::Ping).await, Response::Pong);
        let observer = daemon.client().await;
        assert!(observer.inspect("b").await.unwrap().entries.is_empty());
        daemon.stop().await;
    })
    .await;
    let Some(etcd) = Backend::etcd().await else {
        return;
    };
    bounded(async {
        let daemon = etcd.start().await;
        let client = daemon.client().await;
        let err = client
            .mutex("e")
            .lease(Duration::from_secs(5))
            .acquire()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unsupported), "{err:?}");
        let plain = client.mutex("e").acquire().await.unwrap();
        let err = plain.extend(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unsupported), "{err:?}");
        daemon.stop().await;
    })
    .await;
}

/// The blocking client: a guard whose lease runs out is lost.
#[test]
fn the_blocking_client_sees_its_lease_run_out() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let daemon = rt.block_on(Backend::Local.start());
    let client = lockbroker::blocking::Client::connect_with(&daemon.connector()).unwrap();
    let guard = client
        .mutex("bl")
        .lease(Duration::from_secs(3600))
        .acquire()
        .unwrap();
    assert!(!guard.is_lost());
    guard.extend(Duration::from_millis(20)).unwrap();
    assert!(guard.wait_lost(Duration::from_secs(20)));
    assert!(guard.is_lost() && guard.is_revoked());
    assert!(guard.revocation().unwrap().contains("ran out"));
    assert!(!client.is_lost());
    let again = client.mutex("bl").try_acquire().unwrap().unwrap();
    assert!(again.abandoned());
    // Broken through the blocking client: its own hold, here.
    let other = lockbroker::blocking::Client::connect_with(&daemon.connector()).unwrap();
    assert_eq!(other.break_lock("bl", None).unwrap(), [again.hold_id()]);
    assert!(again.wait_lost(Duration::from_secs(20)));
    drop(again);
    rt.block_on(daemon.stop());
}

/// `break_lock`: another session's hold is revoked — its guard is lost,
/// saying who broke it — and the next holder told it was abandoned; a
/// name nobody holds is `not_held`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_hold_is_revoked_and_its_holder_told() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let holder = daemon.client().await;
        let guard = holder.mutex("k").acquire().await.unwrap();
        let breaker = daemon
            .connector()
            .client_name("breaker")
            .connect()
            .await
            .unwrap();
        let broken = breaker
            .break_lock("k", Some(guard.hold_id()))
            .await
            .unwrap();
        assert_eq!(broken, [guard.hold_id()]);
        guard.lost().await;
        let why = guard.revocation().unwrap();
        assert!(
            why.starts_with("broken by session") && why.contains("\"breaker\""),
            "{why}"
        );
        let next = breaker.mutex("k").acquire().await.unwrap();
        assert!(next.abandoned());
        drop(next);
        let err = breaker.break_lock("k", None).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotHeld), "{err:?}");
        let err = breaker.break_lock("", None).await.unwrap_err();
        assert!(
            matches!(err, lockbroker::Error::InvalidName { .. }),
            "{err:?}"
        );
        daemon.stop().await;
    })
    .await;
}

/// A break racing the grant to a waiter: whatever the order, the waiter's
/// client believes it holds the lock exactly when the daemon says it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_racing_a_grant_leaves_client_and_daemon_agreeing() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let holder = daemon.client().await;
        let waiter = daemon.client().await;
        let breaker = daemon.client().await;
        for _ in 0..100 {
            let first = holder.mutex("g").acquire().await.unwrap();
            let m = waiter.mutex("g");
            let waiting = tokio::spawn(async move { m.acquire().await.unwrap() });
            waiters(&breaker, "g", 1).await;
            let b = breaker.clone();
            let breaking = tokio::spawn(async move { b.break_lock("g", None).await });
            first.release().await.ok();
            let guard = waiting.await.unwrap();
            let _ = breaking.await.unwrap();
            // Whatever the daemon said of the hold came before this answer.
            let seen = waiter.inspect("g").await.unwrap();
            let held = seen
                .entries
                .iter()
                .any(|e| e.holders.iter().any(|h| h.hold_id == guard.hold_id()));
            assert_eq!(held, !guard.is_lost(), "the client and the daemon disagree");
            drop(guard);
            breaker.inspect("").await.unwrap();
        }
        daemon.stop().await;
    })
    .await;
}

/// A leased hold released by name ends its lease with it: the session
/// serves on (it once spun on the stale lease end for ever, and the next
/// lease's revocation never came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_hold_released_by_name_takes_its_lease_along() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let client = daemon.client().await;
        let first = client
            .mutex("n1")
            .lease(Duration::from_millis(5))
            .acquire()
            .await
            .unwrap();
        first.keep_until_session_ends();
        assert_eq!(client.release_by_name("n1", 1).await.unwrap(), 1);
        let second = client
            .mutex("n2")
            .lease(Duration::from_millis(30))
            .acquire()
            .await
            .unwrap();
        second.lost().await;
        assert!(second.is_revoked());
        assert_eq!(client.ping().await.map(|_| ()).unwrap(), ());
        daemon.stop().await;
    })
    .await;
}

/// A client of protocol version 3 cannot be told one of its holds was
/// broken: its session ends (`holds_lost`), so it never goes on believing
/// it holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaking_an_old_clients_hold_ends_its_session() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let mut old = lockbroker_tests::harness::Raw::connect(&daemon.socket).await;
        old.hello_in(3).await;
        let acquire = Request::Acquire(Acquire {
            name: "o".into(),
            kind: LockKind::Mutex,
            capacity: 1,
            permits: 1,
            timeout_ms: None,
        });
        let hold = match old.call(1, acquire).await {
            Response::Granted(g) => g.hold_id,
            other => panic!("{other:?}"),
        };
        let breaker = daemon.client().await;
        assert_eq!(breaker.break_lock("o", None).await.unwrap(), [hold]);
        match old.recv().await {
            Some(lockbroker_proto::ServerMessage::Fatal(e)) => {
                assert_eq!(e.code, ErrorCode::HoldsLost, "{e:?}");
                assert!(e.message.contains("broken by session"), "{}", e.message);
            }
            other => panic!("expected holds_lost, got {other:?}"),
        }
        old.assert_closed().await;
        daemon.stop().await;
    })
    .await;
}

//! Deadlock detection (`AcquireAs`, protocol version 3, and
//! `AcquireWith`'s `Actor` and `Within`, version 4): a wait that could never be granted is
//! refused with `deadlock`, naming the cycle, and nothing else is touched;
//! through the async client (fixed actors, and actors within others as a
//! command runs within its wrapper) and the blocking one (each thread its
//! own actor); bad options are refused; and with the etcd backend,
//! which detects nothing, the same waits queue.

use std::time::Duration;

use lockbroker::{Client, Error, ErrorCode};
use lockbroker_proto::{Acquire, AcquireOption, LockKind, MAX_WITHIN, Request, Response};

use crate::util::{Backend, bounded, wait_until_blocking, waiters};

async fn client_as(daemon: &lockbroker_tests::harness::Daemon, actor: u64) -> Client {
    daemon
        .connector()
        .client_name(format!("actor {actor}"))
        .actor(actor)
        .connect()
        .await
        .unwrap()
}

fn refused_as_deadlock(err: Error) -> String {
    assert_eq!(err.code(), Some(ErrorCode::Deadlock), "{err:?}");
    err.to_string()
}

#[tokio::test]
async fn two_sessions_waiting_for_each_other_one_is_refused() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let a = client_as(&daemon, 1).await;
        let b = client_as(&daemon, 2).await;
        let x = a.mutex("x").acquire().await.unwrap();
        let y = b.mutex("y").acquire().await.unwrap();
        let a_y = a.mutex("y");
        let waiting = tokio::spawn(async move { a_y.acquire().await });
        waiters(&b, "y", 1).await;
        let message = refused_as_deadlock(b.mutex("x").acquire().await.unwrap_err());
        assert!(
            message.contains("waiting for \"x\" would deadlock")
                && message.contains("held by session")
                && message.contains("\"actor 1\"")
                && message.contains("which waits for \"y\""),
            "{message}"
        );
        // Nothing else moved: a still waits, b still holds y, no waiter on x.
        let seen = b.inspect("").await.unwrap();
        let x_entry = seen.entries.iter().find(|e| e.name == "x").unwrap();
        assert!(x_entry.waiters.is_empty());
        assert_eq!(x_entry.holders.len(), 1);
        // b gives way; a is served.
        y.release().await.unwrap();
        let got = waiting.await.unwrap().unwrap();
        got.release().await.unwrap();
        x.release().await.unwrap();
        daemon.stop().await;
    })
    .await;
}

async fn client_within(
    daemon: &lockbroker_tests::harness::Daemon,
    actor: u64,
    within: &[u64],
) -> Client {
    daemon
        .connector()
        .client_name(format!("actor {actor}"))
        .actor(actor)
        .within(within.iter().copied())
        .connect()
        .await
        .unwrap()
}

/// The issue's two scripts as four sessions: wrappers 1 and 2 hold x and
/// y; command 11 (within 1) waits for y; command 21 (within 2) would wait
/// for x: refused, naming the sessions on both sides. Commands side by
/// side within one wrapper are not one actor: the second queues.
#[tokio::test]
async fn commands_within_wrappers_waiting_for_each_other_are_refused() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let w1 = client_as(&daemon, 1).await;
        let w2 = client_as(&daemon, 2).await;
        let c1 = client_within(&daemon, 11, &[1]).await;
        let c2 = client_within(&daemon, 21, &[2]).await;
        let x = w1.mutex("x").acquire().await.unwrap();
        let _y = w2.mutex("y").acquire().await.unwrap();
        let c1_y = c1.mutex("y");
        let waiting = tokio::spawn(async move { c1_y.acquire().await });
        waiters(&c2, "y", 1).await;
        let message = refused_as_deadlock(c2.mutex("x").acquire().await.unwrap_err());
        assert!(
            message.contains("this session waits for \"x\", held by session")
                && message.contains("\"actor 1\"")
                && message.contains(", which waits, through session")
                && message.contains("\"actor 11\"), for \"y\", held by session")
                && message.contains("\"actor 2\"), on whose behalf this session acts"),
            "{message}"
        );
        // A sibling of command 11 within wrapper 1 waits for x's other
        // users, not for itself: it queues behind command 11's hold.
        let sibling = client_within(&daemon, 12, &[1]).await;
        let inner = c1.mutex("inner");
        let first = inner.acquire().await.unwrap();
        let sibling_inner = sibling.mutex("inner");
        let second = tokio::spawn(async move { sibling_inner.acquire().await });
        waiters(&c1, "inner", 1).await;
        first.release().await.unwrap();
        second.await.unwrap().unwrap().release().await.unwrap();
        // Nothing else moved: command 11 still waits for y.
        assert!(!waiting.is_finished());
        drop(x);
        daemon.stop().await;
    })
    .await;
}

/// Bad options are `invalid_argument`: `Within` unbounded, with a 0, or
/// without an `Actor`; an `Actor` of 0; an option twice. Nothing is queued
/// or held, and the session goes on.
#[tokio::test]
async fn bad_acquire_options_are_refused_and_nothing_is_lost() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let mut raw = daemon.raw().await;
        let acquire = || Acquire {
            name: "w".into(),
            kind: LockKind::Mutex,
            capacity: 1,
            permits: 1,
            timeout_ms: None,
        };
        let too_deep: Vec<u64> = (1..=MAX_WITHIN as u64 + 1).collect();
        let bad = [
            (
                vec![AcquireOption::Actor(9), AcquireOption::Within(too_deep)],
                "at most 32 actors",
            ),
            (
                vec![AcquireOption::Actor(9), AcquireOption::Within(vec![5, 0])],
                "at most 32 actors, none 0",
            ),
            (
                vec![AcquireOption::Within(vec![5])],
                "`Within` needs an `Actor`",
            ),
            (vec![AcquireOption::Actor(0)], "the actor 0 is no actor"),
            (
                vec![
                    AcquireOption::NotifyContended,
                    AcquireOption::NotifyContended,
                ],
                "given twice",
            ),
        ];
        for (id, (options, why)) in (1..).zip(bad) {
            let request = Request::AcquireWith {
                acquire: acquire(),
                options,
            };
            match raw.call(id, request).await {
                Response::Error(e) => {
                    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
                    assert!(e.message.contains(why), "{}", e.message);
                }
                other => panic!("expected invalid_argument, got {other:?}"),
            }
        }
        // The deepest allowed is taken, and the session still serves.
        let deepest: Vec<u64> = (1..=MAX_WITHIN as u64).collect();
        let request = Request::AcquireWith {
            acquire: acquire(),
            options: vec![
                AcquireOption::Within(deepest),
                AcquireOption::NotifyContended,
                AcquireOption::Actor(9),
            ],
        };
        assert!(matches!(raw.call(10, request).await, Response::Granted(_)));
        let observer = daemon.client().await;
        let seen = observer.inspect("w").await.unwrap();
        assert_eq!(seen.entries[0].holders.len(), 1);
        assert!(seen.entries[0].waiters.is_empty());
        daemon.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_cycle_of_three_across_kinds_is_refused() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let a = client_as(&daemon, 1).await;
        let b = client_as(&daemon, 2).await;
        let c = client_as(&daemon, 3).await;
        let _m = a.mutex("m").acquire().await.unwrap();
        let _s = b.semaphore("s", 2).acquire_many(2).await.unwrap();
        let _r = c.rwlock("r").read().await.unwrap();
        let a_s = a.semaphore("s", 2);
        let a_waits = tokio::spawn(async move { a_s.acquire().await });
        waiters(&c, "s", 1).await;
        let b_r = b.rwlock("r");
        let b_waits = tokio::spawn(async move { b_r.write().await });
        waiters(&c, "r", 1).await;
        let message = refused_as_deadlock(c.mutex("m").acquire().await.unwrap_err());
        for name in ["\"m\"", "\"s\"", "\"r\""] {
            assert!(message.contains(name), "{message}");
        }
        // A reader that waits for nothing else is no part of a cycle.
        let d = client_as(&daemon, 4).await;
        assert!(
            d.rwlock("r").try_read().await.unwrap().is_none(),
            "a writer waits"
        );
        drop((a_waits, b_waits));
        daemon.stop().await;
    })
    .await;
}

/// Each thread of the blocking client is its own actor: two threads
/// that take two locks in opposite orders, and meet, are told.
#[test]
fn blocking_threads_taking_locks_in_opposite_orders() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let daemon = rt.block_on(Backend::Local.start());
    let connector = daemon.connector().detect_deadlocks(true);
    let one = lockbroker::blocking::Client::connect_with(&connector).unwrap();
    let two = lockbroker::blocking::Client::connect_with(&connector).unwrap();
    let y = two.mutex("y").acquire().unwrap();
    let first = {
        let one = one.clone();
        std::thread::spawn(move || {
            let _x = one.mutex("x").acquire().unwrap();
            // Waits for y, until the other thread gives up.
            one.mutex("y").acquire().map(drop)
        })
    };
    wait_until_blocking("the first thread waits for y", || {
        two.inspect("y").unwrap().entries[0].waiters.len() == 1
    });
    let err = two.mutex("x").acquire().unwrap_err();
    refused_as_deadlock(err);
    drop(y);
    assert!(first.join().unwrap().is_ok(), "the first thread gets y");
    rt.block_on(daemon.stop());
}

/// With the etcd backend nothing is detected: the waits queue, as plain
/// acquires do, and end as theirs would (here, by a timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_backend_queues_what_it_cannot_judge() {
    let Some(etcd) = Backend::etcd().await else {
        return;
    };
    bounded(async {
        let daemon = etcd.start().await;
        let a = client_as(&daemon, 1).await;
        let b = client_as(&daemon, 2).await;
        let _x = a.mutex("x").acquire().await.unwrap();
        let _y = b.mutex("y").acquire().await.unwrap();
        let a_y = a.mutex("y");
        let waiting =
            tokio::spawn(async move { a_y.acquire_timeout(Duration::from_millis(300)).await });
        waiters(&b, "y", 1).await;
        let got = b
            .mutex("x")
            .acquire_timeout(Duration::from_millis(300))
            .await
            .unwrap();
        assert!(got.is_none(), "timed out, not refused");
        assert!(waiting.await.unwrap().unwrap().is_none());
        daemon.stop().await;
    })
    .await;
}

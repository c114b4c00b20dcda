//! Deadlock detection (`AcquireAs`, protocol version 3): a wait that
//! could never be granted is refused with `deadlock`, naming the cycle,
//! and nothing else is touched; through the async client (fixed actors)
//! and the blocking one (each thread its own actor); and with the etcd
//! backend, which detects nothing, the same waits queue.

use std::time::Duration;

use lockbroker::{Client, Error, ErrorCode};

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

//! Semaphores: capacity never exceeded, release by count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use lockbroker::{ErrorCode, LockKind};
use lockbroker_proto::{Request, Response};

use crate::util::{acquire, bounded, on_both_backends, waiters};

on_both_backends! {
async fn capacity_is_never_exceeded_by_32_clients(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let in_use = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for i in 0..32u32 {
            let client = daemon.client().await;
            let (in_use, peak) = (Arc::clone(&in_use), Arc::clone(&peak));
            tasks.push(tokio::spawn(async move {
                let sem = client.semaphore("cap", 4);
                for round in 0..20u32 {
                    let k = 1 + (i + round) % 2;
                    let guard = sem.acquire_many(k).await.unwrap();
                    let now = in_use.fetch_add(k, Ordering::SeqCst) + k;
                    peak.fetch_max(now, Ordering::SeqCst);
                    assert!(now <= 4, "{now} permits in use");
                    tokio::task::yield_now().await;
                    in_use.fetch_sub(k, Ordering::SeqCst);
                    guard.release().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            peak.load(Ordering::SeqCst) >= 2,
            "the test never overlapped holders"
        );
        let client = daemon.client().await;
        assert!(client.inspect("").await.unwrap().entries.is_empty());
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn release_by_count_and_over_release(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let client = daemon.client().await;
        let sem = client.semaphore("pool", 5);
        let a = sem.acquire_many(2).await.unwrap();
        let b = sem.acquire_many(2).await.unwrap();
        // Over-release is an error and releases nothing.
        let err = client.release_by_name("pool", 5).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotHeld));
        let held =
            |i: lockbroker::Inspection| i.entries[0].holders.iter().map(|h| h.permits).sum::<u32>();
        assert_eq!(held(client.inspect("pool").await.unwrap()), 4);
        // Three permits: all of the oldest hold, one of the next.
        assert_eq!(client.release_by_name("pool", 3).await.unwrap(), 3);
        assert_eq!(held(client.inspect("pool").await.unwrap()), 1);
        // The first hold is gone, so releasing its guard is an error.
        let err = a.release().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::UnknownHold));
        b.release().await.unwrap();
        assert!(client.inspect("").await.unwrap().entries.is_empty());
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn capacity_mismatch_while_busy_then_free_to_change(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let client = daemon.client().await;
        let g = client.semaphore("m", 3).acquire().await.unwrap();
        let err = client.semaphore("m", 4).acquire().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::CapacityMismatch));
        g.release().await.unwrap();
        let g = client.semaphore("m", 4).acquire_many(4).await.unwrap();
        assert_eq!(g.permits(), 4);
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// One release of more holds than etcd takes operations in a transaction
/// (128): the daemon splits it, and every hold is released, none taken for
/// abandoned; the waiter behind them is granted.
async fn a_release_of_150_holds_at_once_frees_them_all(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut holder = daemon.raw().await;
        for id in 1..=150 {
            holder
                .request(id, acquire("wide", LockKind::Semaphore, 150, 1, None))
                .await;
        }
        for _ in 1..=150 {
            assert!(matches!(holder.response().await.1, Response::Granted(_)));
        }
        let mut waiter = daemon.raw().await;
        waiter
            .request(1, acquire("wide", LockKind::Semaphore, 150, 1, None))
            .await;
        let client = daemon.client().await;
        waiters(&client, "wide", 1).await;
        let release = Request::ReleaseByName {
            name: "wide".into(),
            count: 150,
        };
        assert_eq!(
            holder.call(200, release).await,
            Response::Released { permits: 150 }
        );
        match waiter.response().await {
            (1, Response::Granted(g)) => assert!(!g.abandoned, "{g:?}"),
            other => panic!("{other:?}"),
        }
        let entry = &client.inspect("wide").await.unwrap().entries[0];
        assert_eq!(entry.holders.len(), 1, "{entry:?}");
        assert!(entry.waiters.is_empty());
        daemon.stop().await;
    })
    .await
}
}

//! Cancellation: by request, and by dropping the acquire future.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use lockbroker::{ErrorCode, LockKind};
use lockbroker_proto::{Request, Response};

use crate::util::{Backend, acquire, bounded, on_both_backends, wait_until};

on_both_backends! {
async fn dropping_the_acquire_future_removes_the_waiter(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let a = daemon.client().await;
        let b = daemon.client().await;
        let c = daemon.client().await;
        let held = a.mutex("c").acquire().await.unwrap();
        let b_mutex = b.mutex("c");
        let waiting = tokio::spawn(async move { b_mutex.acquire().await });
        wait_until("b waits", || async {
            a.inspect("c").await.unwrap().entries[0].waiters.len() == 1
        })
        .await;
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        wait_until("b's waiter is gone", || async {
            a.inspect("c").await.unwrap().entries[0].waiters.is_empty()
        })
        .await;
        // The next waiter is served when the holder lets go.
        let c_mutex = c.mutex("c");
        let next = tokio::spawn(async move { c_mutex.acquire().await.unwrap() });
        wait_until("c waits", || async {
            a.inspect("c").await.unwrap().entries[0].waiters.len() == 1
        })
        .await;
        held.release().await.unwrap();
        let g = next.await.unwrap();
        assert_eq!(g.name(), "c");
        daemon.stop().await;
    })
    .await
}
}

/// An acquire future dropped after its grant reached the client but before
/// it was polled again (a timeout firing just then) releases that grant:
/// the grant is in the future's channel, so neither the cancel (too late)
/// nor the connection task (it delivered the grant) would. Local only: the
/// order the test relies on (the grant before the next answer) is the
/// local backend's.
#[tokio::test]
async fn an_acquire_dropped_with_its_grant_unread_releases_it() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let a = daemon.client().await;
        let b = daemon.client().await;
        let held = a.mutex("g").acquire().await.unwrap();
        let b_mutex = b.mutex("g");
        let mut pending = Box::pin(b_mutex.acquire());
        // Polled once: the acquire is sent and waits.
        let first = std::future::poll_fn(|cx| Poll::Ready(pending.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        // Answered after the acquire, so the acquire is queued by now.
        assert_eq!(b.inspect("g").await.unwrap().entries[0].waiters.len(), 1);
        held.release().await.unwrap();
        // The grant was written to b before this answer: it is routed to
        // the future, which is never polled again.
        let holders = &b.inspect("g").await.unwrap().entries[0].holders;
        assert_eq!(holders[0].session.session_id, b.session_id());
        drop(pending);
        // The release is on the wire before this inspect.
        let left = b.inspect("g").await.unwrap().entries;
        assert!(left.is_empty(), "the dropped grant leaked: {left:?}");
        daemon.stop().await;
    })
    .await
}

on_both_backends! {
/// A future dropped just as the grant arrives must not leak the hold: the
/// client releases a grant nobody waits for.
async fn a_cancel_racing_a_grant_leaks_nothing(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let a = daemon.client().await;
        let b = daemon.client().await;
        // A grant comes microseconds after the release in memory, and
        // milliseconds after it over etcd (where a cycle costs as much).
        let (cycles, unit) = if matches!(backend, Backend::Local) {
            (200, Duration::from_micros(1))
        } else {
            (50, Duration::from_micros(20))
        };
        for i in 0..cycles {
            let held = a.mutex("r").acquire().await.unwrap();
            let b_mutex = b.mutex("r");
            // Give up after a few units to a few hundred: sometimes before
            // the grant, sometimes just after it.
            let patience = unit * ((i * 37) % 400);
            let attempt =
                tokio::spawn(
                    async move { tokio::time::timeout(patience, b_mutex.acquire()).await },
                );
            held.release().await.unwrap();
            if let Ok(Ok(guard)) = attempt.await.unwrap() {
                guard.release().await.unwrap();
            }
        }
        wait_until("every hold is released", || async {
            a.inspect("").await.unwrap().entries.is_empty()
        })
        .await;
        // The lock is free for a try.
        assert!(a.mutex("r").try_acquire().await.unwrap().is_some());
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn cancel_request_answers_the_acquire_then_itself(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let a = daemon.client().await;
        let held = a.mutex("x").acquire().await.unwrap();
        let mut raw = daemon.raw().await;
        raw.request(1, acquire("x", LockKind::Mutex, 0, 1, None))
            .await;
        raw.request(2, Request::Cancel { request_id: 1 }).await;
        assert_eq!(raw.response().await, (1, Response::Cancelled));
        assert_eq!(raw.response().await, (2, Response::Done));
        // Cancelling it again, or something never asked, is an error.
        for (id, target) in [(3, 1), (4, 99)] {
            match raw.call(id, Request::Cancel { request_id: target }).await {
                Response::Error(e) => assert_eq!(e.code, ErrorCode::NotPending),
                other => panic!("{other:?}"),
            }
        }
        // A granted acquire is no longer pending either.
        held.release().await.unwrap();
        assert!(matches!(
            raw.call(5, acquire("x", LockKind::Mutex, 0, 1, None)).await,
            Response::Granted(_)
        ));
        match raw.call(6, Request::Cancel { request_id: 5 }).await {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::NotPending),
            other => panic!("{other:?}"),
        }
        daemon.stop().await;
    })
    .await
}
}

//! Timeouts, and the race between a deadline and a grant.

use std::collections::HashMap;
use std::time::Duration;

use lockbroker::LockKind;
use lockbroker_proto::{Request, Response};

use crate::util::{Backend, acquire, bounded, on_both_backends};

on_both_backends! {
async fn an_expired_wait_holds_nothing(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let a = daemon.client().await;
        let b = daemon.client().await;
        let held = a.mutex("t").acquire().await.unwrap();
        let started = std::time::Instant::now();
        let got = b
            .mutex("t")
            .acquire_timeout(Duration::from_millis(50))
            .await
            .unwrap();
        assert!(got.is_none());
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "gave up early"
        );
        let info = a.inspect("t").await.unwrap();
        assert!(
            info.entries[0].waiters.is_empty(),
            "the timed-out waiter is gone"
        );
        held.release().await.unwrap();
        assert!(
            a.inspect("").await.unwrap().entries.is_empty(),
            "nothing held"
        );
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// Thousands of acquires whose deadlines land near other sessions'
/// releases: every acquire is answered exactly once, granted or timed out,
/// and at the end every permit is free.
async fn deadlines_racing_grants_end_exactly_once(backend) {
    bounded(async {
        let daemon = backend.start().await;
        // Deadlines in steps of about a grant's cost: a millisecond here,
        // tens over etcd (whose cluster takes fewer acquires at once).
        let (n, step) = match backend {
            Backend::Local => (300, 1),
            Backend::Etcd => (40, 25),
        };
        let mut sessions = Vec::new();
        for s in 0..8u64 {
            let mut raw = daemon.raw().await;
            // One acquire first, so that the session's set-up (over etcd,
            // its lease) is not inside the deadlines.
            let warm = acquire("warm", LockKind::Mutex, 0, 1, None);
            let Response::Granted(g) = raw.call(u64::MAX - 1, warm).await else {
                panic!("not granted");
            };
            let release = Request::Release { hold_id: g.hold_id };
            let released = raw.call(u64::MAX - 1, release).await;
            assert_eq!(released, Response::Released { permits: 1 });
            sessions.push(tokio::spawn(async move {
                // Pipeline every acquire at once, with deadlines of 0..4
                // steps.
                for id in 1..=n {
                    let timeout = (id * 7 + s) % 5 * step;
                    raw.request(
                        id,
                        acquire("race", LockKind::Semaphore, 2, 1, Some(timeout)),
                    )
                    .await;
                }
                let mut outcome: HashMap<u64, Response> = HashMap::new();
                let mut releases = 0;
                let mut granted = 0;
                while (outcome.len() as u64) < n || releases < granted {
                    let (id, response) = raw.response().await;
                    if id > n {
                        assert!(
                            matches!(response, Response::Released { permits: 1 }),
                            "{response:?}"
                        );
                        releases += 1;
                        continue;
                    }
                    if let Response::Granted(g) = &response {
                        granted += 1;
                        raw.request(n + g.hold_id, Request::Release { hold_id: g.hold_id })
                            .await;
                    } else {
                        assert_eq!(response, Response::TimedOut);
                    }
                    let previous = outcome.insert(id, response);
                    assert!(previous.is_none(), "acquire {id} answered twice");
                }
                // Nothing further arrives for this session: ping is next.
                assert_eq!(raw.call(u64::MAX, Request::Ping).await, Response::Pong);
                granted
            }));
        }
        let mut granted = 0;
        for s in sessions {
            granted += s.await.unwrap();
        }
        assert!(granted > 0);
        let client = daemon.client().await;
        assert!(
            client.inspect("").await.unwrap().entries.is_empty(),
            "a permit leaked"
        );
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// Deadlines run on the daemon's clock; a long one does not fire early and
/// an absurd one means "wait forever" rather than an error.
async fn huge_timeouts_wait_like_none(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let a = daemon.client().await;
        let mut raw = daemon.raw().await;
        let held = a.mutex("h").acquire().await.unwrap();
        raw.request(1, acquire("h", LockKind::Mutex, 0, 1, Some(u64::MAX)))
            .await;
        assert_eq!(raw.call(2, Request::Ping).await, Response::Pong);
        held.release().await.unwrap();
        let (id, response) = raw.response().await;
        assert_eq!(id, 1);
        assert!(matches!(response, Response::Granted(_)), "{response:?}");
        daemon.stop().await;
    })
    .await
}
}

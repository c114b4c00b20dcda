//! Strict FIFO: grants in arrival order, no barging, no starvation.

use std::sync::{Arc, Mutex as StdMutex};

use crate::util::{bounded, on_both_backends, waiters};

on_both_backends! {
async fn mutex_waiters_are_granted_in_arrival_order(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let observer = daemon.client().await;
        let holder = daemon.client().await.mutex("q").acquire().await.unwrap();
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..6 {
            let client = daemon.client().await;
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let guard = client.mutex("q").acquire().await.unwrap();
                order.lock().unwrap().push(i);
                guard.release().await.unwrap();
            }));
            // Queue them one by one so arrival order is known.
            waiters(&observer, "q", i + 1).await;
        }
        let other = daemon.client().await;
        holder.release().await.unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
        // Served and released: the entry is gone and free again.
        assert!(other.mutex("q").try_acquire().await.unwrap().is_some());
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn a_try_fails_while_anyone_waits_even_with_free_permits(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let a = daemon.client().await;
        let b = daemon.client().await;
        let pool = a.semaphore("pool", 3);
        let two = pool.acquire_many(2).await.unwrap();
        // b's k=3 request waits at the head; one permit is free.
        let b_pool = b.semaphore("pool", 3);
        let big = tokio::spawn(async move { b_pool.acquire_many(3).await.unwrap() });
        waiters(&a, "pool", 1).await;
        assert!(
            pool.try_acquire().await.unwrap().is_none(),
            "try jumped the queue"
        );
        drop(two);
        let big = big.await.unwrap();
        assert_eq!(big.permits(), 3);
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// A k=3 request at the head is not starved by k=1 requests behind it,
/// though they would fit sooner.
async fn semaphore_head_with_many_permits_is_not_starved(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let observer = daemon.client().await;
        let first = observer.semaphore("s", 3).acquire_many(2).await.unwrap();
        let mut sessions = Vec::new();
        let mut tasks = Vec::new();
        for (i, k) in [3u32, 1, 1, 2].into_iter().enumerate() {
            let client = daemon.client().await;
            sessions.push(client.session_id());
            tasks.push(tokio::spawn(async move {
                client.semaphore("s", 3).acquire_many(k).await.unwrap()
            }));
            waiters(&observer, "s", i + 1).await;
        }
        // The daemon's holders, in grant order, as (session, permits).
        let holders = || async {
            let info = observer.inspect("s").await.unwrap();
            let e = &info.entries[0];
            let h: Vec<(u64, u32)> = e
                .holders
                .iter()
                .map(|h| (h.session.session_id, h.permits))
                .collect();
            (h, e.waiters.len())
        };
        // One permit is free, but the head wants three: nobody moves.
        assert_eq!(holders().await, (vec![(observer.session_id(), 2)], 4));
        first.release().await.unwrap();
        // The k=3 head is granted alone.
        let head = tasks.remove(0).await.unwrap();
        assert_eq!(holders().await, (vec![(sessions[0], 3)], 3));
        head.release().await.unwrap();
        // Then 1 + 1 fit together, in queue order, and the k=2 waits.
        let g1 = tasks.remove(0).await.unwrap();
        let g2 = tasks.remove(0).await.unwrap();
        assert_eq!(
            holders().await,
            (vec![(sessions[1], 1), (sessions[2], 1)], 1)
        );
        assert!(g1.hold_id() < g2.hold_id());
        // Released and confirmed: a dropped guard's release is sent on its
        // own session and could still be on its way when the observer looks.
        g1.release().await.unwrap();
        g2.release().await.unwrap();
        let last = tasks.remove(0).await.unwrap();
        assert_eq!(last.permits(), 2);
        assert_eq!(holders().await, (vec![(sessions[3], 2)], 0));
        daemon.stop().await;
    })
    .await
}
}

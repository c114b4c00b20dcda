//! The Rust client's promises: multiplexing, loss detection, the blocking
//! client, error bounds.

use std::time::Duration;

use lockbroker::{Error, blocking};

use crate::util::{Daemon, bounded, wait_until};

#[test]
fn error_is_send_sync_static() {
    fn assert_bounds<T: Send + Sync + 'static>() {}
    assert_bounds::<Error>();
    assert_bounds::<lockbroker::Client>();
    assert_bounds::<lockbroker::LockGuard>();
    assert_bounds::<lockbroker::blocking::LockGuard>();
}

/// One connection, many tasks: a blocked acquire delays nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_acquire_does_not_delay_other_requests() {
    bounded(async {
        let daemon = Daemon::start().await;
        let other = daemon.client().await;
        let held = other.mutex("busy").acquire().await.unwrap();
        let client = daemon.client().await;
        let waiting = {
            let m = client.mutex("busy");
            tokio::spawn(async move { m.acquire().await.unwrap() })
        };
        wait_until("the acquire waits", || async {
            other.inspect("busy").await.unwrap().entries[0]
                .waiters
                .len()
                == 1
        })
        .await;
        // The same connection still answers, and grants other locks.
        for _ in 0..10 {
            client.ping().await.unwrap();
        }
        let g = client.mutex("free").acquire().await.unwrap();
        let info = client.inspect("busy").await.unwrap();
        assert_eq!(
            info.entries[0].waiters[0].session.session_id,
            client.session_id()
        );
        g.release().await.unwrap();
        held.release().await.unwrap();
        waiting.await.unwrap().release().await.unwrap();
        daemon.stop().await;
    })
    .await
}

/// Concurrent tasks on one client: mutual exclusion holds within a session
/// too (a session asking again for what it holds just queues).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_a_client_exclude_each_other() {
    bounded(async {
        let daemon = Daemon::start().await;
        let client = daemon.client().await;
        let inside = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (client, inside) = (client.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    let g = client.mutex("shared").acquire().await.unwrap();
                    assert!(!inside.swap(true, std::sync::atomic::Ordering::SeqCst));
                    tokio::task::yield_now().await;
                    inside.store(false, std::sync::atomic::Ordering::SeqCst);
                    g.release().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        daemon.stop().await;
    })
    .await
}

/// A bad state key is refused by the client itself, as a bad lock name
/// is: nothing is sent, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_state_keys_are_refused_before_anything_is_sent() {
    bounded(async {
        let daemon = Daemon::start().await;
        let client = daemon.client().await;
        let state = client.state();
        let long = "k".repeat(300);
        for key in ["", "a\nb", long.as_str()] {
            let refused = |r: Result<(), Error>| match r {
                Err(Error::InvalidName { name, .. }) => assert_eq!(name, key),
                other => panic!("{key:?}: expected InvalidName, got {other:?}"),
            };
            refused(state.get(key).await.map(drop));
            refused(state.set(key, "v").await.map(drop));
            refused(state.remove(key).await.map(drop));
            refused(state.increment(key, 1).await.map(drop));
            refused(state.watch(key).await.map(drop));
        }
        // A prefix may be empty; a bad one is refused.
        assert!(state.list("", false).await.unwrap().is_empty());
        assert!(matches!(
            state.watch_prefix("a\nb").await,
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            state.list("a\nb", false).await,
            Err(Error::InvalidName { .. })
        ));
        client.ping().await.unwrap();
    })
    .await
}

/// When the daemon goes away, guards can tell and pending calls fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_connection_is_visible() {
    bounded(async {
        let daemon = Daemon::start().await;
        let client = daemon.client().await;
        let waiter_client = daemon.client().await;
        let guard = client.mutex("x").acquire().await.unwrap();
        let pending = {
            let m = waiter_client.mutex("x");
            tokio::spawn(async move { m.acquire().await })
        };
        wait_until("the acquire waits", || async {
            client.inspect("x").await.unwrap().entries[0].waiters.len() == 1
        })
        .await;
        assert!(!guard.is_lost());
        daemon.stop().await;
        guard.lost().await;
        assert!(guard.is_lost());
        assert!(matches!(pending.await.unwrap(), Err(Error::ConnectionLost)));
        assert!(matches!(client.ping().await, Err(Error::ConnectionLost)));
        // Dropping a guard of a lost connection is harmless.
        drop(guard);
    })
    .await
}

#[test]
fn blocking_client_has_the_same_surface_and_never_hangs_on_drop() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let daemon = rt.block_on(Daemon::start());
    let connector = daemon.connector();
    let a = blocking::Client::connect_with(&connector).unwrap();
    let b = blocking::Client::connect_with(&connector).unwrap();
    a.ping().unwrap();
    let g = a.mutex("m").acquire().unwrap();
    assert!(b.mutex("m").try_acquire().unwrap().is_none());
    assert!(
        b.mutex("m")
            .acquire_timeout(Duration::from_millis(10))
            .unwrap()
            .is_none()
    );
    // Released from another thread, like threading.Lock.
    std::thread::spawn(move || g.release().unwrap())
        .join()
        .unwrap();
    let g = b
        .mutex("m")
        .acquire_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert!(g.fence() > 0);
    let s = a.semaphore("s", 2).acquire_many(2).unwrap();
    assert!(b.semaphore("s", 2).try_acquire().unwrap().is_none());
    drop(s); // queued release; never blocks
    assert!(
        b.semaphore("s", 2)
            .acquire_timeout(Duration::from_secs(5))
            .unwrap()
            .is_some()
    );
    let r = a.rwlock("rw").read().unwrap();
    assert!(b.rwlock("rw").try_read().unwrap().is_some());
    assert!(b.rwlock("rw").try_write().unwrap().is_none());
    drop(r);
    // Stop the daemon: the guard sees the loss, and its drop does not hang.
    rt.block_on(daemon.stop());
    assert!(g.wait_lost(Duration::from_secs(10)));
    assert!(b.is_lost());
    drop(g);
    drop(b);
    drop(a);
}

/// Callers write their own requests; the connection task writes what the
/// socket did not take at once. Tasks on worker threads race their writes
/// while far more is in flight than a socket holds: every answer reaches
/// its own caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_writing_at_once_each_get_their_own_answers() {
    bounded(async {
        let daemon = Daemon::start().await;
        let client = daemon.client().await;
        let tasks: Vec<_> = (0..16u64)
            .map(|t| {
                let client = client.clone();
                tokio::spawn(async move {
                    let state = client.state();
                    let key = format!("n/{t}");
                    // 2000 increments in flight at once, then in turn.
                    let burst: Vec<_> = (0..2000)
                        .map(|_| {
                            let state = state.clone();
                            let key = key.clone();
                            tokio::spawn(async move { state.increment(&key, 1).await.unwrap() })
                        })
                        .collect();
                    let mut seen = Vec::new();
                    for b in burst {
                        seen.push(b.await.unwrap());
                    }
                    seen.sort_unstable();
                    assert_eq!(seen, (1..=2000).collect::<Vec<i64>>(), "task {t}");
                    for round in 0..50 {
                        let g = client.mutex(format!("m/{t}")).acquire().await.unwrap();
                        assert_eq!(state.increment(&key, 1).await.unwrap(), 2001 + round);
                        g.release().await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
}

/// The last client and guard dropped: their releases go out before the
/// connection closes, so the next holders are not told "abandoned".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_of_dropped_guards_go_out_before_the_close() {
    bounded(async {
        let daemon = Daemon::start().await;
        let client = daemon.client().await;
        let mut guards = Vec::new();
        for i in 0..200 {
            guards.push(client.mutex(format!("d/{i}")).acquire().await.unwrap());
        }
        drop(guards);
        drop(client);
        let other = daemon.client().await;
        for i in 0..200 {
            let g = other
                .mutex(format!("d/{i}"))
                .acquire_timeout(Duration::from_secs(10))
                .await
                .unwrap()
                .expect("the lock was freed");
            assert!(!g.abandoned(), "d/{i} was abandoned, not released");
        }
    })
    .await
}

//! Contention events (`AcquireWith` with `NotifyContended`, protocol
//! version 4): a hold that asked is told once someone waits behind it —
//! when it starts waiting, or at the grant if others already wait — and a
//! hold with nobody behind it is not; through the async client, with the
//! etcd backend refused (`unsupported`), and racing waiters that time out
//! or try.

use std::time::Duration;

use lockbroker::ErrorCode;

use crate::util::{Backend, bounded, waiters};

/// A holder is told when someone starts waiting; each waiter granted while
/// others still wait is told at its grant; the last, with nobody behind,
/// is not; a try that finds the lock taken and a wait that times out
/// still counted while they waited, but never a try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_told_when_someone_waits_behind_them() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let holder = daemon.client().await;
        let first = holder
            .mutex("x")
            .notify_contended()
            .acquire()
            .await
            .unwrap();
        let observer = daemon.client().await;
        // A try never waits: the holder hears nothing of it.
        assert!(observer.mutex("x").try_acquire().await.unwrap().is_none());
        holder.inspect("").await.unwrap();
        assert!(!first.is_contended());
        // Three waiters, each with a client of its own.
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let c = daemon.client().await;
            let m = c.mutex("x").notify_contended();
            waiting.push(tokio::spawn(async move {
                let guard = m.acquire().await.unwrap();
                (c, guard)
            }));
            waiters(&observer, "x", waiting.len()).await;
        }
        first.contended().await;
        assert!(first.is_contended());
        first.release().await.unwrap();
        // Served in order; each told at once while others wait behind it.
        let mut told = Vec::new();
        for task in waiting {
            let (c, guard) = task.await.unwrap();
            // Whatever the daemon said of the hold came before this answer.
            c.inspect("").await.unwrap();
            told.push(guard.is_contended());
            guard.release().await.unwrap();
        }
        assert_eq!(told, [true, true, false]);
        daemon.stop().await;
    })
    .await;
}

/// Shared holders are each told of a writer behind them; a semaphore
/// holder of a waiter that needs more permits than are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_and_semaphore_holders_are_told() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let a = daemon.client().await;
        let b = daemon.client().await;
        let r1 = a.rwlock("r").notify_contended().read().await.unwrap();
        let r2 = b.rwlock("r").notify_contended().read().await.unwrap();
        let s1 = a
            .semaphore("s", 3)
            .notify_contended()
            .acquire_many(2)
            .await
            .unwrap();
        let writer = daemon.client().await;
        let w = writer.rwlock("r");
        let writing = tokio::spawn(async move { w.write().await.map(drop) });
        let s = writer.semaphore("s", 3);
        let taking = tokio::spawn(async move { s.acquire_many(2).await.map(drop) });
        r1.contended().await;
        r2.contended().await;
        s1.contended().await;
        drop((r1, r2, s1));
        writing.await.unwrap().unwrap();
        taking.await.unwrap().unwrap();
        daemon.stop().await;
    })
    .await;
}

/// Waiters that time out and give up race the holder's news: it is told
/// exactly when one of them started waiting, and the lock is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_timing_out_still_tell_the_holder() {
    bounded(async {
        let daemon = Backend::Local.start().await;
        let holder = daemon.client().await;
        let guard = holder
            .mutex("t")
            .notify_contended()
            .acquire()
            .await
            .unwrap();
        let others = daemon.client().await;
        let mut racing = Vec::new();
        for i in 0..16u64 {
            let m = others.mutex("t");
            racing.push(tokio::spawn(async move {
                m.acquire_timeout(Duration::from_micros(i * 50)).await
            }));
        }
        for r in racing {
            // Timed out (or a try, for the first): none got the lock.
            assert!(r.await.unwrap().unwrap().is_none());
        }
        // At least one waited (a timeout of more than nothing queues).
        guard.contended().await;
        guard.release().await.unwrap();
        let again = others.mutex("t").try_acquire().await.unwrap();
        assert!(again.is_some(), "the lock is free");
        daemon.stop().await;
    })
    .await;
}

/// The etcd backend does not see another host's waits start: the option
/// is refused with `unsupported`, nothing is held, the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_backend_refuses_contention_events() {
    let Some(etcd) = Backend::etcd().await else {
        return;
    };
    bounded(async {
        let daemon = etcd.start().await;
        let client = daemon.client().await;
        let err = client
            .mutex("e")
            .notify_contended()
            .acquire()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unsupported), "{err:?}");
        assert!(err.to_string().contains("cannot tell a holder"), "{err}");
        let plain = client.mutex("e").try_acquire().await.unwrap();
        assert!(plain.is_some(), "nothing was held by the refused acquire");
        daemon.stop().await;
    })
    .await;
}

/// The blocking client: a holder that asked blocks in `wait_contended`
/// until a waiter on another thread queues; one that did not ask is never
/// told, and a bounded wait for it returns false.
#[test]
fn the_blocking_client_waits_for_contention() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let daemon = rt.block_on(Backend::Local.start());
    let connector = daemon.connector();
    let holder = lockbroker::blocking::Client::connect_with(&connector).unwrap();
    let asked = holder.mutex("b").notify_contended().acquire().unwrap();
    let plain = holder.mutex("p").acquire().unwrap();
    assert!(!asked.is_contended());
    let waiting = {
        let connector = connector.clone();
        std::thread::spawn(move || {
            let other = lockbroker::blocking::Client::connect_with(&connector).unwrap();
            let p = other.mutex("p");
            let pending = std::thread::spawn(move || p.acquire().map(drop));
            let got = other.mutex("b").acquire().map(drop);
            (got, pending.join().unwrap())
        })
    };
    assert!(asked.wait_contended(Duration::from_secs(20)));
    assert!(asked.is_contended());
    crate::util::wait_until_blocking("someone waits for p", || {
        holder.inspect("p").unwrap().entries[0].waiters.len() == 1
    });
    // Whatever the daemon said of `plain` came before this answer: nothing.
    holder.inspect("").unwrap();
    assert!(!plain.wait_contended(Duration::from_millis(1)));
    drop(asked);
    drop(plain);
    let (got, pending) = waiting.join().unwrap();
    got.unwrap();
    pending.unwrap();
    rt.block_on(daemon.stop());
}

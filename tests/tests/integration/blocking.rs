//! The blocking client shared by many threads: on Unix the thread that
//! waits reads the socket itself and hands other threads their answers,
//! so these race exactly that — answers and events routed to the right
//! thread, timed waits that end on time while another thread reads, grants
//! racing timeouts never lost, every waiter woken when the connection
//! ends, and a client that sends far more than it reads never stuck.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use lockbroker::blocking;
use lockbroker::{WatchEvent, WatchOptions};

use crate::util::Daemon;

/// Runs `f` on a thread; fails the test if it does not end within `limit`.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("the test did not end in time: a thread waits for ever")
}

fn daemon() -> (tokio::runtime::Runtime, Daemon) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let daemon = rt.block_on(Daemon::start());
    (rt, daemon)
}

/// A daemon too busy to accept (its listen queue full) makes Linux's
/// `connect` wait for room: the connector's timeout bounds that wait too,
/// as the async connector's does.
#[cfg(target_os = "linux")]
#[test]
fn connecting_to_a_full_listen_queue_ends_at_the_timeout() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    // A listener that never accepts, its queue cut to one (listening again
    // sets the queue's length).
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // SAFETY: listen on our own listening socket.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let _queued = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let connector = lockbroker::Connector::new()
        .socket(&path)
        .timeout(Duration::from_millis(200));
    let outcome = bounded(Duration::from_secs(30), move || {
        let start = Instant::now();
        let outcome = blocking::Client::connect_with(&connector).map(|_| ());
        (outcome, start.elapsed())
    });
    let (outcome, took) = outcome;
    let e = outcome.expect_err("nobody accepts: the connect must fail");
    assert!(e.to_string().contains("full"), "{e}");
    assert!(took >= Duration::from_millis(200), "{took:?}");
    drop(listener);
}

#[test]
fn threads_sharing_a_client_each_get_their_own_answers_and_events() {
    let (_rt, daemon) = daemon();
    let client = blocking::Client::connect_with(&daemon.connector()).unwrap();
    const THREADS: u64 = 12;
    const ROUNDS: u64 = 150;
    bounded(Duration::from_secs(120), move || {
        // A watch read by its own thread while the others call: its
        // events must all reach it, in version order.
        let mut watch = client
            .state()
            .watch_with(
                "count/",
                WatchOptions {
                    prefix: true,
                    ..WatchOptions::default()
                },
            )
            .unwrap();
        let watcher = std::thread::spawn(move || {
            let mut seen = 0;
            let mut last = 0;
            while seen < THREADS * ROUNDS {
                match watch.next_timeout(Duration::from_secs(60)) {
                    Some(WatchEvent::Changed { version, .. }) => {
                        assert!(version > last, "events out of order");
                        last = version;
                        seen += 1;
                    }
                    other => panic!("watch ended early: {other:?}"),
                }
            }
            seen
        });
        let start = Arc::new(Barrier::new(THREADS as usize));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = client.clone();
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    let state = client.state();
                    let key = format!("count/{t}");
                    for round in 1..=ROUNDS {
                        let guard = client.mutex(format!("own/{t}")).acquire().unwrap();
                        let value = state.increment_guarded(&key, 1, &guard).unwrap();
                        assert_eq!(value as u64, round, "thread {t} got another's answer");
                        if round % 2 == 0 {
                            guard.release().unwrap();
                        } else {
                            drop(guard);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(watcher.join().unwrap(), THREADS * ROUNDS);
        // Nothing is left held.
        assert!(client.inspect("own/").unwrap().entries.is_empty());
    });
}

#[test]
fn a_thread_waiting_for_a_grant_reads_for_the_others() {
    let (_rt, daemon) = daemon();
    let holder = blocking::Client::connect_with(&daemon.connector()).unwrap();
    let client = blocking::Client::connect_with(&daemon.connector()).unwrap();
    bounded(Duration::from_secs(60), move || {
        let held = holder.mutex("m").acquire().unwrap();
        // This thread queues and, being the only one waiting, reads.
        let waiter = {
            let client = client.clone();
            std::thread::spawn(move || client.mutex("m").acquire().unwrap().fence())
        };
        crate::util::wait_until_blocking("the acquire to queue", || {
            holder.inspect("m").unwrap().entries[0].waiters.len() == 1
        });
        // Others on the same client are answered meanwhile, whoever reads.
        for _ in 0..200 {
            client.ping().unwrap();
        }
        // A timed wait ends on time while another thread holds the reader.
        let mut watch = client.state().watch("nothing").unwrap();
        let asked = Instant::now();
        assert!(watch.next_timeout(Duration::from_millis(100)).is_none());
        let took = asked.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(10),
            "a 100 ms wait took {took:?}"
        );
        assert!(!client.is_lost());
        drop(held);
        assert!(waiter.join().unwrap() > 0);
    });
}

#[test]
fn grants_racing_timeouts_across_threads_are_never_lost() {
    let (_rt, daemon) = daemon();
    let clients: Vec<_> = (0..3)
        .map(|_| blocking::Client::connect_with(&daemon.connector()).unwrap())
        .collect();
    let check = clients[0].clone();
    let inside = Arc::new(AtomicBool::new(false));
    let granted = Arc::new(AtomicU64::new(0));
    let timed_out = Arc::new(AtomicU64::new(0));
    bounded(Duration::from_secs(120), move || {
        let threads: Vec<_> = (0..12)
            .map(|i| {
                let client = clients[i % clients.len()].clone();
                let (inside, granted, timed_out) = (
                    Arc::clone(&inside),
                    Arc::clone(&granted),
                    Arc::clone(&timed_out),
                );
                std::thread::spawn(move || {
                    let mutex = client.mutex("hot");
                    for round in 0..150u64 {
                        // Timeouts about as long as a few handovers, so
                        // many end just as the lock is handed over.
                        let wait =
                            Duration::from_micros(300 + (round * 373 + i as u64 * 911) % 6000);
                        match mutex.acquire_timeout(wait).unwrap() {
                            Some(guard) => {
                                assert!(!inside.swap(true, Ordering::SeqCst), "two holders");
                                std::thread::yield_now();
                                inside.store(false, Ordering::SeqCst);
                                granted.fetch_add(1, Ordering::Relaxed);
                                drop(guard);
                            }
                            None => {
                                timed_out.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Both outcomes happened, or the race was not run.
        assert!(granted.load(Ordering::Relaxed) > 0);
        assert!(timed_out.load(Ordering::Relaxed) > 0);
        // A grant routed to nobody would leave the lock held for ever.
        let last = check
            .mutex("hot")
            .acquire_timeout(Duration::from_secs(10))
            .unwrap();
        assert!(last.is_some(), "a grant was lost: the lock stays held");
        eprintln!(
            "{} granted, {} timed out",
            granted.load(Ordering::Relaxed),
            timed_out.load(Ordering::Relaxed)
        );
    });
}

#[test]
fn every_waiting_thread_is_woken_when_the_connection_ends() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let daemon = rt.block_on(Daemon::start());
    let holder = blocking::Client::connect_with(&daemon.connector()).unwrap();
    let client = blocking::Client::connect_with(&daemon.connector()).unwrap();
    let _held = holder.mutex("m").acquire().unwrap();
    let (tx, rx) = mpsc::channel();
    let acquirer = {
        let (client, tx) = (client.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = client.mutex("m").acquire();
            tx.send("acquire").unwrap();
            match r {
                Err(lockbroker::Error::ConnectionLost) => {}
                // The holder's session may end first and grant it, as the
                // daemon goes: the hold is then lost with the connection.
                Ok(guard) => assert!(guard.wait_lost(Duration::from_secs(20))),
                Err(e) => panic!("{e}"),
            }
        })
    };
    let (watching, watch_set) = mpsc::channel();
    let watcher = {
        let (client, tx) = (client.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut watch = client.state().watch("k").unwrap();
            watching.send(()).unwrap();
            let next = watch.next();
            tx.send("watch").unwrap();
            assert!(next.is_none());
        })
    };
    let loss = {
        let (client, tx) = (client.clone(), tx.clone());
        std::thread::spawn(move || {
            let guard = client.mutex("other").acquire().unwrap();
            let lost = guard.wait_lost(Duration::from_secs(3600));
            tx.send("wait_lost").unwrap();
            assert!(lost);
        })
    };
    watch_set
        .recv_timeout(Duration::from_secs(20))
        .expect("the watch was never set up");
    crate::util::wait_until_blocking("all three to wait", || {
        let e = &holder.inspect("").unwrap().entries;
        e.iter().any(|e| e.name == "m" && e.waiters.len() == 1)
            && e.iter().any(|e| e.name == "other")
    });
    rt.block_on(daemon.stop());
    let mut woken: Vec<&str> = (0..3)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(20))
                .expect("a thread was never woken")
        })
        .collect();
    woken.sort_unstable();
    assert_eq!(woken, ["acquire", "wait_lost", "watch"]);
    for t in [acquirer, watcher, loss] {
        t.join().unwrap();
    }
    assert!(client.is_lost());
    assert!(matches!(
        client.ping(),
        Err(lockbroker::Error::ConnectionLost)
    ));
}

// Unix only: there the client's threads read the socket themselves, and
// this is their way out of a full socket. On Windows the blocking client's
// connection task reads all the time (`blocking/windows.rs`), so there is
// no such path to test (and 120,000 acquires under Wine outlast the bound).
#[cfg(unix)]
#[test]
fn a_client_that_sends_far_more_than_it_reads_never_gets_stuck() {
    // Dropped guards send releases and wait for nothing: their answers
    // pile up unread until the daemon, past its output limit, stops
    // reading. The next write must read them to get through.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let daemon = rt.block_on(Daemon::start_with(|c| c.limits.max_holds = 200_000));
    let client = blocking::Client::connect_with(&daemon.connector()).unwrap();
    const HOLDS: usize = 120_000;
    bounded(Duration::from_secs(120), move || {
        let sem = client.semaphore("many", HOLDS as u32);
        let guards: Vec<_> = (0..HOLDS).map(|_| sem.acquire().unwrap()).collect();
        drop(guards);
        client.ping().unwrap();
        let entries = client.inspect("many").unwrap().entries;
        assert!(entries.is_empty(), "permits left held: {entries:?}");
    });
}

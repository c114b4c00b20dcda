//! Faults under the etcd backend, each on a 3-member cluster of its own:
//! the leader killed under a hammer of guarded writes, the member a daemon
//! talks to stopped, a daemon stopped past its lease, two of three members
//! stopped (under a held lock, and under a session's first acquire).
//! Mutual exclusion holds through each, and afterwards everything
//! converges.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lockbroker::{Client, Connector, WriteOptions, WriteOutcome};
use lockbroker_proto::{ErrorCode, Request, Response, ServerMessage, StateSet};
use lockbroker_tests::etcd::{self, Cluster, SHORT_LEASE_TTL};

use crate::util::{Raw, acquire, address, bounded, spawn_etcd_daemon, wait_until, waiters};

/// A new cluster of three, or `None` (the test skips) without etcd.
async fn cluster() -> Option<Cluster> {
    if !etcd::etcd_present() {
        return None;
    }
    Some(Cluster::start(3).await)
}

/// One critical section: take `m`, add one to `counter` with a guarded
/// compare-and-set, release. Returns the fence and whether the counter
/// moved; an error anywhere is `None` (nothing is known to have been
/// done, and the caller tries again on a new connection).
async fn critical_section(client: &Client, connector: &Connector) -> Option<(u64, bool)> {
    let guard = client.mutex("m").acquire().await.ok()?;
    let state = client.state();
    let (n, version) = match state.get("counter").await.ok()? {
        Some(v) => (
            std::str::from_utf8(&v.value).ok()?.parse::<u64>().ok()?,
            v.version,
        ),
        None => (0, 0),
    };
    let options = WriteOptions::default().if_version(version).guard(&guard);
    let written = match state
        .set_with("counter", (n + 1).to_string(), options)
        .await
    {
        Ok(WriteOutcome::Written { .. }) => true,
        Ok(other) => panic!("a guarded compare-and-set under the lock conflicted: {other:?}"),
        // The answer was lost: under the lock nobody else writes, so the
        // counter says whether this write was applied.
        Err(_) => {
            let reread = loop {
                // On a connection of its own: this one may be lost.
                if let Ok(c) = connector.connect().await
                    && let Ok(v) = c.state().get("counter").await
                {
                    break v;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let now = reread.map_or(0, |v| {
                std::str::from_utf8(&v.value)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            });
            now == n + 1
        }
    };
    let fence = guard.fence();
    guard.release().await.ok()?;
    Some((fence, written))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_under_guarded_writes_loses_no_update() {
    let Some(cluster) = cluster().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("leader");
        let ttl = Duration::from_secs(10);
        let hosts = [
            cluster.daemon(&prefix, None, ttl).await,
            cluster.daemon(&prefix, None, ttl).await,
        ];
        let done = Arc::new(AtomicU64::new(0));
        let mut hammers = Vec::new();
        for host in &hosts {
            let connector = host.connector();
            let done = Arc::clone(&done);
            hammers.push(tokio::spawn(async move {
                let mut fences = Vec::new();
                let mut client = connector.connect().await.unwrap();
                while done.load(Ordering::SeqCst) < 60 {
                    match critical_section(&client, &connector).await {
                        Some((fence, written)) => {
                            fences.push(fence);
                            if written {
                                done.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        None => {
                            // A new session: the old one may be lost.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            if let Ok(c) = connector.connect().await {
                                client = c;
                            }
                        }
                    }
                }
                fences
            }));
        }
        wait_until("twenty critical sections", || async {
            done.load(Ordering::SeqCst) >= 20
        })
        .await;
        let leader = cluster.leader().await;
        cluster.signal(leader, libc::SIGKILL);
        let killed_at = done.load(Ordering::SeqCst);
        let mut fences = Vec::new();
        for h in hammers {
            fences.extend(h.await.unwrap());
        }
        assert!(
            done.load(Ordering::SeqCst) >= killed_at + 30,
            "grants resumed"
        );
        // Fences of one lock never repeat, across both daemons.
        fences.sort_unstable();
        assert!(fences.windows(2).all(|w| w[0] < w[1]), "a fence repeated");
        let state = hosts[0].client().await.state();
        let counter = state.get("counter").await.unwrap().unwrap();
        let counter: u64 = std::str::from_utf8(&counter.value)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(counter, done.load(Ordering::SeqCst), "every update, once");
        for host in hosts {
            host.stop().await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_cut_off_tells_its_holders_before_anyone_else_is_granted() {
    let Some(cluster) = cluster().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("cut-off");
        let leader = cluster.leader().await;
        let cut = (leader + 1) % 3;
        let other = (leader + 2) % 3;
        let one = cluster.daemon(&prefix, Some(cut), SHORT_LEASE_TTL).await;
        let two = cluster.daemon(&prefix, Some(other), SHORT_LEASE_TTL).await;
        let mut holder = one.raw().await;
        let Response::Granted(held) = holder
            .call(1, acquire("m", lockbroker::LockKind::Mutex, 0, 1, None))
            .await
        else {
            panic!("not granted");
        };
        let client = two.client().await;
        let mutex = client.mutex("m");
        let waiter = tokio::spawn(async move {
            let guard = mutex.acquire().await.unwrap();
            (Instant::now(), guard)
        });
        waiters(&client, "m", 1).await;
        cluster.signal(cut, libc::SIGSTOP);
        // The holder's daemon can no longer renew its lease: it ends the
        // session, saying why, before etcd can expire the lease.
        let told = match holder.recv().await {
            Some(ServerMessage::Fatal(e)) => {
                assert_eq!(e.code, ErrorCode::HoldsLost, "{e:?}");
                Instant::now()
            }
            other => panic!("expected holds_lost, got {other:?}"),
        };
        let (granted_at, guard) = waiter.await.unwrap();
        assert!(
            told < granted_at,
            "the other host was granted {:?} before the holder was told",
            told - granted_at
        );
        assert!(guard.abandoned());
        assert!(guard.fence() > held.fence);
        cluster.signal(cut, libc::SIGCONT);
        guard.release().await.unwrap();
        one.stop().await;
        two.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_past_its_lease_cannot_write_under_it() {
    let Some(cluster) = cluster().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("paused");
        let dir = tempfile::tempdir().unwrap();
        let socket = address(dir.path());
        let endpoints = cluster.endpoints().join(",");
        let paused = spawn_etcd_daemon(&socket, &endpoints, &prefix, SHORT_LEASE_TTL).await;
        let mut holder = Raw::connect(&socket).await;
        holder.hello().await;
        let Response::Granted(held) = holder
            .call(1, acquire("m", lockbroker::LockKind::Mutex, 0, 1, None))
            .await
        else {
            panic!("not granted");
        };
        let other = cluster.daemon(&prefix, None, Duration::from_secs(10)).await;
        let client = other.client().await;
        let mutex = client.mutex("m");
        let waiter = tokio::spawn(async move { mutex.acquire().await.unwrap() });
        waiters(&client, "m", 1).await;
        lockbroker_tests::unix::signal(paused.id(), libc::SIGSTOP);
        let guard = waiter.await.unwrap();
        assert!(guard.abandoned());
        assert!(
            guard.fence() > held.fence,
            "the new holder's fence is higher"
        );
        lockbroker_tests::unix::signal(paused.id(), libc::SIGCONT);
        // The paused holder still thinks it holds: its guarded write is
        // refused (or its session ends as lost first), and nothing lands.
        let write = Request::StateSet(StateSet {
            key: "owner".into(),
            value: b"paused".to_vec(),
            if_version: None,
            ttl_ms: None,
            guard: Some(held.hold_id),
        });
        // A daemon that closed the session first refuses the bytes too.
        let sent = holder.try_request(2, write).await.is_ok();
        match holder.recv().await {
            Some(ServerMessage::Response {
                id: 2,
                response: Response::Error(e),
            }) => assert_eq!(e.code, ErrorCode::GuardNotHeld, "{e:?}"),
            Some(ServerMessage::Fatal(e)) => assert_eq!(e.code, ErrorCode::HoldsLost, "{e:?}"),
            None => {}
            other => panic!("the write under a lost hold (sent: {sent}) was answered {other:?}"),
        }
        assert_eq!(client.state().get("owner").await.unwrap(), None);
        guard.release().await.unwrap();
        drop(paused);
        other.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_grants_nothing_and_converges_after() {
    let Some(cluster) = cluster().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("minority");
        let ttl = Duration::from_secs(10);
        let one = cluster.daemon(&prefix, Some(0), ttl).await;
        let two = cluster.daemon(&prefix, Some(0), ttl).await;
        let a = one.client().await;
        let b = two.client().await;
        let held = a.mutex("m").acquire().await.unwrap();
        let b_mutex = b.mutex("m");
        let waiter = tokio::spawn(async move { b_mutex.acquire().await.unwrap() });
        waiters(&b, "m", 1).await;
        cluster.signal(1, libc::SIGSTOP);
        cluster.signal(2, libc::SIGSTOP);
        // The release cannot commit, so nobody is granted: not the waiter,
        // not a new acquire of a free lock.
        let release = tokio::spawn(async move { held.release().await });
        let c = one.client().await;
        let free = tokio::spawn(async move { c.mutex("free").acquire().await });
        // Absence can only be watched for a while: two seconds, four
        // election timeouts of the test cluster.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished(), "granted without a quorum");
        if free.is_finished() {
            let outcome = free.await.unwrap().map(|g| g.fence());
            panic!("an acquire of a free lock ended without a quorum: {outcome:?}");
        }
        assert!(
            !release.is_finished(),
            "a release answered without a quorum"
        );
        cluster.signal(1, libc::SIGCONT);
        cluster.signal(2, libc::SIGCONT);
        release.await.unwrap().unwrap();
        let next = waiter.await.unwrap();
        assert!(!next.abandoned());
        let free = free.await.unwrap();
        let free = free
            .unwrap_or_else(|e| panic!("the acquire of a free lock after the partition: {e:?}"));
        free.release().await.unwrap();
        next.release().await.unwrap();
        drop((a, b));
        one.stop().await;
        two.stop().await;
        // Nothing of any session is left in etcd: no hold or wait key.
        wait_until("every hold key is gone", || async {
            cluster
                .keys(&format!("{prefix}/l/"))
                .await
                .iter()
                .all(|(k, _)| k.ends_with(b"\0~"))
        })
        .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_on_time_while_etcd_does_not_answer() {
    let Some(cluster) = cluster().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("silent");
        let daemon = cluster
            .daemon(&prefix, Some(0), Duration::from_secs(10))
            .await;
        let mut raw = daemon.raw().await;
        for i in 0..3 {
            cluster.signal(i, libc::SIGSTOP);
        }
        // A new session's first acquire: its lease cannot be granted, nor
        // its key put. Its timeout is answered on time all the same, and
        // the session goes on.
        let started = Instant::now();
        let answer = raw
            .call(
                1,
                acquire("m", lockbroker::LockKind::Mutex, 0, 1, Some(200)),
            )
            .await;
        assert_eq!(answer, Response::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "timed out after {:?}",
            started.elapsed()
        );
        assert_eq!(raw.call(2, Request::Ping).await, Response::Pong);
        for i in 0..3 {
            cluster.signal(i, libc::SIGCONT);
        }
        // Once etcd answers again, the lock is there to take.
        let granted = raw
            .call(
                3,
                acquire("m", lockbroker::LockKind::Mutex, 0, 1, Some(20_000)),
            )
            .await;
        assert!(matches!(granted, Response::Granted(_)), "{granted:?}");
        daemon.stop().await;
    })
    .await
}

/// A session's first acquire while etcd cannot grant leases for longer
/// than the daemon gives one request (two members of three stopped) waits
/// for etcd as it waits for the lock: it times out, not `unavailable`; and
/// the session's next acquire, once etcd answers, is granted (the failed
/// lease is asked for again, not remembered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_acquire_waits_out_an_outage_longer_than_a_request() {
    let Some(cluster) = cluster().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("outage");
        let daemon = cluster
            .daemon(&prefix, Some(0), Duration::from_secs(10))
            .await;
        let mut raw = daemon.raw().await;
        cluster.signal(1, libc::SIGSTOP);
        cluster.signal(2, libc::SIGSTOP);
        // Past the five seconds one request to etcd is given, after which
        // member 0 (no leader) has failed the lease at least once.
        let answer = raw
            .call(
                1,
                acquire("m", lockbroker::LockKind::Mutex, 0, 1, Some(9_000)),
            )
            .await;
        assert_eq!(answer, Response::TimedOut);
        cluster.signal(1, libc::SIGCONT);
        cluster.signal(2, libc::SIGCONT);
        let granted = raw
            .call(
                2,
                acquire("m", lockbroker::LockKind::Mutex, 0, 1, Some(20_000)),
            )
            .await;
        assert!(matches!(granted, Response::Granted(_)), "{granted:?}");
        daemon.stop().await;
    })
    .await
}

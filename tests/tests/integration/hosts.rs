//! Across hosts: several daemons on one etcd cluster, each standing in for
//! a host, share their locks. Waiters on different daemons are granted in
//! the order they queued; a client killed on one host hands its lock to a
//! waiter on another at once, as abandoned; a daemon killed hands its
//! locks on once its leases expire, as abandoned and with a higher fence;
//! daemons share locks over TLS with client certificates.

use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use lockbroker::Connector;
use lockbroker_tests::etcd::{self, Cluster, SHORT_LEASE_TTL, Tls};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::util::{address, bounded, spawn_daemon, spawn_etcd_daemon, waiters, worker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_different_daemons_are_granted_in_queue_order() {
    let Some(cluster) = etcd::shared().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("order");
        let ttl = Duration::from_secs(10);
        // Each daemon talks to its own member.
        let hosts = [
            cluster.daemon(&prefix, Some(0), ttl).await,
            cluster.daemon(&prefix, Some(1), ttl).await,
            cluster.daemon(&prefix, Some(2), ttl).await,
        ];
        let observer = hosts[0].client().await;
        let holder = hosts[1].client().await.mutex("q").acquire().await.unwrap();
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..6 {
            // Alternating between the daemons.
            let client = hosts[i % 3].client().await;
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let guard = client.mutex("q").acquire().await.unwrap();
                order.lock().unwrap().push((i, guard.fence()));
                guard.release().await.unwrap();
            }));
            waiters(&observer, "q", i + 1).await;
        }
        // Every host sees the same queue, in the same order.
        let a = hosts[1].client().await.inspect("q").await.unwrap();
        let b = hosts[2].client().await.inspect("q").await.unwrap();
        assert_eq!(a.entries[0].waiters, b.entries[0].waiters);
        assert_eq!(a.entries[0].holders, b.entries[0].holders);
        holder.release().await.unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let served: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
        assert_eq!(served, [0, 1, 2, 3, 4, 5]);
        assert!(
            order.windows(2).all(|w| w[0].1 < w[1].1),
            "fences grow with the grants: {order:?}"
        );
        for host in hosts {
            host.stop().await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_on_one_host_hands_its_lock_to_another_at_once() {
    let Some(cluster) = etcd::shared().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("kill-client");
        let ttl = Duration::from_secs(10);
        let one = cluster.daemon(&prefix, Some(0), ttl).await;
        let two = cluster.daemon(&prefix, Some(1), ttl).await;
        let mut child = tokio::process::Command::new(worker())
            .arg("hold")
            .arg(&one.socket)
            .arg("job")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .await
            .unwrap();
        let holder_fence: u64 = line.trim().strip_prefix("held ").unwrap().parse().unwrap();
        let client = two.client().await;
        let mutex = client.mutex("job");
        let waiter = tokio::spawn(async move { mutex.acquire().await.unwrap() });
        waiters(&client, "job", 1).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        let killed = Instant::now();
        let guard = waiter.await.unwrap();
        let took = killed.elapsed();
        assert!(guard.abandoned(), "the waiter on the other host is told");
        assert!(guard.fence() > holder_fence);
        // Milliseconds, not a lease's TTL (10 s here).
        assert!(
            took < Duration::from_secs(2),
            "granted {took:?} after the kill"
        );
        guard.release().await.unwrap();
        // Told once, on any host.
        let again = one.client().await.mutex("job").acquire().await.unwrap();
        assert!(!again.abandoned());
        again.release().await.unwrap();
        one.stop().await;
        two.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_hands_its_locks_on_after_the_lease_ttl() {
    let Some(cluster) = etcd::shared().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("kill-daemon");
        let dir = tempfile::tempdir().unwrap();
        let socket = address(dir.path());
        let endpoint = &cluster.members[0].client_url;
        let mut doomed = spawn_etcd_daemon(&socket, endpoint, &prefix, SHORT_LEASE_TTL).await;
        let holder = lockbroker::Connector::new()
            .socket(&socket)
            .connect()
            .await
            .unwrap();
        let held = holder.mutex("job").acquire().await.unwrap();
        let other = cluster
            .daemon(&prefix, Some(1), Duration::from_secs(10))
            .await;
        let client = other.client().await;
        let mutex = client.mutex("job");
        let waiter = tokio::spawn(async move { mutex.acquire().await.unwrap() });
        waiters(&client, "job", 1).await;
        doomed.kill();
        let killed = Instant::now();
        let guard = waiter.await.unwrap();
        let took = killed.elapsed();
        assert!(guard.abandoned());
        assert!(guard.fence() > held.fence());
        // etcd expires a lease between its TTL and a little over, after
        // the last renewal (which came at most a quarter TTL before).
        assert!(
            took >= SHORT_LEASE_TTL / 2 && took < SHORT_LEASE_TTL * 4,
            "granted {took:?} after the daemon died; the lease TTL is {SHORT_LEASE_TTL:?}"
        );
        guard.release().await.unwrap();
        drop(held);
        other.stop().await;
    })
    .await
}

/// A cluster that takes only TLS clients with a certificate of its CA: a
/// `lockbrokerd` started with `--etcd-ca-cert`, `--etcd-cert` and
/// `--etcd-key`, and a daemon configured with the same files, share a lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_share_locks_over_tls() {
    if !etcd::etcd_present() {
        return;
    }
    let cluster = Cluster::start_tls(1, Tls::generate()).await;
    bounded(async {
        let prefix = etcd::unique_prefix("tls");
        let tls = cluster.tls().expect("a TLS cluster");
        let (ca, cert, key) = (
            tls.path("ca.pem"),
            tls.path("client.pem"),
            tls.path("client.key"),
        );
        let endpoint = cluster.members[0].client_url.clone();
        assert!(endpoint.starts_with("https://"), "{endpoint}");
        let flags: Vec<std::ffi::OsString> = [
            "--backend",
            "etcd",
            "--etcd-endpoints",
            &endpoint,
            "--etcd-prefix",
            &prefix,
        ]
        .iter()
        .map(std::ffi::OsString::from)
        .chain(["--etcd-ca-cert".into(), ca.into_os_string()])
        .chain(["--etcd-cert".into(), cert.into_os_string()])
        .chain(["--etcd-key".into(), key.into_os_string()])
        .collect();
        let flags: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tls.sock");
        let mut process = spawn_daemon(&socket, &flags).await;
        let other = cluster.daemon(&prefix, None, Duration::from_secs(10)).await;
        let a = Connector::new().socket(&socket).connect().await.unwrap();
        let held = a.mutex("m").acquire().await.unwrap();
        let b = other.client().await;
        let mutex = b.mutex("m");
        let waiter = tokio::spawn(async move { mutex.acquire().await.unwrap() });
        waiters(&b, "m", 1).await;
        // The holder's key is in the cluster, read over TLS too.
        assert!(!cluster.keys(&format!("{prefix}/l/")).await.is_empty());
        let fence = held.fence();
        held.release().await.unwrap();
        let next = waiter.await.unwrap();
        assert!(!next.abandoned());
        assert!(next.fence() > fence);
        next.release().await.unwrap();
        process.kill();
        other.stop().await;
    })
    .await
}

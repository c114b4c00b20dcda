//! `lockbroker-bench etcd`: lockbroker on one etcd member against raw etcd,
//! in one run. It starts a single-member etcd of its own (data on tmpfs,
//! loopback ports) and two `lockbrokerd --backend etcd` on it, standing in
//! for two hosts, then measures, interleaved over repetitions:
//!
//! - raw etcd: a transaction putting a key on a lease, then a delete — the
//!   two requests an uncontended acquire and release need — and the two
//!   transactions lockbroker sends for them, sent directly;
//! - lockbroker: an uncontended mutex acquire + release through a daemon;
//! - the handoff across daemons: from a holder's release on one daemon to
//!   the grant of the waiter on the other;
//! - etcd's own lock service handing a lock from one client to another.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LockOptions, PutOptions, SortOrder, SortTarget, TxnOp,
};
use lockbroker::Connector;

use crate::Bins;
use crate::run::Server;

/// A single-member etcd, killed when dropped.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")
}

fn start_etcd() -> Result<Etcd, String> {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .map_err(|e| e.to_string())?;
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{}", client.local_addr().unwrap().port());
    let peer_url = format!("http://127.0.0.1:{}", peer.local_addr().unwrap().port());
    drop((client, peer));
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start etcd (Debian: apt-get install etcd-server): {e}"))?;
    Ok(Etcd {
        child,
        url,
        _dir: dir,
    })
}

async fn connect(url: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = Client::connect([url], None).await
            && c.get("ready", None).await.is_ok()
        {
            return c;
        }
        assert!(Instant::now() < deadline, "etcd did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs the comparison with `ops` cycles per measurement per repetition.
pub fn run(bins: &Bins, ops: usize, reps: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let etcd = match start_etcd() {
        Ok(etcd) => etcd,
        Err(e) => {
            eprintln!("lockbroker-bench etcd: {e}");
            std::process::exit(1);
        }
    };
    let prefix = "/bench";
    let daemon = |_: usize| {
        Server::start(|socket| {
            let mut cmd = Command::new(&bins.daemon);
            cmd.arg("--socket")
                .arg(socket)
                .args(["--log-level", "warn", "--backend", "etcd"])
                .args(["--etcd-endpoints", &etcd.url, "--etcd-prefix", prefix]);
            cmd
        })
    };
    runtime.block_on(connect(&etcd.url));
    let (one, two) = (daemon(1), daemon(2));
    let (mut raw, mut shaped, mut cycle, mut handoff, mut service) =
        (vec![], vec![], vec![], vec![], vec![]);
    runtime.block_on(async {
        for rep in 0..reps {
            eprintln!("repetition {}/{reps}", rep + 1);
            raw.push(raw_pair(&etcd.url, ops).await);
            shaped.push(shaped_pair(&etcd.url, ops).await);
            cycle.push(lockbroker_cycle(&one.socket, ops).await);
            handoff.push(lockbroker_handoff(&one.socket, &two.socket, ops).await);
            service.push(etcd_lock_handoff(&etcd.url, ops.min(50)).await);
        }
    });
    let (raw, shaped, cycle, handoff, service) = (
        median(raw),
        median(shaped),
        median(cycle),
        median(handoff),
        median(service),
    );
    let ratio = cycle.as_secs_f64() / raw.as_secs_f64();
    let shaped_ratio = shaped.as_secs_f64() / raw.as_secs_f64();
    println!("| scenario (one etcd member, p50) | time | ratio |");
    println!("|---|---:|---:|");
    println!(
        "| raw etcd: txn put on a lease + delete | {} | 1.00 |",
        ms(raw)
    );
    println!(
        "| raw etcd: lockbroker's two transactions, sent directly | {} | {shaped_ratio:.2} |",
        ms(shaped)
    );
    println!(
        "| lockbroker over etcd: acquire + release | {} | {ratio:.2} |",
        ms(cycle)
    );
    println!(
        "| lockbroker over etcd: handoff across daemons | {} | |",
        ms(handoff)
    );
    println!(
        "| etcd's lock service: handoff between clients | {} | |",
        ms(service)
    );
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "- acquire + release ≤ 1.2 × raw etcd put + delete: {ratio:.2} — {}",
        verdict(ratio <= 1.2)
    );
    println!(
        "- handoff across daemons ≤ 5 ms: {} — {}",
        ms(handoff),
        verdict(handoff <= Duration::from_millis(5))
    );
}

/// p50 of a txn putting a key on a lease, then deleting it.
async fn raw_pair(url: &str, ops: usize) -> Duration {
    let mut client = connect(url).await;
    let lease = client.lease_grant(10, None).await.unwrap().id();
    let mut kv = client.kv_client();
    let mut times = Vec::with_capacity(ops);
    for i in 0..ops {
        let key = format!("/raw/{i}");
        let start = Instant::now();
        let txn = etcd_client::Txn::new().and_then([TxnOp::put(
            key.clone(),
            "x",
            Some(PutOptions::new().with_lease(lease)),
        )]);
        kv.txn(txn).await.unwrap();
        kv.delete(key, None).await.unwrap();
        times.push(start.elapsed());
    }
    let _ = client.lease_revoke(lease).await;
    median(times)
}

/// p50 of the two transactions lockbroker sends for an uncontended
/// acquire and release (put the key where its slot is empty, and read the
/// front of its queue, the name's marker and the key itself; delete it,
/// with the release note only if a newer key of the name exists), sent
/// directly: what etcd costs lockbroker, without the hop through the
/// daemon.
async fn shaped_pair(url: &str, ops: usize) -> Duration {
    let mut client = connect(url).await;
    let lease = client.lease_grant(10, None).await.unwrap().id();
    let note = client.lease_grant(10, None).await.unwrap().id();
    let mut kv = client.kv_client();
    let mut times = Vec::with_capacity(ops);
    // One slot, taken again and again, as an uncontended name's is.
    let (range, key) = ("/shaped/l/n\0", "/shaped/l/n\0instance-0");
    for _ in 0..ops {
        let start = Instant::now();
        let reads = [
            TxnOp::get(
                range,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_limit(3)
                        .with_sort(SortTarget::Create, SortOrder::Ascend),
                ),
            ),
            TxnOp::get("/shaped/l/n\0!", None),
            TxnOp::get(key, None),
        ];
        let put = TxnOp::put(key, "x", Some(PutOptions::new().with_lease(lease)));
        let txn = etcd_client::Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then(
                std::iter::once(put)
                    .chain(reads.clone())
                    .collect::<Vec<_>>(),
            )
            .or_else(reads);
        let created = kv.txn(txn).await.unwrap().header().unwrap().revision();
        let txn = etcd_client::Txn::new()
            .when([Compare::create_revision(range, CompareOp::Less, created + 1).with_prefix()])
            .and_then([TxnOp::delete(key, None)])
            .or_else([
                TxnOp::delete(key, None),
                TxnOp::put(
                    "/shaped/l/n\0~",
                    "[]",
                    Some(PutOptions::new().with_lease(note)),
                ),
            ]);
        kv.txn(txn).await.unwrap();
        times.push(start.elapsed());
    }
    median(times)
}

/// p50 of an uncontended acquire + release through the daemon at `socket`.
async fn lockbroker_cycle(socket: &Path, ops: usize) -> Duration {
    let client = Connector::new().socket(socket).connect().await.unwrap();
    let mutex = client.mutex("cycle");
    // The session's lease is granted at its first acquire.
    mutex.acquire().await.unwrap().release().await.unwrap();
    let mut times = Vec::with_capacity(ops);
    for _ in 0..ops {
        let start = Instant::now();
        mutex.acquire().await.unwrap().release().await.unwrap();
        times.push(start.elapsed());
    }
    median(times)
}

/// p50 from a release on one daemon to the grant of the waiter on the
/// other, the lock going back and forth.
async fn lockbroker_handoff(one: &Path, two: &Path, ops: usize) -> Duration {
    let a = Connector::new().socket(one).connect().await.unwrap();
    let b = Connector::new().socket(two).connect().await.unwrap();
    let mut held = a.mutex("handoff").acquire().await.unwrap();
    let mut holder_is_a = true;
    let mut times = Vec::with_capacity(ops);
    for _ in 0..ops {
        let next = if holder_is_a { b.clone() } else { a.clone() };
        let waiter = tokio::spawn(async move {
            let g = next.mutex("handoff").acquire().await.unwrap();
            (Instant::now(), g)
        });
        // Released only once the waiter queues, as a contended lock is.
        loop {
            let i = a.inspect("handoff").await.unwrap();
            if i.entries.first().is_some_and(|e| e.waiters.len() == 1) {
                break;
            }
        }
        let start = Instant::now();
        held.release().await.unwrap();
        let (granted, guard) = waiter.await.unwrap();
        times.push(granted - start);
        held = guard;
        holder_is_a = !holder_is_a;
    }
    held.release().await.unwrap();
    median(times)
}

/// p50 of etcd's lock service handing a lock from one client to another.
async fn etcd_lock_handoff(url: &str, ops: usize) -> Duration {
    let mut a = connect(url).await;
    let b = connect(url).await;
    let mut times = Vec::with_capacity(ops);
    for _ in 0..ops {
        let la = a.lease_grant(10, None).await.unwrap().id();
        let lb = b.clone().lease_grant(10, None).await.unwrap().id();
        let key = a
            .lock("/etcd-lock", Some(LockOptions::new().with_lease(la)))
            .await
            .unwrap()
            .key()
            .to_vec();
        let mut bc = b.clone();
        let waiter = tokio::spawn(async move {
            let r = bc
                .lock("/etcd-lock", Some(LockOptions::new().with_lease(lb)))
                .await
                .unwrap();
            (Instant::now(), r.key().to_vec())
        });
        // Released once the second client's key is queued.
        loop {
            let n = a
                .get(
                    "/etcd-lock/",
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .unwrap()
                .count();
            if n == 2 {
                break;
            }
        }
        let start = Instant::now();
        a.unlock(key).await.unwrap();
        let (granted, bkey) = waiter.await.unwrap();
        times.push(granted - start);
        a.unlock(bkey).await.unwrap();
        let _ = a.lease_revoke(la).await;
        let _ = a.lease_revoke(lb).await;
    }
    median(times)
}

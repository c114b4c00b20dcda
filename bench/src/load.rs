//! `lockbroker-bench load`: one load scenario against a daemon, like
//! redis-benchmark. Each prints operations per second and latency
//! percentiles (or JSON, which the harness reads).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use lockbroker::launch::{self, START_TIMEOUT};
use lockbroker::{Client, Connector};
use serde_json::json;

/// What went wrong, to print before exiting with status 1.
type Failure = String;

fn fail(e: impl std::fmt::Display) -> Failure {
    e.to_string()
}

/// `lockbroker-bench load`.
#[derive(Debug, Parser)]
#[command(after_help = "\
Examples:
  lockbroker-bench load uncontended --spawn --clients 8 --duration 5
  lockbroker-bench load contended --clients 16        (checks FIFO order too)
  lockbroker-bench load handoff --ops 5000 --json
  lockbroker-bench load connections --spawn --ops 10000
  lockbroker-bench load names --spawn --ops 1000000
  lockbroker-bench load abandon --spawn --ops 100
  lockbroker-bench load inspect --spawn --ops 1000000 --duration 5

Scenarios: uncontended (each client its own mutex), contended (all on one
mutex; reports FIFO violations), semaphore (capacity 4), handoff (release to
next grant), state (50% get, 25% set, 25% incr), connections (daemon memory
per connection holding a lock), names (daemon memory per held name), abandon
(kill -9 of a holder to the waiter's grant), inspect (a bystander's ping
latency while `lockbroker status --json` lists --ops held names, against its
idle latency).")]
pub struct LoadArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// The daemon's socket (default: $LOCKBROKER_SOCKET, else the login
    /// session's daemon).
    #[arg(long, value_name = "PATH", conflicts_with = "spawn")]
    pub socket: Option<PathBuf>,
    /// Start a private daemon on a temporary socket for the run.
    #[arg(long)]
    pub spawn: bool,
    /// Extra flags for the spawned daemon (e.g. --workers=2).
    #[arg(long = "daemon-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub daemon_args: Vec<String>,
    /// Concurrent clients (connections).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub clients: usize,
    /// Run this many seconds (per scenario).
    #[arg(long, default_value = "2", value_parser = parse_seconds, value_name = "SECONDS")]
    pub duration: Duration,
    /// Operations per client instead of a duration (for connections, names,
    /// handoff and abandon: the total; for inspect: the names held).
    #[arg(long, value_name = "N")]
    pub ops: Option<usize>,
    /// Requests in flight per client (uncontended, semaphore, state).
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub pipeline: usize,
    /// Use the blocking client, one thread per client (uncontended).
    #[arg(long)]
    pub blocking: bool,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    pub json: bool,
    /// The `lockbroker` tool (inspect runs its `status`; default: the one
    /// beside this program, else the first on PATH).
    #[arg(long, value_name = "PATH")]
    pub cli: Option<PathBuf>,
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Each client cycles acquire+release on its own mutex.
    Uncontended,
    /// All clients on one mutex; checks FIFO order.
    Contended,
    /// Capacity 4, many clients.
    Semaphore,
    /// Latency from a holder's release to the next waiter's grant.
    Handoff,
    /// Get / set / increment mix.
    State,
    /// Daemon memory per connection holding a lock.
    Connections,
    /// Daemon memory per held name.
    Names,
    /// Time from kill -9 of a holder to the waiter's grant.
    Abandon,
    /// A bystander's ping latency while `status --json` lists N held names.
    Inspect,
}

/// Seconds, fractions allowed.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// Latency samples and a count of operations.
#[derive(Debug, Default)]
pub struct Samples {
    /// Per-operation latencies.
    pub latencies: Vec<Duration>,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
    }
}

/// The printed result of one scenario.
#[derive(Debug)]
pub struct Report {
    scenario: &'static str,
    clients: usize,
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Extra facts (memory per connection, FIFO check...).
    extra: Vec<(&'static str, serde_json::Value)>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

impl Report {
    fn new(
        scenario: &'static str,
        clients: usize,
        elapsed: Duration,
        mut samples: Samples,
    ) -> Report {
        samples.latencies.sort_unstable();
        Report {
            scenario,
            clients,
            ops: samples.latencies.len(),
            elapsed,
            latencies: samples.latencies,
            extra: Vec::new(),
        }
    }

    fn with(mut self, key: &'static str, value: serde_json::Value) -> Report {
        self.extra.push((key, value));
        self
    }

    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn us(d: Duration) -> f64 {
        d.as_nanos() as f64 / 1000.0
    }

    fn print(&self, as_json: bool) {
        let l = &self.latencies;
        if as_json {
            let mut v = json!({
                "scenario": self.scenario,
                "clients": self.clients,
                "ops": self.ops,
                "seconds": self.elapsed.as_secs_f64(),
                "ops_per_sec": self.ops_per_sec(),
                "p50_us": Self::us(percentile(l, 50.0)),
                "p90_us": Self::us(percentile(l, 90.0)),
                "p99_us": Self::us(percentile(l, 99.0)),
                "max_us": Self::us(l.last().copied().unwrap_or_default()),
            });
            for (k, val) in &self.extra {
                v[*k] = val.clone();
            }
            println!("{v}");
            return;
        }
        println!(
            "{:<12} clients {:>5}  {:>10.0} ops/s  p50 {:>8.1} µs  p90 {:>8.1} µs  p99 {:>8.1} µs  max {:>9.1} µs",
            self.scenario,
            self.clients,
            self.ops_per_sec(),
            Self::us(percentile(l, 50.0)),
            Self::us(percentile(l, 90.0)),
            Self::us(percentile(l, 99.0)),
            Self::us(l.last().copied().unwrap_or_default()),
        );
        for (k, val) in &self.extra {
            println!("  {k}: {val}");
        }
    }
}

/// A daemon started for the run (`--spawn`), stopped on drop.
struct Spawned {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM)
        };
        #[cfg(not(unix))]
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_daemon(extra: &[String]) -> Result<(Spawned, PathBuf), Failure> {
    let dir = tempfile::tempdir().map_err(fail)?;
    let socket = dir.path().join("bench.sock");
    let child = std::process::Command::new(launch::binary())
        .arg("--socket")
        .arg(&socket)
        .args(["--log-level", "warn", "--max-connections", "20000"])
        .args(["--max-holds", "2000000", "--max-pending", "100000"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot start lockbrokerd: {e}")))?;
    let mut spawned = Spawned { child, _dir: dir };
    let connector = Connector::new().socket(&socket);
    launch::wait_until_serving(&mut spawned.child, &connector, START_TIMEOUT, false)
        .await
        .map_err(|e| fail(format!("the spawned daemon: {e}")))?;
    Ok((spawned, socket))
}

/// The daemon's resident memory in bytes, from /proc.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the chosen scenario against the daemon at `--socket` (or the
/// default address), or a private one (`--spawn`), and prints its report.
pub async fn run(args: &LoadArgs) -> Result<(), Failure> {
    lockbroker_proto::os::raise_fd_limit();
    let (_spawned, connector) = match (&args.socket, args.spawn) {
        (_, true) => {
            let (s, p) = spawn_daemon(&args.daemon_args).await?;
            (Some(s), Connector::new().socket(p))
        }
        (Some(socket), false) => (None, Connector::new().socket(socket)),
        (None, false) => (None, Connector::new()),
    };
    let socket = connector.address().map_err(fail)?;
    let connector = connector.client_name("lockbroker-bench");
    let report = match args.scenario {
        Scenario::Uncontended => uncontended(&connector, args).await?,
        Scenario::Contended => contended(&connector, args).await?,
        Scenario::Semaphore => semaphore(&connector, args).await?,
        Scenario::Handoff => handoff(&connector, args).await?,
        Scenario::State => state(&connector, args).await?,
        Scenario::Connections => connections(&connector, args).await?,
        Scenario::Names => names(&connector, args).await?,
        Scenario::Abandon => abandon(&connector, &socket, args).await?,
        Scenario::Inspect => inspect(&connector, &socket, args).await?,
    };
    report.print(args.json);
    Ok(())
}

/// When a load loop stops: after `--ops` per client or at the deadline.
#[derive(Clone)]
struct Until {
    ops: Option<usize>,
    stop: Arc<AtomicBool>,
}

impl Until {
    fn new(args: &LoadArgs) -> (Until, Duration) {
        let stop = Arc::new(AtomicBool::new(false));
        let duration = args.duration;
        if args.ops.is_none() {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                tokio::time::sleep(duration).await;
                stop.store(true, Ordering::Relaxed);
            });
        }
        (
            Until {
                ops: args.ops,
                stop,
            },
            duration,
        )
    }

    fn done(&self, n: usize) -> bool {
        match self.ops {
            Some(ops) => n >= ops,
            None => self.stop.load(Ordering::Relaxed),
        }
    }
}

async fn clients(connector: &Connector, n: usize) -> Result<Vec<Client>, Failure> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(connector.connect().await.map_err(fail)?);
    }
    Ok(out)
}

/// Runs `body` in `pipeline` tasks per client until `until`, collecting
/// latencies.
async fn load<F, Fut>(
    clients: Vec<Client>,
    pipeline: usize,
    until: Until,
    body: F,
) -> Result<(Samples, Duration), Failure>
where
    F: Fn(Client, usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = lockbroker::Result<()>> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        for p in 0..pipeline {
            let (client, until, body) = (client.clone(), until.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut n = 0;
                while !until.done(n) {
                    let t = Instant::now();
                    body(client.clone(), c * pipeline + p, n).await?;
                    samples.latencies.push(t.elapsed());
                    n += 1;
                }
                Ok::<_, lockbroker::Error>(samples)
            }));
        }
    }
    let mut all = Samples::default();
    for t in tasks {
        all.merge(t.await.map_err(fail)?.map_err(fail)?);
    }
    Ok((all, start.elapsed()))
}

async fn uncontended(connector: &Connector, args: &LoadArgs) -> Result<Report, Failure> {
    let (until, _) = Until::new(args);
    if args.blocking {
        return uncontended_blocking(connector, args, until).await;
    }
    let cs = clients(connector, args.clients).await?;
    let (samples, elapsed) = load(cs, args.pipeline, until, |client, i, _| async move {
        let g = client.mutex(format!("bench/u/{i}")).acquire().await?;
        g.release().await
    })
    .await?;
    Ok(Report::new("uncontended", args.clients, elapsed, samples)
        .with("pipeline", json!(args.pipeline)))
}

/// The same cycle through `blocking::Client`, one OS thread per client.
async fn uncontended_blocking(
    connector: &Connector,
    args: &LoadArgs,
    until: Until,
) -> Result<Report, Failure> {
    let connector = connector.clone();
    let n = args.clients;
    let result = tokio::task::spawn_blocking(move || {
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(lockbroker::blocking::Client::connect_with(&connector)?);
        }
        let start = Instant::now();
        let threads: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, client)| {
                let until = until.clone();
                std::thread::spawn(move || -> lockbroker::Result<Samples> {
                    let mutex = client.mutex(format!("bench/b/{i}"));
                    let mut samples = Samples::default();
                    let mut k = 0;
                    while !until.done(k) {
                        let t = Instant::now();
                        mutex.acquire()?.release()?;
                        samples.latencies.push(t.elapsed());
                        k += 1;
                    }
                    Ok(samples)
                })
            })
            .collect();
        let mut all = Samples::default();
        for t in threads {
            all.merge(t.join().expect("bench thread")?);
        }
        Ok::<_, lockbroker::Error>((all, start.elapsed()))
    })
    .await
    .map_err(fail)?
    .map_err(fail)?;
    Ok(Report::new("uncontended", n, result.1, result.0).with("client", json!("blocking")))
}

async fn contended(connector: &Connector, args: &LoadArgs) -> Result<Report, Failure> {
    let (until, _) = Until::new(args);
    let cs = clients(connector, args.clients).await?;
    let observer = connector.connect().await.map_err(fail)?;
    // Every grant, as (session, fence); and snapshots of the queue.
    let grants = Arc::new(std::sync::Mutex::new(Vec::<(u64, u64)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let snapshots = {
        let (observer, stop) = (observer.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut snaps = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(i) = observer.inspect("bench/contended").await
                    && let Some(e) = i.entries.first()
                    && let Some(h) = e.holders.first()
                {
                    let order: Vec<u64> = e.waiters.iter().map(|w| w.session.session_id).collect();
                    snaps.push((h.fence, order));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            snaps
        })
    };
    let g2 = Arc::clone(&grants);
    let (samples, elapsed) = load(cs, 1, until, move |client, _, _| {
        let grants = Arc::clone(&g2);
        async move {
            let g = client.mutex("bench/contended").acquire().await?;
            grants
                .lock()
                .expect("grants")
                .push((client.session_id(), g.fence()));
            g.release().await
        }
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    let snaps = snapshots.await.map_err(fail)?;
    let grants = grants.lock().expect("grants").clone();
    let (checked, violations) = fifo_check(&grants, &snaps);
    let report = Report::new("contended", args.clients, elapsed, samples)
        .with("fifo_snapshots_checked", json!(checked))
        .with("fifo_violations", json!(violations));
    if violations > 0 {
        report.print(false);
        return Err(format!("{violations} grants did not follow FIFO order"));
    }
    Ok(report)
}

/// For each snapshot (holder fence, waiters in queue order), each waiter's
/// next grant after that fence must come in queue order.
fn fifo_check(grants: &[(u64, u64)], snaps: &[(u64, Vec<u64>)]) -> (usize, usize) {
    let mut by_session: std::collections::HashMap<u64, Vec<u64>> = Default::default();
    for &(s, f) in grants {
        by_session.entry(s).or_default().push(f);
    }
    for fences in by_session.values_mut() {
        fences.sort_unstable();
    }
    let mut violations = 0;
    let mut checked = 0;
    for (held, order) in snaps {
        let next: Vec<Option<u64>> = order
            .iter()
            .map(|s| {
                let fences = by_session.get(s)?;
                let i = fences.partition_point(|f| f <= held);
                fences.get(i).copied()
            })
            .collect();
        let granted: Vec<u64> = next.iter().map_while(|f| *f).collect();
        if granted.len() >= 2 {
            checked += 1;
            if granted.windows(2).any(|w| w[0] > w[1]) {
                violations += 1;
            }
        }
    }
    (checked, violations)
}

async fn semaphore(connector: &Connector, args: &LoadArgs) -> Result<Report, Failure> {
    let (until, _) = Until::new(args);
    let cs = clients(connector, args.clients).await?;
    let (samples, elapsed) = load(cs, args.pipeline, until, |client, _, _| async move {
        let g = client.semaphore("bench/sem", 4).acquire().await?;
        g.release().await
    })
    .await?;
    Ok(Report::new("semaphore", args.clients, elapsed, samples).with("capacity", json!(4)))
}

/// Two clients pass one mutex back and forth; the latency is from the
/// holder sending its release to the waiter receiving its grant.
async fn handoff(connector: &Connector, args: &LoadArgs) -> Result<Report, Failure> {
    let a = connector.connect().await.map_err(fail)?;
    let b = connector.connect().await.map_err(fail)?;
    let rounds = args.ops.unwrap_or(2000);
    let mut samples = Samples::default();
    let start = Instant::now();
    let mut holder = a.mutex("bench/handoff").acquire().await.map_err(fail)?;
    let mut waiter_client = b;
    let mut holder_client = a;
    for _ in 0..rounds {
        let m = waiter_client.mutex("bench/handoff");
        let waiting = tokio::spawn(async move {
            let g = m.acquire().await;
            (g, Instant::now())
        });
        // Only measure once the waiter is queued.
        loop {
            let i = holder_client.inspect("bench/handoff").await.map_err(fail)?;
            if i.entries.first().is_some_and(|e| !e.waiters.is_empty()) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let sent = Instant::now();
        drop(holder); // the release is sent without waiting
        let (g, granted_at) = waiting.await.map_err(fail)?;
        samples
            .latencies
            .push(granted_at.saturating_duration_since(sent));
        holder = g.map_err(fail)?;
        std::mem::swap(&mut holder_client, &mut waiter_client);
    }
    drop(holder);
    Ok(Report::new("handoff", 2, start.elapsed(), samples))
}

async fn state(connector: &Connector, args: &LoadArgs) -> Result<Report, Failure> {
    let (until, _) = Until::new(args);
    let cs = clients(connector, args.clients).await?;
    let (samples, elapsed) = load(cs, args.pipeline, until, |client, i, n| async move {
        let state = client.state();
        let key = format!("bench/s/{}", i % 16);
        match n % 4 {
            0 | 1 => {
                state.get(&key).await?;
            }
            2 => {
                state.set(&key, n.to_string()).await?;
            }
            _ => {
                state.increment("bench/s/counter", 1).await?;
            }
        }
        Ok(())
    })
    .await?;
    Ok(Report::new("state", args.clients, elapsed, samples)
        .with("mix", json!("50% get, 25% set, 25% incr")))
}

/// N connections, each holding one lock: the daemon's memory per connection.
async fn connections(connector: &Connector, args: &LoadArgs) -> Result<Report, Failure> {
    let n = args.ops.unwrap_or(10_000);
    let probe = connector.connect().await.map_err(fail)?;
    let pid = probe.inspect("").await.map_err(fail)?.server.pid;
    let before =
        rss_bytes(pid).ok_or_else(|| fail("cannot read the daemon's memory from /proc"))?;
    let start = Instant::now();
    let mut held = Vec::with_capacity(n);
    let mut samples = Samples::default();
    for i in 0..n {
        let t = Instant::now();
        let c = connector.connect().await.map_err(fail)?;
        let g = c
            .mutex(format!("bench/c/{i}"))
            .acquire()
            .await
            .map_err(fail)?;
        samples.latencies.push(t.elapsed());
        held.push((c, g));
    }
    let elapsed = start.elapsed();
    let after = rss_bytes(pid).unwrap_or(before);
    let per = after.saturating_sub(before) as f64 / n as f64;
    drop(held);
    Ok(Report::new("connections", n, elapsed, samples)
        .with("daemon_rss_before_bytes", json!(before))
        .with("daemon_rss_after_bytes", json!(after))
        .with("bytes_per_connection", json!(per.round())))
}

/// `client` takes mutexes `{prefix}{k:08}` for `k` in `0..n`, many at once
/// on its one connection; returns the guards and each acquire's latency.
async fn take_names(
    client: &Client,
    prefix: &str,
    n: usize,
) -> Result<(Vec<lockbroker::LockGuard>, Samples), Failure> {
    let chunk = 512;
    let mut guards = Vec::with_capacity(n);
    let mut samples = Samples::default();
    let mut i = 0;
    while i < n {
        let end = (i + chunk).min(n);
        let futs: Vec<_> = (i..end)
            .map(|k| {
                let m = client.mutex(format!("{prefix}{k:08}"));
                tokio::spawn(async move {
                    let t = Instant::now();
                    m.acquire().await.map(|g| (g, t.elapsed()))
                })
            })
            .collect();
        for f in futs {
            let (g, d) = f.await.map_err(fail)?.map_err(fail)?;
            samples.latencies.push(d);
            guards.push(g);
        }
        i = end;
    }
    Ok((guards, samples))
}

/// One session holding N names: the daemon's memory per held name.
async fn names(connector: &Connector, args: &LoadArgs) -> Result<Report, Failure> {
    let n = args.ops.unwrap_or(1_000_000);
    let client = connector.connect().await.map_err(fail)?;
    let pid = client.inspect("").await.map_err(fail)?.server.pid;
    let before =
        rss_bytes(pid).ok_or_else(|| fail("cannot read the daemon's memory from /proc"))?;
    let start = Instant::now();
    let (guards, samples) = take_names(&client, "bench/n/", n).await?;
    let elapsed = start.elapsed();
    let after = rss_bytes(pid).unwrap_or(before);
    let per = after.saturating_sub(before) as f64 / n as f64;
    drop(guards);
    Ok(Report::new("names", 1, elapsed, samples)
        .with("names", json!(n))
        .with("bytes_per_name", json!(per.round())))
}

/// A bystander's pings, one a millisecond (as a client that is not itself
/// a load), until `done()`.
async fn pings(client: &Client, done: impl Fn() -> bool) -> Result<Samples, Failure> {
    let mut samples = Samples::default();
    let mut every = tokio::time::interval(Duration::from_millis(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !done() {
        every.tick().await;
        samples.latencies.push(client.ping().await.map_err(fail)?);
    }
    Ok(samples)
}

/// `lockbroker status --json` against `socket`, its output discarded. On
/// Linux it runs at the idle scheduling class, so that on a small machine
/// its own formatting does not take the CPU from the bystander: what is
/// measured is how the daemon serves others while it is listed.
fn status_command(cli: &Path, socket: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(cli);
    cmd.arg("--socket")
        .arg(socket)
        .args(["--json", "--no-autostart", "status"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: sched_setscheduler is async-signal-safe and touches only the
    // child being started.
    unsafe {
        cmd.pre_exec(|| {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            Ok(())
        });
    }
    cmd
}

/// The `lockbroker` tool: `--cli`, else the one beside this program, else
/// the first on `PATH`.
fn cli_binary(args: &LoadArgs) -> PathBuf {
    if let Some(cli) = &args.cli {
        return cli.clone();
    }
    let name = format!("lockbroker{}", std::env::consts::EXE_SUFFIX);
    std::env::current_exe()
        .map(|me| me.with_file_name(&name))
        .ok()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

/// One session holds N names; a bystander session pings once a
/// millisecond, first for `--duration` with nothing else going on, then
/// while `lockbroker status --json` lists every name, run after run, for
/// at least `--duration`. The latencies reported are the bystander's during
/// the listings; the idle ones are beside them.
async fn inspect(connector: &Connector, socket: &Path, args: &LoadArgs) -> Result<Report, Failure> {
    let n = args.ops.unwrap_or(1_000_000);
    let holder = connector.connect().await.map_err(fail)?;
    let (guards, _) = take_names(&holder, "bench/i/", n).await?;
    let bystander = connector.connect().await.map_err(fail)?;
    let idle_until = Instant::now() + args.duration;
    let mut idle = pings(&bystander, || Instant::now() >= idle_until).await?;
    idle.latencies.sort_unstable();

    let done = Arc::new(AtomicBool::new(false));
    let lister = {
        let (done, socket, duration) = (Arc::clone(&done), socket.to_owned(), args.duration);
        let cli = cli_binary(args);
        tokio::spawn(async move {
            let start = Instant::now();
            let mut runs = Vec::new();
            while runs.is_empty() || start.elapsed() < duration {
                let t = Instant::now();
                let status = status_command(&cli, &socket).status().await.map_err(fail)?;
                if !status.success() {
                    done.store(true, Ordering::Relaxed);
                    return Err(fail(format!("lockbroker status failed: {status}")));
                }
                runs.push(t.elapsed());
            }
            done.store(true, Ordering::Relaxed);
            Ok::<_, Failure>(runs)
        })
    };
    let start = Instant::now();
    let during = pings(&bystander, || done.load(Ordering::Relaxed)).await?;
    let elapsed = start.elapsed();
    let mut runs = lister.await.map_err(fail)??;
    runs.sort_unstable();
    drop(guards);
    let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
    let report = Report::new("inspect", 1, elapsed, during);
    let ratio = us(percentile(&report.latencies, 99.0)) / us(percentile(&idle.latencies, 99.0));
    Ok(report
        .with("names", json!(n))
        .with("idle_pings", json!(idle.latencies.len()))
        .with("idle_p50_us", json!(us(percentile(&idle.latencies, 50.0))))
        .with("idle_p90_us", json!(us(percentile(&idle.latencies, 90.0))))
        .with("idle_p99_us", json!(us(percentile(&idle.latencies, 99.0))))
        .with("idle_max_us", json!(us(percentile(&idle.latencies, 100.0))))
        .with("p99_over_idle_p99", json!((ratio * 100.0).round() / 100.0))
        .with("status_runs", json!(runs.len()))
        .with("status_median_ms", json!(us(runs[runs.len() / 2]) / 1000.0)))
}

/// A holder process (`lockbroker-bench hold`) is killed with SIGKILL; the
/// latency is from the kill to the waiter's grant.
async fn abandon(connector: &Connector, socket: &Path, args: &LoadArgs) -> Result<Report, Failure> {
    let rounds = args.ops.unwrap_or(50);
    let waiter = connector.connect().await.map_err(fail)?;
    let me = std::env::current_exe().map_err(fail)?;
    let mut samples = Samples::default();
    let start = Instant::now();
    for _ in 0..rounds {
        let mut child = tokio::process::Command::new(&me)
            .arg("hold")
            .arg(socket)
            .arg("bench/abandon")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(fail)?;
        // Wait until the child holds the lock.
        loop {
            let i = waiter.inspect("bench/abandon").await.map_err(fail)?;
            if i.entries.first().is_some_and(|e| !e.holders.is_empty()) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let m = waiter.mutex("bench/abandon");
        let waiting = tokio::spawn(async move {
            let g = m.acquire().await;
            (g, Instant::now())
        });
        loop {
            let i = waiter.inspect("bench/abandon").await.map_err(fail)?;
            if i.entries.first().is_some_and(|e| !e.waiters.is_empty()) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let killed = Instant::now();
        // SIGKILL (TerminateProcess on Windows): no chance to release.
        child.start_kill().map_err(fail)?;
        let (g, granted_at) = waiting.await.map_err(fail)?;
        samples
            .latencies
            .push(granted_at.saturating_duration_since(killed));
        let g = g.map_err(fail)?;
        if !g.abandoned() {
            return Err("the grant after a kill -9 was not marked abandoned".into());
        }
        g.release().await.map_err(fail)?;
        let _ = child.wait().await;
    }
    Ok(Report::new("abandon", 1, start.elapsed(), samples))
}

/// `lockbroker-bench hold SOCKET NAME`: holds the mutex NAME until killed,
/// for the abandon scenario.
pub async fn hold(socket: &Path, name: &str) -> Result<(), Failure> {
    let client = Connector::new()
        .socket(socket)
        .client_name("lockbroker-bench hold")
        .connect()
        .await
        .map_err(fail)?;
    let _guard = client.mutex(name).acquire().await.map_err(fail)?;
    std::future::pending().await
}

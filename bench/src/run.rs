//! Placement, measurement records, the lockbroker runs (each a pinned
//! `lockbroker-bench load` process), and the final table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Bins;

/// Where the server and the client run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    /// Both on CPU 0: a round trip is two context switches on one core.
    SameCpu,
    /// Server on CPU 0, client on CPU 1: every wake-up crosses CPUs.
    CrossCpu,
    /// Neither pinned: where the scheduler puts them (the Python
    /// scenarios only).
    Unpinned,
}

impl Placement {
    /// The CPU the server is pinned to, if any.
    pub fn server_cpu(self) -> Option<usize> {
        match self {
            Placement::SameCpu | Placement::CrossCpu => Some(0),
            Placement::Unpinned => None,
        }
    }

    /// The CPU the client is pinned to, if any.
    pub fn client_cpu(self) -> Option<usize> {
        match self {
            Placement::SameCpu => Some(0),
            Placement::CrossCpu => Some(1),
            Placement::Unpinned => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Placement::SameCpu => "same CPU",
            Placement::CrossCpu => "cross CPU",
            Placement::Unpinned => "unpinned",
        }
    }
}

/// One scenario's settings.
#[derive(Debug, Clone, Copy)]
pub struct Measure {
    /// CPU placement.
    pub placement: Placement,
    /// Concurrent clients.
    pub clients: usize,
    /// How long to run.
    pub duration: Duration,
}

/// One run's result: cycles per second and the median cycle latency.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Cycles per second, all clients together.
    pub ops_per_sec: f64,
    /// Median latency of one cycle, in microseconds.
    pub p50_us: f64,
}

/// Online CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `program`, pinned to `cpu` with taskset if there is one.
pub fn pinned(cpu: Option<usize>, program: &Path) -> Command {
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(cpu.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.stdin(Stdio::null());
    cmd
}

/// A child process that is terminated on drop.
pub struct Server {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `cmd` (told to listen on the returned socket by `configure`)
    /// and waits until the socket accepts connections.
    pub fn start(configure: impl FnOnce(&Path) -> Command) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("bench.sock");
        let child = configure(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "server never listened");
            std::thread::sleep(Duration::from_millis(2));
        }
        Server {
            child,
            socket,
            _dir: dir,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A lockbroker daemon pinned to the server CPU.
pub fn daemon(bins: &Bins, m: &Measure, extra: &[&str]) -> Server {
    Server::start(|socket| {
        let mut cmd = pinned(m.placement.server_cpu(), &bins.daemon);
        cmd.arg("--socket")
            .arg(socket)
            .args(["--log-level", "warn"])
            .args(extra);
        cmd
    })
}

/// Runs `lockbroker-bench load ARGS --json` pinned to the client CPU.
fn load(bins: &Bins, m: &Measure, socket: &Path, args: &[&str]) -> serde_json::Value {
    let out = pinned(m.placement.client_cpu(), &bins.me)
        .arg("load")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .arg("--cli")
        .arg(&bins.cli)
        .arg("--json")
        .output()
        .expect("run lockbroker-bench load");
    assert!(
        out.status.success(),
        "lockbroker-bench load {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bench JSON")
}

fn sample(v: &serde_json::Value) -> Sample {
    Sample {
        ops_per_sec: v["ops_per_sec"].as_f64().unwrap_or(0.0),
        p50_us: v["p50_us"].as_f64().unwrap_or(0.0),
    }
}

/// Uncontended acquire+release, each client on its own name.
pub fn lockbroker(bins: &Bins, m: &Measure, blocking: bool) -> Sample {
    let server = daemon(bins, m, &[]);
    let clients = m.clients.to_string();
    let duration = m.duration.as_secs_f64().to_string();
    let mut args = vec![
        "uncontended",
        "--clients",
        &clients,
        "--duration",
        &duration,
    ];
    if blocking {
        args.push("--blocking");
    }
    sample(&load(bins, m, &server.socket, &args))
}

/// Release → next grant between two clients.
pub fn handoff(bins: &Bins, m: &Measure) -> Sample {
    let server = daemon(bins, m, &[]);
    sample(&load(
        bins,
        m,
        &server.socket,
        &["handoff", "--ops", "2000"],
    ))
}

/// Facts measured once: memory, start time, abandonment.
#[derive(Debug, Default)]
pub struct Facts {
    /// Idle daemon resident memory, bytes.
    pub idle_rss: u64,
    /// Spawn to first accepted connection.
    pub start: Duration,
    /// Daemon memory per connection holding a lock.
    pub per_connection: f64,
    /// Daemon memory per held name.
    pub per_name: f64,
    /// kill -9 of a holder → waiter's grant, p99 and p50 (µs).
    pub abandon_p99_us: f64,
    /// Same, median.
    pub abandon_p50_us: f64,
    /// Names held while `status --json` lists them.
    pub inspect_names: u64,
    /// A bystander's ping p50 and p99 (µs) with nothing else going on.
    pub idle_ping_us: (f64, f64),
    /// The same while `status --json` runs over and over.
    pub listing_ping_us: (f64, f64),
    /// How long one `status --json` took, median (ms).
    pub status_ms: f64,
}

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Measures the facts of the targets that are not rates; `quick` lists far
/// fewer names (CI runs it), the rest is the same.
pub fn facts(bins: &Bins, quick: bool) -> Facts {
    let m = Measure {
        placement: Placement::CrossCpu,
        clients: 1,
        duration: Duration::ZERO,
    };
    // Start to accepting: the median of 10 starts.
    let mut starts = Vec::new();
    for _ in 0..10 {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("s.sock");
        let t = Instant::now();
        let mut child = Command::new(&bins.daemon)
            .arg("--socket")
            .arg(&socket)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start lockbrokerd");
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            std::thread::sleep(Duration::from_micros(200));
        }
        starts.push(t.elapsed());
        // SAFETY: our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    starts.sort();
    let idle = daemon(bins, &m, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let idle_rss = rss(idle.pid());
    drop(idle);
    let big = ["--max-connections", "20000", "--max-holds", "2000000"];
    let server = daemon(bins, &m, &big);
    let conns = load(bins, &m, &server.socket, &["connections", "--ops", "10000"]);
    drop(server);
    let server = daemon(bins, &m, &big);
    let names = load(bins, &m, &server.socket, &["names", "--ops", "1000000"]);
    drop(server);
    let server = daemon(bins, &m, &[]);
    let abandon = load(bins, &m, &server.socket, &["abandon", "--ops", "100"]);
    drop(server);
    let (listed, duration) = if quick {
        ("20000", "0.3")
    } else {
        ("1000000", "3")
    };
    let server = daemon(bins, &m, &big);
    let inspect = load(
        bins,
        &m,
        &server.socket,
        &["inspect", "--ops", listed, "--duration", duration],
    );
    let f = |key: &str| inspect[key].as_f64().unwrap_or(0.0);
    Facts {
        idle_rss,
        start: starts[starts.len() / 2],
        per_connection: conns["bytes_per_connection"].as_f64().unwrap_or(0.0),
        per_name: names["bytes_per_name"].as_f64().unwrap_or(0.0),
        abandon_p99_us: abandon["p99_us"].as_f64().unwrap_or(0.0),
        abandon_p50_us: abandon["p50_us"].as_f64().unwrap_or(0.0),
        inspect_names: inspect["names"].as_u64().unwrap_or(0),
        idle_ping_us: (f("idle_p50_us"), f("idle_p99_us")),
        listing_ping_us: (f("p50_us"), f("p99_us")),
        status_ms: f("status_median_ms"),
    }
}

/// Every sample, by (scenario, placement, clients).
#[derive(Debug, Default)]
pub struct Results {
    samples: BTreeMap<(Placement, usize, String), Vec<Sample>>,
    order: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Results {
    /// Records one run.
    pub fn add(&mut self, scenario: &str, m: &Measure, s: Sample) {
        if !self.order.iter().any(|o| o == scenario) {
            self.order.push(scenario.to_owned());
        }
        self.samples
            .entry((m.placement, m.clients, scenario.to_owned()))
            .or_default()
            .push(s);
    }

    fn medians(
        &self,
        placement: Placement,
        clients: usize,
        scenario: &str,
    ) -> Option<(f64, f64, usize)> {
        let v = self
            .samples
            .get(&(placement, clients, scenario.to_owned()))?;
        Some((
            median(v.iter().map(|s| s.ops_per_sec).collect()),
            median(v.iter().map(|s| s.p50_us).collect()),
            v.len(),
        ))
    }

    /// The markdown table, then the targets.
    pub fn table(&self, facts: &Facts) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| placement | clients | scenario | cycles/s | p50 µs | cycles/s ÷ 2-RTT floor | p50 ÷ 2-RTT floor | p50 ÷ Redis lock |"
        );
        let _ = writeln!(out, "|---|---:|---|---:|---:|---:|---:|---:|");
        let placements: Vec<Placement> = {
            let mut p: Vec<Placement> = self.samples.keys().map(|k| k.0).collect();
            p.dedup();
            p
        };
        let ratio = |a: f64, b: Option<f64>| b.map_or("–".into(), |b| format!("{:.2}", a / b));
        for &placement in &placements {
            for clients in [1usize, 2, 8, 32] {
                for scenario in &self.order {
                    let Some((ops, p50, n)) = self.medians(placement, clients, scenario) else {
                        continue;
                    };
                    let python = scenario.starts_with("Python");
                    let floor_of = if python { PY_FLOOR } else { FLOOR_2 };
                    let floor = self.medians(placement, clients, floor_of);
                    // Python locks against redis-py's, the others against
                    // the Redis lock driven from Rust.
                    let redis = if python { PY_REDIS } else { REDIS };
                    let r = self.medians(placement, clients, redis).map(|r| r.1);
                    let _ = writeln!(
                        out,
                        "| {} | {clients} | {scenario} (n={n}) | {ops:.0} | {p50:.1} | {} | {} | {} |",
                        placement.name(),
                        ratio(ops, floor.map(|f| f.0)),
                        ratio(p50, floor.map(|f| f.1)),
                        ratio(p50, r),
                    );
                }
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Targets (ratios from this run):");
        let _ = writeln!(out);
        for &placement in &placements {
            let get = |c: usize, s: &str| self.medians(placement, c, s);
            let name = placement.name();
            // Each client against the Redis lock and the floor of its own
            // language (Python's are redis-py and raw socket calls).
            for client in [ASYNC, BLOCKING, PY_LOCKBROKER] {
                let Some(lb) = get(1, client) else { continue };
                let (redis, floor) = if client == PY_LOCKBROKER {
                    (PY_REDIS, PY_FLOOR)
                } else {
                    (REDIS, FLOOR_2)
                };
                if let Some(r) = get(1, redis) {
                    target(
                        &mut out,
                        &format!("{name}: {client}, 1 client, p50 ≤ 1.0 × {redis}"),
                        lb.1 / r.1,
                        1.0,
                        false,
                    );
                }
                if placement == Placement::SameCpu
                    && let Some(f2) = get(1, floor)
                {
                    target(
                        &mut out,
                        &format!("{name}: {client}, 1 client, p50 ≤ 1.3 × {floor}"),
                        lb.1 / f2.1,
                        1.3,
                        false,
                    );
                }
            }
            for clients in [8, 32] {
                for client in [ASYNC, BLOCKING] {
                    let Some(lb) = get(clients, client) else {
                        continue;
                    };
                    if let Some(f2) = get(clients, FLOOR_2) {
                        target(
                            &mut out,
                            &format!(
                                "{name}: {client}, {clients} clients, cycles/s ≥ 1.0 × 2-RTT floor"
                            ),
                            lb.0 / f2.0,
                            1.0,
                            true,
                        );
                    }
                    if let Some(r) = get(clients, REDIS) {
                        target(
                            &mut out,
                            &format!(
                                "{name}: {client}, {clients} clients, cycles/s ≥ 1.5 × Redis lock"
                            ),
                            lb.0 / r.0,
                            1.5,
                            true,
                        );
                    }
                }
            }
            if let (Some(h), Some(f1)) = (get(2, HANDOFF), get(1, FLOOR_1)) {
                let what = format!("{name}: handoff release → grant p50, in floor round trips");
                if placement == Placement::SameCpu {
                    target(&mut out, &format!("{what}, ≤ 1.5"), h.1 / f1.1, 1.5, false);
                } else {
                    let _ = writeln!(out, "- {what}: {:.2} (no target)", h.1 / f1.1);
                }
            }
            if let Some(py) = get(1, PY_LOCKBROKER) {
                if let Some(r) = get(1, PY_REDIS) {
                    target(
                        &mut out,
                        &format!("{name}: {PY_LOCKBROKER} cycle ≤ 0.5 × {PY_REDIS}"),
                        py.1 / r.1,
                        0.5,
                        false,
                    );
                }
                if let Some(f) = get(1, PY_FILELOCK) {
                    target(
                        &mut out,
                        &format!("{name}: {PY_LOCKBROKER} cycle ≤ 1.0 × {PY_FILELOCK}"),
                        py.1 / f.1,
                        1.0,
                        false,
                    );
                }
            }
            // What the daemon's runtime costs before any work: the echo
            // served from tokio against the thread-per-connection floor,
            // and lockbroker against that echo (p50 for one client,
            // cycles/s for many).
            for clients in [1, 8, 32] {
                let (Some(f2), Some(t)) = (get(clients, FLOOR_2), get(clients, TOKIO_ECHO)) else {
                    continue;
                };
                let measure = |lb: (f64, f64, usize), base: (f64, f64, usize)| {
                    if clients == 1 {
                        format!("p50 {:.2}×", lb.1 / base.1)
                    } else {
                        format!("cycles/s {:.2}×", lb.0 / base.0)
                    }
                };
                let who = if clients == 1 { "client" } else { "clients" };
                let mut line = format!(
                    "- {name}, {clients} {who} (no target): {TOKIO_ECHO} = {} the floor",
                    measure(t, f2)
                );
                for client in [ASYNC, BLOCKING] {
                    if let Some(lb) = get(clients, client) {
                        let _ = write!(line, "; {client} = {} the tokio echo", measure(lb, t));
                    }
                }
                let _ = writeln!(out, "{line}");
            }
        }
        let abs = |out: &mut String, what: &str, value: String, ok: bool| {
            let _ = writeln!(
                out,
                "- {what}: {value} — {}",
                if ok { "met" } else { "MISSED" }
            );
        };
        abs(
            &mut out,
            "abandon: kill -9 → grant p99 ≤ 2 ms",
            format!(
                "p50 {:.0} µs, p99 {:.0} µs",
                facts.abandon_p50_us, facts.abandon_p99_us
            ),
            facts.abandon_p99_us <= 2000.0,
        );
        abs(
            &mut out,
            "10,000 connections each holding a lock: ≤ 8 KiB per connection",
            format!("{:.0} bytes", facts.per_connection),
            facts.per_connection <= 8192.0,
        );
        abs(
            &mut out,
            "1,000,000 names held by one session: ≤ 256 bytes per name",
            format!("{:.0} bytes", facts.per_name),
            facts.per_name <= 256.0,
        );
        let (idle, busy) = (facts.idle_ping_us, facts.listing_ping_us);
        abs(
            &mut out,
            &format!(
                "bystander ping while `status --json` lists {} names: p99 ≤ 2 × idle p99",
                facts.inspect_names
            ),
            format!(
                "p50 {:.0} µs, p99 {:.0} µs (idle p50 {:.0} µs, p99 {:.0} µs: {:.2}×); one status {:.0} ms",
                busy.0,
                busy.1,
                idle.0,
                idle.1,
                busy.1 / idle.1,
                facts.status_ms
            ),
            busy.1 <= 2.0 * idle.1,
        );
        abs(
            &mut out,
            "idle daemon ≤ 8 MiB resident",
            format!("{:.1} MiB", facts.idle_rss as f64 / 1048576.0),
            facts.idle_rss <= 8 * 1048576,
        );
        abs(
            &mut out,
            "start to accepting ≤ 50 ms",
            format!(
                "{:.1} ms (median of 10)",
                facts.start.as_secs_f64() * 1000.0
            ),
            facts.start <= Duration::from_millis(50),
        );
        out
    }
}

const FLOOR_1: &str = "floor, 1 round trip";
const FLOOR_2: &str = "floor, 2 round trips";
pub(crate) const TOKIO_ECHO: &str = "tokio echo, 2 round trips";
const ASYNC: &str = "lockbroker async";
const BLOCKING: &str = "lockbroker blocking";
const REDIS: &str = "Redis lock (SET NX PX + Lua release)";
const HANDOFF: &str = "lockbroker handoff (release → grant)";
const PY_LOCKBROKER: &str = "Python lockbroker.Lock";
const PY_REDIS: &str = "Python redis-py Lock";
const PY_FILELOCK: &str = "Python filelock.FileLock";
const PY_FLOOR: &str = "Python floor, 2 round trips";

fn target(out: &mut String, what: &str, ratio: f64, limit: f64, at_least: bool) {
    use std::fmt::Write;
    let ok = if at_least {
        ratio >= limit
    } else {
        ratio <= limit
    };
    let _ = writeln!(
        out,
        "- {what}: {ratio:.2} — {}",
        if ok { "met" } else { "MISSED" }
    );
}

//! The side-by-side benchmark harness: in one run, on one machine, it
//! measures the floor (a minimal Unix-socket echo server, one and two round
//! trips per cycle), lockbroker (async and blocking clients, 1, 8 and 32 of
//! them; handoff), a Redis lock done the standard way (when `redis-server`
//! is installed) and `flock(2)`, in both CPU placements, and the Python
//! locks (lockbroker's, redis-py's, filelock's) in those and unpinned, over
//! interleaved repetitions; then
//! prints one markdown table of medians with ratios to the floor, and the
//! issue's targets with where they land.
//!
//! Build everything first so the release binaries sit side by side:
//! `cargo build --release --workspace && target/release/lockbroker-bench`.
//!
//! `lockbroker-bench load SCENARIO` runs one load scenario against a daemon
//! (as redis-benchmark does, on any platform); the harness runs each of its
//! lockbroker measurements as such a process, pinned to its CPU.
//!
//! `lockbroker-bench etcd` compares lockbroker over etcd (`--backend etcd`)
//! with raw etcd requests and etcd's own lock service, on a single-member
//! etcd it starts (needs `etcd` on the PATH).
//!
//! `main.rs` is just [`main`], so that test packages can build the same
//! program as a binary of their own.

#[cfg(target_os = "linux")]
mod etcd;
#[cfg(target_os = "linux")]
mod floor;
mod load;
#[cfg(target_os = "linux")]
mod python;
#[cfg(target_os = "linux")]
mod redis;
#[cfg(target_os = "linux")]
mod run;

#[cfg(target_os = "linux")]
use std::path::PathBuf;
#[cfg(target_os = "linux")]
use std::time::Duration;

#[cfg(target_os = "linux")]
use crate::run::{Measure, Placement};

/// Runs `lockbroker-bench` with this process's arguments.
pub fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("load") => {
            let load = <load::LoadArgs as clap::Parser>::parse_from(
                std::iter::once("lockbroker-bench load".to_owned()).chain(args[1..].to_vec()),
            );
            block_on(load::run(&load));
        }
        #[cfg(target_os = "linux")]
        Some("etcd") => {
            let (mut ops, mut reps) = (500, 3);
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                let n = it.next().and_then(|v| v.parse().ok());
                match (a.as_str(), n) {
                    ("--ops", Some(n)) => ops = n,
                    ("--reps", Some(n)) => reps = n,
                    _ => usage(),
                }
            }
            etcd::run(&Bins::find(), ops.max(1), reps.max(1));
        }
        // Internal: the holder the abandon scenario kills.
        Some("hold") if args.len() == 3 => block_on(load::hold(args[1].as_ref(), &args[2])),
        _ => harness(args),
    }
}

/// Runs `task` on a one-thread runtime (as the `lockbroker` tool does, so
/// the client side of a scenario is what a user's tool would be); exits 1
/// with its error.
fn block_on(task: impl std::future::Future<Output = Result<(), String>>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(e) = runtime.block_on(task) {
        eprintln!("lockbroker-bench: {e}");
        std::process::exit(1);
    }
}

/// The harness pins CPUs and reads /proc: Linux only.
#[cfg(not(target_os = "linux"))]
fn harness(_args: Vec<String>) {
    eprintln!(
        "the lockbroker-bench harness runs on Linux only (it pins CPUs and reads /proc); `load` runs anywhere"
    );
    std::process::exit(1);
}

#[cfg(target_os = "linux")]
fn usage() -> ! {
    eprintln!(
        "usage: lockbroker-bench [--reps N] [--duration SECONDS] [--quick]\n\
         \x20      lockbroker-bench load SCENARIO [--spawn | --socket PATH] [--json] ... (see load --help)\n\
         \x20      lockbroker-bench etcd [--ops N] [--reps N]   (lockbroker over etcd against raw etcd)\n\
         \n\
         Runs every scenario in both CPU placements, --reps times, interleaved,\n\
         and prints a markdown table of medians. --quick: 1 rep of 0.3 s, and\n\
         20,000 names instead of 1,000,000 for the listing, for CI."
    );
    std::process::exit(2)
}

#[cfg(target_os = "linux")]
fn harness(args: Vec<String>) {
    // Internal: the echo server runs as its own (pinnable) process.
    if let [mode, socket] = &args[..] {
        if mode == floor::Echo::Threads.mode() {
            floor::serve(socket.into());
            return;
        }
        if mode == floor::Echo::Tokio.mode() {
            floor::serve_tokio(socket.into());
            return;
        }
    }
    let mut reps = 5;
    let mut duration = Duration::from_secs(2);
    let mut quick = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => {
                reps = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--duration" => {
                let secs: f64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage());
                duration = Duration::from_secs_f64(secs);
            }
            "--quick" => {
                reps = 1;
                duration = Duration::from_millis(300);
                quick = true;
            }
            _ => usage(),
        }
    }
    let bins = Bins::find();
    let placements = if run::cpus() >= 2 {
        vec![Placement::SameCpu, Placement::CrossCpu]
    } else {
        eprintln!("note: one CPU only; the cross-CPU placement is skipped");
        vec![Placement::SameCpu]
    };
    let redis = redis::available();
    if !redis {
        eprintln!("note: redis-server is not installed; the Redis lock is skipped");
    }
    let python = python::available(redis);
    let mut results = run::Results::default();
    for rep in 0..reps {
        eprintln!("repetition {}/{reps}", rep + 1);
        for &placement in &placements {
            for clients in [1usize, 8, 32] {
                let m = Measure {
                    placement,
                    clients,
                    duration,
                };
                use floor::Echo::{Threads, Tokio};
                results.add("floor, 1 round trip", &m, floor::run(&bins, &m, Threads, 1));
                results.add(
                    "floor, 2 round trips",
                    &m,
                    floor::run(&bins, &m, Threads, 2),
                );
                results.add(run::TOKIO_ECHO, &m, floor::run(&bins, &m, Tokio, 2));
                results.add("lockbroker async", &m, run::lockbroker(&bins, &m, false));
                results.add("lockbroker blocking", &m, run::lockbroker(&bins, &m, true));
                if redis {
                    results.add("Redis lock (SET NX PX + Lua release)", &m, redis::run(&m));
                }
                results.add("flock(2)", &m, floor::flock(&m));
            }
            let m = Measure {
                placement,
                clients: 2,
                duration,
            };
            results.add(
                "lockbroker handoff (release → grant)",
                &m,
                run::handoff(&bins, &m),
            );
        }
        for placement in placements.iter().copied().chain([Placement::Unpinned]) {
            let m = Measure {
                placement,
                clients: 1,
                duration,
            };
            for &kind in &python {
                results.add(kind.scenario(), &m, python::run(&bins, &m, kind));
            }
        }
    }
    let facts = run::facts(&bins, quick);
    println!("{}", results.table(&facts));
}

/// The release binaries the harness drives.
#[cfg(target_os = "linux")]
pub struct Bins {
    /// `lockbrokerd`.
    pub daemon: PathBuf,
    /// `lockbroker`.
    pub cli: PathBuf,
    /// This program (for the echo server).
    pub me: PathBuf,
}

#[cfg(target_os = "linux")]
impl Bins {
    fn find() -> Bins {
        let me = std::env::current_exe().expect("own path");
        let dir = me.parent().expect("a directory").to_owned();
        let bins = Bins {
            daemon: dir.join("lockbrokerd"),
            cli: dir.join("lockbroker"),
            me,
        };
        for b in [&bins.daemon, &bins.cli] {
            if !b.is_file() {
                eprintln!(
                    "lockbroker-bench: {} is missing; run `cargo build --release --workspace` first",
                    b.display()
                );
                std::process::exit(1);
            }
        }
        bins
    }
}

//! A worker process for the integration tests, using the blocking client.
//!
//! - `lb-worker increment SOCKET NAME FILE N`: N times, under mutex NAME,
//!   read the decimal counter in FILE and write it back plus one.
//! - `lb-worker hold SOCKET NAME`: take mutex NAME, print `held FENCE`, then
//!   wait until killed.
//! - `lb-worker incr SOCKET KEY N`: increment state KEY N times.
//! - `lb-worker cas SOCKET KEY N`: N times, read KEY and compare-and-set it
//!   to its value plus one, retrying on conflict.
//! - `lb-worker ping [UID...]`: connect as the environment says (no
//!   explicit socket), also trusting the daemon users UID, and ping; prints
//!   `ok`, or `untrusted PROBLEM OWNER PATH` (exit 3) when the client
//!   refuses the daemon.
//!
//! And commands for `lockbroker lock` to run, the same on every platform
//! (the CLI tests use them where a shell script would not run on Windows):
//!
//! - `lb-worker pidfile FILE`: write this process's pid to FILE (complete
//!   once it exists), then wait until killed.
//! - `lb-worker tree FILE`: start `lb-worker pidfile FILE.child`, wait
//!   until its pid is written, then do as `pidfile FILE`.
//! - `lb-worker leave FILE`: start `lb-worker pidfile FILE` (its output
//!   not ours), wait until its pid is written, and exit: a command that
//!   leaves a process running.
//! - `lb-worker critical FILE`: the critical section of the exclusion
//!   storm: create FILE, which must not exist (else exit 2: two holders
//!   at once), keep it a moment, remove it.
//! - `lb-worker inside DIR MAX`: the critical section of a semaphore:
//!   add this process to DIR, count who is there (exit 2 if more than
//!   MAX), stay a moment, leave.
//! - `lb-worker env NAME...`: print `NAME=value` (or `NAME unset`) for
//!   each variable.

use std::io::Write;
use std::process::ExitCode;

use lockbroker::{Connector, blocking};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["increment", socket, name, file, n] => increment(socket, name, file, n),
        ["hold", socket, name] => hold(socket, name),
        ["incr", socket, key, n] => incr(socket, key, n),
        ["cas", socket, key, n] => cas(socket, key, n),
        ["ping", ref allowed @ ..] => return ping(allowed),
        ["pidfile", file] => pidfile(file),
        ["tree", file] => tree(file),
        ["leave", file] => leave(file),
        ["critical", file] => return critical(file),
        ["inside", dir, max] => return inside(dir, max),
        ["env", ref names @ ..] => {
            for name in names {
                match std::env::var(name) {
                    Ok(v) => println!("{name}={v}"),
                    Err(_) => println!("{name} unset"),
                }
            }
            Ok(())
        }
        _ => Err(
            "usage: lb-worker increment|hold|incr|cas|ping|pidfile|tree|leave|critical|inside|env ..."
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn connect(socket: &str) -> Result<blocking::Client> {
    Ok(blocking::Client::connect_with(
        &Connector::new().socket(socket).client_name("lb-worker"),
    )?)
}

fn increment(socket: &str, name: &str, file: &str, n: &str) -> Result<()> {
    let client = connect(socket)?;
    let mutex = client.mutex(name);
    for _ in 0..n.parse::<u32>()? {
        let guard = mutex.acquire()?;
        let value: u64 = std::fs::read_to_string(file)?.trim().parse()?;
        // Yield between read and write so a missing lock would show.
        std::thread::yield_now();
        std::fs::write(file, format!("{}\n", value + 1))?;
        guard.release()?;
    }
    Ok(())
}

fn hold(socket: &str, name: &str) -> Result<()> {
    let client = connect(socket)?;
    let guard = client.mutex(name).acquire()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "held {}", guard.fence())?;
    out.flush()?;
    drop(out);
    // Hold until killed; the test never lets this finish.
    loop {
        std::thread::park();
    }
}

fn incr(socket: &str, key: &str, n: &str) -> Result<()> {
    let state = connect(socket)?.state();
    for _ in 0..n.parse::<u32>()? {
        state.increment(key, 1)?;
    }
    Ok(())
}

fn cas(socket: &str, key: &str, n: &str) -> Result<()> {
    let state = connect(socket)?.state();
    let mut done = 0;
    while done < n.parse::<u32>()? {
        let (value, version) = match state.get(key)? {
            Some(v) => (std::str::from_utf8(&v.value)?.parse::<u64>()?, v.version),
            None => (0, 0),
        };
        let next = (value + 1).to_string();
        if let lockbroker::WriteOutcome::Written { .. } =
            state.compare_and_set(key, version, next)?
        {
            done += 1;
        }
    }
    Ok(())
}

/// Connects through the default resolution, so that tests can check the
/// typed refusal of the Rust client for the local scope's directory.
fn ping(allowed: &[&str]) -> ExitCode {
    let mut connector = Connector::new().client_name("lb-worker");
    for uid in allowed {
        match uid.parse() {
            Ok(uid) => connector = connector.allow_server_uid(uid),
            Err(e) => {
                eprintln!("lb-worker: bad uid {uid:?}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match blocking::Client::connect_with(&connector).and_then(|c| c.ping()) {
        Ok(_) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(lockbroker::Error::Untrusted(u)) => {
            println!("untrusted {:?} {} {}", u.problem, u.owner, u.path.display());
            eprintln!("lb-worker: {}", lockbroker::Error::Untrusted(u));
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("lb-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes this process's pid to `file` atomically (a reader never sees a
/// partial one), then waits until killed.
fn pidfile(file: &str) -> Result<()> {
    let partial = format!("{file}.partial");
    std::fs::write(&partial, std::process::id().to_string())?;
    std::fs::rename(&partial, file)?;
    loop {
        std::thread::park();
    }
}

/// A child `pidfile FILE.child`, then `pidfile FILE`: a tree of two.
fn tree(file: &str) -> Result<()> {
    let child_file = format!("{file}.child");
    start_pidfile(
        &child_file,
        std::process::Command::new(std::env::current_exe()?),
    )?;
    pidfile(file)
}

/// A child `pidfile FILE` left running: this process exits.
fn leave(file: &str) -> Result<()> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    start_pidfile(file, cmd)
}

/// Starts `cmd pidfile FILE` and returns once the pid is written.
fn start_pidfile(file: &str, mut cmd: std::process::Command) -> Result<()> {
    let mut child = cmd.args(["pidfile", file]).spawn()?;
    // Polls a file the child writes once: there is no event to wait on
    // across processes that the test can also see.
    while !std::path::Path::new(file).exists() {
        if let Some(status) = child.try_wait()? {
            return Err(format!("the child exited first: {status}").into());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(())
}

/// Inside the lock: FILE must not exist; exit 2 if it does.
fn critical(file: &str) -> ExitCode {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!("lb-worker: {file} exists: two holders at once");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("lb-worker: creating {file}: {e}");
            return ExitCode::FAILURE;
        }
    }
    // The time spent holding: a window for a second holder to show.
    std::thread::sleep(std::time::Duration::from_millis(25));
    match std::fs::remove_file(file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-worker: removing {file}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Inside a semaphore of capacity `max`: at most `max` processes in `dir`.
fn inside(dir: &str, max: &str) -> ExitCode {
    let me = std::path::Path::new(dir).join(std::process::id().to_string());
    let counted = (|| -> Result<usize> {
        std::fs::write(&me, "")?;
        let count = std::fs::read_dir(dir)?.count();
        // The time spent holding: a window for one too many to show.
        std::thread::sleep(std::time::Duration::from_millis(25));
        std::fs::remove_file(&me)?;
        Ok(count)
    })();
    match (counted, max.parse::<usize>()) {
        (Ok(count), Ok(max)) if count <= max => ExitCode::SUCCESS,
        (Ok(count), Ok(_)) => {
            eprintln!("lb-worker: {count} inside {dir}");
            ExitCode::from(2)
        }
        (Err(e), _) => {
            eprintln!("lb-worker: {e}");
            ExitCode::FAILURE
        }
        (_, Err(e)) => {
            eprintln!("lb-worker: MAX: {e}");
            ExitCode::FAILURE
        }
    }
}

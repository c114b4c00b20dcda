//! The Python client's test suite (`clients/python/tests`), run against this
//! package's `lockbrokerd` binary so that `cargo test --workspace` covers
//! the Python client too.
//!
//! The suite is standard-library `unittest`: it needs `python3` (3.9 or
//! later) on `PATH` and nothing from cargo; without it the suite is
//! skipped, saying so (CI requires it). Each Python test starts its own
//! daemon from `LOCKBROKERD`; this wrapper only runs the suite, bounds its
//! time, prints its output and checks that it passed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::BIN;

/// Longest the whole Python suite may run (it normally takes seconds).
const SUITE_DEADLINE: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("broker/ has a parent")
        .to_path_buf()
}

/// Reads a child's pipe to the end on a thread, so neither pipe can fill up
/// and stall the child while we wait for it.
fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Whether `python3` (3.9 or later) is here to run the suite. Without it
/// the suite is skipped, saying so, unless LOCKBROKER_REQUIRE_PYTHON=1 (set
/// by CI) makes that a failure.
fn python3_present() -> bool {
    let version = Command::new("python3")
        .args(["-c", "import sys; print(sys.version_info >= (3, 9))"])
        .stdin(Stdio::null())
        .output();
    let why = match version {
        Ok(out) if out.status.success() && out.stdout.starts_with(b"True") => return true,
        Ok(_) => "python3 is older than 3.9",
        Err(_) => "python3 is not installed",
    };
    if std::env::var_os("LOCKBROKER_REQUIRE_PYTHON").is_some_and(|v| v == "1") {
        panic!("{why}, and the Python client's suite is required (LOCKBROKER_REQUIRE_PYTHON=1)");
    }
    eprintln!("skipped: the Python client's suite: {why} (Debian package python3)");
    false
}

#[test]
fn python_client_suite_passes() {
    if !python3_present() {
        return;
    }
    let root = repo_root();
    let mut child = Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            "clients/python/tests",
            "-t",
            "clients/python",
            "-v",
        ])
        .current_dir(&root)
        .env("LOCKBROKERD", BIN)
        .env("PYTHONPATH", "clients/python")
        // No __pycache__ directories in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("LOCKBROKER_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 (needed for the Python client's tests): {e}")
        });
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));

    let deadline = Instant::now() + SUITE_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for python3") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };

    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    println!("--- python3 -m unittest (stdout) ---\n{stdout}");
    println!("--- python3 -m unittest (stderr) ---\n{stderr}");
    match status {
        None => panic!(
            "the Python suite ran longer than {} s and was killed",
            SUITE_DEADLINE.as_secs()
        ),
        Some(status) => assert!(status.success(), "the Python suite failed: {status}"),
    }
}

//! Starts a lockbroker daemon on a private socket, then takes locks through
//! it from two clients — a mutex handed over in FIFO order, a semaphore —
//! and from a child process that is killed with SIGKILL while holding a
//! lock, which the next holder is told was abandoned.
//!
//! Run with `cargo run -p lockbroker --example quickstart`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use lockbroker::{Connector, Result, blocking};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, socket] = &args[..]
        && mode == "hold"
    {
        return hold(socket);
    }
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(demo())
}

async fn demo() -> Result<()> {
    // The daemon, in this process, on a socket in a fresh directory (a
    // pipe of its own on Windows).
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = lockbroker::address::private_address(dir.path()).expect("an address");
    let config = lockbrokerd::Config::for_socket(&socket);
    let listener = lockbrokerd::transport::Listener::bind(&socket, None).expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(async move {
        lockbrokerd::server::run(listener, &config, stopped)
            .await
            .expect("the daemon starts");
    });
    println!("daemon listening on {}", socket.display());

    let alice = Connector::new()
        .socket(&socket)
        .client_name("alice")
        .connect()
        .await?;
    let bob = Connector::new()
        .socket(&socket)
        .client_name("bob")
        .connect()
        .await?;

    // A mutex: alice holds it, bob queues, the release hands it to bob.
    let guard = alice.mutex("deploy/status").acquire().await?;
    println!("alice holds deploy/status (fence {})", guard.fence());
    let bob_mutex = bob.mutex("deploy/status");
    let waiter = tokio::spawn(async move { bob_mutex.acquire().await });
    while alice.inspect("deploy/status").await?.entries[0]
        .waiters
        .is_empty()
    {
        tokio::task::yield_now().await;
    }
    let busy = alice.mutex("deploy/status").try_acquire().await?;
    println!(
        "a try while bob waits: {}",
        if busy.is_some() { "granted" } else { "refused" }
    );
    guard.release().await?;
    let bobs = waiter.await.expect("task")?;
    println!("bob holds deploy/status (fence {})", bobs.fence());

    // A semaphore of two permits.
    let pool = alice.semaphore("workers", 2);
    let two = pool.acquire_many(2).await?;
    let third = bob
        .semaphore("workers", 2)
        .acquire_timeout(Duration::from_millis(100))
        .await?;
    println!(
        "third worker within 100 ms: {}",
        if third.is_some() { "yes" } else { "no, full" }
    );
    drop(two);

    // A child process takes "job" and is killed with SIGKILL holding it.
    drop(bobs);
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg("hold")
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("child output");
    print!("child {}: {line}", child.id());
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let next = alice.mutex("job").acquire().await?;
    println!(
        "alice took job after the child was killed: abandoned = {}, fence {}",
        next.abandoned(),
        next.fence()
    );

    let _ = stop.send(());
    daemon.await.expect("daemon task");
    println!("daemon stopped");
    Ok(())
}

/// The child: hold "job" until killed.
fn hold(socket: &str) -> Result<()> {
    let client = blocking::Client::connect_with(&Connector::new().socket(socket))?;
    let guard = client.mutex("job").acquire()?;
    println!("holds job (fence {})", guard.fence());
    std::io::stdout().flush().expect("flush");
    loop {
        std::thread::park();
    }
}

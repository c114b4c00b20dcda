//! The floor: a minimal Unix-socket echo server and client exchanging
//! messages of a lock request's size; the same echo served from a tokio
//! runtime shaped as the daemon's (what tokio's scheduling costs a server
//! before it does any work); and `flock(2)` for reference.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::Bins;
use crate::run::{Measure, Sample, Server, pin_thread, pinned};

/// Bytes per message: about an acquire request of a short name.
const MESSAGE: usize = 64;

/// The echo server: a thread per connection, echoing fixed-size messages.
pub fn serve(socket: PathBuf) {
    let listener = UnixListener::bind(&socket).expect("bind");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; MESSAGE];
            while stream.read_exact(&mut buf).is_ok() {
                if stream.write_all(&buf).is_err() {
                    break;
                }
            }
        });
    }
}

/// The echo server as the daemon serves: a multi-thread tokio runtime with
/// the daemon's default of one worker, a task per connection, reading what
/// has come into a buffer as the daemon's frame reader does (one `recv` a
/// message: a short read tells Tokio the socket is drained) and writing
/// back every whole message.
pub fn serve_tokio(socket: PathBuf) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_io()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * MESSAGE];
                let mut have = 0;
                while let Ok(n @ 1..) = stream.read(&mut buf[have..]).await {
                    have += n;
                    let whole = have / MESSAGE * MESSAGE;
                    if stream.write_all(&buf[..whole]).await.is_err() {
                        break;
                    }
                    buf.copy_within(whole..have, 0);
                    have -= whole;
                }
            });
        }
    });
}

/// Runs `cycle` on `m.clients` threads pinned to the client CPU until the
/// duration ends; cycles per second and the median cycle time.
pub fn drive<C: Send + 'static>(
    m: &Measure,
    mut setup: impl FnMut() -> C,
    cycle: impl Fn(&mut C) + Send + Sync + 'static,
) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let cycle = Arc::new(cycle);
    let cpu = m.placement.client_cpu();
    let start = Instant::now();
    let threads: Vec<_> = (0..m.clients)
        .map(|_| {
            let mut ctx = setup();
            let (stop, cycle) = (Arc::clone(&stop), Arc::clone(&cycle));
            std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    pin_thread(cpu);
                }
                let mut times = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    cycle(&mut ctx);
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    std::thread::sleep(m.duration);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let elapsed = start.elapsed();
    all.sort_unstable();
    Sample {
        ops_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50_us: all
            .get(all.len() / 2)
            .map_or(0.0, |d| d.as_nanos() as f64 / 1000.0),
    }
}

/// Which echo server the floor runs against.
#[derive(Debug, Clone, Copy)]
pub enum Echo {
    /// A blocking thread per connection: the floor.
    Threads,
    /// A tokio runtime shaped as the daemon's.
    Tokio,
}

impl Echo {
    /// The harness's internal command that serves it.
    pub fn mode(self) -> &'static str {
        match self {
            Echo::Threads => "echo-server",
            Echo::Tokio => "tokio-echo-server",
        }
    }
}

/// The echo server, pinned to the server CPU.
pub fn echo_server(bins: &Bins, m: &Measure, echo: Echo) -> Server {
    Server::start(|socket| {
        let mut cmd = pinned(m.placement.server_cpu(), &bins.me);
        cmd.arg(echo.mode()).arg(socket);
        cmd
    })
}

/// `round_trips` echo exchanges per cycle against an echo server pinned to
/// the server CPU.
pub fn run(bins: &Bins, m: &Measure, echo: Echo, round_trips: usize) -> Sample {
    let server = echo_server(bins, m, echo);
    let socket = server.socket.clone();
    drive(
        m,
        move || UnixStream::connect(&socket).expect("connect to echo server"),
        move |stream| {
            let mut buf = [7u8; MESSAGE];
            for _ in 0..round_trips {
                stream.write_all(&buf).expect("write");
                stream.read_exact(&mut buf).expect("read");
            }
        },
    )
}

/// `flock(LOCK_EX)` then `flock(LOCK_UN)` on one file, per client thread.
pub fn flock(m: &Measure) -> Sample {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("lock");
    std::fs::write(&path, b"").expect("lock file");
    let open = |p: &Path| std::fs::File::open(p).expect("open lock file");
    let path2 = path.clone();
    drive(
        m,
        move || open(&path2),
        |file| {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor we own.
            unsafe {
                libc::flock(file.as_raw_fd(), libc::LOCK_EX);
                libc::flock(file.as_raw_fd(), libc::LOCK_UN);
            }
        },
    )
}

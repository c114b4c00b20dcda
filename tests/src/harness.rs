//! The harness: an in-process daemon on a socket in its own temporary
//! directory (a pipe of its own on Windows), with a shutdown handle the
//! test owns; the daemon program
//! started as a process and waited for; a raw protocol client for
//! byte-level tests; helpers that wait on conditions with a bound.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use lockbroker::{Client, Connector};
use lockbroker_proto::io::FrameReader;
use lockbroker_proto::{
    ClientMessage, DEFAULT_MAX_FRAME_LEN, Hello, MAGIC, PROTOCOL_VERSION, Request, Response,
    ServerMessage, frame,
};
use lockbrokerd::config::Config;
use lockbrokerd::server;
use lockbrokerd::transport::Listener;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every test finishes within this or fails.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `fut`, failing the test if it takes longer than [`TEST_TIMEOUT`].
pub async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("test exceeded its time bound")
}

/// Waits until `cond` holds, checking after each short pause; fails after
/// ten seconds. For conditions only observable by asking (e.g. inspect).
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A new private address for a test's daemon: `broker.sock` in `dir` on
/// Unix, a pipe name of its own on Windows (as `lockbroker run` makes).
pub fn address(dir: &Path) -> PathBuf {
    lockbroker_proto::address::private_address(dir).expect("a private address")
}

/// A daemon running in this process.
pub struct Daemon {
    _dir: tempfile::TempDir,
    /// Its socket (a pipe name on Windows).
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Starts a daemon with default limits.
    pub async fn start() -> Daemon {
        Daemon::start_with(|_| {}).await
    }

    /// Starts a daemon after `configure` adjusts its configuration.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = address(dir.path());
        let mut config = Config::for_socket(&socket);
        configure(&mut config);
        let listener = Listener::bind(&socket, None).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::run(listener, &config, async {
                let _ = stopped.await;
            })
            .await
            .expect("the daemon starts");
        });
        Daemon {
            _dir: dir,
            socket,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A new client session.
    pub async fn client(&self) -> Client {
        self.connector().connect().await.expect("connect")
    }

    /// A connector aimed at this daemon.
    pub fn connector(&self) -> Connector {
        Connector::new().socket(&self.socket).client_name("test")
    }

    /// A raw protocol connection that has said hello.
    pub async fn raw(&self) -> Raw {
        let mut raw = Raw::connect(&self.socket).await;
        raw.hello().await;
        raw
    }

    /// Shuts the daemon down and waits for it.
    pub async fn stop(mut self) {
        self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

#[cfg(windows)]
pub use lockbroker_proto::pipe::{PipeReader as ReadHalf, PipeWriter as WriteHalf};
/// The halves of a raw connection: the transport the product uses.
#[cfg(unix)]
pub use tokio::net::unix::{OwnedReadHalf as ReadHalf, OwnedWriteHalf as WriteHalf};

/// Opens a raw connection to `socket` (a pipe name on Windows).
pub async fn connect_raw(socket: &Path) -> std::io::Result<(ReadHalf, WriteHalf)> {
    #[cfg(unix)]
    {
        Ok(tokio::net::UnixStream::connect(socket).await?.into_split())
    }
    #[cfg(windows)]
    {
        let (r, w, _server) = lockbroker_proto::pipe::connect(socket).await?;
        Ok((r, w))
    }
}

/// A client speaking the protocol by hand, for byte-level tests.
pub struct Raw {
    reader: FrameReader<ReadHalf>,
    writer: WriteHalf,
}

impl Raw {
    /// Connects without a handshake.
    pub async fn connect(socket: &Path) -> Raw {
        let (r, w) = connect_raw(socket).await.expect("connect");
        Raw {
            reader: FrameReader::new(r, DEFAULT_MAX_FRAME_LEN),
            writer: w,
        }
    }

    /// Sends a valid hello and expects a welcome.
    pub async fn hello(&mut self) -> u64 {
        self.hello_in(PROTOCOL_VERSION).await
    }

    /// Sends a valid hello of protocol `version`, expects a welcome in it,
    /// and decodes in it from then on.
    pub async fn hello_in(&mut self, version: u16) -> u64 {
        self.send(&ClientMessage::Hello(Hello {
            magic: MAGIC,
            version,
            client_name: "raw".into(),
        }))
        .await;
        match self.recv().await {
            Some(ServerMessage::Welcome(w)) => {
                assert_eq!(w.version, version, "the welcome's version");
                self.reader.set_version(version);
                w.session_id
            }
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &ClientMessage) {
        let bytes = frame::to_frame(msg, DEFAULT_MAX_FRAME_LEN).expect("encode");
        self.send_bytes(&bytes).await;
    }

    /// Sends a request.
    pub async fn request(&mut self, id: u64, request: Request) {
        self.send(&ClientMessage::Request { id, request }).await;
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// Sends a request, or says why the connection took it no more (the
    /// daemon may have closed it).
    pub async fn try_request(&mut self, id: u64, request: Request) -> std::io::Result<()> {
        let msg = ClientMessage::Request { id, request };
        let bytes = frame::to_frame(&msg, DEFAULT_MAX_FRAME_LEN).expect("encode");
        self.writer.write_all(&bytes).await
    }

    /// Closes the sending side (Unix: a pipe has no half-close).
    #[cfg(unix)]
    pub async fn shutdown_write(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    /// The next message, or `None` when the daemon closed the connection.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        self.reader.read_message().await.ok().flatten()
    }

    /// Fails unless the daemon closed the connection cleanly, between
    /// frames, with nothing more to say.
    pub async fn assert_closed(&mut self) {
        match self.reader.read_message::<ServerMessage>().await {
            Ok(None) => {}
            other => panic!("expected a clean close, got {other:?}"),
        }
    }

    /// The next message, which must be a response; returns (id, response).
    pub async fn response(&mut self) -> (u64, Response) {
        match self.recv().await {
            Some(ServerMessage::Response { id, response }) => (id, response),
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// Sends a request and returns its response (which must come next).
    pub async fn call(&mut self, id: u64, request: Request) -> Response {
        self.request(id, request).await;
        let (got, response) = self.response().await;
        assert_eq!(got, id, "response to another request");
        response
    }
}

/// Connects to `socket`, says hello and takes mutex `name`; the
/// connection, still open and holding it, for what follows.
pub async fn hold_over_raw(socket: &Path, name: &str) -> Raw {
    let mut raw = Raw::connect(socket).await;
    raw.hello().await;
    let request = acquire(name, lockbroker::LockKind::Mutex, 0, 1, Some(10_000));
    match raw.call(1, request).await {
        Response::Granted(_) => raw,
        other => panic!("expected a grant of {name:?}, got {other:?}"),
    }
}

/// An acquire request.
pub fn acquire(
    name: &str,
    kind: lockbroker::LockKind,
    capacity: u32,
    permits: u32,
    timeout_ms: Option<u64>,
) -> Request {
    Request::Acquire(lockbroker_proto::Acquire {
        name: name.into(),
        kind,
        capacity,
        permits,
        timeout_ms,
    })
}

/// The daemon program as a process of this test, killed when dropped.
pub struct DaemonProcess(std::process::Child);

impl DaemonProcess {
    /// Starts `bin` on `socket` with extra flags, and waits until it
    /// serves — with the product's own wait (`lockbroker::launch`), so a
    /// daemon that exits at start fails the test at once.
    pub async fn start(bin: &Path, socket: &Path, flags: &[&std::ffi::OsStr]) -> DaemonProcess {
        let child = std::process::Command::new(bin)
            .arg("--socket")
            .arg(socket)
            .args(flags)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn lockbrokerd");
        let mut daemon = DaemonProcess(child);
        let connector = Connector::new().socket(socket).client_name("harness");
        lockbroker::launch::wait_until_serving(
            &mut daemon.0,
            &connector,
            Duration::from_secs(20),
            false,
        )
        .await
        .unwrap_or_else(|e| panic!("the daemon at {}: {e}", socket.display()));
        daemon
    }

    /// [`DaemonProcess::start`] for a test without a runtime.
    pub fn start_blocking(bin: &Path, socket: &Path, flags: &[&std::ffi::OsStr]) -> DaemonProcess {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(DaemonProcess::start(bin, socket, flags))
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Kills it with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for `child` to exit, at most `limit`; kills it and fails the test
/// past that.
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

//! Helpers shared by the tests that drive the `lockbrokerd` binary.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use lockbroker_proto::io::FrameReader;
use lockbroker_proto::{
    Acquire, ClientMessage, DEFAULT_MAX_FRAME_LEN, Hello, LockKind, MAGIC, Request, Response,
    ServerMessage, frame,
};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: i32) {
    // SAFETY: signalling a child this test started.
    let rc = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(rc, 0);
}

/// Waits for the child's exit, at most `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Connects to `socket`, says hello, takes mutex `name` and checks the
/// grant; returns the connection, still open, for what follows.
pub async fn hold_over_raw(
    socket: &Path,
    name: &str,
) -> (FrameReader<OwnedReadHalf>, OwnedWriteHalf) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut bytes = Vec::new();
    let hello = ClientMessage::Hello(Hello {
        magic: MAGIC,
        version: 1,
        client_name: "binary-test".into(),
    });
    let acquire = ClientMessage::Request {
        id: 1,
        request: Request::Acquire(Acquire {
            name: name.into(),
            kind: LockKind::Mutex,
            capacity: 0,
            permits: 1,
            timeout_ms: Some(10_000),
        }),
    };
    frame::encode(&hello, DEFAULT_MAX_FRAME_LEN, &mut bytes).unwrap();
    frame::encode(&acquire, DEFAULT_MAX_FRAME_LEN, &mut bytes).unwrap();
    w.write_all(&bytes).await.unwrap();
    let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME_LEN);
    let welcome: ServerMessage = reader.read_message().await.unwrap().unwrap();
    assert!(matches!(welcome, ServerMessage::Welcome(_)), "{welcome:?}");
    let granted: ServerMessage = reader.read_message().await.unwrap().unwrap();
    assert!(
        matches!(
            granted,
            ServerMessage::Response {
                id: 1,
                response: Response::Granted(_)
            }
        ),
        "{granted:?}"
    );
    (reader, w)
}

/// Waits for `child` to exit — blocked on the exit itself, not polling —
/// and returns its status and stderr (if piped). Kills it and fails the
/// test if it is still running at `deadline`.
pub fn exit_before(child: Child, deadline: Instant) -> (std::process::ExitStatus, String) {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            // SAFETY: killing a child this test started (not yet reaped:
            // the waiting thread has not returned).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("process {pid} did not exit in time");
        }
    }
}

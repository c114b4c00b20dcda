//! A raw protocol connection that holds a lock, for the tests that drive
//! the daemon program.

use std::path::Path;

use lockbroker_proto::io::FrameReader;
use lockbroker_proto::{
    Acquire, ClientMessage, DEFAULT_MAX_FRAME_LEN, Hello, LockKind, MAGIC, Request, Response,
    ServerMessage, frame,
};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

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

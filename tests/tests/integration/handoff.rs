//! Grants handed over by a release: the releasing session writes the
//! grant into the waiter's socket in its own pass (Unix), before its own
//! answer. The waiter's session must know the hold by the time its peer
//! can name it, whatever it is busy with.

use std::time::Duration;

use lockbroker_proto::io::FrameReader;
use lockbroker_proto::{
    ClientMessage, DEFAULT_MAX_FRAME_LEN, Hello, LockKind, MAGIC, PROTOCOL_VERSION, Request,
    Response, ServerMessage, frame,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::util::{Daemon, Raw, acquire, bounded, connect_raw};

/// The waiter sends a stream of pings all along, so its session is busy
/// reading when the grant is written to it, and releases the hold the
/// moment the grant arrives: the release must find the hold, every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_written_by_the_releaser_can_be_released_at_once() {
    let daemon = Daemon::start().await;
    bounded(async {
        let mut holder = daemon.raw().await;
        let (r, mut w) = connect_raw(&daemon.socket).await.unwrap();
        let hello = ClientMessage::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            client_name: "waiter".into(),
        });
        w.write_all(&frame::to_frame(&hello, DEFAULT_MAX_FRAME_LEN).unwrap())
            .await
            .unwrap();
        // The waiter's writer: a Release as soon as one is asked for, else
        // pings, until told to stop.
        let (to_writer, mut asked) = mpsc::unbounded_channel::<Request>();
        let writer = tokio::spawn(async move {
            let mut next_id = 1_000_000u64;
            loop {
                let mut batch = Vec::new();
                let first = tokio::select! {
                    biased;
                    r = asked.recv() => match r {
                        Some(r) => r,
                        None => return,
                    },
                    () = std::future::ready(()) => Request::Ping,
                };
                let mut push = |request: Request, id: u64| {
                    let msg = ClientMessage::Request { id, request };
                    frame::encode(&msg, DEFAULT_MAX_FRAME_LEN, &mut batch).unwrap();
                };
                let id = match first {
                    Request::Acquire(_) | Request::Release { .. } => 0,
                    _ => {
                        next_id += 1;
                        next_id
                    }
                };
                push(first, id);
                for _ in 0..16 {
                    next_id += 1;
                    push(Request::Ping, next_id);
                }
                if w.write_all(&batch).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        // The waiter's reader: keeps reading (the pings' answers must not
        // back up), and passes on everything but them.
        let (to_main, mut answers) = mpsc::unbounded_channel::<ServerMessage>();
        let reader = tokio::spawn(async move {
            let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME_LEN);
            while let Ok(Some(msg)) = reader.read_message::<ServerMessage>().await {
                let pong = matches!(
                    msg,
                    ServerMessage::Response {
                        response: Response::Pong,
                        ..
                    }
                );
                if !pong && to_main.send(msg).is_err() {
                    return;
                }
            }
        });
        assert!(matches!(
            answers.recv().await,
            Some(ServerMessage::Welcome(_))
        ));
        let mut probe = daemon.raw().await;
        let mut released = 0;
        for round in 0..300u64 {
            match holder
                .call(round * 2 + 1, acquire("h", LockKind::Mutex, 1, 1, None))
                .await
            {
                Response::Granted(_) => {}
                other => panic!("the holder was not granted: {other:?}"),
            }
            // The waiter queues; its later pings are answered once it is.
            to_writer
                .send(acquire("h", LockKind::Mutex, 1, 1, None))
                .unwrap();
            wait_queued(&mut probe).await;
            holder
                .request(
                    round * 2 + 2,
                    Request::ReleaseByName {
                        name: "h".into(),
                        count: 1,
                    },
                )
                .await;
            // The grant (id 0: the waiter's acquires all carry id 0, one at
            // a time), then the answer to the release sent at once.
            loop {
                match answers.recv().await {
                    Some(ServerMessage::Response {
                        id: 0,
                        response: Response::Granted(g),
                    }) => {
                        to_writer
                            .send(Request::Release { hold_id: g.hold_id })
                            .unwrap();
                    }
                    Some(ServerMessage::Response {
                        id: 0,
                        response: Response::Released { .. },
                    }) => {
                        released += 1;
                        break;
                    }
                    other => panic!("round {round}: {other:?}"),
                }
            }
            // The holder's release was answered too.
            let (_, r) = holder.response().await;
            assert!(matches!(r, Response::Released { .. }), "{r:?}");
        }
        assert_eq!(released, 300);
        drop(to_writer);
        writer.await.unwrap();
        reader.abort();
    })
    .await;
}

/// Waits until mutex `h` has a waiter, asking through `probe`.
async fn wait_queued(probe: &mut Raw) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let response = probe
            .call(
                1,
                Request::Inspect {
                    prefix: "h".into(),
                    limit: 1,
                },
            )
            .await;
        if let Response::Inspection(i) = response
            && i.entries.first().is_some_and(|e| !e.waiters.is_empty())
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiter never queued"
        );
        tokio::task::yield_now().await;
    }
}

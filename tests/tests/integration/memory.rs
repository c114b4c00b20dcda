//! Memory stays bounded whatever a session does: sessions that each take
//! 65,536 fresh names and disconnect, round after round, leave the real
//! `lockbrokerd` process no bigger than the first rounds did.

use std::path::Path;
use std::time::Duration;

use lockbroker::LockKind;
use lockbroker_proto::io::FrameReader;
use lockbroker_proto::{
    ClientMessage, DEFAULT_MAX_FRAME_LEN, Hello, MAGIC, PROTOCOL_VERSION, Request, Response,
    ServerMessage, frame,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::util::{Raw, acquire, spawn_daemon};

/// Names per round: the default `--max-holds`, so one session can take them.
const NAMES: usize = 65_536;

/// Rounds of "take NAMES fresh names, disconnect".
const ROUNDS: usize = 20;

/// How much the daemon may grow from the end of round 2 to the end of any
/// later round. From round 2 on memory should be flat: each round holds
/// 65,536 names at its peak and leaves 65,536 abandoned flags, which push
/// out the previous round's (the default `--max-abandoned` is 65,536), so
/// every round needs what round 2 needed. 16 MiB is slack for the
/// allocator, less than one round's worth of kept flags: a daemon that
/// keeps every flag grows by about 20 MiB a round (measured, debug build:
/// 60 MiB after round 2, 424 MiB after round 20).
const GROWTH_BOUND: u64 = 16 << 20;

/// The test's own time bound (a debug daemon takes a few seconds a round).
const TIME_BOUND: Duration = Duration::from_secs(300);

/// The daemon's resident memory, from /proc.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// One session takes `NAMES` fresh mutexes, all requests pipelined, waits
/// for every grant, and disconnects.
async fn take_and_disconnect(socket: &Path, round: usize) {
    let stream = UnixStream::connect(socket).await.expect("connect");
    let (r, mut w) = stream.into_split();
    // Written while the grants are read, so neither side's buffer fills.
    let writer = tokio::spawn(async move {
        let mut bytes = Vec::new();
        let hello = ClientMessage::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            client_name: "memory".into(),
        });
        frame::encode(&hello, DEFAULT_MAX_FRAME_LEN, &mut bytes).unwrap();
        for i in 0..NAMES {
            let request = acquire(
                &format!("round{round:02}/name{i:05}"),
                LockKind::Mutex,
                0,
                1,
                None,
            );
            let msg = ClientMessage::Request {
                id: i as u64 + 1,
                request,
            };
            frame::encode(&msg, DEFAULT_MAX_FRAME_LEN, &mut bytes).unwrap();
        }
        w.write_all(&bytes).await.expect("write");
        w
    });
    let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME_LEN);
    let welcome = reader.read_message::<ServerMessage>().await.unwrap();
    assert!(matches!(welcome, Some(ServerMessage::Welcome(_))));
    for _ in 0..NAMES {
        match reader.read_message::<ServerMessage>().await.unwrap() {
            Some(ServerMessage::Response {
                response: Response::Granted(_),
                ..
            }) => {}
            other => panic!("expected a grant, got {other:?}"),
        }
    }
    drop(writer.await.unwrap());
    drop(reader);
}

/// Waits until `probe` is the only open session: the daemon counts a
/// session open until it has released everything it held.
async fn wait_for_cleanup(probe: &mut Raw, id: &mut u64) {
    loop {
        *id += 1;
        let request = Request::Inspect {
            prefix: "none".into(),
            limit: 1,
        };
        match probe.call(*id, request).await {
            Response::Inspection(i) if i.server.sessions == 1 => return,
            Response::Inspection(_) => tokio::task::yield_now().await,
            other => panic!("expected an inspection, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_taking_fresh_names_do_not_grow_the_daemon() {
    tokio::time::timeout(TIME_BOUND, async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("broker.sock");
        let daemon = spawn_daemon(&socket, &[]).await;
        let pid = daemon.id();
        let mut probe = Raw::connect(&socket).await;
        probe.hello().await;
        let mut id = 0;
        let mut after = Vec::new();
        for round in 1..=ROUNDS {
            take_and_disconnect(&socket, round).await;
            wait_for_cleanup(&mut probe, &mut id).await;
            after.push(rss(pid));
        }
        let mib = |b: u64| b as f64 / 1048576.0;
        let report: Vec<String> = after.iter().map(|&b| format!("{:.1}", mib(b))).collect();
        eprintln!("daemon RSS after each round, MiB: {}", report.join(" "));
        let base = after[1];
        for (round, &rss) in after.iter().enumerate().skip(2) {
            assert!(
                rss <= base + GROWTH_BOUND,
                "after round {}: {:.1} MiB, more than {:.1} MiB above round 2 ({:.1} MiB); every round: {}",
                round + 1,
                mib(rss),
                mib(GROWTH_BOUND),
                mib(base),
                report.join(" ")
            );
        }
    })
    .await
    .expect("test exceeded its time bound");
}

//! Inspecting: a large listing gathered in steps that let other sessions
//! in between.

use lockbroker::LockKind;
use lockbroker_proto::{ClientMessage, Hello, MAGIC, PROTOCOL_VERSION, Request, Response};

use crate::util::{Daemon, Raw, acquire, bounded};

/// One session takes mutexes `{prefix}{i:05}` for `i` in `0..n`, pipelined.
async fn hold_many(daemon: &Daemon, prefix: &str, n: usize) -> Raw {
    let mut holder = daemon.raw().await;
    for i in 0..n {
        let name = format!("{prefix}{i:05}");
        holder
            .request(i as u64 + 1, acquire(&name, LockKind::Mutex, 0, 1, None))
            .await;
    }
    for _ in 0..n {
        assert!(matches!(holder.response().await.1, Response::Granted(_)));
    }
    holder
}

/// The daemon and the test share one thread here (a current-thread
/// runtime), so the daemon runs only while the test waits, and the order
/// of events is decided by the daemon's own steps, not by timing. Session
/// A asks for 10,000 entries; session B's acquire of a name that sorts
/// after all of them is read once A's listing has begun. A listing done in
/// one step would be finished before B is served, and would not show B's
/// name; one done in steps that yield serves B in between, and reaches
/// B's name after B took it.
#[tokio::test(flavor = "current_thread")]
async fn a_large_listing_lets_other_sessions_in_between_its_steps() {
    bounded(async {
        let daemon = Daemon::start().await;
        let _holder = hold_many(&daemon, "list/", 10_000).await;
        let hello = ClientMessage::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            client_name: "raw".into(),
        });
        let mut a = Raw::connect(&daemon.socket).await;
        a.send(&hello).await;
        let inspect = Request::Inspect {
            prefix: "list/".into(),
            limit: 100_000,
        };
        a.request(1, inspect).await;
        let mut b = Raw::connect(&daemon.socket).await;
        b.send(&hello).await;
        b.request(1, acquire("list/zzzz", LockKind::Mutex, 0, 1, None))
            .await;
        assert!(a.recv().await.is_some(), "A's welcome");
        let (_, response) = a.response().await;
        let Response::Inspection(listing) = response else {
            panic!("expected an inspection, got {response:?}");
        };
        assert!(b.recv().await.is_some(), "B's welcome");
        assert!(matches!(b.response().await.1, Response::Granted(_)));
        assert_eq!(listing.entries.len(), 10_001, "B's name was listed");
        assert_eq!(listing.entries.last().unwrap().name, "list/zzzz");
        daemon.stop().await;
    })
    .await
}

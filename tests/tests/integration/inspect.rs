//! Inspecting: paging with `InspectAfter`, the frame limit, and a large
//! listing gathered in steps that let other sessions in between.

use lockbroker::{ErrorCode, LockKind};
use lockbroker_proto::{ClientMessage, Hello, MAGIC, PROTOCOL_VERSION, Request, Response};

use crate::util::{Daemon, Raw, acquire, bounded, on_both_backends};

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

on_both_backends! {
async fn inspect_after_pages_through_every_entry_in_order(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let _holder = hold_many(&daemon, "page/", 2500).await;
        let _other = hold_many(&daemon, "zz/", 3).await;
        let client = daemon.client().await;
        let mut names = Vec::new();
        let mut after = String::new();
        loop {
            let page = client.inspect_after("page/", &after, 1000).await.unwrap();
            assert!(page.entries.len() <= 1000);
            names.extend(page.entries.iter().map(|e| e.name.clone()));
            if !page.truncated {
                break;
            }
            after = names.last().unwrap().clone();
        }
        let want: Vec<String> = (0..2500).map(|i| format!("page/{i:05}")).collect();
        assert_eq!(names, want);
        // One Inspect with a large limit is gathered in many steps, and is
        // still whole and in order.
        let all = client.inspect_limit("", 100_000).await.unwrap();
        assert_eq!(all.entries.len(), 2503);
        assert!(!all.truncated);
        assert!(all.entries.windows(2).all(|w| w[0].name < w[1].name));
        let few = client.inspect_limit("page/", 10).await.unwrap();
        assert_eq!((few.entries.len(), few.truncated), (10, true));
        // A cursor between names, and one past every match.
        let page = client
            .inspect_after("page/", "page/01234x", 2)
            .await
            .unwrap();
        let got: Vec<&str> = page.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(got, ["page/01235", "page/01236"]);
        let page = client.inspect_after("page/", "page/99", 10).await.unwrap();
        assert!(page.entries.is_empty() && !page.truncated);
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn a_listing_over_the_frame_limit_is_refused_and_the_session_goes_on(backend) {
    bounded(async {
        let daemon = backend.start_with(|c| c.limits.max_frame_len = 4096).await;
        let _holder = hold_many(&daemon, "big/", 300).await;
        let mut raw = daemon.raw().await;
        let request = Request::InspectAfter {
            prefix: "big/".into(),
            start_after: String::new(),
            limit: 1000,
        };
        match raw.call(1, request).await {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::ResponseTooLarge),
            other => panic!("expected response_too_large, got {other:?}"),
        }
        assert_eq!(raw.call(2, Request::Ping).await, Response::Pong);
        daemon.stop().await;
    })
    .await
}
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

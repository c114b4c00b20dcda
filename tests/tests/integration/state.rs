//! Shared state: exact counters across processes, compare-and-set, watches,
//! expiry, guarded writes, limits.

use std::process::Stdio;
use std::time::Duration;

use lockbroker::{ChangeKind, ErrorCode, WatchEvent, WatchOptions, WriteOptions, WriteOutcome};
use lockbroker_proto::{ClientMessage, Event, Request, Response, ServerMessage};

use crate::util::{Daemon, Raw, bounded, on_both_backends, worker};

async fn run_workers(daemon: &Daemon, mode: &str, key: &str, n: u32, count: usize) {
    let children: Vec<_> = (0..count)
        .map(|_| {
            tokio::process::Command::new(worker())
                .arg(mode)
                .arg(&daemon.socket)
                .arg(key)
                .arg(n.to_string())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().await.unwrap().success());
    }
}

on_both_backends! {
async fn eight_processes_increment_one_key_exactly(backend) {
    bounded(async {
        let daemon = backend.start().await;
        run_workers(&daemon, "incr", "hits", 500, 8).await;
        let state = daemon.client().await.state();
        let v = state.get("hits").await.unwrap().unwrap();
        assert_eq!(v.value, b"4000");
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn compare_and_set_loops_lose_no_update(backend) {
    bounded(async {
        let daemon = backend.start().await;
        run_workers(&daemon, "cas", "cas", 100, 8).await;
        let state = daemon.client().await.state();
        assert_eq!(state.get("cas").await.unwrap().unwrap().value, b"800");
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn versions_conflicts_and_values(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let state = daemon.client().await.state();
        assert_eq!(state.get("k").await.unwrap(), None);
        // 0 means "must not exist".
        let v1 = match state.compare_and_set("k", 0, "a").await.unwrap() {
            WriteOutcome::Written { version } => version,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            state.compare_and_set("k", 0, "b").await.unwrap(),
            WriteOutcome::Conflict { current: v1 }
        );
        let v2 = state.set("other", "x").await.unwrap();
        assert!(v2 > v1, "versions come from one daemon-wide counter");
        let v3 = state.set("k", "c").await.unwrap();
        assert!(v3 > v2);
        let got = state.get("k").await.unwrap().unwrap();
        assert_eq!((got.value.as_slice(), got.version), (&b"c"[..], v3));
        // Remove returns the old value; a second remove finds nothing.
        let old = state.remove("k").await.unwrap().unwrap();
        assert_eq!((old.value.as_slice(), old.version), (&b"c"[..], v3));
        assert_eq!(state.remove("k").await.unwrap(), None);
        // Increment: absent counts as 0; a non-integer is an error.
        assert_eq!(state.increment("n", 5).await.unwrap(), 5);
        assert_eq!(state.increment("n", -7).await.unwrap(), -2);
        let err = state.increment("other", 1).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotAnInteger));
        state.set("big", i64::MAX.to_string()).await.unwrap();
        let err = state.increment("big", 1).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotAnInteger));
        assert_eq!(
            state.get("big").await.unwrap().unwrap().value,
            i64::MAX.to_string().as_bytes()
        );
        // JSON helpers.
        state.set_json("cfg", &vec![1, 2, 3]).await.unwrap();
        let (cfg, _): (Vec<u32>, u64) = state.get_json("cfg").await.unwrap().unwrap();
        assert_eq!(cfg, [1, 2, 3]);
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn list_is_ordered_and_paged(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let state = daemon.client().await.state();
        for i in (0..25).rev() {
            state
                .set(&format!("p/{i:02}"), format!("{i}"))
                .await
                .unwrap();
        }
        state.set("q", "outside").await.unwrap();
        let (page, more) = state.list_page("p/", "", 10, false).await.unwrap();
        assert!(more);
        assert_eq!(page.first().unwrap().key, "p/00");
        assert_eq!(page.last().unwrap().key, "p/09");
        assert!(page.iter().all(|e| e.value.is_none()));
        let (page, more) = state.list_page("p/", "p/09", 10, true).await.unwrap();
        assert!(more);
        assert_eq!(page[0].key, "p/10");
        assert_eq!(page[0].value.as_deref(), Some(&b"10"[..]));
        let all = state.list("p/", false).await.unwrap();
        let keys: Vec<String> = all.iter().map(|e| e.key.clone()).collect();
        let want: Vec<String> = (0..25).map(|i| format!("p/{i:02}")).collect();
        assert_eq!(keys, want);
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn a_watcher_sees_every_version_in_order(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let watcher = daemon.client().await;
        let mut watch = watcher.state().watch("hot").await.unwrap();
        let writer = daemon.client().await.state();
        let writes = tokio::spawn(async move {
            let mut versions = Vec::new();
            for i in 0..10_000u32 {
                versions.push(writer.set("hot", i.to_string()).await.unwrap());
            }
            versions
        });
        let mut seen = Vec::new();
        for i in 0..10_000u32 {
            match watch.next().await.unwrap() {
                WatchEvent::Changed {
                    key,
                    version,
                    change,
                    value,
                } => {
                    assert_eq!((key.as_str(), change), ("hot", ChangeKind::Set));
                    assert_eq!(value.unwrap(), i.to_string().as_bytes());
                    seen.push(version);
                }
                WatchEvent::Lagged => panic!("lagged at {i}"),
            }
        }
        assert_eq!(seen, writes.await.unwrap(), "every version, in order");
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn a_prefix_watch_sees_creations_and_removals_and_can_replay(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let client = daemon.client().await;
        let state = client.state();
        let before = state.set("jobs/0", "old").await.unwrap();
        let mut watch = state.watch_prefix("jobs/").await.unwrap();
        state.set("elsewhere", "x").await.unwrap();
        let v1 = state.set("jobs/1", "new").await.unwrap();
        state.remove("jobs/1").await.unwrap();
        let expect = |e: Option<WatchEvent>| match e.unwrap() {
            WatchEvent::Changed {
                key,
                version,
                change,
                ..
            } => (key, version, change),
            WatchEvent::Lagged => panic!("lagged"),
        };
        assert_eq!(
            expect(watch.next().await),
            ("jobs/1".into(), v1, ChangeKind::Set)
        );
        let (key, v2, change) = expect(watch.next().await);
        assert_eq!((key.as_str(), change), ("jobs/1", ChangeKind::Removed));
        assert!(v2 > v1);
        // A watch from an older version replays what happened since.
        let options = WatchOptions {
            prefix: true,
            from_version: before,
            with_values: false,
        };
        let mut replay = state.watch_with("jobs/", options).await.unwrap();
        assert_eq!(
            expect(replay.next().await),
            ("jobs/0".into(), before, ChangeKind::Set)
        );
        assert_eq!(
            expect(replay.next().await),
            ("jobs/1".into(), v1, ChangeKind::Set)
        );
        assert_eq!(
            expect(replay.next().await),
            ("jobs/1".into(), v2, ChangeKind::Removed)
        );
        let v3 = state.set("jobs/2", "live").await.unwrap();
        assert_eq!(
            expect(replay.next().await),
            ("jobs/2".into(), v3, ChangeKind::Set)
        );
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// A watcher that does not read its events is told it fell behind.
async fn a_slow_watcher_is_told_it_fell_behind(backend) {
    bounded(async {
        let daemon = backend.start_with(|c| c.state.history = 16).await;
        let mut raw = daemon.raw().await;
        raw.request(
            7,
            Request::StateWatch {
                key: "flood".into(),
                prefix: false,
                from_version: 0,
                with_values: true,
            },
        )
        .await;
        assert_eq!(raw.response().await, (7, Response::Done));
        // Fill the watcher's socket and the daemon's output buffer, then
        // far more than the history holds.
        let writer = daemon.client().await.state();
        let big = vec![b'x'; 64 * 1024];
        for _ in 0..200 {
            writer.set("flood", big.clone()).await.unwrap();
        }
        let mut lagged = false;
        let mut changes = 0;
        while let Some(msg) = raw.recv().await {
            match msg {
                ServerMessage::Event(Event::WatchLagged { watch_id: 7 }) => {
                    lagged = true;
                    break;
                }
                ServerMessage::Event(Event::StateChanged { watch_id: 7, .. }) => changes += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(lagged, "no lag event after {changes} changes");
        assert!(changes < 200);
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn ttl_expiry_is_seen_by_get_and_by_watch(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let state = daemon.client().await.state();
        let mut watch = state.watch("session/token").await.unwrap();
        let options = WriteOptions::default().ttl(Duration::from_millis(100));
        let WriteOutcome::Written { version } = state
            .set_with("session/token", "secret", options)
            .await
            .unwrap()
        else {
            panic!("conflict")
        };
        assert!(state.get("session/token").await.unwrap().is_some());
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::Changed {
                change: ChangeKind::Set,
                ..
            })
        ));
        match watch.next().await.unwrap() {
            WatchEvent::Changed {
                key,
                version: v,
                change,
                value,
            } => {
                assert_eq!(
                    (key.as_str(), change, value),
                    ("session/token", ChangeKind::Expired, None)
                );
                assert!(v > version);
            }
            WatchEvent::Lagged => panic!("lagged"),
        }
        assert_eq!(state.get("session/token").await.unwrap(), None);
        assert!(state.list("session/", false).await.unwrap().is_empty());
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn guarded_writes_need_the_hold(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let client = daemon.client().await;
        let state = client.state();
        let guard = client.mutex("deploy").acquire().await.unwrap();
        let options = WriteOptions::default().guard(&guard);
        assert!(matches!(
            state
                .set_with("deploy/status", "running", options)
                .await
                .unwrap(),
            WriteOutcome::Written { .. }
        ));
        assert_eq!(
            state
                .increment_guarded("deploy/count", 1, &guard)
                .await
                .unwrap(),
            1
        );
        let hold = guard.hold_id();
        guard.release().await.unwrap();
        // After the release, the same writes are refused and change nothing.
        let stale = WriteOptions {
            guard: Some(hold),
            ..WriteOptions::default()
        };
        let err = state
            .set_with("deploy/status", "stale", stale.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::GuardNotHeld));
        let err = state.remove_with("deploy/status", stale).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::GuardNotHeld));
        assert_eq!(
            state.get("deploy/status").await.unwrap().unwrap().value,
            b"running"
        );
        // Another session cannot use this session's hold either.
        let other = daemon.client().await;
        let g = other.mutex("deploy").acquire().await.unwrap();
        let theirs = WriteOptions {
            guard: Some(g.hold_id()),
            ..WriteOptions::default()
        };
        let err = state
            .set_with("deploy/status", "x", theirs)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::GuardNotHeld));
        assert_eq!(
            state.get("deploy/status").await.unwrap().unwrap().value,
            b"running"
        );
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
async fn fenced_writes_need_a_live_hold_with_that_fence(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let holder = daemon.client().await;
        // Another session writes with the holder's fence, as a command under
        // `lockbroker lock` does.
        let writer = daemon.client().await.state();
        let guard = holder.mutex("deploy").acquire().await.unwrap();
        let fence = guard.fence();
        let live = WriteOptions::default().fence("deploy", fence);
        assert!(matches!(
            writer
                .set_with("deploy/status", "step 3", live.clone())
                .await
                .unwrap(),
            WriteOutcome::Written { .. }
        ));
        assert_eq!(
            writer
                .increment_fenced("deploy/steps", 3, "deploy", fence)
                .await
                .unwrap(),
            3
        );
        // A fence that was never granted on this lock, and the right fence on
        // another lock, are refused.
        for (lock, f) in [("deploy", fence + 100), ("other", fence)] {
            let err = writer
                .set_with("deploy/status", "x", WriteOptions::default().fence(lock, f))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::StaleFence), "{lock} {f}");
        }
        // Released: the same fence is refused; a newer holder's older fence too.
        guard.release().await.unwrap();
        let err = writer
            .set_with("deploy/status", "late", live.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::StaleFence));
        let next = holder.mutex("deploy").acquire().await.unwrap();
        assert!(next.fence() > fence);
        let err = writer.remove_with("deploy/status", live).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::StaleFence));
        assert_eq!(
            writer.get("deploy/status").await.unwrap().unwrap().value,
            b"step 3",
            "refused writes changed nothing"
        );
        next.release().await.unwrap();
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// A fenced write must wrap a plain state write.
async fn a_fenced_write_of_anything_else_is_refused(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut raw = daemon.raw().await;
        let guard_and_fence = lockbroker_proto::Request::StateFenced {
            lock: "deploy".into(),
            fence: 1,
            write: Box::new(lockbroker_proto::Request::Ping),
        };
        let answer = raw.call(1, guard_and_fence).await;
        assert!(
            matches!(&answer, lockbroker_proto::Response::Error(e) if e.code == ErrorCode::InvalidArgument),
            "{answer:?}"
        );
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// A release pipelined right behind a guarded write waits for it: the write
/// is applied while the hold is still held, then the lock is released.
async fn a_release_behind_a_guarded_write_waits_for_it(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut raw = daemon.raw().await;
        let Response::Granted(g) = raw
            .call(
                1,
                crate::util::acquire("g", lockbroker::LockKind::Mutex, 0, 1, None),
            )
            .await
        else {
            panic!("not granted")
        };
        let mut batch = Vec::new();
        let write = ClientMessage::Request {
            id: 2,
            request: Request::StateSet(lockbroker_proto::StateSet {
                key: "guarded".into(),
                value: b"v".to_vec(),
                if_version: None,
                ttl_ms: None,
                guard: Some(g.hold_id),
            }),
        };
        let release = ClientMessage::Request {
            id: 3,
            request: Request::Release { hold_id: g.hold_id },
        };
        for msg in [&write, &release] {
            lockbroker_proto::frame::encode(
                msg,
                lockbroker_proto::DEFAULT_MAX_FRAME_LEN,
                &mut batch,
            )
            .unwrap();
        }
        raw.send_bytes(&batch).await;
        let (id, response) = raw.response().await;
        assert_eq!(id, 2, "the write is answered first");
        assert!(
            matches!(response, Response::StateWritten { .. }),
            "{response:?}"
        );
        assert_eq!(raw.response().await, (3, Response::Released { permits: 1 }));
        daemon.stop().await;
    })
    .await
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_and_value_size_give_their_errors() {
    bounded(async {
        let daemon = Daemon::start_with(|c| {
            c.state.max_value_len = 1000;
            c.state.max_keys_per_user = 3;
            c.state.max_bytes_per_user = 1500;
        })
        .await;
        let state = daemon.client().await.state();
        let err = state.set("big", vec![0u8; 1001]).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::ValueTooLarge));
        for k in ["a", "b", "c"] {
            state.set(k, "1").await.unwrap();
        }
        let err = state.set("d", "1").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
        // Overwriting an existing key is not a new key.
        state.set("a", vec![1u8; 900]).await.unwrap();
        let err = state.set("b", vec![1u8; 1000]).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
        assert_eq!(
            state.get("b").await.unwrap().unwrap().value,
            b"1",
            "nothing changed"
        );
        // Freeing a key makes room again.
        state.remove("c").await.unwrap();
        state.set("d", "1").await.unwrap();
        daemon.stop().await;
    })
    .await
}

on_both_backends! {
async fn bad_state_requests_keep_the_connection(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut raw = daemon.raw().await;
        let cases = [
            (Request::StateGet { key: "".into() }, ErrorCode::InvalidName),
            (
                Request::StateIncrement {
                    key: "bad\n".into(),
                    delta: 1,
                    guard: None,
                },
                ErrorCode::InvalidName,
            ),
            (Request::StateUnwatch { watch_id: 5 }, ErrorCode::NotPending),
            (
                Request::StateWatch {
                    key: "".into(),
                    prefix: false,
                    from_version: 0,
                    with_values: false,
                },
                ErrorCode::InvalidName,
            ),
        ];
        for (i, (request, code)) in cases.into_iter().enumerate() {
            match raw.call(i as u64 + 1, request).await {
                Response::Error(e) => assert_eq!(e.code, code),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(raw.call(99, Request::Ping).await, Response::Pong);
        let _ = Raw::connect(&daemon.socket).await;
        daemon.stop().await;
    })
    .await
}
}

fn frames(msgs: &[ClientMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        lockbroker_proto::frame::encode(m, lockbroker_proto::DEFAULT_MAX_FRAME_LEN, &mut out)
            .unwrap();
    }
    out
}

fn req(id: u64, request: Request) -> ClientMessage {
    ClientMessage::Request { id, request }
}

on_both_backends! {
/// Requests after a held-back release wait for it, so a try of the lock
/// just released (pipelined behind a guarded write) succeeds.
async fn requests_keep_their_order_behind_a_held_back_release(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut raw = daemon.raw().await;
        let Response::Granted(g) = raw
            .call(
                1,
                crate::util::acquire("o", lockbroker::LockKind::Mutex, 0, 1, None),
            )
            .await
        else {
            panic!("not granted")
        };
        let set = Request::StateSet(lockbroker_proto::StateSet {
            key: "o/status".into(),
            value: b"v".to_vec(),
            if_version: None,
            ttl_ms: None,
            guard: Some(g.hold_id),
        });
        let try_again = crate::util::acquire("o", lockbroker::LockKind::Mutex, 0, 1, Some(0));
        raw.send_bytes(&frames(&[
            req(2, set),
            req(3, Request::Release { hold_id: g.hold_id }),
            req(4, try_again),
        ]))
        .await;
        assert!(matches!(
            raw.response().await,
            (2, Response::StateWritten { .. })
        ));
        // Answers may come in any order (PROTOCOL.md 7): over etcd the
        // try's grant is written into the socket by the task that made it,
        // and can pass the release's answer.
        let mut answers = [raw.response().await, raw.response().await];
        answers.sort_by_key(|(id, _)| *id);
        let [(3, released), (4, r)] = answers else {
            panic!("answers to other requests: {answers:?}");
        };
        assert_eq!(released, Response::Released { permits: 1 });
        assert!(
            matches!(r, Response::Granted(_)),
            "the try ran before the release: {r:?}"
        );
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// The id of a state request still being answered cannot be reused.
async fn a_duplicate_id_of_an_unanswered_state_request_is_refused(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut raw = daemon.raw().await;
        let get = || Request::StateGet { key: "d".into() };
        // Both arrive in one read: the second is seen before the store answers.
        raw.send_bytes(&frames(&[req(9, get()), req(9, get())]))
            .await;
        let mut answers = [raw.response().await, raw.response().await];
        answers.sort_by_key(|(_, r)| matches!(r, Response::Error(_)));
        assert_eq!(answers[0], (9, Response::StateValue(None)));
        match &answers[1] {
            (9, Response::Error(e)) => assert_eq!(e.code, ErrorCode::DuplicateRequestId),
            other => panic!("{other:?}"),
        }
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// An unwatch right behind its watch ends it; a watch from a future version
/// sees only changes from that version on.
async fn unwatch_of_a_starting_watch_and_watches_from_the_future(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut raw = daemon.raw().await;
        let watch = |from| Request::StateWatch {
            key: "f".into(),
            prefix: false,
            from_version: from,
            with_values: false,
        };
        raw.send_bytes(&frames(&[
            req(1, watch(0)),
            req(2, Request::StateUnwatch { watch_id: 1 }),
        ]))
        .await;
        let mut got = [raw.response().await, raw.response().await];
        got.sort_by_key(|(id, _)| *id);
        assert_eq!(got, [(1, Response::Done), (2, Response::Done)]);
        let state = daemon.client().await.state();
        let v1 = state.set("f", "1").await.unwrap();
        // Watch from two versions ahead: writes below it are not seen, the
        // first at or past it is. (Over etcd, versions are the cluster's
        // revisions, which other writers advance too.)
        let from = v1 + 2;
        assert_eq!(raw.call(3, watch(from)).await, Response::Done);
        let mut first_seen = None;
        for n in 2.. {
            let v = state.set("f", n.to_string()).await.unwrap();
            assert!(v > v1);
            if v >= from {
                first_seen = Some(v);
                break;
            }
        }
        match raw.recv().await {
            Some(ServerMessage::Event(Event::StateChanged {
                watch_id: 3,
                version,
                ..
            })) => assert_eq!(Some(version), first_seen),
            other => panic!("{other:?}"),
        }
        // Watch 1 sent nothing: the next frame answers this ping.
        assert_eq!(raw.call(4, Request::Ping).await, Response::Pong);
        daemon.stop().await;
    })
    .await
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_caps_hold_for_everyone() {
    bounded(async {
        let daemon = Daemon::start_with(|c| {
            c.state.max_keys = 2;
            c.state.max_bytes = 1000;
        })
        .await;
        let state = daemon.client().await.state();
        state.set("a", "1").await.unwrap();
        state.set("b", "1").await.unwrap();
        let err = state.set("c", "1").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
        let err = state.set("a", vec![0u8; 999]).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
        assert_eq!(state.get("a").await.unwrap().unwrap().value, b"1");
        assert_eq!(state.get("c").await.unwrap(), None);
        daemon.stop().await;
    })
    .await
}

on_both_backends! {
/// The store answers state requests later; a session with `max_pending` of
/// them unanswered is not read further until one is answered, so it cannot
/// pile up requests (and values) without end. Everything is sent in one
/// write, so the daemon has it all at once: only that rule can keep it from
/// answering the Ping before the store has answered a `StateGet`.
async fn unanswered_state_requests_stop_the_reading_at_max_pending(backend) {
    bounded(async {
        let daemon = backend.start_with(|c| c.limits.max_pending = 2).await;
        let mut raw = Raw::connect(&daemon.socket).await;
        let get = |id| ClientMessage::Request {
            id,
            request: Request::StateGet { key: "k".into() },
        };
        let hello = ClientMessage::Hello(lockbroker_proto::Hello {
            magic: lockbroker_proto::MAGIC,
            version: lockbroker_proto::PROTOCOL_VERSION,
            client_name: "raw".into(),
        });
        let ping = ClientMessage::Request {
            id: 3,
            request: Request::Ping,
        };
        let mut bytes = Vec::new();
        for msg in [hello, get(1), get(2), ping] {
            let max = lockbroker_proto::DEFAULT_MAX_FRAME_LEN;
            lockbroker_proto::frame::encode(&msg, max, &mut bytes).unwrap();
        }
        raw.send_bytes(&bytes).await;
        assert!(matches!(raw.recv().await, Some(ServerMessage::Welcome(_))));
        let mut order = Vec::new();
        for _ in 0..3 {
            let (id, response) = raw.response().await;
            match id {
                3 => assert_eq!(response, Response::Pong),
                _ => assert_eq!(response, Response::StateValue(None)),
            }
            order.push(id);
        }
        assert_ne!(
            order[0], 3,
            "the Ping was answered before any state request: {order:?}"
        );
        order.sort_unstable();
        assert_eq!(order, [1, 2, 3]);
        daemon.stop().await;
    })
    .await
}
}

//! A holder killed with SIGKILL: the waiter is granted, told the lock was
//! abandoned, and gets a higher fence.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

use lockbroker::LockKind;
use lockbroker_proto::Response;

use crate::util::{acquire, bounded, on_both_backends, wait_until, worker};

on_both_backends! {
async fn kill_9_of_a_holder_hands_the_lock_on_as_abandoned(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut child = tokio::process::Command::new(worker())
            .arg("hold")
            .arg(&daemon.socket)
            .arg("job")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .await
            .unwrap();
        let holder_fence: u64 = line.trim().strip_prefix("held ").unwrap().parse().unwrap();

        let client = daemon.client().await;
        let info = client.inspect("job").await.unwrap();
        let holder = &info.entries[0].holders[0];
        assert_eq!(
            holder.session.pid,
            child.id(),
            "inspect shows the holder's pid"
        );
        assert_eq!(holder.session.client_name, "lb-worker");

        let mutex = client.mutex("job");
        let waiter = tokio::spawn(async move { mutex.acquire().await.unwrap() });
        wait_until("the waiter queues", || async {
            client.inspect("job").await.unwrap().entries[0]
                .waiters
                .len()
                == 1
        })
        .await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        let guard = waiter.await.unwrap();
        assert!(guard.abandoned(), "the waiter is told the holder died");
        assert!(guard.fence() > holder_fence);
        guard.release().await.unwrap();
        // Reported once.
        let again = client.mutex("job").acquire().await.unwrap();
        assert!(!again.abandoned());
        daemon.stop().await;
    })
    .await
}
}

on_both_backends! {
/// Abandonment is remembered when nobody was waiting at the time.
async fn abandonment_is_reported_to_a_later_acquirer(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let mut raw = daemon.raw().await;
        let granted = raw
            .call(1, acquire("later", LockKind::Mutex, 0, 1, None))
            .await;
        assert!(matches!(granted, Response::Granted(_)), "{granted:?}");
        drop(raw); // the connection closes with the lock held
        let b = daemon.client().await;
        wait_until("the session's holds are released", || async {
            let i = b.inspect("later").await.unwrap();
            i.entries.len() == 1 && i.entries[0].holders.is_empty()
        })
        .await;
        let info = b.inspect("later").await.unwrap();
        assert!(info.entries[0].abandoned);
        let g = b.mutex("later").acquire().await.unwrap();
        assert!(g.abandoned());
        daemon.stop().await;
    })
    .await
}
}

//! Mutual exclusion across OS processes.

use std::process::Stdio;

use crate::util::{bounded, on_both_backends, worker};

on_both_backends! {
/// 8 processes × 300 read-increment-write cycles of one counter file under
/// one mutex end at exactly 2400: no update is lost.
async fn processes_increment_a_file_under_a_mutex(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("counter");
        std::fs::write(&counter, "0\n").unwrap();
        let children: Vec<_> = (0..8)
            .map(|_| {
                tokio::process::Command::new(worker())
                    .arg("increment")
                    .arg(&daemon.socket)
                    .arg("counter")
                    .arg(&counter)
                    .arg("300")
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("spawn worker")
            })
            .collect();
        for mut child in children {
            assert!(child.wait().await.unwrap().success());
        }
        let total = std::fs::read_to_string(&counter).unwrap();
        assert_eq!(total.trim(), "2400");
        let client = daemon.client().await;
        assert!(client.inspect("").await.unwrap().entries.is_empty());
        daemon.stop().await;
    })
    .await
}
}

//! State that survives the daemon: every acknowledged write outlives a
//! SIGKILL, fences never go backwards, and a corrupt database stops the
//! daemon from starting.

use std::ffi::OsStr;
use std::time::Duration;

use lockbroker::Connector;

use crate::util::{address, bounded, daemon_bin, spawn_daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_and_fences_keep_growing() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = address(dir.path());
        let state_dir = dir.path().join("state");
        let flags = [OsStr::new("--state-dir"), state_dir.as_os_str()];
        let mut daemon = spawn_daemon(&socket, &flags).await;
        let connector = Connector::new().socket(&socket);
        let client = connector.connect().await.unwrap();
        let mut fences = Vec::new();
        for _ in 0..3 {
            let g = client.mutex("fenced").acquire().await.unwrap();
            fences.push(g.fence());
            g.release().await.unwrap();
        }
        // Several writers, each recording what the daemon acknowledged.
        let mut writers = Vec::new();
        for w in 0..4 {
            let state = connector.connect().await.unwrap().state();
            writers.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0.. {
                    let key = format!("w{w}/{i:06}");
                    match state.set(&key, format!("{w}:{i}")).await {
                        Ok(version) => acked.push((key, format!("{w}:{i}"), version)),
                        Err(_) => return acked, // the daemon was killed
                    }
                }
                unreachable!()
            }));
        }
        // Kill it in the middle of the load, once enough is acknowledged.
        let probe = connector.connect().await.unwrap().state();
        loop {
            let n = probe.list_page("w0/", "", 0, false).await.unwrap().0.len();
            if n >= 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        daemon.kill(); // SIGKILL
        let mut acked = Vec::new();
        for w in writers {
            acked.extend(w.await.unwrap());
        }
        assert!(acked.len() >= 100);

        let mut daemon = spawn_daemon(&socket, &flags).await;
        let client = connector.connect().await.unwrap();
        let state = client.state();
        for (key, value, version) in &acked {
            let got = state.get(key).await.unwrap();
            let got = got.unwrap_or_else(|| panic!("acknowledged write of {key} lost"));
            assert_eq!(
                (got.value.as_slice(), got.version),
                (value.as_bytes(), *version),
                "{key}"
            );
        }
        // Versions and fences continue above everything before the kill.
        let max_version = acked.iter().map(|a| a.2).max().unwrap();
        assert!(state.set("after", "restart").await.unwrap() > max_version);
        let g = client.mutex("fenced").acquire().await.unwrap();
        assert!(g.fence() > *fences.iter().max().unwrap());
        drop(g);
        daemon.kill();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_dropped_on_load() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = address(dir.path());
        let state_dir = dir.path().join("state");
        let flags = [OsStr::new("--state-dir"), state_dir.as_os_str()];
        let mut daemon = spawn_daemon(&socket, &flags).await;
        let state = Connector::new()
            .socket(&socket)
            .connect()
            .await
            .unwrap()
            .state();
        let ttl = lockbroker::WriteOptions::default().ttl(Duration::from_millis(50));
        state.set_with("short", "x", ttl).await.unwrap();
        state.set("long", "y").await.unwrap();
        daemon.kill();
        // Outlive the TTL while the daemon is down.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut daemon = spawn_daemon(&socket, &flags).await;
        let state = Connector::new()
            .socket(&socket)
            .connect()
            .await
            .unwrap()
            .state();
        assert_eq!(state.get("short").await.unwrap(), None);
        assert_eq!(state.get("long").await.unwrap().unwrap().value, b"y");
        daemon.kill();
    })
    .await
}

#[test]
fn a_corrupt_database_stops_the_daemon_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let db = state_dir.join("state.redb");
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    let socket = address(dir.path());
    let out = std::process::Command::new(daemon_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to start"), "{err}");
    assert!(err.contains(&db.display().to_string()), "{err}");
    // A pipe leaves nothing behind to look for once its process is gone.
    #[cfg(unix)]
    assert!(!socket.exists(), "it listened anyway");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        vec![0x5a; 8192],
        "the file was changed"
    );
}

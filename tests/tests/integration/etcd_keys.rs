//! The etcd backend's keys: a name taken over and over, by one session or
//! by many, keeps the same few keys (etcd keeps every deleted key in its
//! index until it compacts, and each acquire reads the name's range, so a
//! new key per hold made a busy lock slower with every use); and a key an
//! ended session left in etcd is never taken over by a new hold; and a
//! release writes its note only when someone can be waiting behind it.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::PutOptions;
use lockbroker_tests::etcd::{self, Cluster};

use crate::util::{bounded, waiters};

/// The hold keys of `name` in etcd now.
async fn hold_keys(cluster: &Cluster, prefix: &str, name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let range = format!("{prefix}/l/{name}\0");
    cluster
        .keys(&range)
        .await
        .into_iter()
        // Not the release note or the abandonment marker.
        .filter(|(k, _)| k.len() > range.len() + 1)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_again_and_again_keeps_its_few_keys() {
    let Some(cluster) = etcd::shared().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("keys-reused");
        let host = cluster
            .daemon(&prefix, Some(0), Duration::from_secs(10))
            .await;
        let mut seen = BTreeSet::new();
        // Ten sessions one after the other (as ten `lockbroker lock`
        // commands are), each taking the name ten times, two holds at
        // a time.
        for _ in 0..10 {
            let client = host.client().await;
            let semaphore = client.semaphore("busy", 2);
            for _ in 0..10 {
                let a = semaphore.acquire().await.unwrap();
                let b = semaphore.acquire().await.unwrap();
                for (key, _) in hold_keys(cluster, &prefix, "busy").await {
                    seen.insert(key);
                }
                a.release().await.unwrap();
                b.release().await.unwrap();
            }
            drop(client);
        }
        assert_eq!(
            seen.len(),
            2,
            "200 holds, at most two at a time, should have used two keys: {seen:?}"
        );
        host.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_left_by_an_ended_session_is_not_taken_over() {
    let Some(cluster) = etcd::shared().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("keys-stale");
        let host = cluster
            .daemon(&prefix, Some(0), Duration::from_secs(10))
            .await;
        let client = host.client().await;
        let mutex = client.mutex("job");
        let first = mutex.acquire().await.unwrap();
        let fence = first.fence();
        let [(key, value)]: [_; 1] = hold_keys(cluster, &prefix, "job").await.try_into().unwrap();
        first.release().await.unwrap();
        // The key again, on a lease of another: as a session's key is
        // between its daemon failing to revoke its lease and etcd
        // expiring it.
        let mut etcd = etcd_client::Client::connect(cluster.endpoints(), cluster.options())
            .await
            .unwrap();
        let lease = etcd.lease_grant(60, None).await.unwrap().id();
        etcd.put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
        // The next acquire in the same slot waits behind that key.
        let waiter = tokio::spawn(async move { mutex.acquire().await.unwrap() });
        let observer = host.client().await;
        waiters(&observer, "job", 1).await;
        let kept = etcd.get(key.clone(), None).await.unwrap();
        assert_eq!(
            kept.kvs()[0].lease(),
            lease,
            "the stale key was put over by a new hold"
        );
        assert!(!waiter.is_finished(), "granted over a stale key");
        // Its lease gone, its hold is abandoned to the waiter.
        etcd.lease_revoke(lease).await.unwrap();
        let guard = waiter.await.unwrap();
        assert!(guard.abandoned());
        assert!(guard.fence() > fence);
        guard.release().await.unwrap();
        host.stop().await;
    })
    .await
}

/// Whether `name`'s release note is in etcd now.
async fn has_note(cluster: &Cluster, prefix: &str, name: &str) -> bool {
    let note = format!("{prefix}/l/{name}\0~");
    cluster
        .keys(&note)
        .await
        .iter()
        .any(|(k, _)| k == note.as_bytes())
}

/// A release writes its note (which tells the next holder it was not
/// abandoned) only when a key of the name is newer than those it deletes:
/// an uncontended release is a delete alone, and a waiter is still told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_writes_its_note_only_for_a_key_behind_it() {
    let Some(cluster) = etcd::shared().await else {
        return;
    };
    bounded(async {
        let prefix = etcd::unique_prefix("notes");
        let host = cluster
            .daemon(&prefix, Some(0), Duration::from_secs(10))
            .await;
        let client = host.client().await;
        for _ in 0..3 {
            let guard = client.mutex("solo").acquire().await.unwrap();
            guard.release().await.unwrap();
        }
        assert!(
            !has_note(cluster, &prefix, "solo").await,
            "a release nobody waited behind wrote a note"
        );

        let held = client.mutex("pair").acquire().await.unwrap();
        let other = host.client().await;
        let mutex = other.mutex("pair");
        let waiting = tokio::spawn(async move { mutex.acquire().await.unwrap() });
        waiters(&client, "pair", 1).await;
        held.release().await.unwrap();
        let granted = waiting.await.unwrap();
        assert!(!granted.abandoned(), "the waiter is told it was released");
        assert!(
            has_note(cluster, &prefix, "pair").await,
            "the release the waiter was behind wrote no note"
        );
        granted.release().await.unwrap();
        host.stop().await;
    })
    .await;
}

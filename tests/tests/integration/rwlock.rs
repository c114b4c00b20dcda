//! Read-write locks: readers together, writers alone, writers not starved.

use std::time::Duration;

use crate::util::{bounded, on_both_backends, wait_until};

on_both_backends! {
async fn readers_share_writers_exclude_and_a_waiting_writer_blocks_new_readers(backend) {
    bounded(async {
        let daemon = backend.start().await;
        let a = daemon.client().await;
        let b = daemon.client().await;
        let c = daemon.client().await;
        let r1 = a.rwlock("rw").read().await.unwrap();
        let r2 = b.rwlock("rw").read().await.unwrap();
        assert!(
            c.rwlock("rw").try_write().await.unwrap().is_none(),
            "writer with readers in"
        );
        // A writer queues behind the readers...
        let c_rw = c.rwlock("rw");
        let writer = tokio::spawn(async move { c_rw.write().await.unwrap() });
        wait_until("the writer queues", || async {
            a.inspect("rw").await.unwrap().entries[0].waiters.len() == 1
        })
        .await;
        // ...and from then on new readers wait behind it.
        assert!(a.rwlock("rw").try_read().await.unwrap().is_none());
        let late = a
            .rwlock("rw")
            .read_timeout(Duration::from_millis(20))
            .await
            .unwrap();
        assert!(late.is_none(), "a reader overtook the waiting writer");
        let a_rw = a.rwlock("rw");
        let reader = tokio::spawn(async move { a_rw.read().await.unwrap() });
        wait_until("the late reader queues", || async {
            a.inspect("rw").await.unwrap().entries[0].waiters.len() == 2
        })
        .await;
        r1.release().await.unwrap();
        r2.release().await.unwrap();
        let w = writer.await.unwrap();
        let info = a.inspect("rw").await.unwrap();
        assert_eq!(info.entries[0].holders.len(), 1, "the writer is alone");
        assert_eq!(info.entries[0].waiters.len(), 1);
        w.release().await.unwrap();
        let r3 = reader.await.unwrap();
        // Readers may join a reader while nobody waits.
        let r4 = b.rwlock("rw").try_read().await.unwrap();
        assert!(r4.is_some());
        drop((r3, r4));
        daemon.stop().await;
    })
    .await
}
}

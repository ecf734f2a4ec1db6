//! Per-key order on PostgreSQL holds across concurrent writers: a writer of an ordering key waits
//! until an open transaction that wrote the same key commits, so rows of one key get their seqs in
//! commit order (a `BIGSERIAL` alone is taken at insert); writers of other keys do not wait.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use wharf_sdk::{Event, Outbox, OutboxStore, PgOutbox};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_one_ordering_key_take_turns_so_seq_order_is_commit_order() {
    let Some(pool) = postgres().await else { return };
    let outbox = PgOutbox::new(pool.clone());
    outbox.migrate().await.unwrap();
    // Unique per run: the lock table is the whole cluster's.
    let key = format!("order-{}", uuid_like_key());
    let event = |id: &str, key: &str| Event::new("orders", "order.updated", id.to_owned()).with_id(id).ordered_by(key);

    let mut first = pool.begin().await.unwrap();
    outbox.enqueue(&mut first, &event("first", &key)).await.unwrap();
    let second = tokio::spawn({
        let (pool, outbox, event) = (pool.clone(), outbox.clone(), event("second", &key));
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue(&mut tx, &event).await.unwrap();
            tx.commit().await.unwrap();
        }
    });
    eventually("the second writer waits for the first's key lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objsubid = 2
             AND objid::bigint = (hashtext($1)::bigint & 4294967295)",
        )
        .bind(&key)
        .fetch_one(&pool)
        .await
        .unwrap();
        waiting == 1
    })
    .await;
    // Another key is not held up.
    let mut other = pool.begin().await.unwrap();
    outbox.enqueue(&mut other, &event("other", &format!("{key}-other"))).await.unwrap();
    other.commit().await.unwrap();
    assert!(!second.is_finished(), "the second writer of the key still waits");

    first.commit().await.unwrap();
    second.await.unwrap();
    let claimed = outbox.claim("relay", i64::MAX / 2, 1_000, 10).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|row| row.event.id.as_str()).collect();
    // One row per key is claimable at a time: the key's first (in seq order) and the other key's.
    assert_eq!(ids, vec!["first", "other"], "the first committed has the lower seq");
}

fn uuid_like_key() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{nanos:x}-{:x}", std::process::id())
}

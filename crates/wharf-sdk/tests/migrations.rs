//! Versioned migrations and configurable names, on PostgreSQL, SQLite and MySQL: a fresh database
//! gets every version once; a database made by the SDK before migrations were versioned is
//! brought up to date in place, its rows kept and relayed; replicas migrating at once each apply
//! every version once; tables and the notification channel can be named (in a schema of their own
//! on PostgreSQL) and work end to end; a name that is not a plain SQL name is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use wharf_sdk::{
    Inbox, InboxConfig, Outbox, OutboxConfig, OutboxStore, PgInbox, PgOutbox, SdkError, SqliteInbox, SqliteOutbox,
};

/// (object, version) rows of the versions table, in order.
async fn versions_pg(pool: &sqlx::PgPool, table: &str) -> Vec<(String, i64)> {
    sqlx::query_as(&format!("SELECT object, version FROM {table} WHERE version > 0 ORDER BY object, version"))
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn versions_sqlite(pool: &sqlx::SqlitePool) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT object, version FROM wharf_schema_versions WHERE version > 0 ORDER BY object, version")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn expected(outbox: &str, inbox: &str) -> Vec<(String, i64)> {
    let mut rows = vec![(outbox.to_owned(), 1), (outbox.to_owned(), 3), (outbox.to_owned(), 4), (inbox.to_owned(), 2)];
    rows.sort();
    rows
}

/// The outbox table exactly as SDKs before versioned migrations created it, with one row.
const UNVERSIONED_OUTBOX: &str = "CREATE TABLE wharf_outbox (
    seq {serial}, id TEXT NOT NULL UNIQUE, exchange TEXT NOT NULL, routing_key TEXT NOT NULL,
    ordering_key TEXT, headers TEXT NOT NULL DEFAULT '{}', content_type TEXT, body {bytes} NOT NULL,
    created_at BIGINT NOT NULL, status SMALLINT NOT NULL DEFAULT 0, claimed_by TEXT, claimed_until BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0, refusals INTEGER NOT NULL DEFAULT 0, sent_at BIGINT, failure TEXT)";
const OLD_ROW: &str = "INSERT INTO wharf_outbox (id, exchange, routing_key, body, created_at)
    VALUES ('old-1', 'orders', 'order.received', 'x', 1)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_are_versioned_and_upgrade_an_unversioned_table() {
    let Some(pool) = postgres().await else { return };
    sqlx::query(&UNVERSIONED_OUTBOX.replace("{serial}", "BIGSERIAL PRIMARY KEY").replace("{bytes}", "BYTEA"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(OLD_ROW).execute(&pool).await.unwrap();
    let outbox = PgOutbox::new(pool.clone());
    let inbox = PgInbox::new(pool.clone(), "payments");
    // Replicas starting together: every version applied once, none fails.
    let migrations: Vec<_> = (0..4)
        .map(|index| {
            let (outbox, inbox) = (outbox.clone(), inbox.clone());
            tokio::spawn(async move { if index % 2 == 0 { outbox.migrate().await } else { inbox.migrate().await } })
        })
        .collect();
    for migration in migrations {
        migration.await.unwrap().unwrap();
    }
    outbox.migrate().await.unwrap();
    assert_eq!(versions_pg(&pool, "wharf_schema_versions").await, expected("wharf_outbox", "wharf_inbox"));
    // The old row is still there and claimable, with the new columns empty.
    let claimed = outbox.claim("relay-1", i64::MAX / 2, 1_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event.id, "old-1");
    assert_eq!(claimed[0].event.message_type, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrations_are_versioned_and_upgrade_an_unversioned_table() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite(dir.path()).await;
    sqlx::query(
        &UNVERSIONED_OUTBOX.replace("{serial}", "INTEGER PRIMARY KEY AUTOINCREMENT").replace("{bytes}", "BLOB"),
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(OLD_ROW).execute(&pool).await.unwrap();
    let outbox = SqliteOutbox::new(pool.clone());
    let inbox = SqliteInbox::new(pool.clone(), "payments");
    let migrations: Vec<_> = (0..4)
        .map(|index| {
            let (outbox, inbox) = (outbox.clone(), inbox.clone());
            tokio::spawn(async move { if index % 2 == 0 { outbox.migrate().await } else { inbox.migrate().await } })
        })
        .collect();
    for migration in migrations {
        migration.await.unwrap().unwrap();
    }
    assert_eq!(versions_sqlite(&pool).await, expected("wharf_outbox", "wharf_inbox"));
    let claimed = outbox.claim("relay-1", i64::MAX / 2, 1_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event.id, "old-1");
}

/// A typed event through an outbox and an inbox with names of their own, relayed and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tables_in_a_schema_of_their_own_work_end_to_end_on_postgres() {
    let Some(pool) = postgres().await else { return };
    // A schema of its own, named after the test's (the database is shared by every run).
    let own: String = sqlx::query_scalar("SELECT current_schema()").fetch_one(&pool).await.unwrap();
    let shop = format!("{own}_shop");
    sqlx::query(&format!("CREATE SCHEMA {shop}")).execute(&pool).await.unwrap();
    let config = OutboxConfig { table: format!("{shop}.events"), notify_channel: "shop_events".into() };
    let outbox = PgOutbox::with_config(pool.clone(), &config).unwrap();
    let inbox = PgInbox::with_config(pool.clone(), "payments", &InboxConfig { table: format!("{shop}.seen") }).unwrap();
    outbox.migrate().await.unwrap();
    inbox.migrate().await.unwrap();
    assert_eq!(
        versions_pg(&pool, &format!("{shop}.wharf_schema_versions")).await,
        expected(&format!("{shop}.events"), &format!("{shop}.seen"))
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND indexname LIKE 'events_%' ORDER BY 1",
    )
    .bind(&shop)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(indexes, vec!["events_id_key", "events_pending", "events_pkey", "events_sent", "events_unsent_by_key"]);

    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    let mut tx = pool.begin().await.unwrap();
    let id = outbox.enqueue_for_test(&mut tx).await;
    assert_eq!(inbox.handle(&mut tx, &id).await.unwrap(), wharf_sdk::Seen::First);
    tx.commit().await.unwrap();
    let mut relay = wharf_sdk::Relay::new(outbox.clone(), relay_config(&broker.url())).unwrap();
    assert_eq!(relay.round().await.unwrap().sent, 1);
    assert_eq!(outbox.unsent_count().await.unwrap(), 0);
    let seen: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {shop}.seen")).fetch_one(&pool).await.unwrap();
    assert_eq!(seen, 1);
    broker.stop().await;
}

trait EnqueueForTest {
    async fn enqueue_for_test(&self, tx: &mut sqlx::Transaction<'static, sqlx::Postgres>) -> String;
}

impl EnqueueForTest for PgOutbox {
    async fn enqueue_for_test(&self, tx: &mut sqlx::Transaction<'static, sqlx::Postgres>) -> String {
        let event = wharf_sdk::Event::new("orders", "order.received", "{}").with_type("OrderReceived");
        self.enqueue(tx, &event).await.unwrap();
        event.id
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tables_work_on_sqlite_and_names_that_are_not_sql_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite(dir.path()).await;
    let outbox =
        SqliteOutbox::with_config(pool.clone(), &OutboxConfig { table: "events".into(), ..Default::default() })
            .unwrap();
    let inbox = SqliteInbox::with_config(pool.clone(), "payments", &InboxConfig { table: "seen".into() }).unwrap();
    outbox.migrate().await.unwrap();
    inbox.migrate().await.unwrap();
    assert_eq!(versions_sqlite(&pool).await, expected("events", "seen"));
    let mut tx = pool.begin().await.unwrap();
    let event = wharf_sdk::Event::new("orders", "order.received", "{}");
    outbox.enqueue(&mut tx, &event).await.unwrap();
    assert_eq!(inbox.handle(&mut tx, &event.id).await.unwrap(), wharf_sdk::Seen::First);
    tx.commit().await.unwrap();
    assert_eq!(outbox.unsent_count().await.unwrap(), 1);

    for bad in ["events; DROP TABLE seen", "1events", "a.b.c", ""] {
        let refused =
            SqliteOutbox::with_config(pool.clone(), &OutboxConfig { table: bad.into(), ..Default::default() });
        assert!(
            matches!(&refused, Err(SdkError::Config(reason)) if reason.contains("outbox table")),
            "{bad}: {refused:?}"
        );
        let refused = SqliteInbox::with_config(pool.clone(), "c", &InboxConfig { table: bad.into() });
        assert!(matches!(&refused, Err(SdkError::Config(reason)) if reason.contains("inbox table")), "{bad}");
    }
    let channel = OutboxConfig { notify_channel: "bad channel".into(), ..Default::default() };
    assert!(matches!(SqliteOutbox::with_config(pool.clone(), &channel), Err(SdkError::Config(_))));
    let schema = OutboxConfig { table: "shop.events".into(), ..Default::default() };
    assert!(
        matches!(SqliteOutbox::with_config(pool.clone(), &schema), Err(SdkError::Config(reason)) if reason.contains("no schemas"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_migrations_are_versioned_and_upgrade_an_unversioned_table() {
    use wharf_sdk::{MySqlInbox, MySqlOutbox};
    let Some(pool) = mysql().await else { return };
    // Version 1 applied by hand (an SDK from before versioning, or a team's own tool), one row.
    let version_1 = wharf_sdk::migrate::statements(&wharf_sdk::migrate::MYSQL[0], &"wharf_outbox".parse_table());
    for statement in version_1 {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    sqlx::query(
        "INSERT INTO wharf_outbox (id, exchange, routing_key, headers, body, created_at)
         VALUES ('old-1', 'orders', 'order.received', '{}', 'x', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // But unrecorded: the runner applies it again (IF NOT EXISTS: nothing happens) and the rest.
    let outbox = MySqlOutbox::new(pool.clone());
    let inbox = MySqlInbox::new(pool.clone(), "payments");
    let migrations: Vec<_> = (0..4)
        .map(|index| {
            let (outbox, inbox) = (outbox.clone(), inbox.clone());
            tokio::spawn(async move { if index % 2 == 0 { outbox.migrate().await } else { inbox.migrate().await } })
        })
        .collect();
    for migration in migrations {
        migration.await.unwrap().unwrap();
    }
    let versions: Vec<(String, i64)> =
        sqlx::query_as("SELECT object, version FROM wharf_schema_versions ORDER BY object, version")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<(String, i64)> =
        [("wharf_inbox", 2), ("wharf_outbox", 1), ("wharf_outbox", 3), ("wharf_outbox", 4), ("wharf_outbox", 5)]
            .into_iter()
            .map(|(object, version)| (object.to_owned(), version))
            .collect();
    assert_eq!(versions, expected);
    let claimed = outbox.claim("relay-1", i64::MAX / 2, 1_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event.id, "old-1");
    // Ids compare byte for byte, and a duplicate is refused with the transaction still usable.
    let mut tx = pool.begin().await.unwrap();
    for id in ["aB", "Ab"] {
        outbox.enqueue(&mut tx, &wharf_sdk::Event::new("orders", "k", "x").with_id(id)).await.unwrap();
        assert_eq!(inbox.handle(&mut tx, id).await.unwrap(), wharf_sdk::Seen::First, "{id}");
    }
    let again = outbox.enqueue(&mut tx, &wharf_sdk::Event::new("orders", "k", "x").with_id("aB")).await;
    assert!(matches!(again, Err(SdkError::Duplicate { .. })), "{again:?}");
    assert_eq!(inbox.handle(&mut tx, "Ab").await.unwrap(), wharf_sdk::Seen::Again);
    tx.commit().await.unwrap();
    assert_eq!(outbox.unsent_count().await.unwrap(), 3, "old-1, aB and Ab");
    let refused =
        MySqlOutbox::with_config(pool.clone(), &OutboxConfig { table: "shop.events".into(), ..Default::default() });
    assert!(matches!(refused, Err(SdkError::Config(reason)) if reason.contains("URL chooses the database")));
}

trait ParseTable {
    fn parse_table(&self) -> wharf_sdk::names::TableName;
}

impl ParseTable for str {
    fn parse_table(&self) -> wharf_sdk::names::TableName {
        wharf_sdk::names::TableName::parse("table", self).unwrap()
    }
}

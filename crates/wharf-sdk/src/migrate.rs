//! Versioned migrations of the SDK's tables. The SQL lives in `migrations/<database>/` as plain
//! files written for the default names, so teams that run their own migration tool (sqlx-migrate,
//! Flyway, Liquibase) copy them in unchanged. `migrate()` on an outbox or inbox applies the files
//! for its table that its database has not recorded yet, in version order, each recorded in
//! `wharf_schema_versions` (in the table's schema) in the same transaction. Concurrent callers
//! (replicas starting together) serialise on a lock, so each version runs once.

use crate::names::{TableName, rename_table};
use crate::{Result, SdkError};

/// Which table a migration belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    /// The outbox (`wharf_outbox` by default).
    Outbox,
    /// The inbox (`wharf_inbox` by default).
    Inbox,
}

impl Object {
    /// The name the migration files use for the table.
    pub fn default_table(self) -> &'static str {
        match self {
            Object::Outbox => "wharf_outbox",
            Object::Inbox => "wharf_inbox",
        }
    }
}

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number (the file name's prefix); versions rise across all the files of a database.
    pub version: i64,
    /// The table it changes.
    pub object: Object,
    /// The rest of its file name.
    pub description: &'static str,
    /// Its SQL, for the default names.
    pub sql: &'static str,
}

macro_rules! migration {
    ($database:literal, $version:literal, $prefix:literal, $object:ident, $description:literal) => {
        Migration {
            version: $version,
            object: Object::$object,
            description: $description,
            sql: include_str!(concat!("../migrations/", $database, "/", $prefix, "_", $description, ".sql")),
        }
    };
}

/// PostgreSQL's migrations.
pub const POSTGRES: &[Migration] = &[
    migration!("postgres", 1, "0001", Outbox, "outbox_create"),
    migration!("postgres", 2, "0002", Inbox, "inbox_create"),
    migration!("postgres", 3, "0003", Outbox, "outbox_message_properties"),
    migration!("postgres", 4, "0004", Outbox, "outbox_available_at"),
];

/// SQLite's migrations.
pub const SQLITE: &[Migration] = &[
    migration!("sqlite", 1, "0001", Outbox, "outbox_create"),
    migration!("sqlite", 2, "0002", Inbox, "inbox_create"),
    migration!("sqlite", 3, "0003", Outbox, "outbox_message_properties"),
    migration!("sqlite", 4, "0004", Outbox, "outbox_available_at"),
];

/// MySQL's (and MariaDB's) migrations.
pub const MYSQL: &[Migration] = &[
    migration!("mysql", 1, "0001", Outbox, "outbox_create"),
    migration!("mysql", 2, "0002", Inbox, "inbox_create"),
    migration!("mysql", 3, "0003", Outbox, "outbox_message_properties"),
    migration!("mysql", 4, "0004", Outbox, "outbox_available_at"),
    migration!("mysql", 5, "0005", Outbox, "outbox_key_locks"),
];

/// The table that records applied versions.
pub const VERSIONS_TABLE: &str = "wharf_schema_versions";

/// The statements of a migration for `table`: comments dropped, split at `;`.
pub fn statements(migration: &Migration, table: &TableName) -> Vec<String> {
    let without_comments: String = migration
        .sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .map(|line| format!("{line}\n"))
        .collect();
    rename_table(&without_comments, migration.object.default_table(), table)
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(str::to_owned)
        .collect()
}

fn pending<'a>(all: &'a [Migration], object: Object, applied: &[i64]) -> impl Iterator<Item = &'a Migration> {
    all.iter().filter(move |migration| migration.object == object && !applied.contains(&migration.version))
}

#[cfg(feature = "postgres")]
pub(crate) async fn postgres(pool: &sqlx::PgPool, object: Object, table: &TableName) -> Result<()> {
    use sqlx::Row;
    let versions = table.sibling(VERSIONS_TABLE);
    let mut tx = pool.begin().await?;
    // One lock for every SDK migration in the database: concurrent CREATE TABLE IF NOT EXISTS
    // calls can still collide in PostgreSQL's catalog, so even the first one waits its turn.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(VERSIONS_TABLE).execute(&mut *tx).await?;
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {versions} (object TEXT NOT NULL, version BIGINT NOT NULL,
            description TEXT NOT NULL, applied_at BIGINT NOT NULL, PRIMARY KEY (object, version))"
    ))
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i64> = sqlx::query(&format!("SELECT version FROM {versions} WHERE object = $1"))
        .bind(table.qualified())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| row.try_get("version"))
        .collect::<std::result::Result<_, _>>()?;
    for migration in pending(POSTGRES, object, &applied) {
        for statement in statements(migration, table) {
            sqlx::query(&statement).execute(&mut *tx).await.map_err(|error| failed(migration, error))?;
        }
        sqlx::query(&format!(
            "INSERT INTO {versions} (object, version, description, applied_at) VALUES ($1, $2, $3, $4)"
        ))
        .bind(table.qualified())
        .bind(migration.version)
        .bind(migration.description)
        .bind(crate::outbox::now_ms())
        .execute(&mut *tx)
        .await?;
        tracing::info!(table = %table.qualified(), version = migration.version, "migrated");
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(feature = "sqlite")]
pub(crate) async fn sqlite(pool: &sqlx::SqlitePool, object: Object, table: &TableName) -> Result<()> {
    use sqlx::Row;
    if table.schema().is_some() {
        return Err(SdkError::Config(format!(
            "'{}': SQLite has no schemas; name the table without one",
            table.qualified()
        )));
    }
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (object TEXT NOT NULL, version INTEGER NOT NULL,
            description TEXT NOT NULL, applied_at INTEGER NOT NULL, PRIMARY KEY (object, version))"
    ))
    .execute(pool)
    .await?;
    let mut tx = pool.begin().await?;
    // A write first, so this transaction holds SQLite's write lock (waiting on the busy timeout
    // for another migrating process) before it reads which versions are applied.
    sqlx::query(&format!(
        "INSERT INTO {VERSIONS_TABLE} (object, version, description, applied_at) VALUES (?, 0, 'known', ?)
         ON CONFLICT (object, version) DO NOTHING"
    ))
    .bind(table.qualified())
    .bind(crate::outbox::now_ms())
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i64> = sqlx::query(&format!("SELECT version FROM {VERSIONS_TABLE} WHERE object = ?"))
        .bind(table.qualified())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| row.try_get("version"))
        .collect::<std::result::Result<_, _>>()?;
    for migration in pending(SQLITE, object, &applied) {
        for statement in statements(migration, table) {
            sqlx::query(&statement).execute(&mut *tx).await.map_err(|error| failed(migration, error))?;
        }
        sqlx::query(&format!(
            "INSERT INTO {VERSIONS_TABLE} (object, version, description, applied_at) VALUES (?, ?, ?, ?)"
        ))
        .bind(table.qualified())
        .bind(migration.version)
        .bind(migration.description)
        .bind(crate::outbox::now_ms())
        .execute(&mut *tx)
        .await?;
        tracing::info!(table = %table.qualified(), version = migration.version, "migrated");
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(feature = "mysql")]
pub(crate) async fn mysql(pool: &sqlx::MySqlPool, object: Object, table: &TableName) -> Result<()> {
    use sqlx::Row;
    if table.schema().is_some() {
        return Err(SdkError::Config(format!(
            "'{}': name the table without a database; the connection URL chooses the database",
            table.qualified()
        )));
    }
    // MySQL commits around every DDL statement, so a transaction cannot hold a migration and its
    // record together, nor serialise migrating replicas: a named lock does (held by this
    // connection until released).
    let mut connection = pool.acquire().await?;
    let locked: Option<i64> =
        sqlx::query_scalar("SELECT GET_LOCK(?, 60)").bind(VERSIONS_TABLE).fetch_one(&mut *connection).await?;
    if locked != Some(1) {
        return Err(SdkError::Config("could not take the migration lock within 60 s".into()));
    }
    let migrated = async {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (object VARCHAR(255) NOT NULL, version BIGINT NOT NULL,
                description VARCHAR(255) NOT NULL, applied_at BIGINT NOT NULL, PRIMARY KEY (object, version))
                ENGINE=InnoDB"
        ))
        .execute(&mut *connection)
        .await?;
        let applied: Vec<i64> = sqlx::query(&format!("SELECT version FROM {VERSIONS_TABLE} WHERE object = ?"))
            .bind(table.qualified())
            .fetch_all(&mut *connection)
            .await?
            .iter()
            .map(|row| row.try_get("version"))
            .collect::<std::result::Result<_, _>>()?;
        for migration in pending(MYSQL, object, &applied) {
            for statement in statements(migration, table) {
                sqlx::query(&statement).execute(&mut *connection).await.map_err(|error| failed(migration, error))?;
            }
            sqlx::query(&format!(
                "INSERT INTO {VERSIONS_TABLE} (object, version, description, applied_at) VALUES (?, ?, ?, ?)"
            ))
            .bind(table.qualified())
            .bind(migration.version)
            .bind(migration.description)
            .bind(crate::outbox::now_ms())
            .execute(&mut *connection)
            .await?;
            tracing::info!(table = %table.qualified(), version = migration.version, "migrated");
        }
        Ok::<(), SdkError>(())
    }
    .await;
    let _ = sqlx::query("SELECT RELEASE_LOCK(?)").bind(VERSIONS_TABLE).execute(&mut *connection).await;
    migrated
}

fn failed(migration: &Migration, error: sqlx::Error) -> SdkError {
    SdkError::Migration { version: migration.version, description: migration.description.to_owned(), source: error }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in `migrations/` is listed, and nothing listed is missing: a file added to the
    /// directory but not to the list would never run.
    #[test]
    fn the_lists_match_the_files() {
        for (database, list) in [("postgres", POSTGRES), ("sqlite", SQLITE), ("mysql", MYSQL)] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(database);
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .collect();
            files.sort();
            let listed: Vec<String> = list
                .iter()
                .map(|migration| format!("{:04}_{}.sql", migration.version, migration.description))
                .collect();
            assert_eq!(files, listed, "{database}");
            let versions: Vec<i64> = list.iter().map(|migration| migration.version).collect();
            assert!(versions.windows(2).all(|pair| pair[0] < pair[1]), "{database}: versions rise");
        }
    }

    #[test]
    fn statements_are_split_and_renamed() {
        let table = TableName::parse("t", "shop_outbox").unwrap();
        let split = statements(&POSTGRES[0], &table);
        assert_eq!(split.len(), 4);
        assert!(split[0].starts_with("CREATE TABLE IF NOT EXISTS shop_outbox ("), "{}", split[0]);
        assert!(split[1].contains("shop_outbox_pending ON shop_outbox"), "{}", split[1]);
        assert!(split.iter().all(|statement| !statement.contains("wharf_outbox")));
    }
}

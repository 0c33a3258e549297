//! The measurement store: where registrations, connection events and hole-punch results live.
//!
//! SQLite is the default: one file, created on first start, in WAL mode (readers do not block
//! the writer), foreign keys enforced, migrations (`migrations/sqlite`) applied on open.

use std::str::FromStr as _;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is not one this store understands.
    #[error("database URL {url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The database refused.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Opens (creating it if needed) the SQLite database at `url` (`sqlite://FILE`) and applies the
/// migrations.
pub async fn open_sqlite(url: &str) -> Result<SqlitePool, StoreError> {
    if !url.starts_with("sqlite:") {
        return Err(StoreError::Url {
            url: url.to_owned(),
            reason: "not a SQLite URL (sqlite://FILE)".into(),
        });
    }
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // With WAL, NORMAL is durable against process crashes (a killed server loses nothing
        // committed); only a power loss can lose the last transactions.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    sqlx::migrate!("migrations/sqlite").run(&pool).await?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fresh_file_gets_the_schema_once_in_wal_mode() {
        let dir = std::env::temp_dir().join(format!("natpunch-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let url = format!("sqlite://{}", dir.join("natpunch.db").display());
        let pool = open_sqlite(&url).await.expect("open");
        let tables: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .fetch_all(&pool)
                .await
                .expect("tables");
        let names: Vec<&str> = tables.iter().map(|t| t.0.as_str()).collect();
        for t in [
            "authorizations",
            "clients",
            "connection_events",
            "hole_punch_attempt",
            "hole_punch_results",
            "latency_measurements",
            "multi_addresses",
            "peers",
            "port_mappings",
        ] {
            assert!(names.contains(&t), "{t} in {names:?}");
        }
        let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(&pool)
            .await
            .expect("mode");
        assert_eq!(mode, "wal");
        // api_key is unique (punchr's was not).
        let insert = "INSERT INTO authorizations (api_key, username, created_at) VALUES (?, ?, 0)";
        sqlx::query(insert)
            .bind("k")
            .bind("a")
            .execute(&pool)
            .await
            .expect("first");
        assert!(
            sqlx::query(insert)
                .bind("k")
                .bind("b")
                .execute(&pool)
                .await
                .is_err()
        );
        // Enums are checked.
        sqlx::query("INSERT INTO peers (multi_hash, updated_at, created_at) VALUES ('p', 0, 0)")
            .execute(&pool)
            .await
            .expect("peer");
        let bad_outcome = sqlx::query(
            "INSERT INTO hole_punch_results (local_id, remote_id, authorization_id, \
             connect_started_at, connect_ended_at, has_direct_conns, outcome, ended_at, \
             updated_at, created_at) VALUES (1, 1, 1, 0, 0, 0, 'MAYBE', 0, 0, 0)",
        )
        .execute(&pool)
        .await;
        assert!(
            bad_outcome.is_err(),
            "an outcome outside the enum is refused"
        );
        pool.close().await;
        // Opening again applies nothing twice.
        let pool = open_sqlite(&url).await.expect("reopen");
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .expect("migrations");
        assert_eq!(n, 1);
        let err = open_sqlite("postgres://nope")
            .await
            .expect_err("not sqlite");
        assert!(err.to_string().contains("database URL"), "{err}");
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! The measurement store: registrations, connection events, allocations and hole-punch results.
//!
//! [`Store`] is what the server needs; [`SqlStore`] implements it on two real databases, picked
//! by URL:
//! - `sqlite://FILE`: the default; one file, created on first start, WAL mode (readers do not
//!   block the writer), `synchronous=NORMAL` (durable against a killed process), foreign keys on.
//! - `postgres://…`: for campaigns at scale, with punchr's column types (TIMESTAMPTZ, INTERVAL,
//!   arrays, enum types) so its notebooks work on it.
//!
//! The schema and the statements are each written once. The schema (`migrations/`) is written in
//! PostgreSQL's dialect with SQLite's lines derived from it, rendered for the backend and applied
//! on open (`schema`); in the statements, the few places where the two dialects differ are
//! marked `{kind $n}` and rendered per backend when the store opens (see [`render`]).
//!
//! Every write runs in one transaction: a report is stored whole or not at all.
//!
//! The parts: `schema` (the migrations, rendered), `dialect` ([`render`]), `statements` (every
//! statement, rendered once per store), `ids` (write transactions and the cache of committed
//! peer and address ids), `tracking` (registrations, connection events),
//! `allocation` (which remote a host punches next), `batch` (group commit of reports) and
//! [`dashboard`] (the live dashboard's figures); the [`Store`] methods here run those
//! transactions, again after a deadlock or a serialization failure.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom as _;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor as _, Row as _};

use crate::report::{Addr, Report};

/// Runs a transaction (an async expression, evaluated again for each try) until it succeeds,
/// fails for good, or has been tried [`TRIES`] times.
macro_rules! retrying {
    ($transaction:expr) => {{
        let mut n = 1;
        loop {
            match $transaction.await {
                Err(e) if n < $crate::store::TRIES && $crate::store::is_transient(&e) => {
                    tracing::debug!(error = %e, try_number = n, "transaction tried again");
                    tokio::time::sleep($crate::store::backoff(n)).await;
                    n += 1;
                }
                other => break other,
            }
        }
    }};
}

mod allocation;
mod batch;
pub mod dashboard;
mod dialect;
mod ids;
mod schema;
mod statements;
mod tracking;

pub use dialect::render;
use ids::{IdCache, Kind, Write, find_or_insert};
use statements::Statements;

/// Why the store could not do what was asked.
///
/// sqlx's errors put their cause into their own message and return it from `source()` too, so
/// a chain of causes (`natpunch`'s `error: a: b: c`) would say it twice or three times: these
/// variants show sqlx's message and return no source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is not one this store understands. The message leaves the URL (and a
    /// password in it) to the caller, which names the database it was opening.
    #[error("{reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The database refused.
    #[error("{0}")]
    Database(sqlx::Error),
    /// A migration failed.
    #[error("migrating the database: {0}")]
    Migrate(sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
}

/// The database behind a [`SqlStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A libp2p host as it registers.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    /// Base58 peer ID.
    pub peer: &'a str,
    /// Its agent version.
    pub agent_version: &'a str,
    /// Its protocols.
    pub protocols: &'a [String],
}

/// A peer the honeypot saw: it connected from `conn_addr` and advertised `addrs`.
#[derive(Debug, Clone)]
pub struct ConnectionEvent {
    /// The honeypot's peer ID.
    pub local: String,
    /// The remote peer's ID.
    pub remote: String,
    /// Its agent version (from identify).
    pub agent_version: Option<String>,
    /// Its protocols (from identify).
    pub protocols: Vec<String>,
    /// The address the connection came from.
    pub conn_addr: Addr,
    /// The addresses it advertised (relay addresses among them).
    pub addrs: Vec<Addr>,
    /// Unix ns.
    pub opened_at: i64,
}

/// The allocation rules (punchr's values are the defaults).
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Only peers the honeypot saw this recently are served.
    pub recency: Duration,
    /// A remote is served at most this many times …
    pub per_remote: u32,
    /// … within this window.
    pub per_remote_window: Duration,
    /// A peer and address are not served again to the same client (any of its hosts) within
    /// this window.
    pub dedup_window: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            recency: Duration::from_secs(600),
            per_remote: 10,
            per_remote_window: Duration::from_secs(60),
            dedup_window: Duration::from_secs(600),
        }
    }
}

/// A remote to hole-punch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Base58 peer ID.
    pub remote: String,
    /// Its relayed addresses (text), sorted.
    pub addrs: Vec<String>,
}

/// What [`Store::allocate`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocated {
    /// A remote for the caller.
    Served(Allocation),
    /// Nothing eligible right now.
    NoneLeft,
    /// None of the caller's hosts is registered with its key.
    NotRegistered,
}

/// What [`Store::track`] did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// Stored as this result id.
    Stored(i64),
    /// A report with the same idempotency key is stored already (this id); nothing was added.
    Duplicate(i64),
    /// The reporting host is not registered with this key; nothing was stored.
    NotRegistered,
}

/// Row counts, for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// `hole_punch_results`.
    pub results: i64,
    /// `hole_punch_attempt`.
    pub attempts: i64,
    /// `latency_measurements`.
    pub latencies: i64,
    /// `port_mappings`.
    pub mappings: i64,
    /// `network_information`.
    pub networks: i64,
    /// `hole_punch_results_x_multi_addresses`.
    pub result_addrs: i64,
    /// `peers`.
    pub peers: i64,
    /// `allocations`.
    pub allocations: i64,
}

/// One stored hole-punch result, for summaries.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    /// The reporting host (base58 peer ID).
    pub local: String,
    /// The remote.
    pub remote: String,
    /// punchr's outcome name.
    pub outcome: String,
    /// The protocol filter in effect (multiaddr codes).
    pub filters: Vec<i32>,
    /// The transport of the direct connection.
    pub transport: Option<String>,
    /// Seconds from the relayed to the direct connection.
    pub time_to_direct: Option<f64>,
    /// The client's NAT behaviour, as it measured it.
    pub client_nat: Option<String>,
    /// The remote's NAT: what the client said, else what the vantage points saw.
    pub remote_nat: Option<String>,
}

/// What the measurement server needs from a database. Times are Unix nanoseconds, passed in so
/// that the rules can be tested in virtual time.
pub trait Store: Clone + Send + Sync + 'static {
    /// The authorization id of `api_key`, if it is known.
    fn authorize(
        &self,
        api_key: &str,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Registers `host` under `api_key` and returns its peer's database id. An unknown key is
    /// created as an anonymous authorization when `open`; otherwise the answer is `None`.
    fn register(
        &self,
        api_key: &str,
        open: bool,
        host: Host<'_>,
        now: i64,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Picks a random remote for the client whose hosts are `hosts` (base58 peer IDs).
    fn allocate(
        &self,
        auth: i64,
        hosts: &[String],
        rules: Rules,
        now: i64,
    ) -> impl Future<Output = Result<Allocated, StoreError>> + Send;

    /// Stores `report`, sent under authorization `auth`, in one transaction.
    fn track(
        &self,
        auth: i64,
        report: &Report,
        now: i64,
    ) -> impl Future<Output = Result<Tracked, StoreError>> + Send;

    /// Records a peer the honeypot saw; returns the event's id.
    fn record_connection(
        &self,
        event: &ConnectionEvent,
        now: i64,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// The agent version `peer` (base58) last registered or was seen with.
    fn agent_of(
        &self,
        peer: &str,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Counts the rows of the main tables.
    fn counts(&self) -> impl Future<Output = Result<Counts, StoreError>> + Send;
}

/// The store on SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    sql: Arc<Statements>,
    /// SQLite has one writer at a time; taking turns here is fairer and faster than its busy
    /// loop.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Ids of peers and addresses known to be stored (rows are never deleted but by hand).
    ids: Arc<std::sync::Mutex<IdCache>>,
    /// Where [`Store::track`] hands its reports to the group-commit workers (`None` in the
    /// workers' own copies).
    batch: Option<batch::Queue>,
    /// The batch's statements, composed for the backend.
    batch_sql: Arc<batch::BatchSql>,
}

/// `url` with its password, if it has one, replaced by `***`: the form a database URL is
/// printed in.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Nanoseconds of a duration, for window arithmetic.
fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The multiaddr codes of a stored protocol filter, read as text: `[4,6]` (SQLite's JSON) or
/// `{4,6}` (PostgreSQL's array).
fn filter_codes(text: &str) -> Vec<i32> {
    text.split(|c: char| !c.is_ascii_digit() && c != '-')
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// A JSON array of `items`.
fn json<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

impl SqlStore {
    /// Opens the database at `url` (`sqlite://FILE` or `postgres://…`), creating a SQLite file
    /// if needed, and applies the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let bad = |reason: &str| StoreError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (backend, connect_url) = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(bad("a SQLite database URL needs a file: sqlite://FILE"));
            }
            let sep = if path.contains('?') { '&' } else { '?' };
            let url = if path.contains("mode=") {
                url.to_owned()
            } else {
                format!("{url}{sep}mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(bad(
                "unsupported database URL: use sqlite://FILE or postgres://USER@HOST/DB",
            ));
        };
        let options = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 16,
            })
            .acquire_timeout(Duration::from_secs(10));
        let pool = match backend {
            Backend::Sqlite => {
                options
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // With WAL, NORMAL is durable against process crashes (a killed
                            // server loses nothing committed); only a power loss can lose the
                            // last transactions.
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(&connect_url)
                    .await?
            }
            Backend::Postgres => {
                // The pool retries a failing connect until its timeout and then says only
                // "pool timed out"; one plain connection first gives the cause (connection
                // refused, no such role, …).
                let first = <sqlx::AnyConnection as sqlx::Connection>::connect(&connect_url);
                match tokio::time::timeout(Duration::from_secs(10), first).await {
                    Ok(Ok(c)) => {
                        let _ = sqlx::Connection::close(c).await;
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {}
                }
                options.connect(&connect_url).await?
            }
        };
        schema::migrator(backend).await?.run(&pool).await?;
        let sql = Statements::new(backend);
        let mut store = Self {
            pool,
            backend,
            batch_sql: Arc::new(batch::BatchSql::new(&sql, backend)),
            sql: Arc::new(sql),
            writer: Arc::new(tokio::sync::Mutex::new(())),
            ids: Arc::default(),
            batch: None,
        };
        // SQLite writes one transaction at a time; PostgreSQL overlaps one batch's commit with
        // the next one's statements.
        let workers = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => 2,
        };
        store.batch = Some(batch::spawn(&store, workers));
        Ok(store)
    }

    /// Stores `reports`, sent under authorization `auth`, in one transaction of their own, with
    /// no server or queue in between: what the database takes at most, for `natpunch bench
    /// server`'s limit.
    pub async fn track_directly(
        &self,
        auth: i64,
        reports: &[Report],
        now: i64,
    ) -> Result<Vec<Tracked>, StoreError> {
        let items: Vec<(i64, &Report, i64)> = reports.iter().map(|r| (auth, r, now)).collect();
        self.store_batch(&items).await
    }

    /// Every stored hole-punch result, oldest first.
    pub async fn results(&self) -> Result<Vec<ResultRow>, StoreError> {
        let rows = sqlx::query(&self.sql.results).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let filters: String = r.try_get(3)?;
                Ok(ResultRow {
                    local: r.try_get(0)?,
                    remote: r.try_get(1)?,
                    outcome: r.try_get(2)?,
                    filters: filter_codes(&filters),
                    transport: r.try_get(4)?,
                    time_to_direct: r.try_get(5)?,
                    client_nat: r.try_get(6)?,
                    remote_nat: r.try_get(7)?,
                })
            })
            .collect()
    }

    /// Whether the database answers (a trivial query within 3 s).
    pub async fn ping(&self) -> bool {
        let q = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(
            tokio::time::timeout(Duration::from_secs(3), q).await,
            Ok(Ok(_))
        )
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection pool, for queries of its own (tests, reports).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Whether `e` is a deadlock or serialization failure, after which the transaction is run
/// again.
fn is_transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(sqlx::Error::Database(d))
        if matches!(d.code().as_deref(), Some("40P01" | "40001")))
}

/// How many times a transaction is tried.
const TRIES: u32 = 5;

/// The pause before try `n` (1-based) of a transaction that failed transiently.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(5 << n.min(6))
}

impl Store for SqlStore {
    async fn authorize(&self, api_key: &str) -> Result<Option<i64>, StoreError> {
        if let Some(id) = self.cached(Kind::Auth, api_key) {
            return Ok(Some(id));
        }
        let id: Option<i64> = sqlx::query(&self.sql.authorize)
            .bind(api_key)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
        if let Some(id) = id {
            self.remember(Kind::Auth, api_key, id);
        }
        Ok(id)
    }

    async fn register(
        &self,
        api_key: &str,
        open: bool,
        host: Host<'_>,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let known = self.authorize(api_key).await?;
        if known.is_none() && !open {
            return Ok(None);
        }
        retrying!(self.register_tx(api_key, known, host, now)).map(Some)
    }

    async fn allocate(
        &self,
        auth: i64,
        hosts: &[String],
        rules: Rules,
        now: i64,
    ) -> Result<Allocated, StoreError> {
        let registered = sqlx::query(&self.sql.client_hosts)
            .bind(auth)
            .bind(json(hosts))
            .fetch_all(&self.pool)
            .await?;
        let by_name: HashMap<String, i64> = registered
            .iter()
            .map(|r| Ok((r.try_get::<String, _>(1)?, r.try_get::<i64, _>(0)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        // The asking host is the first one given that is registered.
        let Some(local) = hosts.iter().find_map(|h| by_name.get(h).copied()) else {
            return Ok(Allocated::NotRegistered);
        };
        let host_ids: Vec<i64> = by_name.values().copied().collect();
        let mut conn = self.pool.acquire().await?;
        let rows = self
            .candidates(&mut conn, &host_ids, None, rules, now)
            .await?;
        drop(conn);
        let mut peers: Vec<i64> = rows
            .iter()
            .filter_map(|r| r.try_get::<i64, _>(0).ok())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        peers.shuffle(&mut rand::rng());
        for remote in peers {
            if let Some(a) =
                retrying!(self.allocate_tx(auth, local, remote, &host_ids, rules, now))?
            {
                return Ok(Allocated::Served(a));
            }
        }
        Ok(Allocated::NoneLeft)
    }

    async fn track(&self, auth: i64, report: &Report, now: i64) -> Result<Tracked, StoreError> {
        if let Some(queue) = &self.batch
            && let Ok(answer) = batch::hand(queue, auth, report, now).await
        {
            return answer;
        }
        self.track_one(auth, report, now).await
    }

    async fn record_connection(&self, e: &ConnectionEvent, now: i64) -> Result<i64, StoreError> {
        retrying!(self.record_tx(e, now))
    }

    async fn agent_of(&self, peer: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query(&self.sql.agent_of)
            .bind(peer)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get::<Option<String>, _>(0))
            .transpose()?
            .flatten())
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let row = sqlx::query(&self.sql.counts).fetch_one(&self.pool).await?;
        Ok(Counts {
            results: row.try_get(0)?,
            attempts: row.try_get(1)?,
            latencies: row.try_get(2)?,
            mappings: row.try_get(3)?,
            networks: row.try_get(4)?,
            result_addrs: row.try_get(5)?,
            peers: row.try_get(6)?,
            allocations: row.try_get(7)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact("postgres://punchr:secret@db:5432/punchr"),
            "postgres://punchr:***@db:5432/punchr"
        );
        assert_eq!(
            redact("postgres://natpunch@db/x"),
            "postgres://natpunch@db/x"
        );
        assert_eq!(redact("sqlite://natpunch.db"), "sqlite://natpunch.db");
    }
}

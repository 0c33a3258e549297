//! The measurement store: registrations, connection events, allocations and hole-punch results.
//!
//! [`Store`] is what the server needs; [`SqlStore`] implements it on two real databases, picked
//! by URL:
//! - `sqlite://FILE`: the default; one file, created on first start, WAL mode (readers do not
//!   block the writer), `synchronous=NORMAL` (durable against a killed process), foreign keys on.
//! - `postgres://…`: for campaigns at scale, with punchr's column types (TIMESTAMPTZ, INTERVAL,
//!   arrays, enum types) so its notebooks work on it.
//!
//! Both get their migrations (`migrations/sqlite`, `migrations/postgres`) applied on open. The
//! statements are written once; the few places where the two dialects differ are marked
//! `{kind $n}` and rendered per backend when the store opens (see [`render`]).
//!
//! Every write runs in one transaction: a report is stored whole or not at all.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom as _;
use sha2::Digest as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor as _, Row as _, Transaction};

use crate::report::{self, Addr, Report};

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

/// Renders the dialect marks of `sql` for `backend`. A mark is `{kind $n}`:
/// - `ts`: a Unix-nanosecond integer (kept as is in SQLite, a TIMESTAMPTZ in PostgreSQL);
/// - `interval`: seconds as a float (REAL, INTERVAL);
/// - `secs`: an interval column read back as seconds;
/// - `TYPE[]`: a JSON array given as text (kept as JSON text, an array of TYPE);
/// - `each TYPE`: the elements of a JSON array as rows, for `IN (SELECT {each TYPE $n})`;
/// - any other word: a cast to that type in PostgreSQL (enum types, `inet`, `bigint`), nothing
///   in SQLite.
pub fn render(sql: &str, backend: Backend) -> String {
    let mut out = String::with_capacity(sql.len() * 2);
    let mut rest = sql;
    while let Some(start) = rest.find('{') {
        out.push_str(rest.get(..start).unwrap_or_default());
        let after = rest.get(start + 1..).unwrap_or_default();
        let Some(end) = after.find('}') else {
            out.push_str(rest.get(start..).unwrap_or_default());
            rest = "";
            break;
        };
        let mark = after.get(..end).unwrap_or_default();
        rest = after.get(end + 1..).unwrap_or_default();
        let words: Vec<&str> = mark.split_whitespace().collect();
        let piece = match (backend, words.as_slice()) {
            (Backend::Sqlite, ["each", _, x]) => format!("value FROM json_each({x})"),
            (Backend::Postgres, ["each", ty, x]) => {
                format!("jsonb_array_elements_text(({x})::jsonb)::{ty}")
            }
            (Backend::Sqlite, [_, x]) => (*x).to_owned(),
            (Backend::Postgres, ["ts", x]) => {
                format!("(timestamptz 'epoch' + (({x}) / 1000)::float8 * interval '1 microsecond')")
            }
            (Backend::Postgres, ["interval", x]) => format!("make_interval(secs => {x})"),
            (Backend::Postgres, ["secs", x]) => format!("extract(epoch from {x})::float8"),
            (Backend::Postgres, [ty, x]) => match ty.strip_suffix("[]") {
                Some(elem) => {
                    format!("ARRAY(SELECT jsonb_array_elements_text(({x})::jsonb)::{elem})")
                }
                None => format!("({x})::{ty}"),
            },
            _ => format!("{{{mark}}}"),
        };
        out.push_str(&piece);
    }
    out.push_str(rest);
    out
}

macro_rules! statements {
    ($($(#[$doc:meta])* $name:ident = $sql:expr;)*) => {
        /// The statements, rendered for one backend.
        #[derive(Debug)]
        struct Statements {
            $($(#[$doc])* $name: String,)*
        }

        impl Statements {
            fn new(backend: Backend) -> Self {
                Self { $($name: render($sql, backend),)* }
            }

            #[cfg(test)]
            fn all(&self) -> Vec<&str> {
                vec![$(self.$name.as_str(),)*]
            }
        }
    };
}

statements! {
    authorize = "SELECT id FROM authorizations WHERE api_key = $1";
    insert_authorization = "INSERT INTO authorizations (api_key, username, created_at) \
        VALUES ($1, 'anonymous', {ts $2}) ON CONFLICT (api_key) DO NOTHING RETURNING id";
    find_peer = "SELECT id FROM peers WHERE multi_hash = $1";
    agent_of = "SELECT agent_version FROM peers WHERE multi_hash = $1";
    insert_peer = "INSERT INTO peers (multi_hash, updated_at, created_at) \
        VALUES ($1, {ts $2}, {ts $2}) ON CONFLICT (multi_hash) DO NOTHING RETURNING id";
    /// Only when something changed: an update locks the row until the transaction ends.
    update_peer = "UPDATE peers SET agent_version = $2, protocols = {text[] $3}, \
        updated_at = {ts $4} WHERE id = $1 AND (agent_version IS DISTINCT FROM $2 \
        OR protocols IS DISTINCT FROM {text[] $3})";
    insert_client = "INSERT INTO clients (peer_id, authorization_id, created_at) \
        VALUES ($1, $2, {ts $3}) ON CONFLICT (peer_id, authorization_id) DO NOTHING";
    client_peer = "SELECT p.id, p.agent_version FROM peers p JOIN clients c ON c.peer_id = p.id \
        WHERE p.multi_hash = $1 AND c.authorization_id = $2";
    client_hosts = "SELECT p.id, p.multi_hash FROM peers p JOIN clients c ON c.peer_id = p.id \
        WHERE c.authorization_id = $1 AND p.multi_hash IN (SELECT {each text $2})";
    /// Relay addresses of peers seen since $1, not the caller's hosts ($2), under the per-remote
    /// cap ($4 since $3), not served to or reported by the caller's hosts since $6 with the same
    /// address; $5 limits it to one peer.
    candidates = "SELECT DISTINCT p.id, p.multi_hash, ma.id, ma.maddr \
        FROM connection_events ce \
        JOIN connection_events_x_multi_addresses cx ON cx.connection_event_id = ce.id \
        JOIN multi_addresses ma ON ma.id = cx.multi_address_id \
        JOIN peers p ON p.id = ce.remote_id \
        WHERE ce.opened_at > {ts $1} AND ma.is_relay \
        AND ({bigint $5} IS NULL OR p.id = $5) \
        AND p.id NOT IN (SELECT {each bigint $2}) \
        AND (SELECT count(*) FROM allocations a \
             WHERE a.remote_id = p.id AND a.created_at > {ts $3}) < $4 \
        AND NOT EXISTS (SELECT 1 FROM allocations a \
             JOIN allocations_x_multi_addresses ax ON ax.allocation_id = a.id \
             WHERE a.remote_id = p.id AND ax.multi_address_id = ma.id \
             AND a.local_id IN (SELECT {each bigint $2}) AND a.created_at > {ts $6}) \
        AND NOT EXISTS (SELECT 1 FROM hole_punch_results r \
             JOIN hole_punch_results_x_multi_addresses rx ON rx.hole_punch_result_id = r.id \
             WHERE r.remote_id = p.id AND rx.multi_address_id = ma.id \
             AND rx.relationship = 'INITIAL' \
             AND r.local_id IN (SELECT {each bigint $2}) AND r.created_at > {ts $6})";
    lock_peer = "SELECT id FROM peers WHERE id = $1 FOR UPDATE";
    insert_allocation = "INSERT INTO allocations (local_id, remote_id, authorization_id, \
        created_at) VALUES ($1, $2, $3, {ts $4}) RETURNING id";
    link_allocation = "INSERT INTO allocations_x_multi_addresses (allocation_id, \
        multi_address_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
    find_key = "SELECT id FROM hole_punch_results WHERE idempotency_key = $1";
    find_maddr = "SELECT id FROM multi_addresses WHERE maddr = $1";
    insert_maddr = "INSERT INTO multi_addresses (maddr, addr, transport, is_relay, is_public, \
        updated_at, created_at) VALUES ($1, {inet $2}, $3, $4, $5, {ts $6}, {ts $6}) \
        ON CONFLICT (maddr) DO NOTHING RETURNING id";
    find_set = "SELECT id FROM multi_addresses_sets WHERE digest = $1";
    insert_set = "INSERT INTO multi_addresses_sets (digest, multi_addresses_ids) \
        VALUES ($1, {bigint[] $2}) ON CONFLICT (digest) DO NOTHING RETURNING id";
    insert_result = "INSERT INTO hole_punch_results (local_id, remote_id, authorization_id, \
        connect_started_at, connect_ended_at, has_direct_conns, error, outcome, ended_at, \
        protocol_filters, listen_multi_addresses_set_id, idempotency_key, technique, \
        time_to_direct, client_nat, remote_nat, transport, updated_at, created_at) \
        VALUES ($1, $2, $3, {ts $4}, {ts $5}, $6, $7, {hole_punch_outcome $8}, {ts $9}, \
        {int[] $10}, $11, $12, $13, {interval $14}, $15, $16, $17, {ts $18}, {ts $18}) \
        RETURNING id";
    insert_attempt = "INSERT INTO hole_punch_attempt (hole_punch_result_id, opened_at, \
        started_at, ended_at, start_rtt, elapsed_time, outcome, error, direct_dial_error, \
        updated_at, created_at) VALUES ($1, {ts $2}, {ts $3}, {ts $4}, {interval $5}, \
        {interval $6}, {hole_punch_attempt_outcome $7}, $8, $9, {ts $10}, {ts $10}) \
        RETURNING id";
    link_attempt = "INSERT INTO hole_punch_attempt_x_multi_addresses (hole_punch_attempt, \
        multi_address_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
    link_result = "INSERT INTO hole_punch_results_x_multi_addresses (hole_punch_result_id, \
        multi_address_id, relationship) \
        VALUES ($1, $2, {hole_punch_multi_address_relationship $3}) ON CONFLICT DO NOTHING";
    insert_mapping = "INSERT INTO port_mappings (hole_punch_result_id, internal_port, \
        external_port, protocol, addr, addr_network) VALUES ($1, $2, $3, $4, $5, $6)";
    insert_network = "INSERT INTO network_information (peer_id, hole_punch_result_id, \
        supports_ipv6, supports_ipv6_error, router_html, router_html_error, created_at) \
        VALUES ($1, $2, $3, $4, $5, $6, {ts $7})";
    insert_latency = "INSERT INTO latency_measurements (remote_id, hole_punch_result_id, \
        multi_address_id, mtype, rtts, rtt_errs, rtt_avg, rtt_max, rtt_min, rtt_std, \
        created_at) VALUES ($1, $2, $3, {latency_measurement_type $4}, {float8[] $5}, \
        {text[] $6}, $7, $8, $9, $10, {ts $11})";
    insert_connection = "INSERT INTO connection_events (local_id, remote_id, \
        conn_multi_address_id, opened_at, created_at) VALUES ($1, $2, $3, {ts $4}, {ts $5}) \
        RETURNING id";
    link_connection = "INSERT INTO connection_events_x_multi_addresses (connection_event_id, \
        multi_address_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
    results = "SELECT l.multi_hash, r.multi_hash, {text h.outcome}, {text h.protocol_filters}, \
        h.transport, {secs h.time_to_direct}, h.client_nat FROM hole_punch_results h \
        JOIN peers l ON l.id = h.local_id JOIN peers r ON r.id = h.remote_id ORDER BY h.id";
    counts = "SELECT (SELECT count(*) FROM hole_punch_results), \
        (SELECT count(*) FROM hole_punch_attempt), (SELECT count(*) FROM latency_measurements), \
        (SELECT count(*) FROM port_mappings), (SELECT count(*) FROM network_information), \
        (SELECT count(*) FROM hole_punch_results_x_multi_addresses), \
        (SELECT count(*) FROM peers), (SELECT count(*) FROM allocations)";
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
}

/// What an id in the [`IdCache`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Peer,
    Maddr,
}

/// Ids of committed `peers` and `multi_addresses` rows by key, so that the rows every report
/// shares (the relay, its addresses, the reporting host) are not looked up each time.
#[derive(Debug, Default)]
struct IdCache {
    peers: HashMap<String, i64>,
    maddrs: HashMap<String, i64>,
}

/// Entries per map; a full map starts over.
const ID_CACHE: usize = 100_000;

impl IdCache {
    fn map(&mut self, kind: Kind) -> &mut HashMap<String, i64> {
        match kind {
            Kind::Peer => &mut self.peers,
            Kind::Maddr => &mut self.maddrs,
        }
    }

    fn get(&mut self, kind: Kind, key: &str) -> Option<i64> {
        self.map(kind).get(key).copied()
    }

    fn insert(&mut self, kind: Kind, key: String, id: i64) {
        let map = self.map(kind);
        if map.len() >= ID_CACHE {
            map.clear();
        }
        map.insert(key, id);
    }
}

/// A write transaction with what it learned: ids that are known to exist once it commits (a
/// rolled-back insert must not be remembered).
struct Write {
    tx: Transaction<'static, Any>,
    learned: Vec<(Kind, String, i64)>,
    /// SQLite's writer turn, held until the transaction ends.
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// Nanoseconds of a duration, for window arithmetic.
fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
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
        match backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("migrations/postgres").run(&pool).await?,
        }
        Ok(Self {
            pool,
            backend,
            sql: Arc::new(Statements::new(backend)),
            writer: Arc::new(tokio::sync::Mutex::new(())),
            ids: Arc::default(),
        })
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
                    // `[4,6]` (SQLite's JSON) or `{4,6}` (PostgreSQL's array).
                    filters: filters
                        .split(|c: char| !c.is_ascii_digit() && c != '-')
                        .filter_map(|n| n.parse().ok())
                        .collect(),
                    transport: r.try_get(4)?,
                    time_to_direct: r.try_get(5)?,
                    client_nat: r.try_get(6)?,
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

    /// Starts a write transaction; for SQLite the writer's turn is held until it ends.
    async fn begin(&self) -> Result<Write, StoreError> {
        let (tx, turn) = match self.backend {
            Backend::Sqlite => {
                let turn = Arc::clone(&self.writer).lock_owned().await;
                (self.pool.begin_with("BEGIN IMMEDIATE").await?, Some(turn))
            }
            Backend::Postgres => (self.pool.begin().await?, None),
        };
        Ok(Write {
            tx,
            learned: Vec::new(),
            _turn: turn,
        })
    }

    /// Commits `w`; the ids it learned are known to exist from now on.
    async fn commit(&self, w: Write) -> Result<(), StoreError> {
        w.tx.commit().await?;
        if let Ok(mut ids) = self.ids.lock() {
            for (kind, key, id) in w.learned {
                ids.insert(kind, key, id);
            }
        }
        Ok(())
    }

    fn cached(&self, kind: Kind, key: &str) -> Option<i64> {
        self.ids.lock().ok()?.get(kind, key)
    }

    async fn peer(&self, w: &mut Write, peer: &str, now: i64) -> Result<i64, StoreError> {
        if let Some(id) = self.cached(Kind::Peer, peer) {
            return Ok(id);
        }
        let insert = sqlx::query(&self.sql.insert_peer).bind(peer).bind(now);
        let id = find_or_insert(&mut w.tx, &self.sql.find_peer, peer, insert).await?;
        w.learned.push((Kind::Peer, peer.to_owned(), id));
        Ok(id)
    }

    async fn update_peer(
        &self,
        w: &mut Write,
        id: i64,
        agent_version: &str,
        protocols: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.sql.update_peer)
            .bind(id)
            .bind(agent_version)
            .bind(json(protocols))
            .bind(now)
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    async fn maddr(&self, w: &mut Write, addr: &Addr, now: i64) -> Result<i64, StoreError> {
        if let Some(id) = self.cached(Kind::Maddr, &addr.maddr) {
            return Ok(id);
        }
        let insert = sqlx::query(&self.sql.insert_maddr)
            .bind(&addr.maddr)
            .bind(addr.ip.as_deref())
            .bind(addr.transport.as_deref())
            .bind(addr.is_relay)
            .bind(addr.is_public)
            .bind(now);
        let id =
            find_or_insert(&mut w.tx, &self.sql.find_maddr, addr.maddr.as_str(), insert).await?;
        w.learned.push((Kind::Maddr, addr.maddr.clone(), id));
        Ok(id)
    }

    async fn maddrs(
        &self,
        w: &mut Write,
        addrs: &[Addr],
        now: i64,
    ) -> Result<Vec<i64>, StoreError> {
        // Sorted, so that concurrent transactions take row locks in the same order.
        let mut sorted: Vec<&Addr> = addrs.iter().collect();
        sorted.sort_by(|a, b| a.maddr.cmp(&b.maddr));
        sorted.dedup_by(|a, b| a.maddr == b.maddr);
        let mut ids = Vec::with_capacity(sorted.len());
        for a in sorted {
            ids.push(self.maddr(w, a, now).await?);
        }
        Ok(ids)
    }

    async fn candidates(
        &self,
        conn: &mut sqlx::AnyConnection,
        hosts: &[i64],
        only: Option<i64>,
        rules: Rules,
        now: i64,
    ) -> Result<Vec<AnyRow>, StoreError> {
        Ok(sqlx::query(&self.sql.candidates)
            .bind(now - nanos(rules.recency))
            .bind(json(hosts))
            .bind(now - nanos(rules.per_remote_window))
            .bind(i64::from(rules.per_remote))
            .bind(only)
            .bind(now - nanos(rules.dedup_window))
            .fetch_all(conn)
            .await?)
    }

    async fn store_report(
        &self,
        w: &mut Write,
        auth: i64,
        local: i64,
        r: &Report,
        now: i64,
    ) -> Result<i64, StoreError> {
        let remote = self.peer(w, &r.remote, now).await?;
        let listen = self.maddrs(w, &r.listen_addrs, now).await?;
        let set: BTreeSet<i64> = listen.iter().copied().collect();
        let ids: Vec<i64> = set.into_iter().collect();
        let key = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(":");
        let digest = sha2::Sha256::digest(key.as_bytes()).to_vec();
        let insert = sqlx::query(&self.sql.insert_set)
            .bind(digest.clone())
            .bind(json(&ids));
        let set_id = find_or_insert(&mut w.tx, &self.sql.find_set, digest, insert).await?;
        let id: i64 = sqlx::query(&self.sql.insert_result)
            .bind(local)
            .bind(remote)
            .bind(auth)
            .bind(r.connect_started_at)
            .bind(r.connect_ended_at)
            .bind(r.has_direct_conns)
            .bind(r.error.as_deref())
            .bind(r.outcome)
            .bind(r.ended_at)
            .bind(json(&r.protocols))
            .bind(set_id)
            .bind(r.idempotency_key.as_deref())
            .bind(r.technique.as_deref())
            .bind(r.time_to_direct)
            .bind(r.client_nat.as_deref())
            .bind(r.remote_nat.as_deref())
            .bind(r.transport.as_deref())
            .bind(now)
            .fetch_one(&mut *w.tx)
            .await?
            .try_get(0)?;
        for m in &r.mappings {
            sqlx::query(&self.sql.insert_mapping)
                .bind(id)
                .bind(m.internal_port)
                .bind(m.external_port)
                .bind(&m.protocol)
                .bind(&m.addr)
                .bind(&m.addr_network)
                .execute(&mut *w.tx)
                .await?;
        }
        for a in &r.attempts {
            let attempt: i64 = sqlx::query(&self.sql.insert_attempt)
                .bind(id)
                .bind(a.opened_at)
                .bind(a.started_at)
                .bind(a.ended_at)
                .bind(a.start_rtt)
                .bind(a.elapsed_time)
                .bind(a.outcome)
                .bind(a.error.as_deref())
                .bind(a.direct_dial_error.as_deref())
                .bind(now)
                .fetch_one(&mut *w.tx)
                .await?
                .try_get(0)?;
            for m in self.maddrs(w, &a.addrs, now).await? {
                sqlx::query(&self.sql.link_attempt)
                    .bind(attempt)
                    .bind(m)
                    .execute(&mut *w.tx)
                    .await?;
            }
        }
        for (addrs, relationship) in [(&r.open_addrs, "FINAL"), (&r.remote_addrs, "INITIAL")] {
            for m in self.maddrs(w, addrs, now).await? {
                sqlx::query(&self.sql.link_result)
                    .bind(id)
                    .bind(m)
                    .bind(relationship)
                    .execute(&mut *w.tx)
                    .await?;
            }
        }
        if let Some(n) = &r.network {
            sqlx::query(&self.sql.insert_network)
                .bind(local)
                .bind(id)
                .bind(n.supports_ipv6)
                .bind(n.supports_ipv6_error.as_deref())
                .bind(n.router_html.as_deref())
                .bind(n.router_html_error.as_deref())
                .bind(now)
                .execute(&mut *w.tx)
                .await?;
        }
        for l in &r.latencies {
            let maddr = self.maddr(w, &l.addr, now).await?;
            let peer = self.peer(w, &l.remote, now).await?;
            if !l.agent_version.is_empty() || !l.protocols.is_empty() {
                self.update_peer(w, peer, &l.agent_version, &l.protocols, now)
                    .await?;
            }
            sqlx::query(&self.sql.insert_latency)
                .bind(peer)
                .bind(id)
                .bind(maddr)
                .bind(l.mtype)
                .bind(json(&l.rtts))
                .bind(json(&l.rtt_errs))
                .bind(l.avg)
                .bind(l.max)
                .bind(l.min)
                .bind(l.std)
                .bind(now)
                .execute(&mut *w.tx)
                .await?;
        }
        Ok(id)
    }

    async fn find_key(&self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query(&self.sql.find_key)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?)
    }
}

/// The id of the row `find` selects by `key`, inserted by `insert` (`ON CONFLICT DO NOTHING
/// RETURNING id`) when missing. Neither statement locks an existing row, so transactions that
/// share rows (peers, addresses) do not queue behind each other or deadlock.
async fn find_or_insert<'q, K>(
    tx: &mut Transaction<'static, Any>,
    find: &'q str,
    key: K,
    insert: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
) -> Result<i64, StoreError>
where
    K: 'q + Send + Clone + sqlx::Encode<'q, Any> + sqlx::Type<Any>,
{
    let select = async |tx: &mut Transaction<'static, Any>| -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query(find)
            .bind(key.clone())
            .fetch_optional(&mut **tx)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?)
    };
    if let Some(id) = select(tx).await? {
        return Ok(id);
    }
    if let Some(row) = insert.fetch_optional(&mut **tx).await? {
        return Ok(row.try_get(0)?);
    }
    // Inserted meanwhile by a transaction that has committed since.
    select(tx)
        .await?
        .ok_or_else(|| StoreError::Database(sqlx::Error::RowNotFound))
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

/// Whether `e` is a unique-constraint violation.
fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(sqlx::Error::Database(d)) if d.is_unique_violation())
}

/// Runs a transaction (an async expression, evaluated again for each try) until it succeeds,
/// fails for good, or has been tried [`TRIES`] times.
macro_rules! retrying {
    ($transaction:expr) => {{
        let mut n = 1;
        loop {
            match $transaction.await {
                Err(e) if n < TRIES && is_transient(&e) => {
                    tracing::debug!(error = %e, try_number = n, "transaction tried again");
                    tokio::time::sleep(backoff(n)).await;
                    n += 1;
                }
                other => break other,
            }
        }
    }};
}

/// The transactions, each run whole by the [`Store`] methods.
impl SqlStore {
    async fn register_tx(
        &self,
        api_key: &str,
        known: Option<i64>,
        host: Host<'_>,
        now: i64,
    ) -> Result<i64, StoreError> {
        let mut w = self.begin().await?;
        let auth: i64 = match known {
            Some(a) => a,
            None => {
                let insert = sqlx::query(&self.sql.insert_authorization)
                    .bind(api_key)
                    .bind(now);
                find_or_insert(&mut w.tx, &self.sql.authorize, api_key, insert).await?
            }
        };
        let peer = self.peer(&mut w, host.peer, now).await?;
        self.update_peer(&mut w, peer, host.agent_version, host.protocols, now)
            .await?;
        sqlx::query(&self.sql.insert_client)
            .bind(peer)
            .bind(auth)
            .bind(now)
            .execute(&mut *w.tx)
            .await?;
        self.commit(w).await?;
        Ok(peer)
    }

    /// Allocates `remote` to `local` if it is still eligible, checked again under the remote's
    /// lock (another request may have taken it since the candidates were listed).
    #[allow(clippy::too_many_arguments, reason = "one transaction's inputs")]
    async fn allocate_tx(
        &self,
        auth: i64,
        local: i64,
        remote: i64,
        host_ids: &[i64],
        rules: Rules,
        now: i64,
    ) -> Result<Option<Allocation>, StoreError> {
        let mut w = self.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query(&self.sql.lock_peer)
                .bind(remote)
                .fetch_optional(&mut *w.tx)
                .await?;
        }
        let rows = self
            .candidates(&mut w.tx, host_ids, Some(remote), rules, now)
            .await?;
        if rows.is_empty() {
            w.tx.rollback().await?;
            return Ok(None);
        }
        let mut name = String::new();
        let mut addrs = BTreeSet::new();
        for row in &rows {
            name = row.try_get(1)?;
            addrs.insert((row.try_get::<String, _>(3)?, row.try_get::<i64, _>(2)?));
        }
        let allocation: i64 = sqlx::query(&self.sql.insert_allocation)
            .bind(local)
            .bind(remote)
            .bind(auth)
            .bind(now)
            .fetch_one(&mut *w.tx)
            .await?
            .try_get(0)?;
        for (_, maddr) in &addrs {
            sqlx::query(&self.sql.link_allocation)
                .bind(allocation)
                .bind(*maddr)
                .execute(&mut *w.tx)
                .await?;
        }
        self.commit(w).await?;
        Ok(Some(Allocation {
            remote: name,
            addrs: addrs.into_iter().map(|(m, _)| m).collect(),
        }))
    }

    async fn track_tx(&self, auth: i64, report: &Report, now: i64) -> Result<Tracked, StoreError> {
        let mut w = self.begin().await?;
        let Some(local) = sqlx::query(&self.sql.client_peer)
            .bind(&report.client)
            .bind(auth)
            .fetch_optional(&mut *w.tx)
            .await?
        else {
            w.tx.rollback().await?;
            return Ok(Tracked::NotRegistered);
        };
        let agent: Option<String> = local.try_get(1)?;
        let local: i64 = local.try_get(0)?;
        let id = match agent.as_deref().and_then(report::normalised_for) {
            Some(fix) => {
                let fixed = fix(report.clone());
                self.store_report(&mut w, auth, local, &fixed, now).await?
            }
            None => self.store_report(&mut w, auth, local, report, now).await?,
        };
        self.commit(w).await?;
        Ok(Tracked::Stored(id))
    }

    async fn record_tx(&self, e: &ConnectionEvent, now: i64) -> Result<i64, StoreError> {
        let mut w = self.begin().await?;
        let local = self.peer(&mut w, &e.local, now).await?;
        let remote = self.peer(&mut w, &e.remote, now).await?;
        if let Some(agent) = &e.agent_version {
            self.update_peer(&mut w, remote, agent, &e.protocols, now)
                .await?;
        }
        let conn = self.maddr(&mut w, &e.conn_addr, now).await?;
        let id: i64 = sqlx::query(&self.sql.insert_connection)
            .bind(local)
            .bind(remote)
            .bind(conn)
            .bind(e.opened_at)
            .bind(now)
            .fetch_one(&mut *w.tx)
            .await?
            .try_get(0)?;
        let advertised: Vec<Addr> = e
            .addrs
            .iter()
            .filter(|a| a.maddr != e.conn_addr.maddr)
            .cloned()
            .collect();
        for m in self.maddrs(&mut w, &advertised, now).await? {
            sqlx::query(&self.sql.link_connection)
                .bind(id)
                .bind(m)
                .execute(&mut *w.tx)
                .await?;
        }
        self.commit(w).await?;
        Ok(id)
    }
}

impl Store for SqlStore {
    async fn authorize(&self, api_key: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query(&self.sql.authorize)
            .bind(api_key)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?)
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
        let duplicate = async || -> Result<Option<Tracked>, StoreError> {
            match &report.idempotency_key {
                Some(key) => Ok(self.find_key(key).await?.map(Tracked::Duplicate)),
                None => Ok(None),
            }
        };
        if let Some(d) = duplicate().await? {
            return Ok(d);
        }
        match retrying!(self.track_tx(auth, report, now)) {
            // The same key, stored by a concurrent request: that one counts.
            Err(e) if is_unique_violation(&e) => duplicate().await?.ok_or(e),
            other => other,
        }
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
    use super::*;

    #[test]
    fn marks_render_per_dialect() {
        let sql =
            "SELECT {ts $1}, {text[] $2}, {hole_punch_outcome $3} IN (SELECT {each bigint $4})";
        assert_eq!(
            render(sql, Backend::Sqlite),
            "SELECT $1, $2, $3 IN (SELECT value FROM json_each($4))"
        );
        let pg = render(sql, Backend::Postgres);
        assert!(pg.contains("timestamptz 'epoch'"), "{pg}");
        assert!(
            pg.contains("ARRAY(SELECT jsonb_array_elements_text(($2)::jsonb)::text)"),
            "{pg}"
        );
        assert!(pg.contains("($3)::hole_punch_outcome"), "{pg}");
        assert!(
            pg.contains("jsonb_array_elements_text(($4)::jsonb)::bigint"),
            "{pg}"
        );
    }

    #[test]
    fn every_statement_renders_without_marks_left() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            for sql in Statements::new(backend).all() {
                assert!(
                    !sql.contains('{') && !sql.contains('}'),
                    "{backend:?}: {sql}"
                );
            }
        }
    }
}

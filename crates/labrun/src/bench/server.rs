//! The measurement server under many concurrent clients, on SQLite and on PostgreSQL in the
//! same run.
//!
//! Each backend gets a fresh database and a server on loopback (real gRPC over HTTP/2); the
//! clients, each on its own connection, send full reports (two attempts, a latency measurement,
//! a port mapping, network information, every natpunch field) with idempotency keys until the
//! total is reached. Every report must be stored: the count in the database is checked.
//!
//! Then the limit: as many reports again, with the same rows, stored straight into the same
//! database by the store's own transaction, [`LIMIT_BATCH`] reports at a time, with no server,
//! queue or network in between (one multi-row `INSERT` per table and one transaction per
//! batch). natpunch / limit says how much of what the database takes the server delivers.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use api::pb;
use api::pb::punchr_service_client::PunchrServiceClient;
use api::postgres::TempPostgres;
use api::report::Report;
use api::server::{Config, Service};
use api::store::{SqlStore, Store as _, StoreError, Tracked};
use serde::Serialize;

use super::punch::figure;
use crate::stats::quantile;

/// Reports per transaction when the limit is measured.
pub const LIMIT_BATCH: usize = 1000;

/// How often the progress is told.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Debug, Clone)]
pub struct ServerBench {
    /// Concurrent clients, each on its own connection.
    pub clients: usize,
    /// Reports per backend.
    pub reports: u64,
    /// The PostgreSQL database to fill (`None`: a private server started for the run).
    pub postgres_url: Option<String>,
    /// Skip PostgreSQL.
    pub sqlite_only: bool,
}

/// Why the benchmark did not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum ServerBenchError {
    /// No private PostgreSQL server could be started.
    #[error("{0} (or give --postgres-url, or --sqlite-only)")]
    Postgres(String),
    /// No database could be made on the private PostgreSQL server.
    #[error("{0}")]
    PostgresDatabase(String),
    /// The PostgreSQL store could not be opened.
    #[error("opening {url}")]
    Open {
        /// The database, its password hidden.
        url: String,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// The SQLite store could not be opened, or a store not counted.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A client could not connect.
    #[error("connecting to the server")]
    Connect(#[source] tonic::transport::Error),
    /// The server refused a call.
    #[error("{call}")]
    Call {
        /// What was asked.
        call: &'static str,
        /// The server's answer.
        #[source]
        source: tonic::Status,
    },
    /// A task of the benchmark failed.
    #[error("{0}")]
    Task(&'static str, #[source] tokio::task::JoinError),
    /// The server failed.
    #[error(transparent)]
    Serve(tonic::transport::Error),
    /// Reports were acknowledged but not stored.
    #[error("{backend}: {stored} reports stored of {reports} acknowledged")]
    Lost {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// Reports in the database.
        stored: i64,
        /// Reports acknowledged.
        reports: u64,
    },
    /// The bench's API key was not found after registering with it.
    #[error("the bench's API key is not in the database")]
    Unauthorized,
    /// A sample report was refused, or not stored.
    #[error("{0}")]
    Sample(String),
    /// Files, sockets.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One backend's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// Reports stored.
    pub reports: u64,
    /// Wall-clock time of the load.
    pub seconds: f64,
    /// Reports per second.
    pub reports_per_sec: f64,
    /// Median call time, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile call time, ms.
    pub p99_ms: Option<f64>,
    /// Reports per second stored straight into the database (the limit).
    pub limit_per_sec: f64,
    /// natpunch's reports per second over the limit's.
    pub of_limit: f64,
}

/// The benchmark's figures: SQLite's, then PostgreSQL's unless skipped.
#[derive(Debug, Clone)]
pub struct ServerReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Reports per backend.
    pub reports: u64,
    /// Each backend's figures.
    pub backends: Vec<Figures>,
}

impl ServerReport {
    /// PostgreSQL's figure over SQLite's (`None` without both).
    pub fn postgres_over_sqlite(&self, figure: fn(&Figures) -> Option<f64>) -> Option<f64> {
        match self.backends.as_slice() {
            [s, p] => figure(p).zip(figure(s)).map(|(p, s)| p / s),
            _ => None,
        }
    }

    /// The figures as `natpunch bench server --json` prints them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "clients": self.clients,
            "reports": self.reports,
            "backends": self.backends,
            "postgres_over_sqlite": {
                "reports_per_sec": self.postgres_over_sqlite(|f| Some(f.reports_per_sec)),
                "p50": self.postgres_over_sqlite(|f| f.p50_ms),
                "p99": self.postgres_over_sqlite(|f| f.p99_ms),
            },
        })
    }
}

/// The backends as a table, PostgreSQL against SQLite below it.
impl fmt::Display for ServerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bench server: {} full reports per backend from {} concurrent clients, gRPC on \
             loopback",
            self.reports, self.clients
        )?;
        writeln!(
            f,
            "{:<10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>15}",
            "backend", "reports/s", "p50 ms", "p99 ms", "seconds", "limit/s", "natpunch/limit"
        )?;
        for b in &self.backends {
            writeln!(
                f,
                "{:<10} {:>10.0} {:>9} {:>9} {:>9.1} {:>10.0} {:>15.2}",
                b.backend,
                b.reports_per_sec,
                figure(b.p50_ms, 1),
                figure(b.p99_ms, 1),
                b.seconds,
                b.limit_per_sec,
                b.of_limit
            )?;
        }
        writeln!(
            f,
            "limit: the same rows stored straight into the database, {LIMIT_BATCH} reports per \
             transaction, no server in between"
        )?;
        if let Some(t) = self.postgres_over_sqlite(|f| Some(f.reports_per_sec)) {
            writeln!(
                f,
                "postgres/sqlite: {t:.2}× the reports/s, {}× the p50, {}× the p99",
                figure(self.postgres_over_sqlite(|f| f.p50_ms), 2),
                figure(self.postgres_over_sqlite(|f| f.p99_ms), 2)
            )?;
        }
        Ok(())
    }
}

/// Runs the load against a server on `store`; `progress` hears the reports sent so far.
async fn load(
    backend: &'static str,
    store: SqlStore,
    clients: usize,
    reports: u64,
    progress: &(dyn Fn(&str, u64) + Sync),
) -> Result<Figures, ServerBenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut registry = prometheus_client::registry::Registry::default();
    let service = Service::new(store.clone(), Config::default(), &mut registry);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::server::serve(service, listener, None, async {
        let _ = stop_rx.await;
    }));
    let (remote, relay) = (api::sample::peer_id(), api::sample::peer_id());
    let mut first = None;
    let call = |call| move |source| ServerBenchError::Call { call, source };
    let mut hosts = Vec::with_capacity(clients);
    let mut channels = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut client = PunchrServiceClient::connect(url.clone())
            .await
            .map_err(ServerBenchError::Connect)?;
        let host = api::sample::peer_id();
        client
            .register(pb::RegisterRequest {
                client_id: host.to_bytes(),
                agent_version: "natpunch-bench".into(),
                protocols: vec![],
                api_key: "bench".into(),
            })
            .await
            .map_err(call("registering"))?;
        // Warm-up: the shared rows (remote, relay, addresses) exist before timing starts.
        client
            .track_hole_punch(api::sample::report(&host, &remote, &relay, "bench", None))
            .await
            .map_err(call("the warm-up report"))?;
        first.get_or_insert_with(|| host.clone());
        hosts.push(host);
        channels.push(client);
    }
    let before = store.counts().await?.results;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for (host, mut client) in hosts.into_iter().zip(channels) {
        let next = Arc::clone(&next);
        let (remote, relay) = (remote.clone(), relay.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= reports {
                    return Ok::<_, tonic::Status>(latencies);
                }
                let key = format!("bench-{n}");
                let report = api::sample::report(&host, &remote, &relay, "bench", Some(&key));
                let t = Instant::now();
                client.track_hole_punch(report).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut latencies = Vec::with_capacity(usize::try_from(reports).unwrap_or(0));
    let collect = async {
        for t in tasks {
            let done = t
                .await
                .map_err(|e| ServerBenchError::Task("a client task", e))?;
            latencies.extend(done.map_err(call("a report"))?);
        }
        Ok::<_, ServerBenchError>(())
    };
    let tell = async {
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            progress(backend, next.load(Ordering::Relaxed).min(reports));
        }
    };
    tokio::select! {
        done = collect => done?,
        () = tell => {}
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    server
        .await
        .map_err(|e| ServerBenchError::Task("the server task", e))?
        .map_err(ServerBenchError::Serve)?;
    let stored = store.counts().await?.results - before;
    if u64::try_from(stored).unwrap_or(0) != reports {
        return Err(ServerBenchError::Lost {
            backend,
            stored,
            reports,
        });
    }
    let limit_seconds = limit(&store, first, &remote, &relay, reports).await?;
    let stored = store.counts().await?.results - before;
    if u64::try_from(stored).unwrap_or(0) != 2 * reports {
        return Err(ServerBenchError::Lost {
            backend,
            stored: stored - i64::try_from(reports).unwrap_or(i64::MAX),
            reports,
        });
    }
    store.close().await;
    let (per_sec, limit_per_sec) = (reports as f64 / seconds, reports as f64 / limit_seconds);
    Ok(Figures {
        backend,
        reports,
        seconds,
        reports_per_sec: per_sec,
        p50_ms: quantile(&latencies, 0.5),
        p99_ms: quantile(&latencies, 0.99),
        limit_per_sec,
        of_limit: per_sec / limit_per_sec,
    })
}

/// Stores `reports` reports from `host` straight into `store`, [`LIMIT_BATCH`] per
/// transaction; returns the seconds it took (the reports are made before timing starts).
async fn limit(
    store: &SqlStore,
    host: Option<api::peer_id::PeerId>,
    remote: &api::peer_id::PeerId,
    relay: &api::peer_id::PeerId,
    reports: u64,
) -> Result<f64, ServerBenchError> {
    let host = host.unwrap_or_else(api::sample::peer_id);
    let auth = store
        .authorize("bench")
        .await?
        .ok_or(ServerBenchError::Unauthorized)?;
    let made: Vec<Report> = (0..reports)
        .map(|n| {
            let key = format!("limit-{n}");
            let request = api::sample::report(&host, remote, relay, "bench", Some(&key));
            Report::from_request(&request).map_err(|e| ServerBenchError::Sample(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    )
    .unwrap_or(i64::MAX);
    let start = Instant::now();
    for batch in made.chunks(LIMIT_BATCH) {
        let answers = store.track_directly(auth, batch, now).await?;
        if answers.iter().any(|a| !matches!(a, Tracked::Stored(_))) {
            return Err(ServerBenchError::Sample(format!(
                "a report stored directly was not stored: {answers:?}"
            )));
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Runs the benchmark within a tokio runtime, the SQLite database in `dir`; `progress` hears
/// each backend's reports sent so far, every two seconds.
pub async fn run(
    bench: &ServerBench,
    dir: &Path,
    progress: &(dyn Fn(&str, u64) + Sync),
) -> Result<ServerReport, ServerBenchError> {
    let mut backends = Vec::new();
    let sqlite = format!("sqlite://{}", dir.join("bench.db").display());
    let store = SqlStore::open(&sqlite).await?;
    backends.push(load("sqlite", store, bench.clients, bench.reports, progress).await?);
    if !bench.sqlite_only {
        // The private server lives until the end of this block.
        let (url, _private) = match &bench.postgres_url {
            Some(url) => (url.clone(), None),
            None => {
                let pg = TempPostgres::start().map_err(ServerBenchError::Postgres)?;
                let url = pg
                    .new_database()
                    .map_err(ServerBenchError::PostgresDatabase)?;
                (url, Some(pg))
            }
        };
        let store = SqlStore::open(&url)
            .await
            .map_err(|source| ServerBenchError::Open {
                url: api::store::redact(&url),
                source,
            })?;
        backends.push(load("postgres", store, bench.clients, bench.reports, progress).await?);
    }
    Ok(ServerReport {
        clients: bench.clients,
        reports: bench.reports,
        backends,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(backend: &'static str, per_sec: f64, p50: Option<f64>) -> Figures {
        Figures {
            backend,
            reports: 10,
            seconds: 1.0,
            reports_per_sec: per_sec,
            p50_ms: p50,
            p99_ms: None,
            limit_per_sec: 2.0 * per_sec,
            of_limit: 0.5,
        }
    }

    #[test]
    fn postgres_is_compared_with_sqlite() {
        let mut report = ServerReport {
            clients: 2,
            reports: 10,
            backends: vec![
                figures("sqlite", 100.0, Some(2.0)),
                figures("postgres", 50.0, Some(4.0)),
            ],
        };
        assert_eq!(
            report.postgres_over_sqlite(|f| Some(f.reports_per_sec)),
            Some(0.5)
        );
        assert_eq!(report.postgres_over_sqlite(|f| f.p50_ms), Some(2.0));
        assert_eq!(
            report.to_json()["postgres_over_sqlite"]["p99"],
            serde_json::Value::Null
        );
        report.backends.pop();
        assert_eq!(
            report.postgres_over_sqlite(|f| Some(f.reports_per_sec)),
            None
        );
    }

    #[tokio::test]
    async fn every_report_sent_to_sqlite_is_stored() {
        let dir = std::env::temp_dir().join(format!("labrun-bench-server-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let bench = ServerBench {
            clients: 2,
            reports: 20,
            postgres_url: None,
            sqlite_only: true,
        };
        let report = run(&bench, &dir, &|_, _| {}).await.expect("ran");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(report.backends.len(), 1);
        assert_eq!(report.backends[0].reports, 20);
        assert!(report.backends[0].p50_ms.is_some());
        let b = &report.backends[0];
        assert!(b.limit_per_sec > 0.0, "{b:?}");
        assert!(
            (b.of_limit - b.reports_per_sec / b.limit_per_sec).abs() < 1e-9,
            "{b:?}"
        );
        assert!(report.to_string().contains("natpunch/limit"), "{report}");
    }
}

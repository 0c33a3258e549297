//! `natpunch bench server`: the measurement server under many concurrent clients, on SQLite and
//! on PostgreSQL in the same run.
//!
//! Each backend gets a fresh database and a server on loopback (real gRPC over HTTP/2); the
//! clients, each on its own connection, send full reports (two attempts, a latency measurement,
//! a port mapping, network information, every natpunch field) with idempotency keys until the
//! total is reached. Every report must be stored: the count in the database is checked.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use api::pb;
use api::pb::punchr_service_client::PunchrServiceClient;
use api::server::{Config, Service};
use api::store::{SqlStore, Store as _};
use clap::Args;
use clap::builder::BoolishValueParser;
use labrun::stats::quantile;

#[derive(Debug, Args)]
pub(crate) struct ServerBenchArgs {
    /// Concurrent clients, each on its own connection.
    #[arg(long, env = "NATPUNCH_BENCH_SERVER_CLIENTS", default_value_t = 32)]
    clients: usize,
    /// Reports per backend.
    #[arg(long, env = "NATPUNCH_BENCH_REPORTS", default_value_t = 4000)]
    reports: u64,
    /// PostgreSQL database to fill (tables are created, rows added) [default: a private
    /// server started for the run, removed after].
    #[arg(long, env = "NATPUNCH_BENCH_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Skip PostgreSQL (no ratio then).
    #[arg(long, env = "NATPUNCH_BENCH_SQLITE_ONLY", value_parser = BoolishValueParser::new())]
    sqlite_only: bool,
    /// Print the figures as JSON.
    #[arg(long, env = "NATPUNCH_JSON", value_parser = BoolishValueParser::new())]
    json: bool,
}

/// One backend's figures.
#[derive(Debug, serde::Serialize)]
struct Figures {
    backend: &'static str,
    reports: u64,
    seconds: f64,
    reports_per_sec: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

/// Runs the load against a server on `store`.
async fn load(
    backend: &'static str,
    store: SqlStore,
    clients: usize,
    reports: u64,
) -> anyhow::Result<Figures> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut registry = prometheus_client::registry::Registry::default();
    let service = Service::new(store.clone(), Config::default(), &mut registry);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::server::serve(service, listener, None, async {
        let _ = stop_rx.await;
    }));
    let (remote, relay) = (api::sample::peer_id(), api::sample::peer_id());
    let mut hosts = Vec::with_capacity(clients);
    let mut channels = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut client = PunchrServiceClient::connect(url.clone())
            .await
            .context("connecting to the server")?;
        let host = api::sample::peer_id();
        client
            .register(pb::RegisterRequest {
                client_id: host.to_bytes(),
                agent_version: "natpunch-bench".into(),
                protocols: vec![],
                api_key: "bench".into(),
            })
            .await
            .context("registering")?;
        // Warm-up: the shared rows (remote, relay, addresses) exist before timing starts.
        client
            .track_hole_punch(api::sample::report(&host, &remote, &relay, "bench", None))
            .await
            .context("the warm-up report")?;
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
    let progress = {
        let next = Arc::clone(&next);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let done = next.load(Ordering::Relaxed).min(reports);
                eprintln!("bench server: {backend}: {done}/{reports} reports");
            }
        })
    };
    let mut latencies = Vec::with_capacity(usize::try_from(reports).unwrap_or(0));
    for t in tasks {
        latencies.extend(t.await.context("a client task")?.context("a report")?);
    }
    let seconds = start.elapsed().as_secs_f64();
    progress.abort();
    let _ = stop_tx.send(());
    server.await.context("the server task")??;
    let stored = store.counts().await?.results - before;
    anyhow::ensure!(
        u64::try_from(stored).unwrap_or(0) == reports,
        "{backend}: {stored} reports stored of {reports} acknowledged"
    );
    store.close().await;
    Ok(Figures {
        backend,
        reports,
        seconds,
        reports_per_sec: reports as f64 / seconds,
        p50_ms: quantile(&latencies, 0.5),
        p99_ms: quantile(&latencies, 0.99),
    })
}

pub(crate) fn run(args: &ServerBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.clients > 0 && args.reports > 0,
        "--clients and --reports must be above 0"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let dir = std::env::temp_dir().join(format!("natpunch-bench-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = runtime.block_on(async {
        let mut figures = Vec::new();
        let sqlite = format!("sqlite://{}", dir.join("bench.db").display());
        let store = SqlStore::open(&sqlite).await?;
        figures.push(load("sqlite", store, args.clients, args.reports).await?);
        if !args.sqlite_only {
            // The private server lives until the end of this block.
            let (url, _private) = match &args.postgres_url {
                Some(url) => (url.clone(), None),
                None => {
                    let pg = api::postgres::TempPostgres::start().map_err(|e| {
                        anyhow::anyhow!("{e} (or give --postgres-url, or --sqlite-only)")
                    })?;
                    (pg.new_database().map_err(anyhow::Error::msg)?, Some(pg))
                }
            };
            let store = SqlStore::open(&url)
                .await
                .with_context(|| format!("opening {}", crate::server::redact(&url)))?;
            figures.push(load("postgres", store, args.clients, args.reports).await?);
        }
        anyhow::Ok(figures)
    });
    let _ = std::fs::remove_dir_all(&dir);
    let figures = result?;
    let ratio = |f: fn(&Figures) -> Option<f64>| match figures.as_slice() {
        [s, p] => f(p).zip(f(s)).map(|(p, s)| p / s),
        _ => None,
    };
    let throughput = ratio(|f| Some(f.reports_per_sec));
    let p50 = ratio(|f| f.p50_ms);
    let p99 = ratio(|f| f.p99_ms);
    if args.json {
        let out = serde_json::json!({
            "clients": args.clients,
            "reports": args.reports,
            "backends": figures,
            "postgres_over_sqlite": {"reports_per_sec": throughput, "p50": p50, "p99": p99},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "bench server: {} full reports per backend from {} concurrent clients, gRPC on loopback",
        args.reports, args.clients
    );
    println!(
        "{:<10} {:>10} {:>9} {:>9} {:>9}",
        "backend", "reports/s", "p50 ms", "p99 ms", "seconds"
    );
    let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    for b in &figures {
        println!(
            "{:<10} {:>10.0} {:>9} {:>9} {:>9.1}",
            b.backend,
            b.reports_per_sec,
            f(b.p50_ms),
            f(b.p99_ms),
            b.seconds
        );
    }
    if let Some(t) = throughput {
        println!(
            "postgres/sqlite: {t:.2}× the reports/s, {}× the p50, {}× the p99",
            p50.map_or("-".into(), |v| format!("{v:.2}")),
            p99.map_or("-".into(), |v| format!("{v:.2}"))
        );
    }
    Ok(ExitCode::SUCCESS)
}

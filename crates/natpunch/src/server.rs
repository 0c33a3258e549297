//! `natpunch server`: the punchr-compatible measurement server (gRPC `PunchrService`) on
//! SQLite or PostgreSQL, with the live dashboard (`/`), `/metrics` and `/health` on a telemetry
//! port.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use std::io::Write as _;

use anyhow::Context as _;
use api::server::{Config, Service, Tls};
use api::store::{Backend, Rules, SqlStore};

use crate::args::ServeTelemetry as _;
use cli::server::ServerArgs;

/// Prints a line on stdout; a closed stdout (the reader went away) is no reason to fail.
fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

pub(crate) fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Tls {
            cert: std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            key: std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        }),
        _ => None,
    };
    let shown_url = api::store::redact(&args.database_url);
    let store = SqlStore::open(&args.database_url)
        .await
        .with_context(|| format!("opening the database {shown_url}"))?;
    let mut registry = prometheus_client::registry::Registry::default();
    let config = Config {
        closed_registration: args.closed_registration,
        rules: Rules {
            recency: Duration::from_secs(args.recency_secs),
            per_remote: args.per_remote,
            per_remote_window: Duration::from_secs(args.per_remote_secs),
            dedup_window: Duration::from_secs(args.dedup_secs),
        },
        filters: args.protocol_filters.clone(),
        rust_client_wait: Duration::from_secs(args.rust_client_wait_secs),
    };
    let service = Service::new(store.clone(), config, &mut registry);
    let telemetry = match args.telemetry.bind().await? {
        Some(listener) => {
            let bound = listener.local_addr()?;
            tokio::spawn(api::server::serve_telemetry(
                listener,
                registry,
                store.clone(),
            ));
            Some(bound)
        }
        None => None,
    };
    let addr = SocketAddr::new(args.listen_ip, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the gRPC port {addr}"))?;
    let bound = listener.local_addr()?;
    let backend = match store.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    if args.json.json {
        say(&serde_json::json!({
            "event": "listening",
            "grpc": bound.to_string(),
            "tls": tls.is_some(),
            "database": shown_url,
            "backend": backend,
            "telemetry": telemetry.map(|t| t.to_string()),
        })
        .to_string());
    } else {
        say(&format!(
            "server: PunchrService on {bound} ({}), database {shown_url} ({backend})",
            if tls.is_some() { "TLS" } else { "plaintext" }
        ));
        if let Some(t) = telemetry {
            say(&format!(
                "server: dashboard on http://{t}/, metrics on http://{t}/metrics, health on \
                 http://{t}/health"
            ));
        }
    }
    api::server::serve(service, listener, tls, crate::stop_signal())
        .await
        .context("serving gRPC")?;
    // Requests in flight have finished; their transactions are committed.
    store.close().await;
    if args.json.json {
        say(&serde_json::json!({"event": "stopped"}).to_string());
    } else {
        say("server: stopped");
    }
    Ok(ExitCode::SUCCESS)
}

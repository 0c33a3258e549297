//! `natpunch server`: the punchr-compatible measurement server (gRPC `PunchrService`) on
//! SQLite or PostgreSQL, with `/metrics` and `/health` on a telemetry port.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::io::Write as _;

use anyhow::Context as _;
use api::server::{Config, Filters, Service, Tls};
use api::store::{Backend, Rules, SqlStore};
use clap::Args;
use clap::builder::BoolishValueParser;

use crate::args::{Json, Telemetry};

#[derive(Debug, Args)]
#[command(
    after_help = "punchr's Go and Rust clients work unchanged: point them at this server \
(Go: --server-host H --server-port 10000 --server-ssl=false, or give this server --tls-cert and \
--tls-key). Unknown API keys register as anonymous, as with punchr, unless \
--closed-registration is given.",
    mut_arg("json", |a| a.help("Print start and stop as JSON objects, one per line"))
)]
pub(crate) struct ServerArgs {
    /// Address to listen on for gRPC.
    #[arg(long, env = "NATPUNCH_SERVER_LISTEN_IP", default_value = "0.0.0.0")]
    listen_ip: IpAddr,
    /// gRPC port; 0 picks a free one (printed at start).
    #[arg(long, env = "NATPUNCH_SERVER_PORT", default_value_t = 10000)]
    port: u16,
    #[command(flatten)]
    telemetry: Telemetry<Self>,
    /// The database: sqlite://FILE (created on first start) or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "NATPUNCH_DATABASE_URL",
        default_value = "sqlite://natpunch.db"
    )]
    database_url: String,
    /// TLS certificate chain (PEM); with --tls-key, the server speaks TLS only.
    #[arg(long, env = "NATPUNCH_SERVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "NATPUNCH_SERVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse API keys that are not in the database yet (punchr creates them as anonymous).
    #[arg(long, env = "NATPUNCH_SERVER_CLOSED_REGISTRATION", value_parser = BoolishValueParser::new())]
    closed_registration: bool,
    /// Protocol filters handed out with peers, FILTER:WEIGHT,… where FILTER is protocols
    /// joined by `/` (ip4, ip6, tcp, udp, quic, quic-v1, webtransport, or codes) or `none`.
    /// punchr's mix used draft-29 QUIC: ip4/tcp:15,ip4/quic:15,ip6/tcp:15,ip6/quic:15,none:40.
    #[arg(
        long,
        env = "NATPUNCH_SERVER_PROTOCOL_FILTERS",
        default_value = api::server::DEFAULT_FILTERS
    )]
    protocol_filters: Filters,
    /// Only peers the honeypot saw within this many seconds are handed out.
    #[arg(
        long,
        env = "NATPUNCH_SERVER_RECENCY_SECS",
        default_value_t = Rules::default().recency.as_secs()
    )]
    recency_secs: u64,
    /// A peer is handed out at most this many times …
    #[arg(long, env = "NATPUNCH_SERVER_PER_REMOTE", default_value_t = Rules::default().per_remote)]
    per_remote: u32,
    /// … within this many seconds.
    #[arg(
        long,
        env = "NATPUNCH_SERVER_PER_REMOTE_SECS",
        default_value_t = Rules::default().per_remote_window.as_secs()
    )]
    per_remote_secs: u64,
    /// A peer and address are not handed to the same client (any of its hosts) again within
    /// this many seconds.
    #[arg(
        long,
        env = "NATPUNCH_SERVER_DEDUP_SECS",
        default_value_t = Rules::default().dedup_window.as_secs()
    )]
    dedup_secs: u64,
    /// Seconds GetAddrInfo holds a request of punchr's Rust client (which exits on any error,
    /// NotFound included) waiting for a peer; 0 answers NotFound at once. At most 25, so that
    /// NotFound comes before the 30 s request timeout (a larger value is lowered, with a warning).
    #[arg(
        long,
        env = "NATPUNCH_SERVER_RUST_CLIENT_WAIT_SECS",
        default_value_t = Config::default().rust_client_wait.as_secs()
    )]
    rust_client_wait_secs: u64,
    #[command(flatten)]
    json: Json,
}

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
                "server: metrics on http://{t}/metrics, health on http://{t}/health"
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

#[cfg(test)]
mod tests {
    use labrun::args::ServerArgs as Child;

    use crate::Command;
    use crate::tests::parse;

    #[test]
    fn the_labs_server_command_line_parses_to_its_values() {
        let child = Child {
            port: 10000,
            database_url: "sqlite://campaign.db".into(),
            protocol_filters: Some("ip4/tcp:1,ip4/quic-v1:1".into()),
            dedup_secs: Some(0),
            per_remote: Some(100_000),
        };
        let Command::Server(args) = parse(child.to_args()) else {
            panic!("not `server`");
        };
        assert_eq!(args.port, child.port);
        assert_eq!(args.database_url, child.database_url);
        let filters = child.protocol_filters.as_deref().map(str::parse);
        assert_eq!(
            Some(args.protocol_filters),
            filters.transpose().expect("filters")
        );
        assert_eq!(Some(args.dedup_secs), child.dedup_secs);
        assert_eq!(Some(args.per_remote), child.per_remote);
        assert_eq!(args.telemetry.port, 0);
        assert!(args.json.json);
    }
}

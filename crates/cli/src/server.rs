//! The flags of `natpunch server`: the store, TLS, keys and the allocation rules.

use crate::args::{Json, Telemetry};
use api::server::{Config, Filters};
use api::store::Rules;
use clap::Args;
use clap::builder::BoolishValueParser;
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Debug, Args)]
#[command(
    after_help = "punchr's Go and Rust clients work unchanged: point them at this server \
(Go: --server-host H --server-port 10000 --server-ssl=false, or give this server --tls-cert and \
--tls-key). Unknown API keys register as anonymous, as with punchr, unless \
--closed-registration is given.",
    mut_arg("json", |a| a.help("Print start and stop as JSON objects, one per line"))
)]
pub struct ServerArgs {
    /// Address to listen on for gRPC.
    #[arg(long, env = "NATPUNCH_SERVER_LISTEN_IP", default_value = "0.0.0.0")]
    pub listen_ip: IpAddr,
    /// gRPC port; 0 picks a free one (printed at start).
    #[arg(long, env = "NATPUNCH_SERVER_PORT", default_value_t = 10000)]
    pub port: u16,
    #[command(flatten)]
    pub telemetry: Telemetry<Self>,
    /// The database: sqlite://FILE (created on first start) or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "NATPUNCH_DATABASE_URL",
        default_value = "sqlite://natpunch.db"
    )]
    pub database_url: String,
    /// TLS certificate chain (PEM); with --tls-key, the server speaks TLS only.
    #[arg(long, env = "NATPUNCH_SERVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "NATPUNCH_SERVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Refuse API keys that are not in the database yet (punchr creates them as anonymous).
    #[arg(long, env = "NATPUNCH_SERVER_CLOSED_REGISTRATION", value_parser = BoolishValueParser::new())]
    pub closed_registration: bool,
    /// Protocol filters handed out with peers, FILTER:WEIGHT,… where FILTER is protocols
    /// joined by `/` (ip4, ip6, tcp, udp, quic, quic-v1, webtransport, or codes) or `none`.
    /// punchr's mix used draft-29 QUIC: ip4/tcp:15,ip4/quic:15,ip6/tcp:15,ip6/quic:15,none:40.
    #[arg(
        long,
        env = "NATPUNCH_SERVER_PROTOCOL_FILTERS",
        default_value = api::server::DEFAULT_FILTERS
    )]
    pub protocol_filters: Filters,
    /// Only peers the honeypot saw within this many seconds are handed out.
    #[arg(
        long,
        env = "NATPUNCH_SERVER_RECENCY_SECS",
        default_value_t = Rules::default().recency.as_secs()
    )]
    pub recency_secs: u64,
    /// A peer is handed out at most this many times …
    #[arg(long, env = "NATPUNCH_SERVER_PER_REMOTE", default_value_t = Rules::default().per_remote)]
    pub per_remote: u32,
    /// … within this many seconds.
    #[arg(
        long,
        env = "NATPUNCH_SERVER_PER_REMOTE_SECS",
        default_value_t = Rules::default().per_remote_window.as_secs()
    )]
    pub per_remote_secs: u64,
    /// A peer and address are not handed to the same client (any of its hosts) again within
    /// this many seconds.
    #[arg(
        long,
        env = "NATPUNCH_SERVER_DEDUP_SECS",
        default_value_t = Rules::default().dedup_window.as_secs()
    )]
    pub dedup_secs: u64,
    /// Seconds GetAddrInfo holds a request of punchr's Rust client (which exits on any error,
    /// NotFound included) waiting for a peer; 0 answers NotFound at once. At most 25, so that
    /// NotFound comes before the 30 s request timeout (a larger value is lowered, with a warning).
    #[arg(
        long,
        env = "NATPUNCH_SERVER_RUST_CLIENT_WAIT_SECS",
        default_value_t = Config::default().rust_client_wait.as_secs()
    )]
    pub rust_client_wait_secs: u64,
    #[command(flatten)]
    pub json: Json,
}

crate::write_args!(ServerArgs {
    listen_ip,
    port,
    database_url,
    tls_cert,
    tls_key,
    closed_registration,
    protocol_filters,
    recency_secs,
    per_remote,
    per_remote_secs,
    dedup_secs,
    rust_client_wait_secs;
    telemetry,
    json,
});

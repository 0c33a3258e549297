//! The flags of `natpunch honeypot`: the DHT server that records who connects.

use crate::args::{Identity, Json, Telemetry};
use clap::Args;
use clap::builder::BoolishValueParser;
use libp2p::{Multiaddr, StreamProtocol};
use p2p::honeypot::defaults;
use std::net::IpAddr;

#[derive(Debug, Args)]
#[command(
    after_help = "The public IPFS DHT: --protocol /ipfs/kad/1.0.0 (the default) with its \
bootstrap peers. A private lab DHT: any protocol name, and this honeypot as the first node (no \
--bootstrap) or joined through the lab's bootstrap peers.",
    mut_arg("json", |a| a.help("Print one JSON object per event"))
)]
pub struct HoneypotArgs {
    /// Address to listen on (TCP and QUIC).
    #[arg(long, env = "NATPUNCH_HONEYPOT_LISTEN_IP", default_value = "0.0.0.0")]
    pub listen_ip: IpAddr,
    /// Port, TCP and UDP (QUIC) alike; 0 picks free ones.
    #[arg(long, env = "NATPUNCH_HONEYPOT_PORT", default_value_t = defaults::PORT)]
    pub port: u16,
    #[command(flatten)]
    pub identity: Identity<Self>,
    /// The DHT's protocol name.
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_PROTOCOL",
        default_value = "/ipfs/kad/1.0.0",
        value_parser = crate::stream_protocol
    )]
    pub protocol: StreamProtocol,
    /// Peers to join the DHT through, with /p2p/<peer id> (comma-separated or repeated).
    #[arg(long, env = "NATPUNCH_BOOTSTRAP_PEERS", value_delimiter = ',')]
    pub bootstrap: Vec<Multiaddr>,
    /// Random walks at once in each crawl.
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_CRAWLER_COUNT",
        default_value_t = defaults::CRAWLER_COUNT
    )]
    pub crawler_count: usize,
    /// Seconds from the start of one crawl to the next.
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_CRAWL_SECS",
        default_value_t = defaults::CRAWL_INTERVAL.as_secs()
    )]
    pub crawl_secs: u64,
    /// Seconds an idle connection stays open (long: address updates of relayed peers arrive
    /// by identify push; --max-connections bounds what that costs).
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_IDLE_SECS",
        default_value_t = defaults::IDLE_TIMEOUT.as_secs()
    )]
    pub idle_secs: u64,
    /// Connections open at once, both directions; peers beyond it are refused (and counted).
    /// Inbound ones may take all but an eighth, which the crawl keeps.
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_MAX_CONNECTIONS",
        default_value_t = defaults::MAX_CONNECTIONS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,
    /// Connections one peer may hold at once.
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_MAX_CONNECTIONS_PER_PEER",
        default_value_t = defaults::MAX_CONNECTIONS_PER_PEER,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections_per_peer: u32,
    /// The measurement store: sqlite://FILE or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "NATPUNCH_DATABASE_URL",
        default_value = "sqlite://natpunch.db"
    )]
    pub database_url: String,
    #[command(flatten)]
    pub telemetry: Telemetry<Self>,
    /// Record nothing: a plain DHT server (a lab's bootstrap node).
    #[arg(long, env = "NATPUNCH_HONEYPOT_NO_RECORD", value_parser = BoolishValueParser::new())]
    pub no_record: bool,
    #[command(flatten)]
    pub json: Json,
}

crate::write_args!(HoneypotArgs {
    listen_ip,
    port,
    protocol,
    bootstrap,
    crawler_count,
    crawl_secs,
    idle_secs,
    max_connections,
    max_connections_per_peer,
    database_url,
    no_record;
    identity,
    telemetry,
    json,
});

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

#[cfg(test)]
mod tests {
    use labrun::args::HoneypotArgs as Child;
    use p2p::honeypot::defaults;

    use crate::Command;
    use crate::tests::parse;

    fn check(child: &Child) {
        let Command::Honeypot(args) = parse(child.to_args()) else {
            panic!("not `honeypot`");
        };
        assert_eq!(args.port, child.port);
        assert_eq!(args.identity.path.as_ref(), Some(&child.identity));
        assert_eq!(args.protocol.to_string(), child.protocol);
        let bootstrap: Vec<String> = args.bootstrap.iter().map(ToString::to_string).collect();
        assert_eq!(
            bootstrap,
            child.bootstrap.clone().into_iter().collect::<Vec<_>>()
        );
        assert_eq!(
            args.crawler_count,
            child.crawler_count.unwrap_or(defaults::CRAWLER_COUNT)
        );
        assert_eq!(
            args.crawl_secs,
            child
                .crawl_secs
                .unwrap_or(defaults::CRAWL_INTERVAL.as_secs())
        );
        match &child.database_url {
            Some(url) => assert!(!args.no_record && args.database_url == *url),
            None => assert!(args.no_record),
        }
        assert!(args.json.json);
    }

    #[test]
    fn the_labs_honeypot_command_lines_parse_to_their_values() {
        let dht = Child {
            port: 4002,
            identity: "dht.key".into(),
            protocol: "/natpunch/lab/kad/1.0.0".into(),
            bootstrap: None,
            crawler_count: None,
            crawl_secs: None,
            database_url: None,
        };
        check(&dht);
        check(&Child {
            bootstrap: Some(
                "/ip4/203.0.113.2/tcp/4002/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                    .into(),
            ),
            crawler_count: Some(3),
            crawl_secs: Some(60),
            database_url: Some("sqlite://campaign.db".into()),
            ..dht
        });
    }
}

//! `natpunch honeypot`: a Kademlia DHT server that records the peers connecting to it into the
//! measurement store, where `natpunch server` hands them to clients.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use api::report::Addr;
use api::store::{ConnectionEvent, SqlStore, Store as _};
use clap::Args;
use clap::builder::BoolishValueParser;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, StreamProtocol};
use p2p::honeypot::{Honeypot, HoneypotConfig, HoneypotEvent, Sighting};

#[derive(Debug, Args)]
#[command(
    after_help = "The public IPFS DHT: --protocol /ipfs/kad/1.0.0 (the default) with its \
bootstrap peers. A private lab DHT: any protocol name, and this honeypot as the first node (no \
--bootstrap) or joined through the lab's bootstrap peers."
)]
pub(crate) struct HoneypotArgs {
    /// Address to listen on (TCP and QUIC).
    #[arg(long, env = "NATPUNCH_HONEYPOT_LISTEN_IP", default_value = "0.0.0.0")]
    listen_ip: IpAddr,
    /// Port, TCP and UDP (QUIC) alike; 0 picks free ones.
    #[arg(long, env = "NATPUNCH_HONEYPOT_PORT", default_value_t = 11000)]
    port: u16,
    /// The honeypot's key file, created on first start [default: $XDG_STATE_HOME/natpunch/
    /// honeypot.key or ~/.local/state/natpunch/honeypot.key].
    #[arg(long, env = "NATPUNCH_HONEYPOT_IDENTITY")]
    identity: Option<PathBuf>,
    /// The DHT's protocol name.
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_PROTOCOL",
        default_value = "/ipfs/kad/1.0.0",
        value_parser = crate::stream_protocol
    )]
    protocol: StreamProtocol,
    /// Peers to join the DHT through, with /p2p/<peer id> (comma-separated or repeated).
    #[arg(long, env = "NATPUNCH_BOOTSTRAP_PEERS", value_delimiter = ',')]
    bootstrap: Vec<Multiaddr>,
    /// Random walks at once in each crawl.
    #[arg(long, env = "NATPUNCH_HONEYPOT_CRAWLER_COUNT", default_value_t = 10)]
    crawler_count: usize,
    /// Seconds from the start of one crawl to the next.
    #[arg(long, env = "NATPUNCH_HONEYPOT_CRAWL_SECS", default_value_t = 600)]
    crawl_secs: u64,
    /// Seconds an idle connection stays open (long: address updates of relayed peers arrive
    /// by identify push).
    #[arg(long, env = "NATPUNCH_HONEYPOT_IDLE_SECS", default_value_t = 1800)]
    idle_secs: u64,
    /// The measurement store: sqlite://FILE or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "NATPUNCH_DATABASE_URL",
        default_value = "sqlite://natpunch.db"
    )]
    database_url: String,
    /// Host of the telemetry port (/metrics, /health).
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_TELEMETRY_HOST",
        default_value = "127.0.0.1"
    )]
    telemetry_host: IpAddr,
    /// Telemetry port; 0 turns it off.
    #[arg(
        long,
        env = "NATPUNCH_HONEYPOT_TELEMETRY_PORT",
        default_value_t = 11001
    )]
    telemetry_port: u16,
    /// Record nothing: a plain DHT server (a lab's bootstrap node).
    #[arg(long, env = "NATPUNCH_HONEYPOT_NO_RECORD", value_parser = BoolishValueParser::new())]
    no_record: bool,
    /// Print one JSON object per event.
    #[arg(long, env = "NATPUNCH_JSON", value_parser = BoolishValueParser::new())]
    json: bool,
}

pub(crate) fn run(args: HoneypotArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

/// The store's form of a sighting.
fn connection_event(local: &str, s: &Sighting) -> anyhow::Result<ConnectionEvent> {
    let parse = |a: &str| -> anyhow::Result<Addr> {
        Ok(Addr::of(
            &a.parse::<Multiaddr>()
                .with_context(|| format!("address {a}"))?,
        ))
    };
    Ok(ConnectionEvent {
        local: local.to_owned(),
        remote: s.peer_id.clone(),
        agent_version: Some(s.agent_version.clone()),
        protocols: s.protocols.clone(),
        conn_addr: parse(&s.conn_addr)?,
        addrs: s
            .listen_addrs
            .iter()
            .map(|a| parse(a))
            .collect::<anyhow::Result<_>>()?,
        opened_at: s.opened_at,
    })
}

async fn serve(args: HoneypotArgs) -> anyhow::Result<ExitCode> {
    let path = match &args.identity {
        Some(p) => p.clone(),
        None => crate::state_dir()?.join("honeypot.key"),
    };
    let (key, created) = p2p::identity::load_or_create(&path)?;
    let store = if args.no_record {
        None
    } else {
        let url = &args.database_url;
        Some(
            SqlStore::open(url)
                .await
                .with_context(|| format!("opening {}", crate::server::redact(url)))?,
        )
    };
    let ip = match args.listen_ip {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    let base = Multiaddr::empty().with(ip);
    let mut config = HoneypotConfig::new(vec![
        base.clone().with(Protocol::Tcp(args.port)),
        base.with(Protocol::Udp(args.port)).with(Protocol::QuicV1),
    ]);
    config.protocol = args.protocol.clone();
    config.bootstrap = args.bootstrap.clone();
    config.crawler_count = args.crawler_count;
    config.crawl_interval = std::time::Duration::from_secs(args.crawl_secs.max(1));
    config.idle_timeout = std::time::Duration::from_secs(args.idle_secs);
    let honeypot = Honeypot::new(key, config).map_err(anyhow::Error::msg)?;
    let local = honeypot.peer_id().to_base58();
    eprintln!(
        "honeypot: peer id {local} ({} key {}), {}",
        if created { "new" } else { "from" },
        path.display(),
        if store.is_some() {
            format!(
                "recording into {}",
                crate::server::redact(&args.database_url)
            )
        } else {
            "recording nothing".to_owned()
        }
    );
    let metrics = Metrics::default();
    if args.telemetry_port != 0 {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let addr = std::net::SocketAddr::new(args.telemetry_host, args.telemetry_port);
        crate::serve_telemetry(
            addr,
            std::sync::Arc::new(std::sync::Mutex::new(registry)),
            p2p::telemetry::Health::default(),
        )
        .await?;
    }
    // Sightings are written by their own task, so that a slow database never stalls the swarm.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Sighting>();
    let writer = {
        let store = store.clone();
        let local = local.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(s) = rx.recv().await {
                let Some(store) = &store else {
                    continue;
                };
                let event = match connection_event(&local, &s) {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("honeypot: {}: {e:#}", s.peer_id);
                        continue;
                    }
                };
                let mut delay = std::time::Duration::from_millis(200);
                while let Err(e) = store.record_connection(&event, api::server::now_ns()).await {
                    metrics.record_errors.inc();
                    eprintln!("honeypot: recording {}: {e} (trying again)", s.peer_id);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(10));
                }
                metrics.recorded.inc();
            }
        })
    };
    let json = args.json;
    let mut report = |e: HoneypotEvent| {
        if json {
            println!("{}", serde_json::to_string(&e).unwrap_or_default());
        } else {
            println!("{}", describe(&e));
        }
        match e {
            HoneypotEvent::Seen(s) => {
                let dcutr = if s.dcutr { "true" } else { "false" };
                metrics.seen.get_or_create(&vec![("dcutr", dcutr)]).inc();
                let _ = tx.send(s);
            }
            HoneypotEvent::CrawlEnded { peers, .. } => {
                metrics.crawls.inc();
                metrics
                    .crawl_peers
                    .set(i64::try_from(peers).unwrap_or(i64::MAX));
            }
            _ => {}
        }
    };
    honeypot.run(crate::stop_signal(), &mut report).await;
    drop(tx);
    // What was seen before the stop is written before the process ends.
    let _ = writer.await;
    if let Some(store) = store {
        store.close().await;
    }
    eprintln!("honeypot: stopped");
    Ok(ExitCode::SUCCESS)
}

/// The honeypot's metrics.
#[derive(Debug, Clone, Default)]
struct Metrics {
    seen: prometheus_client::metrics::family::Family<
        Vec<(&'static str, &'static str)>,
        prometheus_client::metrics::counter::Counter,
    >,
    recorded: prometheus_client::metrics::counter::Counter,
    record_errors: prometheus_client::metrics::counter::Counter,
    crawls: prometheus_client::metrics::counter::Counter,
    crawl_peers: prometheus_client::metrics::gauge::Gauge,
}

impl Metrics {
    fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "natpunch_honeypot_peers_seen",
            "Inbound peers identified (again on address changes), by DCUtR support",
            self.seen.clone(),
        );
        r.register(
            "natpunch_honeypot_recorded",
            "Sightings written to the store",
            self.recorded.clone(),
        );
        r.register(
            "natpunch_honeypot_record_errors",
            "Failed writes to the store (each is tried again)",
            self.record_errors.clone(),
        );
        r.register(
            "natpunch_honeypot_crawls",
            "Crawls completed",
            self.crawls.clone(),
        );
        r.register(
            "natpunch_honeypot_crawl_peers",
            "Peers met by the last crawl",
            self.crawl_peers.clone(),
        );
    }
}

fn describe(e: &HoneypotEvent) -> String {
    match e {
        HoneypotEvent::Listening { peer_id, address } => {
            format!("listening on {address}/p2p/{peer_id}")
        }
        HoneypotEvent::Seen(s) => format!(
            "seen {} ({}) from {}: {} addresses, {} relayed{}",
            s.peer_id,
            s.agent_version,
            s.conn_addr,
            s.listen_addrs.len(),
            s.relay_addrs.len(),
            if s.dcutr { ", speaks DCUtR" } else { "" }
        ),
        HoneypotEvent::CrawlStarted { walks } => format!("crawl: {walks} walks"),
        HoneypotEvent::CrawlEnded { peers, secs } => {
            format!("crawl: met {peers} peers in {secs:.1} s")
        }
        HoneypotEvent::BootstrapFailed { address, error } => {
            format!("bootstrap peer {address} unreachable: {error}")
        }
    }
}

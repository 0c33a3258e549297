//! The honeypot: a long-running Kademlia DHT server that records the peers connecting to it.
//!
//! It joins the DHT (any protocol name: the public IPFS DHT or a private lab one) in server mode
//! and crawls it now and then (`crawler_count` random walks at once), which makes it known as a
//! reachable DHT server; peers behind NATs doing lookups then dial it. Every inbound peer is
//! reported once identify has run ([`HoneypotEvent::Seen`]: agent, protocols, listen addresses
//! with relay addresses flagged, the address it came from, the time), and again whenever an
//! identify push changes its addresses. Connections are kept open (a long idle timeout) so that
//! those pushes arrive; it records between crawls too, unlike punchr's, which recorded only
//! while crawling.
//!
//! What the network feeds is bounded ([`defaults`]): connections (total, per peer, handshakes in
//! flight), the peers remembered as already reported, and the sightings waiting for the store
//! ([`Recorder`]: a bounded queue and bounded retries; what does not fit is dropped and
//! counted in [`Metrics`]). [`SqlSightings`] writes them into the measurement store, and
//! [`Honeypot::run_recording`] runs the server with the writer beside it.

pub mod defaults;
mod recorder;
mod reported;
mod store;

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{DialError, ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, identify, kad, ping};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
pub use recorder::{RecordError, Recorder, RecorderConfig, Retry, SightingStore};
use reported::Reported;
use serde::{Deserialize, Serialize};
pub use store::{BadAddress, SqlSightings, connection_event};
use telemetry::metrics::Registrar;

/// The agent version the honeypot announces.
fn agent_version() -> String {
    format!("natpunch/honeypot/{}", env!("CARGO_PKG_VERSION"))
}

/// How to run the honeypot.
#[derive(Debug, Clone)]
pub struct HoneypotConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// The DHT's protocol name.
    pub protocol: StreamProtocol,
    /// Peers to join the DHT through, with `/p2p/<id>` (none: this is the first node).
    pub bootstrap: Vec<Multiaddr>,
    /// Random walks run at once in a crawl.
    pub crawler_count: usize,
    /// Time between the start of two crawls.
    pub crawl_interval: Duration,
    /// How long a connection may stay idle before it is closed.
    pub idle_timeout: Duration,
    /// Connections open at once, both directions (inbound ones may take all but an eighth).
    pub max_connections: u32,
    /// Connections one peer may hold at once.
    pub max_connections_per_peer: u32,
    /// Inbound connections still in their handshake at once.
    pub max_pending_incoming: u32,
    /// Peers whose last reported addresses are remembered, to report changes only.
    pub reported_peers: usize,
}

impl HoneypotConfig {
    /// The [`defaults`] (punchr's where they apply: 10 crawlers) on the public IPFS DHT.
    pub fn new(listen: Vec<Multiaddr>) -> Self {
        Self {
            listen,
            protocol: kad::PROTOCOL_NAME,
            bootstrap: Vec::new(),
            crawler_count: defaults::CRAWLER_COUNT,
            crawl_interval: defaults::CRAWL_INTERVAL,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_peer: defaults::MAX_CONNECTIONS_PER_PEER,
            max_pending_incoming: defaults::MAX_PENDING_INCOMING,
            reported_peers: defaults::REPORTED_PEERS,
        }
    }

    fn connection_limits(&self) -> connection_limits::ConnectionLimits {
        let total = self.max_connections.max(1);
        let inbound = total - total / defaults::OUTBOUND_RESERVE_DIVISOR;
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(total))
            .with_max_established_incoming(Some(inbound))
            .with_max_established_per_peer(Some(self.max_connections_per_peer.max(1)))
            .with_max_pending_incoming(Some(self.max_pending_incoming.max(1)))
    }
}

/// A peer the honeypot saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sighting {
    /// The peer.
    pub peer_id: String,
    /// Its agent version.
    pub agent_version: String,
    /// Its protocols.
    pub protocols: Vec<String>,
    /// The addresses it listens on, relayed ones among them.
    pub listen_addrs: Vec<String>,
    /// Those that go through a relay.
    pub relay_addrs: Vec<String>,
    /// Where its connection came from.
    pub conn_addr: String,
    /// Whether it speaks DCUtR (`/libp2p/dcutr`).
    pub dcutr: bool,
    /// When the connection opened, Unix ns.
    pub opened_at: i64,
}

/// What the honeypot reports (and, read back from its JSON lines, what programs that run it
/// read).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum HoneypotEvent {
    /// Listening.
    Listening {
        /// The honeypot's peer ID.
        peer_id: String,
        /// An address it listens on.
        address: String,
    },
    /// An inbound peer identified itself (or pushed new addresses).
    Seen(Sighting),
    /// A crawl started.
    CrawlStarted {
        /// Random walks.
        walks: usize,
    },
    /// A crawl ended.
    CrawlEnded {
        /// Distinct peers the walks met.
        peers: usize,
        /// How long it took.
        secs: f64,
    },
    /// A bootstrap peer could not be reached.
    BootstrapFailed {
        /// The address.
        address: String,
        /// Why.
        error: String,
    },
}

/// The honeypot's behaviours.
#[derive(NetworkBehaviour)]
#[expect(
    missing_debug_implementations,
    reason = "libp2p's behaviours do not implement Debug"
)]
pub struct HoneypotBehaviour {
    // First, so that a connection over the limits is refused before the others see it.
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// A running honeypot.
pub struct Honeypot {
    swarm: Swarm<HoneypotBehaviour>,
    config: HoneypotConfig,
    /// Inbound connections: where each came from and when.
    inbound: HashMap<libp2p::swarm::ConnectionId, (Multiaddr, i64)>,
    /// The last addresses reported per peer, to report pushes that change them only.
    reported: Reported,
    /// The walks of the crawl in progress, and the peers they met.
    crawl: Option<Crawl>,
    metrics: Metrics,
}

/// Label sets of the honeypot's counter families.
/// One line for people, e.g. `seen 12D3… (kubo/0.30) from /ip4/…: 4 addresses, 1 relayed,
/// speaks DCUtR`.
impl fmt::Display for HoneypotEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Listening { peer_id, address } => {
                write!(f, "listening on {address}/p2p/{peer_id}")
            }
            Self::Seen(s) => write!(
                f,
                "seen {} ({}) from {}: {} addresses, {} relayed{}",
                s.peer_id,
                s.agent_version,
                s.conn_addr,
                s.listen_addrs.len(),
                s.relay_addrs.len(),
                if s.dcutr { ", speaks DCUtR" } else { "" }
            ),
            Self::CrawlStarted { walks } => write!(f, "crawl: {walks} walks"),
            Self::CrawlEnded { peers, secs } => {
                write!(f, "crawl: met {peers} peers in {secs:.1} s")
            }
            Self::BootstrapFailed { address, error } => {
                write!(f, "bootstrap peer {address} unreachable: {error}")
            }
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// The honeypot's Prometheus metrics (`natpunch_honeypot_*`), shared by the swarm and the
/// [`Recorder`].
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    seen: Family<Labels, Counter>,
    recorded: Counter,
    record_errors: Counter,
    dropped: Family<Labels, Counter>,
    queued: Gauge,
    reported_peers: Gauge,
    connections: Gauge,
    connections_denied: Family<Labels, Counter>,
    crawls: Counter,
    crawl_peers: Gauge,
}

/// Why a sighting was dropped: the queue was full, the store failed to take it for too long,
/// the store refused it, the writer had stopped.
const DROP_REASONS: [&str; 4] = ["queue_full", "gave_up", "refused", "writer_stopped"];

impl Metrics {
    /// Metrics registered in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let mut r = Registrar::with_prefix(registry, "natpunch_honeypot");
        let m = Self {
            seen: r.counters(
                "peers_seen",
                "Inbound peers identified (again on address changes), by DCUtR support",
            ),
            recorded: r.counter("recorded", "Sightings written to the store"),
            record_errors: r.counter(
                "record_errors",
                "Failed writes to the store (tried again until the sighting is given up)",
            ),
            dropped: r.counters(
                "sightings_dropped",
                "Sightings not written, by reason: queue_full (the store is down or behind), \
                 gave_up (the store failed to take it for too long), refused (the store will \
                 never take it), writer_stopped",
            ),
            queued: r.gauge("sightings_queued", "Sightings waiting for the store"),
            reported_peers: r.gauge("reported_peers", "Peers remembered as already reported"),
            connections: r.gauge("connections", "Connections open now"),
            connections_denied: r.counters(
                "connections_denied",
                "Connections refused by the connection limits, by direction",
            ),
            crawls: r.counter("crawls", "Crawls completed"),
            crawl_peers: r.gauge("crawl_peers", "Peers met by the last crawl"),
        };
        // Every series from the start, so that dashboards see zeros rather than nothing.
        for reason in DROP_REASONS {
            let _ = m.dropped.get_or_create(&vec![("reason", reason)]);
        }
        for direction in ["in", "out"] {
            let _ = m
                .connections_denied
                .get_or_create(&vec![("direction", direction)]);
        }
        m
    }

    fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&vec![("reason", reason)]).inc();
    }

    fn set_queued(&self, n: usize) {
        self.queued.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

#[derive(Debug)]
struct Crawl {
    started: Instant,
    walks: Vec<kad::QueryId>,
    peers: std::collections::HashSet<PeerId>,
}

impl fmt::Debug for Honeypot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Honeypot")
            .field("peer_id", self.swarm.local_peer_id())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Unix nanoseconds now.
fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Whether `addr` goes through a relay.
fn relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

impl Honeypot {
    /// Builds the honeypot (inside a tokio runtime), counting into `metrics`.
    pub fn new(key: Keypair, config: HoneypotConfig, metrics: &Metrics) -> Result<Self, String> {
        let peer = key.public().to_peer_id();
        let mut swarm = crate::host::swarm(key, config.idle_timeout, |key| HoneypotBehaviour {
            limits: connection_limits::Behaviour::new(config.connection_limits()),
            identify: identify::Behaviour::new(
                identify::Config::new("/ipfs/0.1.0".into(), key.public())
                    .with_agent_version(agent_version()),
            ),
            ping: ping::Behaviour::default(),
            kad: kad::Behaviour::with_config(
                peer,
                kad::store::MemoryStore::new(peer),
                kad::Config::new(config.protocol.clone()),
            ),
        })?;
        swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| format!("listening on {addr}: {e}"))?;
        }
        for addr in &config.bootstrap {
            let Some(Protocol::P2p(id)) = addr.iter().last() else {
                return Err(format!("bootstrap address {addr} lacks /p2p/<peer id>"));
            };
            swarm.behaviour_mut().kad.add_address(&id, addr.clone());
        }
        Ok(Self {
            swarm,
            inbound: HashMap::new(),
            reported: Reported::new(config.reported_peers),
            config,
            crawl: None,
            metrics: metrics.clone(),
        })
    }

    /// The honeypot's peer ID.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Runs until `stop` completes, reporting to `report`.
    pub async fn run(
        mut self,
        stop: impl Future<Output = ()>,
        report: &mut impl FnMut(HoneypotEvent),
    ) {
        tokio::pin!(stop);
        let mut next_crawl = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep_until(next_crawl) => {
                    next_crawl += self.config.crawl_interval;
                    self.start_crawl(report);
                }
                event = self.swarm.select_next_some() => self.on_event(event, report),
            }
        }
    }

    fn count_connections(&self) {
        let open = self
            .swarm
            .network_info()
            .connection_counters()
            .num_established();
        self.metrics.connections.set(i64::from(open));
    }

    fn start_crawl(&mut self, report: &mut impl FnMut(HoneypotEvent)) {
        if self.crawl.is_some() {
            return;
        }
        let kad = &mut self.swarm.behaviour_mut().kad;
        let mut walks = Vec::with_capacity(self.config.crawler_count);
        // A lookup of our own ID fills the buckets near us; random ones walk the rest.
        if let Ok(q) = kad.bootstrap() {
            walks.push(q);
        }
        while walks.len() < self.config.crawler_count.max(1) {
            walks.push(kad.get_closest_peers(PeerId::random()));
        }
        report(HoneypotEvent::CrawlStarted { walks: walks.len() });
        self.crawl = Some(Crawl {
            started: Instant::now(),
            walks,
            peers: std::collections::HashSet::new(),
        });
    }

    fn on_event(
        &mut self,
        event: SwarmEvent<HoneypotBehaviourEvent>,
        report: &mut impl FnMut(HoneypotEvent),
    ) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => report(HoneypotEvent::Listening {
                peer_id: self.peer_id().to_string(),
                address: address.to_string(),
            }),
            SwarmEvent::ConnectionEstablished {
                connection_id,
                endpoint,
                ..
            } => {
                // Bounded by the connection limits: an entry lives as long as its connection.
                if let libp2p::core::ConnectedPoint::Listener { send_back_addr, .. } = endpoint {
                    self.inbound
                        .insert(connection_id, (send_back_addr, now_ns()));
                }
                self.count_connections();
            }
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.inbound.remove(&connection_id);
                self.count_connections();
            }
            SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { cause },
                ..
            } if cause
                .downcast_ref::<connection_limits::Exceeded>()
                .is_some() =>
            {
                self.metrics
                    .connections_denied
                    .get_or_create(&vec![("direction", "in")])
                    .inc();
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if self
                .config
                .bootstrap
                .iter()
                .any(|a| a.iter().last() == Some(Protocol::P2p(peer))) =>
            {
                report(HoneypotEvent::BootstrapFailed {
                    address: peer.to_string(),
                    error: error.to_string(),
                });
            }
            SwarmEvent::OutgoingConnectionError {
                error: DialError::Denied { cause },
                ..
            } if cause
                .downcast_ref::<connection_limits::Exceeded>()
                .is_some() =>
            {
                self.metrics
                    .connections_denied
                    .get_or_create(&vec![("direction", "out")])
                    .inc();
            }
            SwarmEvent::Behaviour(HoneypotBehaviourEvent::Identify(
                identify::Event::Received {
                    connection_id,
                    peer_id,
                    info,
                },
            )) => self.on_identify(connection_id, peer_id, info, report),
            SwarmEvent::Behaviour(HoneypotBehaviourEvent::Kad(
                kad::Event::OutboundQueryProgressed {
                    id, result, step, ..
                },
            )) => self.on_query(id, &result, step.last, report),
            _ => {}
        }
    }

    fn on_identify(
        &mut self,
        connection: libp2p::swarm::ConnectionId,
        peer: PeerId,
        info: identify::Info,
        report: &mut impl FnMut(HoneypotEvent),
    ) {
        // DHT servers among them join the routing table, so that walks reach them.
        if info.protocols.contains(&self.config.protocol) {
            for addr in info.listen_addrs.iter().filter(|a| !relayed(a)) {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
            }
        }
        // Outbound connections are our crawl's; only peers that came to us are recorded.
        let Some((conn_addr, opened_at)) = self.inbound.get(&connection).cloned() else {
            return;
        };
        let mut listen_addrs: Vec<String> =
            info.listen_addrs.iter().map(ToString::to_string).collect();
        listen_addrs.sort();
        listen_addrs.dedup();
        let news = self.reported.update(peer, &listen_addrs);
        self.metrics
            .reported_peers
            .set(i64::try_from(self.reported.len()).unwrap_or(i64::MAX));
        if !news {
            return;
        }
        let protocols: Vec<String> = info.protocols.iter().map(ToString::to_string).collect();
        let dcutr = protocols.iter().any(|p| p == "/libp2p/dcutr");
        self.metrics
            .seen
            .get_or_create(&vec![("dcutr", if dcutr { "true" } else { "false" })])
            .inc();
        report(HoneypotEvent::Seen(Sighting {
            peer_id: peer.to_string(),
            agent_version: info.agent_version,
            dcutr,
            protocols,
            relay_addrs: info
                .listen_addrs
                .iter()
                .filter(|a| relayed(a))
                .map(ToString::to_string)
                .collect(),
            listen_addrs,
            conn_addr: conn_addr.to_string(),
            opened_at,
        }));
    }

    fn on_query(
        &mut self,
        id: kad::QueryId,
        result: &kad::QueryResult,
        last: bool,
        report: &mut impl FnMut(HoneypotEvent),
    ) {
        let Some(crawl) = self.crawl.as_mut() else {
            return;
        };
        if !crawl.walks.contains(&id) {
            return;
        }
        match result {
            kad::QueryResult::GetClosestPeers(Ok(ok)) => {
                crawl.peers.extend(ok.peers.iter().map(|p| p.peer_id));
            }
            kad::QueryResult::Bootstrap(Ok(ok)) => {
                crawl.peers.insert(ok.peer);
            }
            _ => {}
        }
        if last {
            crawl.walks.retain(|q| *q != id);
        }
        if crawl.walks.is_empty() {
            let peers = crawl.peers.len();
            let secs = crawl.started.elapsed().as_secs_f64();
            self.crawl = None;
            self.metrics.crawls.inc();
            self.metrics
                .crawl_peers
                .set(i64::try_from(peers).unwrap_or(i64::MAX));
            report(HoneypotEvent::CrawlEnded { peers, secs });
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::swarm::dummy;

    use super::*;

    /// A swarm that only connects.
    fn visitor() -> Swarm<dummy::Behaviour> {
        let key = Keypair::generate_ed25519();
        crate::host::swarm(key, Duration::from_secs(60), |_| dummy::Behaviour).expect("swarm")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_limits_are_refused_and_counted() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let mut config = HoneypotConfig::new(vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")]);
        config.protocol = StreamProtocol::new("/natpunch/test/kad/1.0.0");
        config.crawl_interval = Duration::from_secs(3600);
        config.max_connections = 3;
        config.max_connections_per_peer = 1;
        let honeypot =
            Honeypot::new(Keypair::generate_ed25519(), config, &metrics).expect("honeypot");
        let (addr_tx, mut addr_rx) = tokio::sync::mpsc::channel(4);
        let stop = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(async move {
            let mut report = |e: HoneypotEvent| {
                if let HoneypotEvent::Listening { address, .. } = e {
                    let _ = addr_tx.try_send(address);
                }
            };
            honeypot
                .run(
                    async {
                        let _ = stop.1.await;
                    },
                    &mut report,
                )
                .await;
        });
        let addr: Multiaddr = addr_rx
            .recv()
            .await
            .expect("listening")
            .parse()
            .expect("addr");

        // One peer twice (over the per-peer limit), then three more (over the total).
        let mut visitors = tokio::task::JoinSet::new();
        let mut twice = visitor();
        twice.dial(addr.clone()).expect("dial");
        twice.dial(addr.clone()).expect("dial");
        visitors.spawn(async move {
            loop {
                twice.select_next_some().await;
            }
        });
        for _ in 0..3 {
            let mut v = visitor();
            v.dial(addr.clone()).expect("dial");
            visitors.spawn(async move {
                loop {
                    v.select_next_some().await;
                }
            });
        }
        let denied = || {
            metrics
                .connections_denied
                .get_or_create(&vec![("direction", "in")])
                .get()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while denied() < 2 || metrics.connections.get() < 3 {
            assert!(
                Instant::now() < deadline,
                "{} denied, {} open",
                denied(),
                metrics.connections.get()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            denied(),
            2,
            "one over the per-peer limit, one over the total"
        );
        assert_eq!(metrics.connections.get(), 3);
        visitors.abort_all();
        let _ = stop.0.send(());
        run.await.expect("honeypot");
    }
}

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

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, kad, noise, ping, tcp, yamux};
use serde::Serialize;

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
}

impl HoneypotConfig {
    /// punchr's defaults where they apply: port 11000, 10 crawlers; the public IPFS DHT.
    pub fn new(listen: Vec<Multiaddr>) -> Self {
        Self {
            listen,
            protocol: kad::PROTOCOL_NAME,
            bootstrap: Vec::new(),
            crawler_count: 10,
            crawl_interval: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(1800),
        }
    }
}

/// A peer the honeypot saw.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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

/// What the honeypot reports.
#[derive(Debug, Clone, Serialize)]
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
    reported: HashMap<PeerId, Vec<String>>,
    /// The walks of the crawl in progress, and the peers they met.
    crawl: Option<Crawl>,
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
    /// Builds the honeypot (inside a tokio runtime).
    pub fn new(key: Keypair, config: HoneypotConfig) -> Result<Self, String> {
        let peer = key.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| e.to_string())?
            .with_quic()
            .with_behaviour(|key| HoneypotBehaviour {
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
            })
            .map_err(|e| e.to_string())?
            .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
            .build();
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
            config,
            inbound: HashMap::new(),
            reported: HashMap::new(),
            crawl: None,
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
                endpoint: libp2p::core::ConnectedPoint::Listener { send_back_addr, .. },
                ..
            } => {
                self.inbound
                    .insert(connection_id, (send_back_addr, now_ns()));
            }
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.inbound.remove(&connection_id);
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
        if self.reported.get(&peer) == Some(&listen_addrs) {
            return;
        }
        self.reported.insert(peer, listen_addrs.clone());
        let protocols: Vec<String> = info.protocols.iter().map(ToString::to_string).collect();
        report(HoneypotEvent::Seen(Sighting {
            peer_id: peer.to_string(),
            agent_version: info.agent_version,
            dcutr: protocols.iter().any(|p| p == "/libp2p/dcutr"),
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
            report(HoneypotEvent::CrawlEnded { peers, secs });
        }
    }
}

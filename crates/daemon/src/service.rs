//! The daemon: a libp2p host that holds reservations on relays, serves the application API on
//! a Unix socket, and connects applications to each other.
//!
//! One task owns the swarm ([`Daemon::run`]): it keeps a connection and a reservation on every
//! relay (dialled again with backoff when lost; a relay that stops answering pings is dropped
//! and dialled again, which is how a new external address is noticed), learns the addresses the
//! relays observe, and dials remote daemons through the relays when a connection asks for one.
//! Every application connection has its own task (`app`), and every connection between two
//! daemons too (`session`): the initiator's drives a [`crate::plan::Sequencer`], the
//! responder's follows what the initiator says on the daemons' stream ([`crate::signal`]).
//! Everything fed by the network or by applications is bounded: applications, requests per
//! application, sessions, listeners, messages.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, noise, ping, relay, tcp, yamux};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};

use behaviour::Mapping;
use p2p::peer::mapping::{MappingEvent, PortMapping};

use crate::api::{Proto, Technique};
use crate::plan::Tried;
use crate::signal::{self, NatInfo};

mod app;
mod direct;
mod session;

/// Applications connected at once.
pub const MAX_APPS: usize = 256;
/// Requests running at once on one application connection.
pub const MAX_REQUESTS: usize = 64;
/// Connections being made at once, both directions.
pub const MAX_SESSIONS: usize = 128;
/// `listen` requests held at once.
pub const MAX_LISTENERS: usize = 256;
/// How long a relay that stopped answering may stay before it is dropped and dialled again.
const RELAY_PING: Duration = Duration::from_secs(1);
const RELAY_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer that answered a ping this recently is alive, however slow its daemon's answer.
const ALIVE: Duration = Duration::from_secs(3);
/// The longest wait before a lost relay is dialled again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How to run a daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The relays, each with `/p2p/<relay peer id>` (TCP or QUIC; the other transport is
    /// dialled on the same port too).
    pub relays: Vec<Multiaddr>,
    /// The address to listen on.
    pub listen_ip: Ipv4Addr,
    /// The API socket's path.
    pub socket: PathBuf,
    /// NUTSS's first-SYN TTL (`None`: NUTSS is not tried).
    pub nutss_ttl: Option<u32>,
    /// What is known of this end's NAT (from `natpunch nat check` or a STUN check at start).
    pub nat: NatInfo,
    /// STUN reflectors (a relay's, on its STUN port) that tell which external port the NAT
    /// gave a fresh socket, asked when the NAT does not keep ports; the first is used.
    pub stun: Vec<SocketAddr>,
    /// An RFC 5780 STUN server to learn the NAT's behaviour from at start, when not told it
    /// (a relay's plain reflector cannot tell, so only a server named for it is asked).
    pub nat_check: Option<SocketAddr>,
    /// Map a direct port (TCP and UDP) on the router (PCP, NAT-PMP or UPnP IGD) and hold it, so
    /// that other daemons can dial this one straight.
    pub port_mapping: bool,
    /// Birthday probing and port prediction, for NATs that map per destination.
    pub birthday: crate::technique::birthday::Settings,
}

/// What the daemon reports.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum DaemonEvent {
    /// The API socket is open.
    Started {
        /// The daemon's peer ID.
        peer_id: String,
        /// The API socket.
        socket: String,
    },
    /// Connected to a relay; the address it observed.
    RelayConnected {
        /// The relay.
        relay: String,
        /// What it observed, per transport.
        observed: String,
    },
    /// The daemon checked its NAT against an RFC 5780 STUN server.
    Nat {
        /// The server.
        server: String,
        /// How the NAT maps, if the check could tell (`None`: not known).
        mapping: Option<Mapping>,
        /// How it filters, if the check could tell.
        filtering: Option<behaviour::Filtering>,
        /// How it picks ports for new mappings, if the check could tell.
        #[serde(skip_serializing_if = "Option::is_none")]
        port_allocation: Option<behaviour::PortAllocation>,
        /// Why it could not tell, if it could not.
        #[serde(skip_serializing_if = "Option::is_none")]
        problem: Option<String>,
    },
    /// A reservation is held on a relay.
    Reserved {
        /// The relay.
        relay: String,
        /// The relayed address others dial.
        address: String,
    },
    /// A relay's connection or reservation is gone; it is being made again.
    RelayLost {
        /// The relay.
        relay: String,
        /// Why.
        reason: String,
    },
    /// The direct port's mappings changed: the ones held now (none: the router lost them).
    Mappings {
        /// As `natpunch map` prints them.
        held: Vec<String>,
    },
    /// A connection between two applications was made, or failed.
    Connection(Box<ConnectionRecord>),
    /// Something that needs a person's attention.
    Warning {
        /// What.
        message: String,
    },
}

impl fmt::Display for DaemonEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Started { peer_id, socket } => {
                write!(f, "daemon: peer id {peer_id}, API on {socket}")
            }
            Self::RelayConnected { relay, observed } => {
                write!(f, "daemon: relay {relay} connected, observed {observed}")
            }
            Self::Reserved { relay, address } => {
                write!(f, "daemon: reservation on {relay}: {address}")
            }
            Self::Nat {
                server,
                mapping,
                filtering,
                port_allocation,
                problem,
            } => {
                let word = |v: Option<String>| v.unwrap_or_else(|| "unknown".to_owned());
                write!(
                    f,
                    "daemon: NAT check against {server}: mapping {}, filtering {}, ports {}",
                    word(mapping.map(|m| m.to_string())),
                    word(filtering.map(|x| x.to_string())),
                    word(port_allocation.map(|x| x.to_string()))
                )?;
                if let Some(p) = problem {
                    write!(f, " ({p})")?;
                }
                Ok(())
            }
            Self::RelayLost { relay, reason } => {
                write!(f, "daemon: relay {relay} lost ({reason}); connecting again")
            }
            Self::Mappings { held } if held.is_empty() => {
                write!(f, "daemon: the direct port has no mapping (now)")
            }
            Self::Mappings { held } => {
                write!(f, "daemon: direct port mapped: {}", held.join("; "))
            }
            Self::Connection(r) => write!(f, "daemon: {r}"),
            Self::Warning { message } => write!(f, "daemon: warning: {message}"),
        }
    }
}

/// What one connection between two applications did.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    /// `initiator` (this end's application connected) or `responder` (it listened).
    pub side: &'static str,
    /// This daemon.
    pub local: String,
    /// When it began, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// The addresses this end offered (its candidates).
    pub offered: Vec<SocketAddr>,
    /// The remote daemon.
    pub peer: String,
    /// The service.
    pub service: String,
    /// The socket's transport.
    pub proto: Proto,
    /// The technique whose socket the application got (`None`: it got none).
    pub technique: Option<Technique>,
    /// Whether that socket is direct.
    pub direct: bool,
    /// From the request (initiator) or the remote's hello (responder) to the socket or the error.
    pub time_to_socket_ms: f64,
    /// Every technique tried, with its timing and result.
    pub tried: Vec<TriedRecord>,
    /// What birthday probing or port prediction did on this end, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub birthday: Option<BirthdayRecord>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ConnectionRecord {
    /// The record of a connection that begins now, on `side`, between `local` and `peer`.
    fn begin(side: &'static str, local: PeerId, peer: PeerId, service: &str, proto: Proto) -> Self {
        Self {
            side,
            local: local.to_string(),
            started_unix_ms: unix_ms(),
            offered: Vec::new(),
            peer: peer.to_string(),
            service: service.to_owned(),
            proto,
            technique: None,
            direct: false,
            time_to_socket_ms: 0.0,
            tried: Vec::new(),
            birthday: None,
            error: None,
        }
    }
}

/// What birthday probing (with port prediction first, where the hard side's NAT allocates
/// sequentially) did on one end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BirthdayRecord {
    /// `easy` (this end probed) or `hard` (this end opened the sockets).
    pub role: &'static str,
    /// Sockets opened (hard side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockets: Option<usize>,
    /// Probes sent (easy side), or the number of the probe that got through (hard side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<usize>,
    /// The easy side probed a predicted window first.
    pub predicted: bool,
    /// The port that answered was in the predicted window.
    pub predicted_hit: bool,
    /// `ok`, or why not.
    pub result: String,
}

impl fmt::Display for BirthdayRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} side", self.role)?;
        if let Some(n) = self.sockets {
            write!(f, ", {n} sockets")?;
        }
        match (self.probes, self.role) {
            (Some(n), "hard") => write!(f, ", probe no. {n} got through")?,
            (Some(n), _) => write!(f, ", {n} probes")?,
            (None, _) => {}
        }
        if self.predicted {
            let hit = if self.predicted_hit { "hit" } else { "missed" };
            write!(f, ", prediction {hit}")?;
        }
        write!(f, ": {}", self.result)
    }
}

impl fmt::Display for ConnectionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.proto.as_str();
        write!(f, "{} {proto} {} {}: ", self.side, self.peer, self.service)?;
        match (&self.technique, &self.error) {
            (Some(t), _) => write!(
                f,
                "{} via {} in {:.0} ms",
                if self.direct { "direct" } else { "relayed" },
                technique_name(*t),
                self.time_to_socket_ms
            )?,
            (None, Some(e)) => write!(f, "failed after {:.0} ms: {e}", self.time_to_socket_ms)?,
            (None, None) => write!(f, "no socket")?,
        }
        let tried: Vec<String> = self
            .tried
            .iter()
            .map(|t| format!("{} {}", t.technique, t.result))
            .collect();
        if !tried.is_empty() {
            write!(f, " (tried: {})", tried.join(", "))?;
        }
        if let Some(b) = &self.birthday {
            write!(f, " (birthday: {b})")?;
        }
        Ok(())
    }
}

/// One technique tried, in a [`ConnectionRecord`].
#[derive(Debug, Clone, Serialize)]
pub struct TriedRecord {
    /// The technique.
    pub technique: String,
    /// When it started, after the request.
    pub started_ms: f64,
    /// When it ended (`None`: it ran until the connection was decided).
    pub ended_ms: Option<f64>,
    /// `ok`, `stopped`, `timeout` or the failure.
    pub result: String,
}

impl From<&Tried> for TriedRecord {
    fn from(t: &Tried) -> Self {
        Self {
            technique: technique_name(t.technique).to_owned(),
            started_ms: ms(t.started),
            ended_ms: t.ended.map(ms),
            result: if t.result.is_empty() {
                "running".into()
            } else {
                t.result.clone()
            },
        }
    }
}

/// Now, ms since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A technique's name as the API writes it.
pub fn technique_name(t: Technique) -> &'static str {
    match t {
        Technique::Direct => "direct",
        Technique::Reversal => "reversal",
        Technique::UdpPunch => "udp-punch",
        Technique::TcpSimultaneousOpen => "tcp-simultaneous-open",
        Technique::TcpNutss => "tcp-nutss",
        Technique::UdpBirthday => "udp-birthday",
        Technique::Relay => "relay",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The swarm could not be built.
    #[error("building the libp2p host: {0}")]
    Build(String),
    /// A relay address is unusable.
    #[error("relay address {0}: {1}")]
    RelayAddress(Multiaddr, &'static str),
    /// No relay was given.
    #[error("no relay given: the daemon needs at least one (--relay)")]
    NoRelay,
    /// Listening failed.
    #[error("listening on {0}: {1}")]
    Listen(Multiaddr, String),
    /// The API socket could not be opened.
    #[error(transparent)]
    Socket(#[from] crate::socket::SocketError),
}

/// The daemon's counters, in the registry given to [`Daemon::new`].
#[derive(Debug, Clone)]
struct Metrics {
    connections: Family<Vec<(String, String)>, Counter>,
    failures: Family<Vec<(String, String)>, Counter>,
    time_to_socket: telemetry::metrics::Histograms<Vec<(String, String)>>,
    reservations: Gauge,
    apps: Gauge,
    sessions: Gauge,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let mut r = telemetry::metrics::Registrar::with_prefix(registry, "natpunch_daemon");
        Self {
            connections: r.counters(
                "connections",
                "Sockets handed to applications, by side, transport, technique and directness",
            ),
            failures: r.counters(
                "failures",
                "Connections that ended without a socket, by side",
            ),
            time_to_socket: r.latencies(
                "time_to_socket_seconds",
                "From the request to the socket, by transport and technique",
            ),
            reservations: r.gauge("reservations", "Relay reservations held"),
            apps: r.gauge("applications", "Applications connected to the API socket"),
            sessions: r.gauge("sessions", "Connections being made"),
        }
    }

    fn record(&self, r: &ConnectionRecord) {
        let proto = r.proto.as_str();
        match r.technique {
            Some(t) => {
                let labels = vec![
                    ("side".to_owned(), r.side.to_owned()),
                    ("proto".to_owned(), proto.to_owned()),
                    ("technique".to_owned(), technique_name(t).to_owned()),
                    ("direct".to_owned(), r.direct.to_string()),
                ];
                self.connections.get_or_create(&labels).inc();
                self.time_to_socket
                    .get_or_create(&vec![
                        ("proto".to_owned(), proto.to_owned()),
                        ("technique".to_owned(), technique_name(t).to_owned()),
                    ])
                    .observe(r.time_to_socket_ms / 1000.0);
            }
            None => {
                self.failures
                    .get_or_create(&vec![("side".to_owned(), r.side.to_owned())])
                    .inc();
            }
        }
    }
}

/// Counts one in a gauge while it lives, also when its task is aborted.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the swarm task is asked by the others.
enum Command {
    /// Make sure there is a connection to `peer` (through the relays), then answer.
    Reach {
        peer: PeerId,
        /// Relayed addresses of `peer` to try besides our own relays' (from an offer).
        via: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// `peer` did not answer on its connection: unless it answered a ping lately, drop every
    /// connection to it and answer `true` once none is left (the next `Reach` dials again);
    /// `false` when it is alive (busy, not gone).
    Forget {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
}

/// What every task reads and some update: this end's addresses and reservations.
#[derive(Debug, Default, Clone)]
struct State {
    /// Relay → the relayed address reserved there.
    reservations: HashMap<PeerId, Multiaddr>,
    /// The addresses the relays observed (TCP and QUIC).
    observed: Vec<Multiaddr>,
    /// This host's own addresses (from the listeners).
    local_ips: Vec<Ipv4Addr>,
    /// The libp2p listen ports: TCP, UDP (QUIC).
    tcp_port: Option<u16>,
    udp_port: Option<u16>,
    /// What is known of this end's NAT: what the daemon was told, completed by its own check.
    nat: NatInfo,
    /// The direct port as the router maps it, per transport.
    direct_tcp: Option<SocketAddr>,
    direct_udp: Option<SocketAddr>,
    /// The mappings held, as `natpunch map` prints them.
    mappings: Vec<String>,
    /// What each relay observed of the TCP listen port (the relay's IP address, the
    /// observed address), for the mapping behaviour when nothing better is known.
    relay_observations: Vec<(PeerId, IpAddr, SocketAddr)>,
    /// The mapping behaviour came from the daemon's flags or its RFC 5780 check.
    mapping_measured: bool,
    /// Where the NAT behaviour came from, for `status`.
    nat_source: NatSource,
}

/// Where a daemon's knowledge of its NAT came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct NatSource {
    /// The mapping and filtering: `flags`, `rfc5780` or (mapping only) `relays`.
    pub(crate) behaviour: Option<&'static str>,
    /// The port allocation: `flags` or `rfc5780` (else seen per connection, when it matters).
    pub(crate) ports: Option<&'static str>,
}

impl fmt::Display for NatSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.behaviour {
            Some(source) => write!(f, "behaviour from {source}")?,
            None => f.write_str("behaviour not known yet")?,
        }
        write!(
            f,
            ", port allocation from {}",
            self.ports
                .unwrap_or("two fresh mappings per connection, when the NAT maps per destination")
        )
    }
}

impl State {
    /// The external IPv4 address the relays see.
    fn external_ip(&self) -> Option<Ipv4Addr> {
        self.observed.iter().find_map(|a| match a.iter().next() {
            Some(Protocol::Ip4(ip)) => Some(ip),
            _ => None,
        })
    }

    /// Whether the NAT keeps a connection's port (observed port = listen port), for `udp`
    /// (QUIC) or TCP; `None` when nothing was observed on that transport.
    fn preserves_ports(&self, udp: bool) -> Option<bool> {
        let listen = if udp { self.udp_port } else { self.tcp_port }?;
        self.observed.iter().find_map(|a| {
            let quic = a.iter().any(|p| matches!(p, Protocol::QuicV1));
            if quic != udp {
                return None;
            }
            a.iter().find_map(|p| match p {
                Protocol::Tcp(port) | Protocol::Udp(port) => Some(port == listen),
                _ => None,
            })
        })
    }

    /// The candidates the remote is to use for a technique on local `port`: the external
    /// address with that port, then this host's own addresses (for a remote on the same
    /// network). When the NAT keeps ports (as the relays' observations tell) the external one
    /// is right; when it does not, its address still opens a filter that lets in any port of
    /// it (restricted cone), and the remote's probes carry what the NAT really chose.
    fn candidates_for(&self, port: u16) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        if let Some(ip) = self.external_ip()
            && !self.local_ips.contains(&ip)
        {
            out.push(SocketAddr::new(IpAddr::V4(ip), port));
        }
        for ip in &self.local_ips {
            out.push(SocketAddr::new(IpAddr::V4(*ip), port));
        }
        out.truncate(signal::MAX_CANDIDATES);
        out
    }
}

/// A `listen` request: where to deliver the sockets for a service.
struct Listener {
    app: u64,
    id: String,
    proto: Proto,
    out: mpsc::Sender<app::Outgoing>,
}

/// An `initiate` waiting for the other end's `respond`.
struct PendingOffer {
    app: u64,
    id: String,
    proto: Proto,
    out: mpsc::Sender<app::Outgoing>,
}

/// What the tasks share.
struct Ctx {
    peer_id: PeerId,
    config: DaemonConfig,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    state: Mutex<State>,
    listeners: Mutex<HashMap<String, Vec<Listener>>>,
    /// `initiate` requests by their offer's token.
    offers: Mutex<HashMap<[u8; 16], PendingOffer>>,
    /// Connections waiting for a dial on the direct port.
    waiters: Arc<direct::Waiters>,
    sessions: Arc<Semaphore>,
    events: mpsc::Sender<DaemonEvent>,
    metrics: Metrics,
}

impl Ctx {
    fn state(&self) -> State {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn report(&self, event: DaemonEvent) {
        if let DaemonEvent::Connection(r) = &event {
            self.metrics.record(r);
        }
        // A full queue drops the report, never the daemon's work.
        let _ = self.events.try_send(event);
    }

    /// The techniques this daemon carries out, in the order `status` lists them.
    fn techniques(&self) -> Vec<Technique> {
        let mut t = vec![
            Technique::UdpPunch,
            Technique::UdpBirthday,
            Technique::TcpSimultaneousOpen,
        ];
        if self.config.nutss_ttl.is_some() {
            t.push(Technique::TcpNutss);
        }
        t.push(Technique::Relay);
        t
    }

    /// Where a connection for `service` of `proto` goes: for [`signal::OFFER_SERVICE`], the
    /// `initiate` whose offer holds `token` (taken: an offer is answered once); otherwise a
    /// live listener.
    fn destination(
        &self,
        service: &str,
        proto: Proto,
        token: [u8; 16],
    ) -> Option<(String, mpsc::Sender<app::Outgoing>)> {
        if service != signal::OFFER_SERVICE {
            return self.listener(service, proto);
        }
        let mut offers = self.offers.lock().ok()?;
        offers.retain(|_, o| !o.out.is_closed());
        match offers.get(&token) {
            Some(o) if o.proto == proto => offers.remove(&token).map(|o| (o.id, o.out)),
            _ => None,
        }
    }

    /// The listener that takes `service` connections of `proto`, if one is alive.
    fn listener(
        &self,
        service: &str,
        proto: Proto,
    ) -> Option<(String, mpsc::Sender<app::Outgoing>)> {
        let mut listeners = self.listeners.lock().ok()?;
        let list = listeners.get_mut(service)?;
        list.retain(|l| !l.out.is_closed());
        list.iter()
            .find(|l| l.proto == proto)
            .map(|l| (l.id.clone(), l.out.clone()))
    }
}

/// The swarm's behaviours.
#[derive(NetworkBehaviour)]
struct Behaviour {
    relay_client: relay::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// One relay and what is held on it.
struct RelayState {
    id: PeerId,
    /// Its TCP and QUIC addresses, with `/p2p`.
    addrs: Vec<Multiaddr>,
    connections: Vec<ConnectionId>,
    dialing: usize,
    listener: Option<ListenerId>,
    reserved: Option<Multiaddr>,
    next_dial: Option<Instant>,
    backoff: Duration,
}

/// The connectivity daemon.
pub struct Daemon {
    swarm: Swarm<Behaviour>,
    ctx: Arc<Ctx>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Receiver<DaemonEvent>,
    relays: Vec<RelayState>,
    /// Dials to remote daemons waiting for a connection.
    reaching: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    /// Forgets waiting for a peer's last connection to close.
    forgetting: HashMap<PeerId, Vec<oneshot::Sender<bool>>>,
    /// When each connected peer last answered a ping.
    last_pong: HashMap<PeerId, Instant>,
    api: tokio::net::UnixListener,
    health: telemetry::Health,
}

impl fmt::Debug for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Daemon")
            .field("peer_id", &self.ctx.peer_id)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Builds the daemon (inside a tokio runtime): the libp2p host with `key`, its metrics in
    /// `registry`, and the API socket, bound now.
    ///
    /// # Errors
    ///
    /// No relay or an unusable relay address, the host, listening, or the API socket.
    pub fn new(
        key: Keypair,
        config: DaemonConfig,
        registry: &mut Registry,
    ) -> Result<Self, DaemonError> {
        let relays = relay_states(&config.relays)?;
        let peer_id = key.public().to_peer_id();
        let mut swarm = build_swarm(key)?;
        for a in [
            Multiaddr::from(config.listen_ip).with(Protocol::Tcp(0)),
            Multiaddr::from(config.listen_ip)
                .with(Protocol::Udp(0))
                .with(Protocol::QuicV1),
        ] {
            swarm
                .listen_on(a.clone())
                .map_err(|e| DaemonError::Listen(a, e.to_string()))?;
        }
        let api = crate::socket::bind(&config.socket)?;
        let control = swarm.behaviour().stream.new_control();
        let (commands_tx, commands) = mpsc::channel(64);
        let (events_tx, events) = mpsc::channel(256);
        let told = config.nat;
        let ctx = Arc::new(Ctx {
            peer_id,
            config,
            control,
            commands: commands_tx,
            state: Mutex::new(State {
                nat: told,
                mapping_measured: told.mapping.is_some(),
                nat_source: NatSource {
                    behaviour: (told.mapping.is_some() || told.filtering.is_some())
                        .then_some("flags"),
                    ports: told.port_allocation.is_some().then_some("flags"),
                },
                ..State::default()
            }),
            listeners: Mutex::new(HashMap::new()),
            offers: Mutex::new(HashMap::new()),
            waiters: Arc::new(direct::Waiters::default()),
            sessions: Arc::new(Semaphore::new(MAX_SESSIONS)),
            events: events_tx,
            metrics: Metrics::new(registry),
        });
        Ok(Self {
            swarm,
            ctx,
            commands,
            events,
            relays,
            reaching: HashMap::new(),
            forgetting: HashMap::new(),
            last_pong: HashMap::new(),
            api,
            health: telemetry::Health::default(),
        })
    }

    /// This daemon's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.ctx.peer_id
    }

    /// What `/health` answers: a problem while no relay reservation is held.
    pub fn health(&self) -> telemetry::Health {
        self.health.clone()
    }

    /// Serves until `stop` completes, reporting to `report`.
    pub async fn run(
        &mut self,
        stop: impl Future<Output = ()>,
        report: &mut impl FnMut(DaemonEvent),
    ) {
        tokio::pin!(stop);
        report(DaemonEvent::Started {
            peer_id: self.ctx.peer_id.to_string(),
            socket: self.ctx.config.socket.display().to_string(),
        });
        let mut incoming = match self.ctx.control.clone().accept(signal::PROTOCOL) {
            Ok(incoming) => incoming,
            Err(e) => {
                report(DaemonEvent::Warning {
                    message: format!("cannot accept {}: {e}", signal::PROTOCOL),
                });
                return;
            }
        };
        // The other daemons' streams are taken by a task of their own, as fast as they come:
        // libp2p hands them over one at a time and drops what is not taken at once.
        let ctx = Arc::clone(&self.ctx);
        let accepting = tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let Ok(permit) = Arc::clone(&ctx.sessions).try_acquire_owned() else {
                    continue;
                };
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    let _counted = Counted::new(&ctx.metrics.sessions);
                    session::respond(Arc::clone(&ctx), peer, stream).await;
                    drop(permit);
                });
            }
        });
        self.count_reservations();
        self.check_nat();
        let apps = Arc::new(Semaphore::new(MAX_APPS));
        let mut next_app = 0u64;
        for r in &mut self.relays {
            r.next_dial = Some(Instant::now());
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut mapping_started = self.map_direct_port(report);
        let mut mapping: Option<PortMapping> = None;
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(started) = async {
                    match mapping_started.as_mut() {
                        Some(rx) => rx.await.ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    mapping_started = None;
                    match started {
                        Ok(m) => {
                            mapping = Some(m);
                            self.on_mappings(mapping.as_mut(), report);
                        }
                        Err(e) => report(DaemonEvent::Warning {
                            message: format!("no direct port: {e}"),
                        }),
                    }
                }
                event = mapping_event(mapping.as_mut()) => {
                    if let MappingEvent::Changed = event {
                        self.on_mappings(mapping.as_mut(), report);
                    }
                }
                event = self.swarm.select_next_some() => self.on_swarm(event, report),
                Some(command) = self.commands.recv() => self.on_command(command),
                Some(event) = self.events.recv() => report(event),
                accepted = self.api.accept() => match accepted {
                    Ok((conn, _)) => match apps.clone().try_acquire_owned() {
                        Ok(permit) => {
                            next_app += 1;
                            let ctx = self.ctx.clone();
                            let id = next_app;
                            tokio::spawn(async move {
                                let _counted = Counted::new(&ctx.metrics.apps);
                                app::serve(ctx.clone(), id, conn).await;
                                drop(permit);
                            });
                        }
                        // Beyond the limit the connection is closed at once.
                        Err(_) => drop(conn),
                    },
                    // EMFILE and the like: wait rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                _ = tick.tick() => self.tick(),
            }
        }
        accepting.abort();
        if let Some(m) = mapping {
            m.release().await;
        }
    }

    /// Binds the direct port and starts mapping it on the router, in the background; the
    /// mapping holder comes on the returned channel.
    fn map_direct_port(
        &self,
        report: &mut impl FnMut(DaemonEvent),
    ) -> Option<oneshot::Receiver<Result<PortMapping, String>>> {
        if !self.ctx.config.port_mapping {
            return None;
        }
        let port = match direct::DirectPort::bind() {
            Ok(port) => port,
            Err(e) => {
                report(DaemonEvent::Warning {
                    message: format!("no direct port: binding one: {e}"),
                });
                return None;
            }
        };
        let number = port.port;
        tokio::spawn(port.serve(Arc::clone(&self.ctx.waiters)));
        let wants = [portmap::Protocol::Tcp, portmap::Protocol::Udp]
            .into_iter()
            .map(|protocol| portmap::keeper::Want {
                protocol,
                internal_port: number,
                external_port: None,
                lifetime: p2p::peer::defaults::PORT_MAPPING_LIFETIME,
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let started = PortMapping::start(
                wants,
                p2p::peer::defaults::PORT_MAPPING_CHECK,
                p2p::peer::defaults::PORT_MAPPING_WAIT,
            )
            .await;
            let _ = tx.send(started);
        });
        Some(rx)
    }

    /// The mappings changed: the direct addresses offered from now on.
    fn on_mappings(&self, mapping: Option<&mut PortMapping>, report: &mut impl FnMut(DaemonEvent)) {
        let Some(mapping) = mapping else {
            return;
        };
        let _ = mapping.update();
        let offered = mapping.offered();
        let find = |protocol: &str| {
            offered
                .iter()
                .find(|(m, _)| m.protocol == protocol)
                .and_then(|(_, a)| ip_port(a))
                .map(|(ip, port)| SocketAddr::new(ip, port))
        };
        let held: Vec<String> = offered.iter().map(|(m, _)| m.to_string()).collect();
        let (tcp, udp) = (find("tcp"), find("udp"));
        let changed = self.update_state(|s| {
            let changed = s.mappings != held;
            s.direct_tcp = tcp;
            s.direct_udp = udp;
            s.mappings.clone_from(&held);
            changed
        });
        if changed {
            report(DaemonEvent::Mappings { held });
        }
    }

    /// Unless told both, learns how this end's NAT maps and filters from the RFC 5780 server
    /// named for it (`--stun-server`; a relay's plain reflector cannot tell, so it is not
    /// asked), in the background; what it learns goes into the hellos and the plans from then
    /// on.
    fn check_nat(&self) {
        let told = self.ctx.config.nat;
        let Some(server) = self.ctx.config.nat_check else {
            return;
        };
        if told.mapping.is_some() && told.filtering.is_some() {
            return;
        }
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let options = natcheck::CheckOptions::new(server);
            let (report, problem) = match natcheck::check(&options, &|_| {}).await {
                Ok(report) => {
                    let problem = (!report.rfc5780).then(|| {
                        "the server does not support RFC 5780 (no OTHER-ADDRESS)".to_owned()
                    });
                    (Some(report), problem)
                }
                Err(e) => (None, Some(e.to_string())),
            };
            let mapping = report.as_ref().and_then(|r| r.mapping);
            let filtering = report.as_ref().and_then(|r| r.filtering);
            let allocation = report.as_ref().and_then(|r| r.port_allocation);
            let delta = report.as_ref().and_then(|r| r.port_delta);
            if let Ok(mut s) = ctx.state.lock() {
                if mapping.is_some() {
                    s.mapping_measured = true;
                }
                s.nat.mapping = told.mapping.or(mapping).or(s.nat.mapping);
                s.nat.filtering = told.filtering.or(filtering);
                if told.port_allocation.is_none() {
                    s.nat.port_allocation = allocation;
                    s.nat.port_delta = delta;
                    if allocation.is_some() {
                        s.nat_source.ports = Some("rfc5780");
                    }
                }
                if (told.mapping.is_none() && mapping.is_some())
                    || (told.filtering.is_none() && filtering.is_some())
                {
                    s.nat_source.behaviour = Some("rfc5780");
                }
            }
            ctx.report(DaemonEvent::Nat {
                server: server.to_string(),
                mapping,
                filtering,
                port_allocation: allocation,
                problem,
            });
        });
    }

    fn tick(&mut self) {
        let now = Instant::now();
        // Relays are dialled from the listen ports (port reuse), once both are known: what
        // the relays observe is then the NAT's mapping of those ports.
        let listening = self.update_state(|s| s.tcp_port.is_some() && s.udp_port.is_some());
        if !listening {
            return;
        }
        for r in &mut self.relays {
            if r.connections.is_empty() && r.dialing == 0 && r.next_dial.is_some_and(|t| t <= now) {
                r.next_dial = None;
                for addr in &r.addrs {
                    let opts = DialOpts::peer_id(r.id)
                        .addresses(vec![addr.clone()])
                        .condition(PeerCondition::Always)
                        .build();
                    if self.swarm.dial(opts).is_ok() {
                        r.dialing += 1;
                    }
                }
                if r.dialing == 0 {
                    r.next_dial = Some(now + r.backoff);
                    r.backoff = (r.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Forget { peer, reply } => {
                if self
                    .last_pong
                    .get(&peer)
                    .is_some_and(|t| t.elapsed() < ALIVE)
                {
                    let _ = reply.send(false);
                    return;
                }
                if !self.swarm.is_connected(&peer) {
                    let _ = reply.send(true);
                    return;
                }
                let waiting = self.forgetting.entry(peer).or_default();
                if waiting.len() < MAX_SESSIONS {
                    waiting.push(reply);
                }
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Reach { peer, via, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let mut addrs: Vec<Multiaddr> = self
                    .relays
                    .iter()
                    .filter(|r| r.reserved.is_some() || !r.connections.is_empty())
                    .filter_map(|r| r.addrs.first())
                    .map(|a| {
                        a.clone()
                            .with(Protocol::P2pCircuit)
                            .with(Protocol::P2p(peer))
                    })
                    .collect();
                for a in via.into_iter().take(signal::MAX_CANDIDATES) {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                if addrs.is_empty() {
                    let _ = reply.send(Err("no relay is connected".into()));
                    return;
                }
                let waiting = self.reaching.entry(peer).or_default();
                if waiting.len() >= MAX_SESSIONS {
                    let _ = reply.send(Err("too many connections to this peer at once".into()));
                    return;
                }
                let first = waiting.is_empty();
                waiting.push(reply);
                if first {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        self.reached(peer, Err(e.to_string()));
                    }
                }
            }
        }
    }

    fn reached(&mut self, peer: PeerId, result: Result<(), String>) {
        for reply in self.reaching.remove(&peer).unwrap_or_default() {
            let _ = reply.send(result.clone());
        }
    }

    fn relay_mut(&mut self, peer: &PeerId) -> Option<&mut RelayState> {
        self.relays.iter_mut().find(|r| r.id == *peer)
    }

    fn on_swarm(
        &mut self,
        event: SwarmEvent<BehaviourEvent>,
        report: &mut impl FnMut(DaemonEvent),
    ) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if let Some(r) = self
                    .relays
                    .iter_mut()
                    .find(|r| r.listener == Some(listener_id))
                {
                    // One event per reservation, not per relayed address.
                    if r.reserved.replace(address.clone()).is_none() {
                        report(DaemonEvent::Reserved {
                            relay: r.id.to_string(),
                            address: address.to_string(),
                        });
                    }
                    r.backoff = Duration::from_secs(1);
                    let id = r.id;
                    self.update_state(|s| {
                        s.reservations.entry(id).or_insert(address);
                    });
                    self.count_reservations();
                    return;
                }
                let mut it = address.iter();
                if let (Some(Protocol::Ip4(ip)), Some(p)) = (it.next(), it.next())
                    && !ip.is_loopback()
                {
                    self.update_state(|s| {
                        if !s.local_ips.contains(&ip) {
                            s.local_ips.push(ip);
                        }
                        match p {
                            Protocol::Tcp(port) => s.tcp_port = Some(port),
                            Protocol::Udp(port) => s.udp_port = Some(port),
                            _ => {}
                        }
                    });
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(r) = self
                    .relays
                    .iter_mut()
                    .find(|r| r.listener == Some(listener_id))
                {
                    r.listener = None;
                    r.reserved = None;
                    let id = r.id;
                    report(DaemonEvent::RelayLost {
                        relay: id.to_string(),
                        reason: match reason {
                            Ok(()) => "the reservation ended".into(),
                            Err(e) => format!("the reservation failed: {e}"),
                        },
                    });
                    self.update_state(|s| {
                        s.reservations.remove(&id);
                    });
                    self.count_reservations();
                    self.reserve(id);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                ..
            } => {
                if let Some(r) = self.relay_mut(&peer_id) {
                    r.dialing = r.dialing.saturating_sub(1);
                    r.connections.push(connection_id);
                } else {
                    self.reached(peer_id, Ok(()));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                if let Some(r) = self.relay_mut(&peer) {
                    r.dialing = r.dialing.saturating_sub(1);
                    if r.dialing == 0 && r.connections.is_empty() {
                        r.next_dial = Some(Instant::now() + r.backoff);
                        r.backoff = (r.backoff * 2).min(MAX_BACKOFF);
                        report(DaemonEvent::RelayLost {
                            relay: peer.to_string(),
                            reason: format!("dialing it failed: {error}"),
                        });
                    }
                } else if !self.swarm.is_connected(&peer) {
                    self.reached(peer, Err(error.to_string()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    self.last_pong.remove(&peer_id);
                    for reply in self.forgetting.remove(&peer_id).unwrap_or_default() {
                        let _ = reply.send(true);
                    }
                }
                if let Some(r) = self.relay_mut(&peer_id) {
                    r.connections.retain(|c| *c != connection_id);
                    // One transport's connection died (a new external address, say; QUIC may
                    // migrate and live on): start over on every transport, so that what the
                    // relay observes is learnt again.
                    let others = r.connections.clone();
                    for c in others {
                        self.swarm.close_connection(c);
                    }
                    let Some(r) = self.relay_mut(&peer_id) else {
                        return;
                    };
                    if r.connections.is_empty() {
                        r.next_dial = Some(Instant::now());
                        // What it observed may be an old address: learn it again.
                        self.update_state(|s| s.observed.clear());
                        report(DaemonEvent::RelayLost {
                            relay: peer_id.to_string(),
                            reason: cause.map_or_else(
                                || "the connection closed".to_owned(),
                                |e| format!("the connection closed: {e}"),
                            ),
                        });
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if self.relay_mut(&peer_id).is_none() {
                    return;
                }
                let observed = info.observed_addr;
                let quic = observed.iter().any(|p| matches!(p, Protocol::QuicV1));
                let relay_ip = self
                    .relay_mut(&peer_id)
                    .and_then(|r| r.addrs.first())
                    .and_then(|a| ip_port(a).map(|(ip, _)| ip));
                let changed = self.update_state(|s| {
                    let before = s.observed.clone();
                    s.observed
                        .retain(|a| a.iter().any(|p| matches!(p, Protocol::QuicV1)) != quic);
                    s.observed.push(observed.clone());
                    s.observed.sort();
                    if let (false, Some(relay_ip), Some((ip, port))) =
                        (quic, relay_ip, ip_port(&observed))
                    {
                        s.relay_observations.retain(|(r, _, _)| *r != peer_id);
                        s.relay_observations
                            .push((peer_id, relay_ip, SocketAddr::new(ip, port)));
                        if !s.mapping_measured {
                            s.nat.mapping =
                                infer_mapping(&s.relay_observations, &s.local_ips, s.tcp_port);
                            s.nat_source.behaviour = s.nat.mapping.map(|_| "relays");
                        }
                    }
                    before != s.observed
                });
                if changed {
                    report(DaemonEvent::RelayConnected {
                        relay: peer_id.to_string(),
                        observed: observed.to_string(),
                    });
                }
                self.reserve(peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(_),
                ..
            })) => {
                self.last_pong.insert(peer, Instant::now());
            }
            // A relay that stopped answering (a new external address, a dead path): drop the
            // connection, which dials it again.
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(_),
            })) if self.relay_mut(&peer).is_some() => {
                self.swarm.close_connection(connection);
            }
            _ => {}
        }
    }

    /// Asks for a reservation on relay `id`, unless one is held or asked for.
    fn reserve(&mut self, id: PeerId) {
        let Some(r) = self.relays.iter().find(|r| r.id == id) else {
            return;
        };
        if r.listener.is_some() || r.connections.is_empty() {
            return;
        }
        let Some(addr) = r.addrs.first().cloned() else {
            return;
        };
        let circuit = addr.with(Protocol::P2pCircuit);
        if let Ok(listener) = self.swarm.listen_on(circuit)
            && let Some(r) = self.relay_mut(&id)
        {
            r.listener = Some(listener);
        }
    }

    /// The reservations held now, in the gauge and in `/health`.
    fn count_reservations(&self) {
        let held = self.relays.iter().filter(|r| r.reserved.is_some()).count();
        self.ctx
            .metrics
            .reservations
            .set(i64::try_from(held).unwrap_or(i64::MAX));
        self.health
            .set((held == 0).then(|| "no relay reservation is held".to_owned()));
    }

    fn update_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        match self.ctx.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

/// The IP address and port of `addr`.
fn ip_port(addr: &Multiaddr) -> Option<(IpAddr, u16)> {
    let mut it = addr.iter();
    let ip = match it.next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    match it.next()? {
        Protocol::Tcp(port) | Protocol::Udp(port) => Some((ip, port)),
        _ => None,
    }
}

/// How the NAT maps, from what relays observed of the TCP listen port (every connection to
/// them leaves from it): the host's own address and port mean no NAT; the same external
/// address towards relays at two or more addresses means endpoint-independent mapping, and
/// different ones a mapping per destination (which of address- or port-dependent is not
/// told, so the stricter). One relay behind a NAT tells nothing.
fn infer_mapping(
    observations: &[(PeerId, IpAddr, SocketAddr)],
    local_ips: &[Ipv4Addr],
    listen_port: Option<u16>,
) -> Option<Mapping> {
    let first = observations.first()?.2;
    let own = |a: &SocketAddr| {
        matches!(a.ip(), IpAddr::V4(ip) if local_ips.contains(&ip)) && Some(a.port()) == listen_port
    };
    if observations.iter().all(|(_, _, a)| own(a)) {
        return Some(Mapping::None);
    }
    let mut relays: Vec<IpAddr> = observations.iter().map(|(_, ip, _)| *ip).collect();
    relays.sort();
    relays.dedup();
    if relays.len() < 2 {
        return None;
    }
    Some(if observations.iter().all(|(_, _, a)| *a == first) {
        Mapping::EndpointIndependent
    } else {
        Mapping::AddressAndPortDependent
    })
}

/// The mapping holder's next event, or never when there is none. Cancel-safe.
async fn mapping_event(mapping: Option<&mut PortMapping>) -> MappingEvent {
    match mapping {
        Some(m) => m.next_event().await,
        None => std::future::pending().await,
    }
}

fn build_swarm(key: Keypair) -> Result<Swarm<Behaviour>, DaemonError> {
    let build = |e: &dyn fmt::Display| DaemonError::Build(e.to_string());
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| build(&e))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| build(&e))?
        .with_behaviour(|key, relay_client| Behaviour {
            relay_client,
            identify: identify::Behaviour::new(
                identify::Config::new("/natpunch/daemon/1".into(), key.public())
                    .with_agent_version(format!("natpunch-daemon/{}", env!("CARGO_PKG_VERSION"))),
            ),
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(RELAY_PING)
                    .with_timeout(RELAY_PING_TIMEOUT),
            ),
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| build(&e))?
        // Streams are negotiated optimistically: a hello leaves with its protocol's name, a
        // round trip sooner.
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(60))
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build())
}

/// Each relay with its TCP and QUIC addresses (the missing one on the same port).
fn relay_states(relays: &[Multiaddr]) -> Result<Vec<RelayState>, DaemonError> {
    if relays.is_empty() {
        return Err(DaemonError::NoRelay);
    }
    let mut out: Vec<RelayState> = Vec::new();
    for addr in relays {
        let Some(Protocol::P2p(id)) = addr.iter().last() else {
            return Err(DaemonError::RelayAddress(
                addr.clone(),
                "needs /p2p/<relay peer id> at the end",
            ));
        };
        let mut it = addr.iter();
        let ip = it.next().filter(|p| {
            matches!(
                p,
                Protocol::Ip4(_) | Protocol::Ip6(_) | Protocol::Dns(_) | Protocol::Dns4(_)
            )
        });
        let port = addr.iter().find_map(|p| match p {
            Protocol::Tcp(port) | Protocol::Udp(port) => Some(port),
            _ => None,
        });
        let (Some(ip), Some(port)) = (ip, port) else {
            return Err(DaemonError::RelayAddress(
                addr.clone(),
                "needs an IP address (or DNS name) and a port",
            ));
        };
        let tcp = Multiaddr::empty()
            .with(ip.clone())
            .with(Protocol::Tcp(port))
            .with(Protocol::P2p(id));
        let quic = Multiaddr::empty()
            .with(ip)
            .with(Protocol::Udp(port))
            .with(Protocol::QuicV1)
            .with(Protocol::P2p(id));
        if let Some(r) = out.iter_mut().find(|r| r.id == id) {
            for a in [tcp, quic] {
                if !r.addrs.contains(&a) {
                    r.addrs.push(a);
                }
            }
            continue;
        }
        out.push(RelayState {
            id,
            addrs: vec![tcp, quic],
            connections: Vec::new(),
            dialing: 0,
            listener: None,
            reserved: None,
            next_dial: None,
            backoff: Duration::from_secs(1),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_gain_the_other_transport_and_bad_ones_say_why() {
        let id = PeerId::random();
        let tcp: Multiaddr = format!("/ip4/11.0.0.1/tcp/4001/p2p/{id}")
            .parse()
            .expect("addr");
        let r = relay_states(std::slice::from_ref(&tcp)).expect("relay");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].addrs[0], tcp);
        assert_eq!(
            r[0].addrs[1].to_string(),
            format!("/ip4/11.0.0.1/udp/4001/quic-v1/p2p/{id}")
        );
        assert!(matches!(relay_states(&[]), Err(DaemonError::NoRelay)));
        let bare: Multiaddr = "/ip4/11.0.0.1/tcp/4001".parse().expect("addr");
        let e = relay_states(&[bare]).err().expect("refused").to_string();
        assert!(e.contains("/p2p/<relay peer id>"), "{e}");
    }

    #[test]
    fn the_relays_observations_tell_the_mapping_only_when_they_can() {
        let (r1, r2) = (PeerId::random(), PeerId::random());
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let lan = [Ipv4Addr::new(192, 168, 1, 2)];
        // One relay behind a NAT: nothing to compare.
        let one = [(r1, ip("11.0.0.1"), addr("11.0.0.5:4000"))];
        assert_eq!(infer_mapping(&one, &lan, Some(4000)), None);
        assert_eq!(infer_mapping(&[], &lan, Some(4000)), None);
        // Its own address and port, seen from outside: no NAT.
        let public = [Ipv4Addr::new(11, 0, 0, 5)];
        assert_eq!(
            infer_mapping(&one, &public, Some(4000)),
            Some(Mapping::None)
        );
        // Two relays at two addresses, one external endpoint: endpoint-independent.
        let same = [
            (r1, ip("11.0.0.1"), addr("11.0.0.5:4000")),
            (r2, ip("11.0.0.2"), addr("11.0.0.5:4000")),
        ];
        assert_eq!(
            infer_mapping(&same, &lan, Some(4000)),
            Some(Mapping::EndpointIndependent)
        );
        // Two, each seeing another port: a mapping per destination.
        let differ = [
            (r1, ip("11.0.0.1"), addr("11.0.0.5:4000")),
            (r2, ip("11.0.0.2"), addr("11.0.0.5:51000")),
        ];
        assert_eq!(
            infer_mapping(&differ, &lan, Some(4000)),
            Some(Mapping::AddressAndPortDependent)
        );
        // Two relays at one address are one destination: nothing to compare.
        let one_place = [
            (r1, ip("11.0.0.1"), addr("11.0.0.5:4000")),
            (r2, ip("11.0.0.1"), addr("11.0.0.5:51000")),
        ];
        assert_eq!(infer_mapping(&one_place, &lan, Some(4000)), None);
    }

    #[test]
    fn candidates_put_the_external_address_first_and_this_hosts_own_after() {
        let s = State {
            local_ips: vec![Ipv4Addr::new(192, 168, 1, 2)],
            tcp_port: Some(4000),
            udp_port: Some(4000),
            observed: vec!["/ip4/11.0.0.5/tcp/4999".parse().expect("addr")],
            ..State::default()
        };
        assert_eq!(s.preserves_ports(false), Some(false));
        assert_eq!(s.preserves_ports(true), None);
        assert_eq!(
            s.candidates_for(5000),
            [
                "11.0.0.5:5000".parse::<SocketAddr>().expect("addr"),
                "192.168.1.2:5000".parse().expect("addr")
            ]
        );
        // No NAT: the observed address is this host's own, offered once.
        let open = State {
            local_ips: vec![Ipv4Addr::new(11, 0, 0, 5)],
            ..s
        };
        assert_eq!(open.candidates_for(5000).len(), 1);
    }
}

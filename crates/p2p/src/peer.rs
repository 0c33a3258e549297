//! The hole-punching peer: relay reservation or relayed dial, then DCUtR to a direct
//! connection, with a [`Record`] of every hole punch on both sides.
//!
//! Two engines drive the punch:
//! * **natpunch** (the default) speaks the DCUtR wire protocol itself (see [`crate::wire`]), so
//!   it sees every step: the CONNECT round trip, the addresses exchanged, each dial and its
//!   errors, on *both* sides. Its attempts are bounded by `attempt_timeout`, it does not retry
//!   once a direct connection exists, it negotiates its streams optimistically (no round trip
//!   for multistream-select when the protocol is known), and of the two QUIC connections a
//!   simultaneous dial makes it keeps exactly one (the one the relayed connection's dialer made).
//!   Between two natpunch peers the dialer drives the handshake ([`NATPUNCH_DCUTR`]) the moment
//!   its relayed connection is up, half a round trip before the listener could; with any other
//!   peer it is plain DCUtR, the listener driving. Between natpunch peers the second attempt is
//!   reversed (the listener dials as the dialer, the dialer waits), for TCP punches whose
//!   simultaneous open cannot happen.
//! * **stock** is rust-libp2p's `dcutr` behaviour, tracked from the outside through swarm
//!   events, for side-by-side comparisons.
//!
//! The addresses offered in CONNECT are, with `Candidates::Observed`, the addresses the relay
//! observed (identify's `observed_addr`, untouched), or with `Candidates::Stock` identify's
//! candidates, which replace the observed port with the listen port and so point at a port the
//! NAT never mapped when it does not preserve ports.
//!
//! Order of operations (each step waits for the one before): listen on each transport until a
//! non-loopback address is up (TCP port reuse needs it), connect to the relay over each
//! transport, learn the observed addresses from identify, then reserve (listener) or dial
//! through the relay (dialer).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use libp2p::core::ConnectedPoint;
use libp2p::core::Endpoint;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, dcutr, identify, kad, noise, ping, relay,
    tcp, yamux,
};
use serde::Serialize;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::candidates::CandidateFeed;
use crate::record::{Attempt, AttemptOutcome, DialFailure, Outcome, Record, Side};
use crate::relay::{PROTOCOL_VERSION, agent_version};
use crate::wire::{self, HolePunch, Kind};

pub mod defaults;
mod handshakes;
mod mapping;
mod remotes;

use defaults::{MAX_PERF_SINKS, MAX_SESSIONS, MAX_STOCK_CANDIDATES};
use handshakes::{Handshakes, Role};
use mapping::{Change, MappingEvent, PortMapping};
use remotes::{Direct, RemoteEngine, Remotes};

/// The DCUtR protocol.
pub const DCUTR: StreamProtocol = StreamProtocol::new("/libp2p/dcutr");
/// DCUtR with the roles swapped, between natpunch peers: the relayed connection's dialer (A)
/// opens the stream, measures the round trip and sends SYNC the moment its relayed connection
/// is up, which saves the half round trip the listener needs to learn of the connection.
/// The messages are DCUtR's.
pub const NATPUNCH_DCUTR: StreamProtocol = StreamProtocol::new("/natpunch/dcutr/1.0.0");
/// How long a listener waits for a natpunch dialer's stream before it starts DCUtR itself.
const FAST_WAIT: Duration = Duration::from_secs(1);
/// natpunch's throughput protocol: an 8-byte big-endian length, that many bytes, a 1-byte ack.
pub const PERF: StreamProtocol = StreamProtocol::new("/natpunch/perf/1.0.0");
/// The most a throughput test may send.
pub const MAX_PERF_BYTES: u64 = 1 << 30;

/// Which transports to listen, reach the relay and punch with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// TCP only.
    Tcp,
    /// QUIC only.
    Quic,
    /// Both; whichever punches through first wins.
    Both,
}

impl Transport {
    fn tcp(self) -> bool {
        matches!(self, Self::Tcp | Self::Both)
    }

    fn quic(self) -> bool {
        matches!(self, Self::Quic | Self::Both)
    }
}

/// Who drives the hole punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// natpunch's own DCUtR engine.
    Natpunch,
    /// rust-libp2p's `dcutr` behaviour.
    Stock,
}

/// Where the addresses offered in CONNECT come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Candidates {
    /// The addresses the relay observed.
    Observed,
    /// identify's candidates (the observed IP with the listen port).
    Stock,
}

/// What the peer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reserve on the relay and accept hole punches from whoever dials through it.
    Listen,
    /// Dial this peer through the relay and punch once.
    Dial(PeerId),
}

/// How to run a peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The relay's addresses, with `/p2p/<relay>`: one per transport in use (a missing one is
    /// derived from another with the same port).
    pub relays: Vec<Multiaddr>,
    /// Address to listen on.
    pub listen_ip: IpAddr,
    /// Transports.
    pub transport: Transport,
    /// The engine.
    pub engine: Engine,
    /// The candidate source.
    pub candidates: Candidates,
    /// How long one attempt may take from its dial (natpunch engine).
    pub attempt_timeout: Duration,
    /// Attempts before giving up (the spec says 3).
    pub max_attempts: u32,
    /// How long each start-up step (listen, relay, reservation) may take.
    pub setup_timeout: Duration,
    /// How long a dialer stays after its hole punch, so that the listener sees the direct
    /// connection settle too.
    pub linger: Duration,
    /// Hole-punch at all (off: the listener never starts DCUtR, the dialer stays relayed).
    pub punch: bool,
    /// Dialer: after the hole punch, send this many bytes over the connection that is left
    /// (the direct one, the relayed one being closed; or the relayed one without a punch) and
    /// report the throughput. The listener always accepts such transfers.
    pub perf_bytes: Option<u64>,
    /// Map the listen ports on the local router (PCP, NAT-PMP or UPnP IGD, whichever answers)
    /// and offer the mapped addresses first: a peer behind a router that maps ports can be
    /// dialled from anywhere, a symmetric NAT on the other side included. The mappings are held
    /// while the peer runs: renewed at half their lifetime, made again after a router reboot or
    /// a new external address, and the addresses offered follow them.
    pub port_mapping: bool,
    /// The lifetime to ask for the mappings.
    pub port_mapping_lifetime: Duration,
    /// Join a Kademlia DHT as a client once set up (after the reservation, so that peers met
    /// there, a honeypot among them, learn the relayed address from identify).
    pub dht: Option<Dht>,
}

/// A Kademlia DHT to join.
#[derive(Debug, Clone)]
pub struct Dht {
    /// Its protocol name (`/ipfs/kad/1.0.0` is the public IPFS DHT).
    pub protocol: StreamProtocol,
    /// Peers to start from, with `/p2p/<id>`.
    pub bootstrap: Vec<Multiaddr>,
}

impl PeerConfig {
    /// A configuration with natpunch's defaults for `relays`.
    pub fn new(relays: Vec<Multiaddr>) -> Self {
        Self {
            relays,
            listen_ip: IpAddr::from([0, 0, 0, 0]),
            transport: Transport::Both,
            engine: Engine::Natpunch,
            candidates: Candidates::Observed,
            attempt_timeout: Duration::from_secs(3),
            max_attempts: 3,
            setup_timeout: Duration::from_secs(15),
            linger: Duration::from_secs(1),
            punch: true,
            perf_bytes: None,
            port_mapping: false,
            port_mapping_lifetime: defaults::PORT_MAPPING_LIFETIME,
            dht: None,
        }
    }
}

/// What a peer reports.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum PeerEvent {
    /// Connected to the relay; the addresses it observed.
    RelayConnected {
        /// This peer.
        peer_id: String,
        /// The relay.
        relay: String,
        /// The addresses the relay observed, one per transport.
        observed: Vec<String>,
    },
    /// The reservation is up: others reach this peer at `address`.
    Reserved {
        /// The relayed address.
        address: String,
    },
    /// AutoNAT v2 tested an address.
    Reachability {
        /// The address tested.
        address: String,
        /// Whether the server could dial it.
        reachable: bool,
        /// Why not.
        error: Option<String>,
    },
    /// A hole punch ended.
    HolePunch(Box<Record>),
    /// A listen port was mapped on the local router, or its mapping gives a new address: the
    /// address is offered from now on (first, before the observed ones).
    PortMapped {
        /// `pcp`, `nat-pmp` or `upnp`.
        method: String,
        /// The host's address and port.
        internal: String,
        /// The address others reach it at.
        external: String,
        /// The address it replaces (the router's external address or the port changed).
        #[serde(skip_serializing_if = "Option::is_none")]
        previous: Option<String>,
    },
    /// The router lost a mapping (it rebooted, say) and it is not made again yet: its address
    /// is no longer offered.
    PortMapLost {
        /// The host's address and port.
        internal: String,
        /// The address it gave.
        external: String,
    },
    /// What the mapping holder did (as `natpunch map keep --json` prints it): made, renewed,
    /// lost, made again, a new external address, a failed request to be retried.
    PortMapUpdate {
        /// The holder's report.
        update: portmap::hold::Update,
    },
    /// Port mapping did not work (the router maps no ports, or a request failed and is being
    /// retried); the peer goes on without, and offers a mapping once it is made.
    PortMapFailed {
        /// Why.
        error: String,
    },
    /// A throughput test over the connection left after the hole punch.
    Throughput {
        /// `direct` or `relayed`.
        connection: String,
        /// Bytes sent.
        bytes: u64,
        /// Seconds from the first byte to the ack.
        secs: f64,
        /// Megabits per second.
        mbit_s: f64,
    },
}

/// Why the peer stopped.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The swarm could not be built.
    #[error("building the peer: {0}")]
    Build(String),
    /// A relay address is unusable.
    #[error("relay address {0}: {1}")]
    RelayAddress(Multiaddr, String),
    /// A start-up step failed.
    #[error("{0}")]
    Setup(String),
}

/// The peer's behaviours.
#[derive(NetworkBehaviour)]
#[expect(
    missing_debug_implementations,
    reason = "libp2p's behaviours do not implement Debug"
)]
pub struct PeerBehaviour {
    relay_client: relay::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    autonat: autonat::v2::client::Behaviour,
    stream: libp2p_stream::Behaviour,
    dcutr: Toggle<dcutr::Behaviour>,
    feed: CandidateFeed,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
}

/// A message from a handshake task to the event loop.
#[derive(Debug)]
enum Step {
    /// The handshake is done: dial now.
    Dial {
        peer: PeerId,
        remote: Vec<Multiaddr>,
        rtt: Option<Duration>,
        reversed: bool,
    },
    /// The handshake failed.
    Failed {
        peer: PeerId,
        error: String,
        timeout: bool,
        /// The remote does not speak the protocol (no attempt was made).
        unsupported: bool,
    },
}

/// One hole punch in progress.
#[derive(Debug)]
struct Session {
    side: Side,
    relayed_at: Instant,
    started_unix_ms: u64,
    attempts: Vec<Attempt>,
    /// The dial of the current attempt, and its attempt index.
    dial: Option<(ConnectionId, usize)>,
    /// A reversed attempt this side only waits in (no dial of its own): its index.
    awaiting: Option<usize>,
    /// When the current attempt gives up.
    attempt_deadline: Option<Instant>,
    /// When the session gives up waiting (dialer: for the next stream).
    deadline: Instant,
    /// A handshake task is running.
    handshaking: bool,
    /// The side that opens the handshake streams and retries: the listener with DCUtR, the
    /// dialer with natpunch's protocol.
    driver: Side,
    /// Listener: when to start DCUtR if no natpunch dialer has started first.
    spec_start_at: Option<Instant>,
    /// The first direct connection.
    direct: Option<(ConnectionId, Instant)>,
    transport: Option<String>,
    dialed_by: Option<String>,
    relay_rtt: Option<Duration>,
    direct_rtt: Option<Duration>,
    /// After a success: the record closes at the first direct ping or at this time.
    close_by: Option<Instant>,
    local_addrs: Vec<String>,
    remote_addrs: Vec<String>,
    result: Option<(Outcome, Option<String>)>,
}

impl Session {
    fn new(side: Side, wait: Duration) -> Self {
        let now = Instant::now();
        Self {
            side,
            relayed_at: now,
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            attempts: Vec::new(),
            dial: None,
            awaiting: None,
            attempt_deadline: None,
            deadline: now + wait,
            handshaking: false,
            driver: Side::Listener,
            spec_start_at: None,
            direct: None,
            transport: None,
            dialed_by: None,
            relay_rtt: None,
            direct_rtt: None,
            close_by: None,
            local_addrs: Vec::new(),
            remote_addrs: Vec::new(),
            result: None,
        }
    }

    fn ms(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.relayed_at).as_secs_f64() * 1000.0
    }

    /// The attempt in progress (dialing or waiting).
    fn current(&self) -> Option<usize> {
        self.dial.map(|(_, i)| i).or(self.awaiting)
    }

    fn start_attempt(&mut self, rtt: Option<Duration>) -> usize {
        let number = u32::try_from(self.attempts.len() + 1).unwrap_or(u32::MAX);
        self.attempts.push(Attempt {
            number,
            started_ms: self.ms(Instant::now()),
            rtt_ms: rtt.map(|r| r.as_secs_f64() * 1000.0),
            reversed: false,
            dialed_ms: None,
            dialed: Vec::new(),
            remote_addrs: Vec::new(),
            outcome: AttemptOutcome::Unknown,
            error: None,
            dial_errors: Vec::new(),
            ended_ms: 0.0,
        });
        self.attempts.len() - 1
    }

    fn end_attempt(&mut self, index: usize, outcome: AttemptOutcome, error: Option<String>) {
        let now = self.ms(Instant::now());
        if let Some(a) = self.attempts.get_mut(index)
            && a.outcome == AttemptOutcome::Unknown
        {
            a.outcome = outcome;
            a.error = error;
            a.ended_ms = now;
        }
        if self.dial.is_some_and(|(_, i)| i == index) || self.awaiting == Some(index) {
            self.dial = None;
            self.awaiting = None;
            self.attempt_deadline = None;
        }
    }

    fn record(&self, me: PeerId, remote: PeerId, relay: PeerId, config: &PeerConfig) -> Record {
        let (outcome, error) = self.result.clone().unwrap_or((Outcome::Unknown, None));
        let mut attempts = self.attempts.clone();
        let end = self.ms(Instant::now());
        for a in &mut attempts {
            if a.outcome == AttemptOutcome::Unknown {
                a.outcome = AttemptOutcome::Cancelled;
                a.ended_ms = end;
            }
        }
        Record {
            side: self.side,
            engine: format!("{:?}", config.engine).to_lowercase(),
            candidates: format!("{:?}", config.candidates).to_lowercase(),
            local_peer: me.to_string(),
            remote_peer: remote.to_string(),
            relay: relay.to_string(),
            started_unix_ms: self.started_unix_ms,
            outcome,
            transport: self.transport.clone(),
            dialed_by: self.dialed_by.clone(),
            time_to_direct_ms: self.direct.map(|(_, at)| self.ms(at)),
            to_relay_rtt_ms: None,
            relay_rtt_ms: self.relay_rtt.map(|d| d.as_secs_f64() * 1000.0),
            direct_rtt_ms: self.direct_rtt.map(|d| d.as_secs_f64() * 1000.0),
            local_addrs: self.local_addrs.clone(),
            remote_addrs: self.remote_addrs.clone(),
            attempts,
            direct_connections: 0,
            error,
            ended_ms: end,
        }
    }
}

/// A hole-punching peer.
pub struct Peer {
    swarm: Swarm<PeerBehaviour>,
    config: PeerConfig,
    relay: PeerId,
    relay_addrs: Vec<Multiaddr>,
    control: libp2p_stream::Control,
    /// The handshake tasks: per session at most one driving and one answering.
    handshakes: Handshakes,
    /// Throughput tests being received, at most [`MAX_PERF_SINKS`].
    perf_sinks: JoinSet<()>,
    /// Observed addresses, from identify on the relay connections.
    observed: Vec<Multiaddr>,
    /// identify's candidates (stock).
    stock_candidates: Vec<Multiaddr>,
    /// At most [`MAX_SESSIONS`].
    sessions: HashMap<PeerId, Session>,
    /// The remotes connected now: which side of the relayed connection we are, their direct
    /// connections, their engine.
    remotes: Remotes,
    /// Relayed dials in flight (dial mode).
    relayed: HashMap<ConnectionId, PeerId>,
    /// Relayed connections up.
    relayed_conns: HashMap<ConnectionId, PeerId>,
    /// The first ping to the relay itself.
    to_relay_rtt: Option<Duration>,
    /// The listen ports' mappings on the local router, held while the peer runs.
    mapping: Option<PortMapping>,
}

/// How much state a peer holds, for tests and debugging: everything fed by the network is
/// bounded (see [`defaults`]) and returns to zero once the remotes are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerStats {
    /// Hole punches in progress.
    pub sessions: usize,
    /// Remotes whose state is kept (the ones connected now).
    pub remotes: usize,
    /// Remotes not tracked because [`defaults::MAX_REMOTES`] were.
    pub remotes_refused: u64,
    /// Handshake tasks running.
    pub handshakes: usize,
    /// Throughput tests being received.
    pub perf_sinks: usize,
    /// Relayed dials in flight and relayed connections up.
    pub relayed: usize,
    /// identify's candidates kept.
    pub stock_candidates: usize,
    /// Mapping-holder reports dropped because the peer did not read them in time.
    pub port_map_reports_dropped: u64,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("peer_id", self.swarm.local_peer_id())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The relay address for each transport in use.
fn relay_addrs(config: &PeerConfig) -> Result<(PeerId, Vec<Multiaddr>), PeerError> {
    let first = config
        .relays
        .first()
        .ok_or_else(|| PeerError::Setup("no relay address given".into()))?;
    let Some(Protocol::P2p(relay)) = first.iter().last() else {
        return Err(PeerError::RelayAddress(
            first.clone(),
            "needs /p2p/<relay peer id> at the end".into(),
        ));
    };
    let is_quic = |a: &Multiaddr| a.iter().any(|p| matches!(p, Protocol::QuicV1));
    let mut out = Vec::new();
    let port_of = |a: &Multiaddr| {
        a.iter().find_map(|p| match p {
            Protocol::Tcp(port) | Protocol::Udp(port) => Some(port),
            _ => None,
        })
    };
    let ip_of = |a: &Multiaddr| -> Option<Protocol<'static>> {
        a.iter()
            .find(|p| matches!(p, Protocol::Ip4(_) | Protocol::Ip6(_) | Protocol::Dns(_)))
            .map(|p| p.acquire())
    };
    let derive = |quic: bool| -> Result<Multiaddr, PeerError> {
        let base = first;
        let ip = ip_of(base)
            .ok_or_else(|| PeerError::RelayAddress(base.clone(), "no IP address".into()))?;
        let port =
            port_of(base).ok_or_else(|| PeerError::RelayAddress(base.clone(), "no port".into()))?;
        let mut a = Multiaddr::empty().with(ip);
        a = if quic {
            a.with(Protocol::Udp(port)).with(Protocol::QuicV1)
        } else {
            a.with(Protocol::Tcp(port))
        };
        Ok(a.with(Protocol::P2p(relay)))
    };
    for quic in [false, true] {
        let wanted = if quic {
            config.transport.quic()
        } else {
            config.transport.tcp()
        };
        if !wanted {
            continue;
        }
        match config.relays.iter().find(|a| is_quic(a) == quic) {
            Some(a) => out.push(a.clone()),
            None => out.push(derive(quic)?),
        }
    }
    Ok((relay, out))
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

fn endpoint_relayed(e: &ConnectedPoint) -> bool {
    match e {
        ConnectedPoint::Dialer { address, .. } => is_relayed(address),
        ConnectedPoint::Listener { local_addr, .. } => is_relayed(local_addr),
    }
}

fn transport_of(addr: &Multiaddr) -> &'static str {
    if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
        "quic"
    } else {
        "tcp"
    }
}

fn remote_addr(e: &ConnectedPoint) -> &Multiaddr {
    match e {
        ConnectedPoint::Dialer { address, .. } => address,
        ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
    }
}

/// Whether the relayed connection's dialer (A) made this direct connection.
fn made_by_a(side: Side, e: &ConnectedPoint) -> bool {
    match (side, e) {
        (Side::Dialer, ConnectedPoint::Dialer { role_override, .. }) => {
            *role_override == Endpoint::Dialer
        }
        (Side::Dialer, ConnectedPoint::Listener { .. }) => false,
        (Side::Listener, ConnectedPoint::Listener { .. }) => true,
        (Side::Listener, ConnectedPoint::Dialer { .. }) => false,
    }
}

/// The address without a trailing `/p2p/…`.
fn without_p2p(mut a: Multiaddr) -> Multiaddr {
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// A direct, dialable IP address (not relayed, not loopback, not unspecified).
fn dialable(a: &Multiaddr) -> bool {
    let ip_ok = a.iter().any(|p| match p {
        Protocol::Ip4(ip) => !ip.is_loopback() && !ip.is_unspecified(),
        Protocol::Ip6(ip) => !ip.is_loopback() && !ip.is_unspecified(),
        _ => false,
    });
    ip_ok && !is_relayed(a)
}

impl Peer {
    /// Builds the peer (inside a tokio runtime).
    pub fn new(key: Keypair, config: PeerConfig) -> Result<Self, PeerError> {
        let (relay, relay_addrs) = relay_addrs(&config)?;
        let build = |e: &dyn fmt::Display| PeerError::Build(e.to_string());
        let stock = config.engine == Engine::Stock;
        let mut quic = libp2p::quic::Config::new(&key);
        quic.handshake_timeout = if stock {
            quic.handshake_timeout
        } else {
            config.attempt_timeout
        };
        let connection_timeout = if stock {
            Duration::from_secs(10)
        } else {
            config.attempt_timeout + Duration::from_secs(1)
        };
        let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| build(&e))?
            .with_quic_config(|_| quic)
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| build(&e))?
            .with_behaviour(|key, relay_client| PeerBehaviour {
                relay_client,
                identify: identify::Behaviour::new(
                    identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                        .with_agent_version(agent_version()),
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                // Probe soon after start (the default waits 5 s between probes), so that
                // reachability is reported while the peer starts up.
                autonat: autonat::v2::client::Behaviour::new(
                    rand::make_rng::<rand::rngs::StdRng>(),
                    autonat::v2::client::Config::default()
                        .with_probe_interval(Duration::from_secs(1)),
                ),
                stream: libp2p_stream::Behaviour::new(),
                dcutr: Toggle::from(
                    stock.then(|| dcutr::Behaviour::new(key.public().to_peer_id())),
                ),
                feed: CandidateFeed::default(),
                kad: Toggle::from(config.dht.as_ref().map(|d| {
                    let peer = key.public().to_peer_id();
                    let mut kad = kad::Behaviour::with_config(
                        peer,
                        kad::store::MemoryStore::new(peer),
                        kad::Config::new(d.protocol.clone()),
                    );
                    kad.set_mode(Some(kad::Mode::Client));
                    kad
                })),
            })
            .map_err(|e| build(&e))?
            .with_swarm_config(|c| {
                let c = c.with_idle_connection_timeout(Duration::from_secs(60));
                if stock {
                    c
                } else {
                    c.with_substream_upgrade_protocol_override(Version::V1Lazy)
                }
            })
            .with_connection_timeout(connection_timeout)
            .build();
        let control = swarm.behaviour().stream.new_control();
        Ok(Self {
            swarm,
            config,
            relay,
            relay_addrs,
            control,
            handshakes: Handshakes::default(),
            perf_sinks: JoinSet::new(),
            observed: Vec::new(),
            stock_candidates: Vec::new(),
            sessions: HashMap::new(),
            remotes: Remotes::default(),
            relayed: HashMap::new(),
            relayed_conns: HashMap::new(),
            to_relay_rtt: None,
            mapping: None,
        })
    }

    /// How much state the peer holds now.
    pub fn stats(&self) -> PeerStats {
        PeerStats {
            sessions: self.sessions.len(),
            remotes: self.remotes.len(),
            remotes_refused: self.remotes.refused(),
            handshakes: self.handshakes.len(),
            perf_sinks: self.perf_sinks.len(),
            relayed: self.relayed.len() + self.relayed_conns.len(),
            stock_candidates: self.stock_candidates.len(),
            port_map_reports_dropped: self.mapping.as_ref().map_or(0, PortMapping::dropped),
        }
    }

    /// This peer's ID.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// The addresses this peer listens on (relayed ones included once reserved).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.swarm.listeners().cloned().collect()
    }

    /// Runs `mode` until `stop` completes (listen) or the one hole punch ends (dial), reporting
    /// to `report`. Returns the dial's outcome.
    pub async fn run(
        &mut self,
        mode: Mode,
        stop: impl Future<Output = ()>,
        report: &mut impl FnMut(PeerEvent),
    ) -> Result<Option<Outcome>, PeerError> {
        tokio::pin!(stop);
        tokio::select! {
            r = self.setup(mode, report) => r?,
            () = &mut stop => return Ok(None),
        }
        // The stock engine's `dcutr` behaviour answers DCUtR itself; natpunch's protocols are
        // then not offered at all, so a natpunch remote falls back to plain DCUtR.
        let (mut incoming, mut fast) = if self.config.engine == Engine::Natpunch {
            let accept = |c: &mut libp2p_stream::Control, p: StreamProtocol| {
                c.accept(p.clone())
                    .map_err(|e| PeerError::Setup(format!("accepting {p}: {e}")))
            };
            (
                Some(accept(&mut self.control, DCUTR)?),
                Some(accept(&mut self.control, NATPUNCH_DCUTR)?),
            )
        } else {
            (None, None)
        };
        let mut perf = self
            .control
            .accept(PERF)
            .map_err(|e| PeerError::Setup(format!("accepting {PERF}: {e}")))?;
        if let Mode::Dial(target) = mode {
            let addr = self.relay_addrs[0]
                .clone()
                .with(Protocol::P2pCircuit)
                .with(Protocol::P2p(target));
            let opts = DialOpts::peer_id(target)
                .addresses(vec![addr])
                .condition(PeerCondition::Always)
                .build();
            let id = opts.connection_id();
            if let Err(e) = self.swarm.dial(opts) {
                return Ok(Some(self.no_connection(target, &e.to_string(), report)));
            }
            self.relayed.insert(id, target);
        }
        loop {
            let wake = self.next_deadline();
            tokio::select! {
                () = &mut stop => return Ok(None),
                event = self.swarm.select_next_some() => {
                    if let Some(outcome) = self.on_swarm(event, mode, report) {
                        return Ok(Some(outcome));
                    }
                }
                step = self.handshakes.next() => self.on_step(step),
                Some((peer, stream)) = next_stream(incoming.as_mut()) => {
                    self.on_inbound_stream(peer, stream, false);
                }
                Some((peer, stream)) = next_stream(fast.as_mut()) => {
                    self.on_inbound_stream(peer, stream, true);
                }
                Some((peer, stream)) = perf.next() => self.on_perf_stream(peer, stream),
                Some(_) = self.perf_sinks.join_next() => {}
                event = mapping_event(self.mapping.as_mut()) => match event {
                    MappingEvent::Changed => self.on_mapping_changed(report),
                    MappingEvent::Report(update) => {
                        report(PeerEvent::PortMapUpdate { update });
                    }
                },
                () = sleep_until(wake) => {}
            }
            if let Some(outcome) = self.close_sessions(mode, report) {
                if let (Mode::Dial(target), Some(bytes)) = (mode, self.config.perf_bytes) {
                    self.perf(target, bytes, &mut stop, report).await;
                }
                self.linger(&mut stop).await;
                return Ok(Some(outcome));
            }
        }
    }

    /// Sends `bytes` to `target` over the one connection left (closing the relayed ones when a
    /// direct one exists) and reports the throughput.
    async fn perf(
        &mut self,
        target: PeerId,
        bytes: u64,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        report: &mut impl FnMut(PeerEvent),
    ) {
        let direct = self
            .remotes
            .get(&target)
            .is_some_and(|r| !r.directs.is_empty());
        if direct {
            let relayed: Vec<ConnectionId> = self
                .relayed_conns
                .iter()
                .filter(|(_, p)| **p == target)
                .map(|(c, _)| *c)
                .collect();
            for c in relayed {
                self.swarm.close_connection(c);
            }
            // Wait until they are gone, so that the transfer cannot pick one of them.
            let until = tokio::time::Instant::now() + Duration::from_secs(2);
            while self.relayed_conns.values().any(|p| *p == target) {
                tokio::select! {
                    () = stop.as_mut() => return,
                    () = tokio::time::sleep_until(until) => break,
                    event = self.swarm.select_next_some() => {
                        if let SwarmEvent::ConnectionClosed {
                            peer_id,
                            connection_id,
                            num_established,
                            ..
                        } = event
                        {
                            self.relayed_conns.remove(&connection_id);
                            self.remotes.on_closed(peer_id, connection_id, num_established);
                        }
                    }
                }
            }
        }
        let mut control = self.control.clone();
        let transfer = perf_send(&mut control, target, bytes.min(MAX_PERF_BYTES));
        tokio::pin!(transfer);
        let result = loop {
            tokio::select! {
                () = stop.as_mut() => return,
                r = &mut transfer => break r,
                _ = self.swarm.select_next_some() => {}
            }
        };
        match result {
            Ok(secs) => report(PeerEvent::Throughput {
                connection: if direct { "direct" } else { "relayed" }.into(),
                bytes,
                secs,
                mbit_s: bytes as f64 * 8.0 / secs.max(1e-9) / 1e6,
            }),
            Err(e) => tracing::warn!("throughput test: {e}"),
        }
    }

    /// Keeps the swarm running for `linger` (or until `stop`).
    async fn linger(&mut self, stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>) {
        let until = tokio::time::Instant::now() + self.config.linger;
        loop {
            tokio::select! {
                () = stop.as_mut() => return,
                () = tokio::time::sleep_until(until) => return,
                _ = self.swarm.select_next_some() => {}
            }
        }
    }

    fn no_connection(
        &mut self,
        target: PeerId,
        error: &str,
        report: &mut impl FnMut(PeerEvent),
    ) -> Outcome {
        let mut s = Session::new(Side::Dialer, Duration::ZERO);
        s.result = Some((Outcome::NoConnection, Some(error.to_owned())));
        let record = s.record(self.peer_id(), target, self.relay, &self.config);
        report(PeerEvent::HolePunch(Box::new(record)));
        Outcome::NoConnection
    }

    /// Listen, connect to the relay, learn the observed addresses, reserve (listen mode).
    async fn setup(
        &mut self,
        mode: Mode,
        report: &mut impl FnMut(PeerEvent),
    ) -> Result<(), PeerError> {
        let ip = match self.config.listen_ip {
            IpAddr::V4(ip) => Protocol::Ip4(ip),
            IpAddr::V6(ip) => Protocol::Ip6(ip),
        };
        let mut want_tcp = self.config.transport.tcp();
        let mut want_quic = self.config.transport.quic();
        if want_tcp {
            let a = Multiaddr::empty().with(ip.clone()).with(Protocol::Tcp(0));
            self.swarm
                .listen_on(a)
                .map_err(|e| PeerError::Setup(format!("listen tcp: {e}")))?;
        }
        if want_quic {
            let a = Multiaddr::empty()
                .with(ip)
                .with(Protocol::Udp(0))
                .with(Protocol::QuicV1);
            self.swarm
                .listen_on(a)
                .map_err(|e| PeerError::Setup(format!("listen quic: {e}")))?;
        }
        let step_timeout = self.config.setup_timeout;
        let deadline = Instant::now() + step_timeout;
        // 1. A non-loopback listen address per transport.
        while want_tcp || want_quic {
            match self.next_setup_event(deadline, "listening").await? {
                SwarmEvent::NewListenAddr { address, .. } if dialable(&address) => {
                    if transport_of(&address) == "quic" {
                        want_quic = false;
                    } else {
                        want_tcp = false;
                    }
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(PeerError::Setup(format!("listening: {error}")));
                }
                _ => {}
            }
        }
        // 1b. Port mappings, before identify tells anyone our addresses.
        if self.config.port_mapping {
            self.map_ports(report).await;
        }
        // 2. The relay over each transport, and what it observed.
        let mut waiting: Vec<ConnectionId> = Vec::new();
        for addr in self.relay_addrs.clone() {
            let opts = DialOpts::peer_id(self.relay)
                .addresses(vec![without_p2p(addr.clone())])
                .condition(PeerCondition::Always)
                .build();
            waiting.push(opts.connection_id());
            self.swarm
                .dial(opts)
                .map_err(|e| PeerError::Setup(format!("dialing the relay at {addr}: {e}")))?;
        }
        let deadline = Instant::now() + step_timeout;
        while !waiting.is_empty() {
            match self
                .next_setup_event(deadline, "connecting to the relay")
                .await?
            {
                SwarmEvent::OutgoingConnectionError {
                    connection_id,
                    error,
                    ..
                } if waiting.contains(&connection_id) => {
                    return Err(PeerError::Setup(format!("the relay: {error}")));
                }
                SwarmEvent::Behaviour(PeerBehaviourEvent::Identify(
                    identify::Event::Received {
                        connection_id,
                        peer_id,
                        info,
                    },
                )) if peer_id == self.relay => {
                    waiting.retain(|c| *c != connection_id);
                    let observed = info.observed_addr;
                    if !self.observed.contains(&observed) {
                        self.observed.push(observed.clone());
                        if self.config.engine == Engine::Stock
                            && self.config.candidates == Candidates::Observed
                        {
                            self.swarm.behaviour_mut().feed.push(observed);
                        }
                    }
                }
                other => self.on_background(other),
            }
        }
        report(PeerEvent::RelayConnected {
            peer_id: self.peer_id().to_string(),
            relay: self.relay.to_string(),
            observed: self.observed.iter().map(ToString::to_string).collect(),
        });
        // 3. The reservation.
        if mode == Mode::Listen {
            let circuit = self.relay_addrs[0].clone().with(Protocol::P2pCircuit);
            self.swarm
                .listen_on(circuit.clone())
                .map_err(|e| PeerError::Setup(format!("reserving on the relay: {e}")))?;
            let deadline = Instant::now() + step_timeout;
            loop {
                match self
                    .next_setup_event(deadline, "reserving on the relay")
                    .await?
                {
                    SwarmEvent::Behaviour(PeerBehaviourEvent::RelayClient(
                        relay::client::Event::ReservationReqAccepted { .. },
                    )) => break,
                    SwarmEvent::ListenerClosed { reason: Err(e), .. } => {
                        return Err(PeerError::Setup(format!("the reservation failed: {e}")));
                    }
                    other => self.on_background(other),
                }
            }
            report(PeerEvent::Reserved {
                address: circuit.with(Protocol::P2p(self.peer_id())).to_string(),
            });
        }
        // 4. The DHT.
        if let Some(dht) = &self.config.dht
            && let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
        {
            for addr in &dht.bootstrap {
                if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                    kad.add_address(&peer, addr.clone());
                }
            }
            if let Err(e) = kad.bootstrap() {
                return Err(PeerError::Setup(format!("joining the DHT: {e}")));
            }
        }
        Ok(())
    }

    async fn next_setup_event(
        &mut self,
        deadline: Instant,
        what: &str,
    ) -> Result<SwarmEvent<PeerBehaviourEvent>, PeerError> {
        match tokio::time::timeout_at(deadline.into(), self.swarm.select_next_some()).await {
            Ok(e) => Ok(e),
            Err(_) => Err(PeerError::Setup(format!(
                "{what}: nothing within {:?}",
                self.config.setup_timeout
            ))),
        }
    }

    /// Events that matter in every phase.
    fn on_background(&mut self, event: SwarmEvent<PeerBehaviourEvent>) {
        if let SwarmEvent::NewExternalAddrCandidate { address } = event
            && dialable(&address)
            && !self.stock_candidates.contains(&address)
        {
            // The first ones (the relay's view of us) are kept; beyond the cap, new ones are
            // ignored rather than growing the CONNECT message past its limit.
            if self.stock_candidates.len() < MAX_STOCK_CANDIDATES {
                self.stock_candidates.push(address);
            } else {
                tracing::debug!(%address, "candidate ignored: {MAX_STOCK_CANDIDATES} kept");
            }
        }
    }

    /// Starts holding a mapping of every listen port on the local router, and waits until
    /// each was made or failed once. A failed one is retried in the background and offered
    /// once made.
    async fn map_ports(&mut self, report: &mut impl FnMut(PeerEvent)) {
        use portmap::keeper::Want;
        let mut wants: Vec<Want> = Vec::new();
        for listen in self.swarm.listeners().filter(|a| dialable(a)) {
            let protocol = if transport_of(listen) == "quic" {
                portmap::Protocol::Udp
            } else {
                portmap::Protocol::Tcp
            };
            let Some(internal_port) = listen.iter().find_map(|p| match p {
                Protocol::Tcp(port) | Protocol::Udp(port) => Some(port),
                _ => None,
            }) else {
                continue;
            };
            // One mapping per port, however many interfaces it listens on.
            if wants
                .iter()
                .any(|w| w.protocol == protocol && w.internal_port == internal_port)
            {
                continue;
            }
            wants.push(Want {
                protocol,
                internal_port,
                external_port: None,
                lifetime: self.config.port_mapping_lifetime,
            });
        }
        let count = u32::try_from(wants.len()).unwrap_or(u32::MAX);
        let names: Vec<String> = wants
            .iter()
            .map(|w| format!("{} port {}", w.protocol, w.internal_port))
            .collect();
        let wait = defaults::PORT_MAPPING_WAIT;
        let mut mapping = match PortMapping::start(wants, defaults::PORT_MAPPING_CHECK, wait).await
        {
            Ok(m) => m,
            Err(error) => {
                report(PeerEvent::PortMapFailed { error });
                return;
            }
        };
        // Each request may take `wait`; they go one after another.
        let mut failed = Vec::new();
        for update in mapping.first_answers(wait * (count + 1)).await {
            if let portmap::keeper::Event::Failed { id, error, .. } = &update.event
                && !failed.contains(id)
            {
                failed.push(*id);
                let what = names.get(*id).map_or("a port", String::as_str);
                report(PeerEvent::PortMapFailed {
                    error: format!("mapping {what}: {error} (retrying)"),
                });
            }
            report(PeerEvent::PortMapUpdate { update });
        }
        self.mapping = Some(mapping);
        self.on_mapping_changed(report);
    }

    /// The holder's mappings changed: offer the addresses they give now (the swarm's external
    /// addresses, which identify tells the remotes, and CONNECT's) instead of the old ones.
    fn on_mapping_changed(&mut self, report: &mut impl FnMut(PeerEvent)) {
        let Some(mapping) = self.mapping.as_mut() else {
            return;
        };
        for change in mapping.update() {
            match change {
                Change::Mapped {
                    mapping,
                    addr,
                    previous,
                } => {
                    if let Some(old) = &previous {
                        self.swarm.remove_external_address(old);
                    }
                    self.swarm.add_external_address(addr.clone());
                    report(PeerEvent::PortMapped {
                        method: mapping.method.to_string(),
                        internal: mapping.internal.to_string(),
                        external: addr.to_string(),
                        previous: previous.map(|a| a.to_string()),
                    });
                }
                Change::Lost { mapping, addr } => {
                    self.swarm.remove_external_address(&addr);
                    report(PeerEvent::PortMapLost {
                        internal: mapping.internal.to_string(),
                        external: addr.to_string(),
                    });
                }
            }
        }
    }

    /// The mappings this peer holds on its router now.
    pub fn mappings(&self) -> impl Iterator<Item = &portmap::client::Mapped> {
        self.mapping
            .iter()
            .flat_map(|m| m.offered().iter().map(|(m, _)| m))
    }

    /// Stops holding the mappings and deletes them on the router.
    pub async fn unmap(&mut self) {
        if let Some(mapping) = self.mapping.take() {
            mapping.release().await;
        }
    }

    /// The addresses this peer offers in CONNECT: mapped ones first.
    fn offered(&self) -> Vec<Multiaddr> {
        let source = match self.config.candidates {
            Candidates::Observed => &self.observed,
            Candidates::Stock => &self.stock_candidates,
        };
        self.mapping
            .iter()
            .flat_map(|m| m.offered().iter().map(|(_, a)| a))
            .chain(source.iter())
            .filter(|a| dialable(a))
            .map(|a| without_p2p(a.clone()).with(Protocol::P2p(self.peer_id())))
            .collect()
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        self.sessions
            .values()
            .flat_map(|s| {
                [
                    Some(s.deadline),
                    s.attempt_deadline,
                    s.close_by,
                    s.spec_start_at,
                ]
            })
            .flatten()
            .min()
            .unwrap_or(far)
    }

    fn on_swarm(
        &mut self,
        event: SwarmEvent<PeerBehaviourEvent>,
        mode: Mode,
        report: &mut impl FnMut(PeerEvent),
    ) -> Option<Outcome> {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if peer_id == self.relay {
                    return None;
                }
                if endpoint_relayed(&endpoint) {
                    self.on_relayed(peer_id, connection_id, &endpoint);
                } else {
                    self.on_direct(peer_id, connection_id, endpoint);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                num_established,
                ..
            } => {
                tracing::debug!(%peer_id, ?connection_id, ?cause, "connection closed");
                self.remotes
                    .on_closed(peer_id, connection_id, num_established);
                self.relayed_conns.remove(&connection_id);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some(target) = self.relayed.remove(&connection_id)
                    && let Mode::Dial(t) = mode
                    && t == target
                {
                    return Some(self.no_connection(target, &error.to_string(), report));
                }
                if let Some(peer) = peer_id {
                    self.on_dial_error(peer, connection_id, &error);
                }
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } => self.on_dialing(peer, connection_id),
            SwarmEvent::Behaviour(PeerBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Ok(rtt),
            })) => self.on_ping(peer, connection, rtt),
            SwarmEvent::Behaviour(PeerBehaviourEvent::Autonat(e))
                if !is_relayed(&e.tested_addr) =>
            {
                report(PeerEvent::Reachability {
                    address: e.tested_addr.to_string(),
                    reachable: e.result.is_ok(),
                    error: e.result.err().map(|e| e.to_string()),
                });
            }
            SwarmEvent::Behaviour(PeerBehaviourEvent::Dcutr(e)) => self.on_stock_result(e),
            SwarmEvent::Behaviour(PeerBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if peer_id != self.relay => {
                let natpunch = info.protocols.contains(&NATPUNCH_DCUTR);
                // Only a connected remote has an entry: an answer that arrives after the last
                // connection closed makes none.
                if let Some(remote) = self.remotes.get_mut(&peer_id) {
                    remote.engine = Some(if natpunch {
                        RemoteEngine::Natpunch
                    } else {
                        RemoteEngine::Other
                    });
                }
                if !natpunch {
                    self.maybe_start_spec(peer_id, true);
                }
            }
            other => self.on_background(other),
        }
        None
    }

    fn on_relayed(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let side = if endpoint.is_dialer() {
            Side::Dialer
        } else {
            Side::Listener
        };
        self.relayed.remove(&id);
        self.relayed_conns.insert(id, peer);
        if let Some(remote) = self.remotes.entry(peer) {
            remote.side = Some(side);
        }
        if self.sessions.contains_key(&peer) {
            return;
        }
        if self.sessions.len() >= MAX_SESSIONS {
            tracing::warn!(%peer, "{MAX_SESSIONS} hole punches in progress: not punching this one");
            return;
        }
        let stock = self.config.engine == Engine::Stock;
        // The dialer waits for the listener's first stream; with the stock engine it cannot
        // tell a failure, so it waits out the stock attempts (3 × 10 s).
        let wait = if stock {
            Duration::from_secs(35)
        } else {
            self.config.attempt_timeout * self.config.max_attempts.max(1) + Duration::from_secs(2)
        };
        let mut session = Session::new(side, wait);
        session.local_addrs = self.offered().iter().map(ToString::to_string).collect();
        if !self.config.punch {
            session.result = Some((Outcome::Cancelled, Some("hole punching is off".into())));
        }
        let punch = !stock && self.config.punch;
        match side {
            Side::Dialer if punch => {
                // natpunch's protocol first; a listener without it answers "unsupported" and
                // drives DCUtR itself.
                session.driver = Side::Dialer;
                self.sessions.insert(peer, session);
                self.start_handshake(peer, NATPUNCH_DCUTR);
            }
            Side::Listener if punch => {
                session.spec_start_at = Some(Instant::now() + FAST_WAIT);
                self.sessions.insert(peer, session);
                let stock_remote = self.is_stock_remote(peer);
                self.maybe_start_spec(peer, stock_remote);
            }
            _ => {
                self.sessions.insert(peer, session);
            }
        }
    }

    /// Whether identify said `peer` does not run natpunch's engine.
    fn is_stock_remote(&self, peer: PeerId) -> bool {
        self.remotes
            .get(&peer)
            .is_some_and(|r| r.engine == Some(RemoteEngine::Other))
    }

    /// Listener: start DCUtR now if the remote is known not to run natpunch, or the wait for
    /// a natpunch dialer's stream is over.
    fn maybe_start_spec(&mut self, peer: PeerId, stock_remote: bool) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let Some(at) = session.spec_start_at else {
            return;
        };
        if stock_remote || Instant::now() >= at {
            session.spec_start_at = None;
            session.driver = Side::Listener;
            self.start_handshake(peer, DCUTR);
        }
    }

    /// The driving side: open a stream of `protocol` and run one CONNECT/SYNC round, timing
    /// the dials with half the measured round trip.
    fn start_handshake(&mut self, peer: PeerId, protocol: StreamProtocol) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        session.handshaking = true;
        // The second attempt between natpunch peers is reversed: if a TCP simultaneous open
        // failed because only this side's packets get through (its NAT maps per destination,
        // the remote's does not filter by port), this side's dial, landing on the remote's
        // listener, must take the dialer's role.
        let reversed = session.attempts.len() == 1
            && self
                .remotes
                .get(&peer)
                .is_some_and(|r| r.engine == Some(RemoteEngine::Natpunch));
        let ours = self.offered();
        let mut control = self.control.clone();
        let limit = self.config.attempt_timeout;
        self.handshakes.spawn(peer, Role::Driving, async move {
            let run = async {
                let mut stream = control.open_stream(peer, protocol).await.map_err(|e| {
                    let unsupported =
                        matches!(e, libp2p_stream::OpenStreamError::UnsupportedProtocol(_));
                    HandshakeError {
                        text: e.to_string(),
                        unsupported,
                    }
                })?;
                let connect = HolePunch {
                    kind: Kind::Connect,
                    addrs: ours.iter().map(|a| a.to_vec()).collect(),
                    reversed,
                };
                let sent = Instant::now();
                wire::write_message(&mut stream, &connect).await?;
                let reply = wire::read_message(&mut stream).await?;
                let rtt = sent.elapsed();
                if reply.kind != Kind::Connect {
                    return Err("the remote answered CONNECT with SYNC".into());
                }
                let sync = HolePunch {
                    kind: Kind::Sync,
                    addrs: Vec::new(),
                    reversed: false,
                };
                wire::write_message(&mut stream, &sync).await?;
                tokio::time::sleep(rtt / 2).await;
                Ok((reply.addrs, Some(rtt), reversed))
            };
            to_step(peer, tokio::time::timeout(limit, run).await, || {
                format!("no answer to CONNECT within {limit:?}")
            })
        });
    }

    /// A remote opened a throughput test: receive it, unless [`MAX_PERF_SINKS`] already run.
    fn on_perf_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        if self.perf_sinks.len() >= MAX_PERF_SINKS {
            tracing::debug!(%peer, "{MAX_PERF_SINKS} throughput tests running: refusing one");
            return;
        }
        let span = tracing::debug_span!("perf sink", %peer);
        self.perf_sinks.spawn(
            async move {
                if let Err(e) = perf_sink(stream).await {
                    tracing::debug!("throughput test: {e}");
                }
            }
            .instrument(span),
        );
    }

    /// The driven side: the remote opened a stream (`fast`: natpunch's protocol); answer its
    /// CONNECT and dial on SYNC.
    fn on_inbound_stream(&mut self, peer: PeerId, mut stream: libp2p::Stream, fast: bool) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if session.direct.is_some() || session.result.is_some() {
            return;
        }
        let driver = if fast { Side::Dialer } else { Side::Listener };
        if session.side == driver {
            // Both sides started (a natpunch dialer's stream came after this listener gave up
            // waiting): the listener's DCUtR goes on, the dialer's stream is dropped.
            return;
        }
        session.driver = driver;
        session.spec_start_at = None;
        session.handshaking = true;
        let ours = self.offered();
        let limit = self.config.attempt_timeout;
        // A newer stream from the remote replaces a handshake still waiting on an older one.
        self.handshakes.spawn(peer, Role::Answering, async move {
            let run = async {
                let connect = wire::read_message(&mut stream).await?;
                if connect.kind != Kind::Connect {
                    return Err("the stream opened with SYNC".into());
                }
                let reply = HolePunch {
                    kind: Kind::Connect,
                    addrs: ours.iter().map(|a| a.to_vec()).collect(),
                    reversed: false,
                };
                wire::write_message(&mut stream, &reply).await?;
                let sync = wire::read_message(&mut stream).await?;
                if sync.kind != Kind::Sync {
                    return Err("a second CONNECT instead of SYNC".into());
                }
                Ok((connect.addrs, None, connect.reversed))
            };
            to_step(peer, tokio::time::timeout(limit, run).await, || {
                format!("no SYNC within {limit:?}")
            })
        });
    }

    fn on_step(&mut self, step: Step) {
        let usable = |a: &Multiaddr, t: Transport| {
            dialable(a)
                && match transport_of(a) {
                    "quic" => t.quic(),
                    _ => t.tcp(),
                }
        };
        match step {
            Step::Dial {
                peer,
                remote,
                rtt,
                reversed,
            } => {
                let transport = self.config.transport;
                let attempt_timeout = self.config.attempt_timeout;
                let Some(session) = self.sessions.get_mut(&peer) else {
                    return;
                };
                session.handshaking = false;
                let index = session.start_attempt(rtt);
                if let Some(a) = session.attempts.get_mut(index) {
                    a.reversed = reversed;
                }
                if session.side != session.driver {
                    // Wait for this attempt, then for the driving side's next one.
                    session.deadline = session
                        .deadline
                        .max(Instant::now() + attempt_timeout * 2 + Duration::from_secs(1));
                }
                session.remote_addrs = remote.iter().map(ToString::to_string).collect();
                if let Some(a) = session.attempts.get_mut(index) {
                    a.remote_addrs.clone_from(&session.remote_addrs);
                }
                if session.direct.is_some() {
                    session.end_attempt(
                        index,
                        AttemptOutcome::Cancelled,
                        Some("a direct connection already exists".into()),
                    );
                    return;
                }
                let targets: Vec<Multiaddr> = remote
                    .into_iter()
                    .filter(|a| usable(a, transport))
                    .map(without_p2p)
                    .collect();
                if reversed && session.side == Side::Dialer {
                    // The listener dials; this side only waits for its connection.
                    session.awaiting = Some(index);
                    session.attempt_deadline = Some(Instant::now() + attempt_timeout);
                    return;
                }
                if targets.is_empty() {
                    session.end_attempt(
                        index,
                        AttemptOutcome::ProtocolError,
                        Some("the remote offered no address this peer can dial".into()),
                    );
                    return;
                }
                let mut opts = DialOpts::peer_id(peer)
                    .addresses(targets.clone())
                    .condition(PeerCondition::Always);
                if session.side == Side::Listener && !reversed {
                    opts = opts.override_role();
                }
                let opts = opts.build();
                let id = opts.connection_id();
                let now = Instant::now();
                let at = session.ms(now);
                if let Some(a) = session.attempts.get_mut(index) {
                    a.dialed_ms = Some(at);
                    a.dialed = targets.iter().map(ToString::to_string).collect();
                }
                session.dial = Some((id, index));
                session.attempt_deadline = Some(now + attempt_timeout);
                if let Err(e) = self.swarm.dial(opts)
                    && let Some(s) = self.sessions.get_mut(&peer)
                {
                    s.end_attempt(index, AttemptOutcome::Failed, Some(e.to_string()));
                }
            }
            Step::Failed {
                peer,
                error,
                timeout,
                unsupported,
            } => {
                let wait = self.config.attempt_timeout * self.config.max_attempts.max(1)
                    + Duration::from_secs(2);
                let Some(session) = self.sessions.get_mut(&peer) else {
                    return;
                };
                session.handshaking = false;
                if unsupported && session.side == Side::Dialer {
                    // Not a natpunch listener: it drives DCUtR itself.
                    session.driver = Side::Listener;
                    session.deadline = session.deadline.max(Instant::now() + wait);
                    return;
                }
                let index = session.start_attempt(None);
                let outcome = if timeout {
                    AttemptOutcome::Timeout
                } else {
                    AttemptOutcome::ProtocolError
                };
                session.end_attempt(index, outcome, Some(error));
            }
        }
    }

    fn on_dialing(&mut self, peer: PeerId, id: ConnectionId) {
        // Only the stock engine's dials are learnt this way; ours are known when made.
        if self.config.engine != Engine::Stock {
            return;
        }
        let timeout = self.config.attempt_timeout;
        if let Some(session) = self.sessions.get_mut(&peer)
            && session.direct.is_none()
            && session.result.is_none()
        {
            let index = session.start_attempt(None);
            let now = Instant::now();
            let at = session.ms(now);
            if let Some(a) = session.attempts.get_mut(index) {
                a.dialed_ms = Some(at);
            }
            session.dial = Some((id, index));
            // The stock engine's own timeouts end its dials; ours only keeps the record open.
            session.attempt_deadline = Some(now + timeout.max(Duration::from_secs(12)));
        }
    }

    fn on_dial_error(&mut self, peer: PeerId, id: ConnectionId, error: &DialError) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let Some((dial, index)) = session.dial else {
            return;
        };
        if dial != id {
            return;
        }
        let failures: Vec<DialFailure> = match error {
            DialError::Transport(list) => list
                .iter()
                .map(|(addr, e)| DialFailure {
                    addr: addr.to_string(),
                    error: error_chain(e),
                })
                .collect(),
            _ => Vec::new(),
        };
        if let Some(a) = session.attempts.get_mut(index) {
            a.dial_errors = failures;
            if a.dialed.is_empty() {
                a.dialed = a.dial_errors.iter().map(|f| f.addr.clone()).collect();
            }
        }
        let timed_out = error_chain(error).to_lowercase().contains("timeout")
            || error_chain(error).to_lowercase().contains("timed out");
        let outcome = if timed_out {
            AttemptOutcome::Timeout
        } else {
            AttemptOutcome::Failed
        };
        session.end_attempt(index, outcome, Some(error_chain(error)));
    }

    fn on_direct(&mut self, peer: PeerId, id: ConnectionId, endpoint: ConnectedPoint) {
        let natpunch = self.config.engine == Engine::Natpunch;
        let mut extra: Vec<ConnectionId> = Vec::new();
        if let Some(remote) = self.remotes.entry(peer) {
            let side = remote.side;
            tracing::debug!(%peer, ?id, ?endpoint, ?side, "direct connection");
            let list = &mut remote.directs;
            list.push(Direct {
                id,
                endpoint: endpoint.clone(),
            });
            // Of simultaneous direct connections keep the one the relayed connection's dialer
            // made, on both sides alike (QUIC punches make two).
            if natpunch
                && let Some(side) = side
                && list.iter().any(|d| made_by_a(side, &d.endpoint))
            {
                extra = list
                    .iter()
                    .filter(|d| !made_by_a(side, &d.endpoint))
                    .map(|d| d.id)
                    .collect();
                // A connection being closed is no longer one of ours: forget it now, so a
                // record written before the close completes counts what remains.
                list.retain(|d| !extra.contains(&d.id));
            }
        }
        for c in extra {
            tracing::debug!(%peer, ?c, "closing the second direct connection");
            self.swarm.close_connection(c);
        }
        let attempt_timeout = self.config.attempt_timeout;
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if session.direct.is_some() || session.result.is_some() {
            return;
        }
        let now = Instant::now();
        session.direct = Some((id, now));
        session.transport = Some(transport_of(remote_addr(&endpoint)).to_owned());
        let ours = matches!(endpoint, ConnectedPoint::Dialer { .. });
        session.dialed_by = Some(if ours { "local" } else { "remote" }.to_owned());
        let reversed = session.attempts.is_empty() && !session.handshaking;
        if let Some(index) = session.current() {
            session.end_attempt(index, AttemptOutcome::Success, None);
        } else if let Some(last) = session.attempts.len().checked_sub(1) {
            session.end_attempt(last, AttemptOutcome::Success, None);
        }
        session.result = Some(if reversed {
            (Outcome::ConnectionReversed, None)
        } else {
            (Outcome::Success, None)
        });
        session.close_by = Some(now + attempt_timeout.min(Duration::from_secs(2)));
    }

    fn on_ping(&mut self, peer: PeerId, connection: ConnectionId, rtt: Duration) {
        if peer == self.relay {
            self.to_relay_rtt.get_or_insert(rtt);
            return;
        }
        let relayed = self.relayed_conns.contains_key(&connection);
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if relayed {
            session.relay_rtt.get_or_insert(rtt);
        } else {
            session.direct_rtt.get_or_insert(rtt);
        }
    }

    fn on_stock_result(&mut self, e: dcutr::Event) {
        let Some(session) = self.sessions.get_mut(&e.remote_peer_id) else {
            return;
        };
        if let Err(error) = e.result
            && session.direct.is_none()
            && session.result.is_none()
        {
            session.result = Some((Outcome::Failed, Some(error.to_string())));
        }
    }

    /// Closes the sessions that are over; returns the dial's outcome when its session closed.
    fn close_sessions(
        &mut self,
        mode: Mode,
        report: &mut impl FnMut(PeerEvent),
    ) -> Option<Outcome> {
        let now = Instant::now();
        let max = self.config.max_attempts;
        let stock = self.config.engine == Engine::Stock;
        let mut restart = Vec::new();
        let mut spec = Vec::new();
        let mut done = Vec::new();
        for (peer, s) in &mut self.sessions {
            // A timed-out attempt.
            if let (Some(index), Some(deadline)) = (s.current(), s.attempt_deadline)
                && now >= deadline
            {
                s.end_attempt(
                    index,
                    AttemptOutcome::Timeout,
                    Some("no direct connection within the attempt's time".into()),
                );
            }
            let busy = s.current().is_some() || s.handshaking;
            let attempts = u32::try_from(s.attempts.len()).unwrap_or(u32::MAX);
            if s.spec_start_at.is_some_and(|t| now >= t) {
                spec.push(*peer);
            }
            if s.result.is_none() && !busy && !stock && s.spec_start_at.is_none() {
                if s.driver == s.side && attempts < max {
                    restart.push((*peer, s.side));
                } else if attempts >= max {
                    s.result = Some((Outcome::Failed, Some(format!("{attempts} attempts failed"))));
                }
            }
            let watched = stock || s.driver != s.side;
            if s.result.is_none() && watched && now >= s.deadline && !busy {
                s.result = Some(if s.attempts.is_empty() {
                    (
                        Outcome::NoStream,
                        Some("the remote never started a hole punch".into()),
                    )
                } else {
                    (
                        Outcome::Failed,
                        Some(format!("{} attempts failed", s.attempts.len())),
                    )
                });
            }
            let closing = match (&s.result, s.direct) {
                (Some(_), Some(_)) => {
                    s.direct_rtt.is_some() || s.close_by.is_some_and(|t| now >= t)
                }
                (Some(_), None) => true,
                _ => false,
            };
            if closing {
                done.push(*peer);
            }
        }
        for (peer, side) in restart {
            let protocol = match side {
                Side::Dialer => NATPUNCH_DCUTR,
                Side::Listener => DCUTR,
            };
            self.start_handshake(peer, protocol);
        }
        for peer in spec {
            let stock_remote = self.is_stock_remote(peer);
            self.maybe_start_spec(peer, stock_remote);
        }
        let mut finished = None;
        for peer in done {
            let Some(s) = self.sessions.remove(&peer) else {
                continue;
            };
            // A handshake still running belongs to the session: its step would find no one.
            self.handshakes.cancel(peer);
            let mut record = s.record(self.peer_id(), peer, self.relay, &self.config);
            record.to_relay_rtt_ms = self.to_relay_rtt.map(|d| d.as_secs_f64() * 1000.0);
            record.direct_connections = self
                .remotes
                .get(&peer)
                .map_or(0, |r| u32::try_from(r.directs.len()).unwrap_or(u32::MAX));
            let outcome = record.outcome;
            report(PeerEvent::HolePunch(Box::new(record)));
            if mode == Mode::Dial(peer) {
                finished = Some(outcome);
            }
        }
        finished
    }
}

/// Receives one throughput test: the length, the bytes, then a 1-byte ack.
async fn perf_sink(mut stream: libp2p::Stream) -> std::io::Result<()> {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).await?;
    let len = u64::from_be_bytes(len).min(MAX_PERF_BYTES);
    let copied = futures::io::copy(&mut (&mut stream).take(len), &mut futures::io::sink()).await?;
    if copied == len {
        stream.write_all(&[1]).await?;
    }
    stream.close().await
}

/// Sends one throughput test and returns its duration in seconds.
async fn perf_send(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    bytes: u64,
) -> std::io::Result<f64> {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = control
        .open_stream(peer, PERF)
        .await
        .map_err(std::io::Error::other)?;
    let start = Instant::now();
    stream.write_all(&bytes.to_be_bytes()).await?;
    let chunk = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        stream.write_all(chunk.get(..n).unwrap_or_default()).await?;
        left -= n as u64;
    }
    stream.flush().await?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await?;
    Ok(start.elapsed().as_secs_f64())
}

/// The next inbound stream, or never when there is no acceptor.
async fn next_stream(
    incoming: Option<&mut libp2p_stream::IncomingStreams>,
) -> Option<(PeerId, libp2p::Stream)> {
    match incoming {
        Some(i) => i.next().await,
        None => std::future::pending().await,
    }
}

/// The mapping holder's next event, or never when there is none. Cancel-safe.
async fn mapping_event(mapping: Option<&mut PortMapping>) -> MappingEvent {
    match mapping {
        Some(m) => m.next_event().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

/// Why a handshake failed.
#[derive(Debug)]
struct HandshakeError {
    text: String,
    /// The remote does not speak the protocol.
    unsupported: bool,
}

impl From<String> for HandshakeError {
    fn from(text: String) -> Self {
        Self {
            text,
            unsupported: false,
        }
    }
}

impl From<&str> for HandshakeError {
    fn from(text: &str) -> Self {
        text.to_owned().into()
    }
}

impl From<std::io::Error> for HandshakeError {
    /// With optimistic negotiation a remote without the protocol shows up on the first read,
    /// as multistream-select's "negotiation failed".
    fn from(e: std::io::Error) -> Self {
        use libp2p::core::upgrade::NegotiationError;
        let unsupported = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<NegotiationError>())
            .is_some_and(|n| matches!(n, NegotiationError::Failed));
        Self {
            text: e.to_string(),
            unsupported,
        }
    }
}

/// A finished handshake: the remote's addresses, the CONNECT round trip (when this side
/// measured it), and whether the attempt is reversed.
type Handshake = (Vec<Vec<u8>>, Option<Duration>, bool);

/// What a handshake task tells the event loop: dial the addresses it got (with the CONNECT
/// round trip, when this side measured it), or why it failed.
fn to_step(
    peer: PeerId,
    result: Result<Result<Handshake, HandshakeError>, tokio::time::error::Elapsed>,
    timed_out: impl FnOnce() -> String,
) -> Step {
    match result {
        Ok(Ok((addrs, rtt, reversed))) => Step::Dial {
            peer,
            remote: parse_addrs(&addrs),
            rtt,
            reversed,
        },
        Ok(Err(e)) => Step::Failed {
            peer,
            error: e.text,
            timeout: false,
            unsupported: e.unsupported,
        },
        Err(_) => Step::Failed {
            peer,
            error: timed_out(),
            timeout: true,
            unsupported: false,
        },
    }
}

fn parse_addrs(raw: &[Vec<u8>]) -> Vec<Multiaddr> {
    raw.iter()
        .filter_map(|b| Multiaddr::try_from(b.clone()).ok())
        .filter(|a| !is_relayed(a))
        .collect()
}

/// An error with its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_id() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    #[test]
    fn a_missing_relay_address_is_derived_with_the_same_port() {
        let id = relay_id();
        let tcp: Multiaddr = format!("/ip4/11.99.0.12/tcp/4001/p2p/{id}")
            .parse()
            .expect("addr");
        let mut config = PeerConfig::new(vec![tcp.clone()]);
        let (relay, addrs) = relay_addrs(&config).expect("addrs");
        assert_eq!(relay, id);
        assert_eq!(
            addrs,
            [
                tcp.clone(),
                format!("/ip4/11.99.0.12/udp/4001/quic-v1/p2p/{id}")
                    .parse::<Multiaddr>()
                    .expect("addr")
            ]
        );
        config.transport = Transport::Tcp;
        assert_eq!(relay_addrs(&config).expect("addrs").1, [tcp]);
        let bare: Multiaddr = "/ip4/11.99.0.12/tcp/4001".parse().expect("addr");
        let err = relay_addrs(&PeerConfig::new(vec![bare])).expect_err("no peer id");
        assert!(err.to_string().contains("/p2p/<relay peer id>"), "{err}");
        assert!(relay_addrs(&PeerConfig::new(Vec::new())).is_err());
    }

    #[test]
    fn both_sides_keep_the_connection_the_relayed_dialer_made() {
        let addr: Multiaddr = "/ip4/11.99.0.11/udp/4000/quic-v1".parse().expect("addr");
        let dialed = |role_override| ConnectedPoint::Dialer {
            address: addr.clone(),
            role_override,
            port_use: libp2p::core::transport::PortUse::Reuse,
        };
        let inbound = ConnectedPoint::Listener {
            local_addr: addr.clone(),
            send_back_addr: addr.clone(),
        };
        // A's own dial, and B's view of it (inbound), are the one kept.
        assert!(made_by_a(Side::Dialer, &dialed(Endpoint::Dialer)));
        assert!(made_by_a(Side::Listener, &inbound));
        // B's dial (as listener), and A's view of it (inbound), are closed.
        assert!(!made_by_a(Side::Listener, &dialed(Endpoint::Listener)));
        assert!(!made_by_a(Side::Dialer, &inbound));
    }

    #[test]
    fn only_direct_routable_addresses_are_offered_or_dialed() {
        for (a, ok) in [
            ("/ip4/11.99.0.10/tcp/4000", true),
            ("/ip4/11.99.0.10/udp/4000/quic-v1", true),
            ("/ip4/127.0.0.1/tcp/4000", false),
            ("/ip4/0.0.0.0/tcp/4000", false),
            ("/ip4/11.99.0.12/tcp/4001/p2p-circuit", false),
        ] {
            assert_eq!(dialable(&a.parse().expect("addr")), ok, "{a}");
        }
        let id = relay_id();
        let with: Multiaddr = format!("/ip4/11.99.0.10/tcp/4000/p2p/{id}")
            .parse()
            .expect("addr");
        assert_eq!(
            without_p2p(with),
            "/ip4/11.99.0.10/tcp/4000"
                .parse::<Multiaddr>()
                .expect("addr")
        );
        let relayed: Multiaddr = format!("/ip4/11.99.0.12/tcp/4001/p2p/{id}/p2p-circuit")
            .parse()
            .expect("addr");
        assert_eq!(
            parse_addrs(&[relayed.to_vec(), vec![0xff, 0x00], with_addr().to_vec()]),
            [with_addr()],
            "relayed and undecodable addresses are dropped"
        );
    }

    fn with_addr() -> Multiaddr {
        "/ip4/11.99.0.11/udp/4002/quic-v1".parse().expect("addr")
    }

    /// A peer fed swarm events by hand: no socket, no swarm polling.
    struct Fed {
        peer: Peer,
        relay: PeerId,
        next_id: usize,
        records: Vec<Record>,
    }

    /// Connections of one remote.
    struct Conns {
        key: Keypair,
        relayed: (ConnectionId, ConnectedPoint),
        direct: (ConnectionId, ConnectedPoint),
    }

    impl Fed {
        fn new(punch: bool) -> Self {
            let relay = relay_id();
            let addr: Multiaddr = format!("/ip4/11.99.0.12/tcp/4001/p2p/{relay}")
                .parse()
                .expect("addr");
            let mut config = PeerConfig::new(vec![addr]);
            config.punch = punch;
            // Long enough that a handshake outlives the test unless something ends it.
            config.attempt_timeout = Duration::from_secs(600);
            let peer = Peer::new(Keypair::generate_ed25519(), config).expect("peer");
            Self {
                peer,
                relay,
                next_id: 1,
                records: Vec::new(),
            }
        }

        fn id(&mut self) -> ConnectionId {
            self.next_id += 1;
            ConnectionId::new_unchecked(self.next_id)
        }

        /// A remote that reached this peer through the relay (this peer is the listener).
        fn remote(&mut self) -> Conns {
            let key = Keypair::generate_ed25519();
            let circuit: Multiaddr =
                format!("/ip4/11.99.0.12/tcp/4001/p2p/{}/p2p-circuit", self.relay)
                    .parse()
                    .expect("addr");
            let quic: Multiaddr = "/ip4/192.168.1.2/udp/4000/quic-v1".parse().expect("addr");
            let remote: Multiaddr = "/ip4/11.99.0.11/udp/5000/quic-v1".parse().expect("addr");
            let relayed = (
                self.id(),
                ConnectedPoint::Listener {
                    local_addr: circuit,
                    send_back_addr: Multiaddr::empty(),
                },
            );
            let direct = (
                self.id(),
                ConnectedPoint::Listener {
                    local_addr: quic,
                    send_back_addr: remote,
                },
            );
            Conns {
                key,
                relayed,
                direct,
            }
        }

        fn feed(&mut self, event: SwarmEvent<PeerBehaviourEvent>) {
            let records = &mut self.records;
            let _ = self.peer.on_swarm(event, Mode::Listen, &mut |_| {});
            let _ = self.peer.close_sessions(Mode::Listen, &mut |e| {
                if let PeerEvent::HolePunch(r) = e {
                    records.push(*r);
                }
            });
        }

        fn established(&mut self, c: &Conns, (id, endpoint): &(ConnectionId, ConnectedPoint)) {
            self.feed(SwarmEvent::ConnectionEstablished {
                peer_id: c.key.public().to_peer_id(),
                connection_id: *id,
                endpoint: endpoint.clone(),
                num_established: std::num::NonZeroU32::MIN,
                concurrent_dial_errors: None,
                established_in: Duration::ZERO,
            });
        }

        fn closed(
            &mut self,
            c: &Conns,
            (id, endpoint): &(ConnectionId, ConnectedPoint),
            remaining: u32,
        ) {
            self.feed(SwarmEvent::ConnectionClosed {
                peer_id: c.key.public().to_peer_id(),
                connection_id: *id,
                endpoint: endpoint.clone(),
                num_established: remaining,
                cause: None,
            });
        }

        fn identified(&mut self, c: &Conns, natpunch: bool) {
            let mut protocols = vec![DCUTR];
            if natpunch {
                protocols.push(NATPUNCH_DCUTR);
            }
            let info = identify::Info {
                public_key: c.key.public(),
                protocol_version: PROTOCOL_VERSION.into(),
                agent_version: "test".into(),
                listen_addrs: Vec::new(),
                protocols,
                observed_addr: Multiaddr::empty(),
                signed_peer_record: None,
            };
            self.feed(SwarmEvent::Behaviour(PeerBehaviourEvent::Identify(
                identify::Event::Received {
                    connection_id: c.relayed.0,
                    peer_id: c.key.public().to_peer_id(),
                    info,
                },
            )));
        }

        fn pinged(&mut self, c: &Conns) {
            self.feed(SwarmEvent::Behaviour(PeerBehaviourEvent::Ping(
                ping::Event {
                    peer: c.key.public().to_peer_id(),
                    connection: c.direct.0,
                    result: Ok(Duration::from_millis(3)),
                },
            )));
        }
    }

    /// Tasks alive in this test's runtime, once aborted ones had the time to end.
    async fn settled_tasks(want: usize) -> usize {
        let metrics = tokio::runtime::Handle::current().metrics();
        for _ in 0..200 {
            if metrics.num_alive_tasks() <= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        metrics.num_alive_tasks()
    }

    #[tokio::test]
    async fn what_is_known_of_a_remote_is_forgotten_when_it_disconnects() {
        let mut fed = Fed::new(false);
        for i in 0..200 {
            let c = fed.remote();
            fed.established(&c, &c.relayed);
            fed.identified(&c, i % 2 == 0);
            fed.established(&c, &c.direct);
            fed.closed(&c, &c.relayed, 1);
            fed.closed(&c, &c.direct, 0);
            // identify's answer can come after the connection closed: it makes no entry.
            fed.identified(&c, i % 2 == 0);
        }
        assert_eq!(fed.records.len(), 200, "every session ended with a record");
        assert_eq!(fed.peer.stats(), PeerStats::default());
    }

    #[tokio::test]
    async fn relayed_connections_beyond_the_session_cap_are_not_punched() {
        let mut fed = Fed::new(true);
        for _ in 0..MAX_SESSIONS + 20 {
            let c = fed.remote();
            fed.established(&c, &c.relayed);
        }
        let stats = fed.peer.stats();
        assert_eq!(stats.sessions, MAX_SESSIONS);
        assert_eq!(
            stats.remotes,
            MAX_SESSIONS + 20,
            "all of them are connected"
        );
    }

    #[tokio::test]
    async fn a_handshake_task_ends_with_its_session_and_with_the_peer() {
        let mut fed = Fed::new(true);
        let before = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        // A stock remote: this listener starts DCUtR at once.
        let c = fed.remote();
        fed.established(&c, &c.relayed);
        fed.identified(&c, false);
        assert_eq!(fed.peer.stats().handshakes, 1);
        assert_eq!(settled_tasks(before + 1).await, before + 1);
        // A direct connection comes up anyway, and its first ping closes the session.
        fed.established(&c, &c.direct);
        fed.pinged(&c);
        assert_eq!(fed.records.len(), 1, "the session ended");
        assert_eq!(fed.peer.stats().handshakes, 0);
        assert_eq!(
            settled_tasks(before).await,
            before,
            "the session's handshake task was aborted with it"
        );
        // A handshake running when the peer is dropped goes with it.
        let c = fed.remote();
        fed.established(&c, &c.relayed);
        fed.identified(&c, false);
        assert_eq!(settled_tasks(before + 1).await, before + 1);
        drop(fed);
        assert_eq!(settled_tasks(before).await, before, "dropped with the peer");
    }

    #[tokio::test]
    async fn identify_candidates_are_capped() {
        let mut fed = Fed::new(false);
        for port in 0..100u16 {
            let address: Multiaddr = format!("/ip4/11.99.0.10/tcp/{}", 20_000 + port)
                .parse()
                .expect("addr");
            fed.feed(SwarmEvent::NewExternalAddrCandidate { address });
        }
        assert_eq!(fed.peer.stats().stock_candidates, MAX_STOCK_CANDIDATES);
    }
}

//! How a peer runs, what it reports, and why it stops.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use super::defaults;
use crate::punch::{Engine, LocalMapping, Transport};
use crate::record::Record;

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
    /// This peer's NAT mapping class and where it was learnt (a flag, an RFC 5780 check),
    /// when known before the peer starts; otherwise the peer learns it from what remotes at two
    /// or more addresses observe ([`crate::observed`]), or never.
    pub local_mapping: Option<LocalMapping>,
    /// Join a Kademlia DHT as a client once set up (after the reservation, so that peers met
    /// there, a honeypot among them, learn the relayed address from identify).
    pub dht: Option<Dht>,
    /// Birthday probing over QUIC, with a natpunch remote whose NAT is hard where this one is
    /// easy, or the other way round ([`crate::punch`]); `enabled: false` turns it off.
    pub birthday: crate::birthday::Settings,
    /// A STUN server for port prediction: when this peer's NAT maps per destination and
    /// probing is on, two fresh mappings it reports at each hole punch's start tell whether
    /// the NAT allocates in order and where its next mapping will be; the remote probes there
    /// first ([`crate::birthday::Prediction`]). `None`: no prediction.
    pub stun_server: Option<std::net::SocketAddr>,
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
            local_mapping: None,
            dht: None,
            birthday: crate::birthday::Settings::default(),
            stun_server: None,
        }
    }
}

/// What a peer reports.
/// Its JSON lines (`natpunch peer --json`) read back into it, except a port-mapping holder's
/// report, which is for people.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    #[serde(skip_deserializing)]
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

impl fmt::Display for PeerEvent {
    /// One line for people (`--json` prints the event itself).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RelayConnected {
                relay, observed, ..
            } => write!(
                f,
                "connected to relay {relay}; it sees us at {}",
                observed.join(", ")
            ),
            Self::Reserved { address } => write!(f, "reserved: reachable at {address}"),
            Self::Reachability {
                address,
                reachable,
                error,
            } => match (reachable, error) {
                (true, _) => write!(f, "autonat: {address} is reachable"),
                (false, Some(e)) => write!(f, "autonat: {address} is not reachable ({e})"),
                (false, None) => write!(f, "autonat: {address} is not reachable"),
            },
            Self::HolePunch(r) => write!(f, "{r}"),
            Self::PortMapped {
                method,
                internal,
                external,
                previous: None,
            } => write!(f, "mapped {internal} to {external} with {method}"),
            Self::PortMapped {
                method,
                internal,
                external,
                previous: Some(old),
            } => write!(
                f,
                "mapped {internal} to {external} with {method}, instead of {old}"
            ),
            Self::PortMapLost { internal, external } => {
                write!(
                    f,
                    "the router lost the mapping of {internal} to {external}; making it again"
                )
            }
            Self::PortMapUpdate { update } => {
                write!(f, "port mapping: {update}")
            }
            Self::PortMapFailed { error } => write!(f, "no port mapping: {error}"),
            Self::Throughput {
                connection,
                bytes,
                secs,
                mbit_s,
            } => write!(
                f,
                "throughput over the {connection} connection: {bytes} bytes in {secs:.2} s, {mbit_s:.1} Mbit/s"
            ),
        }
    }
}

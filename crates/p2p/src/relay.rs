//! The circuit relay v2 server, with identify, ping and the AutoNAT v2 server.
//!
//! rust-libp2p's relay refuses reservations (answers HOP with "unsupported") until the node has
//! a confirmed external address, and its reservation replies must carry addresses. So the relay
//! confirms what the operator names (`external`), or else every listen address that is neither
//! unspecified nor loopback as it comes up.
//!
//! A relay with no external address offers no HOP protocol at all (clients see "could not
//! negotiate hop"), so that state is not left silent: it is reported as an event
//! ([`RelayEvent::NoExternalAddress`]) once the listeners are up, and `/health` answers 503
//! with the same words until an address is confirmed ([`Relay::health`]).
//!
//! Every limit of the relay is a field of [`Limits`]; the defaults are rust-libp2p's (and
//! go-libp2p's) for circuits and reservations. A measurement lab sends every trial from the same
//! few NAT addresses, so it raises the per-IP rates or turns them off.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt as _;
use libp2p::identity::Keypair;
use libp2p::metrics::{Metrics, Recorder as _};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, identify, ping, relay};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use telemetry::metrics::Registrar;

/// The identify protocol version natpunch's nodes announce.
pub const PROTOCOL_VERSION: &str = "/natpunch/1.0.0";

/// The agent version natpunch's nodes announce.
pub fn agent_version() -> String {
    format!("natpunch/{}", env!("CARGO_PKG_VERSION"))
}

/// A token-bucket rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests allowed per interval (the bucket's size).
    pub count: NonZeroU32,
    /// The interval.
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;

    /// `COUNT/SECONDS`, e.g. `30/120` (30 per two minutes).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The caller (clap) shows the value: name only what is wrong with it.
        let bad = || "not a rate: COUNT/SECONDS, e.g. 30/120".to_owned();
        let (count, secs) = s.split_once('/').ok_or_else(bad)?;
        let count = count.trim().parse::<NonZeroU32>().map_err(|_| bad())?;
        let secs = secs
            .trim()
            .trim_end_matches('s')
            .parse::<u64>()
            .map_err(|_| bad())?;
        if secs == 0 {
            return Err(bad());
        }
        Ok(Self {
            count,
            per: Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per.as_secs())
    }
}

/// Every limit of the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Reservations held at once.
    pub max_reservations: usize,
    /// Reservations one peer may hold at once.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the client must renew it.
    pub reservation_duration: Duration,
    /// Circuits open at once.
    pub max_circuits: usize,
    /// Circuits one peer may have open at once.
    pub max_circuits_per_peer: usize,
    /// How long a circuit may last.
    pub max_circuit_duration: Duration,
    /// How many bytes a circuit may carry in each direction.
    pub max_circuit_bytes: u64,
    /// Reservation requests per peer (`None`: unlimited).
    pub reservation_rate_per_peer: Option<Rate>,
    /// Reservation requests per source IP address.
    pub reservation_rate_per_ip: Option<Rate>,
    /// Circuit requests per source peer.
    pub circuit_rate_per_peer: Option<Rate>,
    /// Circuit requests per source IP address.
    pub circuit_rate_per_ip: Option<Rate>,
}

impl Default for Limits {
    /// rust-libp2p 0.57's defaults.
    fn default() -> Self {
        let rate = |count, secs| {
            NonZeroU32::new(count).map(|count| Rate {
                count,
                per: Duration::from_secs(secs),
            })
        };
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 16,
            max_circuits_per_peer: 4,
            max_circuit_duration: Duration::from_secs(120),
            max_circuit_bytes: 1 << 17,
            reservation_rate_per_peer: rate(30, 120),
            reservation_rate_per_ip: rate(60, 60),
            circuit_rate_per_peer: rate(30, 120),
            circuit_rate_per_ip: rate(60, 60),
        }
    }
}

impl Limits {
    /// The relay behaviour's configuration.
    pub fn to_config(&self) -> relay::Config {
        let mut c = relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            reservation_rate_limiters: Vec::new(),
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            circuit_src_rate_limiters: Vec::new(),
        };
        if let Some(r) = self.reservation_rate_per_peer {
            c = c.reservation_rate_per_peer(r.count, r.per);
        }
        if let Some(r) = self.reservation_rate_per_ip {
            c = c.reservation_rate_per_ip(r.count, r.per);
        }
        if let Some(r) = self.circuit_rate_per_peer {
            c = c.circuit_src_per_peer(r.count, r.per);
        }
        if let Some(r) = self.circuit_rate_per_ip {
            c = c.circuit_src_per_ip(r.count, r.per);
        }
        c
    }
}

/// Why a relay without an external address is of no use, and what to do.
pub const NO_EXTERNAL_ADDRESS: &str = "no external address: the relay listens on loopback \
    only, so it offers no HOP protocol and every reservation fails; announce the address \
    clients reach it at with --external-addr (e.g. /ip4/203.0.113.7/tcp/4001)";

/// How long after start the listen addresses are taken as complete.
const LISTENERS_SETTLE: Duration = Duration::from_secs(1);

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Addresses to listen on (TCP and QUIC).
    pub listen: Vec<Multiaddr>,
    /// Addresses to announce as the relay's own; empty: the listen addresses as they come up,
    /// without loopback ones.
    pub external: Vec<Multiaddr>,
    /// The relay's limits.
    pub limits: Limits,
    /// How long a connection with no stream stays open.
    pub idle_timeout: Duration,
}

/// The relay node's behaviours.
#[derive(NetworkBehaviour)]
#[expect(
    missing_debug_implementations,
    reason = "libp2p's behaviours do not implement Debug"
)]
pub struct RelayBehaviour {
    /// Circuit relay v2 (HOP and STOP).
    pub relay: relay::Behaviour,
    /// identify: tells clients their observed address.
    pub identify: identify::Behaviour,
    /// ping: keeps connections measured.
    pub ping: ping::Behaviour,
    /// AutoNAT v2 server: dials clients back on the addresses they ask about.
    pub autonat: autonat::v2::server::Behaviour,
}

/// Something the relay did, for people and logs (and, read back from its JSON lines, for
/// programs that run it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum RelayEvent {
    /// Listening on an address.
    Listening {
        /// The address, with `/p2p/<relay>`.
        address: String,
    },
    /// An address is announced as the relay's.
    ExternalAddress {
        /// The address.
        address: String,
    },
    /// The listeners are up and no address is announced: every reservation will fail.
    NoExternalAddress {
        /// What it means and what to do.
        message: String,
    },
    /// A reservation was accepted (or renewed).
    ReservationAccepted {
        /// The peer.
        peer: String,
        /// A renewal of an existing reservation.
        renewed: bool,
        /// Where the peer's connections come from (a peer may hold one per transport): its
        /// public addresses and ports as this vantage point sees them (with the honeypot's,
        /// the remote's NAT mapping class).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        from: Vec<String>,
    },
    /// A reservation was refused.
    ReservationDenied {
        /// The peer.
        peer: String,
        /// The status code sent (circuit v2: RESERVATION_REFUSED, RESOURCE_LIMIT_EXCEEDED, …).
        status: String,
    },
    /// A reservation ended (closed or timed out).
    ReservationEnded {
        /// The peer.
        peer: String,
        /// Timed out rather than closed.
        timed_out: bool,
    },
    /// A circuit was opened.
    CircuitAccepted {
        /// The dialing peer.
        src: String,
        /// The peer dialed.
        dst: String,
    },
    /// A circuit was refused.
    CircuitDenied {
        /// The dialing peer.
        src: String,
        /// The peer dialed.
        dst: String,
        /// The status code sent.
        status: String,
    },
    /// A circuit ended.
    CircuitClosed {
        /// The dialing peer.
        src: String,
        /// The peer dialed.
        dst: String,
        /// Why, if it ended with an error (limits reached show here).
        error: Option<String>,
    },
}

/// A relay node: its swarm and its metrics.
pub struct Relay {
    swarm: Swarm<RelayBehaviour>,
    config: RelayConfig,
    health: telemetry::Health,
    metrics: Metrics,
    reservations: Gauge,
    circuits: Gauge,
    /// Each peer's connections and the address each comes from, oldest first.
    connections: HashMap<PeerId, Vec<(ConnectionId, Multiaddr)>>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("peer_id", self.swarm.local_peer_id())
            .finish_non_exhaustive()
    }
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The transport could not be built.
    #[error("building the transport: {0}")]
    Transport(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// One line for people, e.g. `circuit 12D3… -> 12D3… closed`.
impl fmt::Display for RelayEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Listening { address } => write!(f, "listening on {address}"),
            Self::ExternalAddress { address } => write!(f, "announcing {address}"),
            Self::NoExternalAddress { .. } => f.write_str("announcing no address"),
            Self::ReservationAccepted {
                peer,
                renewed,
                from,
            } => write!(
                f,
                "reservation {} for {peer}{}",
                if *renewed { "renewed" } else { "accepted" },
                if from.is_empty() {
                    String::new()
                } else {
                    format!(" from {}", from.join(", "))
                }
            ),
            Self::ReservationDenied { peer, status } => {
                write!(f, "reservation refused for {peer}: {status}")
            }
            Self::ReservationEnded { peer, timed_out } => write!(
                f,
                "reservation of {peer} {}",
                if *timed_out { "timed out" } else { "closed" }
            ),
            Self::CircuitAccepted { src, dst } => write!(f, "circuit {src} -> {dst}"),
            Self::CircuitDenied { src, dst, status } => {
                write!(f, "circuit {src} -> {dst} refused: {status}")
            }
            Self::CircuitClosed { src, dst, error } => match error {
                Some(e) => write!(f, "circuit {src} -> {dst} closed: {e}"),
                None => write!(f, "circuit {src} -> {dst} closed"),
            },
        }
    }
}

impl Relay {
    /// Builds the relay (within a tokio runtime) and starts listening. Its metrics are
    /// registered in `registry`.
    pub fn new(
        key: Keypair,
        config: RelayConfig,
        registry: &mut Registry,
    ) -> Result<Self, RelayError> {
        let metrics = Metrics::new(registry);
        let mut natpunch = Registrar::with_prefix(registry, "natpunch_relay");
        let reservations = natpunch.gauge("reservations", "Reservations held now");
        let circuits = natpunch.gauge("circuits", "Circuits open now");
        let limits = config.limits.to_config();
        let idle = config.idle_timeout;
        let mut swarm = crate::host::swarm(key, idle, |key| RelayBehaviour {
            relay: relay::Behaviour::new(key.public().to_peer_id(), limits),
            identify: identify::Behaviour::new(
                identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                    .with_agent_version(agent_version()),
            ),
            ping: ping::Behaviour::default(),
            autonat: autonat::v2::server::Behaviour::default(),
        })
        .map_err(RelayError::Transport)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| RelayError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        for addr in &config.external {
            swarm.add_external_address(addr.clone());
        }
        let health = telemetry::Health::default();
        if config.external.is_empty() {
            health.set(Some(NO_EXTERNAL_ADDRESS.into()));
        }
        Ok(Self {
            connections: HashMap::new(),
            swarm,
            config,
            health,
            metrics,
            reservations,
            circuits,
        })
    }

    /// The relay's peer ID.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// The relay's health, for `/health`: unhealthy while it has no external address.
    pub fn health(&self) -> telemetry::Health {
        self.health.clone()
    }

    /// Runs the relay until `stop` completes, reporting what it does to `report`.
    pub async fn run(
        &mut self,
        stop: impl Future<Output = ()>,
        report: &mut impl FnMut(RelayEvent),
    ) {
        let me = self.peer_id();
        for addr in &self.config.external {
            report(RelayEvent::ExternalAddress {
                address: addr.clone().with(Protocol::P2p(me)).to_string(),
            });
        }
        tokio::pin!(stop);
        // Listen addresses come up within milliseconds; after this, none announced is final
        // until an address is confirmed.
        let settled = tokio::time::sleep(LISTENERS_SETTLE);
        tokio::pin!(settled);
        let mut checked = false;
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = &mut settled, if !checked => {
                    checked = true;
                    if self.swarm.external_addresses().next().is_none() {
                        report(RelayEvent::NoExternalAddress {
                            message: NO_EXTERNAL_ADDRESS.into(),
                        });
                    }
                }
                event = self.swarm.select_next_some() => {
                    for e in self.on_event(event) {
                        report(e);
                    }
                }
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<RelayBehaviourEvent>) -> Vec<RelayEvent> {
        self.metrics.record(&event);
        let me = self.peer_id();
        let mut events = Vec::new();
        let e = match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let public = !address.iter().any(|p| match p {
                    Protocol::Ip4(ip) => ip.is_loopback() || ip.is_unspecified(),
                    Protocol::Ip6(ip) => ip.is_loopback() || ip.is_unspecified(),
                    _ => false,
                });
                let full = address.clone().with(Protocol::P2p(me)).to_string();
                events.push(RelayEvent::Listening {
                    address: full.clone(),
                });
                if self.config.external.is_empty() && public {
                    // add_external_address confirms without a swarm event: report it here.
                    self.swarm.add_external_address(address);
                    self.health.set(None);
                    Some(RelayEvent::ExternalAddress { address: full })
                } else {
                    None
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                self.health.set(None);
                Some(RelayEvent::ExternalAddress {
                    address: address.with(Protocol::P2p(me)).to_string(),
                })
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let from = endpoint.get_remote_address();
                if ip_of(from).is_some() {
                    self.connections
                        .entry(peer_id)
                        .or_default()
                        .push((connection_id, from.clone()));
                }
                None
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                if let Some(list) = self.connections.get_mut(&peer_id) {
                    list.retain(|(c, _)| *c != connection_id);
                    if list.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
                None
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Relay(e)) => {
                self.metrics.record(&e);
                if let relay::Event::ReservationReqAccepted {
                    src_peer_id,
                    renewed: false,
                } = &e
                {
                    self.drop_moved_connections(*src_peer_id);
                }
                self.on_relay_event(e)
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Identify(e)) => {
                self.metrics.record(&e);
                None
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Ping(e)) => {
                self.metrics.record(&e);
                None
            }
            _ => None,
        };
        events.extend(e);
        events
    }

    /// A peer reserved anew: its connections from an address other than its newest
    /// connection's are a host that moved (its router got a new address) and cannot answer any
    /// more, though nothing told this end. They go, so that no circuit is routed into them.
    fn drop_moved_connections(&mut self, peer: PeerId) {
        let Some(list) = self.connections.get(&peer) else {
            return;
        };
        let Some(newest) = list.last().and_then(|(_, a)| ip_of(a)) else {
            return;
        };
        let moved: Vec<ConnectionId> = list
            .iter()
            .filter(|(_, a)| ip_of(a) != Some(newest))
            .map(|(c, _)| *c)
            .collect();
        for c in moved {
            self.swarm.close_connection(c);
        }
    }

    #[allow(
        deprecated,
        reason = "the deprecated *Failed events still arrive and are ignored"
    )]
    fn on_relay_event(&mut self, e: relay::Event) -> Option<RelayEvent> {
        use relay::Event as E;
        Some(match e {
            E::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                if !renewed {
                    self.reservations.inc();
                }
                RelayEvent::ReservationAccepted {
                    peer: src_peer_id.to_string(),
                    renewed,
                    from: self
                        .connections
                        .get(&src_peer_id)
                        .map(|list| list.iter().map(|(_, a)| a.to_string()).collect())
                        .unwrap_or_default(),
                }
            }
            E::ReservationReqDenied {
                src_peer_id,
                status,
            } => RelayEvent::ReservationDenied {
                peer: src_peer_id.to_string(),
                status: format!("{status:?}"),
            },
            E::ReservationClosed { src_peer_id } => {
                self.reservations.dec();
                RelayEvent::ReservationEnded {
                    peer: src_peer_id.to_string(),
                    timed_out: false,
                }
            }
            E::ReservationTimedOut { src_peer_id } => {
                self.reservations.dec();
                RelayEvent::ReservationEnded {
                    peer: src_peer_id.to_string(),
                    timed_out: true,
                }
            }
            E::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                self.circuits.inc();
                RelayEvent::CircuitAccepted {
                    src: src_peer_id.to_string(),
                    dst: dst_peer_id.to_string(),
                }
            }
            E::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => RelayEvent::CircuitDenied {
                src: src_peer_id.to_string(),
                dst: dst_peer_id.to_string(),
                status: format!("{status:?}"),
            },
            E::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                self.circuits.dec();
                RelayEvent::CircuitClosed {
                    src: src_peer_id.to_string(),
                    dst: dst_peer_id.to_string(),
                    error: error.map(|e| e.to_string()),
                }
            }
            _ => return None,
        })
    }
}

/// The IP address an address starts with.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let r: Rate = "30/120".parse().expect("rate");
        assert_eq!(r.count.get(), 30);
        assert_eq!(r.per, Duration::from_secs(120));
        assert_eq!(r.to_string(), "30/120");
        assert_eq!("5/10s".parse::<Rate>().map(|r| r.per.as_secs()), Ok(10));
        for bad in ["", "30", "0/10", "3/0", "x/1", "3/-1"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
}

//! The peer's swarm: its behaviours, the transports tuned for the engine in use, the relay's
//! addresses, and what the peer reads from the swarm's connection events.

use std::fmt;
use std::time::Duration;

use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, identify, kad, noise, ping, relay, tcp, yamux,
};

use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::swarm::DialError;

use super::{PeerConfig, PeerError};
use crate::candidates::CandidateFeed;
use crate::punch::Engine;
use crate::punch::{DialFailed, is_relayed};
use crate::record::{DialFailure, Side};
use crate::relay::{PROTOCOL_VERSION, agent_version};

/// The peer's behaviours.
#[derive(NetworkBehaviour)]
pub(super) struct PeerBehaviour {
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) autonat: autonat::v2::client::Behaviour,
    pub(super) stream: libp2p_stream::Behaviour,
    pub(super) dcutr: Toggle<dcutr::Behaviour>,
    pub(super) feed: CandidateFeed,
    pub(super) kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
}

/// Builds the swarm for `config` (inside a tokio runtime). natpunch's engine bounds the QUIC
/// handshake and the connection by its attempt timeout and negotiates streams optimistically.
pub(super) fn build(key: Keypair, config: &PeerConfig) -> Result<Swarm<PeerBehaviour>, PeerError> {
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
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
            // Probe soon after start (the default waits 5 s between probes), so that
            // reachability is reported while the peer starts up.
            autonat: autonat::v2::client::Behaviour::new(
                rand::make_rng::<rand::rngs::StdRng>(),
                autonat::v2::client::Config::default().with_probe_interval(Duration::from_secs(1)),
            ),
            stream: libp2p_stream::Behaviour::new(),
            dcutr: Toggle::from(stock.then(|| dcutr::Behaviour::new(key.public().to_peer_id()))),
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
    Ok(swarm)
}

/// The relay address for each transport in use.
pub(super) fn relay_addrs(config: &PeerConfig) -> Result<(PeerId, Vec<Multiaddr>), PeerError> {
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

pub(super) fn endpoint_relayed(e: &ConnectedPoint) -> bool {
    match e {
        ConnectedPoint::Dialer { address, .. } => is_relayed(address),
        ConnectedPoint::Listener { local_addr, .. } => is_relayed(local_addr),
    }
}

pub(super) fn remote_addr(e: &ConnectedPoint) -> &Multiaddr {
    match e {
        ConnectedPoint::Dialer { address, .. } => address,
        ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
    }
}

/// Whether the relayed connection's dialer (A) made this direct connection.
pub(super) fn made_by_a(side: Side, e: &ConnectedPoint) -> bool {
    match (side, e) {
        (Side::Dialer, ConnectedPoint::Dialer { role_override, .. }) => {
            *role_override == Endpoint::Dialer
        }
        (Side::Dialer, ConnectedPoint::Listener { .. }) => false,
        (Side::Listener, ConnectedPoint::Listener { .. }) => true,
        (Side::Listener, ConnectedPoint::Dialer { .. }) => false,
    }
}

/// A failed dial as the engine takes it.
pub(super) fn dial_failed(error: &DialError) -> DialFailed {
    let failures = match error {
        DialError::Transport(list) => list
            .iter()
            .map(|(addr, e)| DialFailure {
                addr: addr.to_string(),
                error: error_chain(e),
            })
            .collect(),
        _ => Vec::new(),
    };
    let text = error_chain(error);
    let lower = text.to_lowercase();
    DialFailed {
        timed_out: lower.contains("timeout") || lower.contains("timed out"),
        error: text,
        failures,
    }
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

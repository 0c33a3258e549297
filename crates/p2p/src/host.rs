//! What the relay and the honeypot, both long-running servers, build the same way: their
//! listen addresses and their swarm (which tests that need a plain libp2p host use too).

use std::net::IpAddr;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Multiaddr, Swarm, noise, tcp, yamux};

/// The addresses a server listens on at `ip`: TCP and QUIC v1 on the same port number (0: free
/// ones).
pub fn listen_addrs(ip: IpAddr, port: u16) -> Vec<Multiaddr> {
    let base = Multiaddr::empty().with(match ip {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    });
    vec![
        base.clone().with(Protocol::Tcp(port)),
        base.with(Protocol::Udp(port)).with(Protocol::QuicV1),
    ]
}

/// A swarm (within a tokio runtime) as natpunch's servers build theirs: TCP with Noise and
/// Yamux, and QUIC, running `behaviour`, closing connections idle for `idle`.
pub fn swarm<B: NetworkBehaviour>(
    key: Keypair,
    idle: Duration,
    behaviour: impl FnOnce(&Keypair) -> B,
) -> Result<Swarm<B>, String> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_quic()
        .with_behaviour(behaviour)
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}

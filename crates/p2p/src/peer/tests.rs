//! The peer fed swarm events by hand: no socket, no swarm polling.

use super::defaults::MAX_STOCK_CANDIDATES;
use super::*;
use crate::relay::PROTOCOL_VERSION;
use libp2p::core::Endpoint;

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
        let circuit: Multiaddr = format!("/ip4/11.99.0.12/tcp/4001/p2p/{}/p2p-circuit", self.relay)
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
        self.peer.on_swarm(event, &mut |_| {});
        self.peer.tick(Instant::now());
        let _ = self.peer.flush(Mode::Listen, &mut |e| {
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

#[tokio::test]
async fn the_mapping_class_is_learnt_from_what_remotes_at_two_addresses_observe() {
    use behaviour::Mapping;

    let mut fed = Fed::new(false);
    let at = |s: &str| s.parse::<Multiaddr>().expect("addr");
    let mapping = |fed: &Fed| {
        let remote = relay_id();
        fed.peer.punch_setup(Side::Dialer, remote).0.local_mapping
    };
    // The relay saw the listen port at 39001: one observer tells nothing.
    let relay_ip = fed
        .peer
        .relay_addrs
        .first()
        .and_then(observer_ip)
        .expect("ip");
    fed.peer.observe(relay_ip, at("/ip4/11.99.0.20/tcp/39001"));
    assert_eq!(mapping(&fed), None);

    // A remote that dialed this peer sees the port it dialed: not counted.
    let mut inbound = fed.remote();
    inbound.direct.1 = ConnectedPoint::Listener {
        local_addr: at("/ip4/192.168.1.2/tcp/4000"),
        send_back_addr: at("/ip4/11.99.0.30/tcp/5000"),
    };
    let told = |fed: &mut Fed, c: &Conns, observed: &str| {
        fed.established(c, &c.direct);
        let info = identify::Info {
            public_key: c.key.public(),
            protocol_version: PROTOCOL_VERSION.into(),
            agent_version: "test".into(),
            listen_addrs: Vec::new(),
            protocols: vec![DCUTR],
            observed_addr: at(observed),
            signed_peer_record: None,
        };
        fed.feed(SwarmEvent::Behaviour(PeerBehaviourEvent::Identify(
            identify::Event::Received {
                connection_id: c.direct.0,
                peer_id: c.key.public().to_peer_id(),
                info,
            },
        )));
    };
    told(&mut fed, &inbound, "/ip4/11.99.0.20/tcp/4000");
    assert_eq!(mapping(&fed), None);

    // A peer this peer dialed (a DHT node at another address) sees another port: the NAT maps
    // per destination.
    let mut dialed = fed.remote();
    dialed.direct.1 = ConnectedPoint::Dialer {
        address: at("/ip4/11.99.0.31/tcp/11000"),
        role_override: Endpoint::Dialer,
        port_use: libp2p::core::transport::PortUse::Reuse,
    };
    told(&mut fed, &dialed, "/ip4/11.99.0.20/tcp/41234");
    let learnt = mapping(&fed).expect("learnt");
    assert_eq!(learnt.mapping, Mapping::AddressAndPortDependent);
    assert_eq!(learnt.source, MappingSource::Observed);

    // A class given on the command line wins, and nothing is derived.
    let mut told_fed = Fed::new(false);
    let flag = LocalMapping {
        mapping: Mapping::EndpointIndependent,
        source: MappingSource::Flag,
    };
    told_fed.peer.config.local_mapping = Some(flag);
    told_fed
        .peer
        .observe(relay_ip, at("/ip4/11.99.0.20/tcp/39001"));
    told_fed.peer.observe(
        "11.99.0.31".parse().expect("ip"),
        at("/ip4/11.99.0.20/tcp/41234"),
    );
    assert_eq!(mapping(&told_fed), Some(flag));
    assert!(told_fed.peer.observations.is_empty());
}

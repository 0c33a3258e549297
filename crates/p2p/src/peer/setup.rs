//! A peer's start-up, each step waiting for the one before: listen on each transport until a
//! non-loopback address is up (TCP port reuse needs it), map the ports if asked, connect to
//! the relay over each transport and learn the observed addresses from identify, reserve
//! (listener), join the DHT.

use std::net::IpAddr;
use std::time::Instant;

use futures::StreamExt as _;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, identify, relay};

use super::defaults::MAX_STOCK_CANDIDATES;
use super::swarm::PeerBehaviourEvent;
use super::{Candidates, Mode, Peer, PeerError, PeerEvent};
use crate::punch::{Engine, dialable, transport_of, without_p2p};

impl Peer {
    /// Listen, connect to the relay, learn the observed addresses, reserve (listen mode).
    pub(super) async fn setup(
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
                    if let Some(ip) = self.relay_addrs.first().and_then(super::observer_ip) {
                        self.observe(ip, observed.clone());
                    }
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
    pub(super) fn on_background(&mut self, event: SwarmEvent<PeerBehaviourEvent>) {
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
}

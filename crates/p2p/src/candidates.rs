//! A behaviour that hands the swarm extra address candidates.
//!
//! rust-libp2p's `dcutr` behaviour offers in CONNECT only the candidates the swarm reports
//! (`FromSwarm::NewExternalAddrCandidate`). identify reports the observed address with the port
//! replaced by a listen port, which behind a NAT that does not preserve ports is a port nobody
//! mapped. This behaviour reports the address exactly as the relay observed it, so that the
//! stock engine can be given the right candidates too.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Queued candidates, handed to the swarm one per poll.
#[derive(Debug, Default)]
pub struct CandidateFeed {
    queue: VecDeque<Multiaddr>,
}

impl CandidateFeed {
    /// Reports `addr` as a candidate external address.
    pub fn push(&mut self, addr: Multiaddr) {
        self.queue.push_back(addr);
    }
}

impl NetworkBehaviour for CandidateFeed {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.queue.pop_front() {
            Some(addr) => Poll::Ready(ToSwarm::NewExternalAddrCandidate(addr)),
            None => Poll::Pending,
        }
    }
}

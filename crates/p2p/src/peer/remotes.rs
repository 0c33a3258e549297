//! What the peer knows about each remote, kept while the remote is connected.
//!
//! An entry is made by the remote's first connection (or identify's answer on it) and dropped
//! when its last connection closes, so the table holds the remotes connected now; a hard cap
//! ([`MAX_REMOTES`]) stops a flood of connections from growing it further.

use std::collections::HashMap;

use libp2p::PeerId;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::ConnectionId;

use super::defaults::MAX_REMOTES;
use crate::punch::RemoteEngine;
use crate::record::Side;

/// A direct connection to a remote.
#[derive(Debug, Clone)]
pub(super) struct Direct {
    pub(super) id: ConnectionId,
    pub(super) endpoint: ConnectedPoint,
}

/// One remote.
#[derive(Debug, Default)]
pub(super) struct Remote {
    /// Which side of the relayed connection this peer is.
    pub(super) side: Option<Side>,
    /// Direct connections up.
    pub(super) directs: Vec<Direct>,
    /// What identify said it runs.
    pub(super) engine: Option<RemoteEngine>,
}

/// The remotes connected now.
#[derive(Debug)]
pub(super) struct Remotes {
    map: HashMap<PeerId, Remote>,
    cap: usize,
    /// Remotes not tracked because the table was full.
    refused: u64,
}

impl Default for Remotes {
    fn default() -> Self {
        Self::with_cap(MAX_REMOTES)
    }
}

impl Remotes {
    fn with_cap(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap,
            refused: 0,
        }
    }

    /// The entry of `peer`, made if there is room (call only for a connected remote).
    pub(super) fn entry(&mut self, peer: PeerId) -> Option<&mut Remote> {
        if !self.map.contains_key(&peer) && self.map.len() >= self.cap {
            self.refused += 1;
            if self.refused.is_power_of_two() {
                tracing::warn!(
                    %peer,
                    refused = self.refused,
                    "more than {} remotes connected: not tracking this one",
                    self.cap
                );
            }
            return None;
        }
        Some(self.map.entry(peer).or_default())
    }

    pub(super) fn get(&self, peer: &PeerId) -> Option<&Remote> {
        self.map.get(peer)
    }

    pub(super) fn get_mut(&mut self, peer: &PeerId) -> Option<&mut Remote> {
        self.map.get_mut(peer)
    }

    /// Connection `id` to `peer` closed and `remaining` connections to it are left: forget the
    /// connection, and the remote once none is left.
    pub(super) fn on_closed(&mut self, peer: PeerId, id: ConnectionId, remaining: u32) {
        if remaining == 0 {
            self.map.remove(&peer);
        } else if let Some(r) = self.map.get_mut(&peer) {
            r.directs.retain(|d| d.id != id);
        }
    }

    /// Remotes tracked now.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Remotes not tracked because the table was full, since the start.
    pub(super) fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::Multiaddr;
    use libp2p::identity::Keypair;

    fn direct(id: usize) -> Direct {
        let addr: Multiaddr = "/ip4/11.99.0.11/udp/4000/quic-v1".parse().expect("addr");
        Direct {
            id: ConnectionId::new_unchecked(id),
            endpoint: ConnectedPoint::Listener {
                local_addr: addr.clone(),
                send_back_addr: addr,
            },
        }
    }

    #[test]
    fn a_remote_is_forgotten_with_its_last_connection() {
        let mut r = Remotes::default();
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let e = r.entry(peer).expect("room");
        e.side = Some(Side::Listener);
        e.directs.extend([direct(2), direct(3)]);
        // The relayed connection (1) and one direct one close; one direct connection is left.
        r.on_closed(peer, ConnectionId::new_unchecked(1), 2);
        r.on_closed(peer, ConnectionId::new_unchecked(2), 1);
        let left = r.get(&peer).expect("still connected");
        assert_eq!(left.directs.len(), 1);
        assert_eq!(left.side, Some(Side::Listener));
        r.on_closed(peer, ConnectionId::new_unchecked(3), 0);
        assert!(r.get(&peer).is_none());
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn beyond_the_cap_new_remotes_are_not_tracked() {
        let mut r = Remotes::with_cap(3);
        let peers: Vec<PeerId> = (0..5)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        for p in &peers {
            let _ = r.entry(*p);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.refused(), 2);
        assert!(
            r.entry(peers[0]).is_some(),
            "a tracked remote keeps its entry"
        );
        r.on_closed(peers[0], ConnectionId::new_unchecked(1), 0);
        assert!(r.entry(peers[4]).is_some(), "room again once one is gone");
    }
}

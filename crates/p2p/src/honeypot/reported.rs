//! What the honeypot has already reported: per peer, a digest of the addresses it last
//! reported, for the most recently seen peers only.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use libp2p::PeerId;

/// The addresses last reported per peer, for at most `capacity` peers; the least recently
/// seen peer is forgotten first.
///
/// Only a 64-bit digest of the addresses is kept, so an entry's size does not depend on what a
/// peer announces.
#[derive(Debug)]
pub(super) struct Reported {
    capacity: usize,
    peers: HashMap<PeerId, Entry>,
    /// Peers by when they were last seen (a counter), oldest first.
    by_age: BTreeMap<u64, PeerId>,
    clock: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    digest: u64,
    seen: u64,
}

/// A digest of `addrs` (sorted and without duplicates). `DefaultHasher::new` has fixed keys,
/// so equal address lists give equal digests.
fn digest(addrs: &[String]) -> u64 {
    let mut h = DefaultHasher::new();
    addrs.hash(&mut h);
    h.finish()
}

impl Reported {
    /// Remembers at most `capacity` peers (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            peers: HashMap::new(),
            by_age: BTreeMap::new(),
            clock: 0,
        }
    }

    /// Notes that `peer` announced `addrs` (sorted, without duplicates); true when that is news
    /// to report: a peer not remembered, or other addresses than it last reported.
    pub(super) fn update(&mut self, peer: PeerId, addrs: &[String]) -> bool {
        let digest = digest(addrs);
        self.clock += 1;
        let seen = self.clock;
        let news = match self.peers.insert(peer, Entry { digest, seen }) {
            Some(old) => {
                self.by_age.remove(&old.seen);
                old.digest != digest
            }
            None => true,
        };
        self.by_age.insert(seen, peer);
        while self.peers.len() > self.capacity {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.peers.remove(&oldest);
        }
        news
    }

    /// Peers remembered now.
    pub(super) fn len(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_peer_is_news_once_per_address_set() {
        let mut r = Reported::new(8);
        let p = PeerId::random();
        let one = addrs(&["/ip4/1.2.3.4/tcp/1"]);
        let two = addrs(&["/ip4/1.2.3.4/tcp/1", "/ip4/5.6.7.8/tcp/2"]);
        assert!(r.update(p, &one));
        assert!(!r.update(p, &one), "the same addresses again are not news");
        assert!(r.update(p, &two), "a push with new addresses is");
        assert!(!r.update(p, &two));
        assert!(r.update(p, &one), "and so is going back");
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_least_recently_seen_peers_are_forgotten_beyond_capacity() {
        let mut r = Reported::new(3);
        let a = addrs(&["/ip4/1.2.3.4/tcp/1"]);
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        for p in &peers[..3] {
            assert!(r.update(*p, &a));
        }
        // Seeing the first again makes the second the oldest.
        assert!(!r.update(peers[0], &a));
        assert!(r.update(peers[3], &a));
        assert_eq!(r.len(), 3);
        assert!(!r.update(peers[0], &a), "recently seen: still remembered");
        assert!(!r.update(peers[3], &a));
        assert!(!r.update(peers[2], &a));
        assert!(
            r.update(peers[1], &a),
            "the oldest was forgotten: news again"
        );
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn a_stream_of_new_peers_never_grows_it_past_capacity() {
        let mut r = Reported::new(100);
        let a = addrs(&["/ip4/1.2.3.4/tcp/1"]);
        for _ in 0..10_000 {
            assert!(r.update(PeerId::random(), &a));
            assert!(r.len() <= 100);
        }
        assert_eq!(r.len(), 100);
        assert_eq!(r.by_age.len(), 100, "the age index is pruned alongside");
        assert_eq!(Reported::new(0).capacity, 1);
    }
}

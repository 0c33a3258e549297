//! The remote's NAT from two vantage points: the relay and the honeypot each see the public
//! address and port a peer's connection comes from. A libp2p peer dials QUIC from the one UDP
//! socket it listens on, so a NAT whose mapping is endpoint-independent shows both the same
//! address and port, and one whose mapping depends on the destination shows them different
//! ports (or addresses). TCP connections are left out: libp2p dials them from a fresh
//! ephemeral port each (unless port reuse is on, which a vantage point cannot know), so two of
//! them differ in port even without a NAT.
//!
//! Two vantage points on different hosts tell these two classes apart and nothing finer: an
//! address-dependent mapping and an address-and-port-dependent one look alike from them, as do
//! no NAT and an endpoint-independent one, and filtering is not seen at all. Where the evidence
//! is short (one vantage point, or the two saw different transports) the answer is
//! [`UNKNOWN`].

use std::collections::BTreeMap;
use std::net::IpAddr;

/// The mapping is the same for every destination (no NAT looks the same).
pub const ENDPOINT_INDEPENDENT: &str = "endpoint-independent";
/// The mapping depends on the destination (address-dependent or address-and-port-dependent).
pub const ENDPOINT_DEPENDENT: &str = "endpoint-dependent";
/// The vantage points cannot tell.
pub const UNKNOWN: &str = "unknown";

/// What one vantage point saw of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The vantage point (the observer's id).
    pub observer: i64,
    /// The multiaddr the peer's connection came from, as text.
    pub addr: String,
    /// When, Unix ns.
    pub at: i64,
}

/// A connection's source: transport, address and port; `None` for a relayed connection, a
/// TCP one, or an address that is not IP and UDP port.
fn source(addr: &str) -> Option<(&str, IpAddr, u16)> {
    if addr.contains("/p2p-circuit") {
        return None;
    }
    let mut parts = addr.split('/').skip(1);
    let ip = match (parts.next()?, parts.next()?) {
        ("ip4" | "ip6", ip) => ip.parse().ok()?,
        _ => return None,
    };
    let (transport, port) = (parts.next()?, parts.next()?.parse().ok()?);
    (transport == "udp").then_some((transport, ip, port))
}

/// When a vantage point saw a peer, and from which address and port.
type Seen = (i64, IpAddr, u16);

/// The remote's mapping class from what the vantage points saw: each vantage point's latest
/// UDP observation per address family is compared with the others'.
pub fn remote_nat(observations: &[Observation]) -> &'static str {
    // (transport, IPv6?) → observer → its latest (time, address, port).
    let mut latest: BTreeMap<(&str, bool), BTreeMap<i64, Seen>> = BTreeMap::new();
    for o in observations {
        let Some((transport, ip, port)) = source(&o.addr) else {
            continue;
        };
        let seen = latest
            .entry((transport, ip.is_ipv6()))
            .or_default()
            .entry(o.observer)
            .or_insert((o.at, ip, port));
        // The latest; between two at the same time, either way the same one.
        if (o.at, ip, port) > *seen {
            *seen = (o.at, ip, port);
        }
    }
    let mut verdict = UNKNOWN;
    for by_observer in latest.values().filter(|m| m.len() >= 2) {
        let mut sources = by_observer.values().map(|&(_, ip, port)| (ip, port));
        let first = sources.next();
        if sources.any(|s| Some(s) != first) {
            return ENDPOINT_DEPENDENT;
        }
        verdict = ENDPOINT_INDEPENDENT;
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(observer: i64, addr: &str, at: i64) -> Observation {
        Observation {
            observer,
            addr: addr.into(),
            at,
        }
    }

    #[test]
    fn the_same_port_to_both_is_endpoint_independent() {
        let o = [
            seen(1, "/ip4/203.0.113.9/udp/40000/quic-v1", 10),
            seen(2, "/ip4/203.0.113.9/udp/40000/quic-v1", 20),
        ];
        assert_eq!(remote_nat(&o), ENDPOINT_INDEPENDENT);
    }

    #[test]
    fn another_port_or_address_is_endpoint_dependent() {
        let ports = [
            seen(1, "/ip4/203.0.113.9/udp/40000/quic-v1", 10),
            seen(2, "/ip4/203.0.113.9/udp/40001/quic-v1", 20),
        ];
        assert_eq!(remote_nat(&ports), ENDPOINT_DEPENDENT);
        let addresses = [
            seen(1, "/ip4/203.0.113.9/udp/4001/quic-v1", 10),
            seen(2, "/ip4/203.0.113.10/udp/4001/quic-v1", 20),
        ];
        assert_eq!(remote_nat(&addresses), ENDPOINT_DEPENDENT);
    }

    #[test]
    fn one_vantage_point_or_two_transports_cannot_tell() {
        assert_eq!(remote_nat(&[]), UNKNOWN);
        let one = [
            seen(1, "/ip4/203.0.113.9/udp/40000/quic-v1", 10),
            seen(1, "/ip4/203.0.113.9/udp/40001/quic-v1", 20),
        ];
        assert_eq!(remote_nat(&one), UNKNOWN, "one observer, a rebound socket");
        let transports = [
            seen(1, "/ip4/203.0.113.9/udp/40000/quic-v1", 10),
            seen(2, "/ip4/203.0.113.9/tcp/40001", 20),
        ];
        assert_eq!(remote_nat(&transports), UNKNOWN);
        // TCP dials come from fresh ports: they say nothing of the mapping.
        let tcp = [
            seen(1, "/ip4/203.0.113.9/tcp/51000", 10),
            seen(2, "/ip4/203.0.113.9/tcp/51007", 20),
        ];
        assert_eq!(remote_nat(&tcp), UNKNOWN);
        let relayed = [
            seen(1, "/ip4/203.0.113.9/udp/40000/quic-v1", 10),
            seen(
                2,
                "/ip4/198.51.100.1/udp/4001/quic-v1/p2p/12D3KooWR/p2p-circuit",
                20,
            ),
        ];
        assert_eq!(remote_nat(&relayed), UNKNOWN);
    }

    #[test]
    fn each_vantage_points_latest_observation_counts() {
        // Observer 2 saw the peer earlier from another port (before its router restarted, say).
        let o = [
            seen(2, "/ip4/203.0.113.9/udp/39999/quic-v1", 5),
            seen(1, "/ip4/203.0.113.9/udp/40000/quic-v1", 10),
            seen(2, "/ip4/203.0.113.9/udp/40000/quic-v1", 20),
        ];
        assert_eq!(remote_nat(&o), ENDPOINT_INDEPENDENT);
    }

    #[test]
    fn malformed_addresses_are_left_out() {
        let o = [
            seen(1, "garbage", 10),
            seen(2, "/ip4/300.1.1.1/udp/1/quic-v1", 20),
            seen(3, "/ip4/1.1.1.1/udp/99999/quic-v1", 30),
            seen(4, "/dns4/x/udp/1", 40),
        ];
        assert_eq!(remote_nat(&o), UNKNOWN);
    }
}

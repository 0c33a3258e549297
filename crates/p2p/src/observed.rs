//! A peer's NAT mapping class from what remotes observe of it (identify's `observed_addr`),
//! when nothing better (a flag, an RFC 5780 check) is known.
//!
//! Every connection a natpunch peer dials leaves from its listen port (port reuse), so what a
//! remote observes is the NAT's mapping of that port towards that remote. Remotes at two or
//! more IP addresses that observe the same address mean an endpoint-independent mapping; any
//! two that differ, a mapping per destination (which of address- or port-dependent cannot be
//! told, so the stricter); the peer's own listen address, no NAT. One observer, or several at
//! one IP address, tells nothing. Only observations of connections this peer dialed count, one
//! transport at a time (TCP first): an inbound connection shows the port it was dialed at.

use std::net::IpAddr;

use behaviour::Mapping;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// Observations kept: the first ones of the relay and the few peers a peer dials (a DHT
/// bootstrap node, a honeypot) settle the question; more only cost memory.
pub const MAX_OBSERVATIONS: usize = 16;

/// One observation: the observer's IP address and the address it observed.
pub type Observation = (IpAddr, Multiaddr);

/// The mapping class the observations say, if they say one. `own`: the addresses this peer
/// listens on.
pub fn infer_mapping(observations: &[Observation], own: &[Multiaddr]) -> Option<Mapping> {
    ["tcp", "udp"].into_iter().find_map(|transport| {
        let these: Vec<&Observation> = observations
            .iter()
            .filter(|(_, a)| transport_of(a) == Some(transport))
            .collect();
        let mut observers: Vec<IpAddr> = these.iter().map(|(ip, _)| *ip).collect();
        observers.sort();
        observers.dedup();
        if observers.len() < 2 {
            return None;
        }
        let first = &these.first()?.1;
        Some(if these.iter().any(|(_, a)| a != first) {
            Mapping::AddressAndPortDependent
        } else if own.contains(first) {
            Mapping::None
        } else {
            Mapping::EndpointIndependent
        })
    })
}

/// `tcp` or `udp`, for an IP address with a port.
fn transport_of(a: &Multiaddr) -> Option<&'static str> {
    a.iter().find_map(|p| match p {
        Protocol::Tcp(_) => Some("tcp"),
        Protocol::Udp(_) => Some("udp"),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(observer: &str, observed: &str) -> Observation {
        (
            observer.parse().expect("ip"),
            observed.parse().expect("multiaddr"),
        )
    }

    const TCP: &str = "/ip4/11.99.0.11/tcp/4001";

    #[test]
    fn two_observers_at_different_addresses_that_agree_mean_endpoint_independent() {
        let o = [obs("11.99.0.2", TCP), obs("11.99.0.3", TCP)];
        assert_eq!(infer_mapping(&o, &[]), Some(Mapping::EndpointIndependent));
    }

    #[test]
    fn observers_that_see_different_ports_mean_a_mapping_per_destination() {
        let o = [
            obs("11.99.0.2", TCP),
            obs("11.99.0.3", "/ip4/11.99.0.11/tcp/39001"),
        ];
        assert_eq!(
            infer_mapping(&o, &[]),
            Some(Mapping::AddressAndPortDependent)
        );
    }

    #[test]
    fn the_own_listen_address_means_no_nat() {
        let o = [obs("11.99.0.2", TCP), obs("11.99.0.3", TCP)];
        let own: Multiaddr = TCP.parse().expect("multiaddr");
        assert_eq!(infer_mapping(&o, &[own]), Some(Mapping::None));
    }

    #[test]
    fn one_observer_or_one_address_tells_nothing() {
        assert_eq!(infer_mapping(&[], &[]), None);
        assert_eq!(infer_mapping(&[obs("11.99.0.2", TCP)], &[]), None);
        let same_ip = [
            obs("11.99.0.2", TCP),
            obs("11.99.0.2", "/ip4/11.99.0.11/tcp/39001"),
        ];
        assert_eq!(infer_mapping(&same_ip, &[]), None);
    }

    #[test]
    fn tcp_is_asked_first_and_quic_when_tcp_tells_nothing() {
        let quic = "/ip4/11.99.0.11/udp/4001/quic-v1";
        let o = [
            obs("11.99.0.2", TCP),
            obs("11.99.0.2", quic),
            obs("11.99.0.3", "/ip4/11.99.0.11/udp/5000/quic-v1"),
        ];
        assert_eq!(
            infer_mapping(&o, &[]),
            Some(Mapping::AddressAndPortDependent)
        );
    }
}

//! The direct techniques, as async functions the daemon's driver runs for the [`plan`]'s
//! sequencer: [`udp_punch`] and [`tcp_simultaneous_open`] (plain, or NUTSS-style with a low-TTL
//! first SYN and an [`IcmpGuard`]).
//!
//! Both ends run the same function at about the same time, each with the other's candidate
//! addresses and a random 16-byte token they exchanged through the relay beforehand. The token
//! is checked on the wire, so a socket is handed over only when it reaches the right peer (not
//! some other program on the same port, nor a stale attempt). Each returns a connected std
//! socket in blocking mode, ready to be passed to an application.
//!
//! [`birthday`] is birthday probing, for a NAT that picks a random port per destination: the
//! arithmetic, the easy side's sans-IO prober, and both sides' drivers (not chosen by the
//! daemon's plan yet).
//!
//! What they do not do: learn candidates (STUN, port mappings), talk to the relay, pick local
//! ports, or predict ports for NATs that map per destination. Reusing one 4-tuple for a new
//! round within the NATs' conntrack timeouts can fail (a NAT still holds the old attempt's
//! state), so the caller should pass a fresh local port to each round.
//!
//! [`plan`]: crate::plan

use std::net::SocketAddr;
use std::time::Duration;

pub mod birthday;
pub mod tcp;
pub mod udp;

pub use tcp::{Hello, HelloError, IcmpGuard, tcp_simultaneous_open};
pub use udp::{Datagram, DecodeError, Kind, Puncher, Transmit, udp_punch};

/// Constants of the techniques, each with its reason.
pub mod defaults {
    use std::time::Duration;

    /// Candidates a technique tries at most; more are ignored. A peer has a few addresses
    /// (LAN, reflexive, mapped, per interface), and each costs a probe per round or a socket.
    pub const MAX_CANDIDATES: usize = 16;
    /// Time between UDP probe rounds: a few rounds fit in one RTT, and 16 candidates × 29 bytes
    /// every 25 ms is under 20 kB/s.
    pub const PROBE_INTERVAL: Duration = Duration::from_millis(25);
    /// Shortest time between two acks to one address, so a flood of probes gets few answers.
    pub const ACK_INTERVAL: Duration = Duration::from_millis(50);
    /// How long an end that got its ack waits for a probe of the peer to answer (the peer
    /// needs an ack too, and finishes only with one).
    pub const LINGER: Duration = Duration::from_millis(300);
    /// Probe rounds whose send time is remembered for the RTT (1.6 s at 25 ms).
    pub const SENT_MEMORY: usize = 64;
    /// Addresses whose last ack time is remembered (the oldest is forgotten first).
    pub const ADDRESS_MEMORY: usize = 32;
    /// Datagrams waiting to be sent, at most; more are dropped (it is UDP).
    pub const TRANSMIT_QUEUE: usize = 64;
    /// Time between TCP attempts to one candidate after one was refused, reset or rejected.
    pub const TCP_RETRY: Duration = Duration::from_millis(200);
    /// How long the TCP token exchange may take once connected: one RTT is plenty.
    pub const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
}

/// What a technique made.
#[derive(Debug)]
pub struct Punched<S> {
    /// The connected socket, in blocking mode.
    pub socket: S,
    /// The remote address it is connected to.
    pub remote: SocketAddr,
    /// The round trip measured while connecting (UDP: probe to ack; TCP: `None`, a
    /// simultaneous open measures none).
    pub rtt: Option<Duration>,
}

/// Which end of a TCP attempt this is. The two ends pass different sides: the token check
/// accepts only the other side, and the initiator chooses the socket both keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Chooses which connection both ends keep.
    Initiator,
    /// Keeps the connection the initiator chose.
    Responder,
}

impl Side {
    /// The side's byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Self::Initiator => 1,
            Self::Responder => 2,
        }
    }

    /// The other side.
    pub fn other(self) -> Self {
        match self {
            Self::Initiator => Self::Responder,
            Self::Responder => Self::Initiator,
        }
    }
}

/// Why a technique gave no socket.
#[derive(Debug, thiserror::Error)]
pub enum TechniqueError {
    /// Nothing answered with the token before the deadline.
    #[error("no answer with the token before the deadline ({tried} tried{})", last_of(.last))]
    Timeout {
        /// Candidates probed (UDP) or connection attempts made (TCP).
        tried: usize,
        /// The last thing that went wrong, if anything did.
        last: Option<String>,
    },
    /// The local socket could not be set up (bind, options).
    #[error("local socket")]
    Io(#[from] std::io::Error),
    /// No candidate to try.
    #[error("no candidate to try: the peer sent none, or only IPv6 addresses to an IPv4 socket")]
    NoCandidates,
}

/// The candidates (the first [`defaults::MAX_CANDIDATES`]) a socket bound to `local` can
/// reach, as it must name them: an IPv4 candidate becomes IPv4-mapped for an IPv6 socket
/// (dual-stack, as Linux makes them by default), and an IPv6 one is left out for an IPv4
/// socket.
fn reachable(local: SocketAddr, candidates: &[SocketAddr]) -> Vec<SocketAddr> {
    candidates
        .iter()
        .take(defaults::MAX_CANDIDATES)
        .filter_map(|c| match (local, c) {
            (SocketAddr::V4(_), SocketAddr::V6(_)) => None,
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                Some(SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()))
            }
            _ => Some(*c),
        })
        .collect()
}

/// `addr` as the peer gave it: an IPv4-mapped address as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn last_of(last: &Option<String>) -> String {
    last.as_ref()
        .map_or_else(String::new, |l| format!(", last: {l}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_named_as_the_local_socket_needs() {
        let v4: SocketAddr = "11.99.0.10:4000".parse().expect("v4");
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().expect("v6");
        let mapped: SocketAddr = "[::ffff:11.99.0.10]:4000".parse().expect("mapped");
        let any4: SocketAddr = "0.0.0.0:1".parse().expect("any4");
        let any6: SocketAddr = "[::]:1".parse().expect("any6");
        assert_eq!(reachable(any4, &[v6, v4]), vec![v4]);
        assert_eq!(reachable(any6, &[v6, v4]), vec![v6, mapped]);
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v6), v6);
        assert_eq!(reachable(any4, &[v4; 40]).len(), defaults::MAX_CANDIDATES);
    }
}

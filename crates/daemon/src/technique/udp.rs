//! UDP hole punching: a sans-IO [`Puncher`] and the [`udp_punch`] driver around it.
//!
//! Wire: every datagram is 29 bytes.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `NPPUNCH1` |
//! | 8 | kind: 1 probe, 2 ack |
//! | 9..25 | the token both ends share |
//! | 25..29 | sequence number, big-endian (an ack echoes the probe's) |
//!
//! Both ends send a probe to every candidate at once, then every 25 ms (one sequence number
//! per round, from 1). A probe with our token from X gets an ack to X, at most one per 50 ms
//! per address. An ack with our token from X means X reached us and we reached X: the socket
//! is connected to X, and the RTT is the time since that round was sent. So does a probe from
//! a candidate we have been probing (our probes went where it came from, through the state its
//! own sends opened): the punch ends half a round trip sooner, without an RTT. Before it hands the
//! socket over, an end answers the peer once more (a "parting" ack, echoing the peer's last
//! probe, or 0 if it saw none), waiting up to 300 ms for a probe when it has not answered one
//! yet, because the peer finishes only when it gets an ack too. Anything else (wrong length,
//! magic, kind or token) is ignored.
//!
//! An application that gets the socket may still receive a few of these 29-byte datagrams
//! (the peer's last probes and acks, in flight or queued before the socket was connected)
//! right after it. It must drop datagrams that start with the magic `NPPUNCH1`.
//!
//! The socket sets SO_REUSEPORT, but Linux spreads the datagrams of a port among the
//! unconnected sockets that share it (by a hash of the sender), so another UDP socket on the
//! same port (a QUIC endpoint, say) may take the peer's probes while this one punches: punch
//! from a port no other socket receives on.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::defaults::{
    ACK_INTERVAL, ADDRESS_MEMORY, LINGER, MAX_CANDIDATES, PROBE_INTERVAL, SENT_MEMORY,
    TRANSMIT_QUEUE,
};
use super::{Punched, TechniqueError, canonical, reachable};

pub use p2p::birthday::{DATAGRAM_LEN, Datagram, DecodeError, Kind, MAGIC};

/// A datagram to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub to: SocketAddr,
    /// What.
    pub datagram: Datagram,
}

/// What is known of one remote address.
#[derive(Debug, Clone, Copy)]
struct Peer {
    addr: SocketAddr,
    /// When we last acked it.
    acked: Option<Instant>,
    /// The last probe seq it sent us.
    probe_seq: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Punching,
    /// Got an ack from `remote`; waiting up to `until` for a probe of it to answer.
    Lingering {
        remote: SocketAddr,
        rtt: Option<Duration>,
        until: Instant,
    },
    Done {
        remote: SocketAddr,
        rtt: Option<Duration>,
    },
}

/// The UDP hole punch as a sans-IO state machine: feed it datagrams
/// ([`Puncher::handle_input`]) and timeouts ([`Puncher::handle_timeout`] at
/// [`Puncher::poll_timeout`]); send what [`Puncher::poll_transmit`] yields; when
/// [`Puncher::outcome`] is `Some`, connect the socket to that address.
#[derive(Debug)]
pub struct Puncher {
    token: [u8; 16],
    candidates: Vec<SocketAddr>,
    seq: u32,
    next_round: Instant,
    /// Send time of the last rounds (seq, when), oldest first.
    sent: VecDeque<(u32, Instant)>,
    /// Addresses heard from, oldest first.
    peers: VecDeque<Peer>,
    transmits: VecDeque<Transmit>,
    state: State,
}

impl Puncher {
    /// Starts punching towards `candidates` (the first [`MAX_CANDIDATES`]) at `now`: the first
    /// round is due at once.
    pub fn new(now: Instant, candidates: &[SocketAddr], token: [u8; 16]) -> Self {
        Self {
            token,
            candidates: candidates.iter().copied().take(MAX_CANDIDATES).collect(),
            seq: 0,
            next_round: now,
            sent: VecDeque::with_capacity(SENT_MEMORY),
            peers: VecDeque::with_capacity(ADDRESS_MEMORY),
            transmits: VecDeque::with_capacity(TRANSMIT_QUEUE),
            state: State::Punching,
        }
    }

    /// The remote address and RTT once punched, and nothing is left to send.
    pub fn outcome(&self) -> Option<(SocketAddr, Option<Duration>)> {
        match self.state {
            State::Done { remote, rtt } if self.transmits.is_empty() => Some((remote, rtt)),
            _ => None,
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When to call [`Puncher::handle_timeout`]; `None` once done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Punching => Some(self.next_round),
            State::Lingering { until, .. } => Some(until),
            State::Done { .. } => None,
        }
    }

    /// The time of [`Puncher::poll_timeout`] came.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Punching if now >= self.next_round => {
                self.seq = self.seq.wrapping_add(1);
                if self.sent.len() == SENT_MEMORY {
                    self.sent.pop_front();
                }
                self.sent.push_back((self.seq, now));
                for i in 0..self.candidates.len() {
                    let to = self.candidates[i];
                    self.send(to, Kind::Probe, self.seq);
                }
                self.next_round = now + PROBE_INTERVAL;
            }
            State::Lingering { remote, rtt, until } if now >= until => self.finish(remote, rtt),
            _ => {}
        }
    }

    /// A datagram of `bytes` came from `from` at `now`.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Ok(datagram) = Datagram::decode(bytes) else {
            return;
        };
        if datagram.token != self.token {
            return;
        }
        match (datagram.kind, self.state) {
            (_, State::Done { .. }) => {}
            (Kind::Probe, State::Lingering { remote, rtt, .. }) if remote == from => {
                self.peer(from).probe_seq = Some(datagram.seq);
                self.finish(remote, rtt);
            }
            // A probe from an address we have been probing: it reached us, and our probes
            // went to where it came from, through the state its own sends opened. Done at
            // once, half a round trip before its ack could come.
            (Kind::Probe, State::Punching) if self.seq > 0 && self.candidates.contains(&from) => {
                self.peer(from).probe_seq = Some(datagram.seq);
                self.finish(from, None);
            }
            (Kind::Probe, _) => {
                let peer = self.peer(from);
                peer.probe_seq = Some(datagram.seq);
                if peer.acked.is_none_or(|t| now >= t + ACK_INTERVAL) {
                    peer.acked = Some(now);
                    self.send(from, Kind::Ack, datagram.seq);
                }
            }
            (Kind::Ack, State::Punching) => {
                let rtt = self
                    .sent
                    .iter()
                    .find(|(seq, _)| *seq == datagram.seq)
                    .map(|(_, at)| now.saturating_duration_since(*at));
                if self.peer(from).acked.is_some() {
                    self.finish(from, rtt);
                } else {
                    self.state = State::Lingering {
                        remote: from,
                        rtt,
                        until: now + LINGER,
                    };
                }
            }
            (Kind::Ack, State::Lingering { .. }) => {}
        }
    }

    /// Answers `remote` once more and ends.
    fn finish(&mut self, remote: SocketAddr, rtt: Option<Duration>) {
        let seq = self.peer(remote).probe_seq.unwrap_or(0);
        self.send(remote, Kind::Ack, seq);
        self.state = State::Done { remote, rtt };
    }

    /// The record of `addr`, made (forgetting the oldest) if there is none.
    fn peer(&mut self, addr: SocketAddr) -> &mut Peer {
        let at = match self.peers.iter().position(|p| p.addr == addr) {
            Some(at) => at,
            None => {
                if self.peers.len() == ADDRESS_MEMORY {
                    self.peers.pop_front();
                }
                self.peers.push_back(Peer {
                    addr,
                    acked: None,
                    probe_seq: None,
                });
                self.peers.len() - 1
            }
        };
        &mut self.peers[at]
    }

    fn send(&mut self, to: SocketAddr, kind: Kind, seq: u32) {
        if self.transmits.len() < TRANSMIT_QUEUE {
            self.transmits.push_back(Transmit {
                to,
                datagram: Datagram {
                    kind,
                    token: self.token,
                    seq,
                },
            });
        }
    }
}

/// UDP hole punch. `local` is the address to bind (port 0 allowed; SO_REUSEADDR and
/// SO_REUSEPORT are set), `candidates` the remote's addresses (at most 16; more are ignored),
/// `token` shared by both ends. Both ends run it at about the same time. Returns a *connected*
/// std `UdpSocket` (blocking mode, so it can be handed to an application) or an error at
/// `deadline`. See the module doc for the datagrams the application may still receive.
pub async fn udp_punch(
    local: SocketAddr,
    candidates: &[SocketAddr],
    token: [u8; 16],
    deadline: tokio::time::Instant,
) -> Result<Punched<std::net::UdpSocket>, TechniqueError> {
    let candidates = reachable(local, candidates);
    if candidates.is_empty() {
        return Err(TechniqueError::NoCandidates);
    }
    let tried = candidates.len();
    let socket = tokio::net::UdpSocket::from_std(bind(local)?.into())?;
    let mut punch = Puncher::new(Instant::now(), &candidates, token);
    let mut last = None;
    // Larger than a datagram, so that a longer one is seen as such and not truncated to fit.
    let mut buf = [0u8; 64];
    loop {
        while let Some(t) = punch.poll_transmit() {
            if let Err(e) = socket.send_to(&t.datagram.encode(), t.to).await {
                last = Some(format!("sending to {}: {e}", t.to));
            }
        }
        if let Some((remote, rtt)) = punch.outcome() {
            socket.connect(remote).await?;
            let socket = socket.into_std()?;
            socket.set_nonblocking(false)?;
            return Ok(Punched {
                socket,
                remote: canonical(remote),
                rtt,
            });
        }
        let wake = punch.poll_timeout().map_or(deadline, |t| {
            tokio::time::Instant::from_std(t).min(deadline)
        });
        if tokio::time::Instant::now() >= deadline {
            return Err(TechniqueError::Timeout { tried, last });
        }
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, from)) => punch.handle_input(Instant::now(), from, &buf[..n]),
                Err(e) => {
                    last = Some(format!("receiving: {e}"));
                    // An error that repeats must not spin the loop.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    tokio::time::sleep(PROBE_INTERVAL.min(left)).await;
                }
            },
            () = tokio::time::sleep_until(wake) => punch.handle_timeout(Instant::now()),
        }
    }
}

/// A non-blocking UDP socket on `local`, sharing the port with the daemon's other sockets.
fn bind(local: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    Ok(socket)
}

#[cfg(test)]
mod tests;

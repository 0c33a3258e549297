//! Birthday probing: a UDP hole punch between an end whose NAT maps endpoint-independently (the
//! easy side) and one whose NAT picks a random port per destination (the hard side), which no
//! plain punch can join when the easy side filters by port.
//!
//! The hard side opens `k` sockets, each sending towards the easy side's mapped address: its NAT
//! opens `k` mappings on `k` random ports, each letting in what comes from the easy side's
//! address. The easy side sends probes to random ports of the hard side's address, each port
//! once, at a bounded pace. A probe that lands on one of the `k` open ports is answered from
//! that socket, and the pair is found. After `n` probes the chance of a hit is
//! `P = 1 − (1 − k/N)^n` over the `N` = 64,512 ports above 1023 ([`success_probability`]):
//! k = 256 and n = 1,024 give 98%.
//!
//! A router's session table may hold fewer mappings than `k` (Tailscale's objection: "shallow
//! session tables"). [`choose`] takes that bound and trades sockets for probes: with room for
//! `m` mappings it opens at most `m − headroom` sockets and sends as many probes as the target
//! probability needs, within the probe budget.
//!
//! This module is the sans-IO half: the arithmetic, and [`EasyProber`], which says which port to
//! probe next and when, never twice, at most `rate` per second, until a hit or the budget. The
//! datagrams are the UDP punch's own ([`super::udp::Datagram`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use tokio::task::JoinSet;

use super::udp::{Datagram, Kind};
use super::{Punched, TechniqueError};

/// The ports a NAT picks from: 1024 to 65535.
pub const PORTS: u32 = 65_536 - 1_024;
/// Mappings left free on a bounded session table for the host's other traffic.
pub const HEADROOM: usize = 16;

/// The chance that `n` probes to distinct random ports hit one of `k` open ports, as
/// `1 − (1 − k/N)^n` (probes with replacement: a lower bound for distinct ports).
pub fn success_probability(k: usize, n: usize) -> f64 {
    let miss = 1.0 - (k as f64 / f64::from(PORTS)).min(1.0);
    1.0 - miss.powf(n as f64)
}

/// The probes needed for `target` with `k` open ports (`usize::MAX` when `k` is 0).
pub fn probes_needed(k: usize, target: f64) -> usize {
    if k == 0 {
        return usize::MAX;
    }
    let miss = 1.0 - (k as f64 / f64::from(PORTS)).min(1.0);
    if miss <= 0.0 {
        return 1;
    }
    let n = (1.0 - target.clamp(0.0, 0.999_999)).ln() / miss.ln();
    n.ceil().max(1.0) as usize
}

/// How many sockets and probes one attempt uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Sockets the hard side opens.
    pub sockets: usize,
    /// Probes the easy side may send.
    pub probes: usize,
    /// The chance of a hit with both.
    pub probability: f64,
}

/// Sockets and probes for `target`, within `max_sockets` and `max_probes`, on a hard router
/// whose session table holds `session_limit` mappings if it is known: fewer sockets, and so more
/// probes, where the table is shallow.
pub fn choose(
    max_sockets: usize,
    max_probes: usize,
    target: f64,
    session_limit: Option<usize>,
) -> Plan {
    let room = session_limit.map_or(max_sockets, |m| m.saturating_sub(HEADROOM).max(1));
    let sockets = max_sockets.min(room).max(1);
    let probes = probes_needed(sockets, target).min(max_probes);
    Plan {
        sockets,
        probes,
        probability: success_probability(sockets, probes),
    }
}

/// What the easy side is to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Where to.
    pub to: SocketAddr,
    /// The datagram.
    pub datagram: Datagram,
}

/// The easy side's probes to random ports of the hard side's address, as a sans-IO machine:
/// [`EasyProber::poll_probe`] gives the next probe when its time came, [`EasyProber::handle_input`]
/// takes what arrives, and [`EasyProber::outcome`] says where the hit was.
#[derive(Debug)]
pub struct EasyProber {
    target: IpAddr,
    token: [u8; 16],
    budget: usize,
    interval: Duration,
    next: Instant,
    tried: HashSet<u16>,
    rng: StdRng,
    hit: Option<SocketAddr>,
}

impl EasyProber {
    /// Probes `target` (the hard side's address) with `token`, at most `budget` probes at
    /// `rate` per second, from `now`; `seed` picks the ports.
    pub fn new(
        now: Instant,
        target: IpAddr,
        token: [u8; 16],
        budget: usize,
        rate: u32,
        seed: u64,
    ) -> Self {
        Self {
            target,
            token,
            budget: budget.min(PORTS as usize),
            interval: Duration::from_secs(1) / rate.max(1),
            next: now,
            tried: HashSet::new(),
            rng: StdRng::seed_from_u64(seed),
            hit: None,
        }
    }

    /// Probes sent so far.
    pub fn sent(&self) -> usize {
        self.tried.len()
    }

    /// The hard side's socket that answered, once one did.
    pub fn outcome(&self) -> Option<SocketAddr> {
        self.hit
    }

    /// Whether the budget is spent without a hit.
    pub fn exhausted(&self) -> bool {
        self.hit.is_none() && self.tried.len() >= self.budget
    }

    /// When the next probe is due (`None`: done).
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.hit.is_none() && !self.exhausted()).then_some(self.next)
    }

    /// The next probe, if one is due at `now`: a port not probed before.
    pub fn poll_probe(&mut self, now: Instant) -> Option<Probe> {
        if self.poll_timeout().is_none_or(|t| t > now) {
            return None;
        }
        let port = loop {
            let p = self.rng.random_range(1024..=65535u16);
            if self.tried.insert(p) {
                break p;
            }
        };
        // A late probe does not make up for lost time: never more than `rate` per second.
        self.next = self.next.max(now) + self.interval;
        let seq = u32::try_from(self.tried.len()).unwrap_or(u32::MAX);
        Some(Probe {
            to: SocketAddr::new(self.target, port),
            datagram: Datagram {
                kind: Kind::Probe,
                token: self.token,
                seq,
            },
        })
    }

    /// A datagram came from `from`: a probe or ack with our token from the hard side's address
    /// is the hit.
    pub fn handle_input(&mut self, from: SocketAddr, bytes: &[u8]) {
        if self.hit.is_some() || from.ip() != self.target {
            return;
        }
        if Datagram::decode(bytes).is_ok_and(|d| d.token == self.token) {
            self.hit = Some(from);
        }
    }
}

/// What an easy side's attempt did.
#[derive(Debug)]
pub struct Probed {
    /// The socket, connected to the hard side's port that answered.
    pub punched: Punched<std::net::UdpSocket>,
    /// Probes sent.
    pub probes: usize,
}

/// The easy side: probes random ports of `hard` from `local` (shared with SO_REUSEPORT; its
/// NAT maps it endpoint-independently, so the hard side knows where to send), at most
/// `budget` probes at `rate` per second, until one is answered or `deadline`.
///
/// # Errors
///
/// [`TechniqueError::Timeout`] (with the probes sent) when nothing answered; the socket's.
pub async fn easy_side(
    local: SocketAddr,
    hard: IpAddr,
    token: [u8; 16],
    budget: usize,
    rate: u32,
    deadline: tokio::time::Instant,
) -> Result<Probed, TechniqueError> {
    let socket = tokio::net::UdpSocket::from_std(
        natcheck::reflector::shared(local.port(), socket2::Type::DGRAM, socket2::Protocol::UDP)?
            .into(),
    )?;
    let mut prober = EasyProber::new(Instant::now(), hard, token, budget, rate, rand::random());
    let mut buf = [0u8; 64];
    let mut last = None;
    loop {
        while let Some(p) = prober.poll_probe(Instant::now()) {
            if let Err(e) = socket.send_to(&p.datagram.encode(), p.to).await {
                last = Some(format!("sending to {}: {e}", p.to));
            }
        }
        if let Some(remote) = prober.outcome() {
            socket.connect(remote).await?;
            let socket = socket.into_std()?;
            socket.set_nonblocking(false)?;
            return Ok(Probed {
                punched: Punched {
                    socket,
                    remote,
                    rtt: None,
                },
                probes: prober.sent(),
            });
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(TechniqueError::Timeout {
                tried: prober.sent(),
                last,
            });
        }
        // Past the budget, wait for late answers until the deadline.
        let wake = prober.poll_timeout().map_or(deadline, |t| {
            tokio::time::Instant::from_std(t).min(deadline)
        });
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = received {
                    prober.handle_input(from, buf.get(..n).unwrap_or_default());
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// How often the hard side's sockets send towards the easy side again, to keep their mappings.
const KEEP_OPEN: Duration = Duration::from_secs(1);

/// The hard side: `sockets` fresh sockets each send towards `easy` (opening as many mappings
/// on its NAT, each letting in what comes from `easy`), and the first that hears a probe with
/// `token` answers it and is the punched socket; the others close at once.
///
/// # Errors
///
/// [`TechniqueError::Timeout`] when no probe came by `deadline`; binding the sockets.
pub async fn hard_side(
    sockets: usize,
    easy: SocketAddr,
    token: [u8; 16],
    deadline: tokio::time::Instant,
) -> Result<Punched<std::net::UdpSocket>, TechniqueError> {
    let mut set = JoinSet::new();
    for i in 0..sockets.max(1) {
        let socket = tokio::net::UdpSocket::bind(("0.0.0.0", 0)).await?;
        set.spawn(async move {
            let seq = u32::try_from(i).unwrap_or(u32::MAX);
            let open = Datagram {
                kind: Kind::Probe,
                token,
                seq,
            }
            .encode();
            let mut buf = [0u8; 64];
            let mut keep = tokio::time::interval(KEEP_OPEN);
            loop {
                tokio::select! {
                    _ = keep.tick() => {
                        let _ = socket.send_to(&open, easy).await;
                    }
                    received = socket.recv_from(&mut buf) => {
                        let Ok((n, from)) = received else { continue };
                        if from.ip() != easy.ip() {
                            continue;
                        }
                        let Ok(d) = Datagram::decode(buf.get(..n).unwrap_or_default()) else {
                            continue;
                        };
                        if d.token != token || d.kind != Kind::Probe {
                            continue;
                        }
                        let ack = Datagram { kind: Kind::Ack, token, seq: d.seq }.encode();
                        socket.send_to(&ack, from).await?;
                        socket.connect(from).await?;
                        return Ok::<_, std::io::Error>((socket, from));
                    }
                }
            }
        });
    }
    let found = tokio::time::timeout_at(deadline, async {
        while let Some(joined) = set.join_next().await {
            if let Ok(Ok(found)) = joined {
                return Some(found);
            }
        }
        None
    })
    .await;
    // The losers go now: their mappings stop being refreshed and their sockets close.
    set.abort_all();
    match found {
        Ok(Some((socket, remote))) => {
            let socket = socket.into_std()?;
            socket.set_nonblocking(false)?;
            Ok(Punched {
                socket,
                remote,
                rtt: None,
            })
        }
        _ => Err(TechniqueError::Timeout {
            tried: sockets,
            last: Some(format!(
                "no probe from {} reached any of {sockets} sockets",
                easy.ip()
            )),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arithmetic_matches_the_issue_and_the_field() {
        // k = 256, n = 1,024: 98%.
        let p = success_probability(256, 1024);
        assert!((0.98..0.99).contains(&p), "{p}");
        assert_eq!(success_probability(0, 1000), 0.0);
        let n = probes_needed(256, 0.98);
        assert!((950..=1010).contains(&n), "{n}");
        assert!(success_probability(256, n) >= 0.98);
        assert_eq!(probes_needed(0, 0.9), usize::MAX);
    }

    #[test]
    fn a_shallow_session_table_trades_sockets_for_probes() {
        let deep = choose(256, 2048, 0.95, None);
        assert_eq!(deep.sockets, 256);
        assert!(deep.probes < 800 && deep.probability >= 0.95, "{deep:?}");
        // Room for 1,024 mappings: the sockets stay, the table is deep enough.
        assert_eq!(choose(256, 2048, 0.95, Some(1024)).sockets, 256);
        // Room for 128: fewer sockets, more probes, still 95% within the budget.
        let shallow = choose(256, 2048, 0.95, Some(128));
        assert_eq!(shallow.sockets, 128 - HEADROOM);
        assert!(
            shallow.probes > deep.probes && shallow.probes <= 2048,
            "{shallow:?}"
        );
        assert!(shallow.probability >= 0.95, "{shallow:?}");
        // Room for 64: the budget caps the probes, and so the chance.
        let shallower = choose(256, 2048, 0.95, Some(64));
        assert_eq!((shallower.sockets, shallower.probes), (64 - HEADROOM, 2048));
        assert!(
            shallower.probability < 0.95 && shallower.probability > 0.7,
            "{shallower:?}"
        );
        // Never zero sockets.
        assert_eq!(choose(256, 2048, 0.95, Some(4)).sockets, 1);
    }

    #[test]
    fn the_prober_paces_never_repeats_a_port_and_stops_at_its_budget() {
        let start = Instant::now();
        let ip: IpAddr = "11.99.0.10".parse().expect("ip");
        let mut p = EasyProber::new(start, ip, [3; 16], 500, 1000, 7);
        let mut ports = HashSet::new();
        let mut now = start;
        // 1,000 per second: one probe per millisecond, not more.
        while !p.exhausted() {
            let mut this_ms = 0;
            while let Some(probe) = p.poll_probe(now) {
                assert_eq!(probe.to.ip(), ip);
                assert!(probe.to.port() >= 1024);
                assert!(
                    ports.insert(probe.to.port()),
                    "port {} twice",
                    probe.to.port()
                );
                this_ms += 1;
            }
            assert!(this_ms <= 1, "{this_ms} probes in one ms");
            now += Duration::from_millis(1);
        }
        assert_eq!((p.sent(), ports.len()), (500, 500));
        assert!(now.duration_since(start) >= Duration::from_millis(499));
        assert_eq!(p.poll_timeout(), None);
    }

    /// Birthday probing against a simulated random-port NAT: with k sockets open and n probes,
    /// the hit rate over many attempts is what the formula says.
    #[test]
    fn against_a_random_port_nat_the_hit_rate_is_what_the_arithmetic_says() {
        let ip: IpAddr = "11.99.0.20".parse().expect("ip");
        let token = [9; 16];
        let (k, n, attempts) = (256, 1024, 300u32);
        let mut nat = StdRng::seed_from_u64(99);
        let mut hits = 0u32;
        let mut probes = Vec::new();
        for attempt in 0..attempts {
            // The hard side's k mappings, on random distinct ports.
            let mut open = HashSet::new();
            while open.len() < k {
                open.insert(nat.random_range(1024..=65535u16));
            }
            let start = Instant::now();
            let mut p = EasyProber::new(start, ip, token, n, 10_000, u64::from(attempt));
            let mut now = start;
            while p.outcome().is_none() && !p.exhausted() {
                while let Some(probe) = p.poll_probe(now) {
                    if open.contains(&probe.to.port()) {
                        // The hard side answers from the socket the probe reached.
                        let answer = Datagram {
                            kind: Kind::Ack,
                            token,
                            seq: probe.datagram.seq,
                        };
                        p.handle_input(probe.to, &answer.encode());
                    }
                }
                now += Duration::from_micros(100);
            }
            if p.outcome().is_some() {
                hits += 1;
                probes.push(p.sent());
            }
        }
        let rate = f64::from(hits) / f64::from(attempts);
        // Expected 98.3%; 300 attempts put 95% well below any plausible outcome.
        assert!(rate >= 0.95, "{hits}/{attempts}");
        // A hit comes, on average, after about N/k probes.
        probes.sort_unstable();
        let median = probes[probes.len() / 2];
        assert!((100..=400).contains(&median), "median probes {median}");
        // Nothing from another address, or with another token, is a hit.
        let mut p = EasyProber::new(Instant::now(), ip, token, 10, 100, 1);
        let ack = Datagram {
            kind: Kind::Ack,
            token,
            seq: 1,
        };
        p.handle_input("11.99.0.21:5000".parse().expect("addr"), &ack.encode());
        let foreign = Datagram {
            token: [1; 16],
            ..ack
        };
        p.handle_input(SocketAddr::new(ip, 5000), &foreign.encode());
        assert_eq!(p.outcome(), None);
    }
}

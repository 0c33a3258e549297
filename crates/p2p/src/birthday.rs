//! Birthday probing, the sans-IO half and the hard side's sockets: shared by the daemon's UDP
//! punch and the libp2p engine's QUIC punch ([`crate::punch`]).
//!
//! Birthday probing joins an end whose NAT maps endpoint-independently (the easy side) and one
//! whose NAT picks a random port per destination (the hard side), which no plain punch can join
//! when the easy side filters by port.
//!
//! The hard side opens `k` sockets, each sending towards the easy side's mapped address: its NAT
//! opens `k` mappings on `k` random ports, each letting in what comes from the easy side's
//! address. The easy side sends probes to random ports of the hard side's address, each port
//! once, at a bounded pace. A probe that lands on one of the `k` open ports reaches that socket,
//! and the pair is found. After `n` probes the chance of a hit is `P = 1 − (1 − k/N)^n` over the
//! `N` = 64,512 ports above 1023 ([`success_probability`]): k = 256 and n = 1,024 give 98%.
//!
//! A router's session table may hold fewer mappings than `k` (Tailscale's objection: "shallow
//! session tables"). [`choose`] takes that bound and trades sockets for probes: with room for
//! `m` mappings it opens at most `m − headroom` sockets and sends as many probes as the target
//! probability needs, within the probe budget.
//!
//! A NAT that allocates ports sequentially (+1 per new mapping) needs no luck: the hard side's
//! next mappings land just above the last one it observed (its STUN answer, or the step
//! `natpunch nat check` measured), so the easy side probes that *predicted window* first, in a
//! few rounds (the hard side's sockets may open a little after the first probes arrive), and
//! falls back to random ports only if the window stays silent ([`Prediction`]).
//!
//! [`EasyProber`] says which port to probe next and when: the predicted window's in rounds and
//! then random ones never twice, at most `rate` per second, until a hit or the budget.
//! [`open_hard`] is the hard side's sockets. The datagrams are [`Datagram`]s, the daemon's UDP
//! punch's own:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `NPPUNCH1` |
//! | 8 | kind: 1 probe, 2 ack |
//! | 9..25 | the token both ends share |
//! | 25..29 | sequence number, big-endian (a probe's count; an ack echoes the probe's) |

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use tokio::task::JoinSet;

/// The first 8 bytes of every datagram.
pub const MAGIC: [u8; 8] = *b"NPPUNCH1";
/// The length of every datagram.
pub const DATAGRAM_LEN: usize = 29;

/// What a datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// "Here I am": asks for an ack.
    Probe,
    /// "I heard your probe `seq`".
    Ack,
}

/// One punching datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Probe or ack.
    pub kind: Kind,
    /// The token both ends share.
    pub token: [u8; 16],
    /// The probe round (an ack echoes the probe's).
    pub seq: u32,
}

/// Why bytes are not a punching datagram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not 29 bytes long.
    #[error("{0} bytes, not {DATAGRAM_LEN}")]
    Length(usize),
    /// The first 8 bytes are not `NPPUNCH1`.
    #[error("wrong magic")]
    Magic,
    /// A kind other than 1 (probe) or 2 (ack).
    #[error("unknown kind {0}")]
    Kind(u8),
}

impl Datagram {
    /// The datagram's bytes.
    pub fn encode(&self) -> [u8; DATAGRAM_LEN] {
        let mut out = [0u8; DATAGRAM_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8] = match self.kind {
            Kind::Probe => 1,
            Kind::Ack => 2,
        };
        out[9..25].copy_from_slice(&self.token);
        out[25..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    /// Reads a datagram from untrusted bytes; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let Ok(bytes) = <&[u8; DATAGRAM_LEN]>::try_from(bytes) else {
            return Err(DecodeError::Length(bytes.len()));
        };
        let (magic, rest) = bytes.split_at(8);
        if magic != MAGIC {
            return Err(DecodeError::Magic);
        }
        let kind = match rest[0] {
            1 => Kind::Probe,
            2 => Kind::Ack,
            other => return Err(DecodeError::Kind(other)),
        };
        let mut token = [0u8; 16];
        token.copy_from_slice(&rest[1..17]);
        let mut seq = [0u8; 4];
        seq.copy_from_slice(&rest[17..21]);
        Ok(Self {
            kind,
            token,
            seq: u32::from_be_bytes(seq),
        })
    }
}

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

/// How an end probes (a daemon, or a peer over QUIC), with the defaults justified by the arithmetic and the lab.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Birthday probing and port prediction at all.
    pub enabled: bool,
    /// Sockets the hard side opens at most: 256 (P = 98% at 1,024 probes, 99.97% at 2,048).
    pub sockets: usize,
    /// Probes per attempt at most: 2,048.
    pub probes: usize,
    /// Probes per second at most: 4,000, so the whole budget goes in about half a second
    /// (about 230 kB/s of 29-byte datagrams with their headers).
    pub rate: u32,
    /// How long one attempt may take: 3 s, the budget of every other direct stage.
    pub deadline: Duration,
    /// Ports in the predicted window of a sequentially allocating NAT (0: no prediction): 16.
    pub window: u16,
    /// The session table of this end's router, if known: fewer sockets where it is shallow.
    pub session_table: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            sockets: 256,
            probes: 2048,
            rate: 4000,
            deadline: Duration::from_secs(3),
            window: 16,
            session_table: None,
        }
    }
}

impl Settings {
    /// The sockets to open as the hard side: [`choose`] within this end's session table.
    pub fn hard_sockets(&self) -> usize {
        choose(self.sockets, self.probes, TARGET, self.session_table).sockets
    }

    /// How to probe as the easy side; `next` is the port the hard side's NAT is expected to
    /// give next (sequential allocation), if known.
    pub fn probing(&self, next: Option<u16>) -> Probing {
        Probing {
            budget: self.probes,
            rate: self.rate,
            prediction: next.and_then(|first| Prediction::window(first, self.window)),
        }
    }
}

/// The chance an attempt aims for when the session table limits the sockets.
pub const TARGET: f64 = 0.95;
/// How often the predicted window is probed: for half a second, long enough for the hard
/// side's sockets to open when its signal comes a relayed half round trip late.
const PREDICTION_ROUNDS: u32 = 10;
/// The time between two rounds of the predicted window: every round sent before the first
/// answer can come back (a round trip) is spent for nothing when the window was right at once.
const PREDICTION_ROUND: Duration = Duration::from_millis(50);

/// What the easy side is to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Where to.
    pub to: SocketAddr,
    /// The datagram.
    pub datagram: Datagram,
}

/// The window of ports a sequentially allocating NAT is expected to give the hard side's next
/// mappings, probed before any random port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    /// The first port expected.
    pub first: u16,
    /// Ports in the window, `first` included.
    pub width: u16,
    /// How often the window is probed.
    pub rounds: u32,
    /// The time from one round's start to the next's.
    pub round: Duration,
}

impl Prediction {
    /// The window from `first`, `width` ports wide (within 1024..=65535), probed in `rounds`
    /// rounds, `round` apart.
    pub fn new(first: u16, width: u16, rounds: u32, round: Duration) -> Self {
        let first = first.max(1024);
        let width = width.min(u16::MAX - first + 1);
        Self {
            first,
            width,
            rounds,
            round,
        }
    }

    /// The window of `width` ports from `first`, probed as natpunch does: for half a second,
    /// in rounds 50 ms apart (`None` when `width` is 0: no prediction).
    pub fn window(first: u16, width: u16) -> Option<Self> {
        (width > 0).then(|| Self::new(first, width, PREDICTION_ROUNDS, PREDICTION_ROUND))
    }

    fn port(&self, index: u16) -> u16 {
        self.first.saturating_add(index)
    }
}

/// Where the prober is.
#[derive(Debug)]
enum Phase {
    /// Probing the predicted window: round `round`, next the port at `index`.
    Window {
        prediction: Prediction,
        round: u32,
        index: u16,
        round_start: Instant,
    },
    /// Random ports.
    Random,
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
    phase: Phase,
    window: Option<(u16, u16)>,
    sent: usize,
    tried: HashSet<u16>,
    /// The port of each probe, in the order sent (probe `seq` went to `order[seq - 1]`).
    order: Vec<u16>,
    rng: StdRng,
    hit: Option<(SocketAddr, bool)>,
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
            budget,
            interval: Duration::from_secs(1) / rate.max(1),
            next: now,
            phase: Phase::Random,
            window: None,
            sent: 0,
            tried: HashSet::new(),
            order: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            hit: None,
        }
    }

    /// Probes `prediction`'s window first (its probes count against the budget too).
    pub fn predicted(mut self, prediction: Prediction) -> Self {
        let now = self.next;
        self.predict(now, prediction);
        self
    }

    /// Probes `prediction`'s window from `now` on, before any further random port: for a
    /// prediction that came after probing began (its probes count against the budget too).
    /// Nothing changes once a probe hit or the budget is spent.
    pub fn predict(&mut self, now: Instant, prediction: Prediction) {
        if prediction.width == 0 || prediction.rounds == 0 || self.poll_timeout().is_none() {
            return;
        }
        self.window = Some((prediction.first, prediction.port(prediction.width - 1)));
        self.phase = Phase::Window {
            prediction,
            round: 0,
            index: 0,
            round_start: now,
        };
    }

    /// The first port of the predicted window, if there is one.
    pub fn window_start(&self) -> Option<u16> {
        self.window.map(|(first, _)| first)
    }

    /// Probes sent so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// The hard side's socket that answered, once one did.
    pub fn outcome(&self) -> Option<SocketAddr> {
        self.hit.map(|(at, _)| at)
    }

    /// Whether the port that answered was in the predicted window.
    pub fn hit_predicted(&self) -> bool {
        self.hit.is_some_and(|(_, predicted)| predicted)
    }

    /// Whether the budget is spent without a hit.
    pub fn exhausted(&self) -> bool {
        self.hit.is_none()
            && (self.sent >= self.budget
                || (matches!(self.phase, Phase::Random) && self.tried.len() >= PORTS as usize))
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
        // A late probe does not make up for lost time: never more than `rate` per second.
        self.next = self.next.max(now) + self.interval;
        let port = match &mut self.phase {
            Phase::Window {
                prediction,
                round,
                index,
                round_start,
            } => {
                let port = prediction.port(*index);
                self.tried.insert(port);
                *index += 1;
                if *index >= prediction.width {
                    // The round is over: the next one starts `round` after this one did.
                    *index = 0;
                    *round += 1;
                    *round_start += prediction.round;
                    self.next = self.next.max(*round_start);
                    if *round >= prediction.rounds {
                        self.phase = Phase::Random;
                    }
                }
                port
            }
            Phase::Random => loop {
                let p = self.rng.random_range(1024..=65535u16);
                if self.tried.insert(p) {
                    break p;
                }
            },
        };
        self.sent += 1;
        self.order.push(port);
        let seq = u32::try_from(self.sent).unwrap_or(u32::MAX);
        Some(Probe {
            to: SocketAddr::new(self.target, port),
            datagram: Datagram {
                kind: Kind::Probe,
                token: self.token,
                seq,
            },
        })
    }

    /// The hard side says probe `seq` reached one of its sockets, told another way than by an
    /// answer to this end (over the relayed connection, when a QUIC endpoint owns this end's
    /// socket): that probe's port is the hit. Returns it; `None` for a probe never sent.
    pub fn told(&mut self, seq: u32) -> Option<SocketAddr> {
        let index = usize::try_from(seq).ok()?.checked_sub(1)?;
        let at = SocketAddr::new(self.target, *self.order.get(index)?);
        if self.hit.is_none() {
            let predicted = self.in_window(at.port());
            self.hit = Some((at, predicted));
        }
        Some(at)
    }

    fn in_window(&self, port: u16) -> bool {
        self.window
            .is_some_and(|(first, last)| (first..=last).contains(&port))
    }

    /// A datagram came from `from`: a probe or ack with our token from the hard side's address
    /// is the hit.
    pub fn handle_input(&mut self, from: SocketAddr, bytes: &[u8]) {
        if self.hit.is_some() || from.ip() != self.target {
            return;
        }
        if Datagram::decode(bytes).is_ok_and(|d| d.token == self.token) {
            self.hit = Some((from, self.in_window(from.port())));
        }
    }
}

/// How the easy side probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probing {
    /// Probes at most.
    pub budget: usize,
    /// Probes per second at most.
    pub rate: u32,
    /// The window to probe first, when the hard side's NAT allocates sequentially.
    pub prediction: Option<Prediction>,
}

/// How often the hard side's sockets send towards the easy side again, to keep their mappings.
pub const KEEP_OPEN: Duration = Duration::from_secs(1);

/// What ends the hard side's wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardEnd {
    /// The easy side's ack: every probe heard is answered with an ack, and the socket the easy
    /// side acknowledges (its pick of the answers) wins. For an easy side that reads its socket.
    Ack,
    /// The first probe heard, unanswered: for an easy side whose socket another reader owns
    /// (a QUIC endpoint), which learns of the hit another way.
    Probe,
}

/// The hard side's socket that won.
#[derive(Debug)]
pub struct Won {
    /// The socket (not connected).
    pub socket: tokio::net::UdpSocket,
    /// The easy side's address that reached it.
    pub from: SocketAddr,
    /// The sequence number of the datagram that ended the wait: the easy side's count of
    /// probes when it sent it.
    pub seq: u32,
}

/// The hard side: `sockets` fresh sockets each send towards `easy` every [`KEEP_OPEN`] (opening
/// as many mappings on its NAT, each letting in what comes from `easy`) until one hears the
/// easy side as `end` says, or `deadline`. The others close at once.
///
/// # Errors
///
/// Binding the sockets. `Ok(None)` when nothing came by `deadline`.
pub async fn open_hard(
    sockets: usize,
    easy: SocketAddr,
    token: [u8; 16],
    deadline: tokio::time::Instant,
    end: HardEnd,
) -> std::io::Result<Option<Won>> {
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
                        if d.token != token {
                            continue;
                        }
                        match (end, d.kind) {
                            (HardEnd::Ack, Kind::Probe) => {
                                let ack = Datagram { kind: Kind::Ack, token, seq: d.seq }.encode();
                                socket.send_to(&ack, from).await?;
                            }
                            (HardEnd::Ack, Kind::Ack) | (HardEnd::Probe, Kind::Probe) => {
                                return Ok::<_, std::io::Error>(Won { socket, from, seq: d.seq });
                            }
                            (HardEnd::Probe, Kind::Ack) => {}
                        }
                    }
                }
            }
        });
    }
    let found = tokio::time::timeout_at(deadline, async {
        while let Some(joined) = set.join_next().await {
            if let Ok(Ok(won)) = joined {
                return Some(won);
            }
        }
        None
    })
    .await;
    // The losers go now: their mappings stop being refreshed and their sockets close.
    set.abort_all();
    Ok(found.ok().flatten())
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

    /// A prediction that comes while random probes go out turns the next ones to its window at
    /// once; the window's ports count as predicted when the hit is told by number.
    #[test]
    fn a_late_prediction_turns_the_next_probes_to_the_window() {
        let ip: IpAddr = "11.99.0.40".parse().expect("ip");
        let start = Instant::now();
        let mut p = EasyProber::new(start, ip, [4; 16], 2048, 4000, 11);
        let mut now = start;
        for _ in 0..160 {
            while p.poll_probe(now).is_some() {}
            now += Duration::from_micros(250);
        }
        assert_eq!(p.sent(), 160, "random probes for 40 ms");
        assert_eq!(p.window_start(), None);
        p.predict(now, Prediction::window(30_000, 16).expect("a window"));
        assert_eq!(p.window_start(), Some(30_000));
        let mut window = Vec::new();
        while window.len() < 16 {
            if let Some(probe) = p.poll_probe(now) {
                window.push(probe);
            }
            now += Duration::from_micros(250);
        }
        let ports: Vec<u16> = window.iter().map(|w| w.to.port()).collect();
        assert_eq!(ports, (30_000..30_016).collect::<Vec<_>>());
        let seq = window[5].datagram.seq;
        assert_eq!(p.told(seq), Some(SocketAddr::new(ip, 30_005)));
        assert!(p.hit_predicted());
        // Nothing changes once a probe hit; a zero-width window is no prediction.
        p.predict(now, Prediction::window(50_000, 16).expect("a window"));
        assert_eq!(p.window_start(), Some(30_000));
        assert_eq!(Prediction::window(50_000, 0), None);
    }

    /// Port prediction against a simulated sequential NAT whose mappings open 30 ms after the
    /// first probe: the window's later rounds find them with a few dozen probes, where random
    /// probing needs hundreds.
    #[test]
    fn against_a_sequential_nat_the_predicted_window_hits_with_few_probes() {
        let ip: IpAddr = "11.99.0.30".parse().expect("ip");
        let token = [5; 16];
        let start = Instant::now();
        // The hard side's last observed mapping was 40,000; its 256 sockets get the next ports.
        let open: HashSet<u16> = (40_001..40_001 + 256).collect();
        let opens_at = start + Duration::from_millis(30);
        let prediction = Prediction::new(40_001, 16, 20, Duration::from_millis(25));
        let mut p = EasyProber::new(start, ip, token, 2048, 4000, 3).predicted(prediction);
        let mut now = start;
        let mut window_ports = HashSet::new();
        while p.outcome().is_none() && !p.exhausted() {
            while let Some(probe) = p.poll_probe(now) {
                let port = probe.to.port();
                window_ports.insert(port);
                if now >= opens_at && open.contains(&port) {
                    let answer = Datagram {
                        kind: Kind::Ack,
                        token,
                        seq: probe.datagram.seq,
                    };
                    p.handle_input(probe.to, &answer.encode());
                }
            }
            now += Duration::from_millis(1);
        }
        assert!(p.hit_predicted(), "{:?}", p.outcome());
        // Two rounds of 16 at most before the mappings exist, then the first probe hits.
        assert!(p.sent() <= 3 * 16, "{} probes", p.sent());
        assert!(
            window_ports
                .iter()
                .all(|port| (40_001..40_017).contains(port))
        );
    }

    #[test]
    fn after_its_rounds_the_window_gives_way_to_random_ports_that_skip_it() {
        let ip: IpAddr = "11.99.0.31".parse().expect("ip");
        let start = Instant::now();
        let prediction = Prediction::new(50_000, 8, 3, Duration::from_millis(10));
        let mut p = EasyProber::new(start, ip, [1; 16], 100, 10_000, 4).predicted(prediction);
        let mut now = start;
        let mut sent = Vec::new();
        while !p.exhausted() {
            while let Some(probe) = p.poll_probe(now) {
                sent.push((now.duration_since(start), probe.to.port()));
            }
            now += Duration::from_micros(100);
        }
        assert_eq!(sent.len(), 100);
        // Three rounds of the same 8 ports, each starting 10 ms after the one before.
        for round in 0..3u32 {
            let ports: Vec<u16> = sent[round as usize * 8..][..8]
                .iter()
                .map(|s| s.1)
                .collect();
            assert_eq!(ports, (50_000..50_008).collect::<Vec<_>>());
            let began = sent[round as usize * 8].0;
            assert!(
                began >= Duration::from_millis(10) * round,
                "round {round} at {began:?}"
            );
        }
        // Then random ports, never one of the window's, never twice.
        let random: Vec<u16> = sent[24..].iter().map(|s| s.1).collect();
        let distinct: HashSet<u16> = random.iter().copied().collect();
        assert_eq!(distinct.len(), random.len());
        assert!(random.iter().all(|port| !(50_000..50_008).contains(port)));
        // A hit on a random port is not a predicted one.
        let ack = Datagram {
            kind: Kind::Ack,
            token: [1; 16],
            seq: 30,
        };
        p.handle_input(SocketAddr::new(ip, random[0]), &ack.encode());
        assert_eq!(p.outcome(), Some(SocketAddr::new(ip, random[0])));
        assert!(!p.hit_predicted());
        // A window at the top of the range stops at 65535.
        let top = Prediction::new(65_530, 16, 1, Duration::ZERO);
        assert_eq!(top.width, 6);
    }

    #[test]
    fn a_hit_told_by_number_is_the_port_that_probe_went_to() {
        let ip: IpAddr = "11.99.0.40".parse().expect("ip");
        let start = Instant::now();
        let mut p = EasyProber::new(start, ip, [2; 16], 50, 1000, 11);
        let mut sent = Vec::new();
        let mut now = start;
        while sent.len() < 20 {
            if let Some(probe) = p.poll_probe(now) {
                assert_eq!(probe.datagram.seq as usize, sent.len() + 1);
                sent.push(probe.to);
            }
            now += Duration::from_millis(1);
        }
        assert_eq!(p.told(0), None, "probes count from 1");
        assert_eq!(p.told(21), None, "never sent");
        assert_eq!(p.outcome(), None);
        assert_eq!(p.told(7), Some(sent[6]));
        assert_eq!(p.outcome(), Some(sent[6]));
        assert_eq!(p.poll_timeout(), None, "a hit ends the probing");
        // The first hit stays the hit.
        assert_eq!(p.told(3), Some(sent[2]));
        assert_eq!(p.outcome(), Some(sent[6]));
    }
}

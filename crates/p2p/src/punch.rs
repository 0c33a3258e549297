//! The hole-punch engine: one hole punch with one remote, as a sans-IO state machine.
//!
//! [`Punch`] owns no socket, clock, task or random number. Its driver (the [`crate::peer`]
//! event loop, or a simulation in the tests) tells it what happened, each time with `now`:
//! the handshake stream opened or failed, a message came in, a dial was made or failed, a
//! direct connection came up, a ping was answered, the timer ran out. It answers with
//! [`Action`]s to carry out ([`Punch::poll_action`]: open a stream, send a message, dial,
//! close a connection, the finished [`Record`]) and the time it next wants to be woken
//! ([`Punch::poll_timeout`]). Once it yields [`Action::Record`] it is over.
//!
//! The handshake is DCUtR's CONNECT/SYNC round. The side that opens the stream (the *driver*)
//! sends CONNECT with its addresses, times the reply, sends SYNC and dials half a round trip
//! later; the other side answers CONNECT and dials when SYNC arrives, so both dial at once.
//! With plain DCUtR ([`Handshake::Dcutr`]) the relayed connection's listener drives; between
//! natpunch peers the dialer drives ([`Handshake::Natpunch`]) the moment its relayed connection
//! is up, which saves the half round trip the listener needs to learn of it. A listener waits
//! [`FAST_WAIT`] for that stream and then drives DCUtR itself; it drives at once when identify
//! says the remote does not run natpunch. If both start (the dialer's stream came late), the
//! listener's DCUtR goes on and the dialer answers it.
//!
//! # Versions of natpunch's handshake
//!
//! A natpunch dialer offers [`Handshake::NatpunchClasses`] (`/natpunch/dcutr/1.1.0`) first:
//! the same messages, whose CONNECTs also carry the sender's NAT mapping class
//! ([`PunchConfig::local_mapping`], RFC 4787) and whose SYNC carries the attempt's form. When
//! the remote does not speak it (a 1.0.0-only natpunch peer, a stock DCUtR peer), the stream
//! fails as unsupported and the dialer offers [`Handshake::Natpunch`] (1.0.0) at once, which
//! costs one relayed round trip; when identify already said the remote lacks 1.1.0, the dialer
//! goes to 1.0.0 directly. Over 1.0.0 nothing carries a class, and everything runs as before.
//!
//! # Attempts
//!
//! Attempts are bounded by the attempt timeout and their number. An attempt has one of two
//! forms:
//!
//! * *simultaneous* (the default first attempt): both sides dial at once, A as the
//!   connection's dialer, B as its listener (`override_role`). Over TCP the SYNs cross and
//!   make one connection; over QUIC each side's packets open its own NAT for the other's.
//! * *reversed*: B dials as the connection's dialer. For a TCP punch whose simultaneous open
//!   cannot happen because only B's packets get through: B's NAT maps per destination, so its
//!   SYN leaves from a port A never aimed at and lands on A's listening socket, where the
//!   connection completes only if B holds the dialer's role.
//!
//! Which form comes first is the driver's (A's) choice, once it has B's CONNECT reply:
//!
//! * over 1.1.0, for TCP-only punches, with both classes known and [`first_attempt_reversed`]
//!   (B's NAT maps per destination, A's does not), the first attempt is reversed and *primed*:
//!   A dials too, as the connection's listener, so that its SYN towards B lets B's address
//!   through an address-dependent filter on A's side (restricted cone). A dials with SYNC, not
//!   half a round trip later, so that its SYN is out before B's can arrive; that dial is
//!   expected to go nowhere and its failure does not end the attempt. The second attempt is then
//!   simultaneous. A's SYNC carries the choice (`reversed`), so B needs no rule of its own;
//! * otherwise (an unknown class, QUIC or both transports, 1.0.0, plain DCUtR) as before: the
//!   first attempt is simultaneous and, between natpunch peers, the second is reversed, A only
//!   waiting (its CONNECT carries `reversed`).
//!
//! QUIC keeps the simultaneous first attempt whatever the classes: it has no role problem and
//! goes direct at once into a symmetric NAT. Of the two QUIC connections a simultaneous dial
//! makes, both sides keep the one the relayed connection's dialer made.
//!
//! # Birthday probing over QUIC
//!
//! Into a NAT that maps per destination (the *hard* side) from one that maps
//! endpoint-independently but filters by port (the *easy* side: port-restricted cone, most
//! CGNATs), no simultaneous dial gets through: the hard side's packets leave from a port the
//! easy side never aimed at. When both sides take part (their CONNECTs say `birthday`, over
//! 1.1.0, with QUIC) and the classes say one is hard and the other not, the first attempt
//! probes *besides* its simultaneous dial ([`crate::birthday`]); A's SYNC carries the token.
//!
//! * The hard side opens [`BirthdayConfig::sockets`] sockets towards the easy side's QUIC
//!   address ([`Action::OpenSockets`]).
//! * The easy side sends probes to random ports of the hard side's address from its own QUIC
//!   socket ([`Action::Probe`]), so that its NAT lets the port it hits in towards that socket.
//! * The first hard socket a probe reaches reports it ([`Punch::birthday_hit`]): the driver has
//!   closed it and listens for QUIC on its port by then, and the engine tells the easy side the
//!   probe's number over the handshake stream (natpunch's `HIT`).
//! * The easy side dials the port that probe went to, from its QUIC socket: a QUIC connection
//!   through the pair of NAT states the probe found.
//!
//! Whichever connection comes first, the simultaneous one (an easy side that filters only by
//! address lets it in) or the probed one, ends the attempt; a failed simultaneous dial does not
//! while probing goes on. Only the first attempt probes.
//!
//! Port prediction: a hard side whose driver found where its NAT's next mapping will be (a NAT
//! that allocates ports in order, [`Punch::predicted`]) says that port on its next handshake
//! message, or in a `NEXT` once its last one went; the easy side then probes a window of
//! [`BirthdayConfig::window`] ports from there before random ones.
//!
//! With [`Engine::Stock`] the engine only watches rust-libp2p's `dcutr` behaviour (its dials,
//! its result, the direct connection) to write the same record.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use behaviour::Mapping;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, StreamProtocol};
use serde::Serialize;

use crate::birthday::{DATAGRAM_LEN, EasyProber, Prediction};
use crate::record::{
    Attempt, AttemptBirthday, AttemptOutcome, BirthdayRole, DialFailure, Outcome, Record, Side,
};
use crate::wire::{HolePunch, Kind};

/// The DCUtR protocol.
pub const DCUTR: StreamProtocol = StreamProtocol::new("/libp2p/dcutr");
/// DCUtR with the roles swapped, between natpunch peers: the relayed connection's dialer (A)
/// opens the stream, measures the round trip and sends SYNC the moment its relayed connection
/// is up. The messages are DCUtR's.
pub const NATPUNCH_DCUTR: StreamProtocol = StreamProtocol::new("/natpunch/dcutr/1.0.0");
/// [`NATPUNCH_DCUTR`] whose CONNECTs also carry the sender's NAT mapping class and whose SYNC
/// carries the attempt's form, so that the first attempt can already be the right one. A
/// dialer offers it first and falls back to 1.0.0 when the remote does not speak it.
pub const NATPUNCH_DCUTR_CLASSES: StreamProtocol = StreamProtocol::new("/natpunch/dcutr/1.1.0");
/// How long a listener waits for a natpunch dialer's stream before it drives DCUtR itself.
pub const FAST_WAIT: Duration = Duration::from_secs(1);
/// How long a session watching the stock `dcutr` behaviour waits: its three attempts of 10 s.
const STOCK_WAIT: Duration = Duration::from_secs(35);
/// The least time a stock dial is given before the record calls it timed out.
const STOCK_DIAL_WAIT: Duration = Duration::from_secs(12);
/// The longest a successful session waits for the first ping on the direct connection.
const DIRECT_RTT_WAIT: Duration = Duration::from_secs(2);

/// Which transports to listen, reach the relay and punch with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// TCP only.
    Tcp,
    /// QUIC only.
    Quic,
    /// Both; whichever punches through first wins.
    Both,
}

impl Transport {
    /// Whether TCP is in use.
    pub fn tcp(self) -> bool {
        matches!(self, Self::Tcp | Self::Both)
    }

    /// Whether QUIC is in use.
    pub fn quic(self) -> bool {
        matches!(self, Self::Quic | Self::Both)
    }
}

/// Who drives the hole punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// natpunch's own DCUtR engine.
    Natpunch,
    /// rust-libp2p's `dcutr` behaviour.
    Stock,
}

/// What identify says a remote runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteEngine {
    /// natpunch's engine speaking [`NATPUNCH_DCUTR`] only: it understands reversed attempts
    /// and drives the handshake itself.
    Natpunch,
    /// natpunch's engine that also speaks [`NATPUNCH_DCUTR_CLASSES`].
    NatpunchClasses,
    /// Anything else: plain DCUtR.
    Other,
}

impl RemoteEngine {
    /// Whether it is natpunch's engine (of either version).
    pub fn natpunch(self) -> bool {
        matches!(self, Self::Natpunch | Self::NatpunchClasses)
    }
}

/// Where a peer's knowledge of its own NAT mapping comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingSource {
    /// Told on the command line (`natpunch peer --mapping`).
    Flag,
    /// An RFC 5780 check against a STUN server (`natpunch peer --stun-server`).
    Rfc5780,
    /// What remotes at two or more IP addresses observed of the listen port (identify).
    Observed,
}

/// A peer's NAT mapping class and where it was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalMapping {
    /// How the NAT maps (RFC 4787).
    pub mapping: Mapping,
    /// Where that comes from.
    pub source: MappingSource,
}

/// Whether the first attempt is reversed (the listener B dials as the connection's dialer, the
/// dialer A dials only to open its own NAT's filter towards B), from both sides' mapping
/// classes: when B's NAT picks a port per destination and A's does not. B's SYN then leaves
/// from a port nobody aimed at and lands on A's listening socket, where only the dialer's
/// role lets the connection finish; A's SYN, aimed at B, lets B's address through an
/// address-dependent filter on A's side. An unknown class on either side keeps today's order.
pub fn first_attempt_reversed(dialer: Option<Mapping>, listener: Option<Mapping>) -> bool {
    matches!(
        (dialer, listener),
        (Some(a), Some(b)) if !per_destination(a) && per_destination(b)
    )
}

/// Whether a NAT of mapping class `m` picks a new port per destination (RFC 4787's address-
/// and address-and-port-dependent mapping).
pub(crate) fn per_destination(m: Mapping) -> bool {
    matches!(
        m,
        Mapping::AddressDependent | Mapping::AddressAndPortDependent
    )
}

/// This side's part in birthday probing, from both mapping classes: the side whose NAT maps per
/// destination is hard, the other easy; `None` when both or neither do, or a class is unknown.
pub fn birthday_role(local: Option<Mapping>, remote: Option<Mapping>) -> Option<BirthdayRole> {
    match (per_destination(local?), per_destination(remote?)) {
        (true, false) => Some(BirthdayRole::Hard),
        (false, true) => Some(BirthdayRole::Easy),
        _ => None,
    }
}

/// The handshake protocol of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// [`DCUTR`]: the relayed connection's listener drives.
    Dcutr,
    /// [`NATPUNCH_DCUTR`]: the relayed connection's dialer drives.
    Natpunch,
    /// [`NATPUNCH_DCUTR_CLASSES`]: the relayed connection's dialer drives, and both sides
    /// tell their mapping class.
    NatpunchClasses,
}

impl Handshake {
    /// The stream protocol.
    pub fn protocol(self) -> StreamProtocol {
        match self {
            Self::Dcutr => DCUTR,
            Self::Natpunch => NATPUNCH_DCUTR,
            Self::NatpunchClasses => NATPUNCH_DCUTR_CLASSES,
        }
    }

    /// The side that opens the stream.
    pub fn driver(self) -> Side {
        match self {
            Self::Dcutr => Side::Listener,
            Self::Natpunch | Self::NatpunchClasses => Side::Dialer,
        }
    }
}

/// A handshake stream of one session, named by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(u32);

/// How one hole punch runs.
#[derive(Debug, Clone)]
pub struct PunchConfig {
    /// Which end of the relayed connection this peer is.
    pub side: Side,
    /// The engine.
    pub engine: Engine,
    /// Where the addresses offered come from (`observed` or `stock`), for the record.
    pub candidates: String,
    /// The transports to dial.
    pub transport: Transport,
    /// How long a handshake, or an attempt from its dial, may take.
    pub attempt_timeout: Duration,
    /// Attempts before giving up.
    pub max_attempts: u32,
    /// Hole-punch at all (off: the session ends at once, cancelled).
    pub punch: bool,
    /// This peer's NAT mapping class, if known: told to the remote over
    /// [`NATPUNCH_DCUTR_CLASSES`] and, with the remote's, deciding the first attempt's form.
    pub local_mapping: Option<LocalMapping>,
    /// Speak [`NATPUNCH_DCUTR_CLASSES`] (off: behave as a 1.0.0-only natpunch peer).
    pub classes: bool,
    /// Take part in birthday probing over QUIC (`None`: never).
    pub birthday: Option<BirthdayConfig>,
}

/// Birthday probing in one hole punch ([`crate::birthday`]): the budget, and the token and seed
/// used when this side chooses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BirthdayConfig {
    /// Sockets to open as the hard side.
    pub sockets: usize,
    /// Probes to send at most as the easy side.
    pub probes: usize,
    /// Probes per second at most.
    pub rate: u32,
    /// The token, when this side drives (a random one per hole punch).
    pub token: [u8; 16],
    /// The seed of the easy side's port choice (a random one per hole punch).
    pub seed: u64,
    /// Port prediction: ports probed from the hard side's predicted port before random ones,
    /// when it says one (0: never).
    pub window: u16,
}

/// Who the session is between, for the record.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    /// This peer.
    pub local: String,
    /// The remote.
    pub remote: String,
    /// The relay between them.
    pub relay: String,
}

/// A direct connection to the remote, as the driver saw it come up.
#[derive(Debug, Clone)]
pub struct DirectConnection {
    /// The connection.
    pub connection: ConnectionId,
    /// `tcp` or `quic`.
    pub transport: &'static str,
    /// This side dialed it.
    pub dialed_here: bool,
    /// The relayed connection's dialer (A) made it: of simultaneous connections, the one kept.
    pub made_by_a: bool,
    /// It came in on the port birthday probing found (the hard side's listener there).
    pub on_probed_port: bool,
}

/// A dial that failed.
#[derive(Debug, Clone)]
pub struct DialFailed {
    /// The error, with its causes.
    pub error: String,
    /// It ran out of time (rather than being refused).
    pub timed_out: bool,
    /// Per address.
    pub failures: Vec<DialFailure>,
}

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open a handshake stream to the remote over the relayed connection; report
    /// [`Punch::stream_opened`] or [`Punch::stream_failed`].
    Open {
        /// The engine's name for it.
        stream: StreamId,
        /// Its protocol.
        handshake: Handshake,
    },
    /// Write a message on a stream.
    Send {
        /// The stream.
        stream: StreamId,
        /// The message.
        message: HolePunch,
    },
    /// Drop a stream: the engine no longer reads or writes it.
    CloseStream {
        /// The stream.
        stream: StreamId,
    },
    /// Dial the remote directly; report [`Punch::dialed`] at once.
    Dial {
        /// The attempt (1, 2, 3 …).
        attempt: u32,
        /// Where (without `/p2p/…`).
        addrs: Vec<Multiaddr>,
        /// Dial in the listener's role (`override_role`): the connection's dialer is the remote.
        as_listener: bool,
    },
    /// Close a direct connection (the duplicate of a simultaneous dial).
    Close {
        /// The connection.
        connection: ConnectionId,
    },
    /// Birthday probing, the easy side: send `datagram` to `to` from this peer's QUIC socket.
    Probe {
        /// Where to.
        to: std::net::SocketAddr,
        /// The probe.
        datagram: [u8; DATAGRAM_LEN],
    },
    /// Birthday probing, the hard side: open `sockets` sockets towards `easy` until one hears a
    /// probe with `token` or `until`; then close that socket, listen for QUIC on its port and
    /// report [`Punch::birthday_hit`] (or [`Punch::birthday_failed`]).
    OpenSockets {
        /// How many.
        sockets: usize,
        /// The easy side's QUIC address.
        easy: std::net::SocketAddr,
        /// The token.
        token: [u8; 16],
        /// When to give up.
        until: Instant,
    },
    /// Birthday probing is over for this session: stop the sockets of [`Action::OpenSockets`].
    StopSockets,
    /// The hole punch is over; the engine does nothing more.
    Record(Box<Record>),
}

/// Where a driving handshake is.
#[derive(Debug, Clone)]
enum Driving {
    /// The stream is being opened.
    Opening,
    /// CONNECT went out at `sent`.
    Connecting { sent: Instant },
    /// SYNC went out; dial at `dial_at`. `primed`: a reversed attempt in which this side
    /// dials too, as the listener, to open its own NAT's filter.
    Syncing {
        dial_at: Instant,
        remote: Vec<Multiaddr>,
        rtt: Duration,
        reversed: bool,
        primed: bool,
        token: Option<[u8; 16]>,
    },
}

/// Where an answering handshake is.
#[derive(Debug, Clone)]
enum Answering {
    /// Waiting for the remote's CONNECT.
    Connect,
    /// Answered; waiting for SYNC.
    Sync {
        remote: Vec<Multiaddr>,
        reversed: bool,
    },
}

/// The state of a hole punch.
#[derive(Debug, Clone)]
enum State {
    /// Listener: waiting until `until` for a natpunch dialer's stream, then driving DCUtR.
    Expecting { until: Instant },
    /// Waiting for the remote to drive the next attempt (or for the stock behaviour) until
    /// `until`.
    Watching { until: Instant },
    /// This side drives a handshake on `stream`.
    /// `classes`: over [`NATPUNCH_DCUTR_CLASSES`].
    Driving {
        stream: StreamId,
        reversed: bool,
        classes: bool,
        step: Driving,
        until: Instant,
    },
    /// This side answers the remote's handshake on `stream` (`classes`: over
    /// [`NATPUNCH_DCUTR_CLASSES`]).
    Answering {
        stream: StreamId,
        classes: bool,
        step: Answering,
        until: Instant,
    },
    /// Attempt `attempt` (an index) dials, on `connection` once known. `primer`: the dial of
    /// a primed reversed attempt, whose failure does not end the attempt.
    Dialing {
        attempt: usize,
        connection: Option<ConnectionId>,
        primer: bool,
        until: Instant,
    },
    /// Attempt `attempt` is reversed: the remote dials, this side waits.
    Awaiting { attempt: usize, until: Instant },
    /// A direct connection is up; the record closes at its first ping or at `close_by`. A
    /// handshake stream still open is dropped with the session.
    Direct {
        at: Instant,
        transport: &'static str,
        dialed_here: bool,
        outcome: Outcome,
        close_by: Instant,
        lingering: Option<StreamId>,
    },
    /// Over.
    Done,
}

impl State {
    /// The handshake stream this state reads and writes.
    fn stream(&self) -> Option<StreamId> {
        match self {
            Self::Driving { stream, .. } | Self::Answering { stream, .. } => Some(*stream),
            Self::Direct { lingering, .. } => *lingering,
            _ => None,
        }
    }

    /// The attempt in progress.
    fn attempt(&self) -> Option<usize> {
        match self {
            Self::Dialing { attempt, .. } | Self::Awaiting { attempt, .. } => Some(*attempt),
            _ => None,
        }
    }

    fn over(&self) -> bool {
        matches!(self, Self::Direct { .. } | Self::Done)
    }
}

/// Birthday probing in one attempt.
#[derive(Debug)]
struct Probing {
    /// The attempt (an index).
    attempt: usize,
    /// The handshake stream, kept open for natpunch's `HIT`.
    stream: StreamId,
    /// The easy side's prober, or `None` on the hard side.
    prober: Option<Box<EasyProber>>,
    /// The easy side's dial of the probed port was asked for, its result not told yet.
    dialing: bool,
    /// The easy side's dial of the probed port, once made.
    dial: Option<ConnectionId>,
    /// What the record says of it.
    record: AttemptBirthday,
}

/// One hole punch with one remote.
#[derive(Debug)]
pub struct Punch {
    config: PunchConfig,
    peers: Peers,
    state: State,
    /// The side that drives the handshakes and starts each attempt.
    driver: Side,
    remote: Option<RemoteEngine>,
    /// The remote's mapping class, as its last [`NATPUNCH_DCUTR_CLASSES`] CONNECT said.
    remote_mapping: Option<Mapping>,
    /// The remote does not speak [`NATPUNCH_DCUTR_CLASSES`]: drive 1.0.0.
    classes_refused: bool,
    /// The remote's last CONNECT said it takes part in birthday probing.
    remote_birthday: bool,
    /// Birthday probing in progress.
    birthday: Option<Probing>,
    /// Port prediction: the port this side's NAT is expected to give its next mapping, as the
    /// driver measured it ([`Punch::predicted`]), and whether a message carried it yet.
    next_port: Option<u16>,
    next_port_told: bool,
    /// The remote's predicted port, as its messages said.
    remote_next_port: Option<u16>,
    /// When the relayed connection came up: the record's times count from here.
    start: Instant,
    started_unix_ms: u64,
    /// When a side that does not drive stops waiting for the next attempt.
    deadline: Instant,
    attempts: Vec<Attempt>,
    /// The direct connections up, and whether A made each.
    directs: Vec<(ConnectionId, bool)>,
    /// The addresses sent in CONNECT.
    offered: Vec<Multiaddr>,
    /// The addresses offered when the session began, for the record.
    local_addrs: Vec<String>,
    remote_addrs: Vec<String>,
    relay_rtt: Option<Duration>,
    direct_rtt: Option<Duration>,
    next_stream: u32,
    actions: VecDeque<Action>,
}

impl Punch {
    /// A hole punch whose relayed connection came up at `now` (`unix_ms` by the wall clock).
    /// `remote` is what identify said of the remote, if it answered yet; `offered` the
    /// addresses to send in CONNECT (with `/p2p/<this peer>`).
    pub fn new(
        now: Instant,
        unix_ms: u64,
        config: PunchConfig,
        peers: Peers,
        remote: Option<RemoteEngine>,
        offered: Vec<Multiaddr>,
    ) -> Self {
        let mut p = Self::idle(now, unix_ms, config, peers);
        p.remote = remote;
        p.local_addrs = offered.iter().map(ToString::to_string).collect();
        p.offered = offered;
        if !p.config.punch {
            p.finish(now, Outcome::Cancelled, Some("hole punching is off".into()));
        } else if p.config.engine == Engine::Natpunch {
            match p.config.side {
                Side::Dialer => {
                    p.driver = Side::Dialer;
                    p.drive(now);
                }
                Side::Listener if remote == Some(RemoteEngine::Other) => p.drive(now),
                Side::Listener => {
                    p.state = State::Expecting {
                        until: now + FAST_WAIT,
                    }
                }
            }
        }
        p
    }

    /// The record of a hole punch whose relayed connection did not come up (`error`).
    pub fn no_connection(
        now: Instant,
        unix_ms: u64,
        config: PunchConfig,
        peers: Peers,
        error: String,
    ) -> Record {
        Self::idle(now, unix_ms, config, peers).record(now, Outcome::NoConnection, Some(error))
    }

    /// A session that has not started and offers nothing: it watches until the wait is over.
    fn idle(now: Instant, unix_ms: u64, config: PunchConfig, peers: Peers) -> Self {
        let wait = match config.engine {
            Engine::Stock => STOCK_WAIT,
            Engine::Natpunch => waiting(&config),
        };
        Self {
            config,
            peers,
            state: State::Watching { until: now + wait },
            driver: Side::Listener,
            remote: None,
            remote_mapping: None,
            classes_refused: false,
            remote_birthday: false,
            birthday: None,
            next_port: None,
            next_port_told: false,
            remote_next_port: None,
            start: now,
            started_unix_ms: unix_ms,
            deadline: now + wait,
            attempts: Vec::new(),
            directs: Vec::new(),
            local_addrs: Vec::new(),
            offered: Vec::new(),
            remote_addrs: Vec::new(),
            relay_rtt: None,
            direct_rtt: None,
            next_stream: 0,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Punch::handle_timeout`] next; `None` once over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let state = self.state_timeout()?;
        let probe = self
            .birthday
            .as_ref()
            .filter(|b| b.record.error.is_none())
            .and_then(|b| b.prober.as_ref())
            .and_then(|p| p.poll_timeout());
        Some(probe.map_or(state, |p| p.min(state)))
    }

    /// When the state's own time runs out.
    fn state_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Expecting { until }
            | State::Watching { until }
            | State::Answering { until, .. }
            | State::Dialing { until, .. }
            | State::Awaiting { until, .. } => Some(*until),
            State::Driving { step, until, .. } => Some(match step {
                Driving::Syncing { dial_at, .. } => (*dial_at).min(*until),
                _ => *until,
            }),
            State::Direct { close_by, .. } => Some(*close_by),
            State::Done => None,
        }
    }

    /// Whether the record is out.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The addresses to offer in the next CONNECT (a port mapping changed them).
    pub fn set_offered(&mut self, offered: Vec<Multiaddr>) {
        self.offered = offered;
    }

    /// Identify told what the remote runs. A listener waiting for a natpunch dialer's stream
    /// drives DCUtR at once when the remote does not run natpunch.
    pub fn identified(&mut self, now: Instant, remote: RemoteEngine) {
        self.remote = Some(remote);
        if remote == RemoteEngine::Other && matches!(self.state, State::Expecting { .. }) {
            self.drive(now);
        }
    }

    /// The remote opened a handshake stream of `handshake`: its name if the engine answers
    /// it, `None` if the driver is to drop it.
    pub fn inbound(&mut self, now: Instant, handshake: Handshake) -> Option<StreamId> {
        let remote_driver = handshake.driver();
        // A stream claiming this side's role, or one that comes too late.
        if remote_driver == self.config.side
            || self.state.over()
            || self.config.engine == Engine::Stock
        {
            return None;
        }
        // Both sides started: the listener's DCUtR goes on, the dialer answers it.
        if self.config.side == Side::Listener && matches!(self.state, State::Driving { .. }) {
            return None;
        }
        let classes = handshake == Handshake::NatpunchClasses;
        if classes && !self.config.classes {
            return None;
        }
        if classes {
            self.remote = Some(RemoteEngine::NatpunchClasses);
        }
        self.driver = remote_driver;
        let stream = self.new_stream();
        // A newer stream replaces an older handshake; an attempt still dialing is left to
        // end on its own (the record counts it cancelled unless its connection comes).
        self.set_state(State::Answering {
            stream,
            classes,
            step: Answering::Connect,
            until: now + self.config.attempt_timeout,
        });
        Some(stream)
    }

    /// A stream this engine asked for is open (writes may go out).
    pub fn stream_opened(&mut self, now: Instant, stream: StreamId) {
        let mapping = self.local_class();
        let next_port = self.unsent_next_port();
        if let State::Driving {
            stream: s,
            reversed,
            classes,
            step: step @ Driving::Opening,
            ..
        } = &mut self.state
            && *s == stream
        {
            let message = HolePunch {
                kind: Kind::Connect,
                addrs: self.offered.iter().map(Multiaddr::to_vec).collect(),
                reversed: *reversed,
                mapping: mapping.filter(|_| *classes),
                birthday: *classes && offers_birthday(&self.config),
                token: None,
                probe: None,
                next_port: next_port.filter(|_| *classes),
            };
            *step = Driving::Connecting { sent: now };
            self.next_port_told |= message.next_port.is_some();
            self.actions.push_back(Action::Send { stream, message });
        }
    }

    /// A stream failed to open, or broke. `unsupported`: the remote does not speak its
    /// protocol.
    pub fn stream_failed(
        &mut self,
        now: Instant,
        stream: StreamId,
        error: String,
        unsupported: bool,
    ) {
        if self.state.stream() != Some(stream) || self.state.over() {
            return;
        }
        if let State::Driving {
            step: Driving::Syncing { .. },
            ..
        } = self.state
        {
            // SYNC is out: the handshake is over, and the remote drops its end once it read
            // SYNC. Only birthday probing's HIT could still come; the dial goes ahead.
            return;
        }
        if unsupported
            && self.config.side == Side::Dialer
            && matches!(self.state, State::Driving { classes: true, .. })
        {
            // A 1.0.0-only natpunch peer, or no natpunch at all: offer 1.0.0 next.
            self.classes_refused = true;
            self.drive(now);
            return;
        }
        if unsupported
            && self.config.side == Side::Dialer
            && matches!(self.state, State::Driving { .. })
        {
            // Not a natpunch listener: it drives DCUtR itself.
            self.driver = Side::Listener;
            self.deadline = self.deadline.max(now + waiting(&self.config));
            self.set_state(State::Watching {
                until: self.deadline,
            });
            return;
        }
        self.handshake_failed(now, AttemptOutcome::ProtocolError, error);
    }

    /// A message came in on `stream`.
    pub fn message(&mut self, now: Instant, stream: StreamId, message: HolePunch) {
        let ours = self.state.stream() == Some(stream)
            || self.birthday.as_ref().is_some_and(|b| b.stream == stream);
        if let Some(port) = message.next_port.filter(|_| ours && !self.state.over()) {
            self.remote_predicted(now, port);
        }
        if message.kind == Kind::Next {
            return;
        }
        if message.kind == Kind::Hit {
            if self.birthday.as_ref().is_some_and(|b| b.stream == stream) {
                self.on_hit(message.probe);
            }
            return;
        }
        if self.state.stream() != Some(stream) || self.state.over() {
            return;
        }
        if let State::Driving { classes: true, .. } | State::Answering { classes: true, .. } =
            self.state
            && message.kind == Kind::Connect
        {
            self.remote_mapping = message.mapping.or(self.remote_mapping);
            self.remote_birthday = message.birthday;
        }
        let first = self.attempts.is_empty();
        let by_classes = self.by_classes();
        // Over 1.1.0, with both sides taking part and one hard, the first attempt probes too.
        let probe_token = self
            .config
            .birthday
            .filter(|_| first && self.probing_role().is_some())
            .map(|b| b.token);
        let next_port = self.unsent_next_port();
        match &mut self.state {
            State::Driving {
                step: step @ Driving::Connecting { .. },
                reversed,
                classes,
                ..
            } => {
                let Driving::Connecting { sent } = *step else {
                    return;
                };
                if message.kind != Kind::Connect {
                    return self.handshake_failed(
                        now,
                        AttemptOutcome::ProtocolError,
                        "the remote answered CONNECT with SYNC".into(),
                    );
                }
                // Only natpunch answers natpunch's protocols (identify may not have yet).
                let engine = if *classes {
                    RemoteEngine::NatpunchClasses
                } else {
                    RemoteEngine::Natpunch
                };
                if self.config.side == Side::Dialer
                    && !self.remote.is_some_and(RemoteEngine::natpunch)
                {
                    self.remote = Some(engine);
                }
                // Over 1.1.0 the reply told the remote's class: the first attempt may be
                // reversed after all, and SYNC says so.
                let reversed = *reversed || (first && by_classes);
                let primed = reversed && by_classes;
                let rtt = now.saturating_duration_since(sent);
                // A primer goes out with SYNC: it must cross this side's NAT before the
                // remote's SYN, which leaves only once SYNC has arrived, whatever the relayed
                // path's asymmetry and however short the direct path.
                let dial_at = if primed { now } else { now + rtt / 2 };
                let token = probe_token.filter(|_| *classes);
                *step = Driving::Syncing {
                    dial_at,
                    remote: parse_addrs(&message.addrs),
                    rtt,
                    reversed,
                    primed,
                    token,
                };
                let sync = HolePunch {
                    kind: Kind::Sync,
                    addrs: Vec::new(),
                    reversed: reversed && *classes,
                    mapping: None,
                    birthday: false,
                    token,
                    probe: None,
                    next_port: next_port.filter(|_| *classes),
                };
                self.next_port_told |= sync.next_port.is_some();
                self.actions.push_back(Action::Send {
                    stream,
                    message: sync,
                });
                if dial_at <= now {
                    self.handle_timeout(now);
                }
            }
            State::Answering {
                step: step @ Answering::Connect,
                classes,
                ..
            } => {
                if message.kind != Kind::Connect {
                    return self.handshake_failed(
                        now,
                        AttemptOutcome::ProtocolError,
                        "the stream opened with SYNC".into(),
                    );
                }
                *step = Answering::Sync {
                    remote: parse_addrs(&message.addrs),
                    reversed: message.reversed,
                };
                let reply = HolePunch {
                    kind: Kind::Connect,
                    addrs: self.offered.iter().map(Multiaddr::to_vec).collect(),
                    reversed: false,
                    mapping: self
                        .config
                        .local_mapping
                        .map(|l| l.mapping)
                        .filter(|_| *classes),
                    birthday: *classes && offers_birthday(&self.config),
                    token: None,
                    probe: None,
                    next_port: next_port.filter(|_| *classes),
                };
                self.next_port_told |= reply.next_port.is_some();
                self.actions.push_back(Action::Send {
                    stream,
                    message: reply,
                });
            }
            State::Answering {
                step: Answering::Sync { remote, reversed },
                classes,
                ..
            } => {
                if message.kind != Kind::Sync {
                    return self.handshake_failed(
                        now,
                        AttemptOutcome::ProtocolError,
                        "a second CONNECT instead of SYNC".into(),
                    );
                }
                // Over 1.1.0 the driver's SYNC carries the form it chose once it knew both
                // classes.
                let reversed = *reversed || (*classes && message.reversed);
                let remote = std::mem::take(remote);
                let token = message.token.filter(|_| *classes && first);
                if let Some(token) = token {
                    self.start_probing(now, token, &remote);
                }
                self.begin_attempt(now, remote, None, reversed, false);
            }
            _ => {}
        }
    }

    /// The driver made the dial of [`Action::Dial`] (`Ok`, with its connection) or could
    /// not start it.
    pub fn dialed(&mut self, now: Instant, result: Result<ConnectionId, String>) {
        if let Some(b) = self.birthday.as_mut()
            && b.dialing
        {
            // The dial of the probed port (its action came after the attempt's own dial).
            b.dialing = false;
            match result {
                Ok(id) => b.dial = Some(id),
                Err(e) => {
                    b.record.error = Some(format!("dialing the probed port: {e}"));
                }
            }
            return;
        }
        let State::Dialing {
            attempt,
            connection: connection @ None,
            primer,
            until,
        } = &mut self.state
        else {
            return;
        };
        let probing = self.birthday.is_some();
        match result {
            Ok(id) => *connection = Some(id),
            Err(_) if *primer || probing => {
                // Only a primer: the remote's dial may still come.
                let (attempt, until) = (*attempt, *until);
                self.set_state(State::Awaiting { attempt, until });
            }
            Err(error) => {
                let attempt = *attempt;
                self.end_attempt(now, attempt, AttemptOutcome::Failed, Some(error));
                self.after_attempt(now);
            }
        }
    }

    /// The stock `dcutr` behaviour dials on `connection` (stock engine only: natpunch's own
    /// dials are known from [`Action::Dial`]).
    pub fn stock_dialing(&mut self, now: Instant, connection: ConnectionId) {
        if self.config.engine != Engine::Stock || self.state.over() {
            return;
        }
        let attempt = self.start_attempt(now, None);
        if let Some(a) = self.attempts.get_mut(attempt) {
            a.dialed_ms = Some(ms(self.start, now));
        }
        // The stock engine's own timeouts end its dials; this only keeps the record open.
        let wait = self.config.attempt_timeout.max(STOCK_DIAL_WAIT);
        self.set_state(State::Dialing {
            attempt,
            connection: Some(connection),
            primer: false,
            until: now + wait,
        });
    }

    /// The stock `dcutr` behaviour gave up.
    pub fn stock_failed(&mut self, now: Instant, error: String) {
        if !self.state.over() {
            self.finish(now, Outcome::Failed, Some(error));
        }
    }

    /// The dial on `connection` failed.
    pub fn dial_failed(&mut self, now: Instant, connection: ConnectionId, failed: DialFailed) {
        if let Some(b) = self.birthday.as_mut()
            && b.dial == Some(connection)
        {
            b.record.error = Some(format!("dialing the probed port: {}", failed.error));
            return;
        }
        let State::Dialing {
            attempt,
            connection: Some(c),
            primer,
            until,
        } = self.state
        else {
            return;
        };
        if c != connection {
            return;
        }
        if let Some(a) = self.attempts.get_mut(attempt) {
            if a.dialed.is_empty() {
                a.dialed = failed.failures.iter().map(|f| f.addr.clone()).collect();
            }
            a.dial_errors = failed.failures;
        }
        if primer || self.birthday.is_some() {
            // The primer was expected to go nowhere, and probing may still find a way: the
            // remote's dial, or the probed port's connection, may still come.
            self.set_state(State::Awaiting { attempt, until });
            return;
        }
        let outcome = if failed.timed_out {
            AttemptOutcome::Timeout
        } else {
            AttemptOutcome::Failed
        };
        self.end_attempt(now, attempt, outcome, Some(failed.error));
        self.after_attempt(now);
    }

    /// A direct connection to the remote came up.
    pub fn direct(&mut self, now: Instant, direct: &DirectConnection) {
        if let Some(b) = self.birthday.as_mut() {
            b.record.direct |= direct.on_probed_port || b.dial == Some(direct.connection);
        }
        self.directs.push((direct.connection, direct.made_by_a));
        if self.config.engine == Engine::Natpunch {
            let extra = duplicates(&self.directs);
            self.directs.retain(|(c, _)| !extra.contains(c));
            for connection in extra {
                self.actions.push_back(Action::Close { connection });
            }
        }
        if self.state.over() {
            return;
        }
        let handshaking = matches!(self.state, State::Driving { .. } | State::Answering { .. });
        let outcome = if self.attempts.is_empty() && !handshaking {
            Outcome::ConnectionReversed
        } else {
            Outcome::Success
        };
        if let Some(index) = self.state.attempt().or(self.attempts.len().checked_sub(1)) {
            self.end_attempt(now, index, AttemptOutcome::Success, None);
        }
        self.state = State::Direct {
            at: now,
            transport: direct.transport,
            dialed_here: direct.dialed_here,
            outcome,
            close_by: now + self.config.attempt_timeout.min(DIRECT_RTT_WAIT),
            lingering: self.state.stream(),
        };
    }

    /// A ping to the remote was answered, over a relayed connection or a direct one.
    pub fn ping(&mut self, now: Instant, relayed: bool, rtt: Duration) {
        if relayed {
            self.relay_rtt.get_or_insert(rtt);
            return;
        }
        self.direct_rtt.get_or_insert(rtt);
        if let State::Direct { outcome, .. } = self.state {
            self.finish(now, outcome, None);
        }
    }

    /// The time of [`Punch::poll_timeout`] came (or passed).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.send_probes(now);
        let limit = self.config.attempt_timeout;
        match &mut self.state {
            State::Expecting { until } if now >= *until => self.drive(now),
            State::Watching { until } if now >= *until => {
                let (outcome, error) = if self.attempts.is_empty() {
                    (
                        Outcome::NoStream,
                        "the remote never started a hole punch".to_owned(),
                    )
                } else {
                    (
                        Outcome::Failed,
                        format!("{} attempts failed", self.attempts.len()),
                    )
                };
                self.finish(now, outcome, Some(error));
            }
            State::Driving {
                step:
                    Driving::Syncing {
                        dial_at,
                        remote,
                        rtt,
                        reversed,
                        primed,
                        token,
                    },
                ..
            } if now >= *dial_at => {
                let (remote, rtt, reversed, primed, token) =
                    (std::mem::take(remote), *rtt, *reversed, *primed, *token);
                if let Some(token) = token {
                    self.start_probing(now, token, &remote);
                }
                self.begin_attempt(now, remote, Some(rtt), reversed, primed);
            }
            State::Driving { until, .. } if now >= *until => self.handshake_failed(
                now,
                AttemptOutcome::Timeout,
                format!("no answer to CONNECT within {limit:?}"),
            ),
            State::Answering { until, .. } if now >= *until => self.handshake_failed(
                now,
                AttemptOutcome::Timeout,
                format!("no SYNC within {limit:?}"),
            ),
            State::Dialing { attempt, until, .. } | State::Awaiting { attempt, until }
                if now >= *until =>
            {
                let attempt = *attempt;
                self.end_attempt(
                    now,
                    attempt,
                    AttemptOutcome::Timeout,
                    Some("no direct connection within the attempt's time".into()),
                );
                self.after_attempt(now);
            }
            State::Direct {
                close_by, outcome, ..
            } if now >= *close_by => {
                let outcome = *outcome;
                self.finish(now, outcome, None);
            }
            _ => {}
        }
    }

    /// This peer's mapping class, if known.
    fn local_class(&self) -> Option<Mapping> {
        self.config.local_mapping.map(|l| l.mapping)
    }

    /// Whether both classes are known and say: the first attempt is reversed (TCP only; QUIC
    /// has no role problem).
    fn by_classes(&self) -> bool {
        let (dialer, listener) = match self.config.side {
            Side::Dialer => (self.local_class(), self.remote_mapping),
            Side::Listener => (self.remote_mapping, self.local_class()),
        };
        self.config.transport == Transport::Tcp && first_attempt_reversed(dialer, listener)
    }

    fn new_stream(&mut self) -> StreamId {
        self.next_stream += 1;
        StreamId(self.next_stream)
    }

    /// Moves to `state`, dropping the stream the old state used if the new one does not.
    fn set_state(&mut self, state: State) {
        let old = std::mem::replace(&mut self.state, state);
        if let Some(stream) = old.stream()
            && self.state.stream() != Some(stream)
            && self.birthday.as_ref().is_none_or(|b| b.stream != stream)
        {
            self.actions.push_back(Action::CloseStream { stream });
        }
    }

    /// Drives the next handshake from this side.
    fn drive(&mut self, now: Instant) {
        self.driver = self.config.side;
        let natpunch = self.remote.is_some_and(RemoteEngine::natpunch);
        let reversed = if self.by_classes() {
            // The classes chose the reversed form first; the next attempt tries the other.
            self.attempts.is_empty()
        } else {
            // The second attempt between natpunch peers is reversed: if a TCP simultaneous
            // open failed because only the listener's packets get through (its NAT maps per
            // destination, this side's does not filter by port), its dial, landing on this
            // side's listener, must take the dialer's role.
            self.attempts.len() == 1 && natpunch
        };
        let handshake = match self.config.side {
            Side::Listener => Handshake::Dcutr,
            // 1.1.0 first, unless the remote is known not to speak it.
            Side::Dialer
                if self.config.classes
                    && !self.classes_refused
                    && !matches!(
                        self.remote,
                        Some(RemoteEngine::Natpunch | RemoteEngine::Other)
                    ) =>
            {
                Handshake::NatpunchClasses
            }
            Side::Dialer => Handshake::Natpunch,
        };
        let stream = self.new_stream();
        self.set_state(State::Driving {
            stream,
            reversed,
            classes: handshake == Handshake::NatpunchClasses,
            step: Driving::Opening,
            until: now + self.config.attempt_timeout,
        });
        self.actions.push_back(Action::Open { stream, handshake });
    }

    /// The handshake in progress failed: it counts as an attempt.
    fn handshake_failed(&mut self, now: Instant, outcome: AttemptOutcome, error: String) {
        let index = self.start_attempt(now, None);
        self.end_attempt(now, index, outcome, Some(error));
        self.after_attempt(now);
    }

    /// The handshake is done: dial `remote` (or, reversed on the dialer's side, wait).
    fn begin_attempt(
        &mut self,
        now: Instant,
        remote: Vec<Multiaddr>,
        rtt: Option<Duration>,
        reversed: bool,
        primed: bool,
    ) {
        let timeout = self.config.attempt_timeout;
        let side = self.config.side;
        if side != self.driver {
            // Wait for this attempt, then for the driving side's next one.
            self.deadline = self
                .deadline
                .max(now + timeout * 2 + Duration::from_secs(1));
        }
        let index = self.start_attempt(now, rtt);
        self.remote_addrs = remote.iter().map(ToString::to_string).collect();
        let transport = self.config.transport;
        let targets: Vec<Multiaddr> = remote
            .into_iter()
            .filter(|a| usable(a, transport))
            .map(without_p2p)
            .collect();
        let at = ms(self.start, now);
        let Some(attempt) = self.attempts.get_mut(index) else {
            return;
        };
        attempt.reversed = reversed;
        attempt.remote_addrs.clone_from(&self.remote_addrs);
        let primer = reversed && primed && side == Side::Dialer && !targets.is_empty();
        if reversed && side == Side::Dialer && !primer {
            // The listener dials; this side only waits for its connection.
            self.set_state(State::Awaiting {
                attempt: index,
                until: now + timeout,
            });
            return;
        }
        if targets.is_empty() {
            self.end_attempt(
                now,
                index,
                AttemptOutcome::ProtocolError,
                Some("the remote offered no address this peer can dial".into()),
            );
            return self.after_attempt(now);
        }
        attempt.dialed_ms = Some(at);
        attempt.dialed = targets.iter().map(ToString::to_string).collect();
        let number = attempt.number;
        self.set_state(State::Dialing {
            attempt: index,
            connection: None,
            primer,
            until: now + timeout,
        });
        self.actions.push_back(Action::Dial {
            attempt: number,
            addrs: targets,
            // A primer goes towards the remote only to open this side's filter: should it
            // get through, the remote (dialing as the dialer) keeps the dialer's role.
            as_listener: (side == Side::Listener && !reversed) || primer,
        });
    }

    /// An attempt ended: the next one, waiting for the remote's, or the end.
    fn after_attempt(&mut self, now: Instant) {
        let made = self.attempts.len();
        let max = usize::try_from(self.config.max_attempts).unwrap_or(usize::MAX);
        if self.config.engine == Engine::Stock || self.driver != self.config.side {
            if self.config.engine == Engine::Natpunch && made >= max {
                return self.finish(
                    now,
                    Outcome::Failed,
                    Some(format!("{made} attempts failed")),
                );
            }
            self.set_state(State::Watching {
                until: self.deadline,
            });
        } else if made >= max {
            self.finish(
                now,
                Outcome::Failed,
                Some(format!("{made} attempts failed")),
            );
        } else {
            self.drive(now);
        }
    }

    fn start_attempt(&mut self, now: Instant, rtt: Option<Duration>) -> usize {
        let number = u32::try_from(self.attempts.len() + 1).unwrap_or(u32::MAX);
        self.attempts.push(Attempt {
            number,
            started_ms: ms(self.start, now),
            rtt_ms: rtt.map(|r| r.as_secs_f64() * 1000.0),
            reversed: false,
            dialed_ms: None,
            dialed: Vec::new(),
            remote_addrs: Vec::new(),
            outcome: AttemptOutcome::Unknown,
            error: None,
            dial_errors: Vec::new(),
            ended_ms: 0.0,
            birthday: None,
        });
        self.attempts.len() - 1
    }

    fn end_attempt(
        &mut self,
        now: Instant,
        index: usize,
        outcome: AttemptOutcome,
        error: Option<String>,
    ) {
        let at = ms(self.start, now);
        if let Some(a) = self.attempts.get_mut(index)
            && a.outcome == AttemptOutcome::Unknown
        {
            a.outcome = outcome;
            a.error = error;
            a.ended_ms = at;
        }
        if self.birthday.as_ref().is_some_and(|b| b.attempt == index) {
            self.stop_probing();
        }
    }

    /// Whether both classes and both sides' word say this hole punch may probe, and as what.
    fn probing_role(&self) -> Option<BirthdayRole> {
        if !offers_birthday(&self.config) || !self.remote_birthday {
            return None;
        }
        birthday_role(self.local_class(), self.remote_mapping)
    }

    /// Starts birthday probing with `token` in the attempt about to begin, towards `remote`
    /// (the addresses of the remote's CONNECT); keeps the handshake stream for `HIT`.
    fn start_probing(&mut self, now: Instant, token: [u8; 16], remote: &[Multiaddr]) {
        let (Some(role), Some(config), Some(stream)) = (
            self.probing_role(),
            self.config.birthday,
            self.state.stream(),
        ) else {
            return;
        };
        let Some(quic) = remote.iter().find_map(quic_addr) else {
            return;
        };
        let mut record = AttemptBirthday {
            role,
            sockets: None,
            probes: None,
            port: None,
            hit: false,
            direct: false,
            predicted: None,
            in_window: false,
            error: None,
        };
        let prober = match role {
            BirthdayRole::Easy => {
                let mut prober = EasyProber::new(
                    now,
                    quic.ip(),
                    token,
                    config.probes,
                    config.rate,
                    config.seed,
                );
                if let Some(prediction) = self
                    .remote_next_port
                    .and_then(|port| Prediction::window(port, config.window))
                {
                    prober.predict(now, prediction);
                    record.predicted = Some(prediction.first);
                }
                Some(Box::new(prober))
            }
            BirthdayRole::Hard => {
                record.predicted = self.next_port.filter(|_| self.next_port_told);
                record.sockets = Some(u32::try_from(config.sockets).unwrap_or(u32::MAX));
                self.actions.push_back(Action::OpenSockets {
                    sockets: config.sockets,
                    easy: quic,
                    token,
                    until: now + self.config.attempt_timeout,
                });
                None
            }
        };
        self.birthday = Some(Probing {
            attempt: self.attempts.len(),
            stream,
            prober,
            dialing: false,
            dial: None,
            record,
        });
        self.send_probes(now);
    }

    /// The easy side's probes due by `now`, while nothing went wrong.
    fn send_probes(&mut self, now: Instant) {
        if let Some(prober) = self
            .birthday
            .as_mut()
            .filter(|b| b.record.error.is_none())
            .and_then(|b| b.prober.as_mut())
        {
            while let Some(p) = prober.poll_probe(now) {
                self.actions.push_back(Action::Probe {
                    to: p.to,
                    datagram: p.datagram.encode(),
                });
            }
        }
    }

    /// Ends birthday probing: its record goes to its attempt, its sockets and stream close.
    fn stop_probing(&mut self) {
        let Some(mut b) = self.birthday.take() else {
            return;
        };
        match &b.prober {
            Some(prober) => {
                b.record.probes = Some(u32::try_from(prober.sent()).unwrap_or(u32::MAX));
            }
            None => self.actions.push_back(Action::StopSockets),
        }
        if self.state.stream() != Some(b.stream) {
            self.actions
                .push_back(Action::CloseStream { stream: b.stream });
        }
        if let Some(a) = self.attempts.get_mut(b.attempt) {
            a.birthday = Some(b.record);
        }
    }

    /// The easy side: the hard side's socket heard probe `probe`; dial the port it went to.
    fn on_hit(&mut self, probe: Option<u32>) {
        let Some(b) = self.birthday.as_mut() else {
            return;
        };
        let (Some(prober), Some(probe)) = (b.prober.as_mut(), probe) else {
            return;
        };
        if b.record.hit {
            return;
        }
        let Some(at) = prober.told(probe) else {
            b.record.error = Some(format!("the remote heard probe {probe}, never sent"));
            return;
        };
        b.record.hit = true;
        b.record.port = Some(at.port());
        b.record.in_window = prober.hit_predicted();
        b.record.probes = Some(u32::try_from(prober.sent()).unwrap_or(u32::MAX));
        b.dialing = true;
        let attempt = u32::try_from(b.attempt + 1).unwrap_or(u32::MAX);
        let addr = Multiaddr::from(at.ip())
            .with(Protocol::Udp(at.port()))
            .with(Protocol::QuicV1);
        if let Some(a) = self.attempts.get_mut(b.attempt) {
            a.dialed.push(addr.to_string());
        }
        self.actions.push_back(Action::Dial {
            attempt,
            addrs: vec![addr],
            as_listener: false,
        });
    }

    /// The hard side: the socket probe number `probe` reached is closed, and this peer listens
    /// for QUIC on its port. The remote hears of it over the handshake stream.
    pub fn birthday_hit(&mut self, probe: u32) {
        let Some(b) = self.birthday.as_mut() else {
            return;
        };
        if b.prober.is_some() || b.record.hit {
            return;
        }
        b.record.hit = true;
        b.record.probes = Some(probe);
        let mut hit = HolePunch::new(Kind::Hit, Vec::new());
        hit.probe = Some(probe);
        let stream = b.stream;
        self.actions.push_back(Action::Send {
            stream,
            message: hit,
        });
    }

    /// Port prediction: this side's NAT is expected to give its next mapping `port` (the driver
    /// measured it, for a side whose NAT maps per destination), so the remote's probes try
    /// there first. It goes out on this side's next handshake message (CONNECT or SYNC), or
    /// alone in a `NEXT` when the handshake is past that and the remote takes part in probing.
    pub fn predicted(&mut self, port: u16) {
        if self.next_port.is_some() || self.state.over() {
            return;
        }
        self.next_port = Some(port);
        let late = match &self.state {
            State::Driving {
                stream,
                classes: true,
                step: Driving::Syncing { .. },
                ..
            }
            | State::Answering {
                stream,
                classes: true,
                step: Answering::Sync { .. },
                ..
            } => Some(*stream),
            _ => self.birthday.as_ref().map(|b| b.stream),
        };
        if let Some(stream) = late.filter(|_| self.remote_birthday && offers_birthday(&self.config))
        {
            let mut next = HolePunch::new(Kind::Next, Vec::new());
            next.next_port = Some(port);
            self.next_port_told = true;
            if let Some(b) = self.birthday.as_mut() {
                b.record.predicted = Some(port);
            }
            self.actions.push_back(Action::Send {
                stream,
                message: next,
            });
        }
    }

    /// This side's predicted port, if no message carried it yet and this side probes at all.
    fn unsent_next_port(&self) -> Option<u16> {
        self.next_port
            .filter(|_| !self.next_port_told && offers_birthday(&self.config))
    }

    /// The remote said its NAT's next mapping is expected at `port`: an easy side probes the
    /// window from there first, at once if it probes already.
    fn remote_predicted(&mut self, now: Instant, port: u16) {
        if self.remote_next_port.is_some() {
            return;
        }
        self.remote_next_port = Some(port);
        let window = self.config.birthday.map_or(0, |b| b.window);
        let Some(prediction) = Prediction::window(port, window) else {
            return;
        };
        if let Some(b) = self.birthday.as_mut()
            && let Some(prober) = b.prober.as_mut()
            && !b.record.hit
        {
            prober.predict(now, prediction);
            b.record.predicted = Some(prediction.first);
            self.send_probes(now);
        }
    }

    /// Probing cannot go on: the hard side's sockets heard nothing or its port could not be
    /// listened on, or the easy side has no socket to probe from (it stops probing).
    pub fn birthday_failed(&mut self, error: String) {
        if let Some(b) = self.birthday.as_mut() {
            b.record.error.get_or_insert(error);
        }
    }

    /// Ends the session with `outcome` and yields its record.
    fn finish(&mut self, now: Instant, outcome: Outcome, error: Option<String>) {
        self.stop_probing();
        let record = self.record(now, outcome, error);
        self.set_state(State::Done);
        self.actions.push_back(Action::Record(Box::new(record)));
    }

    /// The record, as of `now`: attempts still open count as cancelled.
    fn record(&mut self, now: Instant, outcome: Outcome, error: Option<String>) -> Record {
        let end = ms(self.start, now);
        let mut attempts = std::mem::take(&mut self.attempts);
        for a in &mut attempts {
            if a.outcome == AttemptOutcome::Unknown {
                a.outcome = AttemptOutcome::Cancelled;
                a.ended_ms = end;
            }
        }
        let direct = match self.state {
            State::Direct {
                at,
                transport,
                dialed_here,
                ..
            } => Some((at, transport, dialed_here)),
            _ => None,
        };
        Record {
            side: self.config.side,
            engine: format!("{:?}", self.config.engine).to_lowercase(),
            candidates: self.config.candidates.clone(),
            local_peer: self.peers.local.clone(),
            remote_peer: self.peers.remote.clone(),
            relay: self.peers.relay.clone(),
            started_unix_ms: self.started_unix_ms,
            outcome,
            transport: direct.map(|(_, t, _)| t.to_owned()),
            dialed_by: direct.map(|(_, _, here)| if here { "local" } else { "remote" }.to_owned()),
            time_to_direct_ms: direct.map(|(at, _, _)| ms(self.start, at)),
            to_relay_rtt_ms: None,
            relay_rtt_ms: self.relay_rtt.map(|d| d.as_secs_f64() * 1000.0),
            direct_rtt_ms: self.direct_rtt.map(|d| d.as_secs_f64() * 1000.0),
            local_mapping: self.local_class(),
            local_mapping_source: self.config.local_mapping.map(|l| l.source),
            remote_mapping: self.remote_mapping,
            local_addrs: std::mem::take(&mut self.local_addrs),
            remote_addrs: std::mem::take(&mut self.remote_addrs),
            attempts,
            direct_connections: u32::try_from(self.directs.len()).unwrap_or(u32::MAX),
            error,
            ended_ms: end,
        }
    }
}

/// How long a side that does not drive waits for the remote's attempts.
/// Whether this side takes part in birthday probing: it may, and it punches over QUIC with
/// natpunch's engine.
fn offers_birthday(config: &PunchConfig) -> bool {
    config.birthday.is_some() && config.transport.quic() && config.engine == Engine::Natpunch
}

/// The UDP address of a direct QUIC multiaddr (`/ip4/…/udp/…/quic-v1…`).
pub(crate) fn quic_addr(a: &Multiaddr) -> Option<std::net::SocketAddr> {
    if is_relayed(a) {
        return None;
    }
    let mut parts = a.iter();
    let ip = match parts.next()? {
        Protocol::Ip4(ip) => std::net::IpAddr::V4(ip),
        Protocol::Ip6(ip) => std::net::IpAddr::V6(ip),
        _ => return None,
    };
    let Protocol::Udp(port) = parts.next()? else {
        return None;
    };
    matches!(parts.next()?, Protocol::QuicV1).then_some(std::net::SocketAddr::new(ip, port))
}

fn waiting(config: &PunchConfig) -> Duration {
    config.attempt_timeout * config.max_attempts.max(1) + Duration::from_secs(2)
}

/// Milliseconds from `start` to `at`.
fn ms(start: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(start).as_secs_f64() * 1000.0
}

/// Of simultaneous direct connections to one remote, the ones to close: those A (the relayed
/// connection's dialer) did not make, once one it made is up. Both sides decide alike, so both
/// keep the same connection (QUIC punches make two).
pub fn duplicates(directs: &[(ConnectionId, bool)]) -> Vec<ConnectionId> {
    if !directs.iter().any(|(_, by_a)| *by_a) {
        return Vec::new();
    }
    directs
        .iter()
        .filter(|(_, by_a)| !by_a)
        .map(|(c, _)| *c)
        .collect()
}

/// Whether `addr` is relayed (`/p2p-circuit`).
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// `quic` or `tcp`.
pub fn transport_of(addr: &Multiaddr) -> &'static str {
    if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
        "quic"
    } else {
        "tcp"
    }
}

/// The address without a trailing `/p2p/…`.
pub fn without_p2p(mut a: Multiaddr) -> Multiaddr {
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// A direct, dialable IP address (not relayed, not loopback, not unspecified).
pub fn dialable(a: &Multiaddr) -> bool {
    let ip_ok = a.iter().any(|p| match p {
        Protocol::Ip4(ip) => !ip.is_loopback() && !ip.is_unspecified(),
        Protocol::Ip6(ip) => !ip.is_loopback() && !ip.is_unspecified(),
        _ => false,
    });
    ip_ok && !is_relayed(a)
}

fn usable(a: &Multiaddr, transport: Transport) -> bool {
    dialable(a)
        && match transport_of(a) {
            "quic" => transport.quic(),
            _ => transport.tcp(),
        }
}

/// The addresses of a CONNECT that decode and are not relayed.
fn parse_addrs(raw: &[Vec<u8>]) -> Vec<Multiaddr> {
    raw.iter()
        .filter_map(|b| Multiaddr::try_from(b.clone()).ok())
        .filter(|a| !is_relayed(a))
        .collect()
}

#[cfg(test)]
mod tests;

//! Two engines against each other over a simulated relay, in virtual time: no socket, no task,
//! no sleep. The relay forwards streams and messages after [`ONE_WAY`] in order; a direct dial
//! connects, is refused or is dropped as each test's network says.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};

use super::*;

/// The relayed path, one way.
const ONE_WAY: Duration = Duration::from_millis(20);
/// The direct path's handshake.
const DIRECT: Duration = Duration::from_millis(10);
const TIMEOUT: Duration = Duration::from_secs(3);

/// The two ends of the relayed connection: A dialed it, B was dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    A,
    B,
}

impl Who {
    fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

/// What the direct path does with a dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    /// It connects.
    Connect,
    /// The remote's stack refuses it.
    Refuse,
    /// A NAT drops it: the engine's timeout ends it.
    Drop,
}

/// A dial as the network sees it: who dialed, in which attempt, in which role, and whether it
/// aims at a port the remote's NAT opened for birthday probing.
#[derive(Debug, Clone, Copy)]
struct DialSeen {
    by: Who,
    attempt: u32,
    as_listener: bool,
    probed: bool,
}

/// The hard side's NAT in birthday probing: the ports its sockets got, open from `open_at`.
#[derive(Debug)]
struct HardNat {
    who: Who,
    ports: HashSet<u16>,
    open_at: Instant,
    /// The probe that hit first.
    hit: Option<u32>,
    stopped: bool,
}

#[derive(Debug)]
enum Event {
    Inbound {
        to: Who,
        from: StreamId,
        handshake: Handshake,
    },
    Message {
        to: Who,
        stream: StreamId,
        message: HolePunch,
    },
    Broken {
        to: Who,
        stream: StreamId,
        unsupported: bool,
    },
    Direct {
        to: Who,
        direct: DirectConnection,
    },
    DialFailed {
        to: Who,
        connection: ConnectionId,
        failed: DialFailed,
    },
    Ping {
        to: Who,
    },
    /// A probe reached the hard side's socket: the driver listens there and tells the engine.
    Hit {
        to: Who,
        probe: u32,
    },
    /// The driver's port prediction came: the NAT's next mapping is expected at `port`.
    Predicted {
        to: Who,
        port: u16,
    },
}

/// rust-libp2p's `dcutr` on a listener, as the wire sees it: it drives DCUtR on the relayed
/// connection at once, speaks no natpunch protocol, dials once.
#[derive(Debug)]
struct StockListener {
    /// When its relayed connection comes up and it starts.
    start_at: Option<Instant>,
    actions: VecDeque<Action>,
    stream: Option<StreamId>,
    sent: Option<Instant>,
    dial_at: Option<(Instant, Vec<Multiaddr>)>,
}

impl StockListener {
    fn new(start_at: Instant) -> Self {
        Self {
            start_at: Some(start_at),
            actions: VecDeque::new(),
            stream: None,
            sent: None,
            dial_at: None,
        }
    }

    fn start(&mut self, now: Instant) {
        let stream = StreamId(1);
        self.stream = Some(stream);
        self.sent = Some(now);
        self.actions.push_back(Action::Open {
            stream,
            handshake: Handshake::Dcutr,
        });
        self.actions.push_back(Action::Send {
            stream,
            message: HolePunch {
                kind: Kind::Connect,
                addrs: vec![addr(Who::B).to_vec()],
                reversed: false,
                mapping: None,
                birthday: false,
                token: None,
                probe: None,
                next_port: None,
            },
        });
    }

    fn message(&mut self, now: Instant, message: HolePunch) {
        let (Some(stream), Some(sent)) = (self.stream, self.sent) else {
            return;
        };
        let rtt = now - sent;
        self.actions.push_back(Action::Send {
            stream,
            message: HolePunch {
                kind: Kind::Sync,
                addrs: Vec::new(),
                reversed: false,
                mapping: None,
                birthday: false,
                token: None,
                probe: None,
                next_port: None,
            },
        });
        self.dial_at = Some((now + rtt / 2, parse_addrs(&message.addrs)));
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.start_at.or(self.dial_at.as_ref().map(|(at, _)| *at))
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.start_at.take_if(|at| now >= *at).is_some() {
            self.start(now);
        }
        if let Some((_, addrs)) = self.dial_at.take_if(|(at, _)| now >= *at) {
            self.actions.push_back(Action::Dial {
                attempt: 1,
                addrs,
                as_listener: true,
            });
        }
    }
}

#[derive(Debug)]
enum Node {
    Natpunch(Box<Punch>),
    Stock(StockListener),
}

impl Node {
    fn punch(&mut self) -> Option<&mut Punch> {
        match self {
            Self::Natpunch(p) => Some(p),
            Self::Stock(_) => None,
        }
    }

    fn poll_action(&mut self) -> Option<Action> {
        match self {
            Self::Natpunch(p) => p.poll_action(),
            Self::Stock(s) => s.actions.pop_front(),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Natpunch(p) => p.poll_timeout(),
            Self::Stock(s) => s.poll_timeout(),
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Self::Natpunch(p) => p.handle_timeout(now),
            Self::Stock(s) => s.handle_timeout(now),
        }
    }
}

/// Where a node's `/p2p/…`-less address is.
fn addr(who: Who) -> Multiaddr {
    match who {
        Who::A => "/ip4/11.99.0.10/udp/4000/quic-v1",
        Who::B => "/ip4/11.99.0.11/udp/5000/quic-v1",
    }
    .parse()
    .expect("addr")
}

fn config(side: Side) -> PunchConfig {
    PunchConfig {
        side,
        engine: Engine::Natpunch,
        candidates: "observed".into(),
        transport: Transport::Both,
        attempt_timeout: TIMEOUT,
        max_attempts: 3,
        punch: true,
        local_mapping: None,
        classes: true,
        birthday: None,
    }
}

fn natpunch(now: Instant, who: Who, remote: Option<RemoteEngine>) -> Node {
    let side = match who {
        Who::A => Side::Dialer,
        Who::B => Side::Listener,
    };
    let peers = Peers {
        local: format!("{who:?}"),
        remote: format!("{:?}", who.other()),
        relay: "relay".into(),
    };
    let punch = Punch::new(now, 0, config(side), peers, remote, vec![addr(who)]);
    Node::Natpunch(Box::new(punch))
}

/// Two nodes, the relay between them, and a direct path that does what `net` says.
struct Sim {
    base: Instant,
    now: Instant,
    queue: BTreeMap<(Instant, u64), Event>,
    seq: u64,
    nodes: HashMap<Who, Node>,
    /// Each stream end and the other end.
    pairs: HashMap<(Who, StreamId), (Who, StreamId)>,
    net: Box<dyn Fn(DialSeen) -> Net>,
    next_connection: usize,
    /// Each connection end and the physical connection (the dial) it belongs to.
    physical: HashMap<(Who, ConnectionId), usize>,
    dials: Vec<DialSeen>,
    closed: Vec<(Who, usize)>,
    records: HashMap<Who, Record>,
    /// Every stream opened, by whom, with which protocol.
    opens: Vec<(Who, Handshake)>,
    /// Birthday probing's hard side, once its sockets opened.
    hard: Option<HardNat>,
    /// Probes the easy side sent.
    probes_sent: u32,
    /// The easy side's driver finds no socket to probe from.
    no_easy_socket: bool,
    /// The hard side's NAT allocates in order from this port (else: random ports).
    sequential: Option<u16>,
    /// NEXT messages sent.
    nexts: u32,
}

impl Sim {
    fn new(base: Instant, a: Node, b: Node, net: impl Fn(DialSeen) -> Net + 'static) -> Self {
        Self {
            base,
            now: base,
            queue: BTreeMap::new(),
            seq: 0,
            nodes: HashMap::from([(Who::A, a), (Who::B, b)]),
            pairs: HashMap::new(),
            net: Box::new(net),
            next_connection: 0,
            physical: HashMap::new(),
            dials: Vec::new(),
            closed: Vec::new(),
            records: HashMap::new(),
            opens: Vec::new(),
            hard: None,
            probes_sent: 0,
            no_easy_socket: false,
            sequential: None,
            nexts: 0,
        }
    }

    fn node(&mut self, who: Who) -> &mut Node {
        self.nodes.get_mut(&who).expect("node")
    }

    fn at(&mut self, delay: Duration, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), event);
    }

    fn connection(&mut self, who: Who, physical: usize) -> ConnectionId {
        self.next_connection += 1;
        let id = ConnectionId::new_unchecked(self.next_connection);
        self.physical.insert((who, id), physical);
        id
    }

    /// Carries out what `who` asked for.
    fn act(&mut self, who: Who, action: Action) {
        let now = self.now;
        match action {
            Action::Open { stream, handshake } => {
                self.opens.push((who, handshake));
                // Optimistic negotiation: writes may go out at once.
                if let Some(p) = self.node(who).punch() {
                    p.stream_opened(now, stream);
                }
                self.at(
                    ONE_WAY,
                    Event::Inbound {
                        to: who.other(),
                        from: stream,
                        handshake,
                    },
                );
            }
            Action::Send { stream, message } => {
                self.nexts += u32::from(message.kind == Kind::Next);
                // Sent before the far end was accepted: it is delivered after the open, in order.
                self.at(
                    ONE_WAY,
                    Event::Message {
                        to: who.other(),
                        stream,
                        message,
                    },
                );
            }
            Action::CloseStream { stream } => {
                if let Some((to, far)) = self.pairs.get(&(who, stream)).copied() {
                    self.at(
                        ONE_WAY,
                        Event::Broken {
                            to,
                            stream: far,
                            unsupported: false,
                        },
                    );
                }
            }
            Action::Dial {
                attempt,
                as_listener,
                addrs,
            } => {
                assert!(!addrs.is_empty(), "{who:?} dials somewhere");
                let probed = self.hard.as_ref().is_some_and(|h| {
                    h.who == who.other()
                        && addrs
                            .iter()
                            .filter_map(quic_addr)
                            .any(|a| h.ports.contains(&a.port()))
                });
                let seen = DialSeen {
                    by: who,
                    attempt,
                    as_listener,
                    probed,
                };
                self.dials.push(seen);
                let physical = self.dials.len();
                let here = self.connection(who, physical);
                if let Some(p) = self.node(who).punch() {
                    p.dialed(now, Ok(here));
                }
                let made_by_a = who == Who::A;
                match (self.net)(seen) {
                    Net::Connect => {
                        let there = self.connection(who.other(), physical);
                        for (to, connection, dialed_here) in
                            [(who, here, true), (who.other(), there, false)]
                        {
                            self.at(
                                DIRECT,
                                Event::Direct {
                                    to,
                                    direct: DirectConnection {
                                        connection,
                                        transport: "quic",
                                        dialed_here,
                                        made_by_a,
                                        on_probed_port: probed && !dialed_here,
                                    },
                                },
                            );
                            self.at(DIRECT * 2, Event::Ping { to });
                        }
                    }
                    Net::Refuse => self.at(
                        DIRECT,
                        Event::DialFailed {
                            to: who,
                            connection: here,
                            failed: DialFailed {
                                error: "connection refused".into(),
                                timed_out: false,
                                failures: Vec::new(),
                            },
                        },
                    ),
                    // The transport's own timeout, which comes after the engine's.
                    Net::Drop => self.at(
                        TIMEOUT + Duration::from_secs(1),
                        Event::DialFailed {
                            to: who,
                            connection: here,
                            failed: DialFailed {
                                error: "timed out".into(),
                                timed_out: true,
                                failures: Vec::new(),
                            },
                        },
                    ),
                }
            }
            Action::Close { connection } => {
                let physical = self.physical[&(who, connection)];
                self.closed.push((who, physical));
            }
            Action::OpenSockets {
                sockets,
                easy,
                token,
                until,
            } => {
                assert_eq!(
                    easy,
                    quic_addr(&addr(who.other())).expect("QUIC"),
                    "{who:?}"
                );
                assert!(until > now);
                assert_ne!(token, [0; 16]);
                // A NAT that picks a random port per destination: `sockets` distinct ones,
                // chosen by a seeded generator, open once the sockets sent.
                let mut rng = StdRng::seed_from_u64(u64::from(token[0]));
                let mut ports = HashSet::new();
                while ports.len() < sockets {
                    ports.insert(rng.random_range(1024..=65535u16));
                }
                // Or one that allocates in order.
                if let Some(first) = self.sequential {
                    let count = u16::try_from(sockets).expect("few sockets");
                    ports = (first..first + count).collect();
                }
                self.hard = Some(HardNat {
                    who,
                    ports,
                    open_at: now + Duration::from_millis(5),
                    hit: None,
                    stopped: false,
                });
            }
            Action::StopSockets => {
                let hard = self.hard.as_mut().expect("sockets to stop");
                assert_eq!(hard.who, who, "only the hard side has sockets");
                hard.stopped = true;
            }
            Action::Probe { to, datagram } => {
                assert_eq!(to.ip(), quic_addr(&addr(who.other())).expect("QUIC").ip());
                self.probes_sent += 1;
                if self.no_easy_socket {
                    if let Some(p) = self.node(who).punch() {
                        p.birthday_failed("no socket".into());
                    }
                    return;
                }
                let d = crate::birthday::Datagram::decode(&datagram).expect("a probe");
                // Before the hard side's sockets exist, a probe finds nothing open.
                let Some(hard) = self.hard.as_mut() else {
                    return;
                };
                assert_eq!(hard.who, who.other(), "the easy side probes");
                if !hard.stopped
                    && hard.hit.is_none()
                    && now >= hard.open_at
                    && hard.ports.contains(&to.port())
                {
                    hard.hit = Some(d.seq);
                    let to = hard.who;
                    self.at(DIRECT / 2, Event::Hit { to, probe: d.seq });
                }
            }
            Action::Record(record) => {
                assert!(
                    self.records.insert(who, *record).is_none(),
                    "one record per side"
                );
            }
        }
    }

    fn deliver(&mut self, event: Event) {
        let now = self.now;
        match event {
            Event::Inbound {
                to,
                from,
                handshake,
            } => {
                let answer = match self.node(to) {
                    // A 1.0.0-only peer does not accept the protocol at all.
                    Node::Natpunch(p)
                        if handshake == Handshake::NatpunchClasses && !p.config.classes =>
                    {
                        Err(true)
                    }
                    Node::Natpunch(p) => p.inbound(now, handshake).ok_or(false),
                    // The stock behaviour does not speak natpunch's protocol.
                    Node::Stock(_) => Err(handshake != Handshake::Dcutr),
                };
                match answer {
                    Ok(stream) => {
                        self.pairs.insert((to, stream), (to.other(), from));
                        self.pairs.insert((to.other(), from), (to, stream));
                    }
                    Err(unsupported) => self.at(
                        ONE_WAY,
                        Event::Broken {
                            to: to.other(),
                            stream: from,
                            unsupported,
                        },
                    ),
                }
            }
            Event::Message {
                to,
                stream,
                message,
            } => {
                // `stream` names the sender's end.
                let Some((_, far)) = self.pairs.get(&(to.other(), stream)).copied() else {
                    return;
                };
                match self.node(to) {
                    Node::Natpunch(p) => p.message(now, far, message),
                    Node::Stock(s) => s.message(now, message),
                }
            }
            Event::Broken {
                to,
                stream,
                unsupported,
            } => {
                if let Some(p) = self.node(to).punch() {
                    p.stream_failed(now, stream, "stream closed".into(), unsupported);
                }
            }
            Event::Direct { to, direct } => {
                if let Some(p) = self.node(to).punch() {
                    p.direct(now, &direct);
                }
            }
            Event::DialFailed {
                to,
                connection,
                failed,
            } => {
                if let Some(p) = self.node(to).punch() {
                    p.dial_failed(now, connection, failed);
                }
            }
            Event::Ping { to } => {
                if let Some(p) = self.node(to).punch() {
                    p.ping(now, false, DIRECT);
                }
            }
            Event::Hit { to, probe } => {
                if let Some(p) = self.node(to).punch() {
                    p.birthday_hit(probe);
                }
            }
            Event::Predicted { to, port } => {
                if let Some(p) = self.node(to).punch() {
                    p.predicted(port);
                }
            }
        }
    }

    /// Runs until every natpunch node wrote its record.
    fn run(&mut self) {
        let natpunch = self
            .nodes
            .values()
            .filter(|n| matches!(n, Node::Natpunch(_)))
            .count();
        while self.records.len() < natpunch {
            for who in [Who::A, Who::B] {
                while let Some(action) = self.node(who).poll_action() {
                    self.act(who, action);
                }
            }
            if self.records.len() == natpunch {
                break;
            }
            let next_event = self.queue.keys().next().map(|(t, _)| *t);
            let next_timer = self.nodes.values().filter_map(Node::poll_timeout).min();
            let next = match (next_event, next_timer) {
                (Some(e), Some(t)) => e.min(t),
                (e, t) => e.or(t).expect("something to wait for"),
            };
            assert!(next >= self.now, "time runs forward");
            assert!(next - self.base < Duration::from_secs(60), "the punch ends");
            self.now = next;
            if next_event == Some(next) {
                let (_, event) = self.queue.pop_first().expect("event");
                self.deliver(event);
            } else {
                for who in [Who::A, Who::B] {
                    if self.node(who).poll_timeout().is_some_and(|t| t <= next) {
                        self.node(who).handle_timeout(next);
                    }
                }
            }
        }
    }

    fn record(&self, who: Who) -> &Record {
        &self.records[&who]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn both_natpunch(net: impl Fn(DialSeen) -> Net + 'static) -> Sim {
    let base = Instant::now();
    let mut sim = Sim::new(
        base,
        natpunch(base, Who::A, Some(RemoteEngine::Natpunch)),
        natpunch(base, Who::B, Some(RemoteEngine::Natpunch)),
        net,
    );
    sim.run();
    sim
}

#[test]
fn the_first_attempt_punches_with_both_dials_at_the_same_moment() {
    let sim = both_natpunch(|_| Net::Connect);
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Success, "{who:?}: {r:?}");
        assert_eq!(r.attempts.len(), 1, "{who:?}");
        assert_eq!(r.attempts[0].outcome, AttemptOutcome::Success);
        // A's CONNECT reaches B after one way, the answer comes back after two; A sends SYNC
        // and dials half a round trip later, just when SYNC reaches B and B dials.
        assert_eq!(r.attempts[0].dialed_ms, Some(ms(ONE_WAY * 3)), "{who:?}");
        assert_eq!(r.time_to_direct_ms, Some(ms(ONE_WAY * 3 + DIRECT)));
        assert_eq!(r.transport.as_deref(), Some("quic"));
        assert_eq!(r.direct_rtt_ms, Some(ms(DIRECT)));
        assert_eq!(r.error, None);
    }
    assert_eq!(sim.record(Who::A).attempts[0].rtt_ms, Some(ms(ONE_WAY * 2)));
    assert_eq!(
        sim.record(Who::B).attempts[0].rtt_ms,
        None,
        "B did not time it"
    );
    assert_eq!(sim.record(Who::A).remote_addrs, [addr(Who::B).to_string()]);
    assert_eq!(sim.record(Who::B).remote_addrs, [addr(Who::A).to_string()]);
    assert!(!sim.dials.iter().any(|d| d.by == Who::A && d.as_listener));
    assert!(sim.dials.iter().any(|d| d.by == Who::B && d.as_listener));
}

#[test]
fn a_simultaneous_quic_dial_leaves_one_connection_the_same_on_both_sides() {
    let sim = both_natpunch(|_| Net::Connect);
    assert_eq!(sim.dials.len(), 2, "both dialed");
    let b_dial = 1 + sim
        .dials
        .iter()
        .position(|d| d.by == Who::B)
        .expect("B dialed");
    let mut closed = sim.closed.clone();
    closed.sort_by_key(|(who, _)| format!("{who:?}"));
    assert_eq!(
        closed,
        [(Who::A, b_dial), (Who::B, b_dial)],
        "both close the connection B dialed and keep A's"
    );
    for who in [Who::A, Who::B] {
        assert_eq!(sim.record(who).direct_connections, 1, "{who:?}");
    }
}

#[test]
fn the_second_attempt_is_reversed_and_the_listeners_dial_gets_through() {
    // Only B's packets get through, and only when B dials as the connection's dialer.
    let sim = both_natpunch(|d| {
        if d.by == Who::B && !d.as_listener {
            assert_eq!(
                d.attempt, 2,
                "B dials as the dialer in the reversed attempt only"
            );
            Net::Connect
        } else {
            Net::Drop
        }
    });
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Success, "{who:?}: {r:?}");
        assert_eq!(r.attempts.len(), 2, "{who:?}");
        assert_eq!(r.attempts[0].outcome, AttemptOutcome::Timeout);
        assert!(!r.attempts[0].reversed && r.attempts[1].reversed, "{who:?}");
        assert_eq!(r.attempts[1].outcome, AttemptOutcome::Success);
    }
    let (a, b) = (sim.record(Who::A), sim.record(Who::B));
    assert_eq!(a.attempts[1].dialed_ms, None, "A only waits");
    assert!(a.attempts[1].dialed.is_empty());
    assert!(b.attempts[1].dialed_ms.is_some());
    assert_eq!(a.dialed_by.as_deref(), Some("remote"));
    assert_eq!(b.dialed_by.as_deref(), Some("local"));
    // The second attempt starts when the first times out, 3 s after its dial.
    let second = a.attempts[1].started_ms;
    assert!(second >= ms(ONE_WAY * 3 + TIMEOUT), "{second}");
    assert_eq!(sim.dials.iter().filter(|d| d.by == Who::A).count(), 1);
}

#[test]
fn three_timed_out_attempts_fail_on_both_sides_in_bounded_time() {
    let sim = both_natpunch(|_| Net::Drop);
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Failed, "{who:?}: {r:?}");
        assert_eq!(r.error.as_deref(), Some("3 attempts failed"));
        assert_eq!(r.attempts.len(), 3);
        assert!(
            r.attempts
                .iter()
                .all(|a| a.outcome == AttemptOutcome::Timeout),
            "{who:?}: {:?}",
            r.attempts
        );
        // Three handshakes of three one-way trips and three attempt timeouts; nothing more.
        let bound = ms((ONE_WAY * 3 + TIMEOUT) * 3 + ONE_WAY * 2);
        assert!(
            r.ended_ms <= bound,
            "{who:?} ended at {} > {bound}",
            r.ended_ms
        );
        assert!(
            r.ended_ms >= ms(TIMEOUT * 3),
            "{who:?} ended at {}",
            r.ended_ms
        );
        assert_eq!(r.transport, None);
    }
    assert_eq!(
        sim.dials.iter().filter(|d| d.by == Who::A).count(),
        2,
        "A dials in attempts 1 and 3, waits in the reversed one"
    );
}

#[test]
fn refused_dials_end_their_attempts_at_once_and_the_next_starts() {
    use AttemptOutcome::{Failed, Timeout};
    let sim = both_natpunch(|_| Net::Refuse);
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Failed, "{who:?}: {r:?}");
        assert_eq!(r.attempts.len(), 3, "{who:?}: {:?}", r.attempts);
        // Only A's wait in the reversed attempt runs its time out: it cannot see B's dial fail.
        let bound = ms(TIMEOUT + ONE_WAY * 20);
        assert!(r.ended_ms < bound, "{who:?}: {} ms", r.ended_ms);
        assert_eq!(r.attempts[0].outcome, Failed);
        assert_eq!(r.attempts[0].error.as_deref(), Some("connection refused"));
    }
    let outcomes = |who| -> Vec<AttemptOutcome> {
        sim.record(who).attempts.iter().map(|a| a.outcome).collect()
    };
    assert_eq!(outcomes(Who::A), [Failed, Timeout, Failed]);
    assert_eq!(outcomes(Who::B), [Failed, Failed, Failed]);
}

#[test]
fn a_stock_listener_drives_dcutr_and_the_natpunch_dialer_answers_it() {
    // 0 ms: the stock listener's stream crosses the dialer's; 50 ms: the dialer learns first
    // that the listener does not speak natpunch's protocol.
    for start in [Duration::ZERO, Duration::from_millis(50)] {
        let base = Instant::now();
        let mut sim = Sim::new(
            base,
            natpunch(base, Who::A, None),
            Node::Stock(StockListener::new(base + start)),
            |_| Net::Connect,
        );
        sim.run();
        let a = sim.record(Who::A);
        assert_eq!(a.outcome, Outcome::Success, "start {start:?}: {a:?}");
        assert_eq!(
            a.attempts.len(),
            1,
            "the refused stream is no attempt: {a:?}"
        );
        assert_eq!(
            a.attempts[0].rtt_ms, None,
            "the listener timed the round trip"
        );
        // The dialer dials when SYNC comes, as DCUtR's listener does half a round trip after
        // its answer.
        let sync_at = ms(start + ONE_WAY * 3);
        assert_eq!(a.attempts[0].dialed_ms, Some(sync_at), "start {start:?}");
        assert!(sim.dials.iter().any(|d| d.by == Who::A && !d.as_listener));
    }
}

#[test]
fn a_natpunch_listener_drives_dcutr_at_once_for_a_stock_dialer_or_after_the_wait() {
    let base = Instant::now();
    for (remote, starts_at) in [
        (Some(RemoteEngine::Other), base),
        (None, base + FAST_WAIT),
        (Some(RemoteEngine::Natpunch), base + FAST_WAIT),
    ] {
        let Node::Natpunch(mut b) = natpunch(base, Who::B, remote) else {
            unreachable!()
        };
        if starts_at > base {
            assert_eq!(b.poll_action(), None, "{remote:?}: nothing before its time");
            assert_eq!(b.poll_timeout(), Some(starts_at));
            b.handle_timeout(starts_at);
        }
        let Some(Action::Open { handshake, .. }) = b.poll_action() else {
            panic!("{remote:?}: B opens a stream");
        };
        assert_eq!(handshake, Handshake::Dcutr);
        assert_eq!(b.poll_timeout(), Some(starts_at + TIMEOUT), "{remote:?}");
    }
    // Identify's answer that the dialer runs something else starts it before the wait is out.
    let Node::Natpunch(mut b) = natpunch(base, Who::B, None) else {
        unreachable!()
    };
    b.identified(base + ONE_WAY, RemoteEngine::Other);
    assert!(matches!(b.poll_action(), Some(Action::Open { .. })));
}

#[test]
fn with_punching_off_the_session_ends_at_once_cancelled() {
    let base = Instant::now();
    let mut c = config(Side::Listener);
    c.punch = false;
    let mut p = Punch::new(base, 0, c, Peers::default(), None, Vec::new());
    let Some(Action::Record(r)) = p.poll_action() else {
        panic!("a record");
    };
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert!(p.is_done() && p.poll_timeout().is_none());
}

#[test]
fn only_direct_routable_addresses_are_offered_or_dialed() {
    for (a, ok) in [
        ("/ip4/11.99.0.10/tcp/4000", true),
        ("/ip4/11.99.0.10/udp/4000/quic-v1", true),
        ("/ip4/127.0.0.1/tcp/4000", false),
        ("/ip4/0.0.0.0/tcp/4000", false),
        ("/ip4/11.99.0.12/tcp/4001/p2p-circuit", false),
    ] {
        assert_eq!(dialable(&a.parse().expect("addr")), ok, "{a}");
    }
    let id = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let with: Multiaddr = format!("/ip4/11.99.0.10/tcp/4000/p2p/{id}")
        .parse()
        .expect("addr");
    assert_eq!(
        without_p2p(with),
        "/ip4/11.99.0.10/tcp/4000"
            .parse::<Multiaddr>()
            .expect("addr")
    );
    let relayed: Multiaddr = format!("/ip4/11.99.0.12/tcp/4001/p2p/{id}/p2p-circuit")
        .parse()
        .expect("addr");
    assert_eq!(
        parse_addrs(&[relayed.to_vec(), vec![0xff, 0x00], addr(Who::A).to_vec()]),
        [addr(Who::A)],
        "relayed and undecodable addresses are dropped"
    );
}

#[test]
fn a_newer_stream_from_the_remote_replaces_the_older_and_stale_messages_are_ignored() {
    let base = Instant::now();
    let Node::Natpunch(mut b) = natpunch(base, Who::B, Some(RemoteEngine::Natpunch)) else {
        unreachable!()
    };
    let connect = |addr: Multiaddr| HolePunch {
        kind: Kind::Connect,
        addrs: vec![addr.to_vec()],
        reversed: false,
        mapping: None,
        birthday: false,
        token: None,
        probe: None,
        next_port: None,
    };
    let old = b.inbound(base, Handshake::Natpunch).expect("answered");
    b.message(base, old, connect(addr(Who::A)));
    assert!(matches!(b.poll_action(), Some(Action::Send { stream, .. }) if stream == old));
    let new = b
        .inbound(base + ONE_WAY, Handshake::Natpunch)
        .expect("answered");
    assert_ne!(new, old);
    assert_eq!(b.poll_action(), Some(Action::CloseStream { stream: old }));
    // SYNC on the dropped stream starts nothing.
    let sync = HolePunch {
        kind: Kind::Sync,
        addrs: Vec::new(),
        reversed: false,
        mapping: None,
        birthday: false,
        token: None,
        probe: None,
        next_port: None,
    };
    b.message(base + ONE_WAY, old, sync.clone());
    assert_eq!(b.poll_action(), None);
    // A stream that claims B's own role is refused.
    assert_eq!(b.inbound(base + ONE_WAY, Handshake::Dcutr), None);
    b.message(base + ONE_WAY, new, connect(addr(Who::A)));
    assert!(matches!(b.poll_action(), Some(Action::Send { stream, .. }) if stream == new));
    b.message(base + ONE_WAY * 2, new, sync);
    assert_eq!(b.poll_action(), Some(Action::CloseStream { stream: new }));
    let Some(Action::Dial { attempt, .. }) = b.poll_action() else {
        panic!("B dials on SYNC");
    };
    assert_eq!(attempt, 1, "the replaced handshake made no attempt");
}

#[test]
fn the_next_connect_offers_the_addresses_a_port_mapping_gave_since() {
    let base = Instant::now();
    let Node::Natpunch(mut a) = natpunch(base, Who::A, Some(RemoteEngine::Natpunch)) else {
        unreachable!()
    };
    let Some(Action::Open { stream, .. }) = a.poll_action() else {
        panic!("A drives");
    };
    let mapped: Multiaddr = "/ip4/203.0.113.7/udp/41000/quic-v1".parse().expect("addr");
    a.set_offered(vec![mapped.clone(), addr(Who::A)]);
    a.stream_opened(base, stream);
    let Some(Action::Send { message, .. }) = a.poll_action() else {
        panic!("A sends CONNECT");
    };
    assert_eq!(message.addrs, [mapped.to_vec(), addr(Who::A).to_vec()]);
}

/// The TCP address of a node (`/p2p/…`-less).
fn tcp_addr(who: Who) -> Multiaddr {
    match who {
        Who::A => "/ip4/11.99.0.10/tcp/4000",
        Who::B => "/ip4/11.99.0.11/tcp/5000",
    }
    .parse()
    .expect("addr")
}

/// How one side of a class test runs.
#[derive(Debug, Clone, Copy)]
struct Peer {
    mapping: Option<Mapping>,
    /// Speaks 1.1.0.
    classes: bool,
    /// Takes part in birthday probing.
    birthday: bool,
}

const EIM: Peer = Peer {
    mapping: Some(Mapping::EndpointIndependent),
    classes: true,
    birthday: false,
};
const APDM: Peer = Peer {
    mapping: Some(Mapping::AddressAndPortDependent),
    classes: true,
    birthday: false,
};
const UNKNOWN: Peer = Peer {
    mapping: None,
    classes: true,
    birthday: false,
};
/// An easy side that takes part in birthday probing.
const EASY: Peer = Peer {
    birthday: true,
    ..EIM
};
/// A hard side that takes part in birthday probing.
const HARD: Peer = Peer {
    birthday: true,
    ..APDM
};

/// A natpunch node over `transport` as `peer` says, identify not answered yet.
fn classed(now: Instant, who: Who, peer: Peer, transport: Transport) -> Node {
    let side = match who {
        Who::A => Side::Dialer,
        Who::B => Side::Listener,
    };
    let mut c = config(side);
    c.transport = transport;
    c.classes = peer.classes;
    c.local_mapping = peer.mapping.map(|mapping| LocalMapping {
        mapping,
        source: MappingSource::Rfc5780,
    });
    c.birthday = peer.birthday.then_some(BirthdayConfig {
        sockets: 256,
        probes: 2048,
        rate: 4000,
        token: [u8::from(who == Who::A) + 1; 16],
        seed: u64::from(who == Who::A) + 7,
        window: 16,
    });
    let offered = match transport {
        Transport::Tcp => tcp_addr(who),
        _ => addr(who),
    };
    let peers = Peers {
        local: format!("{who:?}"),
        remote: format!("{:?}", who.other()),
        relay: "relay".into(),
    };
    Node::Natpunch(Box::new(Punch::new(now, 0, c, peers, None, vec![offered])))
}

/// Two natpunch nodes as `a` and `b` say, not started.
fn classed_sim(
    a: Peer,
    b: Peer,
    transport: Transport,
    net: impl Fn(DialSeen) -> Net + 'static,
) -> Sim {
    let base = Instant::now();
    Sim::new(
        base,
        classed(base, Who::A, a, transport),
        classed(base, Who::B, b, transport),
        net,
    )
}

fn run_classed(
    a: Peer,
    b: Peer,
    transport: Transport,
    net: impl Fn(DialSeen) -> Net + 'static,
) -> Sim {
    let mut sim = classed_sim(a, b, transport, net);
    sim.run();
    sim
}

/// TCP towards a listener whose NAT maps per destination: only the listener's SYN gets
/// through (from a port nobody aimed at, onto the dialer's listening socket), and the
/// connection completes only if the listener took the dialer's role.
fn into_symmetric(d: DialSeen) -> Net {
    if d.by == Who::B && !d.as_listener {
        Net::Connect
    } else {
        Net::Drop
    }
}

#[test]
fn the_classes_decide_the_first_attempts_form() {
    use Mapping::{
        AddressAndPortDependent as Apdm, AddressDependent as Adm, EndpointIndependent as Eim,
    };
    let none = Some(Mapping::None);
    let per_destination = [Some(Adm), Some(Apdm)];
    for dialer in [none, Some(Eim)] {
        for listener in per_destination {
            assert!(
                first_attempt_reversed(dialer, listener),
                "{dialer:?} × {listener:?}"
            );
        }
    }
    let all = [None, none, Some(Eim), Some(Adm), Some(Apdm)];
    for dialer in all {
        for listener in all {
            let reversed = dialer.is_some_and(|d| !matches!(d, Adm | Apdm))
                && per_destination.contains(&listener);
            assert_eq!(
                first_attempt_reversed(dialer, listener),
                reversed,
                "{dialer:?} × {listener:?}"
            );
        }
    }
}

#[test]
fn tcp_into_a_per_destination_listener_goes_direct_on_the_first_attempt() {
    for primer in [Net::Drop, Net::Refuse] {
        let sim = run_classed(EIM, APDM, Transport::Tcp, move |d| match d.by {
            Who::A => {
                assert!(d.as_listener, "A's dial only primes its own NAT");
                primer
            }
            Who::B => into_symmetric(d),
        });
        assert_eq!(
            sim.opens,
            [(Who::A, Handshake::NatpunchClasses)],
            "one handshake, over 1.1.0"
        );
        for who in [Who::A, Who::B] {
            let r = sim.record(who);
            assert_eq!(r.outcome, Outcome::Success, "{primer:?} {who:?}: {r:?}");
            assert_eq!(r.attempts.len(), 1, "{who:?}");
            assert!(r.attempts[0].reversed, "{who:?}");
            assert_eq!(r.attempts[0].outcome, AttemptOutcome::Success);
            // As fast as a simultaneous open: no attempt lost.
            assert_eq!(
                r.time_to_direct_ms,
                Some(ms(ONE_WAY * 3 + DIRECT)),
                "{who:?}"
            );
            assert_eq!(r.local_mapping_source, Some(MappingSource::Rfc5780));
        }
        let (a, b) = (sim.record(Who::A), sim.record(Who::B));
        assert_eq!(a.local_mapping, Some(Mapping::EndpointIndependent));
        assert_eq!(a.remote_mapping, Some(Mapping::AddressAndPortDependent));
        assert_eq!(b.remote_mapping, Some(Mapping::EndpointIndependent));
        // A's primer went towards B, so that an address-dependent filter lets B in, with SYNC:
        // before B's SYN can arrive (B dials when SYNC reaches it).
        assert_eq!(a.attempts[0].dialed, [tcp_addr(Who::B).to_string()]);
        assert_eq!(a.attempts[0].dialed_ms, Some(ms(ONE_WAY * 2)));
        assert_eq!(b.attempts[0].dialed_ms, Some(ms(ONE_WAY * 3)));
        assert_eq!(a.dialed_by.as_deref(), Some("remote"));
        assert_eq!(b.dialed_by.as_deref(), Some("local"));
    }
}

#[test]
fn after_a_reversed_first_attempt_the_second_is_a_simultaneous_open() {
    // Only a simultaneous open works here (whatever the classes said).
    let sim = run_classed(EIM, APDM, Transport::Tcp, |d| match (d.by, d.as_listener) {
        (Who::A, false) => Net::Connect,
        _ => Net::Drop,
    });
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Success, "{who:?}: {r:?}");
        let forms: Vec<bool> = r.attempts.iter().map(|a| a.reversed).collect();
        assert_eq!(forms, [true, false], "{who:?}");
    }
}

#[test]
fn a_per_destination_dialer_into_a_cone_listener_keeps_the_simultaneous_open() {
    // A's SYN, from a port nobody aimed at, lands on B's listening socket: A must be the
    // dialer, as in the first attempt of old.
    let sim = run_classed(APDM, EIM, Transport::Tcp, |d| {
        if d.by == Who::A && !d.as_listener {
            Net::Connect
        } else {
            Net::Drop
        }
    });
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Success, "{who:?}: {r:?}");
        assert_eq!(r.attempts.len(), 1);
        assert!(!r.attempts[0].reversed);
    }
    assert_eq!(
        sim.record(Who::B).remote_mapping,
        Some(Mapping::AddressAndPortDependent)
    );
}

#[test]
fn quic_and_unknown_classes_keep_the_old_order() {
    for (a, b, transport) in [
        (EIM, APDM, Transport::Quic),
        (EIM, APDM, Transport::Both),
        (UNKNOWN, APDM, Transport::Tcp),
        (EIM, UNKNOWN, Transport::Tcp),
    ] {
        let sim = run_classed(a, b, transport, into_symmetric);
        for who in [Who::A, Who::B] {
            let r = sim.record(who);
            assert_eq!(
                r.outcome,
                Outcome::Success,
                "{a:?} {b:?} {transport:?}: {r:?}"
            );
            let forms: Vec<bool> = r.attempts.iter().map(|a| a.reversed).collect();
            assert_eq!(forms, [false, true], "{a:?} {b:?} {transport:?} {who:?}");
        }
        // A only waits in the reversed attempt of old.
        assert_eq!(sim.record(Who::A).attempts[1].dialed_ms, None);
        assert_eq!(sim.opens, [(Who::A, Handshake::NatpunchClasses); 2]);
    }
}

#[test]
fn a_listener_without_1_1_0_gets_1_0_0_and_the_old_order() {
    let old = Peer {
        classes: false,
        ..APDM
    };
    let sim = run_classed(EIM, old, Transport::Tcp, into_symmetric);
    // Offered 1.1.0, refused; 1.0.0 at once, and again for the second attempt.
    assert_eq!(
        sim.opens,
        [
            (Who::A, Handshake::NatpunchClasses),
            (Who::A, Handshake::Natpunch),
            (Who::A, Handshake::Natpunch)
        ]
    );
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Success, "{who:?}: {r:?}");
        let forms: Vec<bool> = r.attempts.iter().map(|a| a.reversed).collect();
        assert_eq!(forms, [false, true], "{who:?}");
        assert_eq!(r.remote_mapping, None, "{who:?}: 1.0.0 carries no class");
    }
    // The refused offer cost one relayed round trip before the first dial.
    let a = sim.record(Who::A);
    assert_eq!(a.attempts[0].dialed_ms, Some(ms(ONE_WAY * 5)));
}

#[test]
fn a_dialer_without_1_1_0_drives_1_0_0_and_sends_no_class() {
    let old = Peer {
        classes: false,
        ..EIM
    };
    let sim = run_classed(old, APDM, Transport::Tcp, into_symmetric);
    assert_eq!(sim.opens, [(Who::A, Handshake::Natpunch); 2]);
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Success, "{who:?}: {r:?}");
        assert_eq!(r.attempts.len(), 2, "{who:?}");
        assert_eq!(r.remote_mapping, None, "{who:?}");
    }
}

/// Over QUIC, from a NAT that filters by port into one that picks a port per destination: no
/// simultaneous dial gets through, birthday probing finds a pair on the first attempt, and the
/// easy side's dial of the probed port is the direct connection, whichever side is hard.
#[test]
fn birthday_probing_joins_an_easy_and_a_hard_nat_on_the_first_attempt() {
    for (a, b) in [(EASY, HARD), (HARD, EASY)] {
        let sim = run_classed(a, b, Transport::Quic, |d| {
            if d.probed { Net::Connect } else { Net::Drop }
        });
        let hard_side = if a.mapping == HARD.mapping {
            Who::A
        } else {
            Who::B
        };
        let nat = sim.hard.as_ref().expect("the hard side opened sockets");
        assert_eq!(nat.who, hard_side);
        assert!(nat.stopped, "its sockets stop with the attempt");
        let hit = nat.hit.expect("a probe hit");
        for who in [Who::A, Who::B] {
            let r = sim.record(who);
            assert_eq!(r.outcome, Outcome::Success, "{who:?}: {r:?}");
            assert_eq!(r.attempts.len(), 1, "{who:?}: {r:?}");
            let b = r.attempts[0].birthday.as_ref().expect("it probed");
            let role = if who == hard_side {
                BirthdayRole::Hard
            } else {
                BirthdayRole::Easy
            };
            assert_eq!(b.role, role, "{who:?}");
            assert!(b.hit && b.direct, "{who:?}: {b:?}");
            assert_eq!(b.error, None);
            if role == BirthdayRole::Hard {
                assert_eq!(b.sockets, Some(256));
                assert_eq!(
                    b.probes,
                    Some(hit),
                    "the hard side reports the probe it heard"
                );
            } else {
                // The probes stop once the hit is told: about N/k of them, never the budget.
                let probes = b.probes.expect("probes");
                assert!(probes >= hit && probes < 2048, "{probes} after hit {hit}");
                assert_eq!(sim.probes_sent, probes, "every probe went out as an action");
                assert!(b.port.is_some_and(|p| nat.ports.contains(&p)));
            }
            // Probes at 4,000/s: the direct connection within about a second.
            let t = r.time_to_direct_ms.expect("direct");
            assert!(t < 1500.0, "{who:?}: {t} ms");
        }
        // Only the easy side's dial of the probed port connected.
        assert!(sim.dials.iter().filter(|d| d.probed).count() == 1);
    }
}

/// Either side without birthday probing: nobody probes, and the attempts fail as before.
#[test]
fn birthday_probing_needs_both_sides_and_a_hard_one() {
    for (a, b) in [(EASY, APDM), (EIM, HARD), (EASY, EASY), (HARD, HARD)] {
        let sim = run_classed(a, b, Transport::Quic, |_| Net::Drop);
        assert!(sim.hard.is_none(), "{a:?} × {b:?}: no sockets opened");
        for who in [Who::A, Who::B] {
            let r = sim.record(who);
            assert_eq!(r.outcome, Outcome::Failed, "{who:?}");
            assert!(r.attempts.iter().all(|at| at.birthday.is_none()));
        }
    }
    // TCP alone never probes.
    let sim = run_classed(EASY, HARD, Transport::Tcp, |_| Net::Drop);
    assert!(sim.hard.is_none());
}

/// An easy side that filters by address only lets the simultaneous dial in: it wins, probing
/// stops, and the record says probing did not make the connection.
#[test]
fn a_simultaneous_dial_that_gets_through_ends_probing() {
    let sim = run_classed(EASY, HARD, Transport::Quic, |d| {
        if d.by == Who::B {
            Net::Connect
        } else {
            Net::Drop
        }
    });
    assert!(sim.hard.as_ref().is_some_and(|h| h.stopped));
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Success, "{who:?}");
        let b = r.attempts[0].birthday.as_ref().expect("it probed");
        assert!(!b.direct, "{who:?}: {b:?}");
        assert!(r.time_to_direct_ms.is_some_and(|t| t < 500.0));
    }
}

/// A pair the probes found that still does not connect: the attempt times out, and the later
/// attempts are plain.
#[test]
fn probing_that_connects_nothing_leaves_the_later_attempts_plain() {
    let mut hard = HARD;
    hard.mapping = Some(Mapping::AddressDependent);
    let sim = run_classed(EASY, hard, Transport::Quic, |_| Net::Drop);
    for who in [Who::A, Who::B] {
        let r = sim.record(who);
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.attempts.len(), 3, "{who:?}: {r:?}");
        assert!(r.attempts[0].birthday.is_some(), "{who:?}");
        assert!(r.attempts[1..].iter().all(|a| a.birthday.is_none()));
    }
}

/// An easy side whose driver cannot send probes stops probing at the first, and its record
/// says why.
#[test]
fn an_easy_side_without_a_socket_stops_probing_and_says_so() {
    let mut sim = classed_sim(EASY, HARD, Transport::Quic, |_| Net::Drop);
    sim.no_easy_socket = true;
    sim.run();
    assert_eq!(sim.probes_sent, 1, "no probe after the failure");
    let b = sim.record(Who::A).attempts[0]
        .birthday
        .clone()
        .expect("it tried to probe");
    assert_eq!((b.error.as_deref(), b.probes), (Some("no socket"), Some(1)));
}

/// The remote drops its end of the stream once it read SYNC; when that reaches the driver
/// before its own dial is due (a short direct path, a slow relayed one), the dial still goes.
#[test]
fn a_stream_closed_after_sync_does_not_fail_the_handshake() {
    let now = Instant::now();
    let peers = Peers::default();
    let mut a = Punch::new(
        now,
        0,
        config(Side::Dialer),
        peers,
        None,
        vec![addr(Who::A)],
    );
    let Some(Action::Open { stream, .. }) = a.poll_action() else {
        panic!("A opens the handshake");
    };
    a.stream_opened(now, stream);
    assert!(
        matches!(a.poll_action(), Some(Action::Send { .. })),
        "CONNECT"
    );
    let later = now + Duration::from_millis(40);
    a.message(
        later,
        stream,
        HolePunch::new(Kind::Connect, vec![addr(Who::B).to_vec()]),
    );
    assert!(
        matches!(a.poll_action(), Some(Action::Send { message, .. }) if message.kind == Kind::Sync),
        "SYNC"
    );
    let dial_at = a.poll_timeout().expect("the dial is due later");
    assert_eq!(
        dial_at,
        later + Duration::from_millis(20),
        "half the round trip"
    );
    a.stream_failed(
        later + Duration::from_millis(1),
        stream,
        "unexpected end of file".into(),
        false,
    );
    a.handle_timeout(dial_at);
    let actions: Vec<Action> = std::iter::from_fn(|| a.poll_action()).collect();
    assert!(
        actions
            .iter()
            .any(|x| matches!(x, Action::Dial { attempt: 1, .. })),
        "{actions:?}"
    );
}

/// The hard side of `a` × `b`.
fn hard_of(a: Peer) -> (Who, Who) {
    if a.mapping == HARD.mapping {
        (Who::A, Who::B)
    } else {
        (Who::B, Who::A)
    }
}

/// Port prediction against a NAT that allocates in order: the hard side's predicted port rides
/// its handshake message when known in time (or a NEXT when it came later), the easy side
/// probes that window first, and the hit is there, with a few dozen probes where random
/// probing needs hundreds.
#[test]
fn port_prediction_turns_the_first_probes_to_the_predicted_window() {
    const FIRST: u16 = 40_000;
    // The prediction before the handshake (on CONNECT or SYNC), or 50 ms in, after the hard
    // side's last handshake message went (in a NEXT).
    for late in [false, true] {
        for (a, b) in [(EASY, HARD), (HARD, EASY)] {
            let mut sim = classed_sim(a, b, Transport::Quic, |d| {
                if d.probed { Net::Connect } else { Net::Drop }
            });
            sim.sequential = Some(FIRST);
            let (hard, easy) = hard_of(a);
            if late {
                sim.at(
                    Duration::from_millis(50),
                    Event::Predicted {
                        to: hard,
                        port: FIRST,
                    },
                );
            } else if let Some(p) = sim.node(hard).punch() {
                p.predicted(FIRST);
            }
            sim.run();
            let case = format!("late {late}, hard {hard:?}");
            assert_eq!(sim.nexts, u32::from(late), "{case}");
            let e = sim.record(easy);
            assert_eq!(e.outcome, Outcome::Success, "{case}: {e:?}");
            let eb = e.attempts[0].birthday.as_ref().expect("it probed");
            assert_eq!(eb.predicted, Some(FIRST), "{case}");
            assert!(eb.in_window && eb.direct, "{case}: {eb:?}");
            assert!(
                eb.port.is_some_and(|p| (FIRST..FIRST + 16).contains(&p)),
                "{case}: {eb:?}"
            );
            // A round or two of the window: its sockets open after the first probes may.
            assert!(eb.probes.is_some_and(|n| n <= 80), "{case}: {eb:?}");
            let hb = sim.record(hard).attempts[0]
                .birthday
                .clone()
                .expect("it probed");
            assert_eq!(
                hb.predicted,
                Some(FIRST),
                "{case}: the hard side says what it told"
            );
        }
    }
    // Without a prediction the same NAT is found by random probes, and nothing says a window.
    let mut sim = classed_sim(EASY, HARD, Transport::Quic, |d| {
        if d.probed { Net::Connect } else { Net::Drop }
    });
    sim.sequential = Some(FIRST);
    sim.run();
    let eb = sim.record(Who::A).attempts[0]
        .birthday
        .clone()
        .expect("it probed");
    assert!(
        eb.direct && !eb.in_window && eb.predicted.is_none(),
        "{eb:?}"
    );
    assert_eq!(sim.nexts, 0);
}

use super::*;

fn nat(mapping: Mapping, filtering: Filtering) -> Nat {
    Nat {
        mapping: Some(mapping),
        filtering: Some(filtering),
        ..Nat::default()
    }
}

const OPEN: (Mapping, Filtering) = (Mapping::None, Filtering::None);
const FULL_CONE: (Mapping, Filtering) =
    (Mapping::EndpointIndependent, Filtering::EndpointIndependent);
const RESTRICTED: (Mapping, Filtering) =
    (Mapping::EndpointIndependent, Filtering::AddressDependent);
const PORT_RESTRICTED: (Mapping, Filtering) = (
    Mapping::EndpointIndependent,
    Filtering::AddressAndPortDependent,
);
const SYMMETRIC: (Mapping, Filtering) = (
    Mapping::AddressAndPortDependent,
    Filtering::AddressAndPortDependent,
);

fn of((m, f): (Mapping, Filtering)) -> Nat {
    nat(m, f)
}

fn techniques(stages: &[Stage]) -> Vec<Vec<Technique>> {
    stages.iter().map(|s| s.techniques.clone()).collect()
}

#[test]
fn the_decision_table_matches_what_the_lab_punches() {
    use Technique::{Direct, Reversal, TcpNutss, TcpSimultaneousOpen, UdpPunch};
    let tcp = [TcpSimultaneousOpen, TcpNutss];
    // docs/results.md: every pair punches but symmetric against port-restricted, symmetric or
    // a carrier NAT (which filters by port), in either direction.
    for (a, b, direct) in [
        (PORT_RESTRICTED, PORT_RESTRICTED, true),
        (FULL_CONE, SYMMETRIC, true),
        (RESTRICTED, SYMMETRIC, true),
        (SYMMETRIC, RESTRICTED, true),
        (SYMMETRIC, PORT_RESTRICTED, false),
        (PORT_RESTRICTED, SYMMETRIC, false),
        (SYMMETRIC, SYMMETRIC, false),
    ] {
        assert_eq!(punchable(&of(a), &of(b)), direct, "{a:?} × {b:?}");
    }
    assert_eq!(
        techniques(&plan(&of(PORT_RESTRICTED), &of(OPEN), Proto::Tcp)),
        [vec![Direct], tcp.to_vec()]
    );
    assert_eq!(
        techniques(&plan(&of(OPEN), &of(SYMMETRIC), Proto::Udp)),
        [vec![Reversal], vec![UdpPunch]],
        "the open end is dialled; a punch still works from a symmetric NAT to no NAT"
    );
    let mapped = Nat {
        port_mapped: true,
        ..of(SYMMETRIC)
    };
    assert_eq!(
        techniques(&plan(&of(SYMMETRIC), &mapped, Proto::Udp)),
        [vec![Direct]],
        "a port mapping makes even a symmetric NAT reachable"
    );
    assert!(plan(&of(SYMMETRIC), &of(PORT_RESTRICTED), Proto::Tcp).is_empty());
    // Over UDP, birthday probing joins what a punch cannot, but not two per-destination NATs.
    for (a, b) in [(SYMMETRIC, PORT_RESTRICTED), (PORT_RESTRICTED, SYMMETRIC)] {
        assert_eq!(
            techniques(&plan(&of(a), &of(b), Proto::Udp)),
            [vec![Technique::UdpBirthday]],
            "{a:?} × {b:?}"
        );
    }
    assert!(plan(&of(SYMMETRIC), &of(SYMMETRIC), Proto::Udp).is_empty());
    // Either end may turn birthday probing off: then the relay at once.
    let off = Nat {
        no_birthday: true,
        ..of(PORT_RESTRICTED)
    };
    assert!(plan(&off, &of(SYMMETRIC), Proto::Udp).is_empty());
    assert!(plan(&of(SYMMETRIC), &off, Proto::Udp).is_empty());
    assert_eq!(
        techniques(&plan(&Nat::default(), &of(SYMMETRIC), Proto::Udp)),
        [vec![UdpPunch]],
        "unknown behaviour is tried"
    );
}

/// A sequencer fed by a script: (at ms, event).
struct Run {
    base: Instant,
    seq: Sequencer,
    actions: Vec<(u64, Action)>,
}

impl Run {
    fn new(stages: Vec<Stage>) -> Self {
        let base = Instant::now();
        let mut run = Self {
            base,
            seq: Sequencer::new(base, stages),
            actions: Vec::new(),
        };
        run.drain(0);
        run
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn drain(&mut self, ms: u64) {
        while let Some(a) = self.seq.poll_action() {
            self.actions.push((ms, a));
        }
    }

    /// Lets the timers run up to `ms`.
    fn until(&mut self, ms: u64) {
        while let Some(t) = self.seq.poll_timeout() {
            if t > self.at(ms) {
                break;
            }
            let at = t.duration_since(self.base).as_millis() as u64;
            self.seq.handle_timeout(t);
            self.drain(at);
        }
    }

    fn ok(&mut self, ms: u64, t: Technique) {
        self.until(ms);
        let c = Connected {
            remote: format!("{t:?}"),
            rtt: Some(Duration::from_millis(40)),
        };
        self.seq.connected(self.at(ms), t, c);
        self.drain(ms);
    }

    fn fail(&mut self, ms: u64, t: Technique) {
        self.until(ms);
        self.seq.failed(self.at(ms), t, "refused");
        self.drain(ms);
    }

    fn delivered(&self) -> Option<(u64, Technique)> {
        self.actions.iter().find_map(|(ms, a)| match a {
            Action::Deliver { technique, .. } => Some((*ms, *technique)),
            _ => None,
        })
    }

    fn stopped(&self) -> Vec<Technique> {
        self.actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Stop(t) => Some(*t),
                _ => None,
            })
            .collect()
    }
}

fn tcp_punch() -> Vec<Stage> {
    plan(&of(PORT_RESTRICTED), &of(PORT_RESTRICTED), Proto::Tcp)
}

#[test]
fn the_first_direct_socket_wins_and_stops_the_rest_and_the_relay() {
    let mut run = Run::new(tcp_punch());
    let started: Vec<&Action> = run.actions.iter().map(|(_, a)| a).collect();
    assert_eq!(
        started,
        [
            &Action::Start(Technique::Relay),
            &Action::Start(Technique::TcpSimultaneousOpen),
            &Action::Start(Technique::TcpNutss)
        ],
        "the relay stands by from the start; the stage's techniques race"
    );
    run.ok(300, Technique::Relay);
    assert_eq!(
        run.delivered(),
        None,
        "the relay waits for the direct techniques"
    );
    run.ok(380, Technique::TcpNutss);
    assert_eq!(run.delivered(), Some((380, Technique::TcpNutss)));
    assert_eq!(run.stopped(), [Technique::TcpSimultaneousOpen]);
    assert!(run.seq.is_done() && run.seq.poll_timeout().is_none());
    // Late news changes nothing.
    run.ok(400, Technique::TcpSimultaneousOpen);
    assert_eq!(
        run.actions
            .iter()
            .filter(|(_, a)| matches!(a, Action::Deliver { .. }))
            .count(),
        1
    );
    let record: Vec<(Technique, &str)> = run
        .seq
        .tried()
        .iter()
        .map(|t| (t.technique, t.result.as_str()))
        .collect();
    assert_eq!(
        record,
        [
            (Technique::Relay, "ok"),
            (Technique::TcpSimultaneousOpen, "stopped"),
            (Technique::TcpNutss, "ok")
        ]
    );
}

#[test]
fn when_every_direct_stage_fails_the_relayed_socket_comes_at_once() {
    let stages = plan(&of(PORT_RESTRICTED), &of(OPEN), Proto::Udp);
    let mut run = Run::new(stages);
    run.ok(250, Technique::Relay);
    run.fail(400, Technique::Direct);
    assert!(
        run.actions
            .iter()
            .any(|(ms, a)| *ms == 400 && *a == Action::Start(Technique::UdpPunch)),
        "a failed stage gives way to the next at once: {:?}",
        run.actions
    );
    // The punch stage runs out its budget: the relay is delivered then.
    run.until(10_000);
    assert_eq!(run.delivered(), Some((3400, Technique::Relay)));
    assert_eq!(run.stopped(), [Technique::UdpPunch]);
}

#[test]
fn an_impossible_pair_gets_the_relay_as_soon_as_it_is_ready_and_within_5_s() {
    let stages = plan(&of(SYMMETRIC), &of(SYMMETRIC), Proto::Tcp);
    assert!(stages.is_empty());
    let mut run = Run::new(stages);
    run.until(1_000);
    assert_eq!(run.delivered(), None);
    run.ok(1_200, Technique::Relay);
    let (ms, t) = run.delivered().expect("the relay");
    assert_eq!(t, Technique::Relay);
    assert!(ms <= 5_000);
}

#[test]
fn without_a_relay_the_application_hears_why_in_bounded_time() {
    // The relay fails first, then the punch: the error names the relay's failure.
    let mut run = Run::new(tcp_punch());
    run.fail(100, Technique::Relay);
    run.fail(500, Technique::TcpSimultaneousOpen);
    run.fail(700, Technique::TcpNutss);
    let fail = run.actions.iter().find_map(|(ms, a)| match a {
        Action::Fail { code, message } => Some((*ms, *code, message.clone())),
        _ => None,
    });
    let (ms, code, message) = fail.expect("a failure");
    assert_eq!((ms, code), (700, ErrorCode::Timeout));
    assert!(message.contains("refused"), "{message}");
    // A relay that never answers: the deadline ends it.
    let mut run = Run::new(Vec::new());
    run.until(60_000);
    assert!(matches!(
        run.actions.last(),
        Some((ms, Action::Fail { code: ErrorCode::Timeout, .. })) if *ms == DEADLINE.as_millis() as u64
    ));
    assert_eq!(run.stopped(), [Technique::Relay]);
}

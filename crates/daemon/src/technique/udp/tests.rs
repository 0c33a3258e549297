use super::*;

const TOKEN: [u8; 16] = *b"0123456789abcdef";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

#[test]
fn a_probe_encodes_to_the_documented_bytes() {
    let probe = Datagram {
        kind: Kind::Probe,
        token: TOKEN,
        seq: 0x0102_0304,
    };
    let bytes = probe.encode();
    assert_eq!(&bytes[..8], b"NPPUNCH1");
    assert_eq!(bytes[8], 1);
    assert_eq!(&bytes[9..25], &TOKEN);
    assert_eq!(&bytes[25..], &[1, 2, 3, 4]);
    assert_eq!(Datagram::decode(&bytes), Ok(probe));
    let ack = Datagram {
        kind: Kind::Ack,
        ..probe
    };
    assert_eq!(ack.encode()[8], 2);
    assert_eq!(Datagram::decode(&ack.encode()), Ok(ack));
}

#[test]
fn decoding_rejects_wrong_length_magic_and_kind() {
    let good = Datagram {
        kind: Kind::Ack,
        token: TOKEN,
        seq: 7,
    }
    .encode();
    assert_eq!(Datagram::decode(&good[..28]), Err(DecodeError::Length(28)));
    assert_eq!(Datagram::decode(&[]), Err(DecodeError::Length(0)));
    let mut long = good.to_vec();
    long.push(0);
    assert_eq!(Datagram::decode(&long), Err(DecodeError::Length(30)));
    let mut magic = good;
    magic[0] = b'X';
    assert_eq!(Datagram::decode(&magic), Err(DecodeError::Magic));
    let mut kind = good;
    kind[8] = 3;
    assert_eq!(Datagram::decode(&kind), Err(DecodeError::Kind(3)));
}

/// A small deterministic generator, so that the test needs no RNG crate.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn decoding_random_and_short_bytes_never_panics() {
    let mut state = 0x9e37_79b9_7f4a_7c15;
    let mut puncher = Puncher::new(Instant::now(), &[addr("10.0.0.1:1")], TOKEN);
    for _ in 0..20_000 {
        let len = (xorshift(&mut state) % 40) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut state) as u8).collect();
        // Half of them carry the magic, so that the later checks are reached too.
        if len >= 8 && xorshift(&mut state) & 1 == 0 {
            bytes[..8].copy_from_slice(&MAGIC);
        }
        let _ = Datagram::decode(&bytes);
        puncher.handle_input(Instant::now(), addr("10.0.0.9:9"), &bytes);
    }
}

type Outcome = Option<(SocketAddr, Option<Duration>)>;

/// Two punchers, each behind a "NAT" that lets in only what comes from an address it has
/// sent to, exchanging datagrams over a link of `one_way` delay, in virtual time.
fn punch_pair(one_way: Duration, a_candidates: &[SocketAddr]) -> (Outcome, Outcome) {
    let (a_addr, b_addr) = (addr("203.0.113.1:4000"), addr("198.51.100.2:5000"));
    let start = Instant::now();
    let mut ends = [
        (a_addr, Puncher::new(start, a_candidates, TOKEN), Vec::new()),
        (
            b_addr,
            Puncher::new(start + one_way, &[a_addr], TOKEN),
            Vec::new(),
        ),
    ];
    // In flight: (arrival, to end, from, bytes).
    let mut flight: Vec<(Instant, usize, SocketAddr, [u8; DATAGRAM_LEN])> = Vec::new();
    let mut now = start;
    while now < start + Duration::from_secs(3) {
        for (i, (own, puncher, opened)) in ends.iter_mut().enumerate() {
            if puncher.poll_timeout().is_some_and(|t| t <= now) {
                puncher.handle_timeout(now);
            }
            let mut arrived = Vec::new();
            flight.retain(|f| {
                let here = f.0 <= now && f.1 == i;
                if here {
                    arrived.push(*f);
                }
                !here
            });
            for (_, _, from, bytes) in arrived {
                if opened.contains(&from) {
                    puncher.handle_input(now, from, &bytes);
                }
            }
            while let Some(t) = puncher.poll_transmit() {
                if !opened.contains(&t.to) {
                    opened.push(t.to);
                }
                let to = if t.to == a_addr {
                    0
                } else if t.to == b_addr {
                    1
                } else {
                    continue;
                };
                flight.push((now + one_way, to, *own, t.datagram.encode()));
            }
        }
        now += Duration::from_millis(1);
    }
    (ends[0].1.outcome(), ends[1].1.outcome())
}

#[test]
fn two_punchers_connect_to_each_other() {
    let (a, b) = punch_pair(Duration::from_millis(20), &[addr("198.51.100.2:5000")]);
    let (a_remote, a_rtt) = a.expect("a punched");
    let (b_remote, b_rtt) = b.expect("b punched");
    assert_eq!(a_remote, addr("198.51.100.2:5000"));
    assert_eq!(b_remote, addr("203.0.113.1:4000"));
    // Each hears the other's probe after its own first round, before any ack, and ends on
    // it: no round trip measured, and none made up.
    assert_eq!((a_rtt, b_rtt), (None, None));
}

#[test]
fn an_ack_ends_the_punch_with_the_round_trip_of_its_probe() {
    let now = Instant::now();
    let peer = addr("198.51.100.2:5000");
    let mut puncher = Puncher::new(now, &[peer], TOKEN);
    puncher.handle_timeout(now);
    while puncher.poll_transmit().is_some() {}
    let ack = Datagram {
        kind: Kind::Ack,
        token: TOKEN,
        seq: 1,
    }
    .encode();
    // The peer's probe was answered first, so the ack ends it at once.
    let probe = Datagram {
        kind: Kind::Probe,
        token: TOKEN,
        seq: 3,
    }
    .encode();
    puncher.handle_input(now, addr("192.0.2.9:9"), &probe);
    puncher.handle_input(now + Duration::from_millis(42), addr("192.0.2.9:9"), &ack);
    while puncher.poll_transmit().is_some() {}
    assert_eq!(
        puncher.outcome(),
        Some((addr("192.0.2.9:9"), Some(Duration::from_millis(42))))
    );
}

#[test]
fn a_probe_from_a_candidate_after_our_first_round_ends_the_punch_at_once() {
    let now = Instant::now();
    let peer = addr("198.51.100.2:5000");
    let mut puncher = Puncher::new(now, &[peer], TOKEN);
    let probe = Datagram {
        kind: Kind::Probe,
        token: TOKEN,
        seq: 7,
    }
    .encode();
    // Before we sent anything, a probe is only answered.
    puncher.handle_input(now, peer, &probe);
    while puncher.poll_transmit().is_some() {}
    assert_eq!(puncher.outcome(), None);
    puncher.handle_timeout(now);
    puncher.handle_input(now + Duration::from_millis(1), peer, &probe);
    let mut sent = Vec::new();
    while let Some(t) = puncher.poll_transmit() {
        sent.push(t);
    }
    assert!(
        sent.iter()
            .any(|t| t.to == peer && t.datagram.kind == Kind::Ack && t.datagram.seq == 7),
        "the probe is answered: {sent:?}"
    );
    assert_eq!(puncher.outcome(), Some((peer, None)));
    // From an address we never probed, a probe is answered but proves nothing yet.
    let mut puncher = Puncher::new(now, &[peer], TOKEN);
    puncher.handle_timeout(now);
    puncher.handle_input(now, addr("192.0.2.9:9"), &probe);
    while puncher.poll_transmit().is_some() {}
    assert_eq!(puncher.outcome(), None);
}

#[test]
fn a_wrong_candidate_first_does_not_stop_the_punch() {
    let (a, b) = punch_pair(
        Duration::from_millis(5),
        &[addr("192.0.2.7:1"), addr("198.51.100.2:5000")],
    );
    assert_eq!(a.map(|a| a.0), Some(addr("198.51.100.2:5000")));
    assert_eq!(b.map(|b| b.0), Some(addr("203.0.113.1:4000")));
}

#[test]
fn a_wrong_token_gets_no_answer() {
    let now = Instant::now();
    let mut puncher = Puncher::new(now, &[addr("10.0.0.1:1")], TOKEN);
    let foreign = Datagram {
        kind: Kind::Probe,
        token: [9; 16],
        seq: 1,
    };
    puncher.handle_input(now, addr("10.0.0.1:1"), &foreign.encode());
    let ack = Datagram {
        kind: Kind::Ack,
        ..foreign
    };
    puncher.handle_input(now, addr("10.0.0.1:1"), &ack.encode());
    assert_eq!(puncher.poll_transmit(), None);
    assert_eq!(puncher.outcome(), None);
}

#[test]
fn acks_to_one_address_are_rate_limited_and_memory_is_bounded() {
    let start = Instant::now();
    let mut puncher = Puncher::new(start, &[addr("10.0.0.1:1")], TOKEN);
    let probe = |seq| {
        Datagram {
            kind: Kind::Probe,
            token: TOKEN,
            seq,
        }
        .encode()
    };
    for i in 0..10 {
        puncher.handle_input(
            start + Duration::from_millis(i),
            addr("10.0.0.1:1"),
            &probe(1),
        );
    }
    assert_eq!(std::iter::from_fn(|| puncher.poll_transmit()).count(), 1);
    for port in 0..1000 {
        let from = SocketAddr::from(([10, 0, 0, 2], port));
        puncher.handle_input(start, from, &probe(1));
        let _ = puncher.poll_transmit();
    }
    assert_eq!(puncher.peers.len(), ADDRESS_MEMORY);
    for i in 0..1000 {
        puncher.handle_timeout(start + PROBE_INTERVAL * i);
    }
    assert_eq!(puncher.sent.len(), SENT_MEMORY);
    assert!(puncher.transmits.len() <= TRANSMIT_QUEUE);
}

#[test]
fn every_datagram_round_trips() {
    let mut state = 0x0123_4567_89ab_cdef;
    for _ in 0..10_000 {
        let mut token = [0u8; 16];
        token
            .iter_mut()
            .for_each(|b| *b = xorshift(&mut state) as u8);
        let datagram = Datagram {
            kind: if xorshift(&mut state) & 1 == 0 {
                Kind::Probe
            } else {
                Kind::Ack
            },
            token,
            seq: xorshift(&mut state) as u32,
        };
        assert_eq!(Datagram::decode(&datagram.encode()), Ok(datagram));
    }
}

use super::*;

#[test]
fn requests_are_one_json_object_per_line_with_version_and_id() {
    let line = Request::Connect {
        peer: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
        proto: Proto::Udp,
        service: "ssh".into(),
    }
    .to_line("a1");
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
    let v: Value = serde_json::from_slice(&line).expect("json");
    assert_eq!(
        v,
        serde_json::json!({
            "v": 1, "id": "a1", "op": "connect", "proto": "udp", "service": "ssh",
            "peer": "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        })
    );
    let v: Value = serde_json::from_slice(&Request::Status.to_line("")).expect("json");
    assert_eq!(v, serde_json::json!({"v": 1, "id": "", "op": "status"}));
    let v: Value = serde_json::from_slice(
        &Request::Listen {
            service: "echo".into(),
            proto: Proto::Tcp,
        }
        .to_line("l"),
    )
    .expect("json");
    assert_eq!(
        v,
        serde_json::json!({"v": 1, "id": "l", "op": "listen", "service": "echo", "proto": "tcp"})
    );
    // A name with quotes and newlines stays one line.
    let line = Request::Cancel {
        target: "a\"\n".into(),
    }
    .to_line("x");
    assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
}

/// The events of the session in `docs/daemon-api.md`.
#[test]
fn the_documented_session_parses() {
    let progress = br#"{"id":"a1","event":"progress","technique":"tcp-simultaneous-open","step":"candidates-sent","detail":"2 addresses through the relay"}"#;
    assert_eq!(
        parse_event(progress),
        Ok(Reply {
            id: "a1".into(),
            event: Event::Progress(Progress {
                technique: "tcp-simultaneous-open".into(),
                step: "candidates-sent".into(),
                detail: "2 addresses through the relay".into(),
            }),
        })
    );
    let ok = br#"{"id":"a1","event":"ok","technique":"tcp-simultaneous-open","direct":true,"remote":"203.0.113.7:41000","rtt_ms":101.3,"fd":true}"#;
    assert_eq!(
        parse_event(ok).map(|r| r.event),
        Ok(Event::Ok(Ready {
            technique: "tcp-simultaneous-open".into(),
            direct: true,
            remote: "203.0.113.7:41000".into(),
            rtt_ms: Some(101.3),
            fd: true,
        }))
    );
    let status = br#"{"id":"s","event":"status","peer":"12D3KooWA","version":1,"reservations":["/ip4/192.0.2.1/tcp/4001/p2p/12D3KooWR/p2p-circuit/p2p/12D3KooWA"],"mappings":[],"techniques":["direct","tcp-simultaneous-open","relay"]}"#;
    let Ok(Reply {
        event: Event::Status(status),
        ..
    }) = parse_event(status)
    else {
        panic!("a status event");
    };
    assert_eq!(status.peer, "12D3KooWA");
    assert_eq!(status.nat, None);
    assert_eq!(
        status.techniques,
        ["direct", "tcp-simultaneous-open", "relay"]
    );
    let error = br#"{"id":"x","event":"error","code":"unknown-op","message":"unknown op `dance`"}"#;
    assert_eq!(
        parse_event(error).map(|r| r.event),
        Ok(Event::Error {
            code: "unknown-op".into(),
            message: "unknown op `dance`".into(),
        })
    );
    let offer = br#"{"id":"i","event":"offer","offer":"opaque"}"#;
    assert_eq!(
        parse_event(offer).map(|r| r.event),
        Ok(Event::Offer {
            offer: "opaque".into()
        })
    );
}

#[test]
fn newer_fields_and_events_are_taken_and_broken_lines_named() {
    // Fields the client does not know are ignored; an absent rtt is none; no id is "".
    let ok = br#"{"event":"ok","technique":"relay","direct":false,"remote":"192.0.2.1:4001","fd":false,"later":[1]}"#;
    let reply = parse_event(ok).expect("ok");
    assert_eq!(reply.id, "");
    assert!(matches!(
        reply.event,
        Event::Ok(Ready {
            rtt_ms: None,
            direct: false,
            ..
        })
    ));
    assert_eq!(
        parse_event(br#"{"id":"a","event":"weather","sun":true}"#).map(|r| r.event),
        Ok(Event::Unknown {
            event: "weather".into()
        })
    );
    for (line, reason) in [
        (&b"not json"[..], "not JSON"),
        (b"[1,2]", "an event is a JSON object"),
        (br#"{"id":"a"}"#, "`event` is missing"),
        (br#"{"id":"a","event":7}"#, "`event` must be a string"),
        (br#"{"id":7,"event":"ok"}"#, "`id` must be a string"),
        (
            br#"{"id":"a","event":"ok","technique":"relay","remote":"r","fd":true}"#,
            "a `ok` event: missing field `direct`",
        ),
        (
            br#"{"id":"a","event":"error","code":1,"message":"m"}"#,
            "a `error` event: invalid type",
        ),
        (b"\xff\xfe", "not JSON"),
    ] {
        let e = parse_event(line).expect_err("bad");
        assert!(e.reason.starts_with(reason), "{line:?}: {e}");
    }
}

fn events<F: fmt::Debug>(out: Vec<Incoming<F>>) -> Vec<(String, Option<F>)> {
    out.into_iter()
        .map(|i| match i {
            Incoming::Event { reply, fd } => (format!("{}:{}", reply.id, reply.event.name()), fd),
            other => panic!("not an event: {other:?}"),
        })
        .collect()
}

const PROGRESS: &str =
    r#"{"id":"a","event":"progress","technique":"udp-punch","step":"probing","detail":"d"}"#;
const OK_FD: &str = r#"{"id":"a","event":"ok","technique":"udp-punch","direct":true,"remote":"192.0.2.7:5000","fd":true}"#;

#[test]
fn lines_are_cut_wherever_the_reads_cut_them() {
    let stream = format!("{PROGRESS}\r\n\n{PROGRESS}\n");
    for size in 1..stream.len() {
        let mut reader = EventReader::<u32>::default();
        let mut got = Vec::new();
        for chunk in stream.as_bytes().chunks(size) {
            got.extend(events(reader.push(chunk, None)));
        }
        assert_eq!(got.len(), 2, "chunks of {size}");
        assert_eq!(reader.buffered(), 0);
    }
}

#[test]
fn the_descriptor_belongs_to_the_ok_line_among_the_lines_of_its_read() {
    // One read with a progress line, the ok line and a part of the next: the fd is the ok's.
    let mut reader = EventReader::default();
    let bytes = format!("{PROGRESS}\n{OK_FD}\n{{\"id\"");
    let got = events(reader.push(bytes.as_bytes(), Some(7u32)));
    assert_eq!(
        got,
        [
            ("a:progress".to_owned(), None),
            ("a:ok".to_owned(), Some(7))
        ]
    );
    assert_eq!(reader.held_fds(), 0);

    // The ok line's first bytes come with the fd, the rest in later reads.
    let mut reader = EventReader::default();
    let (head, tail) = OK_FD.split_at(10);
    assert!(events(reader.push(format!("{PROGRESS}\n{head}").as_bytes(), Some(8u32))).len() == 1);
    assert_eq!(reader.held_fds(), 1, "held for the unfinished ok line");
    let (mid, end) = tail.split_at(20);
    assert!(reader.push(mid.as_bytes(), None).is_empty());
    let got = events(reader.push(format!("{end}\n").as_bytes(), None));
    assert_eq!(got, [("a:ok".to_owned(), Some(8))]);
}

#[test]
fn an_ok_whose_descriptor_did_not_come_with_its_first_bytes_has_none() {
    // The fd comes with the ok line's last bytes, not its first: no line claims it.
    let mut reader = EventReader::default();
    let (head, tail) = OK_FD.split_at(10);
    assert!(reader.push(head.as_bytes(), None).is_empty());
    let out = reader.push(format!("{tail}\n").as_bytes(), Some(9u32));
    assert!(matches!(out.as_slice(), [Incoming::MissingFd { reply }] if reply.id == "a"));
    assert_eq!(reader.held_fds(), 0, "the stray descriptor is closed");

    // An ok that says fd but came alone.
    let out = reader.push(format!("{OK_FD}\n").as_bytes(), None);
    assert!(matches!(out.as_slice(), [Incoming::MissingFd { .. }]));

    // A descriptor with lines that are no ok: closed at once.
    let out = reader.push(format!("{PROGRESS}\n").as_bytes(), Some(10u32));
    assert_eq!(events(out).len(), 1);
    assert_eq!(reader.held_fds(), 0);
    // A descriptor in the middle of a line (its start came earlier): closed at once, and the
    // ok line that follows does not take it.
    assert!(reader.push(b"{\"id\":", None).is_empty());
    assert!(reader.push(b"\"a\",", Some(11u32)).is_empty());
    assert_eq!(reader.held_fds(), 0);
    let out = reader.push(
        format!("\"event\":\"weather\"}}\n{OK_FD}\n").as_bytes(),
        None,
    );
    assert!(matches!(
        out.as_slice(),
        [Incoming::Event { fd: None, .. }, Incoming::MissingFd { .. }]
    ));
}

#[test]
fn a_line_too_long_is_reported_once_and_the_next_is_read() {
    let mut reader = EventReader::<u32>::default();
    let long = vec![b'x'; 10_000];
    let mut out = Vec::new();
    for _ in 0..(MAX_EVENT_LINE / long.len() + 3) {
        out.extend(reader.push(&long, Some(1)));
        assert!(reader.buffered() <= MAX_EVENT_LINE + 1);
        // Only the descriptor of the read that held the line's start may be its.
        assert!(reader.held_fds() <= 1);
    }
    assert!(out.is_empty());
    let out = reader.push(format!("xx\n{PROGRESS}\n").as_bytes(), None);
    assert!(matches!(
        out.as_slice(),
        [Incoming::TooLong, Incoming::Event { .. }]
    ));
    // A line of exactly the limit is read.
    let mut exact = vec![b' '; MAX_EVENT_LINE - PROGRESS.len()];
    exact.extend_from_slice(PROGRESS.as_bytes());
    exact.push(b'\n');
    assert_eq!(events(reader.push(&exact, None)).len(), 1);
}

#[test]
fn a_bad_line_is_shown_cut_and_the_stream_goes_on() {
    let mut reader = EventReader::<u32>::default();
    let junk = "j".repeat(500);
    let out = reader.push(format!("{junk}\n{PROGRESS}\n").as_bytes(), None);
    match out.as_slice() {
        [Incoming::BadLine { line, reason }, Incoming::Event { .. }] => {
            assert_eq!(line.len(), 200);
            assert!(reason.reason.starts_with("not JSON"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_bytes_make_the_event_reader_panic_or_hold_more_than_it_may() {
    // A cheap stand-in for the fuzz target (`fuzz/fuzz_targets/client_events.rs`).
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pieces: [&[u8]; 9] = [
        b"{\"id\":\"a\",\"event\":\"ok\",\"technique\":\"relay\",",
        b"\"direct\":false,\"remote\":\"r\",\"fd\":true}",
        b"\n",
        b"\r\n",
        b"\xff\xfe",
        b"{\"event\":\"progress\",\"rtt_ms\":1e400}",
        b"[[[[[[[[[[[[",
        b"}",
        b"\"id\":\"\\u0000\"",
    ];
    let mut reader = EventReader::default();
    let mut given = std::collections::BTreeSet::new();
    for i in 0..20_000_u32 {
        let piece = pieces[(next() % 9) as usize];
        let fd = (next() % 3 == 0).then_some(i);
        for incoming in reader.push(piece, fd) {
            if let Incoming::Event {
                reply,
                fd: Some(fd),
            } = incoming
            {
                assert!(matches!(reply.event, Event::Ok(Ready { fd: true, .. })));
                assert!(given.insert(fd), "descriptor {fd} given twice");
            }
        }
        assert!(reader.held_fds() <= 1);
    }
    assert!(!given.is_empty(), "some ok lines got their descriptors");
}

#[test]
fn the_session_in_the_spec_is_what_the_client_writes_and_reads() {
    let spec = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/daemon-api.md"
    ));
    let connect = spec
        .lines()
        .find_map(|l| l.strip_prefix("→ "))
        .expect("a request");
    let shown: Value = serde_json::from_str(connect).expect("json");
    let written = Request::Connect {
        peer: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
        proto: Proto::Tcp,
        service: "ssh".into(),
    }
    .to_line("a1");
    let written: Value = serde_json::from_slice(&written).expect("json");
    assert_eq!(written, shown);
    let mut read = 0;
    for line in spec.lines().filter_map(|l| l.strip_prefix("← ")) {
        let json = line.split("   (+").next().unwrap_or(line).replace('…', "");
        let reply = parse_event(json.as_bytes()).expect("an event");
        assert!(!matches!(reply.event, Event::Unknown { .. }), "{line}");
        read += 1;
    }
    assert_eq!(read, 6, "the example session's events");
}

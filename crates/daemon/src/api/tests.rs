use super::*;

const PEER: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

fn rejected(line: &str) -> Rejected {
    parse_request(line.as_bytes()).expect_err(line)
}

#[test]
fn every_op_reads_with_its_fields_and_defaults() {
    let connect = format!(
        r#"{{"v":1,"id":"a1","op":"connect","peer":"{PEER}","proto":"udp","service":"ssh","later":true}}"#
    );
    let r = parse_request(connect.as_bytes()).expect("connect");
    assert_eq!(r.id, "a1");
    assert_eq!(
        r.op,
        Op::Connect {
            peer: PEER.parse().expect("peer"),
            proto: Proto::Udp,
            service: "ssh".into()
        },
        "fields it does not know are ignored"
    );
    let listen = parse_request(br#"{"v":1,"op":"listen"}"#).expect("listen");
    assert_eq!(listen.id, "", "the id is optional");
    assert_eq!(
        listen.op,
        Op::Listen {
            service: "default".into(),
            proto: Proto::Tcp
        }
    );
    for (line, op) in [
        (
            r#"{"v":1,"op":"initiate","proto":"tcp"}"#,
            Op::Initiate { proto: Proto::Tcp },
        ),
        (
            r#"{"v":1,"op":"respond","offer":"b2ZmZXI"}"#,
            Op::Respond {
                offer: "b2ZmZXI".into(),
            },
        ),
        (
            r#"{"v":1,"op":"cancel","target":"a1"}"#,
            Op::Cancel {
                target: "a1".into(),
            },
        ),
        (r#"{"v":1,"op":"status"}"#, Op::Status),
    ] {
        assert_eq!(parse_request(line.as_bytes()).expect(line).op, op, "{line}");
    }
}

#[test]
fn bad_requests_say_what_is_wrong_and_keep_the_id_they_could_read() {
    for (line, code, id, says) in [
        ("{not json", ErrorCode::BadRequest, None, "not JSON"),
        ("[1,2]", ErrorCode::BadRequest, None, "a JSON object"),
        (
            r#"{"v":1,"id":7,"op":"status"}"#,
            ErrorCode::BadRequest,
            None,
            "`id` must be a string",
        ),
        (
            r#"{"id":"x","op":"status"}"#,
            ErrorCode::BadRequest,
            Some("x"),
            "`v`",
        ),
        (
            r#"{"v":2,"id":"x","op":"status"}"#,
            ErrorCode::UnsupportedVersion,
            Some("x"),
            "version 2",
        ),
        (
            r#"{"v":1,"id":"x"}"#,
            ErrorCode::BadRequest,
            Some("x"),
            "`op` is missing",
        ),
        (
            r#"{"v":1,"id":"x","op":"dance"}"#,
            ErrorCode::UnknownOp,
            Some("x"),
            "unknown op `dance`",
        ),
        (
            r#"{"v":1,"id":"x","op":"connect"}"#,
            ErrorCode::BadRequest,
            Some("x"),
            "`peer` is missing",
        ),
        (
            r#"{"v":1,"id":"x","op":"connect","peer":"Qm"}"#,
            ErrorCode::BadRequest,
            Some("x"),
            "not a peer ID",
        ),
        (
            r#"{"v":1,"id":"x","op":"listen","proto":"sctp"}"#,
            ErrorCode::BadRequest,
            Some("x"),
            "`tcp` or `udp`",
        ),
        (
            r#"{"v":1,"id":"x","op":"listen","service":"a b"}"#,
            ErrorCode::BadRequest,
            Some("x"),
            "`service`",
        ),
        (
            r#"{"v":1,"id":"x","op":"listen","service":5}"#,
            ErrorCode::BadRequest,
            Some("x"),
            "must be a string",
        ),
        (
            r#"{"v":1,"id":"x","op":"respond","offer":""}"#,
            ErrorCode::BadRequest,
            Some("x"),
            "`offer`",
        ),
    ] {
        let r = rejected(line);
        assert_eq!(r.code, code, "{line}: {r}");
        assert_eq!(r.id.as_deref(), id, "{line}");
        assert!(r.message.contains(says), "{line}: {}", r.message);
        let reply = String::from_utf8(r.reply().to_line()).expect("utf-8");
        let back: Reply = serde_json::from_str(&reply).expect("the error is a reply");
        assert_eq!(back.id, id.unwrap_or_default());
    }
}

#[test]
fn a_line_too_long_is_reported_once_and_the_next_line_reads() {
    let mut reader = LineReader::default();
    let long = vec![b'x'; MAX_LINE + 10];
    let mut lines = Vec::new();
    // Fed in small pieces, as a socket delivers them.
    for chunk in long.chunks(4096) {
        lines.extend(reader.push(chunk));
        assert!(
            reader.buffered() <= MAX_LINE + 1,
            "the reader holds at most one line"
        );
    }
    lines.extend(reader.push(b"\n{\"v\":1,\"op\":\"status\"}\r\n{\"v\":1,"));
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0], Line::TooLong);
    assert_eq!(
        rejection(&lines[0]).map(|r| r.code),
        Some(ErrorCode::TooLarge)
    );
    let Line::Text(status) = &lines[1] else {
        panic!("a line")
    };
    assert_eq!(parse_request(status).map(|r| r.op), Ok(Op::Status));
    assert!(rejection(&lines[1]).is_none());
    assert_eq!(reader.buffered(), 7, "the unfinished line waits");
    // A line of exactly the maximum is a line.
    let mut exact = vec![b' '; MAX_LINE];
    exact.push(b'\n');
    assert!(matches!(reader.push(b"\n").as_slice(), [Line::Text(_)]));
    assert!(matches!(reader.push(&exact).as_slice(), [Line::Text(t)] if t.len() == MAX_LINE));
}

#[test]
fn events_are_lines_an_application_reads_back() {
    let events = [
        Event::Progress {
            technique: Technique::UdpPunch,
            step: "probing".into(),
            detail: "to 203.0.113.7:41000".into(),
        },
        Event::Offer {
            offer: "b2ZmZXI".into(),
        },
        Event::Ok {
            technique: Technique::TcpSimultaneousOpen,
            direct: true,
            remote: "203.0.113.7:41000".into(),
            rtt_ms: Some(12.5),
            fd: true,
        },
        Event::Error {
            code: ErrorCode::PeerOffline,
            message: "no reservation".into(),
        },
        Event::Status {
            peer: PEER.into(),
            version: VERSION,
            reservations: vec![],
            nat: None,
            nat_source: Some("behaviour from flags".into()),
            mappings: vec![],
            techniques: vec![Technique::Direct, Technique::Relay],
        },
    ];
    for event in events {
        let reply = Reply {
            id: "a1".into(),
            event,
        };
        let line = reply.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        let back: Reply = serde_json::from_slice(&line).expect("reads back");
        assert_eq!(back, reply);
    }
    let ok = Reply {
        id: "a1".into(),
        event: Event::Ok {
            technique: Technique::Relay,
            direct: false,
            remote: "relay".into(),
            rtt_ms: None,
            fd: true,
        },
    };
    assert_eq!(
        String::from_utf8(ok.to_line()).expect("utf-8"),
        "{\"id\":\"a1\",\"event\":\"ok\",\"technique\":\"relay\",\"direct\":false,\"remote\":\"relay\",\"fd\":true}\n"
    );
}

#[test]
fn no_bytes_make_the_reader_or_the_parser_panic() {
    // A cheap stand-in for the fuzz target (`fuzz/fuzz_targets/daemon_api.rs`).
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pieces: [&[u8]; 8] = [
        b"{\"v\":1,\"op\":\"connect\",\"peer\":",
        b"\"12D3KooW\"",
        b"\n",
        b"\xff\xfe",
        b"{\"v\":1e400,\"op\":\"status\"}",
        b"\"id\":\"\\u0000\"",
        b"[[[[[[[[[[[[",
        b"}",
    ];
    let mut reader = LineReader::default();
    for _ in 0..20_000 {
        let piece = pieces[(next() % 8) as usize];
        for line in reader.push(piece) {
            let _ = rejection(&line);
        }
    }
}

#[test]
fn the_session_in_the_spec_is_what_the_code_reads_and_writes() {
    let spec = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/daemon-api.md"
    ));
    let requests: Vec<&str> = spec.lines().filter_map(|l| l.strip_prefix("→ ")).collect();
    assert_eq!(requests.len(), 3, "the example session");
    assert!(matches!(
        parse_request(requests[0].as_bytes()).map(|r| r.op),
        Ok(Op::Connect {
            proto: Proto::Tcp,
            ..
        })
    ));
    assert_eq!(
        parse_request(requests[1].as_bytes()).map(|r| r.op),
        Ok(Op::Status)
    );
    let rejected = parse_request(requests[2].as_bytes()).expect_err("dance");
    let written = String::from_utf8(rejected.reply().to_line()).expect("utf-8");
    let answer = spec
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("← "))
        .expect("an answer");
    assert_eq!(
        written.trim_end(),
        answer,
        "the spec shows the daemon's own words"
    );
    // The events shown read as events.
    for line in spec.lines().filter_map(|l| l.strip_prefix("← ")) {
        let json = line.split("   (+").next().unwrap_or(line).replace('…', "");
        let reply: Result<Reply, _> = serde_json::from_str(&json);
        assert!(reply.is_ok(), "{line}: {reply:?}");
    }
}

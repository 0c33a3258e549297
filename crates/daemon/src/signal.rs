//! The daemons' own protocol: what two daemons say to each other over a relayed libp2p stream
//! before they hand their applications a socket.
//!
//! The connecting daemon (the initiator) opens a stream with [`PROTOCOL`] to the remote daemon
//! through a relay both hold reservations on, and sends [`Message::Hello`]: the service and
//! transport its application wants, a random token, what it knows of its NAT and its
//! candidates (the addresses each technique will use). The remote daemon (the responder) answers
//! [`Message::Welcome`] with its own, or [`Message::Refuse`]. Both start the techniques at once;
//! the initiator decides which socket wins and says so with [`Message::Chose`], or
//! [`Message::UseRelay`], after which the stream itself carries the application's bytes (for
//! UDP, datagrams framed by `bridge`).
//!
//! Messages are JSON objects, one per line, at most [`MAX_MESSAGE`] bytes. [`MessageReader`]
//! cuts them out of the stream's bytes without reading past the last one asked for, so that the
//! bytes after [`Message::UseRelay`] reach the application intact. [`decode`] never panics.

use std::net::SocketAddr;

use behaviour::{Filtering, Mapping, PortAllocation};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::api::{ErrorCode, MAX_NAME, Proto, Technique};

/// The protocol of the daemons' stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/natpunch/daemon/1.0.0");
/// The longest message line, newline excluded.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// The most candidates one technique may offer.
pub const MAX_CANDIDATES: usize = 16;
/// The service a hello names when it answers an offer (`initiate`/`respond`); its token is the
/// offer's.
pub const OFFER_SERVICE: &str = "offer";

/// What `initiate` hands the application to carry to the other end's `respond`: how to reach
/// this daemon (its peer ID and relayed addresses), the transport, and the token that lets the
/// other daemon in once. Applications treat it as an opaque string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The version of this format: 1.
    pub v: u8,
    /// The initiating daemon's peer ID.
    pub peer: String,
    /// Its relayed addresses (`…/p2p-circuit/p2p/<peer>`), at most [`MAX_CANDIDATES`].
    pub relayed: Vec<String>,
    /// The socket's transport.
    pub proto: Proto,
    /// 32 hex digits.
    pub token: String,
}

impl Offer {
    /// The offer as the string an application carries.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The offer `text` stands for, checked.
    ///
    /// # Errors
    ///
    /// It is not an offer a natpunch daemon of this version wrote.
    pub fn parse(text: &str) -> Result<Parsed, Invalid> {
        let offer: Self = serde_json::from_str(text)
            .map_err(|e| Invalid(format!("not an offer from a natpunch daemon: {e}")))?;
        if offer.v != 1 {
            return Err(Invalid(format!(
                "an offer of version {}; this daemon reads 1",
                offer.v
            )));
        }
        if offer.relayed.len() > MAX_CANDIDATES {
            return Err(Invalid(format!(
                "more than {MAX_CANDIDATES} relayed addresses"
            )));
        }
        let token = parse_token(&offer.token)
            .ok_or_else(|| Invalid("the token must be 32 hex digits".into()))?;
        let peer = offer
            .peer
            .parse()
            .map_err(|_| Invalid(format!("`{}` is not a peer ID", offer.peer)))?;
        let relayed = offer
            .relayed
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| Invalid(format!("`{a}` is not a multiaddr")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Parsed {
            peer,
            relayed,
            proto: offer.proto,
            token,
        })
    }
}

/// An offer, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The initiating daemon.
    pub peer: libp2p::PeerId,
    /// Its relayed addresses.
    pub relayed: Vec<libp2p::Multiaddr>,
    /// The socket's transport.
    pub proto: Proto,
    /// The token.
    pub token: [u8; 16],
}

/// What an end knows of its NAT (RFC 4787), `None` when unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NatInfo {
    /// How its NAT maps.
    #[serde(default)]
    pub mapping: Option<Mapping>,
    /// How its NAT filters.
    #[serde(default)]
    pub filtering: Option<Filtering>,
    /// How its NAT picks the external port of a new mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_allocation: Option<PortAllocation>,
    /// The step between consecutive mappings' ports, for sequential allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_delta: Option<i32>,
}

/// The addresses an end's techniques use, each list the remote's targets for that technique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidates {
    /// UDP hole punching.
    #[serde(default)]
    pub udp: Vec<SocketAddr>,
    /// Plain TCP simultaneous open.
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// TCP simultaneous open with a low-TTL first SYN.
    #[serde(default)]
    pub nutss: Vec<SocketAddr>,
    /// The end's direct port as its router maps it, for the connection's transport: the other
    /// end may dial it straight (`direct`, or `reversal` seen from this end).
    #[serde(default)]
    pub direct: Vec<SocketAddr>,
    /// Where this end's NAT will most likely put its next UDP mapping, when it maps per
    /// destination and allocates ports sequentially: the other end probes from there first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_next: Option<SocketAddr>,
    /// This end takes part in birthday probing (`false`: it was turned off here).
    #[serde(default = "yes")]
    pub birthday: bool,
}

fn yes() -> bool {
    true
}

impl Default for Candidates {
    fn default() -> Self {
        Self {
            udp: Vec::new(),
            tcp: Vec::new(),
            nutss: Vec::new(),
            direct: Vec::new(),
            udp_next: None,
            birthday: true,
        }
    }
}

impl Candidates {
    /// The list for `technique` (empty for the ones without candidates).
    pub fn of(&self, technique: Technique) -> &[SocketAddr] {
        match technique {
            Technique::UdpPunch | Technique::UdpBirthday => &self.udp,
            Technique::TcpSimultaneousOpen => &self.tcp,
            Technique::TcpNutss => &self.nutss,
            Technique::Direct | Technique::Reversal => &self.direct,
            Technique::Relay => &[],
        }
    }
}

/// One message between two daemons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// The initiator's request.
    Hello {
        /// The service the application wants on the remote daemon.
        service: String,
        /// The socket's transport.
        proto: Proto,
        /// 32 hex digits, shared by both ends' techniques.
        token: String,
        /// The initiator's NAT.
        nat: NatInfo,
        /// The initiator's candidates.
        candidates: Candidates,
    },
    /// The responder accepts.
    Welcome {
        /// The responder's NAT.
        nat: NatInfo,
        /// The responder's candidates.
        candidates: Candidates,
    },
    /// The responder refuses.
    Refuse {
        /// Why, for programs (`no-service`, …).
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// The initiator's application got the socket `technique` made; the responder hands its
    /// application the socket of the same technique. The stream ends after it.
    Chose {
        /// The technique.
        technique: Technique,
    },
    /// Nothing direct worked: from the next byte on, the stream carries the applications'
    /// bytes.
    UseRelay,
}

/// Why a message line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(String);

/// The message on `line` (without its newline), checked: service name, token, candidate counts.
///
/// # Errors
///
/// What is wrong with it.
pub fn decode(line: &[u8]) -> Result<Message, Invalid> {
    if line.len() > MAX_MESSAGE {
        return Err(Invalid(format!(
            "a message of more than {MAX_MESSAGE} bytes"
        )));
    }
    let message: Message =
        serde_json::from_slice(line).map_err(|e| Invalid(format!("not a message: {e}")))?;
    let check = |c: &Candidates| {
        if [&c.udp, &c.tcp, &c.nutss, &c.direct]
            .iter()
            .any(|l| l.len() > MAX_CANDIDATES)
        {
            return Err(Invalid(format!(
                "more than {MAX_CANDIDATES} candidates for one technique"
            )));
        }
        Ok(())
    };
    match &message {
        Message::Hello {
            service,
            token,
            candidates,
            ..
        } => {
            if !valid_service(service) {
                return Err(Invalid(format!(
                    "the service must be 1 to {MAX_NAME} characters of A-Z a-z 0-9 . _ -"
                )));
            }
            if parse_token(token).is_none() {
                return Err(Invalid("the token must be 32 hex digits".into()));
            }
            check(candidates)?;
        }
        Message::Welcome { candidates, .. } => check(candidates)?,
        Message::Refuse { message, .. } if message.len() > 1024 => {
            return Err(Invalid(
                "a refusal's message of more than 1,024 bytes".into(),
            ));
        }
        _ => {}
    }
    Ok(message)
}

/// `message` as a line, newline included.
pub fn encode(message: &Message) -> Vec<u8> {
    // Every field serialises (no maps with non-string keys, no floats).
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Whether `service` is a valid service name.
pub fn valid_service(service: &str) -> bool {
    !service.is_empty()
        && service.len() <= MAX_NAME
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The token's hex form.
pub fn token_hex(token: &[u8; 16]) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token a hex form stands for.
pub fn parse_token(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut token = [0u8; 16];
    for (i, b) in token.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(token)
}

/// Cuts message lines out of a byte stream, keeping what follows the last one.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: Vec<u8>,
}

impl MessageReader {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one is buffered.
    ///
    /// # Errors
    ///
    /// The line is invalid, or no newline came within [`MAX_MESSAGE`] bytes (the stream is then
    /// of no use).
    pub fn next_message(&mut self) -> Result<Option<Message>, Invalid> {
        match self.buf.iter().position(|b| *b == b'\n') {
            Some(end) => {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                decode(line).map(Some)
            }
            None if self.buf.len() > MAX_MESSAGE => {
                Err(Invalid(format!("no line end within {MAX_MESSAGE} bytes")))
            }
            None => Ok(None),
        }
    }

    /// The bytes after the last message taken (the first of the relayed data).
    pub fn into_rest(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello {
            service: "ssh".into(),
            proto: Proto::Tcp,
            token: token_hex(&[7; 16]),
            nat: NatInfo {
                mapping: Some(Mapping::EndpointIndependent),
                filtering: None,
                port_allocation: Some(PortAllocation::Sequential),
                port_delta: Some(1),
            },
            candidates: Candidates {
                udp: vec![],
                tcp: vec!["11.0.0.2:4000".parse().expect("addr")],
                nutss: vec!["11.0.0.2:4001".parse().expect("addr")],
                direct: vec!["11.0.0.2:4002".parse().expect("addr")],
                udp_next: Some("11.0.0.2:4004".parse().expect("addr")),
                birthday: false,
            },
        }
    }

    #[test]
    fn messages_round_trip_and_the_bytes_after_the_last_one_are_kept() {
        let mut r = MessageReader::default();
        let mut bytes = encode(&hello());
        bytes.extend(encode(&Message::UseRelay));
        bytes.extend(b"app data\n");
        // Byte by byte: nothing is lost at any cut.
        for b in &bytes[..bytes.len() - 3] {
            r.push(std::slice::from_ref(b));
        }
        assert_eq!(r.next_message(), Ok(Some(hello())));
        assert_eq!(r.next_message(), Ok(Some(Message::UseRelay)));
        r.push(&bytes[bytes.len() - 3..]);
        assert_eq!(r.into_rest(), b"app data\n");
    }

    #[test]
    fn a_hello_without_the_hard_nat_fields_reads_as_one_that_takes_part() {
        let mut h = serde_json::to_value(hello()).expect("json");
        for field in ["udp_next", "birthday"] {
            h["candidates"]
                .as_object_mut()
                .expect("object")
                .remove(field);
        }
        for field in ["port_allocation", "port_delta"] {
            h["nat"].as_object_mut().expect("object").remove(field);
        }
        let Ok(Message::Hello {
            nat, candidates, ..
        }) = decode(h.to_string().as_bytes())
        else {
            panic!("not read: {h}");
        };
        assert!(candidates.birthday);
        assert_eq!(candidates.udp_next, None);
        assert_eq!((nat.port_allocation, nat.port_delta), (None, None));
    }

    #[test]
    fn bad_lines_are_refused_with_the_reason() {
        let refused = |line: &str| decode(line.as_bytes()).expect_err(line).0;
        assert!(refused("{").starts_with("not a message"));
        assert!(refused(r#"{"type":"dance"}"#).contains("unknown variant"));
        let mut h = serde_json::to_value(hello()).expect("json");
        h["token"] = "xyz".into();
        assert_eq!(refused(&h.to_string()), "the token must be 32 hex digits");
        h["token"] = token_hex(&[1; 16]).into();
        h["service"] = "a b".into();
        assert!(refused(&h.to_string()).starts_with("the service must be"));
        h["service"] = "ok".into();
        h["candidates"]["udp"] = vec!["1.2.3.4:5"; MAX_CANDIDATES + 1].into();
        assert!(refused(&h.to_string()).contains("candidates"));
        let mut r = MessageReader::default();
        r.push(&vec![b'x'; MAX_MESSAGE + 1]);
        assert!(r.next_message().is_err());
    }

    /// A cheap stand-in for the fuzz target `daemon_signal`: random lines, and bytes cut
    /// into random chunks, never panic the parser or the reader.
    #[test]
    fn random_bytes_never_panic_and_what_parses_round_trips() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = encode(&hello());
        for _ in 0..2000 {
            let mut bytes = good.clone();
            // Flip a few bytes of a valid message, or take random ones.
            for _ in 0..(next() % 4) {
                let at = usize::try_from(next()).unwrap_or(0) % bytes.len();
                bytes[at] = u8::try_from(next() % 256).unwrap_or(0);
            }
            if next() % 3 == 0 {
                bytes = (0..next() % 64)
                    .map(|_| u8::try_from(next() % 256).unwrap_or(0))
                    .collect();
            }
            if let Ok(m) = decode(bytes.strip_suffix(b"\n").unwrap_or(&bytes)) {
                let line = encode(&m);
                assert_eq!(decode(line.strip_suffix(b"\n").unwrap_or(&line)), Ok(m));
            }
            let mut r = MessageReader::default();
            for chunk in bytes.chunks(usize::try_from(next() % 7 + 1).unwrap_or(1)) {
                r.push(chunk);
                while let Ok(Some(_)) = r.next_message() {}
            }
        }
    }

    #[test]
    fn offers_read_back_and_bad_ones_say_why() {
        let peer = libp2p::PeerId::random();
        let relayed: libp2p::Multiaddr =
            format!("/ip4/11.0.0.1/tcp/4001/p2p/{peer}/p2p-circuit/p2p/{peer}")
                .parse()
                .expect("addr");
        let offer = Offer {
            v: 1,
            peer: peer.to_string(),
            relayed: vec![relayed.to_string()],
            proto: Proto::Udp,
            token: token_hex(&[5; 16]),
        };
        assert_eq!(
            Offer::parse(&offer.to_text()),
            Ok(Parsed {
                peer,
                relayed: vec![relayed],
                proto: Proto::Udp,
                token: [5; 16]
            })
        );
        let refused = |text: String| Offer::parse(&text).expect_err("refused").0;
        assert!(refused("hello".into()).starts_with("not an offer"));
        let mut v = serde_json::to_value(&offer).expect("json");
        v["v"] = 2.into();
        assert!(refused(v.to_string()).contains("version 2"));
        v["v"] = 1.into();
        v["token"] = "zz".into();
        assert!(refused(v.to_string()).contains("token"));
        v["token"] = token_hex(&[5; 16]).into();
        v["peer"] = "nobody".into();
        assert!(refused(v.to_string()).contains("not a peer ID"));
    }

    #[test]
    fn tokens_read_back_and_bad_ones_do_not() {
        let t = [0xab; 16];
        assert_eq!(parse_token(&token_hex(&t)), Some(t));
        assert_eq!(parse_token("ab"), None);
        assert_eq!(parse_token(&"é".repeat(16)), None);
        assert_eq!(parse_token(&"g".repeat(32)), None);
    }
}

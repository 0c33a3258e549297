//! The application API: JSON lines over the daemon's Unix stream socket (`docs/daemon-api.md`).
//!
//! An application writes requests, one JSON object per line, each with the API version (`v`),
//! an `id` of its choosing and an `op`; the daemon answers with events, one per line, each
//! carrying the `id` of the request it answers. An `ok` event that hands over a socket carries
//! `"fd": true` and the descriptor itself as `SCM_RIGHTS` data on the same write.
//!
//! This module is the sans-IO half: [`LineReader`] cuts a byte stream into lines of at most
//! [`MAX_LINE`] bytes (a longer one is reported once and skipped, and the next line is read
//! normally), [`parse_request`] turns a line into a [`Request`] or a [`Rejected`] that says
//! precisely what is wrong, and [`Reply::to_line`] writes an event. None of them panics, on any
//! bytes.

use std::fmt;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The API version this daemon speaks.
pub const VERSION: u64 = 1;
/// The longest request line, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// The longest request `id` and service name.
pub const MAX_NAME: usize = 64;
/// The longest offer an application may hand to `respond`.
pub const MAX_OFFER: usize = 16 * 1024;

/// The transport of the socket an application wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// A connected TCP socket (`SOCK_STREAM`).
    Tcp,
    /// A connected UDP socket (`SOCK_DGRAM`).
    Udp,
}

impl Proto {
    /// `tcp` or `udp`, as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A request from an application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The application's name for it, echoed in every event that answers it.
    pub id: String,
    /// What it asks.
    pub op: Op,
}

/// What an application asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A socket connected to `service` on `peer`, found through the daemon's relays.
    Connect {
        /// The remote daemon.
        peer: PeerId,
        /// The socket's transport.
        proto: Proto,
        /// The service on the remote daemon (an application listening there).
        service: String,
    },
    /// A socket for each connection the remote daemons make to `service`.
    Listen {
        /// The service name.
        service: String,
        /// The sockets' transport.
        proto: Proto,
    },
    /// For applications with their own rendezvous: this end's offer, to be forwarded to the
    /// other end's `respond`; the socket follows once it responded.
    Initiate {
        /// The socket's transport.
        proto: Proto,
    },
    /// The other end's offer, forwarded by the application.
    Respond {
        /// The offer, as the other end's daemon wrote it (opaque to the application).
        offer: String,
    },
    /// Stop the request `target` of this connection.
    Cancel {
        /// Its id.
        target: String,
    },
    /// The daemon's identity, relays, NAT behaviour, mappings and techniques.
    Status,
}

/// How a technique or a request failed, for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The line is not a request (not JSON, not an object, a field missing or of the wrong
    /// type).
    BadRequest,
    /// The line is longer than [`MAX_LINE`].
    TooLarge,
    /// `v` is not a version this daemon speaks.
    UnsupportedVersion,
    /// `op` is not one this daemon knows.
    UnknownOp,
    /// The peer has no reservation on any of this daemon's relays.
    PeerOffline,
    /// The remote daemon has no application listening on the service.
    NoService,
    /// This daemon has no relay reservation (yet).
    NoRelay,
    /// Nothing worked in time, the relay included.
    Timeout,
    /// The application cancelled it.
    Cancelled,
    /// The socket file or the operation is not permitted to this user.
    NotPermitted,
    /// The daemon failed.
    Internal,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

/// A way to a connected socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Technique {
    /// A plain dial of the remote's reachable (or mapped) address.
    Direct,
    /// The remote dials this end's reachable address.
    Reversal,
    /// UDP hole punching: both ends send to each other's candidates.
    UdpPunch,
    /// TCP simultaneous open: both ends connect to each other at once.
    TcpSimultaneousOpen,
    /// NUTSS: a low-TTL SYN opens this end's NAT, then the remote connects.
    TcpNutss,
    /// Birthday probing (UDP): the end whose NAT maps endpoint-independently probes random
    /// ports of the other end's address while the other, behind a NAT that picks a port per
    /// destination, opens many mappings towards it.
    UdpBirthday,
    /// A relayed stream, bridged to a local socket pair: always works, never direct.
    Relay,
}

/// What the daemon tells an application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A step of a technique.
    Progress {
        /// The technique.
        technique: Technique,
        /// The step (`candidates-sent`, `probing`, `dialing`, `failed`, …).
        step: String,
        /// What happened, for people.
        detail: String,
    },
    /// `initiate`'s answer: the offer to forward to the other end's `respond`.
    Offer {
        /// Opaque to the application.
        offer: String,
    },
    /// A socket: the descriptor travels with this line when `fd` is true.
    Ok {
        /// The technique that gave it.
        technique: Technique,
        /// Whether the socket reaches the remote directly (false: through a relay).
        direct: bool,
        /// The remote address the socket is connected to (the relay's, when relayed).
        remote: String,
        /// The round trip measured while connecting, in milliseconds.
        #[serde(skip_serializing_if = "Option::is_none")]
        rtt_ms: Option<f64>,
        /// The descriptor is attached.
        fd: bool,
    },
    /// The request failed, or the line was no request.
    Error {
        /// For programs.
        code: ErrorCode,
        /// For people.
        message: String,
    },
    /// `status`'s answer.
    Status {
        /// This daemon's peer ID.
        peer: String,
        /// The API version.
        version: u64,
        /// Its relayed addresses, one per relay it holds a reservation on.
        reservations: Vec<String>,
        /// Its NAT's mapping and filtering behaviour, once known.
        #[serde(skip_serializing_if = "Option::is_none")]
        nat: Option<String>,
        /// Where that knowledge came from: the daemon's flags, its RFC 5780 check, or (the
        /// mapping only) what relays at two or more addresses observed; likewise the port
        /// allocation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nat_source: Option<String>,
        /// The port mappings it holds on the router.
        mappings: Vec<String>,
        /// The techniques it tries, in the order it tries them against an unknown remote.
        techniques: Vec<Technique>,
    },
}

/// An event for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The request's id (empty when the line was no request with an id).
    pub id: String,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

impl Reply {
    /// The line to write, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|e| {
            // Only a non-finite rtt could fail; say so rather than write nothing.
            format!(
                r#"{{"id":"","event":"error","code":"internal","message":"{}"}}"#,
                e.to_string().replace('"', "'")
            )
            .into_bytes()
        });
        line.push(b'\n');
        line
    }
}

/// A line that is no request the daemon can serve: the error event to answer it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejected {
    /// The request's id, when the line had a readable one.
    pub id: Option<String>,
    /// For programs.
    pub code: ErrorCode,
    /// For people: what is wrong, naming the field.
    pub message: String,
}

impl Rejected {
    fn new(id: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id: id.map(str::to_owned),
            code,
            message: message.into(),
        }
    }

    /// The error event that answers the line.
    pub fn reply(&self) -> Reply {
        Reply {
            id: self.id.clone().unwrap_or_default(),
            event: Event::Error {
                code: self.code,
                message: self.message.clone(),
            },
        }
    }
}

/// Reads one request line (without its newline). Fields the daemon does not know are ignored,
/// so a newer application can talk to an older daemon of the same version.
///
/// # Errors
///
/// [`Rejected`], naming the field and what is wrong with it.
pub fn parse_request(line: &[u8]) -> Result<Request, Rejected> {
    if line.len() > MAX_LINE {
        return Err(Rejected::new(
            None,
            ErrorCode::TooLarge,
            format!("a request line may have at most {MAX_LINE} bytes"),
        ));
    }
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| Rejected::new(None, ErrorCode::BadRequest, format!("not JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(Rejected::new(
            None,
            ErrorCode::BadRequest,
            "a request is a JSON object",
        ));
    };
    let id = match fields.get("id") {
        None => String::new(),
        Some(Value::String(id)) if id.len() <= MAX_NAME => id.clone(),
        Some(_) => {
            return Err(Rejected::new(
                None,
                ErrorCode::BadRequest,
                format!("`id` must be a string of at most {MAX_NAME} bytes"),
            ));
        }
    };
    let r = Fields {
        id: &id,
        fields: &fields,
    };
    match fields.get("v") {
        Some(v) if v.as_u64() == Some(VERSION) => {}
        Some(v) => {
            return Err(r.reject(
                ErrorCode::UnsupportedVersion,
                format!("version {v} is not spoken here; this daemon speaks {VERSION}"),
            ));
        }
        None => return Err(r.reject(ErrorCode::BadRequest, "`v` (the API version) is missing")),
    }
    let op = match r.string("op")? {
        "connect" => Op::Connect {
            peer: r
                .string("peer")?
                .parse()
                .map_err(|_| r.reject(ErrorCode::BadRequest, "`peer` is not a peer ID"))?,
            proto: r.proto()?,
            service: r.service()?,
        },
        "listen" => Op::Listen {
            service: r.service()?,
            proto: r.proto()?,
        },
        "initiate" => Op::Initiate { proto: r.proto()? },
        "respond" => {
            let offer = r.string("offer")?;
            if offer.is_empty() || offer.len() > MAX_OFFER {
                return Err(r.reject(
                    ErrorCode::BadRequest,
                    format!("`offer` must have 1 to {MAX_OFFER} bytes"),
                ));
            }
            Op::Respond {
                offer: offer.to_owned(),
            }
        }
        "cancel" => Op::Cancel {
            target: r.string("target")?.to_owned(),
        },
        "status" => Op::Status,
        other => {
            return Err(r.reject(
                ErrorCode::UnknownOp,
                format!(
                    "unknown op `{}` (connect, listen, initiate, respond, cancel, status)",
                    other.chars().take(MAX_NAME).collect::<String>()
                ),
            ));
        }
    };
    Ok(Request { id, op })
}

/// A request's fields, with its id for the errors.
struct Fields<'a> {
    id: &'a str,
    fields: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn reject(&self, code: ErrorCode, message: impl Into<String>) -> Rejected {
        Rejected::new(Some(self.id), code, message)
    }

    fn string(&self, name: &str) -> Result<&str, Rejected> {
        match self.fields.get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => {
                Err(self.reject(ErrorCode::BadRequest, format!("`{name}` must be a string")))
            }
            None => Err(self.reject(ErrorCode::BadRequest, format!("`{name}` is missing"))),
        }
    }

    /// `proto`: `tcp` (the default) or `udp`.
    fn proto(&self) -> Result<Proto, Rejected> {
        if !self.fields.contains_key("proto") {
            return Ok(Proto::Tcp);
        }
        match self.string("proto")? {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(self.reject(ErrorCode::BadRequest, "`proto` must be `tcp` or `udp`")),
        }
    }

    /// `service`: 1 to [`MAX_NAME`] of `A-Z a-z 0-9 . _ -`; `default` when absent.
    fn service(&self) -> Result<String, Rejected> {
        if !self.fields.contains_key("service") {
            return Ok("default".to_owned());
        }
        let s = self.string("service")?;
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(s.to_owned())
        } else {
            Err(self.reject(
                ErrorCode::BadRequest,
                format!("`service` must be 1 to {MAX_NAME} of A-Z a-z 0-9 . _ -"),
            ))
        }
    }
}

/// One line cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line, without its newline (or `\r\n`).
    Text(Vec<u8>),
    /// A line longer than [`MAX_LINE`]: its bytes were dropped as they came.
    TooLong,
}

/// Cuts a byte stream into lines, holding at most [`MAX_LINE`] bytes of an unfinished one.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Inside a line that is too long: drop until its newline.
    skipping: bool,
}

impl LineReader {
    /// Takes `bytes` as they were read; the lines they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            let (part, tail) = rest.split_at(end);
            self.take(part);
            lines.push(self.finish());
            rest = tail.get(1..).unwrap_or_default();
        }
        self.take(rest);
        lines
    }

    /// Bytes of an unfinished line held now.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, part: &[u8]) {
        if self.skipping {
            return;
        }
        if self.buf.len() + part.len() > MAX_LINE + 1 {
            self.buf = Vec::new();
            self.skipping = true;
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    fn finish(&mut self) -> Line {
        if std::mem::take(&mut self.skipping) {
            return Line::TooLong;
        }
        let mut line = std::mem::take(&mut self.buf);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > MAX_LINE {
            return Line::TooLong;
        }
        Line::Text(line)
    }
}

/// What the daemon answers a line with when it is no request: the too-large error, or
/// [`parse_request`]'s.
pub fn rejection(line: &Line) -> Option<Rejected> {
    match line {
        Line::TooLong => Some(Rejected::new(
            None,
            ErrorCode::TooLarge,
            format!("a request line may have at most {MAX_LINE} bytes"),
        )),
        Line::Text(text) => parse_request(text).err(),
    }
}

#[cfg(test)]
mod tests;

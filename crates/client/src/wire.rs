//! The API's lines, sans IO: request lines written, event lines read, and the descriptors that
//! come with `ok` lines matched to them (`docs/daemon-api.md`).
//!
//! [`EventReader`] takes what each `recvmsg` returned (bytes, and at most one descriptor) and
//! gives the events the bytes complete, each `ok` with the descriptor that came with the first
//! bytes of its line. It holds at most [`MAX_EVENT_LINE`] bytes of an unfinished line and at
//! most one descriptor, whatever the bytes; nothing here panics on any input.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::defaults::{MAX_EVENT_LINE, SHOWN_LINE};

/// The API version this client speaks.
pub const VERSION: u64 = 1;

/// The transport of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// A connected TCP socket (`SOCK_STREAM`).
    Tcp,
    /// A connected UDP socket (`SOCK_DGRAM`).
    Udp,
}

impl Proto {
    /// The name on the wire: `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request this client writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A socket connected to `service` on the daemon `peer`.
    Connect {
        /// The remote daemon's peer ID.
        peer: String,
        /// The socket's transport.
        proto: Proto,
        /// The service on the remote daemon.
        service: String,
    },
    /// A socket per incoming connection to `service`.
    Listen {
        /// The service.
        service: String,
        /// The sockets' transport.
        proto: Proto,
    },
    /// An offer for the other end's `respond`, and later the socket.
    Initiate {
        /// The socket's transport.
        proto: Proto,
    },
    /// The other end's offer, carried by the application.
    Respond {
        /// The offer as the other end's daemon wrote it.
        offer: String,
    },
    /// Ends the running request `target` of this connection.
    Cancel {
        /// Its id.
        target: String,
    },
    /// The daemon's status.
    Status,
}

impl Request {
    /// The request's line with `id`, newline included.
    pub fn to_line(&self, id: &str) -> Vec<u8> {
        let mut fields = Map::new();
        fields.insert("v".into(), VERSION.into());
        fields.insert("id".into(), id.into());
        let mut put = |name: &str, value: &str| {
            fields.insert(name.into(), value.into());
        };
        match self {
            Self::Connect {
                peer,
                proto,
                service,
            } => {
                put("op", "connect");
                put("peer", peer);
                put("proto", proto.as_str());
                put("service", service);
            }
            Self::Listen { service, proto } => {
                put("op", "listen");
                put("service", service);
                put("proto", proto.as_str());
            }
            Self::Initiate { proto } => {
                put("op", "initiate");
                put("proto", proto.as_str());
            }
            Self::Respond { offer } => {
                put("op", "respond");
                put("offer", offer);
            }
            Self::Cancel { target } => {
                put("op", "cancel");
                put("target", target);
            }
            Self::Status => put("op", "status"),
        }
        // A map of strings and a number always serializes.
        let mut line = Value::Object(fields).to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

/// An event, with the id of the request it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The request's id (empty when the daemon answers a line that was no request).
    pub id: String,
    /// The event.
    pub event: Event,
}

/// What the daemon tells the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A step of a technique.
    Progress(Progress),
    /// `initiate`'s offer, to forward to the other end.
    Offer {
        /// Opaque to the application.
        offer: String,
    },
    /// A socket: the descriptor travels with this line when its `fd` is true.
    Ok(Ready),
    /// The request failed, or the line was no request.
    Error {
        /// For programs (`peer-offline`, `timeout`, …).
        code: String,
        /// For people.
        message: String,
    },
    /// `status`'s answer.
    Status(Status),
    /// An event this client does not know (from a newer daemon): skipped.
    Unknown {
        /// Its `event` field.
        event: String,
    },
}

impl Event {
    /// The `event` field's value.
    pub fn name(&self) -> &str {
        match self {
            Self::Progress(_) => "progress",
            Self::Offer { .. } => "offer",
            Self::Ok(_) => "ok",
            Self::Error { .. } => "error",
            Self::Status(_) => "status",
            Self::Unknown { event } => event,
        }
    }
}

/// A step of a technique, as the daemon reports it while it connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The technique (`udp-punch`, `tcp-simultaneous-open`, `relay`, …).
    pub technique: String,
    /// The step (`candidates-sent`, `probing`, `dialing`, `failed`, …).
    pub step: String,
    /// What happened, for people.
    pub detail: String,
}

impl fmt::Display for Progress {
    /// `technique: step: detail`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.technique, self.step, self.detail)
    }
}

/// The `ok` event's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// The technique that gave the socket.
    pub technique: String,
    /// Whether the socket reaches the remote directly (false: through a relay).
    pub direct: bool,
    /// The address the socket is connected to (the relay's, when relayed).
    pub remote: String,
    /// The round trip measured while connecting, in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// A descriptor travels with the line.
    pub fd: bool,
}

/// The daemon's identity, relays, NAT behaviour, mappings and techniques.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's peer ID: what other applications pass to `connect`.
    pub peer: String,
    /// The API version it speaks.
    pub version: u64,
    /// Its relayed addresses, one per relay it holds a reservation on.
    #[serde(default)]
    pub reservations: Vec<String>,
    /// Its NAT's mapping and filtering behaviour, once known.
    #[serde(default)]
    pub nat: Option<String>,
    /// Where that came from (the daemon's flags, its RFC 5780 check, relays' observations).
    #[serde(default)]
    pub nat_source: Option<String>,
    /// The port mappings it holds on the router.
    #[serde(default)]
    pub mappings: Vec<String>,
    /// The techniques it tries.
    #[serde(default)]
    pub techniques: Vec<String>,
}

/// A line that is no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct BadLine {
    /// What is wrong with it, naming the field.
    pub reason: String,
}

impl BadLine {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Reads one event line (without its newline). Fields the client does not know are ignored;
/// an event it does not know is [`Event::Unknown`].
///
/// # Errors
///
/// [`BadLine`] when the line is not JSON, not an object, or an event's field is missing or of
/// the wrong type.
pub fn parse_event(line: &[u8]) -> Result<Reply, BadLine> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| BadLine::new(format!("not JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(BadLine::new("an event is a JSON object"));
    };
    let id = match fields.get("id") {
        None => String::new(),
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err(BadLine::new("`id` must be a string")),
    };
    let name = match fields.get("event") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(BadLine::new("`event` must be a string")),
        None => return Err(BadLine::new("`event` is missing")),
    };
    let body = Value::Object(fields);
    let typed = |what: &str| {
        let what = what.to_owned();
        move |e: serde_json::Error| BadLine::new(format!("a `{what}` event: {e}"))
    };
    let event = match name.as_str() {
        "progress" => Event::Progress(Progress::deserialize(&body).map_err(typed(&name))?),
        "ok" => Event::Ok(Ready::deserialize(&body).map_err(typed(&name))?),
        "status" => Event::Status(Status::deserialize(&body).map_err(typed(&name))?),
        "offer" => {
            #[derive(Deserialize)]
            struct Offer {
                offer: String,
            }
            let Offer { offer } = Offer::deserialize(&body).map_err(typed(&name))?;
            Event::Offer { offer }
        }
        "error" => {
            #[derive(Deserialize)]
            struct Error {
                code: String,
                message: String,
            }
            let Error { code, message } = Error::deserialize(&body).map_err(typed(&name))?;
            Event::Error { code, message }
        }
        _ => Event::Unknown { event: name },
    };
    Ok(Reply { id, event })
}

/// What [`EventReader::push`] gives for each line the bytes complete.
#[derive(Debug)]
pub enum Incoming<F> {
    /// An event; `fd` is the descriptor of an `ok` line whose `fd` is true.
    Event {
        /// The event.
        reply: Reply,
        /// Its descriptor.
        fd: Option<F>,
    },
    /// A line that is no event, cut to [`SHOWN_LINE`] bytes for showing.
    BadLine {
        /// What is wrong.
        reason: BadLine,
        /// The line's start.
        line: String,
    },
    /// A line longer than [`MAX_EVENT_LINE`]: its bytes were dropped as they came.
    TooLong,
    /// An `ok` line that says a descriptor comes with it, and none came.
    MissingFd {
        /// The event.
        reply: Reply,
    },
}

/// A descriptor received with the bytes at stream offsets `start..end`.
#[derive(Debug)]
struct Received<F> {
    start: u64,
    end: u64,
    fd: F,
}

/// Cuts the daemon's byte stream into events and gives each `ok` line the descriptor that came
/// with its first bytes. `F` is the descriptor type (`OwnedFd`; anything in tests).
///
/// The rule, from the API: the descriptor arrives with the read that holds the first bytes of
/// its `ok` line, and that read may hold other lines too. So a descriptor belongs to the `ok`
/// line (with `"fd": true`) that starts within the bytes it came with; one that no such line
/// claims is dropped (closed) as soon as no line can claim it any more.
#[derive(Debug)]
pub struct EventReader<F> {
    /// The unfinished line.
    buf: Vec<u8>,
    /// Inside a line that is too long: drop until its newline.
    skipping: bool,
    /// Bytes taken so far: the stream offset of the next byte.
    offset: u64,
    /// The stream offset where the unfinished line starts.
    line_start: u64,
    /// Descriptors waiting for their line: at most one between pushes.
    fds: VecDeque<Received<F>>,
}

impl<F> Default for EventReader<F> {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            skipping: false,
            offset: 0,
            line_start: 0,
            fds: VecDeque::new(),
        }
    }
}

impl<F> EventReader<F> {
    /// Takes what one read returned: `bytes`, and the descriptor that came with them. Gives
    /// what the lines they complete say, in order.
    pub fn push(&mut self, bytes: &[u8], fd: Option<F>) -> Vec<Incoming<F>> {
        let start = self.offset;
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let end = start.saturating_add(len);
        if let Some(fd) = fd
            && !bytes.is_empty()
        {
            self.fds.push_back(Received { start, end, fd });
        }
        let mut out = Vec::new();
        let mut rest = bytes;
        let mut at = start;
        while let Some(newline) = rest.iter().position(|b| *b == b'\n') {
            let (part, tail) = rest.split_at(newline);
            self.take(part);
            let line_start = self.line_start;
            at = at.saturating_add(u64::try_from(newline).unwrap_or(u64::MAX) + 1);
            self.line_start = at;
            if let Some(incoming) = self.finish(line_start) {
                out.push(incoming);
            }
            rest = tail.get(1..).unwrap_or_default();
        }
        self.take(rest);
        self.offset = end;
        // Only the unfinished line can still claim a descriptor, and only one that came with
        // the read its first bytes came in.
        let line_start = self.line_start;
        self.fds
            .retain(|r| r.start <= line_start && line_start < r.end);
        out
    }

    /// Bytes of an unfinished line held now.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Descriptors held for a line not complete yet (at most one).
    pub fn held_fds(&self) -> usize {
        self.fds.len()
    }

    fn take(&mut self, part: &[u8]) {
        if self.skipping {
            return;
        }
        if self.buf.len() + part.len() > MAX_EVENT_LINE + 1 {
            self.buf = Vec::new();
            self.skipping = true;
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    /// The line that started at `line_start` is complete.
    fn finish(&mut self, line_start: u64) -> Option<Incoming<F>> {
        if std::mem::take(&mut self.skipping) {
            return Some(Incoming::TooLong);
        }
        let mut line = std::mem::take(&mut self.buf);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > MAX_EVENT_LINE {
            return Some(Incoming::TooLong);
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let reply = match parse_event(&line) {
            Ok(reply) => reply,
            Err(reason) => {
                let shown = line.get(..SHOWN_LINE).unwrap_or(&line);
                return Some(Incoming::BadLine {
                    reason,
                    line: String::from_utf8_lossy(shown).into_owned(),
                });
            }
        };
        let wants_fd = matches!(&reply.event, Event::Ok(ready) if ready.fd);
        if !wants_fd {
            return Some(Incoming::Event { reply, fd: None });
        }
        // Descriptors of reads that ended before this line started belong to no line.
        while self.fds.front().is_some_and(|r| r.end <= line_start) {
            self.fds.pop_front();
        }
        match self.fds.front() {
            Some(r) if r.start <= line_start => {
                let fd = self.fds.pop_front().map(|r| r.fd);
                Some(Incoming::Event { reply, fd })
            }
            _ => Some(Incoming::MissingFd { reply }),
        }
    }
}

#[cfg(test)]
mod tests;

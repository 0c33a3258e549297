//! natpunch-client: a blocking client of the natpunch daemon's application API
//! (`docs/daemon-api.md`, version 1). An application asks its local daemon for a socket
//! connected to a service of another daemon, named by that daemon's peer ID; the daemon
//! punches through both NATs when it can and relays when it cannot, and hands over a connected
//! TCP or UDP socket as a file descriptor. The application then owns a plain
//! [`std::net::TcpStream`] or [`std::net::UdpSocket`].
//!
//! ```no_run
//! use std::io::{Read as _, Write as _};
//!
//! let mut client = natpunch_client::Client::connect_default()?;
//! let mut stream = client.connect_tcp("12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN", "echo")?;
//! stream.write_all(b"hello")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What it does:
//! - [`Client`]: reaches the daemon's Unix socket (its default path, or one given), writes
//!   requests (`connect`, `listen`, `status`) and reads their events, each `ok` with the
//!   descriptor that came with it ([`wire::EventReader`], sans IO);
//! - [`Listener`]: one [`Connection`] per connection that remote applications make to a
//!   service;
//! - [`bridge`]: what a netcat-like tool does with a connected socket (copy it to and from
//!   standard input and output, run a command on it, pass it on to OpenSSH); the
//!   `natpunch connect` and `natpunch accept` commands are built on it.
//!
//! The example `examples/echo.rs` is a complete application: `echo listen [SERVICE]` serves an
//! echo service through the local daemon, `echo connect PEER [SERVICE]` sends its standard
//! input to a peer's echo service and prints what comes back (`cargo run -p natpunch-client
//! --example echo -- listen`).
//!
//! What it does not do: NAT traversal itself (the daemon does that), `initiate`/`respond`
//! (applications with their own rendezvous), several requests at once on one connection (one
//! [`Client`] serves one request at a time; open another for another), or async IO. It depends
//! neither on the daemon nor on libp2p: the few types of the API are written here from the
//! document.

pub mod bridge;
pub mod defaults;
pub mod fd;
pub mod wire;

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::net::{TcpStream, UdpSocket};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::SockType;

use wire::{Event, EventReader, Incoming, Ready, Reply, Request};
pub use wire::{Progress, Proto, Status};

/// What went wrong between the application and its daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon answers on the socket.
    #[error(
        "no natpunch daemon listens on {}: start one with `natpunch daemon --relay <relay multiaddr>`",
        path.display()
    )]
    NotRunning {
        /// The socket's path.
        path: PathBuf,
    },
    /// This user may not open the socket.
    #[error(
        "{} is not open to this user: the socket is mode 0660, so run as the daemon's user or join its group",
        path.display()
    )]
    NotPermitted {
        /// The socket's path.
        path: PathBuf,
    },
    /// Reaching the socket failed otherwise.
    #[error("connecting to {}: {cause}", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: io::Error,
    },
    /// Reading or writing the daemon's socket failed.
    #[error("reading or writing the daemon's socket: {0}")]
    Io(io::Error),
    /// The daemon closed the connection (it stopped, or ended the request by closing).
    #[error("the natpunch daemon closed the connection")]
    Closed,
    /// The daemon answered the request with an error.
    #[error("{code}: {message}")]
    Daemon {
        /// For programs (`peer-offline`, `no-service`, `timeout`, …).
        code: String,
        /// For people.
        message: String,
    },
    /// The daemon sent a line that is no event.
    #[error("the daemon sent a line that is no event ({reason}): {line}")]
    BadLine {
        /// What is wrong with it.
        reason: String,
        /// Its first bytes.
        line: String,
    },
    /// The daemon sent a line longer than the client holds.
    #[error("the daemon sent a line longer than {limit} bytes")]
    LineTooLong {
        /// The longest line the client holds.
        limit: usize,
    },
    /// An `ok` came without the socket it announces, or announced none.
    #[error("the daemon's `ok` for request `{id}` came without a socket")]
    MissingFd {
        /// The request.
        id: String,
    },
    /// The descriptor is not the kind of socket asked for.
    #[error("the daemon handed over {found} for a {expected} connection")]
    WrongSocket {
        /// The transport asked for.
        expected: Proto,
        /// What the descriptor is.
        found: String,
    },
    /// The daemon answered the request with an event that does not answer it.
    #[error("the daemon answered request `{id}` with an unexpected `{event}` event")]
    Unexpected {
        /// The request.
        id: String,
        /// The event's name.
        event: String,
    },
}

impl ClientError {
    /// The daemon's error code, when the daemon refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Daemon { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The API socket for user `uid`, given `$XDG_RUNTIME_DIR`, as the daemon places it:
/// `/run/natpunch/daemon.sock` for root, `$XDG_RUNTIME_DIR/natpunch/daemon.sock` for other
/// users, `/tmp/natpunch-<uid>/daemon.sock` when that variable is unset.
pub fn default_path(uid: u32, runtime_dir: Option<&Path>) -> PathBuf {
    let dir = match (uid, runtime_dir) {
        (0, _) => PathBuf::from("/run/natpunch"),
        (_, Some(dir)) => dir.join("natpunch"),
        (_, None) => PathBuf::from(format!("/tmp/natpunch-{uid}")),
    };
    dir.join("daemon.sock")
}

/// [`default_path`] for this process's user and environment.
pub fn default_socket() -> PathBuf {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    default_path(nix::unistd::getuid().as_raw(), runtime.as_deref())
}

/// A socket the daemon handed over.
#[derive(Debug)]
pub enum Socket {
    /// A connected stream socket. When relayed it is one end of a Unix socket pair that the
    /// daemon bridges to the relay: reads, writes and `shutdown` work, `peer_addr` does not.
    Tcp(TcpStream),
    /// A connected datagram socket (`send`/`recv`). When relayed, one end of a Unix datagram
    /// socket pair, as above.
    Udp(UdpSocket),
}

impl Socket {
    /// Wraps `fd`, checking that it is the kind of socket `proto` asks for.
    fn new(fd: OwnedFd, proto: Proto) -> Result<Self, ClientError> {
        match (proto, fd::socket_type(&fd)) {
            (Proto::Tcp, Some(SockType::Stream)) => Ok(Self::Tcp(TcpStream::from(fd))),
            (Proto::Udp, Some(SockType::Datagram)) => Ok(Self::Udp(UdpSocket::from(fd))),
            (expected, found) => Err(ClientError::WrongSocket {
                expected,
                found: match found {
                    None => "a descriptor that is no socket".to_owned(),
                    Some(t) => format!("a socket of type {t:?}"),
                },
            }),
        }
    }

    /// Its transport.
    pub fn proto(&self) -> Proto {
        match self {
            Self::Tcp(_) => Proto::Tcp,
            Self::Udp(_) => Proto::Udp,
        }
    }

    /// The descriptor.
    pub fn into_fd(self) -> OwnedFd {
        match self {
            Self::Tcp(s) => s.into(),
            Self::Udp(s) => s.into(),
        }
    }
}

/// A connected socket and how the daemon got it.
#[derive(Debug)]
pub struct Connection {
    /// The socket; the application owns it, and closing it ends the connection.
    pub socket: Socket,
    /// The technique that gave it (`direct`, `udp-punch`, `relay`, …).
    pub technique: String,
    /// Whether it reaches the remote directly (false: through a relay).
    pub direct: bool,
    /// The address it is connected to (the relay's, when relayed).
    pub remote: String,
    /// The round trip measured while connecting, in milliseconds.
    pub rtt_ms: Option<f64>,
}

impl Connection {
    fn new(ready: Ready, fd: OwnedFd, proto: Proto) -> Result<Self, ClientError> {
        Ok(Self {
            socket: Socket::new(fd, proto)?,
            technique: ready.technique,
            direct: ready.direct,
            remote: ready.remote,
            rtt_ms: ready.rtt_ms,
        })
    }

    /// `via <technique> (direct|relayed) <word> <remote>`, for people; `word` is `to` or
    /// `from`.
    pub fn describe(&self, word: &str) -> String {
        let how = if self.direct { "direct" } else { "relayed" };
        format!("via {} ({how}) {word} {}", self.technique, self.remote)
    }
}

/// An `initiate` waiting for the other end's `respond`.
#[derive(Debug)]
pub struct Initiated {
    client: Client,
    id: String,
    proto: Proto,
}

impl Initiated {
    /// Waits for the other end to respond; the socket connected to it.
    ///
    /// # Errors
    ///
    /// [`ClientError::Daemon`] when the connection failed; the connection's errors otherwise.
    pub fn wait(mut self) -> Result<Connection, ClientError> {
        let (id, proto) = (self.id.clone(), self.proto);
        self.client.until_connected(id, proto, |_| {})
    }
}

/// A connection to the local daemon. One request at a time: a call writes its request and
/// reads events until the request's answer.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    reader: EventReader<OwnedFd>,
    ready: VecDeque<Incoming<OwnedFd>>,
    /// Where `recvmsg` reads to.
    buf: Vec<u8>,
    next_id: u64,
}

impl Client {
    /// Reaches the daemon at its default socket ([`default_socket`]).
    ///
    /// # Errors
    ///
    /// As [`Client::connect`].
    pub fn connect_default() -> Result<Self, ClientError> {
        Self::connect(default_socket())
    }

    /// Reaches the daemon at `path`.
    ///
    /// # Errors
    ///
    /// [`ClientError::NotRunning`] when no daemon answers there (with how to start one),
    /// [`ClientError::NotPermitted`] when this user may not open the socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref().to_owned();
        let stream = match UnixStream::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                return Err(match e.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                        ClientError::NotRunning { path }
                    }
                    io::ErrorKind::PermissionDenied => ClientError::NotPermitted { path },
                    _ => ClientError::Connect { path, cause: e },
                });
            }
        };
        Ok(Self::from_stream(stream, path))
    }

    /// Talks to the daemon over `stream`, already connected to its socket at `path` (a socket
    /// handed down by a supervisor, say).
    pub fn from_stream(stream: UnixStream, path: impl Into<PathBuf>) -> Self {
        Self {
            stream,
            path: path.into(),
            reader: EventReader::default(),
            ready: VecDeque::new(),
            buf: vec![0; defaults::READ_CHUNK],
            next_id: 0,
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A socket connected to `service` on the daemon `peer` (its peer ID, `12D3KooW…`), found
    /// through the relays both daemons hold reservations on. `on_progress` sees each step of
    /// the techniques as the daemon tries them.
    ///
    /// # Errors
    ///
    /// [`ClientError::Daemon`] with the daemon's code (`peer-offline`, `no-service`,
    /// `timeout`, …) when it found no way; the connection's errors otherwise.
    pub fn connect_peer(
        &mut self,
        peer: &str,
        proto: Proto,
        service: &str,
        on_progress: impl FnMut(&Progress),
    ) -> Result<Connection, ClientError> {
        let id = self.send(&Request::Connect {
            peer: peer.to_owned(),
            proto,
            service: service.to_owned(),
        })?;
        self.until_connected(id, proto, on_progress)
    }

    /// For applications with a rendezvous of their own: an offer to carry to the other end's
    /// [`Client::respond`], and an [`Initiated`] that gives the socket once it responded. It
    /// takes this connection to the daemon; closing it withdraws the offer.
    ///
    /// # Errors
    ///
    /// [`ClientError::Daemon`] when the daemon cannot make an offer (`no-relay`); the
    /// connection's errors otherwise.
    pub fn initiate(mut self, proto: Proto) -> Result<(String, Initiated), ClientError> {
        let id = self.send(&Request::Initiate { proto })?;
        loop {
            let (reply, _) = self.next_for(&id)?;
            match reply.event {
                Event::Offer { offer } => {
                    return Ok((
                        offer,
                        Initiated {
                            client: self,
                            id,
                            proto,
                        },
                    ));
                }
                Event::Error { code, message } => {
                    return Err(ClientError::Daemon { code, message });
                }
                Event::Unknown { .. } | Event::Progress(_) => {}
                other => {
                    return Err(ClientError::Unexpected {
                        id,
                        event: other.name().to_owned(),
                    });
                }
            }
        }
    }

    /// Answers the other end's `offer` (from its [`Client::initiate`], carried by the
    /// application): a socket connected to it, progress as with [`Client::connect_peer`].
    ///
    /// # Errors
    ///
    /// As [`Client::connect_peer`]; `bad-request` for an offer no daemon wrote.
    pub fn respond(
        &mut self,
        offer: &str,
        on_progress: impl FnMut(&Progress),
    ) -> Result<Connection, ClientError> {
        let proto = serde_json::from_str::<serde_json::Value>(offer)
            .ok()
            .and_then(|v| v["proto"].as_str().map(str::to_owned))
            .map_or(
                Proto::Tcp,
                |p| if p == "udp" { Proto::Udp } else { Proto::Tcp },
            );
        let id = self.send(&Request::Respond {
            offer: offer.to_owned(),
        })?;
        self.until_connected(id, proto, on_progress)
    }

    /// Reads request `id`'s events until its socket or its error.
    fn until_connected(
        &mut self,
        id: String,
        proto: Proto,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<Connection, ClientError> {
        loop {
            let (reply, fd) = self.next_for(&id)?;
            match reply.event {
                Event::Progress(p) => on_progress(&p),
                Event::Ok(ready) => {
                    let fd = fd.ok_or_else(|| ClientError::MissingFd { id: id.clone() })?;
                    return Connection::new(ready, fd, proto);
                }
                Event::Error { code, message } => {
                    return Err(ClientError::Daemon { code, message });
                }
                Event::Unknown { .. } => {}
                other => {
                    return Err(ClientError::Unexpected {
                        id,
                        event: other.name().to_owned(),
                    });
                }
            }
        }
    }

    /// A TCP stream connected to `service` on `peer`.
    ///
    /// # Errors
    ///
    /// As [`Client::connect_peer`].
    pub fn connect_tcp(&mut self, peer: &str, service: &str) -> Result<TcpStream, ClientError> {
        match self.connect_peer(peer, Proto::Tcp, service, |_| {})?.socket {
            Socket::Tcp(s) => Ok(s),
            Socket::Udp(_) => Err(ClientError::WrongSocket {
                expected: Proto::Tcp,
                found: "a datagram socket".to_owned(),
            }),
        }
    }

    /// A connected UDP socket to `service` on `peer`.
    ///
    /// # Errors
    ///
    /// As [`Client::connect_peer`].
    pub fn connect_udp(&mut self, peer: &str, service: &str) -> Result<UdpSocket, ClientError> {
        match self.connect_peer(peer, Proto::Udp, service, |_| {})?.socket {
            Socket::Udp(s) => Ok(s),
            Socket::Tcp(_) => Err(ClientError::WrongSocket {
                expected: Proto::Udp,
                found: "a stream socket".to_owned(),
            }),
        }
    }

    /// Listens on `service`: the [`Listener`] gives a connection for each remote application
    /// that connects to it. It takes this connection to the daemon; closing it stops
    /// listening.
    ///
    /// # Errors
    ///
    /// The connection's errors while the request is written.
    pub fn listen(mut self, service: &str, proto: Proto) -> Result<Listener, ClientError> {
        let id = self.send(&Request::Listen {
            service: service.to_owned(),
            proto,
        })?;
        Ok(Listener {
            client: self,
            id,
            proto,
            done: false,
        })
    }

    /// The daemon's identity, relays, NAT behaviour, mappings and techniques.
    ///
    /// # Errors
    ///
    /// [`ClientError::Daemon`] when it refused; the connection's errors otherwise.
    pub fn status(&mut self) -> Result<Status, ClientError> {
        let id = self.send(&Request::Status)?;
        loop {
            let (reply, _) = self.next_for(&id)?;
            match reply.event {
                Event::Status(status) => return Ok(status),
                Event::Error { code, message } => {
                    return Err(ClientError::Daemon { code, message });
                }
                Event::Unknown { .. } | Event::Progress(_) => {}
                other => {
                    return Err(ClientError::Unexpected {
                        id,
                        event: other.name().to_owned(),
                    });
                }
            }
        }
    }

    /// Writes `request` with a fresh id; the id.
    fn send(&mut self, request: &Request) -> Result<String, ClientError> {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        self.stream
            .write_all(&request.to_line(&id))
            .map_err(ClientError::Io)?;
        Ok(id)
    }

    /// The next event for request `id` (others are answers to requests given up: skipped,
    /// their descriptors closed).
    fn next_for(&mut self, id: &str) -> Result<(Reply, Option<OwnedFd>), ClientError> {
        loop {
            match self.next_incoming()? {
                Incoming::Event { reply, fd } if reply.id == id => return Ok((reply, fd)),
                Incoming::Event { .. } => {}
                Incoming::MissingFd { reply } if reply.id == id => {
                    return Err(ClientError::MissingFd { id: reply.id });
                }
                Incoming::MissingFd { .. } => {}
                Incoming::BadLine { reason, line } => {
                    return Err(ClientError::BadLine {
                        reason: reason.reason,
                        line,
                    });
                }
                Incoming::TooLong => {
                    return Err(ClientError::LineTooLong {
                        limit: defaults::MAX_EVENT_LINE,
                    });
                }
            }
        }
    }

    fn next_incoming(&mut self) -> Result<Incoming<OwnedFd>, ClientError> {
        loop {
            if let Some(incoming) = self.ready.pop_front() {
                return Ok(incoming);
            }
            let (n, fd) = match fd::recv_with_fd(self.stream.as_fd(), &mut self.buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::Io(e)),
            };
            if n == 0 {
                return Err(ClientError::Closed);
            }
            let bytes = self.buf.get(..n).unwrap_or_default();
            self.ready.extend(self.reader.push(bytes, fd));
        }
    }
}

/// Incoming connections to a service: one [`Connection`] per `ok` the daemon sends.
#[derive(Debug)]
pub struct Listener {
    client: Client,
    id: String,
    proto: Proto,
    done: bool,
}

impl Listener {
    /// Waits for the next connection.
    ///
    /// # Errors
    ///
    /// [`ClientError::Daemon`] when the daemon ended the listening (e.g. `bad-request` for a
    /// service name it refuses); [`ClientError::Closed`] when the daemon went away. A
    /// connection whose descriptor is missing or of the wrong kind is an error too, and the
    /// listener goes on.
    pub fn accept(&mut self) -> Result<Connection, ClientError> {
        loop {
            let (reply, fd) = self.client.next_for(&self.id)?;
            match reply.event {
                Event::Ok(ready) => {
                    let fd = fd.ok_or_else(|| ClientError::MissingFd {
                        id: self.id.clone(),
                    })?;
                    return Connection::new(ready, fd, self.proto);
                }
                Event::Error { code, message } => {
                    self.done = true;
                    return Err(ClientError::Daemon { code, message });
                }
                Event::Progress(_) | Event::Unknown { .. } => {}
                other => {
                    return Err(ClientError::Unexpected {
                        id: self.id.clone(),
                        event: other.name().to_owned(),
                    });
                }
            }
        }
    }

    /// The service's transport.
    pub fn proto(&self) -> Proto {
        self.proto
    }
}

impl Iterator for Listener {
    type Item = Result<Connection, ClientError>;

    /// The next connection; `None` once the daemon ended the listening or the connection to it
    /// broke (after the error that said so).
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.accept();
        if matches!(
            next,
            Err(ClientError::Closed
                | ClientError::Io(_)
                | ClientError::Daemon { .. }
                | ClientError::LineTooLong { .. }
                | ClientError::BadLine { .. })
        ) {
            self.done = true;
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests;

//! The daemon's direct port: one TCP and UDP port that the router maps (PCP, NAT-PMP or UPnP
//! IGD), so that a remote daemon can dial this one straight, whatever its own NAT.
//!
//! A connection waiting for such a dial registers its token ([`Waiters::expect`]); the accept
//! loops here read what arrives (a TCP hello, a UDP probe: the techniques' own wire), find the
//! waiting connection by the token, finish the greeting and hand it the socket. Anything with no
//! waiting token is dropped. A UDP dialer gets its answer from a socket connected to it on the
//! same port (Linux gives a connected socket the datagrams of its peer), which is the one handed
//! over.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natcheck::reflector::shared;
use socket2::{Protocol, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, oneshot};

use crate::technique::Side;
use crate::technique::tcp::{CHOSEN, HELLO_LEN, Hello};
use crate::technique::udp::{Datagram, Kind};

/// Tokens waited for at once.
const MAX_WAITERS: usize = 256;
/// TCP greetings being read at once.
const MAX_GREETINGS: usize = 32;
/// How long a dialer may take to send its hello.
const HELLO_WAIT: Duration = Duration::from_secs(2);
/// How long the initiator's choice may take to come.
const CHOICE_WAIT: Duration = Duration::from_secs(10);

/// What a waiting connection gets: a TCP stream or a UDP socket connected to the dialer.
#[derive(Debug)]
pub(super) enum Dialed {
    Tcp(std::net::TcpStream, SocketAddr),
    Udp(std::net::UdpSocket, SocketAddr),
}

struct Waiter {
    side: Side,
    tx: oneshot::Sender<Dialed>,
}

/// The connections waiting for a dial on the direct port, by token.
#[derive(Default)]
pub(super) struct Waiters(Mutex<HashMap<[u8; 16], Waiter>>);

impl Waiters {
    /// Waits for a dial with `token`; this end is `side` of the connection. `None` when too
    /// many wait already.
    pub(super) fn expect(self: &Arc<Self>, token: [u8; 16], side: Side) -> Option<Expected> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.0.lock().ok()?;
        map.retain(|_, w| !w.tx.is_closed());
        if map.len() >= MAX_WAITERS {
            return None;
        }
        map.insert(token, Waiter { side, tx });
        Some(Expected {
            waiters: Arc::clone(self),
            token,
            rx: Some(rx),
        })
    }

    fn take(&self, token: &[u8; 16]) -> Option<Waiter> {
        self.0.lock().ok()?.remove(token)
    }
}

/// A registered wait; it is withdrawn when dropped.
pub(super) struct Expected {
    waiters: Arc<Waiters>,
    token: [u8; 16],
    rx: Option<oneshot::Receiver<Dialed>>,
}

impl Expected {
    /// The dialed socket, when it comes.
    pub(super) fn take(&mut self) -> Option<oneshot::Receiver<Dialed>> {
        self.rx.take()
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        if let Ok(mut map) = self.waiters.0.lock() {
            map.remove(&self.token);
        }
    }
}

/// The direct port, bound for TCP and UDP.
pub(super) struct DirectPort {
    pub(super) port: u16,
    tcp: TcpListener,
    udp: UdpSocket,
}

impl DirectPort {
    /// Binds a free port for both TCP and UDP.
    pub(super) fn bind() -> io::Result<Self> {
        let mut last = io::Error::other("no port");
        for _ in 0..16 {
            let tcp = shared(0, Type::STREAM, Protocol::TCP)?;
            let port = tcp.local_addr()?.as_socket().map_or(0, |a| a.port());
            match shared(port, Type::DGRAM, Protocol::UDP) {
                Ok(udp) => {
                    tcp.listen(64)?;
                    return Ok(Self {
                        port,
                        tcp: TcpListener::from_std(tcp.into())?,
                        udp: UdpSocket::from_std(udp.into())?,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Serves the port for as long as the daemon runs.
    pub(super) async fn serve(self, waiters: Arc<Waiters>) {
        let greetings = Arc::new(Semaphore::new(MAX_GREETINGS));
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, from)) => {
                        let Ok(permit) = Arc::clone(&greetings).try_acquire_owned() else {
                            continue;
                        };
                        let waiters = Arc::clone(&waiters);
                        tokio::spawn(async move {
                            greet(stream, from, &waiters).await;
                            drop(permit);
                        });
                    }
                    // EMFILE and the like: wait rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                received = self.udp.recv_from(&mut buf) => {
                    if let Ok((n, from)) = received {
                        answer(self.port, from, buf.get(..n).unwrap_or_default(), &waiters);
                    }
                }
            }
        }
    }
}

/// A dialer's TCP connection: its hello, ours, the initiator's choice, then the waiting
/// connection gets it.
async fn greet(mut stream: TcpStream, from: SocketAddr, waiters: &Waiters) {
    let mut theirs = [0u8; HELLO_LEN];
    if !matches!(
        tokio::time::timeout(HELLO_WAIT, stream.read_exact(&mut theirs)).await,
        Ok(Ok(_))
    ) {
        return;
    }
    let Ok(hello) = Hello::decode(&theirs) else {
        return;
    };
    let Some(waiter) = waiters.take(&hello.token) else {
        return;
    };
    if hello.side != waiter.side.other() {
        return;
    }
    let ours = Hello {
        token: hello.token,
        side: waiter.side,
    };
    if stream.write_all(&ours.encode()).await.is_err() {
        return;
    }
    let chosen = match waiter.side {
        Side::Initiator => stream.write_all(&[CHOSEN]).await.is_ok(),
        Side::Responder => {
            let mut byte = [0u8; 1];
            matches!(
                tokio::time::timeout(CHOICE_WAIT, stream.read_exact(&mut byte)).await,
                Ok(Ok(_))
            ) && byte[0] == CHOSEN
        }
    };
    if !chosen {
        return;
    }
    let Ok(stream) = stream.into_std() else {
        return;
    };
    if stream.set_nonblocking(false).is_ok() {
        let _ = stream.set_nodelay(true);
        let _ = waiter.tx.send(Dialed::Tcp(stream, from));
    }
}

/// A dialer's UDP probe: a socket on the direct port connected to it answers (an ack, and a
/// probe of our own, so that the dialer finishes at once) and goes to the waiting connection.
fn answer(port: u16, from: SocketAddr, bytes: &[u8], waiters: &Waiters) {
    let Ok(probe) = Datagram::decode(bytes) else {
        return;
    };
    if probe.kind != Kind::Probe {
        return;
    }
    let Some(waiter) = waiters.take(&probe.token) else {
        return;
    };
    let connected = || -> io::Result<std::net::UdpSocket> {
        let socket = shared(port, Type::DGRAM, Protocol::UDP)?;
        socket.connect(&from.into())?;
        let socket: std::net::UdpSocket = socket.into();
        for kind in [Kind::Ack, Kind::Probe] {
            let datagram = Datagram {
                kind,
                token: probe.token,
                seq: probe.seq,
            };
            socket.send(&datagram.encode())?;
        }
        socket.set_nonblocking(false)?;
        Ok(socket)
    };
    if let Ok(socket) = connected() {
        let _ = waiter.tx.send(Dialed::Udp(socket, from));
    }
}

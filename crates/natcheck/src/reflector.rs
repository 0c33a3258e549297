//! A plain STUN reflector and its client: which external address a NAT gave one local port.
//!
//! [`Reflector`] answers Binding requests over UDP and TCP on one address with the address they
//! came from ([`stun::server::reflect`]); `natpunch relay` runs one on its STUN port. The
//! client side, [`mapped_udp`] and [`mapped_tcp`], asks from a given local port (shared with
//! SO_REUSEADDR and SO_REUSEPORT, so a hole punch can use the same port next), which is what a
//! daemon behind a NAT that does not keep ports needs to tell its peer the right one.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// TCP connections served at once; more are closed at accept.
const MAX_TCP_CONNECTIONS: usize = 64;
/// How long a TCP connection may stay without a complete request.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest request taken (a Binding request is well under 100 bytes).
const MAX_MESSAGE: usize = 1280;
/// The client's first retransmission timeout over UDP; doubled once.
const RTO: Duration = Duration::from_millis(200);

/// A bound reflector.
#[derive(Debug)]
pub struct Reflector {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl Reflector {
    /// Binds UDP and TCP on `addr`.
    ///
    /// # Errors
    ///
    /// Binding either.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self {
            udp: UdpSocket::bind(addr).await?,
            tcp: TcpListener::bind(addr).await?,
        })
    }

    /// The UDP address it answers on.
    ///
    /// # Errors
    ///
    /// The socket's.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Answers until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut connections = JoinSet::new();
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            tokio::select! {
                received = self.udp.recv_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    if let Some(answer) = stun::server::reflect(buf.get(..n).unwrap_or_default(), from) {
                        let _ = self.udp.send_to(&answer, from).await;
                    }
                }
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, from)) if connections.len() < MAX_TCP_CONNECTIONS => {
                        connections.spawn(serve_tcp(stream, from));
                    }
                    Ok(_) => {}
                    // EMFILE and the like: wait rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => break,
            }
        }
    }
}

/// Answers one TCP connection's requests until it closes, idles or sends garbage.
async fn serve_tcp(mut stream: TcpStream, from: SocketAddr) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, read_message(&mut stream, &mut buf)).await
        else {
            return;
        };
        let Some(answer) = stun::server::reflect(buf.get(..len).unwrap_or_default(), from) else {
            return;
        };
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Reads one STUN message (header, then the length it gives) into `buf`; its length.
async fn read_message(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let header = buf
        .get_mut(..stun::message::HEADER_LEN)
        .ok_or_else(|| io::Error::other("buffer too small"))?;
    stream.read_exact(header).await?;
    let body = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let len = stun::message::HEADER_LEN + body;
    let rest = buf
        .get_mut(stun::message::HEADER_LEN..len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a message too long"))?;
    stream.read_exact(rest).await?;
    Ok(len)
}

/// A non-blocking socket of `kind` bound to `0.0.0.0:port`, sharing the port with others
/// (SO_REUSEADDR and SO_REUSEPORT): how the daemon's techniques use one port for several
/// sockets.
///
/// # Errors
///
/// Making or binding the socket.
pub fn shared(port: u16, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, kind, Some(protocol))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    Ok(socket)
}

fn transaction_id() -> [u8; 12] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_be_bytes();
    let mut id = [0u8; 12];
    id.copy_from_slice(nanos.get(4..).unwrap_or(&[0; 12]));
    id[0] ^= u8::try_from(std::process::id() % 251).unwrap_or(0);
    id
}

/// The external address a NAT gave UDP port `port` towards `server`, asked from that port
/// (two sends, 200 and 400 ms apart, then it gives up).
///
/// # Errors
///
/// No answer, or the socket's.
pub async fn mapped_udp(port: u16, server: SocketAddr) -> io::Result<SocketAddr> {
    let socket = UdpSocket::from_std(shared(port, Type::DGRAM, Protocol::UDP)?.into())?;
    let id = transaction_id();
    let request = stun::message::binding_request(id, None, None);
    let mut buf = vec![0u8; MAX_MESSAGE];
    for wait in [RTO, RTO * 2] {
        socket.send_to(&request, server).await?;
        let answer = async {
            loop {
                let (n, from) = socket.recv_from(&mut buf).await?;
                if from != server {
                    continue;
                }
                if let Ok(r) =
                    stun::message::parse_binding_response(buf.get(..n).unwrap_or_default())
                    && r.transaction_id == id
                {
                    return Ok::<_, io::Error>(r.mapped);
                }
            }
        };
        if let Ok(result) = tokio::time::timeout(wait, answer).await {
            return result;
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no STUN answer from {server}"),
    ))
}

/// Port prediction from two fresh mappings `a` and `b` of the same NAT, seen by a STUN server
/// in quick succession: where the NAT's next mapping is expected, when they are on one address
/// and at most [`crate::SEQUENTIAL_GAP`] ports apart (a NAT that allocates in order: the next
/// is one step above the higher); `None` otherwise (random or preserved ports).
pub fn next_mapping(a: SocketAddr, b: SocketAddr) -> Option<SocketAddr> {
    let step = a.port().abs_diff(b.port());
    if a.ip() != b.ip() || step == 0 || i32::from(step) > crate::SEQUENTIAL_GAP {
        return None;
    }
    let port = a.port().max(b.port()).checked_add(step)?;
    Some(SocketAddr::new(a.ip(), port))
}

/// Port prediction as [`next_mapping`] says, from two fresh UDP sockets' mappings towards
/// `server`, asked at once; `None` when the server does not answer or the ports are not in
/// order.
pub async fn predict_udp(server: SocketAddr) -> Option<SocketAddr> {
    let (a, b) = tokio::join!(mapped_udp(0, server), mapped_udp(0, server));
    next_mapping(a.ok()?, b.ok()?)
}

/// The external address a NAT gave TCP port `port` towards `server`, asked over a connection
/// from that port, and the connection: keep it open while the port is used, since a NAT may
/// forget a mapping whose last connection closed.
///
/// # Errors
///
/// No connection or answer within `wait`, or the socket's.
pub async fn mapped_tcp(
    port: u16,
    server: SocketAddr,
    wait: Duration,
) -> io::Result<(SocketAddr, TcpStream)> {
    let ask = async {
        let socket = tokio::net::TcpSocket::from_std_stream(
            shared(port, Type::STREAM, Protocol::TCP)?.into(),
        );
        let mut stream = socket.connect(server).await?;
        let id = transaction_id();
        stream
            .write_all(&stun::message::binding_request(id, None, None))
            .await?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let len = read_message(&mut stream, &mut buf).await?;
        let r = stun::message::parse_binding_response(buf.get(..len).unwrap_or_default())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if r.transaction_id != id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "an answer to another request",
            ));
        }
        Ok((r.mapped, stream))
    };
    tokio::time::timeout(wait, ask).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no STUN answer from {server} over TCP"),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_mapping_is_one_step_above_two_close_ones_and_nothing_else() {
        let at = |ip: [u8; 4], port| SocketAddr::from((ip, port));
        let ip = [11, 0, 0, 2];
        // In either order; the step is their distance.
        assert_eq!(next_mapping(at(ip, 4000), at(ip, 4001)), Some(at(ip, 4002)));
        assert_eq!(next_mapping(at(ip, 4001), at(ip, 4000)), Some(at(ip, 4002)));
        assert_eq!(next_mapping(at(ip, 4000), at(ip, 4002)), Some(at(ip, 4004)));
        // The same port (preserved, or one socket), a gap beyond 16, another address, or the
        // top of the range: no prediction.
        assert_eq!(next_mapping(at(ip, 4000), at(ip, 4000)), None);
        assert_eq!(next_mapping(at(ip, 4000), at(ip, 4017)), None);
        assert_eq!(next_mapping(at(ip, 4000), at([11, 0, 0, 3], 4001)), None);
        assert_eq!(next_mapping(at(ip, 65534), at(ip, 65535)), None);
    }

    #[tokio::test]
    async fn a_reflector_tells_each_port_its_address_over_udp_and_tcp() {
        let reflector = Reflector::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let udp_addr = reflector.local_addr().expect("addr");
        let tcp_addr = reflector.tcp.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        let served = tokio::spawn(reflector.run(stopped));
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free port")
            .port();
        let mapped = mapped_udp(port, udp_addr).await.expect("udp");
        assert_eq!(mapped, SocketAddr::from(([127, 0, 0, 1], port)));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free port")
            .port();
        let (mapped, _held) = mapped_tcp(port, tcp_addr, Duration::from_secs(2))
            .await
            .expect("tcp");
        assert_eq!(mapped, SocketAddr::from(([127, 0, 0, 1], port)));
        stop.send(true).expect("stop");
        served.await.expect("stopped");
        // Nobody answers: an error, not a guess.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let e = mapped_udp(0, silent.local_addr().expect("addr"))
            .await
            .expect_err("no answer");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}

#[cfg(test)]
mod check_against_a_reflector {
    use super::*;

    /// A plain reflector is no RFC 5780 server: a check against it says so and guesses
    /// nothing about filtering; on loopback it sees that nothing translates.
    #[tokio::test]
    async fn a_nat_check_against_a_reflector_tells_nothing_it_cannot_know() {
        let reflector = Reflector::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = reflector.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        let served = tokio::spawn(reflector.run(stopped));
        let report = crate::check(&crate::CheckOptions::new(addr), &|_| {})
            .await
            .expect("a report");
        assert!(!report.rfc5780);
        assert_eq!(report.nat, Some(false));
        assert_eq!(report.mapping, Some(behaviour::Mapping::None));
        assert_eq!(report.filtering, None);
        stop.send(true).expect("stop");
        served.await.expect("stopped");
    }
}

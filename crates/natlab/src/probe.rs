//! Measuring a NAT from inside the lab: a reflector on a public node and probes on a host.
//!
//! The reflector listens for UDP and TCP on every combination of two public addresses and two
//! ports. It tells each prober the address it saw the probe come from (the prober's mapping), and
//! it can send unsolicited packets or open unsolicited connections from any of its endpoints, so a
//! host behind a NAT can observe mapping, filtering, port allocation, hairpinning and mapping
//! lifetime the way RFC 4787 defines them, and how many sessions its table holds. The probe functions run inside the host's namespace
//! (use [`crate::Lab::run_in`]) and use the reflector directly; no control protocol is needed.
//!
//! UDP wire format (ASCII): the prober sends `NATLAB <nonce>`, the reflector answers
//! `NATLAB <nonce> <ip>:<port>`. TCP: the reflector writes `<ip>:<port>\n` and closes.

use std::io::{self, BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::defaults::{PROBE_REPLY_TIMEOUT, PROBE_SILENCE};
use crate::lab::{Lab, LabError};
use crate::nat::{Filtering, Mapping, NatConfig, PortAllocation, SessionOverflow, Unsolicited};
use crate::netns;

const MAGIC: &str = "NATLAB";
/// How often a reflector thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// A running reflector. Dropping it stops its threads.
#[derive(Debug)]
pub struct Reflector {
    netns: String,
    udp: Vec<Arc<UdpSocket>>,
    endpoints: Vec<SocketAddrV4>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The reflector's endpoints by role: `[ip][port]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// First address, first port: the one probes talk to.
    pub primary: SocketAddrV4,
    /// First address, second port.
    pub same_ip_other_port: SocketAddrV4,
    /// Second address, first port.
    pub other_ip: SocketAddrV4,
    /// Second address, second port.
    pub other_ip_other_port: SocketAddrV4,
}

fn reuse_socket(ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, ty, Some(protocol))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    Ok(s)
}

fn tcp_socket_bound(addr: SocketAddrV4) -> io::Result<Socket> {
    let s = reuse_socket(Type::STREAM, Protocol::TCP)?;
    s.bind(&SocketAddr::V4(addr).into())?;
    Ok(s)
}

impl Reflector {
    /// Starts a reflector on node `node` (a public host with at least two addresses), on
    /// `ports[0]` and `ports[1]` of its first two addresses.
    pub fn start(lab: &Lab, node: &str, ports: [u16; 2]) -> Result<Self, LabError> {
        let plan = lab.node(node)?;
        let addrs = &plan.uplink.addrs;
        let io_err = |e: io::Error| LabError::Io {
            what: format!("reflector on {node}"),
            source: e,
        };
        if addrs.len() < 2 {
            return Err(io_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the reflector needs a public host with `addresses = 2`",
            )));
        }
        let endpoints: Vec<SocketAddrV4> = [addrs[0], addrs[1]]
            .into_iter()
            .flat_map(|ip| ports.map(|p| SocketAddrV4::new(ip, p)))
            .collect();
        let bound = lab.run_in(node, || -> io::Result<_> {
            let mut udp = Vec::new();
            let mut tcp = Vec::new();
            for ep in &endpoints {
                let u = reuse_socket(Type::DGRAM, Protocol::UDP)?;
                u.bind(&SocketAddr::V4(*ep).into())?;
                udp.push(Arc::new(UdpSocket::from(u)));
                let t = tcp_socket_bound(*ep)?;
                t.listen(64)?;
                tcp.push(TcpListener::from(t));
            }
            Ok((udp, tcp))
        })?;
        let (udp, tcp) = bound.map_err(io_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for sock in &udp {
            let (sock, stop) = (Arc::clone(sock), Arc::clone(&stop));
            sock.set_read_timeout(Some(POLL)).map_err(io_err)?;
            threads.push(thread::spawn(move || serve_udp(&sock, &stop)));
        }
        for listener in tcp {
            let stop = Arc::clone(&stop);
            listener.set_nonblocking(true).map_err(io_err)?;
            threads.push(thread::spawn(move || serve_tcp(&listener, &stop)));
        }
        Ok(Self {
            netns: plan.netns.clone(),
            udp,
            endpoints,
            stop,
            threads,
        })
    }

    /// The reflector's endpoints by role.
    pub fn endpoints(&self) -> Endpoints {
        let e = &self.endpoints;
        Endpoints {
            primary: e[0],
            same_ip_other_port: e[1],
            other_ip: e[2],
            other_ip_other_port: e[3],
        }
    }

    /// Sends an unsolicited UDP datagram from reflector endpoint `from` to `to`.
    pub fn send_from(
        &self,
        from: SocketAddrV4,
        to: SocketAddrV4,
        payload: &[u8],
    ) -> io::Result<()> {
        let sock = self
            .endpoints
            .iter()
            .position(|e| *e == from)
            .map(|i| &self.udp[i])
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{from} is not a reflector endpoint"),
                )
            })?;
        sock.send_to(payload, to).map(drop)
    }

    /// Opens an unsolicited TCP connection from address `from` (any port) to `to`.
    pub fn connect_from(
        &self,
        from: Ipv4Addr,
        to: SocketAddrV4,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        netns::scoped(&self.netns, || {
            let s = tcp_socket_bound(SocketAddrV4::new(from, 0))?;
            s.connect_timeout(&SocketAddr::V4(to).into(), timeout)?;
            Ok(TcpStream::from(s))
        })?
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_udp(sock: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, SocketAddr::V4(from))) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(text) = std::str::from_utf8(&buf[..n]) else {
            continue;
        };
        let mut words = text.split(' ');
        if let (Some(MAGIC), Some(nonce), None) = (words.next(), words.next(), words.next()) {
            let _ = sock.send_to(format!("{MAGIC} {nonce} {from}").as_bytes(), from);
        }
    }
}

fn serve_tcp(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let _ = stream.set_nonblocking(false);
                let _ = writeln!(stream, "{from}");
                let _ = stream.shutdown(Shutdown::Write);
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn nonce() -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    format!(
        "{:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A UDP socket on any port of the calling thread's namespace.
fn udp_socket() -> io::Result<UdpSocket> {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
}

/// Waits up to `wait` for a datagram whose text contains `nonce`; returns its text and source.
fn await_nonce(
    sock: &UdpSocket,
    nonce: &str,
    wait: Duration,
) -> io::Result<Option<(String, SocketAddr)>> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.split(' ').nth(1) == Some(nonce) {
                    return Ok(Some((text, from)));
                }
            }
            // ICMP errors (port unreachable) surface as ConnectionRefused on Linux: keep waiting.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
}

/// Asks the reflector endpoint `to` which address `sock`'s datagrams arrive from.
pub fn udp_mapping(sock: &UdpSocket, to: SocketAddrV4) -> io::Result<SocketAddrV4> {
    for _ in 0..3 {
        let n = nonce();
        sock.send_to(format!("{MAGIC} {n}").as_bytes(), to)?;
        if let Some((text, _)) = await_nonce(sock, &n, PROBE_REPLY_TIMEOUT)? {
            let observed = text.split(' ').nth(2).unwrap_or_default();
            return observed.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reflector answer {text:?}"),
                )
            });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no answer from reflector {to}"),
    ))
}

/// How long to wait before concluding that a packet will not come: at least
/// [`PROBE_SILENCE`], and three times the exchange that took `rtt` on slow links.
fn silence_after(rtt: Duration) -> Duration {
    PROBE_SILENCE.max(rtt * 3)
}

/// Whether an unsolicited datagram from reflector endpoint `from` reaches `sock` via `mapped`.
fn udp_reaches(
    reflector: &Reflector,
    sock: &UdpSocket,
    from: SocketAddrV4,
    mapped: SocketAddrV4,
    silence: Duration,
) -> io::Result<bool> {
    let n = nonce();
    // Twice, so that one lost packet on an impaired link does not read as filtering.
    for _ in 0..2 {
        reflector.send_from(from, mapped, format!("{MAGIC} {n} unsolicited").as_bytes())?;
        if await_nonce(sock, &n, silence)?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What a probe observed of a NAT's UDP behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UdpBehaviour {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Port allocation.
    pub port_allocation: PortAllocation,
    /// Whether a datagram sent to one's own mapped address comes back.
    pub hairpin: bool,
    /// The public address seen by the reflector.
    pub public_ip: Ipv4Addr,
}

/// Measures mapping, filtering, port allocation and hairpinning over UDP. Call it inside the
/// host's namespace; `local_ip` is the host's own address.
pub fn measure_udp(reflector: &Reflector, local_ip: Ipv4Addr) -> io::Result<UdpBehaviour> {
    let ep = reflector.endpoints();

    let sock = udp_socket()?;
    let local_port = sock.local_addr()?.port();
    let started = Instant::now();
    let m1 = udp_mapping(&sock, ep.primary)?;
    let silence = silence_after(started.elapsed());
    let m2 = udp_mapping(&sock, ep.other_ip)?;
    let m3 = udp_mapping(&sock, ep.same_ip_other_port)?;
    let mapping = if m1 == SocketAddrV4::new(local_ip, local_port) {
        Mapping::None
    } else if m1 == m2 && m1 == m3 {
        Mapping::EndpointIndependent
    } else if m1 == m3 {
        Mapping::AddressDependent
    } else {
        Mapping::AddressAndPortDependent
    };

    let sock = udp_socket()?;
    let mapped = udp_mapping(&sock, ep.primary)?;
    let filtering = if udp_reaches(reflector, &sock, ep.other_ip_other_port, mapped, silence)? {
        if mapping == Mapping::None {
            Filtering::None
        } else {
            Filtering::EndpointIndependent
        }
    } else if udp_reaches(reflector, &sock, ep.same_ip_other_port, mapped, silence)? {
        Filtering::AddressDependent
    } else if udp_reaches(reflector, &sock, ep.primary, mapped, silence)? {
        Filtering::AddressAndPortDependent
    } else {
        return Err(io::Error::other(format!(
            "even {} cannot answer {mapped}: the NAT drops replies",
            ep.primary
        )));
    };

    let mut pairs = Vec::new();
    for _ in 0..4 {
        let s = udp_socket()?;
        let local = s.local_addr()?.port();
        pairs.push((local, udp_mapping(&s, ep.primary)?.port()));
    }
    let port_allocation = if pairs.iter().all(|(l, m)| l == m) {
        PortAllocation::Preserve
    } else if pairs.windows(2).all(|w| w[1].1.wrapping_sub(w[0].1) == 1) {
        PortAllocation::Sequential
    } else {
        PortAllocation::Random
    };

    let sock = udp_socket()?;
    let own = udp_mapping(&sock, ep.primary)?;
    let n = nonce();
    let mut hairpin = false;
    for _ in 0..2 {
        sock.send_to(format!("{MAGIC} {n} hairpin").as_bytes(), own)?;
        if await_nonce(&sock, &n, silence)?.is_some() {
            hairpin = true;
            break;
        }
    }
    Ok(UdpBehaviour {
        mapping,
        filtering,
        port_allocation,
        hairpin,
        public_ip: *m1.ip(),
    })
}

/// Whether UDP mappings live at least `before` and at most `after` idle time: two mappings
/// are made at once, the first is tested after `before`, the second after `after` (testing one
/// would refresh it). Returns `(alive_before, alive_after)`. Call it inside the host's namespace.
pub fn udp_mapping_lifetime(
    reflector: &Reflector,
    before: Duration,
    after: Duration,
) -> io::Result<(bool, bool)> {
    let ep = reflector.endpoints();
    let (a, b) = (udp_socket()?, udp_socket()?);
    let t0 = Instant::now();
    let ma = udp_mapping(&a, ep.primary)?;
    let mb = udp_mapping(&b, ep.primary)?;
    thread::sleep(before.saturating_sub(t0.elapsed()));
    let alive_before = udp_reaches(reflector, &a, ep.primary, ma, PROBE_SILENCE)?;
    thread::sleep(after.saturating_sub(t0.elapsed()));
    let alive_after = udp_reaches(reflector, &b, ep.primary, mb, PROBE_SILENCE)?;
    Ok((alive_before, alive_after))
}

/// What a probe observed of a NAT's TCP behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcpBehaviour {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour (whether unsolicited SYNs reach a listener on the mapped port).
    pub filtering: Filtering,
    /// What an unsolicited SYN to an unmapped port of the public address gets.
    pub unsolicited: Unsolicited,
}

fn tcp_observed(local_port: u16, to: SocketAddrV4) -> io::Result<SocketAddrV4> {
    let s = tcp_socket_bound(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, local_port))?;
    s.connect_timeout(&SocketAddr::V4(to).into(), PROBE_REPLY_TIMEOUT)?;
    let stream = TcpStream::from(s);
    stream.set_read_timeout(Some(PROBE_REPLY_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    line.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reflector answer {line:?}"),
        )
    })
}

/// Measures TCP mapping, filtering and the answer to unsolicited SYNs. Call it inside the host's
/// namespace; `local_ip` is the host's own address.
pub fn measure_tcp(reflector: &Reflector, local_ip: Ipv4Addr) -> io::Result<TcpBehaviour> {
    let ep = reflector.endpoints();
    let any_port = || tcp_socket_bound(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let port_of = |s: &Socket| {
        s.local_addr()
            .map(|a| a.as_socket_ipv4().map_or(0, |a| a.port()))
    };
    let socket = any_port()?;
    let port = port_of(&socket)?;
    let started = Instant::now();
    let m1 = tcp_observed(port, ep.primary)?;
    let silence = silence_after(started.elapsed());
    let m2 = tcp_observed(port, ep.other_ip)?;
    let m3 = tcp_observed(port, ep.same_ip_other_port)?;
    drop(socket);
    let mapping = if m1 == SocketAddrV4::new(local_ip, port) {
        Mapping::None
    } else if m1 == m2 && m1 == m3 {
        Mapping::EndpointIndependent
    } else if m1 == m3 {
        Mapping::AddressDependent
    } else {
        Mapping::AddressAndPortDependent
    };
    // Filtering on a fresh mapping that has contacted the primary endpoint only, with a
    // listener on its port so that admitted SYNs find a socket.
    let listener = any_port()?;
    listener.listen(8)?;
    let mapped = tcp_observed(port_of(&listener)?, ep.primary)?;
    // Twice, so that one lost SYN on an impaired link does not read as filtering.
    let reaches =
        |from: Ipv4Addr| (0..2).any(|_| reflector.connect_from(from, mapped, silence).is_ok());
    let filtering = if reaches(*ep.other_ip.ip()) {
        if mapping == Mapping::None {
            Filtering::None
        } else {
            Filtering::EndpointIndependent
        }
    } else if reaches(*ep.primary.ip()) {
        Filtering::AddressDependent
    } else {
        Filtering::AddressAndPortDependent
    };
    // Port 9 (discard) is mapped by nobody in the lab.
    let unsolicited =
        match reflector.connect_from(*ep.other_ip.ip(), SocketAddrV4::new(*m1.ip(), 9), silence) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Unsolicited::Reject,
            _ => Unsolicited::Drop,
        };
    drop(listener);
    Ok(TcpBehaviour {
        mapping,
        filtering,
        unsolicited,
    })
}

/// Round-trip time of a UDP exchange with the reflector's primary endpoint: the median of `n`
/// probes. Call it inside the host's namespace.
pub fn udp_rtt(reflector: &Reflector, n: usize) -> io::Result<Duration> {
    let sock = udp_socket()?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = Instant::now();
        udp_mapping(&sock, reflector.endpoints().primary)?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// A router's session table, as configured or as a probe saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "table")]
pub enum SessionTable {
    /// No bound (seen: every flow opened was answered and kept its mapping).
    Unbounded,
    /// New flows beyond `max_sessions` live ones are dropped (seen: the first `max_sessions`
    /// flows were answered and kept their mappings, the later ones got no answer).
    Drop {
        /// Size of the table.
        max_sessions: u32,
    },
    /// A new flow beyond `max_sessions` live ones evicts the oldest (seen: every flow was
    /// answered, and all but the last `max_sessions` lost their mappings).
    EvictOldest {
        /// Size of the table.
        max_sessions: u32,
    },
    /// A pattern that is none of the above (seen only).
    Irregular,
}

impl SessionTable {
    /// The table a host sees through a chain of routers: the smallest bounded one, if any.
    pub fn of_chain(chain: &[NatConfig]) -> Self {
        chain
            .iter()
            .filter_map(|c| c.max_sessions.map(|max| (max, c.session_overflow)))
            .min_by_key(|(max, _)| *max)
            .map_or(Self::Unbounded, |(max_sessions, overflow)| match overflow {
                SessionOverflow::Drop => Self::Drop { max_sessions },
                SessionOverflow::EvictOldest => Self::EvictOldest { max_sessions },
            })
    }

    /// What the flows of a [`measure_session_table`] run say about the table: `answered[i]`
    /// whether flow `i` (in the order opened) got an answer, `kept[i]` whether it still
    /// reached the host after the last one was opened.
    pub fn infer(answered: &[bool], kept: &[bool]) -> Self {
        let n = answered.len();
        let count = |v: &[bool]| u32::try_from(v.iter().filter(|b| **b).count()).unwrap_or(0);
        // `true` for the first `k` entries of `v` and `false` after (or the other way round).
        let split = |v: &[bool], k: usize, first: bool| {
            v.iter().enumerate().all(|(i, b)| *b == ((i < k) == first))
        };
        let a = answered.iter().filter(|b| **b).count();
        if n == 0 || a == 0 || kept.len() != n {
            return Self::Irregular;
        }
        if a < n {
            let answered_first = split(answered, a, true);
            let kept_answered = answered.iter().zip(kept).all(|(a, k)| a == k);
            return if answered_first && kept_answered {
                Self::Drop {
                    max_sessions: count(answered),
                }
            } else {
                Self::Irregular
            };
        }
        let lost = n - kept.iter().filter(|b| **b).count();
        if lost == 0 {
            Self::Unbounded
        } else if split(kept, lost, false) {
            Self::EvictOldest {
                max_sessions: count(kept),
            }
        } else {
            Self::Irregular
        }
    }
}

impl std::fmt::Display for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unbounded => f.write_str("unbounded"),
            Self::Drop { max_sessions } => write!(f, "{max_sessions} drop"),
            Self::EvictOldest { max_sessions } => write!(f, "{max_sessions} evict-oldest"),
            Self::Irregular => f.write_str("irregular"),
        }
    }
}

/// What [`measure_session_table`] saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionTableProbe {
    /// New flows opened, one after the other.
    pub flows: u32,
    /// How many got an answer.
    pub answered: u32,
    /// How many of the answered ones still reached the host after the last flow was opened.
    pub kept: u32,
    /// The external port of each flow in the order opened (`None`: no answer).
    pub ports: Vec<Option<u16>>,
    /// Whether each flow still reached the host at the end.
    pub kept_each: Vec<bool>,
    /// What that says about the table.
    pub table: SessionTable,
}

/// Measures a router's session table: opens `flows` new UDP flows one after the other, each
/// from a socket of its own towards the reflector's four endpoints in turn, notes which are
/// answered, then checks which answered ones still reach the host (an unsolicited datagram
/// from the endpoint each contacted, to its external endpoint: with the mapping gone, it
/// cannot). Every flow stays open until the end. Call it inside the host's namespace.
pub fn measure_session_table(reflector: &Reflector, flows: u32) -> io::Result<SessionTableProbe> {
    let ep = reflector.endpoints();
    let towards = [
        ep.primary,
        ep.same_ip_other_port,
        ep.other_ip,
        ep.other_ip_other_port,
    ];
    let mut silence = PROBE_SILENCE;
    let mut opened = Vec::new();
    for i in 0..flows as usize {
        let sock = udp_socket()?;
        let to = towards[i % towards.len()];
        let n = nonce();
        let started = Instant::now();
        let mut mapped = None;
        // Twice, so that one lost packet on an impaired link does not read as a dropped flow.
        for _ in 0..2 {
            sock.send_to(format!("{MAGIC} {n}").as_bytes(), to)?;
            if let Some((text, _)) = await_nonce(&sock, &n, silence.max(PROBE_REPLY_TIMEOUT / 2))? {
                mapped = text
                    .split(' ')
                    .nth(2)
                    .and_then(|a| a.parse::<SocketAddrV4>().ok());
                if mapped.is_some() {
                    silence = silence.max(silence_after(started.elapsed()));
                    break;
                }
            }
        }
        opened.push((sock, to, mapped));
    }
    let mut kept_each = Vec::with_capacity(opened.len());
    for (sock, from, mapped) in &opened {
        kept_each.push(match mapped {
            Some(m) => udp_reaches(reflector, sock, *from, *m, silence)?,
            None => false,
        });
    }
    let answered_each: Vec<bool> = opened.iter().map(|(_, _, m)| m.is_some()).collect();
    let count = |v: &[bool]| u32::try_from(v.iter().filter(|b| **b).count()).unwrap_or(0);
    Ok(SessionTableProbe {
        flows,
        answered: count(&answered_each),
        kept: count(&kept_each),
        ports: opened.iter().map(|(_, _, m)| m.map(|m| m.port())).collect(),
        table: SessionTable::infer(&answered_each, &kept_each),
        kept_each,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bools(s: &str) -> Vec<bool> {
        s.chars().map(|c| c == '1').collect()
    }

    #[test]
    fn the_flows_pattern_names_the_table() {
        let infer = |a: &str, k: &str| SessionTable::infer(&bools(a), &bools(k));
        assert_eq!(infer("111111", "111111"), SessionTable::Unbounded);
        assert_eq!(
            infer("111100", "111100"),
            SessionTable::Drop { max_sessions: 4 }
        );
        assert_eq!(
            infer("111111", "001111"),
            SessionTable::EvictOldest { max_sessions: 4 }
        );
        assert_eq!(infer("110100", "110100"), SessionTable::Irregular, "a gap");
        assert_eq!(
            infer("111100", "011100"),
            SessionTable::Irregular,
            "drop must keep the old flows"
        );
        assert_eq!(
            infer("111111", "110111"),
            SessionTable::Irregular,
            "evict the oldest"
        );
        assert_eq!(infer("000000", "000000"), SessionTable::Irregular);
        assert_eq!(infer("", ""), SessionTable::Irregular);
    }

    #[test]
    fn a_chain_shows_its_smallest_table() {
        let mut a = crate::Preset::Symmetric.config().expect("router preset");
        let mut b = a;
        assert_eq!(SessionTable::of_chain(&[a, b]), SessionTable::Unbounded);
        a.max_sessions = Some(32);
        b.max_sessions = Some(16);
        b.session_overflow = SessionOverflow::EvictOldest;
        assert_eq!(
            SessionTable::of_chain(&[a, b]),
            SessionTable::EvictOldest { max_sessions: 16 }
        );
        assert_eq!(SessionTable::of_chain(&[a]).to_string(), "32 drop");
    }
}

//! TCP simultaneous open, plain or NUTSS-style, and the [`IcmpGuard`] NUTSS needs.
//!
//! One socket per candidate, all bound to one local address (SO_REUSEADDR and SO_REUSEPORT,
//! so they share the port with each other and with the daemon's other sockets), each
//! connecting to its candidate at once. When both ends do this at about the same time, the
//! first SYN of each opens its own NAT, and the other's SYN, let in by that state, meets a
//! socket in SYN_SENT: a simultaneous open. A NAT that answers an unsolicited SYN with a RST
//! makes the attempt fail with "refused"; a refused, reset or rejected attempt is tried again
//! with a new socket every 200 ms until the deadline.
//!
//! NUTSS (`nutss_ttl: Some(t)`): the first SYN of each socket leaves with IP TTL `t`, enough to
//! cross our own NAT and open it, too little to reach the remote's NAT, so a NAT that RSTs
//! unsolicited SYNs never sees it. The TTL is restored right after the `connect` call, so the
//! retransmitted SYN (about 1 s later) and the SYN-ACK go the whole way. The router where the
//! SYN expires may send ICMP time exceeded, which makes Linux abort a socket in SYN_SENT
//! (EHOSTUNREACH); hold an [`IcmpGuard`] while NUTSS runs.
//!
//! Wire, once a socket is connected: both ends write a hello at once and read the other's
//! within 1 s.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `NPTCP001` |
//! | 8..24 | the token both ends share |
//! | 24 | side: 1 initiator, 2 responder |
//!
//! Only a hello with our token and the other side passes; any other answer (a SYN may land on
//! another listener on the same port, such as the daemon's libp2p listener, which will not
//! speak this) drops that socket with a RST, and the candidate is tried again. Then the
//! initiator writes one byte, `1` ("chosen"), on the first connection that passed and drops
//! the others; the responder keeps the connection that brings that byte. So both ends keep
//! the same connection even when more than one formed. The application's bytes follow.
//!
//! Plain and NUTSS raced at once need a local port each (and the remote learns both): two
//! sockets cannot connect the same 4-tuple (the second gets EADDRNOTAVAIL).

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};

use super::defaults::{HELLO_TIMEOUT, TCP_RETRY};
use super::{Punched, Side, TechniqueError, canonical, reachable};

/// The first 8 bytes of a hello.
pub const HELLO_MAGIC: [u8; 8] = *b"NPTCP001";
/// The length of a hello.
pub const HELLO_LEN: usize = 25;
/// The byte the initiator writes on the connection both ends keep.
pub const CHOSEN: u8 = 1;

/// What each end writes first on a connected socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The token both ends share.
    pub token: [u8; 16],
    /// The writer's side.
    pub side: Side,
}

/// Why a hello does not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Not 25 bytes long.
    #[error("{0} bytes, not {HELLO_LEN}")]
    Length(usize),
    /// The first 8 bytes are not `NPTCP001`: some other program answered.
    #[error("wrong magic: not a natpunch peer")]
    Magic,
    /// A side byte other than 1 or 2.
    #[error("unknown side {0}")]
    Side(u8),
    /// Another attempt's token.
    #[error("wrong token")]
    Token,
    /// The same side as ours: both ends were told to be the same side.
    #[error("the peer is the same side as this end")]
    SameSide,
}

impl Hello {
    /// The hello's bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..8].copy_from_slice(&HELLO_MAGIC);
        out[8..24].copy_from_slice(&self.token);
        out[24] = self.side.byte();
        out
    }

    /// Reads a hello from untrusted bytes; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, HelloError> {
        let Ok(bytes) = <&[u8; HELLO_LEN]>::try_from(bytes) else {
            return Err(HelloError::Length(bytes.len()));
        };
        if bytes[..8] != HELLO_MAGIC {
            return Err(HelloError::Magic);
        }
        let side = match bytes[24] {
            1 => Side::Initiator,
            2 => Side::Responder,
            other => return Err(HelloError::Side(other)),
        };
        let mut token = [0u8; 16];
        token.copy_from_slice(&bytes[8..24]);
        Ok(Self { token, side })
    }

    /// Whether `bytes` is the hello the other side of `ours` must send with `token`.
    pub fn check(bytes: &[u8], token: [u8; 16], ours: Side) -> Result<(), HelloError> {
        let hello = Self::decode(bytes)?;
        if hello.token != token {
            return Err(HelloError::Token);
        }
        if hello.side != ours.other() {
            return Err(HelloError::SameSide);
        }
        Ok(())
    }
}

/// TCP simultaneous open from `local` (SO_REUSEADDR and SO_REUSEPORT, one socket per
/// candidate, all bound to `local`; port 0 picks one port for all), connecting to every
/// candidate (at most 16; more are ignored) at once and retrying refused, reset or rejected
/// attempts every 200 ms until `deadline`. With `nutss_ttl: Some(t)` the first SYN of each
/// socket leaves with IP TTL `t`, and the TTL is restored right after the `connect` call (see
/// the module doc). `side` breaks ties: the two ends pass different sides. Returns a connected
/// std `TcpStream` (blocking mode, no Nagle) once the token check passed.
pub async fn tcp_simultaneous_open(
    local: SocketAddr,
    candidates: &[SocketAddr],
    token: [u8; 16],
    side: Side,
    nutss_ttl: Option<u32>,
    deadline: Instant,
) -> Result<Punched<std::net::TcpStream>, TechniqueError> {
    let candidates = reachable(local, candidates);
    if candidates.is_empty() {
        return Err(TechniqueError::NoCandidates);
    }
    // Holds the port while the attempts bind to it.
    let (local, _hold) = pin_port(local)?;
    let progress = Arc::new(Progress::default());
    let mut attempts = JoinSet::new();
    // A SYN from a port we did not aim at (a NAT that picks a new port per destination, in
    // front of an end whose NAT lets any port of the right address in) finds no socket in
    // SYN_SENT: a listener on the same port takes it.
    let listener = bound(local)?;
    listener.listen(16)?;
    let listener = TcpListener::from_std(listener.into())?;
    let first = candidates[0];
    attempts.spawn(accept_until(
        listener,
        Attempt {
            local,
            remote: first,
            token,
            side,
            ttl: None,
            deadline,
        },
        Arc::clone(&progress),
    ));
    for &remote in &candidates {
        let attempt = Attempt {
            local,
            remote,
            token,
            side,
            ttl: nutss_ttl,
            deadline,
        };
        attempts.spawn(keep_trying(attempt, Arc::clone(&progress)));
    }
    while let Some(joined) = attempts.join_next().await {
        let (mut stream, remote) = match joined {
            Ok(Ok(won)) => won,
            Ok(Err(Stop::Local(e))) => return Err(TechniqueError::Io(e)),
            Ok(Err(Stop::Deadline)) => continue,
            Err(e) => {
                progress.note(format!("attempt task: {e}"));
                continue;
            }
        };
        if side == Side::Initiator
            && let Err(e) = stream.write_all(&[CHOSEN]).await
        {
            progress.note(format!("{remote}: choosing: {e}"));
            continue;
        }
        // The losers are aborted, and their sockets closed, when `attempts` drops.
        let socket = stream.into_std()?;
        socket.set_nonblocking(false)?;
        socket.set_nodelay(true)?;
        return Ok(Punched {
            socket,
            remote: canonical(remote),
            rtt: None,
        });
    }
    Err(progress.timeout())
}

/// Attempts made and the last failure, shared by the attempts of one call.
#[derive(Debug, Default)]
struct Progress {
    inner: Mutex<(usize, Option<String>)>,
}

impl Progress {
    fn tried(&self) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
    }

    fn note(&self, why: String) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).1 = Some(why);
    }

    fn timeout(&self) -> TechniqueError {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        TechniqueError::Timeout {
            tried: inner.0,
            last: inner.1.clone(),
        }
    }
}

/// One candidate's attempts.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    local: SocketAddr,
    remote: SocketAddr,
    token: [u8; 16],
    side: Side,
    ttl: Option<u32>,
    deadline: Instant,
}

/// Why a candidate's attempts ended without a socket.
#[derive(Debug)]
enum Stop {
    /// The deadline came.
    Deadline,
    /// The local socket cannot be made: no attempt can work.
    Local(io::Error),
}

/// Why one attempt failed.
#[derive(Debug)]
enum Step {
    /// Try again.
    Failed(String),
    /// The local socket cannot be made.
    Local(io::Error),
}

async fn keep_trying(a: Attempt, progress: Arc<Progress>) -> Result<(TcpStream, SocketAddr), Stop> {
    loop {
        progress.tried();
        match try_once(&a).await {
            Ok(stream) => return Ok((stream, a.remote)),
            Err(Step::Local(e)) => return Err(Stop::Local(e)),
            Err(Step::Failed(why)) => progress.note(format!("{}: {why}", a.remote)),
        }
        let next = Instant::now() + TCP_RETRY;
        if next >= a.deadline {
            return Err(Stop::Deadline);
        }
        tokio::time::sleep_until(next).await;
    }
}

/// Accepts connections on `listener` until one passes the hellos, or the deadline.
async fn accept_until(
    listener: TcpListener,
    a: Attempt,
    progress: Arc<Progress>,
) -> Result<(TcpStream, SocketAddr), Stop> {
    loop {
        let (stream, from) = match timeout_at(a.deadline, listener.accept()).await {
            Err(_) => return Err(Stop::Deadline),
            Ok(Err(e)) => {
                progress.note(format!("accepting: {e}"));
                tokio::time::sleep(TCP_RETRY).await;
                continue;
            }
            Ok(Ok(accepted)) => accepted,
        };
        match greet(stream, &a).await {
            Ok(stream) => return Ok((stream, from)),
            Err(Step::Failed(why)) => progress.note(format!("{from} (accepted): {why}")),
            Err(Step::Local(e)) => return Err(Stop::Local(e)),
        }
    }
}

/// One socket: connect, exchange hellos, and (responder) wait to be chosen.
async fn try_once(a: &Attempt) -> Result<TcpStream, Step> {
    let socket = bound(a.local).map_err(Step::Local)?;
    let restore = match a.ttl {
        Some(ttl) => Some(set_ttl(&socket, a.local, ttl).map_err(Step::Local)?),
        None => None,
    };
    let connecting = socket.connect(&a.remote.into());
    if let Some(previous) = restore {
        set_ttl(&socket, a.local, previous).map_err(Step::Local)?;
    }
    match connecting {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(Step::Failed(format!("connect: {e}"))),
    }
    let stream = TcpStream::from_std(socket.into()).map_err(Step::Local)?;
    match timeout_at(a.deadline, stream.writable()).await {
        Err(_) => return Err(Step::Failed("no connection".into())),
        Ok(Err(e)) => return Err(Step::Failed(format!("connect: {e}"))),
        Ok(Ok(())) => {}
    }
    if let Some(e) = stream.take_error().map_err(Step::Local)? {
        return Err(Step::Failed(format!("connect: {e}")));
    }
    if let Err(e) = stream.peer_addr() {
        return Err(Step::Failed(format!("connect: {e}")));
    }
    greet(stream, a).await
}

/// A connected socket's hellos and (responder) the initiator's choice.
async fn greet(mut stream: TcpStream, a: &Attempt) -> Result<TcpStream, Step> {
    let hello_by = (Instant::now() + HELLO_TIMEOUT).min(a.deadline);
    let exchange = async {
        let hello = Hello {
            token: a.token,
            side: a.side,
        };
        stream.write_all(&hello.encode()).await?;
        let mut theirs = [0u8; HELLO_LEN];
        stream.read_exact(&mut theirs).await?;
        Ok::<_, io::Error>(theirs)
    };
    let checked = match timeout_at(hello_by, exchange).await {
        Err(_) => Err("no hello within 1 s".to_owned()),
        Ok(Err(e)) => Err(format!("hello: {e}")),
        Ok(Ok(theirs)) => Hello::check(&theirs, a.token, a.side).map_err(|e| format!("hello: {e}")),
    };
    if let Err(why) = checked {
        return Err(reject(stream, why));
    }
    if a.side == Side::Responder {
        let mut chosen = [0u8; 1];
        match timeout_at(a.deadline, stream.read_exact(&mut chosen)).await {
            Ok(Ok(_)) if chosen[0] == CHOSEN => {}
            Ok(Ok(_)) => return Err(reject(stream, format!("unknown choice {}", chosen[0]))),
            Ok(Err(e)) => return Err(reject(stream, format!("not chosen: {e}"))),
            Err(_) => return Err(reject(stream, "not chosen in time".into())),
        }
    }
    Ok(stream)
}

/// Drops `stream` with a RST, so that its 4-tuple is free for the next attempt at once (no
/// TIME_WAIT), and says why.
fn reject(stream: TcpStream, why: String) -> Step {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    Step::Failed(why)
}

/// A non-blocking TCP socket bound to `local`, sharing the port.
fn bound(local: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    Ok(socket)
}

/// `local` with a port: when it has none, a socket is bound to pick one and returned, to hold
/// the port until the attempts are over.
fn pin_port(local: SocketAddr) -> io::Result<(SocketAddr, Option<Socket>)> {
    if local.port() != 0 {
        return Ok((local, None));
    }
    let hold = bound(local)?;
    let picked = hold
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bound to a non-IP address"))?;
    Ok((picked, Some(hold)))
}

/// Sets the TTL (IPv6: hop limit) of `socket` and returns the previous one.
fn set_ttl(socket: &Socket, local: SocketAddr, ttl: u32) -> io::Result<u32> {
    if local.is_ipv4() {
        let previous = socket.ttl_v4()?;
        socket.set_ttl_v4(ttl)?;
        Ok(previous)
    } else {
        let previous = socket.unicast_hops_v6()?;
        socket.set_unicast_hops_v6(ttl)?;
        Ok(previous)
    }
}

/// The nftables table of the guard.
pub const ICMP_GUARD_TABLE: &str = "natpunch_nutss";

/// Namespaces (by inode) with a guard of this process, and how many.
static GUARDS: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());

/// Drops ICMP (and ICMPv6) time exceeded in the network namespace it was installed in, while
/// it lives: nftables table `inet natpunch_nutss`. Guards of one process in one namespace
/// share the table, which goes when the last of them drops (on whichever thread). Two
/// processes in one namespace do not know of each other's guards: run one daemon per
/// namespace. Needs `nft` and CAP_NET_ADMIN.
#[derive(Debug)]
pub struct IcmpGuard {
    /// The namespace, to remove the table from even when dropped on another thread.
    netns: std::fs::File,
    inode: u64,
}

impl IcmpGuard {
    /// Adds the table to the current thread's network namespace, unless a guard of this
    /// process holds it already there. A table left by a process that crashed is replaced.
    pub fn install() -> io::Result<Self> {
        let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
        let inode = netns.metadata()?.ino();
        let mut guards = GUARDS.lock().unwrap_or_else(PoisonError::into_inner);
        match guards.iter_mut().find(|(i, _)| *i == inode) {
            Some((_, count)) => *count += 1,
            None => {
                nft(&format!(
                    "table inet {ICMP_GUARD_TABLE}\n\
                     delete table inet {ICMP_GUARD_TABLE}\n\
                     table inet {ICMP_GUARD_TABLE} {{\n\
                     \x20 chain input {{\n\
                     \x20   type filter hook input priority 0; policy accept;\n\
                     \x20   icmp type time-exceeded counter drop\n\
                     \x20   icmpv6 type time-exceeded counter drop\n\
                     \x20 }}\n\
                     }}\n"
                ))?;
                guards.push((inode, 1));
            }
        }
        Ok(Self { netns, inode })
    }
}

impl Drop for IcmpGuard {
    fn drop(&mut self) {
        let mut guards = GUARDS.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(at) = guards.iter().position(|(i, _)| *i == self.inode) else {
            return;
        };
        guards[at].1 -= 1;
        if guards[at].1 > 0 {
            return;
        }
        guards.swap_remove(at);
        let script = format!("delete table inet {ICMP_GUARD_TABLE}\n");
        let here = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
        if here.ok() == Some(self.inode) {
            let _ = nft(&script);
            return;
        }
        // Namespaces are per thread: enter the guard's on a thread of its own, so that this
        // thread stays where it is, and run nft from there.
        let netns = &self.netns;
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| nft(&script))
            })
            .join()
        });
    }
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        io::Write::write_all(&mut stdin, script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: [u8; 16] = [7; 16];

    #[test]
    fn a_hello_passes_only_with_the_token_and_the_other_side() {
        let hello = Hello {
            token: TOKEN,
            side: Side::Initiator,
        }
        .encode();
        assert_eq!(&hello[..8], b"NPTCP001");
        assert_eq!(hello[24], 1);
        assert_eq!(Hello::check(&hello, TOKEN, Side::Responder), Ok(()));
        assert_eq!(
            Hello::check(&hello, TOKEN, Side::Initiator),
            Err(HelloError::SameSide)
        );
        assert_eq!(
            Hello::check(&hello, [8; 16], Side::Responder),
            Err(HelloError::Token)
        );
        let mut side = hello;
        side[24] = 0;
        assert_eq!(Hello::decode(&side), Err(HelloError::Side(0)));
        assert_eq!(
            Hello::check(b"SSH-2.0-OpenSSH_9.6\r\n....", TOKEN, Side::Responder),
            Err(HelloError::Magic)
        );
        assert_eq!(Hello::decode(&hello[..3]), Err(HelloError::Length(3)));
    }

    #[test]
    fn hellos_round_trip_and_random_bytes_never_panic() {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..10_000 {
            let mut token = [0u8; 16];
            token.iter_mut().for_each(|b| *b = next() as u8);
            let side = if next() & 1 == 0 {
                Side::Initiator
            } else {
                Side::Responder
            };
            let hello = Hello { token, side };
            assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
            let len = (next() % 40) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 8 && next() & 1 == 0 {
                bytes[..8].copy_from_slice(&HELLO_MAGIC);
            }
            let _ = Hello::check(&bytes, TOKEN, side);
        }
    }
}

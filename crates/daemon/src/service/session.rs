//! One connection between two applications, as each daemon makes it.
//!
//! The initiator ([`initiate`]) reaches the remote daemon through the relays, opens the
//! daemons' stream, says hello with its candidates, and runs the plan for both ends' NATs with
//! a [`Sequencer`]: techniques start and stop as it says, the first direct socket wins, and the
//! relayed stream itself is the standby. The responder ([`respond`]) checks that an application
//! listens on the service, answers with its candidates, starts the techniques for the transport
//! at once, and hands its application the socket the initiator chose, or the relayed stream.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{AsyncReadExt as _, AsyncWriteExt as _};
use libp2p::{Multiaddr, PeerId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::compat::FuturesAsyncReadCompatExt as _;

use super::app::Outgoing;
use super::direct::{self, Dialed};
use super::{
    BirthdayRecord, Command, ConnectionRecord, Ctx, DaemonEvent, TriedRecord, ms, technique_name,
};
use crate::api::{ErrorCode, Event, Proto, Reply, Technique};
use crate::plan::{self, Action, Connected, DEADLINE, Nat, Sequencer};
use crate::signal::{self, Candidates, Message, MessageReader, NatInfo};
use crate::technique::{self, Side, birthday};

/// How long reaching the remote daemon and opening the stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a STUN question over TCP may take.
const STUN_TIMEOUT: Duration = Duration::from_secs(1);
/// Hellos sent at most for one connection (a reset stream is tried again).
const MAX_HELLOS: u32 = 5;
/// How long the initiator waits for the welcome over a relayed connection it already had,
/// before it takes the connection for dead and makes another.
const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an end waits for the other's hello or welcome.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection may take from the request to the socket, whatever happens: the
/// relays, the answer and the techniques' deadline, with room to spare.
const MAX_CONNECT: Duration = Duration::from_secs(30);

/// A socket a technique made.
enum Made {
    Tcp(std::net::TcpStream),
    Udp(UdpSocket),
}

impl Made {
    fn into_fd(self) -> OwnedFd {
        match self {
            Self::Tcp(s) => s.into(),
            Self::Udp(s) => s.into(),
        }
    }
}

/// What a technique made, and where it leads.
struct Punch {
    made: Made,
    remote: SocketAddr,
    rtt: Option<Duration>,
}

/// The daemons' stream, message by message.
struct Signal {
    stream: libp2p::Stream,
    reader: MessageReader,
}

impl Signal {
    fn new(stream: libp2p::Stream) -> Self {
        Self {
            stream,
            reader: MessageReader::default(),
        }
    }

    async fn send(&mut self, message: &Message) -> io::Result<()> {
        self.stream.write_all(&signal::encode(message)).await?;
        self.stream.flush().await
    }

    /// The next message; `Ok(None)` when the stream ended.
    async fn recv(&mut self) -> Result<Option<Message>, String> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.reader.next_message().map_err(|e| e.to_string())? {
                return Ok(Some(m));
            }
            match self.stream.read(&mut buf).await {
                Ok(0) => return Ok(None),
                Ok(n) => self.reader.push(buf.get(..n).unwrap_or_default()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The stream, with the bytes read past the last message in front.
    fn into_relayed(self) -> Prefixed<tokio_util::compat::Compat<libp2p::Stream>> {
        Prefixed {
            prefix: self.reader.into_rest(),
            at: 0,
            inner: self.stream.compat(),
        }
    }
}

/// A stream whose first bytes were read already.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Fresh local ports for a connection's techniques.
#[derive(Debug, Clone, Copy)]
struct Ports {
    udp: u16,
    tcp: u16,
    nutss: u16,
}

impl Ports {
    fn fresh(proto: Proto, nutss: bool) -> io::Result<Self> {
        let tcp_port =
            || -> io::Result<u16> { Ok(TcpListener::bind(("0.0.0.0", 0))?.local_addr()?.port()) };
        Ok(match proto {
            Proto::Udp => Self {
                udp: UdpSocket::bind(("0.0.0.0", 0))?.local_addr()?.port(),
                tcp: 0,
                nutss: 0,
            },
            Proto::Tcp => Self {
                udp: 0,
                tcp: tcp_port()?,
                nutss: if nutss { tcp_port()? } else { 0 },
            },
        })
    }

    /// The port of `t` (0: any, for a dial to the other end's direct port).
    fn of(&self, t: Technique) -> u16 {
        match t {
            Technique::UdpPunch | Technique::UdpBirthday => self.udp,
            Technique::TcpNutss => self.nutss,
            Technique::TcpSimultaneousOpen => self.tcp,
            Technique::Direct | Technique::Reversal | Technique::Relay => 0,
        }
    }
}

/// The techniques this end runs for `proto`.
fn direct_techniques(ctx: &Ctx, proto: Proto) -> Vec<Technique> {
    let all = ctx.techniques();
    match proto {
        Proto::Udp => vec![Technique::UdpPunch],
        Proto::Tcp => [Technique::TcpSimultaneousOpen, Technique::TcpNutss]
            .into_iter()
            .filter(|t| all.contains(t))
            .collect(),
    }
}

/// This end's candidates for `proto`'s techniques on `ports`, and the STUN connections that
/// hold the TCP ports' mappings while they are used. When the relays' observations do not show
/// that the NAT keeps ports, the STUN reflector tells each port's external address, which goes
/// first.
async fn candidates(ctx: &Ctx, proto: Proto, ports: Ports) -> (Candidates, Vec<TcpStream>) {
    let state = ctx.state();
    let techniques = direct_techniques(ctx, proto);
    let mut c = Candidates::default();
    let mut held = Vec::new();
    let stun = ctx.config.stun.first().copied();
    let udp = proto == Proto::Udp;
    let ask = stun.filter(|_| state.preserves_ports(udp) != Some(true));
    for t in techniques {
        let port = ports.of(t);
        let mut list = state.candidates_for(port);
        if let Some(server) = ask {
            let mapped = if udp {
                natcheck::reflector::mapped_udp(port, server).await.ok()
            } else {
                natcheck::reflector::mapped_tcp(port, server, STUN_TIMEOUT)
                    .await
                    .ok()
                    .map(|(mapped, stream)| {
                        held.push(stream);
                        mapped
                    })
            };
            if let Some(mapped) = mapped {
                list.retain(|a| *a != mapped);
                list.insert(0, mapped);
                list.truncate(signal::MAX_CANDIDATES);
            }
        }
        match t {
            Technique::UdpPunch => c.udp = list,
            Technique::TcpSimultaneousOpen => c.tcp = list,
            Technique::TcpNutss => c.nutss = list,
            _ => {}
        }
    }
    c.direct = match proto {
        Proto::Tcp => state.direct_tcp,
        Proto::Udp => state.direct_udp,
    }
    .into_iter()
    .collect();
    c.birthday = ctx.config.birthday.enabled;
    if udp
        && c.birthday
        && state.nat.mapping.is_some()
        && !nat_of(state.nat, &c).independent()
        && let (Some(server), Some(&mapped)) = (ask, c.udp.first())
    {
        c.udp_next = next_mapping(state.nat, mapped, server).await;
    }
    (c, held)
}

/// Where a NAT that maps per destination will most likely put this host's next UDP mapping,
/// given `mapped`, the one it just made: one step on, if it allocates sequentially. The step
/// comes from what is known of the NAT (`natpunch nat check`, `--port-allocation`), or, when its
/// allocation is not known, from a second fresh socket's mapping as `server` sees it: two
/// mappings a few ports apart are sequential allocation, the odds of random ports falling that
/// close being about 1 in 2,000.
async fn next_mapping(nat: NatInfo, mapped: SocketAddr, server: SocketAddr) -> Option<SocketAddr> {
    let step = match nat.port_allocation {
        Some(behaviour::PortAllocation::Sequential) => {
            i32::from(u16::try_from(nat.port_delta.unwrap_or(1)).ok()?)
        }
        Some(_) => return None,
        None => {
            let again = natcheck::reflector::mapped_udp(0, server).await.ok()?;
            return natcheck::reflector::next_mapping(mapped, again);
        }
    };
    let port = i32::from(mapped.port()) + step;
    Some(SocketAddr::new(mapped.ip(), u16::try_from(port).ok()?))
}

/// Every address in `c`, once.
fn all_candidates(c: &Candidates) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in c.udp.iter().chain(&c.tcp).chain(&c.nutss).chain(&c.direct) {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

/// What a responder does when the initiator's stream broke before its choice came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterBreak {
    /// Hand the application the birthday socket: the other end acknowledged that very one.
    Take,
    /// Birthday probing still runs: wait for it.
    Wait,
    /// No socket can be told apart: fail.
    Fail,
}

/// The step after a broken stream, from birthday probing's result here (`None`: none yet) and
/// whether it still runs.
fn after_break(birthday_ok: Option<bool>, birthday_running: bool) -> AfterBreak {
    match (birthday_ok, birthday_running) {
        (Some(true), _) => AfterBreak::Take,
        (None, true) => AfterBreak::Wait,
        _ => AfterBreak::Fail,
    }
}

/// An end's NAT for the plan: what it knows of it, and what its candidates say.
fn nat_of(info: NatInfo, candidates: &Candidates) -> Nat {
    Nat {
        mapping: info.mapping,
        filtering: info.filtering,
        port_mapped: !candidates.direct.is_empty(),
        no_birthday: !candidates.birthday,
    }
}

/// The techniques running for one connection.
struct Running {
    set: JoinSet<(Technique, Result<Punch, String>)>,
    handles: HashMap<Technique, AbortHandle>,
    /// What birthday probing did, once it ended.
    birthday: Arc<Mutex<Option<BirthdayRecord>>>,
}

impl Running {
    fn new() -> Self {
        Self {
            set: JoinSet::new(),
            handles: HashMap::new(),
            birthday: Arc::default(),
        }
    }

    /// Starts `t` from `port` towards `remote`: a hole punch, or (`direct`, `reversal`) a dial
    /// of the other end's direct port over `proto`.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        t: Technique,
        proto: Proto,
        port: u16,
        remote: Vec<SocketAddr>,
        token: [u8; 16],
        side: Side,
        nutss_ttl: Option<u32>,
        deadline: tokio::time::Instant,
    ) {
        let local = SocketAddr::from(([0, 0, 0, 0], port));
        let handle = self.set.spawn(async move {
            let result = match t {
                Technique::UdpPunch => technique::udp_punch(local, &remote, token, deadline)
                    .await
                    .map(|p| Punch {
                        made: Made::Udp(p.socket),
                        remote: p.remote,
                        rtt: p.rtt,
                    }),
                Technique::Direct | Technique::Reversal if proto == Proto::Udp => {
                    technique::udp_punch(local, &remote, token, deadline)
                        .await
                        .map(|p| Punch {
                            made: Made::Udp(p.socket),
                            remote: p.remote,
                            rtt: p.rtt,
                        })
                }
                Technique::TcpSimultaneousOpen
                | Technique::TcpNutss
                | Technique::Direct
                | Technique::Reversal => {
                    let ttl = if t == Technique::TcpNutss {
                        nutss_ttl
                    } else {
                        None
                    };
                    technique::tcp_simultaneous_open(local, &remote, token, side, ttl, deadline)
                        .await
                        .map(|p| Punch {
                            made: Made::Tcp(p.socket),
                            remote: p.remote,
                            rtt: p.rtt,
                        })
                }
                Technique::Relay | Technique::UdpBirthday => {
                    return (t, Err("not started this way".to_owned()));
                }
            };
            (t, result.map_err(|e| e.to_string()))
        });
        self.handles.insert(t, handle);
    }

    /// Starts birthday probing against `remote` (the other end's first UDP candidate): as the
    /// probing end from `port` when this end's NAT maps endpoint-independently (`easy`; the
    /// window from `next` first, where the other end's NAT allocates sequentially), else as the
    /// end that opens many mappings.
    #[allow(clippy::too_many_arguments)]
    fn start_birthday(
        &mut self,
        settings: &birthday::Settings,
        easy: bool,
        port: u16,
        remote: Option<SocketAddr>,
        next: Option<SocketAddr>,
        token: [u8; 16],
        deadline: tokio::time::Instant,
    ) {
        let t = Technique::UdpBirthday;
        let probing = settings.probing(next.map(|a| a.port()));
        let sockets = settings.hard_sockets();
        let deadline = deadline.min(tokio::time::Instant::now() + settings.deadline);
        let record = self.birthday.clone();
        let handle = self.set.spawn(async move {
            let Some(remote) = remote else {
                return (t, Err("no address to aim at".to_owned()));
            };
            let mut done = BirthdayRecord {
                role: if easy { "easy" } else { "hard" },
                sockets: None,
                probes: None,
                predicted: easy && probing.prediction.is_some(),
                predicted_hit: false,
                result: "ok".into(),
            };
            let result = if easy {
                birthday::easy_side(
                    SocketAddr::from(([0, 0, 0, 0], port)),
                    remote.ip(),
                    token,
                    probing,
                    deadline,
                )
                .await
                .map(|p| {
                    done.probes = Some(p.probes);
                    done.predicted_hit = p.predicted;
                    p.punched
                })
            } else {
                done.sockets = Some(sockets);
                birthday::hard_side(sockets, remote, token, deadline)
                    .await
                    .map(|o| {
                        done.probes = usize::try_from(o.probe).ok();
                        o.punched
                    })
            };
            if let Err(e) = &result {
                if let (technique::TechniqueError::Timeout { tried, .. }, true) = (e, easy) {
                    done.probes = Some(*tried);
                }
                done.result = e.to_string();
            }
            if let Ok(mut r) = record.lock() {
                *r = Some(done);
            }
            (
                t,
                result
                    .map(|p| Punch {
                        made: Made::Udp(p.socket),
                        remote: p.remote,
                        rtt: p.rtt,
                    })
                    .map_err(|e| e.to_string()),
            )
        });
        self.handles.insert(t, handle);
    }

    /// What birthday probing did, if it ran to its end.
    fn birthday_record(&self) -> Option<BirthdayRecord> {
        self.birthday.lock().ok().and_then(|r| r.clone())
    }

    /// Starts `t` as a wait for the other end's dial of this end's direct port.
    fn start_wait(
        &mut self,
        t: Technique,
        rx: Option<oneshot::Receiver<Dialed>>,
        deadline: tokio::time::Instant,
    ) {
        let handle = self.set.spawn(async move {
            let Some(rx) = rx else {
                return (t, Err("already waiting".to_owned()));
            };
            let result = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Dialed::Tcp(stream, remote))) => Ok(Punch {
                    made: Made::Tcp(stream),
                    remote,
                    rtt: None,
                }),
                Ok(Ok(Dialed::Udp(socket, remote))) => Ok(Punch {
                    made: Made::Udp(socket),
                    remote,
                    rtt: None,
                }),
                Ok(Err(_)) => Err("the direct port stopped".to_owned()),
                Err(_) => Err("no dial came to the direct port".to_owned()),
            };
            (t, result)
        });
        self.handles.insert(t, handle);
    }

    fn stop(&mut self, t: Technique) {
        if let Some(h) = self.handles.remove(&t) {
            h.abort();
        }
    }

    /// The next technique to end.
    async fn next(&mut self) -> Option<(Technique, Result<Punch, String>)> {
        loop {
            // An error is a technique stopped on purpose (aborted).
            if let Ok((t, result)) = self.set.join_next().await? {
                self.handles.remove(&t);
                return Some((t, result));
            }
        }
    }
}

/// Makes a socket pair, bridges the daemon's end to `relayed`, and returns the application's.
fn bridge_relayed(
    proto: Proto,
    relayed: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
) -> io::Result<OwnedFd> {
    match proto {
        Proto::Tcp => {
            let (app, ours) = std::os::unix::net::UnixStream::pair()?;
            ours.set_nonblocking(true)?;
            let ours = tokio::net::UnixStream::from_std(ours)?;
            tokio::spawn(crate::bridge::stream(ours, relayed));
            Ok(app.into())
        }
        Proto::Udp => {
            let (app, ours) = std::os::unix::net::UnixDatagram::pair()?;
            ours.set_nonblocking(true)?;
            let ours = tokio::net::UnixDatagram::from_std(ours)?;
            tokio::spawn(crate::bridge::datagrams(ours, relayed));
            Ok(app.into())
        }
    }
}

fn progress(
    tx: &mpsc::Sender<Outgoing>,
    id: &str,
    technique: Technique,
    step: &str,
    detail: String,
) {
    // Progress is dropped rather than waited for when the application does not read.
    let _ = tx.try_send(Outgoing::event(
        id,
        Event::Progress {
            technique,
            step: step.to_owned(),
            detail,
        },
    ));
}

fn ok(
    id: &str,
    technique: Technique,
    remote: String,
    rtt: Option<Duration>,
    fd: OwnedFd,
) -> Outgoing {
    Outgoing {
        reply: Reply {
            id: id.to_owned(),
            event: Event::Ok {
                technique,
                direct: technique != Technique::Relay,
                remote,
                rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
                fd: true,
            },
        },
        fd: Some(fd),
    }
}

fn elapsed_ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// Whom a connection is for.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// The remote daemon.
    pub(super) peer: PeerId,
    /// The socket's transport.
    pub(super) proto: Proto,
    /// The service on it ([`signal::OFFER_SERVICE`] for an answered offer).
    pub(super) service: String,
    /// The offer's token (a fresh one otherwise).
    pub(super) token: Option<[u8; 16]>,
    /// Relayed addresses of the peer besides our relays' (an offer's).
    pub(super) via: Vec<Multiaddr>,
}

/// Reaches `peer` through the relays and opens the daemons' stream to it.
async fn open(
    ctx: &Ctx,
    peer: PeerId,
    via: Vec<Multiaddr>,
) -> Result<libp2p::Stream, (ErrorCode, String)> {
    let (reply, reached) = oneshot::channel();
    ctx.commands
        .send(Command::Reach { peer, via, reply })
        .await
        .map_err(|_| (ErrorCode::Internal, "the daemon is stopping".to_owned()))?;
    let offline = |why: String| {
        (
            ErrorCode::PeerOffline,
            format!("{peer} cannot be reached through this daemon's relays: {why}"),
        )
    };
    match tokio::time::timeout(OPEN_TIMEOUT, reached).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(offline(e)),
        Ok(Err(_)) => return Err((ErrorCode::Internal, "the daemon is stopping".into())),
        Err(_) => return Err(offline(format!("no connection within {OPEN_TIMEOUT:?}"))),
    }
    tokio::time::timeout(
        OPEN_TIMEOUT,
        ctx.control.clone().open_stream(peer, signal::PROTOCOL),
    )
    .await
    .map_err(|_| offline("the stream did not open in time".into()))?
    .map_err(|e| match e {
        libp2p_stream::OpenStreamError::UnsupportedProtocol(_) => (
            ErrorCode::PeerOffline,
            format!(
                "{peer} is not a natpunch daemon (it does not speak {})",
                signal::PROTOCOL
            ),
        ),
        e => offline(e.to_string()),
    })
}

/// Connects this end's application `id` to `service` on `peer`; the final event (`ok` with the
/// socket, or `error`). Progress goes to `tx` as it happens.
pub(super) async fn initiate(
    ctx: Arc<Ctx>,
    id: &str,
    target: Target,
    tx: &mpsc::Sender<Outgoing>,
) -> Outgoing {
    let Target {
        peer,
        proto,
        service,
        ..
    } = target.clone();
    let start = Instant::now();
    let mut record = ConnectionRecord::begin("initiator", ctx.peer_id, peer, &service, proto);
    // Every step has its own bound; this one holds whatever a step forgot, so that an
    // application never waits for ever.
    let result = tokio::time::timeout(
        MAX_CONNECT,
        initiate_inner(&ctx, id, target, tx, start, &mut record),
    )
    .await
    .unwrap_or_else(|_| {
        Err((
            ErrorCode::Timeout,
            format!("no socket within {MAX_CONNECT:?}"),
        ))
    });
    record.time_to_socket_ms = elapsed_ms(start);
    let out = match result {
        Ok(out) => out,
        Err((code, message)) => {
            record.error = Some(format!("{code}: {message}"));
            Outgoing::error(id, code, message)
        }
    };
    ctx.report(DaemonEvent::Connection(Box::new(record)));
    out
}

async fn initiate_inner(
    ctx: &Ctx,
    id: &str,
    target: Target,
    tx: &mpsc::Sender<Outgoing>,
    start: Instant,
    record: &mut ConnectionRecord,
) -> Result<Outgoing, (ErrorCode, String)> {
    let Target {
        peer,
        proto,
        service,
        token,
        via,
    } = target;
    if peer == ctx.peer_id {
        return Err((
            ErrorCode::BadRequest,
            "that is this daemon's own peer ID".into(),
        ));
    }
    if ctx.state().reservations.is_empty() {
        return Err((
            ErrorCode::NoRelay,
            "this daemon holds no relay reservation yet (see its log, or `status`)".into(),
        ));
    }
    progress(
        tx,
        id,
        Technique::Relay,
        "reaching",
        format!("dialling {peer} through the relays"),
    );
    let nutss = ctx.config.nutss_ttl.is_some();
    let ports = Ports::fresh(proto, nutss)
        .map_err(|e| (ErrorCode::Internal, format!("no free local port: {e}")))?;
    // Reaching the peer and learning this end's own ports (STUN, when the NAT does not keep
    // them) overlap.
    let (stream, (ours, _held)) =
        tokio::join!(open(ctx, peer, via.clone()), candidates(ctx, proto, ports));
    let mut stream = Some(stream?);
    record.offered = all_candidates(&ours);
    let offline = |why: String| {
        (
            ErrorCode::PeerOffline,
            format!("{peer} cannot be reached through this daemon's relays: {why}"),
        )
    };
    let token: [u8; 16] = token.unwrap_or_else(rand::random);
    // With a mapped direct port, the other end may dial it (reversal): wait for it from now.
    let mut expected = if ours.direct.is_empty() {
        None
    } else {
        ctx.waiters.expect(token, Side::Initiator)
    };
    let hello = Message::Hello {
        service: service.clone(),
        proto,
        token: signal::token_hex(&token),
        nat: ctx.state().nat,
        candidates: ours.clone(),
    };
    // A relayed connection can be dead without knowing it yet (the other end's router got a
    // new address, and the relay still holds its old connection): when the first answer does
    // not come in time and the peer has not answered a ping lately either, the connection is
    // dropped and made again, once. A peer that answers pings is only slow: wait on.
    let mut attempt = 0u32;
    let mut forgot = false;
    let (mut sig, their_nat, theirs) = loop {
        attempt += 1;
        let s = match stream.take() {
            Some(s) => s,
            None => open(ctx, peer, via.clone()).await?,
        };
        let mut sig = Signal::new(s);
        sig.send(&hello)
            .await
            .map_err(|e| offline(format!("the stream broke: {e}")))?;
        progress(
            tx,
            id,
            Technique::Relay,
            "candidates-sent",
            format!(
                "{} addresses through the relay",
                ours.udp.len() + ours.tcp.len() + ours.nutss.len() + ours.direct.len()
            ),
        );
        let wait = if forgot {
            ANSWER_TIMEOUT
        } else {
            FIRST_ANSWER_TIMEOUT
        };
        let mut answer = tokio::time::timeout(wait, sig.recv()).await;
        match &answer {
            // The stream was reset at once: libp2p drops an inbound stream that its receiver
            // does not take at once, as in a burst of connections to one daemon. Again, after
            // a random pause that spreads the burst.
            Ok(Ok(None) | Err(_)) if attempt < MAX_HELLOS => {
                let pause = rand::random_range(20..200) * u64::from(attempt);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
            // No answer: a relayed connection that died without knowing it, or a slow peer.
            Err(_) if !forgot => {
                forgot = true;
                let (reply, forgotten) = oneshot::channel();
                let _ = ctx.commands.send(Command::Forget { peer, reply }).await;
                match tokio::time::timeout(OPEN_TIMEOUT, forgotten).await {
                    // Alive, only slow: wait on.
                    Ok(Ok(false)) => {
                        answer = tokio::time::timeout(ANSWER_TIMEOUT - wait, sig.recv()).await;
                    }
                    _ => {
                        progress(
                            tx,
                            id,
                            Technique::Relay,
                            "reaching",
                            format!("no answer within {wait:?}: dialling {peer} again"),
                        );
                        continue;
                    }
                }
            }
            _ => {}
        }
        match answer {
            Ok(Ok(Some(Message::Welcome { nat, candidates }))) => break (sig, nat, candidates),
            Ok(Ok(Some(Message::Refuse { code, message }))) => return Err((code, message)),
            Ok(Ok(Some(other))) => {
                return Err((
                    ErrorCode::Internal,
                    format!("the remote daemon answered out of turn: {other:?}"),
                ));
            }
            Ok(Ok(None)) => return Err(offline("it closed the stream".into())),
            Ok(Err(e)) => return Err((ErrorCode::Internal, format!("the remote daemon: {e}"))),
            Err(_) => return Err(offline(format!("no answer within {ANSWER_TIMEOUT:?}"))),
        }
    };
    let mut implemented = direct_techniques(ctx, proto);
    if proto == Proto::Udp {
        implemented.push(Technique::UdpBirthday);
    }
    if !theirs.direct.is_empty() {
        implemented.push(Technique::Direct);
    }
    if expected.is_some() {
        implemented.push(Technique::Reversal);
    }
    let settings = ctx.config.birthday;
    let stages: Vec<plan::Stage> = plan::plan(
        &nat_of(ctx.state().nat, &ours),
        &nat_of(their_nat, &theirs),
        proto,
    )
    .into_iter()
    .map(|mut s| {
        s.techniques.retain(|t| implemented.contains(t));
        if s.techniques.contains(&Technique::UdpBirthday) {
            s.budget = settings.deadline;
        }
        s
    })
    .filter(|s| !s.techniques.is_empty())
    .collect();
    // The stages' budgets run from here, once both ends know each other's candidates.
    let planned = Instant::now();
    let mut seq = Sequencer::new(planned, stages);
    let mut running = Running::new();
    let deadline = tokio::time::Instant::from_std(planned + DEADLINE);
    let mut made: HashMap<Technique, Punch> = HashMap::new();
    let relay_remote = format!("/p2p-circuit/p2p/{peer}");
    let delivered = loop {
        let mut decided = None;
        while let Some(action) = seq.poll_action() {
            match action {
                Action::Start(Technique::Relay) => seq.connected(
                    Instant::now(),
                    Technique::Relay,
                    Connected {
                        remote: relay_remote.clone(),
                        rtt: None,
                    },
                ),
                Action::Start(Technique::Reversal) => {
                    progress(
                        tx,
                        id,
                        Technique::Reversal,
                        "waiting",
                        format!("for a dial of this end's direct port {:?}", ours.direct),
                    );
                    let rx = expected.as_mut().and_then(direct::Expected::take);
                    running.start_wait(Technique::Reversal, rx, deadline);
                }
                Action::Start(Technique::UdpBirthday) => {
                    let easy = nat_of(ctx.state().nat, &ours).independent();
                    progress(
                        tx,
                        id,
                        Technique::UdpBirthday,
                        if easy { "probing" } else { "opening" },
                        format!(
                            "{} towards {:?}",
                            if easy {
                                "random ports"
                            } else {
                                "many mappings"
                            },
                            theirs.udp.first()
                        ),
                    );
                    running.start_birthday(
                        &settings,
                        easy,
                        ports.of(Technique::UdpBirthday),
                        theirs.udp.first().copied(),
                        theirs.udp_next,
                        token,
                        deadline,
                    );
                }
                Action::Start(t) => {
                    progress(
                        tx,
                        id,
                        t,
                        "probing",
                        format!("{} candidates", theirs.of(t).len()),
                    );
                    running.start(
                        t,
                        proto,
                        ports.of(t),
                        theirs.of(t).to_vec(),
                        token,
                        Side::Initiator,
                        ctx.config.nutss_ttl,
                        deadline,
                    );
                }
                Action::Stop(t) => {
                    running.stop(t);
                    made.remove(&t);
                }
                Action::Deliver { technique, .. } => decided = Some(Ok(technique)),
                Action::Fail { code, message } => decided = Some(Err((code, message))),
            }
        }
        if let Some(decided) = decided {
            break decided;
        }
        let wake = seq
            .poll_timeout()
            .map_or(deadline, tokio::time::Instant::from_std);
        tokio::select! {
            Some((t, result)) = running.next() => match result {
                Ok(punch) => {
                    let connected = Connected {
                        remote: punch.remote.to_string(),
                        rtt: punch.rtt,
                    };
                    made.insert(t, punch);
                    seq.connected(Instant::now(), t, connected);
                }
                Err(e) => {
                    progress(tx, id, t, "failed", e.clone());
                    seq.failed(Instant::now(), t, &e);
                }
            },
            () = tokio::time::sleep_until(wake) => seq.handle_timeout(Instant::now()),
        }
    };
    let offset = ms(planned.saturating_duration_since(start));
    record.tried = seq
        .tried()
        .iter()
        .map(|t| {
            let mut r = TriedRecord::from(t);
            r.started_ms += offset;
            r.ended_ms = r.ended_ms.map(|e| e + offset);
            r
        })
        .collect();
    record.birthday = running.birthday_record();
    let technique = delivered?;
    for t in direct_techniques(ctx, proto) {
        if t != technique {
            running.stop(t);
        }
    }
    record.technique = Some(technique);
    record.direct = technique != Technique::Relay;
    if technique == Technique::Relay {
        sig.send(&Message::UseRelay).await.map_err(|e| {
            (
                ErrorCode::Internal,
                format!("the relayed stream broke: {e}"),
            )
        })?;
        let fd = bridge_relayed(proto, sig.into_relayed())
            .map_err(|e| (ErrorCode::Internal, format!("making the socket pair: {e}")))?;
        return Ok(ok(id, technique, relay_remote, None, fd));
    }
    let punch = made.remove(&technique).ok_or_else(|| {
        (
            ErrorCode::Internal,
            "the winning socket went missing".to_owned(),
        )
    })?;
    // The responder hands over the same technique's socket; the stream is done after it.
    let _ = sig.send(&Message::Chose { technique }).await;
    let _ = sig.stream.close().await;
    Ok(ok(
        id,
        technique,
        punch.remote.to_string(),
        punch.rtt,
        punch.made.into_fd(),
    ))
}

/// Answers a remote daemon's stream: checks the service, runs the techniques, and hands the
/// listening application the socket the initiator chose.
pub(super) async fn respond(ctx: Arc<Ctx>, peer: PeerId, stream: libp2p::Stream) {
    let start = Instant::now();
    let mut sig = Signal::new(stream);
    let Ok(Ok(Some(Message::Hello {
        service,
        proto,
        token,
        nat: their_nat,
        candidates: theirs,
    }))) = tokio::time::timeout(ANSWER_TIMEOUT, sig.recv()).await
    else {
        return;
    };
    let Some(token) = signal::parse_token(&token) else {
        return;
    };
    let mut record = ConnectionRecord::begin("responder", ctx.peer_id, peer, &service, proto);
    let Some(destination) = ctx.destination(&service, proto, token) else {
        let proto_name = proto.as_str();
        let message = if service == signal::OFFER_SERVICE {
            format!(
                "{} holds no open {proto_name} offer with that token",
                ctx.peer_id
            )
        } else {
            format!(
                "nothing listens on service `{service}` ({proto_name}) on {}",
                ctx.peer_id
            )
        };
        let _ = sig
            .send(&Message::Refuse {
                code: ErrorCode::NoService,
                message,
            })
            .await;
        return;
    };
    let result = tokio::time::timeout(
        MAX_CONNECT,
        respond_inner(
            &ctx,
            sig,
            peer,
            proto,
            destination,
            token,
            their_nat,
            &theirs,
            start,
            &mut record,
        ),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no socket within {MAX_CONNECT:?}")));
    record.time_to_socket_ms = elapsed_ms(start);
    if let Err(e) = result {
        record.error = Some(e);
    }
    ctx.report(DaemonEvent::Connection(Box::new(record)));
}

#[allow(clippy::too_many_arguments)]
async fn respond_inner(
    ctx: &Ctx,
    mut sig: Signal,
    peer: PeerId,
    proto: Proto,
    destination: (String, mpsc::Sender<Outgoing>),
    token: [u8; 16],
    their_nat: NatInfo,
    theirs: &Candidates,
    start: Instant,
    record: &mut ConnectionRecord,
) -> Result<(), String> {
    let nutss = ctx.config.nutss_ttl.is_some();
    let ports = Ports::fresh(proto, nutss).map_err(|e| format!("no free local port: {e}"))?;
    let (ours, _held) = candidates(ctx, proto, ports).await;
    record.offered = all_candidates(&ours);
    // The initiator may dial this end's direct port (direct, seen from there): wait for it
    // before it learns the port; this end dials the initiator's (reversal).
    let mut expected = if ours.direct.is_empty() {
        None
    } else {
        ctx.waiters.expect(token, Side::Responder)
    };
    let local_nat = nat_of(ctx.state().nat, &ours);
    sig.send(&Message::Welcome {
        nat: ctx.state().nat,
        candidates: ours,
    })
    .await
    .map_err(|e| format!("the stream broke: {e}"))?;
    let deadline = tokio::time::Instant::from_std(start + DEADLINE);
    let mut running = Running::new();
    let mut tried: Vec<TriedRecord> = Vec::new();
    let mut techniques = direct_techniques(ctx, proto);
    // Where a punch cannot work and birthday probing can, it runs instead (the two would share
    // the UDP port): the same choice the initiator's plan makes from the same two NATs.
    let remote_nat = nat_of(their_nat, theirs);
    if proto == Proto::Udp
        && !plan::punchable(&local_nat, &remote_nat)
        && plan::birthday(&local_nat, &remote_nat)
    {
        techniques = vec![Technique::UdpBirthday];
    }
    if let Some(rx) = expected.as_mut().and_then(direct::Expected::take) {
        running.start_wait(Technique::Direct, Some(rx), deadline);
        tried.push(TriedRecord {
            technique: technique_name(Technique::Direct).to_owned(),
            started_ms: elapsed_ms(start),
            ended_ms: None,
            result: "running".into(),
        });
    }
    if !theirs.direct.is_empty() {
        techniques.push(Technique::Reversal);
    }
    for t in techniques {
        // Nothing to aim at: the initiator offers none for a technique it does not run.
        if theirs.of(t).is_empty() {
            continue;
        }
        if t == Technique::UdpBirthday {
            running.start_birthday(
                &ctx.config.birthday,
                local_nat.independent(),
                ports.of(t),
                theirs.udp.first().copied(),
                theirs.udp_next,
                token,
                deadline,
            );
        } else {
            running.start(
                t,
                proto,
                ports.of(t),
                theirs.of(t).to_vec(),
                token,
                Side::Responder,
                ctx.config.nutss_ttl,
                deadline,
            );
        }
        tried.push(TriedRecord {
            technique: technique_name(t).to_owned(),
            started_ms: elapsed_ms(start),
            ended_ms: None,
            result: "running".into(),
        });
    }
    let mut results: HashMap<Technique, Result<Punch, String>> = HashMap::new();
    let mut chosen: Option<Technique> = None;
    let end = |tried: &mut Vec<TriedRecord>, t: Technique, result: &str| {
        if let Some(r) = tried
            .iter_mut()
            .find(|r| r.technique == technique_name(t) && r.ended_ms.is_none())
        {
            r.ended_ms = Some(elapsed_ms(start));
            result.clone_into(&mut r.result);
        }
    };
    // Why the initiator's stream broke, if it did before its choice came.
    let mut broken: Option<String> = None;
    let outcome: Result<(Technique, String, Option<Duration>, OwnedFd), String> = loop {
        if let Some(why) = &broken {
            // The choice cannot come any more (the relayed connection went, say because
            // opening many mappings evicted it from a shallow session table). A birthday
            // socket was picked by the other end's ack, so it is the one the other end holds;
            // nothing else can be told apart.
            let birthday = Technique::UdpBirthday;
            match after_break(
                results.get(&birthday).map(Result::is_ok),
                running.handles.contains_key(&birthday),
            ) {
                AfterBreak::Take => chosen = Some(birthday),
                AfterBreak::Wait => {}
                AfterBreak::Fail => break Err(why.clone()),
            }
        }
        if let Some(t) = chosen {
            match results.remove(&t) {
                Some(Ok(punch)) => {
                    break Ok((t, punch.remote.to_string(), punch.rtt, punch.made.into_fd()));
                }
                Some(Err(e)) => break Err(format!("{}: {e}", technique_name(t))),
                None => {}
            }
        }
        tokio::select! {
            message = sig.recv(), if chosen.is_none() && broken.is_none() => match message {
                Ok(Some(Message::Chose { technique })) => chosen = Some(technique),
                Ok(Some(Message::UseRelay)) => break Err(String::new()),
                Ok(Some(other)) => break Err(format!("the initiator said something out of turn: {other:?}")),
                Ok(None) => broken = Some("the initiator went away".into()),
                Err(e) => broken = Some(format!("the initiator's stream: {e}")),
            },
            Some((t, result)) = running.next() => {
                end(&mut tried, t, match &result { Ok(_) => "ok", Err(e) => e });
                results.insert(t, result);
            }
            () = tokio::time::sleep_until(deadline) => break Err(format!("no decision within {DEADLINE:?}")),
        }
    };
    for t in direct_techniques(ctx, proto) {
        running.stop(t);
        end(&mut tried, t, "stopped");
    }
    record.tried = tried;
    record.birthday = running.birthday_record();
    let (technique, remote, rtt, fd) = match outcome {
        Ok(o) => o,
        // The relay: the stream carries the applications' bytes from here on.
        Err(e) if e.is_empty() => {
            let fd = bridge_relayed(proto, sig.into_relayed())
                .map_err(|e| format!("making the socket pair: {e}"))?;
            (
                Technique::Relay,
                format!("/p2p-circuit/p2p/{peer}"),
                None,
                fd,
            )
        }
        Err(e) => return Err(e),
    };
    record.technique = Some(technique);
    record.direct = technique != Technique::Relay;
    let (id, out) = destination;
    out.send(ok(&id, technique, remote, rtt, fd))
        .await
        .map_err(|_| "the listening application went away".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_stream_takes_only_an_acknowledged_birthday_socket() {
        assert_eq!(after_break(Some(true), false), AfterBreak::Take);
        assert_eq!(after_break(None, true), AfterBreak::Wait);
        // Birthday probing failed, or never ran (a punch socket cannot be told apart).
        assert_eq!(after_break(Some(false), false), AfterBreak::Fail);
        assert_eq!(after_break(None, false), AfterBreak::Fail);
    }
}

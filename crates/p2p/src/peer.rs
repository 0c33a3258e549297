//! The hole-punching peer: relay reservation or relayed dial, then DCUtR to a direct
//! connection, with a [`Record`] of every hole punch on both sides.
//!
//! The peer is the driver of the sans-IO engine in [`crate::punch`], one engine per hole punch
//! in progress: it turns swarm events, handshake streams and timers into the engine's events,
//! and carries out the engine's actions (open a stream, send, dial, close, report the record).
//! With [`Engine::Natpunch`] (the default) the engine speaks DCUtR itself and sees every step
//! on both sides; with [`Engine::Stock`] rust-libp2p's `dcutr` behaviour punches and the engine
//! only watches it, for side-by-side comparisons.
//!
//! The addresses offered in CONNECT are, with `Candidates::Observed`, the addresses the relay
//! observed (identify's `observed_addr`, untouched), or with `Candidates::Stock` identify's
//! candidates, which replace the observed port with the listen port and so point at a port the
//! NAT never mapped when it does not preserve ports. Mapped ports ([`PeerConfig::port_mapping`])
//! come first.
//!
//! Each peer knows its NAT's mapping class when it can, and says where from
//! ([`PeerConfig::local_mapping`]: a flag or an RFC 5780 check, given before it starts; else
//! what the relay and the peers it dials observe of its listen port, [`crate::observed`]).
//! The engine tells it to natpunch remotes over [`NATPUNCH_DCUTR_CLASSES`], and the two
//! classes choose the first attempt's form; every record keeps both.
//!
//! What else lives beside it: start-up (`setup`), the swarm (`swarm`), port mapping
//! (`mapping`), throughput tests ([`perf`]), the handshake streams' I/O (`streams`), and
//! what is known of each connected remote (`remotes`). Everything fed by the network is
//! bounded ([`defaults`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, dcutr, identify, ping};

use crate::birthday::{HardEnd, open_hard};
use crate::observed::{MAX_OBSERVATIONS, Observation};
use crate::punch::{
    self, Action, BirthdayConfig, DirectConnection, Handshake, Peers, Punch, PunchConfig,
    RemoteEngine, StreamId, is_relayed, transport_of,
};
use crate::record::{Outcome, Record, Side};

mod config;
pub mod defaults;
pub mod mapping;
pub mod perf;
mod quic_socket;
mod remotes;
mod setup;
mod streams;
mod swarm;

pub use crate::punch::{
    DCUTR, Engine, LocalMapping, MappingSource, NATPUNCH_DCUTR, NATPUNCH_DCUTR_CLASSES, Transport,
};
pub use config::{Candidates, Dht, Mode, PeerConfig, PeerError, PeerEvent, PeerStats};
pub use perf::{MAX_PERF_BYTES, PERF};

use defaults::MAX_SESSIONS;
use mapping::{MappingEvent, PortMapping};
use remotes::{Direct, Remotes};
use streams::{StreamEvent, Streams};
use swarm::{
    PeerBehaviour, PeerBehaviourEvent, dial_failed, endpoint_relayed, made_by_a, relay_addrs,
    remote_addr,
};

/// How a birthday-probing hard side ended: the local port and the probe number of the socket a
/// probe reached, nothing by the deadline, or the sockets' error.
type HardSide = std::io::Result<Option<(u16, u32)>>;

/// A hole-punching peer.
pub struct Peer {
    swarm: Swarm<PeerBehaviour>,
    config: PeerConfig,
    relay: PeerId,
    relay_addrs: Vec<Multiaddr>,
    control: libp2p_stream::Control,
    /// The hole punches in progress, at most [`MAX_SESSIONS`].
    sessions: HashMap<PeerId, Punch>,
    /// Their handshake streams.
    streams: Streams,
    /// Records of hole punches that ended, not yet reported (one per session at most).
    finished: VecDeque<(PeerId, Record)>,
    /// Throughput tests being received, at most [`defaults::MAX_PERF_SINKS`].
    perf_sinks: tokio::task::JoinSet<()>,
    /// Observed addresses, from identify on the relay connections.
    observed: Vec<Multiaddr>,
    /// identify's candidates (stock).
    stock_candidates: Vec<Multiaddr>,
    /// The remotes connected now: which side of the relayed connection we are, their direct
    /// connections, their engine.
    remotes: Remotes,
    /// Relayed dials in flight (dial mode).
    relayed: HashMap<ConnectionId, PeerId>,
    /// Relayed connections up.
    relayed_conns: HashMap<ConnectionId, PeerId>,
    /// The first ping to the relay itself.
    to_relay_rtt: Option<Duration>,
    /// The listen ports' mappings on the local router, held while the peer runs.
    mapping: Option<PortMapping>,
    /// What the relay and the peers this peer dialed observed of it (at most
    /// [`crate::observed::MAX_OBSERVATIONS`]).
    observations: Vec<Observation>,
    /// The mapping class those observations say, once they say one.
    observed_mapping: Option<LocalMapping>,
    /// A duplicate of the QUIC endpoint's socket, for birthday probes: looked for at the first
    /// probe (`Some(None)`: not found).
    quic_socket: Option<Option<std::net::UdpSocket>>,
    /// Birthday probing's hard sides in progress (one per session at most): the port and the
    /// probe number of the socket a probe reached, or nothing by the deadline.
    hard_sides: tokio::task::JoinSet<(PeerId, HardSide)>,
    /// How to stop each of them.
    hard_side_handles: HashMap<PeerId, tokio::task::AbortHandle>,
    /// The QUIC listeners on ports birthday probing found, one per remote at most, held while
    /// a connection may use them.
    probed_listeners: HashMap<PeerId, (ListenerId, u16)>,
    /// Port prediction in progress, one per session at most: the port this peer's NAT is
    /// expected to give its next mapping, if two fresh ones say it allocates in order.
    predictions: tokio::task::JoinSet<(PeerId, Option<u16>)>,
    /// Probed ports' listeners to drop unless a connection came in on them by then (one per
    /// ended session, at most [`MAX_SESSIONS`]).
    probed_checks: tokio::task::JoinSet<PeerId>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("peer_id", self.swarm.local_peer_id())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Builds the peer (inside a tokio runtime).
    pub fn new(key: Keypair, config: PeerConfig) -> Result<Self, PeerError> {
        let (relay, relay_addrs) = relay_addrs(&config)?;
        let swarm = swarm::build(key, &config)?;
        let control = swarm.behaviour().stream.new_control();
        Ok(Self {
            swarm,
            config,
            relay,
            relay_addrs,
            control,
            sessions: HashMap::new(),
            streams: Streams::default(),
            finished: VecDeque::new(),
            perf_sinks: tokio::task::JoinSet::new(),
            observed: Vec::new(),
            stock_candidates: Vec::new(),
            remotes: Remotes::default(),
            relayed: HashMap::new(),
            relayed_conns: HashMap::new(),
            to_relay_rtt: None,
            mapping: None,
            observations: Vec::new(),
            observed_mapping: None,
            quic_socket: None,
            hard_sides: tokio::task::JoinSet::new(),
            hard_side_handles: HashMap::new(),
            probed_listeners: HashMap::new(),
            predictions: tokio::task::JoinSet::new(),
            probed_checks: tokio::task::JoinSet::new(),
        })
    }

    /// How much state the peer holds now.
    pub fn stats(&self) -> PeerStats {
        PeerStats {
            sessions: self.sessions.len(),
            remotes: self.remotes.len(),
            remotes_refused: self.remotes.refused(),
            handshakes: self.streams.len(),
            perf_sinks: self.perf_sinks.len(),
            relayed: self.relayed.len() + self.relayed_conns.len(),
            stock_candidates: self.stock_candidates.len(),
            port_map_reports_dropped: self.mapping.as_ref().map_or(0, PortMapping::dropped),
        }
    }

    /// This peer's ID.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// The addresses this peer listens on (relayed ones included once reserved).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.swarm.listeners().cloned().collect()
    }

    /// Runs `mode` until `stop` completes (listen) or the one hole punch ends (dial), reporting
    /// to `report`. Returns the dial's outcome.
    pub async fn run(
        &mut self,
        mode: Mode,
        stop: impl Future<Output = ()>,
        report: &mut impl FnMut(PeerEvent),
    ) -> Result<Option<Outcome>, PeerError> {
        tokio::pin!(stop);
        tokio::select! {
            r = self.setup(mode, report) => r?,
            () = &mut stop => return Ok(None),
        }
        // The stock engine's `dcutr` behaviour answers DCUtR itself; natpunch's protocols are
        // then not offered at all, so a natpunch remote falls back to plain DCUtR.
        let (mut incoming, mut fast, mut classes) = if self.config.engine == Engine::Natpunch {
            let accept = |c: &mut libp2p_stream::Control, p: StreamProtocol| {
                c.accept(p.clone())
                    .map_err(|e| PeerError::Setup(format!("accepting {p}: {e}")))
            };
            (
                Some(accept(&mut self.control, DCUTR)?),
                Some(accept(&mut self.control, NATPUNCH_DCUTR)?),
                Some(accept(&mut self.control, NATPUNCH_DCUTR_CLASSES)?),
            )
        } else {
            (None, None, None)
        };
        let mut perf = self
            .control
            .accept(PERF)
            .map_err(|e| PeerError::Setup(format!("accepting {PERF}: {e}")))?;
        if let Mode::Dial(target) = mode {
            let addr = self.relay_addrs[0]
                .clone()
                .with(Protocol::P2pCircuit)
                .with(Protocol::P2p(target));
            let opts = DialOpts::peer_id(target)
                .addresses(vec![addr])
                .condition(PeerCondition::Always)
                .build();
            let id = opts.connection_id();
            if let Err(e) = self.swarm.dial(opts) {
                self.no_connection(target, e.to_string());
            }
            self.relayed.insert(id, target);
        }
        loop {
            let outcome = self.flush(mode, report);
            if outcome == Some(Outcome::NoConnection) {
                return Ok(outcome);
            }
            if let Some(outcome) = outcome {
                if let (Mode::Dial(target), Some(bytes)) = (mode, self.config.perf_bytes) {
                    self.perf(target, bytes, &mut stop, report).await;
                }
                self.linger(&mut stop).await;
                return Ok(Some(outcome));
            }
            let wake = self.next_deadline();
            tokio::select! {
                () = &mut stop => return Ok(None),
                event = self.swarm.select_next_some() => self.on_swarm(event, report),
                (peer, id, event) = self.streams.next() => self.on_stream(peer, id, event),
                Some((peer, stream)) = next_stream(incoming.as_mut()) => {
                    self.on_inbound_stream(peer, stream, Handshake::Dcutr);
                }
                Some((peer, stream)) = next_stream(fast.as_mut()) => {
                    self.on_inbound_stream(peer, stream, Handshake::Natpunch);
                }
                Some((peer, stream)) = next_stream(classes.as_mut()) => {
                    self.on_inbound_stream(peer, stream, Handshake::NatpunchClasses);
                }
                Some((peer, stream)) = perf.next() => self.on_perf_stream(peer, stream),
                Some(_) = self.perf_sinks.join_next() => {}
                Some(joined) = self.hard_sides.join_next() => {
                    if let Ok((peer, result)) = joined {
                        self.on_hard_side(peer, result);
                    }
                }
                Some(Ok(peer)) = self.probed_checks.join_next() => {
                    if !self.sessions.contains_key(&peer) && !self.on_probed_listener(peer) {
                        self.drop_probed_listener(peer);
                    }
                }
                Some(joined) = self.predictions.join_next() => {
                    if let Ok((peer, Some(port))) = joined {
                        self.with_session(peer, |s| s.predicted(port));
                    }
                }
                event = mapping_event(self.mapping.as_mut()) => match event {
                    MappingEvent::Changed => self.on_mapping_changed(report),
                    MappingEvent::Report(update) => {
                        report(PeerEvent::PortMapUpdate { update });
                    }
                },
                () = sleep_until(wake) => {}
            }
            self.tick(Instant::now());
        }
    }

    /// Keeps the swarm running for `linger` (or until `stop`).
    async fn linger(&mut self, stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>) {
        let until = tokio::time::Instant::now() + self.config.linger;
        loop {
            tokio::select! {
                () = stop.as_mut() => return,
                () = tokio::time::sleep_until(until) => return,
                _ = self.swarm.select_next_some() => {}
            }
        }
    }

    /// The settings of a hole punch on `side`, and who it is between.
    fn punch_setup(&self, side: Side, remote: PeerId) -> (PunchConfig, Peers) {
        let c = &self.config;
        let config = PunchConfig {
            side,
            engine: c.engine,
            candidates: format!("{:?}", c.candidates).to_lowercase(),
            transport: c.transport,
            attempt_timeout: c.attempt_timeout,
            max_attempts: c.max_attempts,
            punch: c.punch,
            local_mapping: c.local_mapping.or(self.observed_mapping),
            classes: true,
            birthday: c.birthday.enabled.then(|| BirthdayConfig {
                sockets: c.birthday.hard_sockets(),
                probes: c.birthday.probes,
                rate: c.birthday.rate,
                token: rand::random(),
                seed: rand::random(),
                window: c.birthday.window,
            }),
        };
        let peers = Peers {
            local: self.peer_id().to_string(),
            remote: remote.to_string(),
            relay: self.relay.to_string(),
        };
        (config, peers)
    }

    /// A remote at `observer` observed this peer at `observed` on a connection this peer
    /// dialed: unless told its class, the peer learns it from such observations.
    fn observe(&mut self, observer: std::net::IpAddr, observed: Multiaddr) {
        if self.config.local_mapping.is_some() || self.observations.len() >= MAX_OBSERVATIONS {
            return;
        }
        self.observations.push((observer, observed));
        let own = self.listen_addrs();
        if let Some(mapping) = crate::observed::infer_mapping(&self.observations, &own) {
            if self.observed_mapping.map(|l| l.mapping) != Some(mapping) {
                tracing::debug!(%mapping, "the NAT's mapping, as remotes observe it");
            }
            self.observed_mapping = Some(LocalMapping {
                mapping,
                source: MappingSource::Observed,
            });
        }
    }

    /// The relayed dial to `target` failed: the record says so.
    fn no_connection(&mut self, target: PeerId, error: String) {
        let (config, peers) = self.punch_setup(Side::Dialer, target);
        let record = Punch::no_connection(Instant::now(), unix_ms(), config, peers, error);
        self.finished.push_back((target, record));
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        self.sessions
            .values()
            .filter_map(Punch::poll_timeout)
            .min()
            .unwrap_or(far)
    }

    /// Lets every session whose time came handle it.
    fn tick(&mut self, now: Instant) {
        let due: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.poll_timeout().is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            self.with_session(peer, |s| s.handle_timeout(now));
        }
    }

    /// Reports the records of the hole punches that ended; returns the dial's outcome when
    /// its record is among them.
    fn flush(&mut self, mode: Mode, report: &mut impl FnMut(PeerEvent)) -> Option<Outcome> {
        let mut outcome = None;
        while let Some((peer, mut record)) = self.finished.pop_front() {
            record.to_relay_rtt_ms = self.to_relay_rtt.map(|d| d.as_secs_f64() * 1000.0);
            if mode == Mode::Dial(peer) {
                outcome = Some(record.outcome);
            }
            report(PeerEvent::HolePunch(Box::new(record)));
        }
        outcome
    }

    /// Feeds `peer`'s session with `event` and carries out what it asks for.
    fn with_session(&mut self, peer: PeerId, event: impl FnOnce(&mut Punch)) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        event(session);
        while let Some(action) = self.sessions.get_mut(&peer).and_then(Punch::poll_action) {
            self.act(peer, action);
        }
    }

    fn act(&mut self, peer: PeerId, action: Action) {
        match action {
            Action::Open { stream, handshake } => {
                self.streams
                    .open(self.control.clone(), peer, stream, handshake);
            }
            Action::Send { stream, message } => self.streams.send(peer, stream, message),
            Action::CloseStream { stream } => self.streams.close(peer, stream),
            Action::Dial {
                addrs, as_listener, ..
            } => {
                let mut opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::Always);
                if as_listener {
                    opts = opts.override_role();
                }
                let opts = opts.build();
                let id = opts.connection_id();
                let result = self
                    .swarm
                    .dial(opts)
                    .map(|()| id)
                    .map_err(|e| e.to_string());
                if let Some(s) = self.sessions.get_mut(&peer) {
                    s.dialed(Instant::now(), result);
                }
            }
            Action::Close { connection } => {
                tracing::debug!(%peer, ?connection, "closing the second direct connection");
                self.swarm.close_connection(connection);
                // A connection being closed is no longer one of ours: forget it now, so a
                // record written before the close completes counts what remains.
                if let Some(r) = self.remotes.get_mut(&peer) {
                    r.directs.retain(|d| d.id != connection);
                }
            }
            Action::Probe { to, datagram } => self.send_probe(peer, to, &datagram),
            Action::OpenSockets {
                sockets,
                easy,
                token,
                until,
            } => {
                let deadline = tokio::time::Instant::from_std(until);
                let handle = self.hard_sides.spawn(async move {
                    let won = open_hard(sockets, easy, token, deadline, HardEnd::Probe).await;
                    // The winner closes here, so that QUIC can listen on its port.
                    let found = won
                        .map(|w| w.and_then(|w| Some((w.socket.local_addr().ok()?.port(), w.seq))));
                    (peer, found)
                });
                if let Some(old) = self.hard_side_handles.insert(peer, handle) {
                    old.abort();
                }
            }
            Action::StopSockets => {
                if let Some(handle) = self.hard_side_handles.remove(&peer) {
                    handle.abort();
                }
            }
            Action::Record(mut record) => {
                self.sessions.remove(&peer);
                self.streams.cancel(peer);
                if let Some(handle) = self.hard_side_handles.remove(&peer) {
                    handle.abort();
                }
                // A probed port's listener stays only while a connection on it does. The one
                // that ended the attempt may be the simultaneous one while the easy side's dial
                // of the probed port is still on its way, and of the two both sides keep the
                // one A made: the listener waits an attempt's time for it before it goes.
                let probed = record
                    .attempts
                    .iter()
                    .any(|a| a.birthday.as_ref().is_some_and(|b| b.direct));
                if !probed && self.probed_listeners.contains_key(&peer) {
                    if self.probed_checks.len() < MAX_SESSIONS {
                        let wait = self.config.attempt_timeout;
                        self.probed_checks.spawn(async move {
                            tokio::time::sleep(wait).await;
                            peer
                        });
                    } else if !self.on_probed_listener(peer) {
                        // As many checks wait as sessions may run: decide now.
                        self.drop_probed_listener(peer);
                    }
                }
                record.direct_connections = self
                    .remotes
                    .get(&peer)
                    .map_or(0, |r| u32::try_from(r.directs.len()).unwrap_or(u32::MAX));
                self.finished.push_back((peer, *record));
            }
        }
    }

    fn on_swarm(
        &mut self,
        event: SwarmEvent<PeerBehaviourEvent>,
        report: &mut impl FnMut(PeerEvent),
    ) {
        let now = Instant::now();
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } if peer_id != self.relay => {
                if endpoint_relayed(&endpoint) {
                    self.on_relayed(peer_id, connection_id, &endpoint);
                } else {
                    self.on_direct(peer_id, connection_id, &endpoint);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                num_established,
                ..
            } => {
                tracing::debug!(%peer_id, ?connection_id, ?cause, "connection closed");
                self.remotes
                    .on_closed(peer_id, connection_id, num_established);
                self.relayed_conns.remove(&connection_id);
                if num_established == 0 && !self.sessions.contains_key(&peer_id) {
                    self.drop_probed_listener(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some(target) = self.relayed.remove(&connection_id) {
                    self.no_connection(target, error.to_string());
                } else if let Some(peer) = peer_id {
                    let failed = dial_failed(&error);
                    self.with_session(peer, |s| s.dial_failed(now, connection_id, failed));
                }
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } => self.with_session(peer, |s| s.stock_dialing(now, connection_id)),
            SwarmEvent::Behaviour(PeerBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Ok(rtt),
            })) => {
                if peer == self.relay {
                    self.to_relay_rtt.get_or_insert(rtt);
                } else {
                    let relayed = self.relayed_conns.contains_key(&connection);
                    self.with_session(peer, |s| s.ping(now, relayed, rtt));
                }
            }
            SwarmEvent::Behaviour(PeerBehaviourEvent::Autonat(e))
                if !is_relayed(&e.tested_addr) =>
            {
                report(PeerEvent::Reachability {
                    address: e.tested_addr.to_string(),
                    reachable: e.result.is_ok(),
                    error: e.result.err().map(|e| e.to_string()),
                });
            }
            SwarmEvent::Behaviour(PeerBehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result: Err(error),
            })) => self.with_session(remote_peer_id, |s| s.stock_failed(now, error.to_string())),
            SwarmEvent::Behaviour(PeerBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            })) if peer_id != self.relay => {
                let dialed = self.remotes.get(&peer_id).and_then(|r| {
                    r.directs.iter().find_map(|d| match &d.endpoint {
                        ConnectedPoint::Dialer { address, .. } if d.id == connection_id => {
                            observer_ip(address)
                        }
                        _ => None,
                    })
                });
                if let Some(ip) = dialed {
                    self.observe(ip, info.observed_addr.clone());
                }
                let engine = if info.protocols.contains(&NATPUNCH_DCUTR_CLASSES) {
                    RemoteEngine::NatpunchClasses
                } else if info.protocols.contains(&NATPUNCH_DCUTR) {
                    RemoteEngine::Natpunch
                } else {
                    RemoteEngine::Other
                };
                // Only a connected remote has an entry: an answer that arrives after the last
                // connection closed makes none.
                if let Some(remote) = self.remotes.get_mut(&peer_id) {
                    remote.engine = Some(engine);
                }
                self.with_session(peer_id, |s| s.identified(now, engine));
            }
            other => self.on_background(other),
        }
    }

    /// A relayed connection came up: a hole punch starts, unless one runs with this remote
    /// or [`MAX_SESSIONS`] do.
    fn on_relayed(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let side = if endpoint.is_dialer() {
            Side::Dialer
        } else {
            Side::Listener
        };
        self.relayed.remove(&id);
        self.relayed_conns.insert(id, peer);
        let mut engine = None;
        if let Some(remote) = self.remotes.entry(peer) {
            remote.side = Some(side);
            engine = remote.engine;
        }
        if self.sessions.contains_key(&peer) {
            return;
        }
        if self.sessions.len() >= MAX_SESSIONS {
            tracing::warn!(%peer, "{MAX_SESSIONS} hole punches in progress: not punching this one");
            return;
        }
        let (config, peers) = self.punch_setup(side, peer);
        let session = Punch::new(
            Instant::now(),
            unix_ms(),
            config,
            peers,
            engine,
            self.offered(),
        );
        self.sessions.insert(peer, session);
        self.with_session(peer, |_| {});
        self.predict(peer);
    }

    /// Port prediction for `peer`'s hole punch, when this peer's NAT maps per destination (it
    /// is the hard side of any birthday probing) and a STUN server can tell: two fresh
    /// mappings, asked at once, say whether the NAT allocates in order and where next.
    fn predict(&mut self, peer: PeerId) {
        let c = &self.config;
        let hard = c
            .local_mapping
            .or(self.observed_mapping)
            .is_some_and(|l| punch::per_destination(l.mapping));
        let Some(server) = c.stun_server.filter(|_| {
            hard && self.predictions.len() < MAX_SESSIONS
                && c.birthday.enabled
                && c.birthday.window > 0
                && c.transport.quic()
                && c.engine == Engine::Natpunch
        }) else {
            return;
        };
        self.predictions.spawn(async move {
            let next = natcheck::reflector::predict_udp(server).await;
            (peer, next.map(|a| a.port()))
        });
    }

    /// The remote opened a handshake stream: its session answers it, or it is dropped.
    fn on_inbound_stream(&mut self, peer: PeerId, stream: libp2p::Stream, handshake: Handshake) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if let Some(id) = session.inbound(Instant::now(), handshake) {
            self.streams.accept(peer, id, stream, handshake);
        }
        self.with_session(peer, |_| {});
    }

    fn on_stream(&mut self, peer: PeerId, id: StreamId, event: StreamEvent) {
        let now = Instant::now();
        self.with_session(peer, |s| match event {
            StreamEvent::Opened => s.stream_opened(now, id),
            StreamEvent::Message(m) => s.message(now, id, m),
            StreamEvent::Failed { error, unsupported } => {
                s.stream_failed(now, id, error, unsupported)
            }
        });
    }

    fn on_direct(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let natpunch = self.config.engine == Engine::Natpunch;
        let in_session = self.sessions.contains_key(&peer);
        let mut extra = Vec::new();
        let mut side = None;
        if let Some(remote) = self.remotes.entry(peer) {
            side = remote.side;
            tracing::debug!(%peer, ?id, ?endpoint, ?side, "direct connection");
            remote.directs.push(Direct {
                id,
                endpoint: endpoint.clone(),
            });
            // Outside a session (whose engine decides), the same rule: keep the connection
            // the relayed connection's dialer made.
            if natpunch
                && !in_session
                && let Some(side) = side
            {
                let list: Vec<(ConnectionId, bool)> = remote
                    .directs
                    .iter()
                    .map(|d| (d.id, made_by_a(side, &d.endpoint)))
                    .collect();
                extra = punch::duplicates(&list);
                remote.directs.retain(|d| !extra.contains(&d.id));
            }
        }
        for c in extra {
            tracing::debug!(%peer, ?c, "closing the second direct connection");
            self.swarm.close_connection(c);
        }
        let on_probed_port = self
            .probed_listeners
            .get(&peer)
            .is_some_and(|(_, port)| came_in_on(endpoint, *port));
        let direct = DirectConnection {
            connection: id,
            transport: transport_of(remote_addr(endpoint)),
            dialed_here: matches!(endpoint, ConnectedPoint::Dialer { .. }),
            made_by_a: side.is_some_and(|side| made_by_a(side, endpoint)),
            on_probed_port,
        };
        self.with_session(peer, |s| s.direct(Instant::now(), &direct));
    }

    /// Birthday probing, the easy side: one probe from the QUIC endpoint's own socket.
    fn send_probe(&mut self, peer: PeerId, to: std::net::SocketAddr, datagram: &[u8]) {
        if self.quic_socket.is_none() {
            self.quic_socket = Some(self.find_quic_socket());
        }
        match &self.quic_socket {
            Some(Some(socket)) => {
                if let Err(e) = socket.send_to(datagram, to) {
                    // A full send buffer drops the probe; the budget counts it all the same.
                    tracing::trace!(%to, %e, "probe not sent");
                }
            }
            _ => self.with_session(peer, |s| {
                s.birthday_failed("this peer's QUIC socket was not found to probe from".into());
            }),
        }
    }

    /// The QUIC endpoint's socket: the one bound to the port of the direct QUIC listen address
    /// (not a relayed one, not a probed port's).
    fn find_quic_socket(&self) -> Option<std::net::UdpSocket> {
        let probed: Vec<u16> = self.probed_listeners.values().map(|(_, p)| *p).collect();
        let port = self
            .listen_addrs()
            .iter()
            .filter_map(punch::quic_addr)
            .filter(|a| a.is_ipv4())
            .map(|a| a.port())
            .find(|p| !probed.contains(p))?;
        let found = quic_socket::find(port);
        if found.is_none() {
            tracing::debug!(
                port,
                "no UDP socket of this process on the QUIC listen port"
            );
        }
        found
    }

    /// Birthday probing, the hard side: a probe reached the socket on local `port` (now
    /// closed), or none did, or the sockets failed.
    fn on_hard_side(&mut self, peer: PeerId, result: HardSide) {
        self.hard_side_handles.remove(&peer);
        if !self.sessions.contains_key(&peer) {
            // The session ended meanwhile: nobody would use the port.
            return;
        }
        match result {
            Ok(Some((port, probe))) => {
                let addr = Multiaddr::from(self.config.listen_ip)
                    .with(Protocol::Udp(port))
                    .with(Protocol::QuicV1);
                match self.swarm.listen_on(addr) {
                    Ok(id) => {
                        if let Some((old, _)) = self.probed_listeners.insert(peer, (id, port)) {
                            self.swarm.remove_listener(old);
                        }
                        self.with_session(peer, |s| s.birthday_hit(probe));
                    }
                    Err(e) => self.with_session(peer, |s| {
                        s.birthday_failed(format!("listening on the probed port {port}: {e}"));
                    }),
                }
            }
            Ok(None) => self.with_session(peer, |s| {
                s.birthday_failed("no probe reached any of the sockets".into());
            }),
            Err(e) => self.with_session(peer, |s| {
                s.birthday_failed(format!("opening the sockets: {e}"));
            }),
        }
    }

    /// Whether a direct connection to `peer` that is kept came in on the port birthday probing
    /// found for it.
    fn on_probed_listener(&self, peer: PeerId) -> bool {
        let Some((_, port)) = self.probed_listeners.get(&peer) else {
            return false;
        };
        self.remotes
            .get(&peer)
            .is_some_and(|r| r.directs.iter().any(|d| came_in_on(&d.endpoint, *port)))
    }

    /// Stops listening on the port birthday probing found for `peer`, if any.
    fn drop_probed_listener(&mut self, peer: PeerId) {
        if let Some((id, _)) = self.probed_listeners.remove(&peer) {
            self.swarm.remove_listener(id);
        }
    }
}

/// Whether a connection at `endpoint` came in on a listener of UDP port `port`.
fn came_in_on(endpoint: &ConnectedPoint, port: u16) -> bool {
    match endpoint {
        ConnectedPoint::Listener { local_addr, .. } => {
            local_addr.iter().any(|p| p == Protocol::Udp(port))
        }
        ConnectedPoint::Dialer { .. } => false,
    }
}

/// The IP address of a dialed address (`None` for a relayed one).
fn observer_ip(address: &Multiaddr) -> Option<std::net::IpAddr> {
    if is_relayed(address) {
        return None;
    }
    address.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The next inbound stream, or never when there is no acceptor.
async fn next_stream(
    incoming: Option<&mut libp2p_stream::IncomingStreams>,
) -> Option<(PeerId, libp2p::Stream)> {
    match incoming {
        Some(i) => i.next().await,
        None => std::future::pending().await,
    }
}

/// The mapping holder's next event, or never when there is none. Cancel-safe.
async fn mapping_event(mapping: Option<&mut PortMapping>) -> MappingEvent {
    match mapping {
        Some(m) => m.next_event().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

#[cfg(test)]
mod tests;

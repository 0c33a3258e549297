//! Holding mappings for as long as a program runs: the [`Keeper`] driven over the network.
//!
//! A [`Holder`] makes the mappings, renews them, runs the periodic check, and listens for
//! what the gateway says on its own:
//! * NAT-PMP and PCP announcements on 224.0.0.1:5350 (RFC 6886 §3.2.1, RFC 6887 §14.1.3): the
//!   epoch of the protocol in use goes through the epoch test, and a NAT-PMP announcement's
//!   external address is taken as the gateway's;
//! * SSDP NOTIFYs on 239.255.255.250:1900: a router multicasts a burst of them when its UPnP
//!   server starts, so one from the gateway makes the check run half a second later.
//!
//! Anything the gateway says unasked (miniupnpd announces a reboot only over PCP, whatever
//! protocol holds the mappings) brings the check forward by half a second, and NAT-PMP and PCP
//! mappings are renewed half a second after that. The check finds a reboot by the epoch or the
//! UPnP table; the renewal makes sure of the mappings when the epoch cannot tell (a gateway
//! that restarts within two seconds of its last answer). So a reboot or a new address is
//! handled about a second after the gateway is back. The periodic check is the safety net for
//! a gateway that says nothing.
//! When the program stops, [`Holder::release`] deletes every mapping with the protocol that
//! made it.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::client::{self, ClientError, Gateway, MapRequest, Mapped};
use crate::keeper::{Action, Event, Grant, Keeper, Method, Want};
use crate::upnp::Igd;
use crate::{ANNOUNCE_GROUP_V4, ANNOUNCE_PORT, Announcement, decode_announcement};

/// The SSDP multicast group and port.
const SSDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900);
/// How long after a hint (an announcement, a NOTIFY) the check runs, so that a burst of hints
/// makes one check.
const HINT_DELAY: Duration = Duration::from_millis(500);
/// How long after a hint the NAT-PMP and PCP mappings are renewed: after the check, which
/// re-creates them at once if it finds the gateway lost its state.
const HINT_RENEW: Duration = Duration::from_secs(1);

/// How to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldConfig {
    /// The protocol that makes and renews the mappings.
    pub method: Method,
    /// How long each request may take (NAT-PMP and PCP retransmit within it).
    pub wait: Duration,
    /// How often to ask the gateway whether it still has the mappings.
    pub check_interval: Duration,
}

/// One thing that happened, with the mapping it concerns as it is now.
#[derive(Debug, Clone, Serialize)]
pub struct Update {
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
    /// The mapping the event is about (for events about one mapping).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping: Option<Mapped>,
}

/// One line for people, e.g. `renewed udp 203.0.113.5:16000 -> 192.168.1.10:6000 (7200 s, via
/// pcp)` or `external address changed: 203.0.113.5 -> 203.0.113.9`.
impl std::fmt::Display for Update {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = self
            .mapping
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        match &self.event {
            Event::Mapped { .. } => write!(f, "mapped {what}"),
            Event::Renewed {
                previous_port,
                external_port,
                ..
            } if previous_port != external_port => {
                write!(
                    f,
                    "renewed {what}; the router moved it from port {previous_port}"
                )
            }
            Event::Renewed { .. } => write!(f, "renewed {what}"),
            Event::Remapped { previous_port, .. } => {
                write!(f, "re-mapped {what} (it had port {previous_port})")
            }
            Event::GatewayLostState { reason } => {
                write!(f, "the router lost the mappings: {reason}")
            }
            Event::ExternalIpChanged { old, new } => {
                write!(f, "external address changed: {old} -> {new}")
            }
            Event::CheckFailed { error } => write!(f, "check failed: {error}"),
            Event::Released { .. } => write!(f, "deleted {what}"),
            Event::ReleaseFailed { error, .. } => write!(f, "could not delete {what}: {error}"),
            Event::Failed {
                error,
                retry_in_secs,
                ..
            } => write!(f, "request failed: {error}; retrying in {retry_in_secs} s"),
        }
    }
}

/// Listening sockets for what gateways say unasked. Each is optional: without it the periodic
/// check still notices, later.
#[derive(Debug)]
struct Listeners {
    announcements: Option<UdpSocket>,
    ssdp: Option<UdpSocket>,
}

/// Mappings held on one gateway.
#[derive(Debug)]
pub struct Holder {
    gw: Gateway,
    config: HoldConfig,
    wants: Vec<Want>,
    keeper: Keeper,
    nonces: Vec<[u8; 12]>,
    mapped: Vec<Option<Mapped>>,
    start: Instant,
    listeners: Option<Listeners>,
    problems: Vec<String>,
}

impl Holder {
    /// A holder for `wants` on `gw`. `prior[i]`, when given, is a mapping made earlier for
    /// `wants[i]` (from a record): its external port is asked for again and its PCP nonce
    /// reused, so that a restarted program keeps its ports. Opens the listeners (inside a tokio
    /// runtime).
    pub fn new(
        gw: Gateway,
        config: HoldConfig,
        wants: Vec<Want>,
        prior: &[Option<Mapped>],
    ) -> std::io::Result<Self> {
        let wants: Vec<Want> = wants
            .into_iter()
            .enumerate()
            .map(|(i, mut w)| {
                if let Some(Some(p)) = prior.get(i) {
                    w.external_port = w.external_port.or(Some(p.external_port));
                }
                w
            })
            .collect();
        let nonces = (0..wants.len())
            .map(|i| {
                match prior
                    .get(i)
                    .and_then(Option::as_ref)
                    .filter(|p| p.method == config.method)
                    .and_then(Mapped::nonce_bytes)
                {
                    Some(n) => Ok(n),
                    None => client::random_nonce(),
                }
            })
            .collect::<std::io::Result<_>>()?;
        let mut holder = Self {
            gw,
            config,
            keeper: Keeper::new(&wants, config.check_interval, Duration::ZERO),
            mapped: vec![None; wants.len()],
            wants,
            nonces,
            start: Instant::now(),
            listeners: None,
            problems: Vec::new(),
        };
        holder.listeners = Some(holder.listen());
        Ok(holder)
    }

    /// The mappings that exist now.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapped> {
        self.mapped
            .iter()
            .enumerate()
            .filter(|(id, _)| self.keeper.port(*id).is_some())
            .filter_map(|(_, m)| m.as_ref())
    }

    /// Why a listener could not be opened (the holder works without it, noticing later).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Holds the mappings until `stop` completes, reporting every change to `report`. The
    /// mappings are left in place: call [`Holder::release`] to delete them.
    pub async fn run(&mut self, stop: impl Future<Output = ()>, report: &mut impl FnMut(Update)) {
        let listeners = match self.listeners.take() {
            Some(l) => l,
            None => self.listen(),
        };
        tokio::pin!(stop);
        let mut buf = [0u8; 1500];
        let mut ssdp_buf = [0u8; 1500];
        loop {
            for action in self.keeper.poll(self.now()) {
                self.act(action, report).await;
            }
            let wake = self.start + self.keeper.next_wakeup();
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep_until(wake) => {}
                Some((n, from)) = recv(listeners.announcements.as_ref(), &mut buf) => {
                    if from.ip() == IpAddr::V4(self.gw.addr) {
                        let bytes = buf.get(..n).unwrap_or_default();
                        self.on_announcement(bytes, report);
                    }
                }
                Some((n, from)) = recv(listeners.ssdp.as_ref(), &mut ssdp_buf) => {
                    let notify = ssdp_buf.get(..n).is_some_and(|b| b.starts_with(b"NOTIFY"));
                    if from.ip() == IpAddr::V4(self.gw.addr) && notify {
                        self.hint();
                    }
                }
            }
        }
        self.listeners = Some(listeners);
    }

    /// Deletes every mapping that exists, with the protocol that made it.
    pub async fn release(&mut self, report: &mut impl FnMut(Update)) {
        for id in 0..self.mapped.len() {
            let Some(m) = self.mapped[id].clone() else {
                continue;
            };
            if self.keeper.port(id).is_none() {
                continue;
            }
            match client::delete(self.gw, &m, self.config.wait).await {
                Ok(()) => {
                    for event in self.keeper.on_released(id) {
                        report(Update {
                            event,
                            mapping: Some(m.clone()),
                        });
                    }
                }
                Err(e) => report(Update {
                    event: Event::ReleaseFailed {
                        id,
                        error: e.to_string(),
                    },
                    mapping: Some(m),
                }),
            }
        }
    }

    fn listen(&mut self) -> Listeners {
        let local = self.gw.local;
        let mut open = |group: SocketAddrV4, what: &str| match multicast_socket(group, local) {
            Ok(s) => Some(s),
            Err(e) => {
                self.problems
                    .push(format!("cannot listen for {what} on {group}: {e}"));
                None
            }
        };
        Listeners {
            announcements: open(
                SocketAddrV4::new(ANNOUNCE_GROUP_V4, ANNOUNCE_PORT),
                "NAT-PMP and PCP announcements",
            ),
            ssdp: open(SSDP, "SSDP NOTIFYs"),
        }
    }

    fn emit(&self, events: Vec<Event>, report: &mut impl FnMut(Update)) {
        for event in events {
            let mapping = event_id(&event).and_then(|id| self.mapped.get(id).cloned().flatten());
            report(Update { event, mapping });
        }
    }

    fn on_announcement(&mut self, bytes: &[u8], report: &mut impl FnMut(Update)) {
        let now = self.now();
        let (epoch, ours, external_ip) = match decode_announcement(bytes) {
            Ok(Announcement::Pcp { epoch }) => (epoch, self.config.method == Method::Pcp, None),
            Ok(Announcement::NatPmp { epoch, external_ip }) => (
                epoch,
                self.config.method == Method::NatPmp,
                Some(external_ip),
            ),
            Err(_) => return,
        };
        let mut events = Vec::new();
        if let Some(ip) = external_ip {
            events.extend(self.keeper.on_external_ip(ip, now));
        }
        // The other protocol's epoch runs on the gateway's clock too, but its rules are not ours
        // to apply: the check asks in our own protocol.
        if ours {
            events.extend(self.keeper.on_epoch(epoch, now));
        }
        self.hint();
        self.emit(events, report);
    }

    /// The gateway said something unasked: check soon, and renew NAT-PMP and PCP mappings
    /// (a UPnP check reads the mapping table, which is proof enough).
    fn hint(&mut self) {
        let now = self.now();
        self.keeper.check_by(now + HINT_DELAY);
        if self.config.method != Method::Upnp {
            self.keeper.renew_by(now + HINT_RENEW);
        }
    }

    async fn act(&mut self, action: Action, report: &mut impl FnMut(Update)) {
        match action {
            Action::Map { id, external_port } => {
                let Some(want) = self.wants.get(id).copied() else {
                    return;
                };
                let request = MapRequest {
                    protocol: want.protocol,
                    internal_port: want.internal_port,
                    external_port: Some(external_port),
                    lifetime_secs: u32::try_from(want.lifetime.as_secs()).unwrap_or(u32::MAX),
                };
                let nonce = self.nonces[id];
                let result = client::map(
                    self.gw,
                    self.config.method,
                    request,
                    nonce,
                    self.config.wait,
                )
                .await;
                let now = self.now();
                let events = match result {
                    Ok(m) => {
                        let grant = Grant {
                            external_port: m.external_port,
                            external_ip: m.external_ip,
                            lifetime: Duration::from_secs(u64::from(m.lifetime_secs)),
                            epoch: m.epoch,
                        };
                        self.mapped[id] = Some(m);
                        self.keeper.on_granted(id, grant, now)
                    }
                    Err(e) => self.keeper.on_failed(id, &e.to_string(), now),
                };
                self.emit(events, report);
            }
            Action::Check => {
                let events = match self.check().await {
                    Ok(events) => events,
                    Err(e) => vec![Event::CheckFailed {
                        error: e.to_string(),
                    }],
                };
                self.keeper.on_check_done(self.now());
                self.emit(events, report);
            }
        }
    }

    /// The protocol's cheapest question about the gateway's state.
    async fn check(&mut self) -> Result<Vec<Event>, ClientError> {
        let (gw, wait) = (self.gw, self.config.wait);
        match self.config.method {
            Method::Pcp => {
                let epoch = client::pcp_announce(gw, wait).await?;
                Ok(self.keeper.on_epoch(epoch, self.now()))
            }
            Method::NatPmp => {
                let (ip, epoch) = client::nat_pmp_external_address(gw, wait).await?;
                let now = self.now();
                let mut events = self.keeper.on_epoch(epoch, now);
                events.extend(self.keeper.on_external_ip(ip, now));
                Ok(events)
            }
            Method::Upnp => {
                let igd = Igd::discover(gw.local, wait).await?;
                let ip = igd.external_ip().await?;
                let table = igd.list().await?;
                let now = self.now();
                let mut events = self.keeper.on_external_ip(ip, now);
                for id in 0..self.wants.len() {
                    let (Some(port), Some(m)) = (self.keeper.port(id), &self.mapped[id]) else {
                        continue;
                    };
                    let present = table.iter().any(|e| {
                        e.protocol == m.transport()
                            && e.external_port == port
                            && e.internal_port == m.internal.port()
                            && e.internal_client == m.internal.ip().to_string()
                    });
                    if !present {
                        events.extend(self.keeper.on_missing(id, now));
                    }
                }
                Ok(events)
            }
        }
    }
}

fn event_id(event: &Event) -> Option<usize> {
    match *event {
        Event::Mapped { id, .. }
        | Event::Renewed { id, .. }
        | Event::Remapped { id, .. }
        | Event::Released { id, .. }
        | Event::ReleaseFailed { id, .. }
        | Event::Failed { id, .. } => Some(id),
        Event::GatewayLostState { .. }
        | Event::ExternalIpChanged { .. }
        | Event::CheckFailed { .. } => None,
    }
}

/// A datagram from `socket`, or never when there is no socket (or it fails).
async fn recv(socket: Option<&UdpSocket>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

/// A socket bound to `group` (so that it sees only that group's datagrams), sharing the port
/// with other listeners on this host, and a member of the group on the interface of `local`.
fn multicast_socket(group: SocketAddrV4, local: Ipv4Addr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(group).into())?;
    socket.join_multicast_v4(group.ip(), &local)?;
    UdpSocket::from_std(socket.into())
}

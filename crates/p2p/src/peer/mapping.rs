//! The listen ports' mappings on the local router, held for as long as the peer runs.
//!
//! portmap's [`Holder`] (the one `natpunch map keep` uses) runs in a task the peer owns: it
//! renews each mapping at half its granted lifetime, and makes them again when the router
//! reboots (its epoch restarts) or gets a new external address. After every change the task
//! publishes the live mappings on a `watch` (the latest state, never a backlog, so never lost);
//! the peer turns them into the external addresses it offers (`diff`). The holder's own
//! reports (renewed, lost, re-mapped, …) go to the peer on a bounded channel, for people.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use portmap::client::{Gateway, Mapped};
use portmap::hold::{HoldConfig, Holder, Update};
use portmap::keeper::{Event, Want};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use super::defaults::PORT_MAPPING_REPORTS;

/// A change in the addresses the mappings give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A mapping gives an address it did not give before (`previous`: the one it replaces).
    Mapped {
        mapping: Mapped,
        addr: Multiaddr,
        previous: Option<Multiaddr>,
    },
    /// A mapping is gone (the router lost it and it is not made again yet).
    Lost { mapping: Mapped, addr: Multiaddr },
}

/// What the holder has for the event loop.
#[derive(Debug)]
pub enum MappingEvent {
    /// The live mappings changed: call [`PortMapping::update`].
    Changed,
    /// A report for people.
    Report(Update),
}

/// Mappings of the listen ports, held in a task.
#[derive(Debug)]
pub struct PortMapping {
    /// The holder's task; it hands the holder back when stopped, to release the mappings.
    task: JoinSet<Holder>,
    stop: Option<oneshot::Sender<()>>,
    live: watch::Receiver<Vec<Mapped>>,
    reports: mpsc::Receiver<Update>,
    /// Reports dropped because the peer had not read the earlier ones.
    dropped: Arc<AtomicU64>,
    /// The router's external address from the probe, for answers that carry none.
    external_ip: Option<Ipv4Addr>,
    /// The mappings whose addresses are offered now.
    offered: Vec<(Mapped, Multiaddr)>,
    wants: usize,
}

impl PortMapping {
    /// Asks the router which protocols it speaks and starts holding a mapping for each of
    /// `wants` with the best one (PCP, NAT-PMP, UPnP). Inside a tokio runtime.
    pub async fn start(
        wants: Vec<Want>,
        check_interval: Duration,
        wait: Duration,
    ) -> Result<Self, String> {
        let gw = Gateway::find(None).map_err(|e| format!("no gateway: {e}"))?;
        let offer = portmap::client::probe(gw, wait).await;
        let method = *offer
            .methods()
            .first()
            .ok_or_else(|| format!("the router maps no ports ({})", offer.problems.join("; ")))?;
        let config = HoldConfig {
            method,
            wait,
            check_interval,
        };
        let count = wants.len();
        let holder = Holder::new(gw, config, wants, &[])
            .map_err(|e| format!("holding mappings on {}: {e}", gw.addr))?;
        for p in holder.problems() {
            tracing::warn!("port mapping: {p}");
        }
        let (stop, stop_rx) = oneshot::channel();
        let (live_tx, live) = watch::channel(Vec::new());
        let (reports_tx, reports) = mpsc::channel(PORT_MAPPING_REPORTS);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut task = JoinSet::new();
        let span = tracing::debug_span!("port mapping", gateway = %gw.addr, %method);
        task.spawn(
            hold(holder, stop_rx, live_tx, reports_tx, Arc::clone(&dropped)).instrument(span),
        );
        Ok(Self {
            task,
            stop: Some(stop),
            live,
            reports,
            dropped,
            external_ip: offer.external_ip,
            offered: Vec::new(),
            wants: count,
        })
    }

    /// The mappings whose addresses are offered now.
    pub fn offered(&self) -> &[(Mapped, Multiaddr)] {
        &self.offered
    }

    /// Waits (at most `limit`) until every mapping was made or failed once, and returns the
    /// holder's reports meanwhile.
    pub async fn first_answers(&mut self, limit: Duration) -> Vec<Update> {
        let mut seen = Vec::new();
        let mut answered = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + limit;
        while answered.len() < self.wants {
            let Ok(Some(u)) = tokio::time::timeout_at(deadline, self.reports.recv()).await else {
                break;
            };
            if let Event::Mapped { id, .. } | Event::Failed { id, .. } = u.event {
                answered.insert(id);
            }
            seen.push(u);
        }
        // The holder publishes its mappings after the requests of one round, so after their
        // reports: wait for them, so that the caller offers them from the start.
        let made = seen
            .iter()
            .filter(|u| matches!(u.event, Event::Mapped { .. }))
            .count();
        while self.live.borrow().len() < made {
            if !matches!(
                tokio::time::timeout_at(deadline, self.live.changed()).await,
                Ok(Ok(()))
            ) {
                break;
            }
        }
        seen
    }

    /// The next report or change; never, once the holder stopped. Reports come first, so that
    /// what the holder did is told before the addresses it changed. Cancel-safe.
    pub async fn next_event(&mut self) -> MappingEvent {
        tokio::select! {
            biased;
            Some(update) = self.reports.recv() => MappingEvent::Report(update),
            Ok(()) = self.live.changed() => MappingEvent::Changed,
            else => std::future::pending().await,
        }
    }

    /// Takes the live mappings as they are now: the changes in the addresses offered.
    pub fn update(&mut self) -> Vec<Change> {
        let live = self.live.borrow_and_update().clone();
        let (offered, changes) = diff(&self.offered, &live, self.external_ip);
        self.offered = offered;
        changes
    }

    /// Reports dropped so far because they were not read in time.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops holding and deletes the mappings on the router.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(Ok(mut holder)) = self.task.join_next().await else {
            return;
        };
        holder
            .release(&mut |u: Update| tracing::debug!(?u, "port mapping released"))
            .await;
    }
}

/// Runs `holder` until `stop`, publishing the live mappings after every change, and hands it
/// back. The holder stops between requests only (its `run` breaks at its wait), so restarting
/// it after each change loses nothing: the keeper keeps every due time.
async fn hold(
    mut holder: Holder,
    mut stop: oneshot::Receiver<()>,
    live: watch::Sender<Vec<Mapped>>,
    reports: mpsc::Sender<Update>,
    dropped: Arc<AtomicU64>,
) -> Holder {
    let changed = Notify::new();
    let mut stopped = false;
    while !stopped {
        let mut report = |u: Update| {
            tracing::debug!(?u, "port mapping");
            if reports.try_send(u).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            changed.notify_one();
        };
        let until = async {
            stopped = tokio::select! {
                _ = &mut stop => true,
                () = changed.notified() => false,
            };
        };
        holder.run(until, &mut report).await;
        let now: Vec<Mapped> = holder.mappings().cloned().collect();
        live.send_if_modified(|old| {
            let differs = *old != now;
            if differs {
                *old = now;
            }
            differs
        });
    }
    holder
}

/// The mappings' addresses: the new list offered, and how it differs from `offered`.
/// `fallback` is the router's external address for answers that carry none.
pub(super) fn diff(
    offered: &[(Mapped, Multiaddr)],
    live: &[Mapped],
    fallback: Option<Ipv4Addr>,
) -> (Vec<(Mapped, Multiaddr)>, Vec<Change>) {
    let same = |a: &Mapped, b: &Mapped| a.protocol == b.protocol && a.internal == b.internal;
    let mut next: Vec<(Mapped, Multiaddr)> = Vec::new();
    let mut changes = Vec::new();
    for m in live {
        let Some(addr) = address(m, fallback) else {
            continue;
        };
        if next.iter().any(|(n, _)| same(n, m)) {
            continue;
        }
        let previous = offered
            .iter()
            .find(|(o, _)| same(o, m))
            .map(|(_, a)| a.clone());
        if previous.as_ref() != Some(&addr) {
            changes.push(Change::Mapped {
                mapping: m.clone(),
                addr: addr.clone(),
                previous,
            });
        }
        next.push((m.clone(), addr));
    }
    for (o, a) in offered {
        if !next.iter().any(|(n, _)| same(n, o)) {
            changes.push(Change::Lost {
                mapping: o.clone(),
                addr: a.clone(),
            });
        }
    }
    (next, changes)
}

/// The address a mapping gives: `/ip4/IP/tcp/PORT` or `/ip4/IP/udp/PORT/quic-v1`.
fn address(m: &Mapped, fallback: Option<Ipv4Addr>) -> Option<Multiaddr> {
    let ip = m.external_ip.or(fallback)?;
    let a = Multiaddr::empty().with(Protocol::Ip4(ip));
    Some(match m.transport() {
        portmap::Protocol::Tcp => a.with(Protocol::Tcp(m.external_port)),
        portmap::Protocol::Udp => a
            .with(Protocol::Udp(m.external_port))
            .with(Protocol::QuicV1),
    })
}

use super::{Candidates, Peer, PeerEvent, defaults};
use crate::punch::{dialable, transport_of, without_p2p};

impl Peer {
    /// The addresses this peer offers in CONNECT: mapped ones first.
    pub fn offered(&self) -> Vec<Multiaddr> {
        let source = match self.config.candidates {
            Candidates::Observed => &self.observed,
            Candidates::Stock => &self.stock_candidates,
        };
        self.mapping
            .iter()
            .flat_map(|m| m.offered().iter().map(|(_, a)| a))
            .chain(source.iter())
            .filter(|a| dialable(a))
            .map(|a| without_p2p(a.clone()).with(Protocol::P2p(self.peer_id())))
            .collect()
    }

    /// Starts holding a mapping of every listen port on the local router, and waits until
    /// each was made or failed once. A failed one is retried in the background and offered
    /// once made.
    pub(super) async fn map_ports(&mut self, report: &mut impl FnMut(PeerEvent)) {
        use portmap::keeper::Want;
        let mut wants: Vec<Want> = Vec::new();
        for listen in self.swarm.listeners().filter(|a| dialable(a)) {
            let protocol = if transport_of(listen) == "quic" {
                portmap::Protocol::Udp
            } else {
                portmap::Protocol::Tcp
            };
            let Some(internal_port) = listen.iter().find_map(|p| match p {
                Protocol::Tcp(port) | Protocol::Udp(port) => Some(port),
                _ => None,
            }) else {
                continue;
            };
            // One mapping per port, however many interfaces it listens on.
            if wants
                .iter()
                .any(|w| w.protocol == protocol && w.internal_port == internal_port)
            {
                continue;
            }
            wants.push(Want {
                protocol,
                internal_port,
                external_port: None,
                lifetime: self.config.port_mapping_lifetime,
            });
        }
        let count = u32::try_from(wants.len()).unwrap_or(u32::MAX);
        let names: Vec<String> = wants
            .iter()
            .map(|w| format!("{} port {}", w.protocol, w.internal_port))
            .collect();
        let wait = defaults::PORT_MAPPING_WAIT;
        let mut mapping = match PortMapping::start(wants, defaults::PORT_MAPPING_CHECK, wait).await
        {
            Ok(m) => m,
            Err(error) => {
                report(PeerEvent::PortMapFailed { error });
                return;
            }
        };
        // Each request may take `wait`; they go one after another.
        let mut failed = Vec::new();
        for update in mapping.first_answers(wait * (count + 1)).await {
            if let Event::Failed { id, error, .. } = &update.event
                && !failed.contains(id)
            {
                failed.push(*id);
                let what = names.get(*id).map_or("a port", String::as_str);
                report(PeerEvent::PortMapFailed {
                    error: format!("mapping {what}: {error} (retrying)"),
                });
            }
            report(PeerEvent::PortMapUpdate { update });
        }
        self.mapping = Some(mapping);
        self.on_mapping_changed(report);
    }

    /// The holder's mappings changed: offer the addresses they give now (the swarm's external
    /// addresses, which identify tells the remotes, and CONNECT's) instead of the old ones.
    pub(super) fn on_mapping_changed(&mut self, report: &mut impl FnMut(PeerEvent)) {
        let Some(mapping) = self.mapping.as_mut() else {
            return;
        };
        for change in mapping.update() {
            match change {
                Change::Mapped {
                    mapping,
                    addr,
                    previous,
                } => {
                    if let Some(old) = &previous {
                        self.swarm.remove_external_address(old);
                    }
                    self.swarm.add_external_address(addr.clone());
                    report(PeerEvent::PortMapped {
                        method: mapping.method.to_string(),
                        internal: mapping.internal.to_string(),
                        external: addr.to_string(),
                        previous: previous.map(|a| a.to_string()),
                    });
                }
                Change::Lost { mapping, addr } => {
                    self.swarm.remove_external_address(&addr);
                    report(PeerEvent::PortMapLost {
                        internal: mapping.internal.to_string(),
                        external: addr.to_string(),
                    });
                }
            }
        }
        // Hole punches in progress offer the new addresses from their next CONNECT on.
        let offered = self.offered();
        for session in self.sessions.values_mut() {
            session.set_offered(offered.clone());
        }
    }

    /// The mappings this peer holds on its router now.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapped> {
        self.mapping
            .iter()
            .flat_map(|m| m.offered().iter().map(|(m, _)| m))
    }

    /// Stops holding the mappings and deletes them on the router.
    pub async fn unmap(&mut self) {
        if let Some(mapping) = self.mapping.take() {
            mapping.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portmap::keeper::Method;
    use std::net::SocketAddrV4;

    fn mapped(protocol: &str, internal: u16, ip: [u8; 4], external: u16) -> Mapped {
        Mapped {
            method: Method::Pcp,
            protocol: protocol.into(),
            gateway: Ipv4Addr::new(192, 168, 1, 1),
            internal: SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 2), internal),
            external_ip: Some(Ipv4Addr::from(ip)),
            external_port: external,
            lifetime_secs: 120,
            epoch: Some(10),
            nonce: None,
        }
    }

    fn addr(a: &str) -> Multiaddr {
        a.parse().expect("addr")
    }

    #[test]
    fn the_addresses_offered_follow_the_mappings() {
        let ip = [11, 99, 0, 10];
        let tcp = mapped("tcp", 4000, ip, 4000);
        let udp = mapped("udp", 4001, ip, 4001);
        // First mapped: both new.
        let (offered, changes) = diff(&[], &[tcp.clone(), udp.clone()], None);
        assert_eq!(
            changes,
            [
                Change::Mapped {
                    mapping: tcp.clone(),
                    addr: addr("/ip4/11.99.0.10/tcp/4000"),
                    previous: None
                },
                Change::Mapped {
                    mapping: udp.clone(),
                    addr: addr("/ip4/11.99.0.10/udp/4001/quic-v1"),
                    previous: None
                }
            ]
        );
        // A renewal with the same address (a new lifetime, epoch) changes nothing offered.
        let mut renewed = udp.clone();
        renewed.epoch = Some(70);
        let (offered, changes) = diff(&offered, &[tcp.clone(), renewed.clone()], None);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(offered[1].0, renewed, "the newest answer is kept");
        // The router lost the UDP mapping (reboot): its address is withdrawn.
        let (offered, changes) = diff(&offered, std::slice::from_ref(&tcp), None);
        assert_eq!(
            changes,
            [Change::Lost {
                mapping: renewed,
                addr: addr("/ip4/11.99.0.10/udp/4001/quic-v1")
            }]
        );
        // A new external address: the old address is replaced.
        let moved = mapped("tcp", 4000, [11, 99, 7, 7], 4000);
        let (offered, changes) = diff(&offered, std::slice::from_ref(&moved), None);
        assert_eq!(
            changes,
            [Change::Mapped {
                mapping: moved.clone(),
                addr: addr("/ip4/11.99.7.7/tcp/4000"),
                previous: Some(addr("/ip4/11.99.0.10/tcp/4000"))
            }]
        );
        assert_eq!(offered.len(), 1);
    }

    #[test]
    fn an_answer_without_an_address_uses_the_routers_or_is_not_offered() {
        let mut m = mapped("udp", 4001, [0, 0, 0, 0], 24001);
        m.external_ip = None;
        let (offered, _) = diff(&[], std::slice::from_ref(&m), None);
        assert!(offered.is_empty());
        let (offered, _) = diff(&[], &[m], Some(Ipv4Addr::new(11, 99, 0, 10)));
        assert_eq!(offered[0].1, addr("/ip4/11.99.0.10/udp/24001/quic-v1"));
    }
}

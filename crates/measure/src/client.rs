//! The measurement client: libp2p hosts that ask the server for peers to hole-punch, punch them
//! through the relay with natpunch's engine, and report every punch.
//!
//! Each host has its own persistent identity and is registered once. Hosts work concurrently:
//! GetAddrInfo (with all hosts' IDs, so that the server never serves the same peer and address
//! to two of them) → a fresh libp2p peer with the host's key dials the remote through the served
//! relay and punches (the protocol filter picks the transport) → the record becomes a
//! `TrackHolePunchRequest` with every field punchr's Go client fills, and natpunch's own. Reports
//! go to the [`Spool`] first and a sender delivers them with retries and backoff. `NotFound`
//! makes a host wait; an unauthorized key stops the client with the server's message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use p2p::peer::{Mode, Peer, PeerConfig, PeerEvent, Transport};
use p2p::record::{AttemptOutcome, Outcome, Record};
use serde::Serialize;
use tonic::Code;
use tonic::transport::Channel;

use api::pb;
use api::pb::punchr_service_client::PunchrServiceClient;

use crate::spool::Spool;

/// The agent version the client's hosts announce and register with.
pub fn agent_version() -> String {
    format!("natpunch/client/{}", env!("CARGO_PKG_VERSION"))
}

/// How to run the client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The API key.
    pub api_key: String,
    /// The hosts' keys.
    pub hosts: Vec<Keypair>,
    /// How long a host waits after `NotFound` (nothing to punch).
    pub idle: Duration,
    /// Stop after this many punches in all (none: until stopped).
    pub punches: Option<u64>,
    /// The NAT behaviour of this client's network, when measured (RFC 4787 words).
    pub client_nat: Option<String>,
    /// The peer configuration each punch starts from (timeouts, engine); the relays and the
    /// transport come from the server's answer.
    pub peer: PeerConfig,
    /// Send the router's login page (`GET http://GATEWAY/`) with the first report of each host.
    pub router_check: bool,
}

/// What the client reports.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ClientEvent {
    /// A host is registered.
    Registered {
        /// The host.
        host: String,
        /// Its id in the server's database.
        db_peer_id: i64,
    },
    /// The server handed a host a peer.
    Served {
        /// The host.
        host: String,
        /// The remote.
        remote: String,
        /// Its relayed addresses.
        addrs: Vec<String>,
        /// The protocol filter.
        filter: Vec<i32>,
    },
    /// Nothing to punch; the host waits.
    Idle {
        /// The host.
        host: String,
        /// Seconds it waits.
        wait_secs: f64,
    },
    /// A punch ended.
    Punched {
        /// The host.
        host: String,
        /// The remote.
        remote: String,
        /// punchr's outcome.
        outcome: Outcome,
        /// The transport of the direct connection.
        transport: Option<String>,
        /// From the relayed connection to the direct one.
        time_to_direct_ms: Option<f64>,
        /// Why there was no direct connection: each failed attempt's error, or the punch's.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// The report's idempotency key.
        key: String,
    },
    /// A report was acknowledged by the server.
    Delivered {
        /// Its key.
        key: String,
    },
    /// A report could not be delivered; it stays in the spool.
    Deferred {
        /// Its key.
        key: String,
        /// Why.
        error: String,
        /// Seconds until the next try.
        retry_secs: f64,
    },
    /// The server refused a report as invalid; it moved to `rejected/`.
    Rejected {
        /// Its key.
        key: String,
        /// The server's reason.
        error: String,
    },
    /// A server call failed; the host tries again later.
    ServerError {
        /// The call.
        call: String,
        /// The error.
        error: String,
    },
}

impl ClientEvent {
    /// One line for people, or `None` for an event not worth one (a peer served, a report
    /// delivered).
    pub fn line(&self) -> Option<String> {
        Some(match self {
            Self::Registered { host, db_peer_id } => {
                format!("registered {host} (id {db_peer_id})")
            }
            Self::Served { .. } | Self::Delivered { .. } => return None,
            Self::Idle { host, wait_secs } => {
                format!("{host}: nothing to punch, waiting {wait_secs:.0} s")
            }
            Self::Punched {
                host,
                remote,
                outcome,
                transport,
                time_to_direct_ms,
                error,
                ..
            } => format!(
                "{host} → {remote}: {outcome:?}{}{}{}",
                transport
                    .as_ref()
                    .map_or(String::new(), |t| format!(" over {t}")),
                time_to_direct_ms.map_or(String::new(), |t| format!(" in {t:.0} ms")),
                error.as_ref().map_or(String::new(), |e| format!(" ({e})"))
            ),
            Self::Deferred {
                key,
                error,
                retry_secs,
            } => format!("report {key} not delivered ({error}); next try in {retry_secs:.1} s"),
            Self::Rejected { key, error } => {
                format!("report {key} refused by the server: {error} (kept in rejected/)")
            }
            Self::ServerError { call, error } => format!("{call}: {error}"),
        })
    }
}

/// Why the client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the API key.
    #[error("the server refused the API key: {0}")]
    Unauthorized(String),
    /// The spool failed.
    #[error("the report spool failed")]
    Spool(#[from] std::io::Error),
}

/// A failed call in words: the status code, its message and the causes under it that it does
/// not already say (a transport error's "tcp connect error" is only useful with the
/// "Connection refused" beneath it).
fn status_text(e: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", e.code(), e.message());
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

/// Unix nanoseconds now.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A new API key: a random UUID (version 4), the form punchr's keys have.
pub fn new_api_key() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let part = |r: std::ops::Range<usize>| h.get(r).unwrap_or_default().to_owned();
    format!(
        "{}-{}-{}-{}-{}",
        part(0..8),
        part(8..12),
        part(12..16),
        part(16..20),
        part(20..32)
    )
}

/// A fresh idempotency key for a report of `host`.
fn new_key(host: &PeerId) -> String {
    format!("{host}-{}-{:08x}", now_ns(), rand::random::<u32>())
}

/// The transport a protocol filter asks for (its codes: 6 TCP; 460, 461 QUIC).
pub fn transport_for(filter: &[i32]) -> Transport {
    let tcp = filter.contains(&6);
    let quic = filter.iter().any(|c| matches!(c, 460 | 461));
    match (tcp, quic) {
        (true, false) => Transport::Tcp,
        (false, true) => Transport::Quic,
        _ => Transport::Both,
    }
}

/// The relay addresses (`…/p2p/RELAY`) of served circuit addresses, those of the first relay.
pub fn relays_of(served: &[Multiaddr]) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    let mut relay = None;
    for a in served {
        let mut base = Multiaddr::empty();
        for p in a {
            if p == Protocol::P2pCircuit {
                break;
            }
            base.push(p);
        }
        let Some(Protocol::P2p(id)) = base.iter().last() else {
            continue;
        };
        if *relay.get_or_insert(id) == id && !out.contains(&base) {
            out.push(base);
        }
    }
    out
}

fn bytes(addrs: &[String]) -> Vec<Vec<u8>> {
    addrs
        .iter()
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .map(|a| a.to_vec())
        .collect()
}

fn attempt_outcome(o: AttemptOutcome) -> pb::HolePunchAttemptOutcome {
    use pb::HolePunchAttemptOutcome as P;
    match o {
        AttemptOutcome::Unknown => P::Unknown,
        AttemptOutcome::DirectDial => P::DirectDial,
        AttemptOutcome::ProtocolError => P::ProtocolError,
        AttemptOutcome::Cancelled => P::Cancelled,
        AttemptOutcome::Timeout => P::Timeout,
        AttemptOutcome::Failed => P::Failed,
        AttemptOutcome::Success => P::Success,
    }
}

fn outcome(o: Outcome) -> pb::HolePunchOutcome {
    use pb::HolePunchOutcome as P;
    match o {
        Outcome::Unknown => P::Unknown,
        Outcome::NoConnection => P::NoConnection,
        Outcome::NoStream => P::NoStream,
        Outcome::ConnectionReversed => P::ConnectionReversed,
        Outcome::Cancelled => P::Cancelled,
        Outcome::Failed => P::Failed,
        Outcome::Success => P::Success,
    }
}

/// What a punch gave, besides its record.
#[derive(Debug, Clone, Default)]
pub struct PunchContext {
    /// The addresses the server served.
    pub served: Vec<Multiaddr>,
    /// The protocol filter in effect.
    pub filter: Vec<i32>,
    /// When the dial through the relay started (the peer was set up), Unix ns.
    pub connect_started_at: u64,
    /// The host's listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Port mappings the host made for the punch.
    pub mappings: Vec<pb::NatMapping>,
    /// This client's NAT behaviour.
    pub client_nat: Option<String>,
    /// Network information to send.
    pub network: Option<pb::NetworkInformation>,
}

/// The report of one punch from `local` to `remote`, from the dialing side's record.
pub fn report_of(
    local: PeerId,
    remote: PeerId,
    record: &Record,
    ctx: &PunchContext,
    api_key: &str,
    key: &str,
) -> pb::TrackHolePunchRequest {
    let start = record.started_unix_ms.saturating_mul(1_000_000);
    let at = |ms: f64| start.saturating_add((ms.max(0.0) * 1e6) as u64);
    let attempts = record
        .attempts
        .iter()
        .map(|a| pb::HolePunchAttempt {
            opened_at: at(a.started_ms),
            started_at: a.dialed_ms.map(at),
            ended_at: at(a.ended_ms),
            start_rtt: a.rtt_ms.map(|r| (r / 1000.0) as f32),
            elapsed_time: ((a.ended_ms - a.started_ms).max(0.0) / 1000.0) as f32,
            outcome: attempt_outcome(a.outcome) as i32,
            error: a.error.clone(),
            direct_dial_error: (!a.dial_errors.is_empty()).then(|| {
                a.dial_errors
                    .iter()
                    .map(|f| format!("{}: {}", f.addr, f.error))
                    .collect::<Vec<_>>()
                    .join("; ")
            }),
            multi_addresses: bytes(&a.dialed),
        })
        .collect();
    let served: Vec<Vec<u8>> = ctx.served.iter().map(|a| a.to_vec()).collect();
    let relay_addr = served.first().cloned().unwrap_or_default();
    let mut latencies = Vec::new();
    let relay_peer = record.relay.parse::<PeerId>().ok();
    if let (Some(rtt), Some(relay)) = (record.to_relay_rtt_ms, relay_peer) {
        // The relay's own address: the served address cut before /p2p-circuit.
        let addr = relays_of(&ctx.served)
            .into_iter()
            .next()
            .map(|a| a.to_vec())
            .unwrap_or_default();
        latencies.push(pb::LatencyMeasurement {
            remote_id: relay.to_bytes(),
            agent_version: String::new(),
            protocols: Vec::new(),
            multi_address: addr,
            rtts: vec![(rtt / 1000.0) as f32],
            rtt_errs: Vec::new(),
            mtype: pb::LatencyMeasurementType::ToRelay as i32,
        });
    }
    if let Some(rtt) = record.relay_rtt_ms {
        latencies.push(pb::LatencyMeasurement {
            remote_id: remote.to_bytes(),
            agent_version: String::new(),
            protocols: Vec::new(),
            multi_address: relay_addr.clone(),
            rtts: vec![(rtt / 1000.0) as f32],
            rtt_errs: Vec::new(),
            mtype: pb::LatencyMeasurementType::ToRemoteThroughRelay as i32,
        });
    }
    let direct_addr = record
        .attempts
        .iter()
        .rev()
        .find_map(|a| a.dialed.first().or(a.remote_addrs.first()))
        .and_then(|a| a.parse::<Multiaddr>().ok())
        .map(|a| a.to_vec());
    if let (Some(rtt), Some(addr)) = (record.direct_rtt_ms, direct_addr) {
        latencies.push(pb::LatencyMeasurement {
            remote_id: remote.to_bytes(),
            agent_version: String::new(),
            protocols: Vec::new(),
            multi_address: addr,
            rtts: vec![(rtt / 1000.0) as f32],
            rtt_errs: Vec::new(),
            mtype: pb::LatencyMeasurementType::ToRemoteAfterHolePunch as i32,
        });
    }
    let mut listen: Vec<Vec<u8>> = ctx.listen.iter().map(|a| a.to_vec()).collect();
    listen.extend(bytes(&record.local_addrs));
    listen.sort();
    listen.dedup();
    let direct = matches!(
        record.outcome,
        Outcome::Success | Outcome::ConnectionReversed
    );
    pb::TrackHolePunchRequest {
        client_id: local.to_bytes(),
        remote_id: remote.to_bytes(),
        remote_multi_addresses: served,
        connect_started_at: ctx.connect_started_at.min(start).max(1),
        connect_ended_at: start.max(1),
        hole_punch_attempts: attempts,
        open_multi_addresses: if record.outcome == Outcome::NoConnection {
            Vec::new()
        } else {
            vec![relay_addr]
        },
        has_direct_conns: record.direct_connections > 0 || direct,
        error: record.error.clone(),
        outcome: outcome(record.outcome) as i32,
        ended_at: at(record.ended_ms).max(start).max(1),
        listen_multi_addresses: listen,
        api_key: api_key.to_owned(),
        protocols: ctx.filter.clone(),
        latency_measurements: latencies,
        network_information: ctx.network.clone(),
        nat_mappings: ctx.mappings.clone(),
        idempotency_key: Some(key.to_owned()),
        technique: direct
            .then(|| record.transport.as_ref().map(|t| format!("dcutr-{t}")))
            .flatten(),
        time_to_direct: record.time_to_direct_ms.map(|ms| (ms / 1000.0) as f32),
        client_nat: ctx.client_nat.clone(),
        remote_nat: None,
        transport: record.transport.clone(),
    }
}

/// Delivers the spool's reports until `done` says the client is finished and the spool is
/// empty; new reports are announced on `wake`.
async fn deliver(
    mut server: PunchrServiceClient<Channel>,
    spool: Spool,
    wake: Arc<tokio::sync::Notify>,
    finished: Arc<std::sync::atomic::AtomicBool>,
    stopping: &Stopping,
    report: &(dyn Fn(ClientEvent) + Sync),
) -> Result<(), ClientError> {
    let mut backoff = Duration::from_millis(500);
    // When told to stop, undeliverable reports are left in the spool after this long; a client
    // that has made its punches keeps trying until the server takes them.
    let mut give_up: Option<tokio::time::Instant> = None;
    loop {
        let mut failed = false;
        for s in spool.pending()? {
            let request = tonic::Request::new(s.report.clone());
            match server.track_hole_punch(request).await {
                Ok(_) => {
                    spool.done(&s.path)?;
                    backoff = Duration::from_millis(500);
                    report(ClientEvent::Delivered { key: s.key });
                }
                Err(e) if e.code() == Code::InvalidArgument => {
                    spool.reject(&s.path, e.message())?;
                    report(ClientEvent::Rejected {
                        key: s.key,
                        error: e.message().to_owned(),
                    });
                }
                Err(e) if e.code() == Code::Unauthenticated => {
                    return Err(ClientError::Unauthorized(e.message().to_owned()));
                }
                Err(e) => {
                    report(ClientEvent::Deferred {
                        key: s.key,
                        error: status_text(&e),
                        retry_secs: backoff.as_secs_f64(),
                    });
                    failed = true;
                    break;
                }
            }
        }
        if finished.load(Ordering::Relaxed) && !failed && spool.is_empty() {
            return Ok(());
        }
        if finished.load(Ordering::Relaxed) && stopping.is_set() {
            let deadline = *give_up.get_or_insert_with(|| tokio::time::Instant::now() + STOP_GRACE);
            if tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
        }
    }
}

/// Registers `key`'s host with the server, then delivers what comes into `spool` (announced
/// on `wake`) for as long as the task runs, with the client's retries and backoff: the reports
/// of a long-running role such as `natpunch daemon`.
///
/// # Errors
///
/// The server refuses the API key, or the spool fails.
pub async fn deliver_forever(
    mut server: PunchrServiceClient<Channel>,
    key: Keypair,
    api_key: String,
    spool: Spool,
    wake: Arc<tokio::sync::Notify>,
    report: &(dyn Fn(ClientEvent) + Sync),
) -> Result<(), ClientError> {
    register(&mut server, &key, &api_key, report).await?;
    let never = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = Stopping {
        set: std::sync::atomic::AtomicBool::new(false),
        notify: tokio::sync::Notify::new(),
    };
    deliver(server, spool, wake, never, &stopping, report).await
}

/// How long a stopping client keeps trying to deliver what is in its spool.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Registers `key`'s host, retrying while the server is unavailable.
async fn register(
    server: &mut PunchrServiceClient<Channel>,
    key: &Keypair,
    api_key: &str,
    report: &(dyn Fn(ClientEvent) + Sync),
) -> Result<(), ClientError> {
    let host = key.public().to_peer_id();
    let mut backoff = Duration::from_millis(500);
    loop {
        let request = pb::RegisterRequest {
            client_id: host.to_bytes(),
            agent_version: agent_version(),
            protocols: vec![
                "/libp2p/dcutr".into(),
                "/ipfs/id/1.0.0".into(),
                "/ipfs/ping/1.0.0".into(),
            ],
            api_key: api_key.to_owned(),
        };
        match server.register(request).await {
            Ok(r) => {
                report(ClientEvent::Registered {
                    host: host.to_string(),
                    db_peer_id: r.into_inner().db_peer_id,
                });
                return Ok(());
            }
            Err(e) if e.code() == Code::Unauthenticated => {
                return Err(ClientError::Unauthorized(e.message().to_owned()));
            }
            Err(e) => {
                report(ClientEvent::ServerError {
                    call: "Register".into(),
                    error: status_text(&e),
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One host's loop: ask, punch, spool, until the client has punched enough.
#[allow(clippy::too_many_arguments, reason = "the loop's shared state")]
async fn host_loop(
    index: usize,
    config: &ClientConfig,
    mut server: PunchrServiceClient<Channel>,
    spool: &Spool,
    wake: &tokio::sync::Notify,
    punched: &AtomicU64,
    all_hosts: &[Vec<u8>],
    stopping: &Stopping,
    report: &(dyn Fn(ClientEvent) + Sync),
) -> Result<(), ClientError> {
    let key = &config.hosts[index];
    let host = key.public().to_peer_id();
    let budget_left = || {
        !stopping.is_set()
            && config
                .punches
                .is_none_or(|n| punched.load(Ordering::Relaxed) < n)
    };
    let mut first = true;
    while budget_left() {
        let ask = pb::GetAddrInfoRequest {
            host_id: host.to_bytes(),
            all_host_ids: all_hosts.to_vec(),
            api_key: config.api_key.clone(),
        };
        let served = match server.get_addr_info(ask).await {
            Ok(r) => r.into_inner(),
            Err(e) if e.code() == Code::NotFound => {
                report(ClientEvent::Idle {
                    host: host.to_string(),
                    wait_secs: config.idle.as_secs_f64(),
                });
                stopping.sleep(config.idle).await;
                continue;
            }
            Err(e) if e.code() == Code::Unauthenticated => {
                return Err(ClientError::Unauthorized(e.message().to_owned()));
            }
            Err(e) => {
                report(ClientEvent::ServerError {
                    call: "GetAddrInfo".into(),
                    error: status_text(&e),
                });
                if e.code() == Code::FailedPrecondition {
                    register(&mut server, key, &config.api_key, report).await?;
                } else {
                    stopping
                        .sleep(config.idle.min(Duration::from_secs(5)))
                        .await;
                }
                continue;
            }
        };
        let Ok(remote) = PeerId::from_bytes(&served.remote_id) else {
            continue;
        };
        let addrs: Vec<Multiaddr> = served
            .multi_addresses
            .iter()
            .filter_map(|b| Multiaddr::try_from(b.clone()).ok())
            .collect();
        report(ClientEvent::Served {
            host: host.to_string(),
            remote: remote.to_string(),
            addrs: addrs.iter().map(ToString::to_string).collect(),
            filter: served.protocols.clone(),
        });
        // Counted when taken, so that concurrent hosts do not overshoot the budget.
        if config
            .punches
            .is_some_and(|n| punched.fetch_add(1, Ordering::Relaxed) >= n)
        {
            break;
        }
        let mut ctx = PunchContext {
            served: addrs.clone(),
            filter: served.protocols.clone(),
            client_nat: config.client_nat.clone(),
            ..PunchContext::default()
        };
        if first && config.router_check {
            ctx.network = Some(router_page().await);
        }
        first = false;
        let record = punch(key, remote, &addrs, &served.protocols, config, &mut ctx).await;
        let idempotency = new_key(&host);
        let request = report_of(host, remote, &record, &ctx, &config.api_key, &idempotency);
        spool.put(&request)?;
        wake.notify_one();
        report(ClientEvent::Punched {
            host: host.to_string(),
            remote: remote.to_string(),
            outcome: record.outcome,
            transport: record.transport.clone(),
            time_to_direct_ms: record.time_to_direct_ms,
            error: why_not_direct(&record),
            key: idempotency,
        });
    }
    Ok(())
}

/// Why a punch ended without a direct connection: each failed attempt's error (they differ,
/// and the last alone hides the first), else the punch's own; `None` when it went direct.
fn why_not_direct(record: &Record) -> Option<String> {
    if matches!(
        record.outcome,
        Outcome::Success | Outcome::ConnectionReversed
    ) {
        return None;
    }
    let attempts: Vec<String> = record
        .attempts
        .iter()
        .filter_map(|a| Some(format!("attempt {}: {}", a.number, a.error.as_ref()?)))
        .collect();
    if attempts.is_empty() {
        record.error.clone()
    } else {
        Some(attempts.join("; "))
    }
}

/// One punch from `key`'s host to `remote` through the served relay; always a record.
async fn punch(
    key: &Keypair,
    remote: PeerId,
    served: &[Multiaddr],
    filter: &[i32],
    config: &ClientConfig,
    ctx: &mut PunchContext,
) -> Record {
    let mut peer_config = config.peer.clone();
    peer_config.relays = relays_of(served);
    peer_config.transport = transport_for(filter);
    let no_connection = |error: String| Record {
        side: p2p::record::Side::Dialer,
        engine: "natpunch".into(),
        candidates: "observed".into(),
        local_peer: key.public().to_peer_id().to_string(),
        remote_peer: remote.to_string(),
        relay: String::new(),
        started_unix_ms: now_ns() / 1_000_000,
        outcome: Outcome::NoConnection,
        transport: None,
        dialed_by: None,
        time_to_direct_ms: None,
        to_relay_rtt_ms: None,
        relay_rtt_ms: None,
        direct_rtt_ms: None,
        local_mapping: None,
        local_mapping_source: None,
        remote_mapping: None,
        local_addrs: Vec::new(),
        remote_addrs: Vec::new(),
        attempts: Vec::new(),
        direct_connections: 0,
        error: Some(error),
        ended_ms: 0.0,
    };
    ctx.connect_started_at = now_ns();
    let mut peer = match Peer::new(key.clone(), peer_config) {
        Ok(p) => p,
        Err(e) => return no_connection(e.to_string()),
    };
    let mut record = None;
    let mut connect_started = None;
    let mut on_event = |e: PeerEvent| match e {
        PeerEvent::RelayConnected { .. } => connect_started = Some(now_ns()),
        PeerEvent::HolePunch(r) => record = Some(*r),
        _ => {}
    };
    let result = peer
        .run(Mode::Dial(remote), std::future::pending(), &mut on_event)
        .await;
    if let Some(t) = connect_started {
        ctx.connect_started_at = t;
    }
    ctx.listen = peer.listen_addrs();
    ctx.mappings = peer
        .mappings()
        .map(|m| pb::NatMapping {
            internal_port: i32::from(m.internal.port()),
            external_port: i32::from(m.external_port),
            protocol: m.protocol.clone(),
            addr: m.external_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            addr_network: "ip4".into(),
        })
        .collect();
    peer.unmap().await;
    match (record, result) {
        (Some(r), _) => r,
        (None, Err(e)) => no_connection(e.to_string()),
        (None, Ok(_)) => no_connection("the punch ended without a record".into()),
    }
}

/// The router's login page, as punchr's `--router-check` sends it (capped at 256 KiB).
async fn router_page() -> pb::NetworkInformation {
    let mut info = pb::NetworkInformation::default();
    let page = async {
        let gw = portmap_gateway().ok_or("no default gateway")?;
        let mut s = tokio::net::TcpStream::connect((gw, 80))
            .await
            .map_err(|e| format!("{gw}:80: {e}"))?;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        s.write_all(format!("GET / HTTP/1.0\r\nHost: {gw}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        (&mut s)
            .take(256 * 1024)
            .read_to_end(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&body).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), page).await {
        Ok(Ok(html)) => info.router_login_html = Some(html),
        Ok(Err(e)) => info.router_login_html_error = Some(e),
        Err(_) => info.router_login_html_error = Some("no answer within 5 s".into()),
    }
    info
}

/// The IPv4 default gateway from `/proc/net/route`.
fn portmap_gateway() -> Option<std::net::Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&"00000000") {
            return None;
        }
        let gw = u32::from_str_radix(f.get(2)?, 16).ok()?;
        Some(std::net::Ipv4Addr::from(gw.swap_bytes()))
    })
}

/// A stop request the host loops see between punches and during waits.
#[derive(Debug, Default)]
struct Stopping {
    set: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stopping {
    fn is_set(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    fn request(&self) {
        self.set.store(true, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    /// Sleeps `d`, or less if a stop is requested.
    async fn sleep(&self, d: Duration) {
        if !self.is_set() {
            let _ = tokio::time::timeout(d, self.notify.notified()).await;
        }
    }
}

/// Registers every host and runs them until `config.punches` punches were made or `stop`
/// completes (punches in progress finish first); then delivers the reports, leaving what the
/// server does not take within 20 s in the spool for the next start. Returns the punches made.
pub async fn run(
    config: ClientConfig,
    channel: Channel,
    spool: Spool,
    stop: impl Future<Output = ()>,
    report: &(dyn Fn(ClientEvent) + Sync),
) -> Result<u64, ClientError> {
    let stopping = Stopping::default();
    tokio::pin!(stop);
    let mut server = PunchrServiceClient::new(channel);
    for key in &config.hosts {
        tokio::select! {
            r = register(&mut server, key, &config.api_key, report) => r?,
            () = &mut stop => return Ok(0),
        }
    }
    let all_hosts: Vec<Vec<u8>> = config
        .hosts
        .iter()
        .map(|k| k.public().to_peer_id().to_bytes())
        .collect();
    let wake = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let punched = AtomicU64::new(0);
    let sender = deliver(
        server.clone(),
        spool.clone(),
        Arc::clone(&wake),
        Arc::clone(&finished),
        &stopping,
        report,
    );
    let hosts = async {
        let loops = (0..config.hosts.len()).map(|i| {
            host_loop(
                i,
                &config,
                server.clone(),
                &spool,
                &wake,
                &punched,
                &all_hosts,
                &stopping,
                report,
            )
        });
        let results = futures::future::join_all(loops).await;
        finished.store(true, Ordering::Relaxed);
        wake.notify_one();
        results
            .into_iter()
            .collect::<Result<Vec<()>, ClientError>>()
    };
    let both = async { tokio::join!(hosts, sender) };
    tokio::pin!(both);
    let (hosts, sent) = tokio::select! {
        r = &mut both => r,
        () = &mut stop => {
            stopping.request();
            both.await
        }
    };
    hosts?;
    sent?;
    Ok(punched
        .load(Ordering::Relaxed)
        .min(config.punches.unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_is_not_there_is_called_so_with_the_cause_under_it() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{closed}"))
            .expect("endpoint")
            .connect_lazy();
        let e = PunchrServiceClient::new(channel)
            .register(pb::RegisterRequest::default())
            .await
            .expect_err("nothing listens");
        let text = status_text(&e);
        assert!(text.starts_with("Unavailable: "), "{text}");
        assert!(text.contains("Connection refused"), "{text}");
        let clauses: Vec<&str> = text.split(": ").collect();
        let once: std::collections::BTreeSet<&str> = clauses.iter().copied().collect();
        assert_eq!(once.len(), clauses.len(), "each clause once: {text}");
    }

    #[test]
    fn api_keys_are_version_4_uuids() {
        let k = new_api_key();
        assert_eq!(k.len(), 36);
        assert_eq!(k.matches('-').count(), 4);
        assert_eq!(k.as_bytes()[14], b'4');
        assert_ne!(k, new_api_key());
    }

    #[test]
    fn filters_pick_transports_and_relays_come_from_circuit_addresses() {
        assert_eq!(transport_for(&[4, 6]), Transport::Tcp);
        assert_eq!(transport_for(&[4, 461]), Transport::Quic);
        assert_eq!(transport_for(&[41, 460]), Transport::Quic);
        assert_eq!(transport_for(&[]), Transport::Both);
        let relay = PeerId::random();
        let other = PeerId::random();
        let served: Vec<Multiaddr> = [
            format!("/ip4/198.51.100.7/tcp/4001/p2p/{relay}/p2p-circuit"),
            format!("/ip4/198.51.100.7/udp/4001/quic-v1/p2p/{relay}/p2p-circuit"),
            format!("/ip4/203.0.113.1/tcp/4001/p2p/{other}/p2p-circuit"),
            "/ip4/198.51.100.9/tcp/1".to_owned(),
        ]
        .iter()
        .map(|a| a.parse().expect("maddr"))
        .collect();
        let relays = relays_of(&served);
        assert_eq!(
            relays.len(),
            2,
            "the first relay's two addresses: {relays:?}"
        );
        assert!(
            relays
                .iter()
                .all(|a| a.iter().last() == Some(Protocol::P2p(relay)))
        );
    }

    #[test]
    fn a_record_becomes_a_report_the_server_accepts() {
        let (me, remote, relay) = (PeerId::random(), PeerId::random(), PeerId::random());
        let record = Record {
            side: p2p::record::Side::Dialer,
            engine: "natpunch".into(),
            candidates: "observed".into(),
            local_peer: me.to_string(),
            remote_peer: remote.to_string(),
            relay: relay.to_string(),
            started_unix_ms: 1_795_303_375_400,
            outcome: Outcome::Success,
            transport: Some("quic".into()),
            dialed_by: Some("local".into()),
            time_to_direct_ms: Some(270.0),
            to_relay_rtt_ms: Some(50.0),
            relay_rtt_ms: Some(104.0),
            direct_rtt_ms: Some(100.0),
            local_mapping: None,
            local_mapping_source: None,
            remote_mapping: None,
            local_addrs: vec!["/ip4/198.51.100.2/udp/5000/quic-v1".into()],
            remote_addrs: vec!["/ip4/198.51.100.3/udp/6000/quic-v1".into()],
            attempts: vec![p2p::record::Attempt {
                number: 1,
                started_ms: 5.0,
                rtt_ms: Some(104.0),
                reversed: false,
                dialed_ms: Some(160.0),
                dialed: vec!["/ip4/198.51.100.3/udp/6000/quic-v1".into()],
                remote_addrs: vec!["/ip4/198.51.100.3/udp/6000/quic-v1".into()],
                outcome: AttemptOutcome::Success,
                error: None,
                dial_errors: vec![],
                ended_ms: 270.0,
                birthday: None,
            }],
            direct_connections: 1,
            error: None,
            ended_ms: 400.0,
        };
        let ctx = PunchContext {
            served: vec![
                format!("/ip4/198.51.100.7/udp/4001/quic-v1/p2p/{relay}/p2p-circuit")
                    .parse()
                    .expect("maddr"),
            ],
            filter: vec![4, 461],
            connect_started_at: 1_795_303_375_300_000_000,
            ..PunchContext::default()
        };
        let r = report_of(me, remote, &record, &ctx, "key", "k-1");
        assert_eq!(
            (r.client_id.clone(), r.remote_id.clone()),
            (me.to_bytes(), remote.to_bytes())
        );
        let report = api::report::Report::from_request(&r).expect("the server's validation");
        assert_eq!(report.outcome, "SUCCESS");
        assert_eq!(report.technique.as_deref(), Some("dcutr-quic"));
        assert_eq!(report.attempts.len(), 1);
        assert!((report.attempts[0].elapsed_time - 0.265).abs() < 1e-6);
        assert_eq!(report.connect_ended_at, 1_795_303_375_400_000_000);
        assert!(report.connect_started_at < report.connect_ended_at);
        assert_eq!(
            report.latencies.len(),
            3,
            "to the relay, through it, direct"
        );
        assert_eq!(report.latencies[0].mtype, "TO_RELAY");
        assert!(report.has_direct_conns);
        // A failed setup is a NO_CONNECTION report that validates too.
        let mut failed = record.clone();
        failed.outcome = Outcome::NoConnection;
        failed.attempts.clear();
        failed.local_addrs.clear();
        let ctx = PunchContext {
            listen: vec!["/ip4/10.0.0.2/tcp/4001".parse().expect("maddr")],
            ..ctx
        };
        let r = report_of(me, remote, &failed, &ctx, "key", "k-2");
        assert!(api::report::Report::from_request(&r).is_ok());
    }
}

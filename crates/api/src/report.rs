//! Validation: a `TrackHolePunchRequest` from the wire becomes a [`Report`] only when it is
//! complete and consistent; otherwise [`Invalid`] names the first field that is wrong. The other
//! requests' fields are capped here too ([`registration`], [`host_ids`]), so that everything
//! the network sends is bounded before it reaches the store.
//!
//! prost decodes proto2 `required` fields as plain values, so a missing timestamp arrives as 0;
//! these checks are what punchr's server meant to do (its own checks returned success and stored
//! nothing). A [`Report`] holds text forms (peer IDs in base58, multiaddrs as strings) and the
//! enum names the store writes.

use std::net::IpAddr;

use crate::multiaddr::Multiaddr;
use crate::pb;
use crate::peer_id::PeerId;

/// The longest idempotency key, technique, NAT description or transport name accepted.
const MAX_LABEL: usize = 128;
/// The longest error text kept; longer ones are cut (at a character boundary).
const MAX_ERROR: usize = 4096;
/// The longest router page kept.
const MAX_HTML: usize = 256 * 1024;
/// At most this many entries in any list of a report.
const MAX_LIST: usize = 256;
/// The longest agent version accepted from a registering host; a remote's, in a report, is cut
/// to it. libp2p's own are under 64 bytes (`punchr/go-client/0.8.0+abc1234`, `kubo/0.30.0/…`).
pub const MAX_AGENT_VERSION: usize = 256;
/// At most this many protocols from a registering host: a libp2p host announces its protocols
/// in one identify message of at most 4096 bytes (rust-libp2p's cap), a few dozen names.
pub const MAX_PROTOCOLS: usize = MAX_LIST;
/// The longest protocol name accepted from a registering host; a remote's, in a report, are
/// cut to it. libp2p's are under 64 bytes (`/libp2p/circuit/relay/0.2.0/stop`).
pub const MAX_PROTOCOL: usize = 256;
/// At most this many host IDs in a GetAddrInfo request: every host of one client, and punchr's
/// Go client and natpunch's run 10 by default (`--host-count`), each a full libp2p node.
pub const MAX_HOSTS: usize = 256;

/// A report that failed validation: the field (a path such as `hole_punch_attempts[1].ended_at`)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// The field.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A multiaddr with what the store derives from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Addr {
    /// The multiaddr as text.
    pub maddr: String,
    /// Its IP address, when it has one.
    pub ip: Option<String>,
    /// `tcp`, `quic`, `quic-v1`, `ws`, `webtransport`, … (the last transport protocol in it).
    pub transport: Option<String>,
    /// It goes through a relay (`/p2p-circuit`).
    pub is_relay: bool,
    /// Its IP is globally routable.
    pub is_public: bool,
}

impl Addr {
    /// Describes `addr`.
    pub fn of(addr: &Multiaddr) -> Self {
        let mut ip = None;
        let mut transport = None;
        let mut is_relay = false;
        for c in addr {
            match c.name() {
                "ip4" | "ip6" if ip.is_none() => ip = c.ip(),
                "p2p-circuit" => is_relay = true,
                _ if is_relay => {}
                "tcp" => transport = Some("tcp"),
                "quic" => transport = Some("quic"),
                "quic-v1" => transport = Some("quic-v1"),
                "ws" | "wss" | "x-parity-ws" | "x-parity-wss" => transport = Some("ws"),
                "webtransport" => transport = Some("webtransport"),
                "webrtc-direct" => transport = Some("webrtc-direct"),
                _ => {}
            }
        }
        Self {
            maddr: addr.to_string(),
            ip: ip.map(|i| i.to_string()),
            transport: transport.map(str::to_owned),
            is_relay,
            is_public: ip.is_some_and(is_public),
        }
    }

    /// Parses the binary form sent on the wire; `field` names it in the error.
    pub fn from_bytes(bytes: &[u8], field: &str) -> Result<Self, Invalid> {
        if bytes.is_empty() {
            return Err(invalid(field, "empty"));
        }
        let addr = Multiaddr::from_bytes(bytes)
            .map_err(|e| invalid(field, format!("not a multiaddr ({e})")))?;
        Ok(Self::of(&addr))
    }
}

/// Whether `ip` is reachable from the whole internet (not private, shared, loopback, link-local,
/// documentation or multicast space).
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [o0, o1, ..] = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_documentation()
                || a.is_multicast()
                || (o0 == 100 && (64..128).contains(&o1))
                || o0 == 0
                || o0 >= 240)
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && a.segments()[1] == 0x0db8)
        }
    }
}

/// Parses a peer ID from its binary form.
pub fn peer_id(bytes: &[u8], field: &str) -> Result<String, Invalid> {
    PeerId::from_bytes(bytes)
        .map(|p| p.to_string())
        .map_err(|_| invalid(field, "not a peer ID"))
}

/// One hole-punch attempt of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// Unix ns.
    pub opened_at: i64,
    /// Unix ns.
    pub started_at: Option<i64>,
    /// Unix ns.
    pub ended_at: i64,
    /// Seconds.
    pub start_rtt: Option<f64>,
    /// Seconds.
    pub elapsed_time: f64,
    /// `hole_punch_attempt_outcome` name.
    pub outcome: &'static str,
    /// Empty strings (as punchr's Go client sends them) become `None`.
    pub error: Option<String>,
    /// Same.
    pub direct_dial_error: Option<String>,
    /// The addresses dialed.
    pub addrs: Vec<Addr>,
}

/// A latency measurement of a report, with statistics over its successful pings only.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    /// The measured peer.
    pub remote: String,
    /// Its agent version.
    pub agent_version: String,
    /// Its protocols.
    pub protocols: Vec<String>,
    /// The address measured.
    pub addr: Addr,
    /// `latency_measurement_type` name.
    pub mtype: &'static str,
    /// Seconds as sent; -1 marks a failed ping.
    pub rtts: Vec<f64>,
    /// One per rtt (empty when the ping succeeded), or none at all.
    pub rtt_errs: Vec<String>,
    /// Mean of the successful pings.
    pub avg: Option<f64>,
    /// Largest successful ping.
    pub max: Option<f64>,
    /// Smallest successful ping.
    pub min: Option<f64>,
    /// Sample standard deviation of the successful pings (two or more).
    pub std: Option<f64>,
}

/// A port mapping the client had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The port on the host.
    pub internal_port: i32,
    /// The port on the router.
    pub external_port: i32,
    /// `tcp` or `udp` (as sent).
    pub protocol: String,
    /// The router's external address.
    pub addr: String,
    /// Its network (`ip4`, `ip6`, …).
    pub addr_network: String,
}

/// The client's network at the time of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The router's login page, when the client was told to fetch it.
    pub router_html: Option<String>,
    /// Why it could not be fetched.
    pub router_html_error: Option<String>,
    /// Whether the host reached the IPv6 internet.
    pub supports_ipv6: Option<bool>,
    /// Why that could not be told.
    pub supports_ipv6_error: Option<String>,
}

/// A validated hole-punch report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The reporting host (base58 peer ID).
    pub client: String,
    /// The remote it punched.
    pub remote: String,
    /// The addresses it was given.
    pub remote_addrs: Vec<Addr>,
    /// Unix ns.
    pub connect_started_at: i64,
    /// Unix ns.
    pub connect_ended_at: i64,
    /// The attempts.
    pub attempts: Vec<Attempt>,
    /// Connections open at the end.
    pub open_addrs: Vec<Addr>,
    /// Whether any of them was direct.
    pub has_direct_conns: bool,
    /// The error, if any.
    pub error: Option<String>,
    /// `hole_punch_outcome` name.
    pub outcome: &'static str,
    /// Unix ns.
    pub ended_at: i64,
    /// The host's listen addresses.
    pub listen_addrs: Vec<Addr>,
    /// The protocol filter in effect.
    pub protocols: Vec<i32>,
    /// Latency measurements.
    pub latencies: Vec<Latency>,
    /// Network information, when sent.
    pub network: Option<Network>,
    /// Port mappings.
    pub mappings: Vec<Mapping>,
    /// natpunch: the idempotency key.
    pub idempotency_key: Option<String>,
    /// natpunch: the technique.
    pub technique: Option<String>,
    /// natpunch: seconds from relayed to direct connection.
    pub time_to_direct: Option<f64>,
    /// natpunch: the client's NAT behaviour.
    pub client_nat: Option<String>,
    /// natpunch: the remote's NAT behaviour.
    pub remote_nat: Option<String>,
    /// natpunch: the transport of the direct connection.
    pub transport: Option<String>,
}

/// The name the store uses for a hole-punch outcome number.
pub fn outcome_name(n: i32) -> Option<&'static str> {
    use pb::HolePunchOutcome as O;
    Some(match O::try_from(n).ok()? {
        O::Unknown => "UNKNOWN",
        O::NoConnection => "NO_CONNECTION",
        O::NoStream => "NO_STREAM",
        O::ConnectionReversed => "CONNECTION_REVERSED",
        O::Cancelled => "CANCELLED",
        O::Failed => "FAILED",
        O::Success => "SUCCESS",
    })
}

fn attempt_outcome_name(n: i32) -> Option<&'static str> {
    use pb::HolePunchAttemptOutcome as A;
    Some(match A::try_from(n).ok()? {
        A::Unknown => "UNKNOWN",
        A::DirectDial => "DIRECT_DIAL",
        A::ProtocolError => "PROTOCOL_ERROR",
        A::Cancelled => "CANCELLED",
        A::Timeout => "TIMEOUT",
        A::Failed => "FAILED",
        A::Success => "SUCCESS",
    })
}

fn latency_type_name(n: i32) -> Option<&'static str> {
    use pb::LatencyMeasurementType as L;
    Some(match L::try_from(n).ok()? {
        L::ToRelay => "TO_RELAY",
        L::ToRemoteThroughRelay => "TO_REMOTE_THROUGH_RELAY",
        // punchr's database spells it without the underscore.
        L::ToRemoteAfterHolePunch => "TO_REMOTE_AFTER_HOLEPUNCH",
    })
}

/// A required Unix-nanosecond timestamp: present (not 0) and within i64.
fn timestamp(v: u64, field: &str) -> Result<i64, Invalid> {
    if v == 0 {
        return Err(invalid(field, "missing"));
    }
    i64::try_from(v).map_err(|_| invalid(field, "out of range"))
}

/// A duration in seconds: finite and not negative.
fn seconds(v: f32, field: &str) -> Result<f64, Invalid> {
    if !v.is_finite() || v < 0.0 {
        return Err(invalid(field, format!("{v} is not a duration in seconds")));
    }
    Ok(f64::from(v))
}

/// Empty becomes `None`; long text is cut at a character boundary.
fn text(v: Option<&str>, max: usize) -> Option<String> {
    let v = v?;
    if v.is_empty() {
        return None;
    }
    let mut end = v.len().min(max);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    Some(v.get(..end).unwrap_or_default().to_owned())
}

/// A short label (idempotency key, technique, …): at most [`MAX_LABEL`] bytes, not empty.
fn label(v: Option<&str>, field: &str) -> Result<Option<String>, Invalid> {
    match v {
        None => Ok(None),
        Some("") => Err(invalid(field, "empty")),
        Some(s) if s.len() > MAX_LABEL => Err(invalid(field, "longer than 128 bytes")),
        Some(s) => Ok(Some(s.to_owned())),
    }
}

fn list<T>(v: &[T], field: &str) -> Result<(), Invalid> {
    if v.len() > MAX_LIST {
        return Err(invalid(field, format!("more than {MAX_LIST} entries")));
    }
    Ok(())
}

fn addrs(v: &[Vec<u8>], field: &str) -> Result<Vec<Addr>, Invalid> {
    list(v, field)?;
    v.iter()
        .enumerate()
        .map(|(i, b)| Addr::from_bytes(b, &format!("{field}[{i}]")))
        .collect()
}

/// Mean, max, min and sample standard deviation of the successful pings.
fn stats(rtts: &[f64], errs: &[String]) -> [Option<f64>; 4] {
    let ok: Vec<f64> = rtts
        .iter()
        .enumerate()
        .filter(|(i, r)| **r >= 0.0 && errs.get(*i).is_none_or(String::is_empty))
        .map(|(_, r)| *r)
        .collect();
    if ok.is_empty() {
        return [None; 4];
    }
    let n = ok.len() as f64;
    let avg = ok.iter().sum::<f64>() / n;
    let max = ok.iter().copied().fold(f64::MIN, f64::max);
    let min = ok.iter().copied().fold(f64::MAX, f64::min);
    let std = (ok.len() > 1)
        .then(|| (ok.iter().map(|r| (r - avg).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    [Some(avg), Some(max), Some(min), std]
}

impl Report {
    /// Validates `r`; the first problem found is returned.
    pub fn from_request(r: &pb::TrackHolePunchRequest) -> Result<Self, Invalid> {
        let client = peer_id(&r.client_id, "client_id")?;
        let remote = peer_id(&r.remote_id, "remote_id")?;
        let connect_started_at = timestamp(r.connect_started_at, "connect_started_at")?;
        let connect_ended_at = timestamp(r.connect_ended_at, "connect_ended_at")?;
        if connect_ended_at < connect_started_at {
            return Err(invalid("connect_ended_at", "before connect_started_at"));
        }
        let ended_at = timestamp(r.ended_at, "ended_at")?;
        if ended_at < connect_started_at {
            return Err(invalid("ended_at", "before connect_started_at"));
        }
        let outcome = outcome_name(r.outcome).ok_or_else(|| {
            invalid(
                "outcome",
                format!("{} is not a HolePunchOutcome", r.outcome),
            )
        })?;
        if r.listen_multi_addresses.is_empty() {
            return Err(invalid("listen_multi_addresses", "empty"));
        }
        let listen_addrs = addrs(&r.listen_multi_addresses, "listen_multi_addresses")?;
        let remote_addrs = addrs(&r.remote_multi_addresses, "remote_multi_addresses")?;
        let open_addrs = addrs(&r.open_multi_addresses, "open_multi_addresses")?;
        list(&r.protocols, "protocols")?;
        list(&r.hole_punch_attempts, "hole_punch_attempts")?;
        let mut attempts = Vec::with_capacity(r.hole_punch_attempts.len());
        for (i, a) in r.hole_punch_attempts.iter().enumerate() {
            let f = |name: &str| format!("hole_punch_attempts[{i}].{name}");
            let opened_at = timestamp(a.opened_at, &f("opened_at"))?;
            let ended_at = timestamp(a.ended_at, &f("ended_at"))?;
            if ended_at < opened_at {
                return Err(invalid(f("ended_at"), "before opened_at"));
            }
            let started_at = match a.started_at {
                None | Some(0) => None,
                Some(t) => Some(timestamp(t, &f("started_at"))?),
            };
            attempts.push(Attempt {
                opened_at,
                started_at,
                ended_at,
                start_rtt: a
                    .start_rtt
                    .map(|v| seconds(v, &f("start_rtt")))
                    .transpose()?,
                elapsed_time: seconds(a.elapsed_time, &f("elapsed_time"))?,
                outcome: attempt_outcome_name(a.outcome).ok_or_else(|| {
                    invalid(
                        f("outcome"),
                        format!("{} is not a HolePunchAttemptOutcome", a.outcome),
                    )
                })?,
                error: text(a.error.as_deref(), MAX_ERROR),
                direct_dial_error: text(a.direct_dial_error.as_deref(), MAX_ERROR),
                addrs: addrs(&a.multi_addresses, &f("multi_addresses"))?,
            });
        }
        list(&r.latency_measurements, "latency_measurements")?;
        let mut latencies = Vec::with_capacity(r.latency_measurements.len());
        for (i, l) in r.latency_measurements.iter().enumerate() {
            let f = |name: &str| format!("latency_measurements[{i}].{name}");
            list(&l.rtts, &f("rtts"))?;
            list(&l.protocols, &f("protocols"))?;
            if !l.rtt_errs.is_empty() && l.rtt_errs.len() != l.rtts.len() {
                return Err(invalid(
                    f("rtt_errs"),
                    format!("{} entries for {} rtts", l.rtt_errs.len(), l.rtts.len()),
                ));
            }
            let mut rtts = Vec::with_capacity(l.rtts.len());
            for (j, v) in l.rtts.iter().enumerate() {
                // -1 is the sentinel of a failed ping; anything else must be a duration.
                if *v != -1.0 {
                    seconds(*v, &format!("latency_measurements[{i}].rtts[{j}]"))?;
                }
                rtts.push(f64::from(*v));
            }
            let [avg, max, min, std] = stats(&rtts, &l.rtt_errs);
            latencies.push(Latency {
                remote: peer_id(&l.remote_id, &f("remote_id"))?,
                // The remote's identify, relayed: cut, not refused, so that a peer announcing
                // odd names cannot make the reports about it fail.
                agent_version: text(Some(&l.agent_version), MAX_AGENT_VERSION).unwrap_or_default(),
                protocols: l
                    .protocols
                    .iter()
                    .map(|p| text(Some(p), MAX_PROTOCOL).unwrap_or_default())
                    .collect(),
                addr: Addr::from_bytes(&l.multi_address, &f("multi_address"))?,
                mtype: latency_type_name(l.mtype).ok_or_else(|| {
                    invalid(
                        f("mtype"),
                        format!("{} is not a LatencyMeasurementType", l.mtype),
                    )
                })?,
                rtts,
                rtt_errs: l
                    .rtt_errs
                    .iter()
                    .map(|e| text(Some(e), MAX_ERROR).unwrap_or_default())
                    .collect(),
                avg,
                max,
                min,
                std,
            });
        }
        list(&r.nat_mappings, "nat_mappings")?;
        let mut mappings = Vec::with_capacity(r.nat_mappings.len());
        for (i, m) in r.nat_mappings.iter().enumerate() {
            let f = |name: &str| format!("nat_mappings[{i}].{name}");
            for (name, port) in [
                ("internal_port", m.internal_port),
                ("external_port", m.external_port),
            ] {
                if !(0..=65535).contains(&port) {
                    return Err(invalid(f(name), format!("{port} is not a port")));
                }
            }
            mappings.push(Mapping {
                internal_port: m.internal_port,
                external_port: m.external_port,
                protocol: label(Some(&m.protocol), &f("protocol"))?.unwrap_or_default(),
                addr: text(Some(&m.addr), MAX_LABEL).unwrap_or_default(),
                addr_network: text(Some(&m.addr_network), MAX_LABEL).unwrap_or_default(),
            });
        }
        let network = r.network_information.as_ref().map(|n| Network {
            router_html: text(n.router_login_html.as_deref(), MAX_HTML),
            router_html_error: text(n.router_login_html_error.as_deref(), MAX_ERROR),
            supports_ipv6: n.supports_ipv6,
            supports_ipv6_error: text(n.supports_ipv6_error.as_deref(), MAX_ERROR),
        });
        let time_to_direct = r
            .time_to_direct
            .map(|v| seconds(v, "time_to_direct"))
            .transpose()?;
        Ok(Self {
            client,
            remote,
            remote_addrs,
            connect_started_at,
            connect_ended_at,
            attempts,
            open_addrs,
            has_direct_conns: r.has_direct_conns,
            error: text(r.error.as_deref(), MAX_ERROR),
            outcome,
            ended_at,
            listen_addrs,
            protocols: r.protocols.clone(),
            latencies,
            network,
            mappings,
            idempotency_key: label(r.idempotency_key.as_deref(), "idempotency_key")?,
            technique: label(r.technique.as_deref(), "technique")?,
            time_to_direct,
            client_nat: label(r.client_nat.as_deref(), "client_nat")?,
            remote_nat: label(r.remote_nat.as_deref(), "remote_nat")?,
            transport: label(r.transport.as_deref(), "transport")?,
        })
    }
}

/// A registering host's agent version and protocols, checked against [`MAX_AGENT_VERSION`],
/// [`MAX_PROTOCOLS`] and [`MAX_PROTOCOL`].
pub fn registration(r: &pb::RegisterRequest) -> Result<(), Invalid> {
    if r.agent_version.len() > MAX_AGENT_VERSION {
        return Err(invalid(
            "agent_version",
            format!("longer than {MAX_AGENT_VERSION} bytes"),
        ));
    }
    if r.protocols.len() > MAX_PROTOCOLS {
        return Err(invalid(
            "protocols",
            format!("more than {MAX_PROTOCOLS} entries"),
        ));
    }
    match r.protocols.iter().position(|p| p.len() > MAX_PROTOCOL) {
        Some(i) => Err(invalid(
            format!("protocols[{i}]"),
            format!("longer than {MAX_PROTOCOL} bytes"),
        )),
        None => Ok(()),
    }
}

/// The hosts of a GetAddrInfo request as base58 peer IDs: `host_id` first, then each of
/// `all_host_ids` not given before. At most [`MAX_HOSTS`] entries are accepted (duplicates
/// count); each must be a peer ID, which bounds its length too (a multihash of at most 44
/// bytes, nothing after it).
pub fn host_ids(host_id: &[u8], all_host_ids: &[Vec<u8>]) -> Result<Vec<String>, Invalid> {
    if all_host_ids.len() > MAX_HOSTS {
        return Err(invalid(
            "all_host_ids",
            format!("more than {MAX_HOSTS} entries"),
        ));
    }
    let first = peer_id(host_id, "host_id")?;
    let mut seen = std::collections::HashSet::from([first.clone()]);
    let mut hosts = vec![first];
    for (i, h) in all_host_ids.iter().enumerate() {
        let h = peer_id(h, &format!("all_host_ids[{i}]"))?;
        if seen.insert(h.clone()) {
            hosts.push(h);
        }
    }
    Ok(hosts)
}

/// A correction for reports from clients with a known defect, by their agent version:
/// punchr's Rust client (`punchr/rust-client/…`) sends attempt durations in microseconds where
/// the field is seconds.
pub fn normalised_for(agent_version: &str) -> Option<fn(Report) -> Report> {
    agent_version
        .starts_with("punchr/rust-client/")
        .then_some(|mut r: Report| {
            for a in &mut r.attempts {
                a.elapsed_time /= 1e6;
            }
            r
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_leave_failed_pings_out() {
        let [avg, max, min, std] = stats(
            &[0.1, -1.0, 0.3],
            &[String::new(), "timeout".into(), String::new()],
        );
        assert!((avg.expect("avg") - 0.2).abs() < 1e-9);
        assert_eq!(max, Some(0.3));
        assert_eq!(min, Some(0.1));
        assert!((std.expect("std") - 0.141_421_356).abs() < 1e-6);
        assert_eq!(stats(&[-1.0], &[]), [None; 4]);
        let [_, _, _, one] = stats(&[0.2], &[]);
        assert_eq!(one, None, "no deviation from one ping");
    }

    #[test]
    fn addresses_are_classified() {
        let relay: Multiaddr = "/ip4/203.0.113.9/udp/4001/quic-v1/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp/p2p-circuit"
            .parse()
            .expect("maddr");
        let a = Addr::of(&relay);
        assert!(a.is_relay);
        assert_eq!(a.transport.as_deref(), Some("quic-v1"));
        assert!(!a.is_public, "documentation space");
        let public = Addr::of(&"/ip4/8.8.8.8/tcp/1".parse().expect("maddr"));
        assert!(public.is_public && !public.is_relay);
        assert_eq!(public.ip.as_deref(), Some("8.8.8.8"));
        for private in [
            "/ip4/100.64.1.1/tcp/1",
            "/ip4/10.0.0.1/tcp/1",
            "/ip6/fd00::1/tcp/1",
        ] {
            assert!(
                !Addr::of(&private.parse().expect("maddr")).is_public,
                "{private}"
            );
        }
        assert!(Addr::from_bytes(&[0xff, 0xff], "x").is_err());
    }

    #[test]
    fn a_remotes_identify_in_a_latency_measurement_is_cut_not_refused() {
        let peer = crate::sample::peer_id;
        let mut r = crate::sample::report(&peer(), &peer(), &peer(), "key", None);
        r.latency_measurements[0].agent_version = "a".repeat(10_000);
        r.latency_measurements[0].protocols = vec!["/p".repeat(10_000), "/ipfs/id/1.0.0".into()];
        let report = Report::from_request(&r).expect("valid");
        let l = &report.latencies[0];
        assert_eq!(l.agent_version.len(), 256);
        assert_eq!(l.protocols[0].len(), 256);
        assert_eq!(l.protocols[1], "/ipfs/id/1.0.0");
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let s = "é".repeat(10);
        assert_eq!(text(Some(&s), 5).as_deref(), Some("éé"));
        assert_eq!(text(Some(""), 5), None);
    }
}

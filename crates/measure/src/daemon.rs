//! The connectivity daemon's connections as measurement reports: each connection an
//! application made through `natpunch daemon` becomes a `TrackHolePunchRequest` in the format
//! the clients use, with the technique that gave the socket (`udp-punch`,
//! `tcp-simultaneous-open`, `tcp-nutss`, `direct`, `reversal`; a relayed one is a failed hole
//! punch) and every technique tried as an attempt.

use std::net::SocketAddr;

use libp2p::PeerId;
use libp2p::multiaddr::{Multiaddr, Protocol};

use api::pb;
use daemon::api::Proto;
use daemon::service::ConnectionRecord;

/// The report of connection `record` made by the connecting side, or `None` for the answering
/// side's (the connecting side reports, as a hole punch's dialer does) and for a record whose
/// peers are not peer IDs.
pub fn connection_report(
    record: &ConnectionRecord,
    api_key: &str,
    key: &str,
) -> Option<pb::TrackHolePunchRequest> {
    if record.side != "initiator" {
        return None;
    }
    let local: PeerId = record.local.parse().ok()?;
    let remote: PeerId = record.peer.parse().ok()?;
    let start = record.started_unix_ms.saturating_mul(1_000_000).max(1);
    let at = |ms: f64| start.saturating_add((ms.max(0.0) * 1e6) as u64);
    let end = at(record.time_to_socket_ms);
    let attempts = record
        .tried
        .iter()
        .map(|t| {
            let ended = t
                .ended_ms
                .unwrap_or(record.time_to_socket_ms)
                .max(t.started_ms);
            pb::HolePunchAttempt {
                opened_at: at(t.started_ms),
                started_at: Some(at(t.started_ms)),
                ended_at: at(ended),
                start_rtt: None,
                elapsed_time: ((ended - t.started_ms) / 1000.0) as f32,
                outcome: match t.result.as_str() {
                    "ok" => pb::HolePunchAttemptOutcome::Success,
                    "stopped" => pb::HolePunchAttemptOutcome::Cancelled,
                    "timeout" => pb::HolePunchAttemptOutcome::Timeout,
                    _ => pb::HolePunchAttemptOutcome::Failed,
                } as i32,
                error: (!matches!(t.result.as_str(), "ok" | "stopped")).then(|| t.result.clone()),
                direct_dial_error: None,
                multi_addresses: Vec::new(),
            }
        })
        .collect();
    let proto = record.proto;
    let listen: Vec<Vec<u8>> = record
        .offered
        .iter()
        .map(|a| multiaddr(*a, proto).to_vec())
        .collect();
    let outcome = match (record.technique, record.direct) {
        (Some(_), true) => pb::HolePunchOutcome::Success,
        (Some(_), false) => pb::HolePunchOutcome::Failed,
        (None, _) => pb::HolePunchOutcome::NoConnection,
    };
    Some(pb::TrackHolePunchRequest {
        client_id: local.to_bytes(),
        remote_id: remote.to_bytes(),
        remote_multi_addresses: Vec::new(),
        connect_started_at: start,
        connect_ended_at: start,
        hole_punch_attempts: attempts,
        open_multi_addresses: Vec::new(),
        has_direct_conns: record.direct,
        error: record.error.clone(),
        outcome: outcome as i32,
        ended_at: end,
        // The server wants at least one; a record without candidates (a failed connect) has
        // none to give, so it says where it would have listened: nowhere known.
        listen_multi_addresses: if listen.is_empty() {
            vec![
                Multiaddr::empty()
                    .with(Protocol::Ip4([0, 0, 0, 0].into()))
                    .to_vec(),
            ]
        } else {
            listen
        },
        api_key: api_key.to_owned(),
        protocols: Vec::new(),
        latency_measurements: Vec::new(),
        network_information: None,
        nat_mappings: Vec::new(),
        idempotency_key: Some(key.to_owned()),
        technique: record
            .technique
            .map(|t| daemon::service::technique_name(t).to_owned()),
        time_to_direct: record
            .direct
            .then(|| (record.time_to_socket_ms / 1000.0) as f32),
        client_nat: None,
        remote_nat: None,
        transport: Some(proto.as_str().to_owned()),
    })
}

fn multiaddr(a: SocketAddr, proto: Proto) -> Multiaddr {
    let ip = match a.ip() {
        std::net::IpAddr::V4(ip) => Protocol::Ip4(ip),
        std::net::IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    let port = match proto {
        Proto::Tcp => Protocol::Tcp(a.port()),
        Proto::Udp => Protocol::Udp(a.port()),
    };
    Multiaddr::empty().with(ip).with(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use daemon::api::Technique;
    use daemon::service::TriedRecord;

    fn record(technique: Option<Technique>, direct: bool) -> ConnectionRecord {
        ConnectionRecord {
            side: "initiator",
            local: PeerId::random().to_string(),
            started_unix_ms: 1_764_900_000_000,
            offered: vec!["11.0.0.5:4000".parse().expect("addr")],
            peer: PeerId::random().to_string(),
            service: "ssh".into(),
            proto: Proto::Udp,
            technique,
            direct,
            time_to_socket_ms: 160.0,
            tried: vec![
                TriedRecord {
                    technique: "relay".into(),
                    started_ms: 0.0,
                    ended_ms: Some(5.0),
                    result: "ok".into(),
                },
                TriedRecord {
                    technique: "udp-punch".into(),
                    started_ms: 100.0,
                    ended_ms: Some(158.0),
                    result: if direct { "ok" } else { "timeout" }.into(),
                },
            ],
            birthday: None,
            error: None,
        }
    }

    /// The server takes what the daemon reports: the report passes its validation, with the
    /// technique and the outcome the connection had.
    #[test]
    fn a_connection_becomes_a_report_the_server_accepts() {
        let direct = connection_report(&record(Some(Technique::UdpPunch), true), "k", "id1")
            .expect("a report");
        let report = api::report::Report::from_request(&direct).expect("valid");
        assert_eq!(direct.technique.as_deref(), Some("udp-punch"));
        assert_eq!(direct.outcome, pb::HolePunchOutcome::Success as i32);
        assert_eq!(direct.hole_punch_attempts.len(), 2);
        assert!((direct.time_to_direct.expect("time") - 0.16).abs() < 1e-6);
        let relayed = connection_report(&record(Some(Technique::Relay), false), "k", "id2")
            .expect("a report");
        assert_eq!(relayed.outcome, pb::HolePunchOutcome::Failed as i32);
        assert!(api::report::Report::from_request(&relayed).is_ok());
        let _ = report;
        let mut answering = record(Some(Technique::UdpPunch), true);
        answering.side = "responder";
        assert!(connection_report(&answering, "k", "id3").is_none());
    }
}

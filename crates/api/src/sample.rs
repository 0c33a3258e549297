//! A realistic hole-punch report, as punchr's Go client fills one plus natpunch's fields: for
//! benchmarks (`natpunch bench server`) and tests.

use rand::RngExt as _;

use crate::multiaddr::Multiaddr;
use crate::pb;
use crate::peer_id::PeerId;

/// The start of the sample punch, Unix ns.
pub const STARTED_AT: u64 = 1_795_303_375_400_000_000;

/// A random peer ID of the Ed25519 kind libp2p hosts have. The key bytes are random, not a
/// point on the curve: the server never looks at the key.
pub fn peer_id() -> PeerId {
    PeerId::ed25519(rand::rng().random())
}

/// A relayed address through `relay`.
pub fn relay_addr(relay: &PeerId, port: u16) -> Multiaddr {
    format!("/ip4/198.51.100.7/udp/{port}/quic-v1/p2p/{relay}/p2p-circuit")
        .parse()
        .unwrap_or_default()
}

fn addr(s: &str) -> Vec<u8> {
    s.parse::<Multiaddr>()
        .map(|m| m.to_vec())
        .unwrap_or_default()
}

/// A successful QUIC punch from `client` to `remote` through `relay`: two attempts (a timeout,
/// then success), the served and open addresses, a latency measurement to the relay with one
/// failed ping, a port mapping, network information, and every natpunch field.
pub fn report(
    client: &PeerId,
    remote: &PeerId,
    relay: &PeerId,
    api_key: &str,
    idempotency_key: Option<&str>,
) -> pb::TrackHolePunchRequest {
    let t0 = STARTED_AT;
    let served = relay_addr(relay, 4001).to_vec();
    let direct = addr("/ip4/198.51.100.20/udp/50000/quic-v1");
    pb::TrackHolePunchRequest {
        client_id: client.to_bytes(),
        remote_id: remote.to_bytes(),
        remote_multi_addresses: vec![served.clone()],
        connect_started_at: t0,
        connect_ended_at: t0 + 80_000_000,
        hole_punch_attempts: vec![
            pb::HolePunchAttempt {
                opened_at: t0 + 90_000_000,
                started_at: Some(t0 + 100_000_000),
                ended_at: t0 + 3_100_000_000,
                start_rtt: Some(0.104),
                elapsed_time: 3.0,
                outcome: pb::HolePunchAttemptOutcome::Timeout as i32,
                error: Some(String::new()),
                direct_dial_error: Some("dial timeout".into()),
                multi_addresses: vec![direct.clone()],
            },
            pb::HolePunchAttempt {
                opened_at: t0 + 3_200_000_000,
                started_at: Some(t0 + 3_300_000_000),
                ended_at: t0 + 3_500_000_000,
                start_rtt: Some(0.1),
                elapsed_time: 0.3,
                outcome: pb::HolePunchAttemptOutcome::Success as i32,
                error: None,
                direct_dial_error: None,
                multi_addresses: vec![direct.clone()],
            },
        ],
        open_multi_addresses: vec![direct, served],
        has_direct_conns: true,
        error: None,
        outcome: pb::HolePunchOutcome::Success as i32,
        ended_at: t0 + 3_600_000_000,
        listen_multi_addresses: vec![
            addr("/ip4/192.168.1.2/udp/4001/quic-v1"),
            addr("/ip4/192.168.1.2/tcp/4001"),
        ],
        api_key: api_key.into(),
        protocols: vec![4, 461],
        latency_measurements: vec![pb::LatencyMeasurement {
            remote_id: relay.to_bytes(),
            agent_version: "relay/1".into(),
            protocols: vec!["/libp2p/circuit/relay/0.2.0/hop".into()],
            multi_address: addr("/ip4/198.51.100.7/udp/4001/quic-v1"),
            rtts: vec![0.05, -1.0, 0.07],
            rtt_errs: vec![String::new(), "timeout".into(), String::new()],
            mtype: pb::LatencyMeasurementType::ToRelay as i32,
        }],
        network_information: Some(pb::NetworkInformation {
            router_login_html: None,
            router_login_html_error: Some("not checked".into()),
            supports_ipv6: Some(false),
            supports_ipv6_error: None,
        }),
        nat_mappings: vec![pb::NatMapping {
            internal_port: 4001,
            external_port: 40001,
            protocol: "udp".into(),
            addr: "198.51.100.2".into(),
            addr_network: "ip4".into(),
        }],
        idempotency_key: idempotency_key.map(str::to_owned),
        technique: Some("dcutr-quic".into()),
        time_to_direct: Some(0.27),
        client_nat: Some("endpoint-independent/address-and-port-dependent".into()),
        remote_nat: Some("endpoint-independent/address-dependent".into()),
        transport: Some("quic".into()),
    }
}

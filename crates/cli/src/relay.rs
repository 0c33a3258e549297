//! The flags of `natpunch relay` (every limit, rates that can be `off`), and the relay
//! configuration they ask for.

use crate::args::{Identity, Json, Telemetry};
use clap::Args;
use libp2p::Multiaddr;
use p2p::relay::{Limits, Rate, RelayConfig};
use std::net::IpAddr;
use std::time::Duration;

#[derive(Debug, Args)]
#[command(
    after_help = "Defaults are rust-libp2p's limits. A measurement lab, where every trial \
comes from the same few NAT addresses, wants the per-IP rates off and longer, larger circuits: \
--reservation-rate-per-ip off --circuit-rate-per-ip off --max-circuit-secs 600 \
--max-circuit-bytes 67108864.",
    mut_arg("json", |a| a.help("Print one JSON object per event"))
)]
pub struct RelayArgs {
    /// Address to listen on (TCP and QUIC).
    #[arg(long, env = "NATPUNCH_RELAY_LISTEN_IP", default_value = "0.0.0.0")]
    pub listen_ip: IpAddr,
    /// Port to listen on, TCP and UDP (QUIC) alike.
    #[arg(long, env = "NATPUNCH_RELAY_PORT", default_value_t = 4001)]
    pub port: u16,
    #[command(flatten)]
    pub identity: Identity<Self>,
    /// Address to announce as the relay's own (repeatable) [default: every listen address
    /// except loopback].
    #[arg(
        long = "external-addr",
        env = "NATPUNCH_RELAY_EXTERNAL_ADDRS",
        value_delimiter = ','
    )]
    pub external: Vec<Multiaddr>,
    /// Reservations held at once.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_MAX_RESERVATIONS",
        default_value_t = Limits::default().max_reservations
    )]
    pub max_reservations: usize,
    /// Reservations one peer may hold.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_MAX_RESERVATIONS_PER_PEER",
        default_value_t = Limits::default().max_reservations_per_peer
    )]
    pub max_reservations_per_peer: usize,
    /// Seconds a reservation lasts before the peer must renew it.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_RESERVATION_SECS",
        default_value_t = Limits::default().reservation_duration.as_secs()
    )]
    pub reservation_secs: u64,
    /// Circuits open at once.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_MAX_CIRCUITS",
        default_value_t = Limits::default().max_circuits
    )]
    pub max_circuits: usize,
    /// Circuits one peer may have open.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_MAX_CIRCUITS_PER_PEER",
        default_value_t = Limits::default().max_circuits_per_peer
    )]
    pub max_circuits_per_peer: usize,
    /// Seconds a circuit may last.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_MAX_CIRCUIT_SECS",
        default_value_t = Limits::default().max_circuit_duration.as_secs()
    )]
    pub max_circuit_secs: u64,
    /// Bytes a circuit may carry in each direction.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_MAX_CIRCUIT_BYTES",
        default_value_t = Limits::default().max_circuit_bytes
    )]
    pub max_circuit_bytes: u64,
    /// Reservation requests per peer: COUNT/SECONDS, or `off`.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_RESERVATION_RATE_PER_PEER",
        default_value = "30/120",
        value_parser = parse_rate
    )]
    pub reservation_rate_per_peer: RateArg,
    /// Reservation requests per source IP: COUNT/SECONDS, or `off`.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_RESERVATION_RATE_PER_IP",
        default_value = "60/60",
        value_parser = parse_rate
    )]
    pub reservation_rate_per_ip: RateArg,
    /// Circuit requests per source peer: COUNT/SECONDS, or `off`.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_CIRCUIT_RATE_PER_PEER",
        default_value = "30/120",
        value_parser = parse_rate
    )]
    pub circuit_rate_per_peer: RateArg,
    /// Circuit requests per source IP: COUNT/SECONDS, or `off`.
    #[arg(
        long,
        env = "NATPUNCH_RELAY_CIRCUIT_RATE_PER_IP",
        default_value = "60/60",
        value_parser = parse_rate
    )]
    pub circuit_rate_per_ip: RateArg,
    /// Port of the STUN reflector (UDP and TCP): it tells a daemon behind a NAT which external
    /// port the NAT gave a fresh socket (0 turns it off).
    #[arg(long, env = "NATPUNCH_RELAY_STUN_PORT", default_value_t = 3478)]
    pub stun_port: u16,
    /// Record where each reserving peer connects from into this measurement store
    /// (sqlite://FILE or postgres://USER@HOST/DB): with the honeypot's sightings, the server
    /// tells from it whether the peer's NAT maps per destination [default: record nothing].
    #[arg(long, env = "NATPUNCH_RELAY_DATABASE_URL")]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub telemetry: Telemetry<Self>,
    #[command(flatten)]
    pub json: Json,
}

/// A rate, or none.
#[derive(Debug, Clone, Copy)]
pub struct RateArg(pub Option<Rate>);

pub fn parse_rate(s: &str) -> Result<RateArg, String> {
    if s == "off" {
        return Ok(RateArg(None));
    }
    s.parse().map(|r| RateArg(Some(r)))
}

impl RelayArgs {
    /// The relay's configuration these flags ask for.
    pub fn config(&self) -> RelayConfig {
        RelayConfig {
            listen: p2p::host::listen_addrs(self.listen_ip, self.port),
            external: self.external.clone(),
            limits: Limits {
                max_reservations: self.max_reservations,
                max_reservations_per_peer: self.max_reservations_per_peer,
                reservation_duration: Duration::from_secs(self.reservation_secs),
                max_circuits: self.max_circuits,
                max_circuits_per_peer: self.max_circuits_per_peer,
                max_circuit_duration: Duration::from_secs(self.max_circuit_secs),
                max_circuit_bytes: self.max_circuit_bytes,
                reservation_rate_per_peer: self.reservation_rate_per_peer.0,
                reservation_rate_per_ip: self.reservation_rate_per_ip.0,
                circuit_rate_per_peer: self.circuit_rate_per_peer.0,
                circuit_rate_per_ip: self.circuit_rate_per_ip.0,
            },
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl crate::write::ArgValue for RateArg {
    fn texts(&self) -> Vec<std::ffi::OsString> {
        match &self.0 {
            Some(rate) => crate::write::display(rate),
            None => vec!["off".into()],
        }
    }
}

crate::write_args!(RelayArgs {
    listen_ip,
    port,
    external,
    max_reservations,
    max_reservations_per_peer,
    reservation_secs,
    max_circuits,
    max_circuits_per_peer,
    max_circuit_secs,
    max_circuit_bytes,
    reservation_rate_per_peer,
    reservation_rate_per_ip,
    circuit_rate_per_peer,
    circuit_rate_per_ip,
    stun_port,
    database_url;
    identity,
    telemetry,
    json,
});

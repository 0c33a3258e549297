//! natcheck: NAT behaviour discovery over UDP, the tokio shell around the sans-IO `stun` crate.
//!
//! * [`server::StunServer`]: the RFC 5780 server (`natpunch stun-server`) on two IP addresses ×
//!   two ports.
//! * [`client::check`]: the discovery client (`natpunch nat check`): public addresses, NAT
//!   presence, mapping, filtering, port allocation, hairpinning, optionally the UDP mapping
//!   lifetime, and a verdict, as a [`client::NatReport`] usable by the other roles.
//! * [`reflector`]: a plain STUN reflector on one address (the relay runs one) and its client,
//!   which asks from a given local port which external address the NAT gave it.
//!
//! What it does not do: TCP behaviour, IPv6-specific tests, port-mapping protocols (the
//! `portmap` work), or several servers at once; results describe the NAT's behaviour towards
//! the one server asked and are upper bounds (RFC 5780 §1).

pub mod bench;
pub mod client;
pub mod reflector;
pub mod server;

pub use client::{CheckOptions, NatReport, check};
pub use server::StunServer;
pub use stun::classify::SEQUENTIAL_GAP;

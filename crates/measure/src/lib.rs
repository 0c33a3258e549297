//! measure: natpunch's measurement client, the part of `natpunch client` that is not wiring.
//!
//! - [`client`]: N libp2p hosts, each with its own identity, that ask a punchr-compatible server
//!   for a peer to hole-punch (GetAddrInfo), punch it through the served relay with the `p2p`
//!   peer, and report every punch (TrackHolePunch) with every field punchr's Go client fills and
//!   natpunch's own;
//! - [`daemon`]: the connectivity daemon's connections as reports, with their technique;
//! - [`spool`]: the on-disk queue every report goes through first, so that a server outage or a
//!   restart of the client loses nothing;
//! - [`metrics`]: the client's Prometheus metrics, fed from its events;
//! - [`connect`]: the API key (given, or kept in the user's config directory) and the gRPC
//!   channel, with TLS for an https server.
//!
//! The messages and the validation the server applies come from `api`; this crate is the only
//! side of the measurement system that needs libp2p, so that the server (`api`) does not. It
//! does not choose peers (the server allocates them), store results, or measure the NAT itself
//! (`natcheck` does; its verdict comes in as [`client::ClientConfig::client_nat`]).

pub mod client;
pub mod connect;
pub mod daemon;
pub mod metrics;
pub mod spool;

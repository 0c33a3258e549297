//! Benchmarks, each against a baseline measured in the same run, in turns, on the same machine:
//!
//! * [`punch`]: time to a direct connection, natpunch's DCUtR engine against stock
//!   rust-libp2p, between two port-restricted homes in the lab (and the throughput of the
//!   relayed circuit against the direct connection);
//! * [`connect`]: time to a socket from the daemon (TCP, UDP, and relayed where no punch can
//!   work) against the libp2p engine's time to direct, between two port-restricted homes;
//! * [`stun`]: binding throughput of natpunch's STUN server against coturn's, on loopback;
//! * [`server`]: the measurement server under concurrent clients, on SQLite and on PostgreSQL.
//!
//! Each returns its figures; printing them is the caller's.

pub mod connect;
pub mod punch;
pub mod server;
pub mod stun;

//! Benchmarks, each against a baseline measured in the same run, in turns, on the same machine:
//!
//! * [`punch`]: time to a direct connection, natpunch's DCUtR engine against stock
//!   rust-libp2p, between two port-restricted homes in the lab (and the throughput of the
//!   relayed circuit against the direct connection);
//! * [`stun`]: binding throughput of natpunch's STUN server against coturn's, on loopback;
//! * [`server`]: the measurement server under concurrent clients, on SQLite and on PostgreSQL.
//!
//! Each returns its figures; printing them is the caller's.

pub mod punch;
pub mod server;
pub mod stun;

//! p2p: natpunch's libp2p side.
//!
//! * [`relay`]: the circuit relay v2 server (with identify, ping and the AutoNAT v2 server),
//!   every limit configurable, Prometheus metrics;
//! * [`identity`]: keys kept in files, created on first use;
//! * [`telemetry`]: the `/metrics` and `/health` port.
//!
//! Everything here speaks the real libp2p wire protocols (rust-libp2p 0.57), so go, js and nim
//! peers and punchr's clients interoperate with it.

pub mod identity;
pub mod relay;
pub mod telemetry;

//! labrun: natpunch's roles run inside a NAT lab, trial after trial.
//!
//! * [`args`]: the command lines of the roles it starts, built from the binary's own flag types
//!   (`cli`), so a renamed field fails to compile and a renamed flag follows;
//! * [`mod@bench`]: benchmarks against a baseline in the same run: hole punching (natpunch's
//!   engine against stock rust-libp2p), the STUN server (against coturn), the measurement
//!   server (SQLite against PostgreSQL);
//! * [`connect`]: applications connected by two daemons (`natpunch daemon`) behind every pair
//!   of NAT presets, 1 MiB each way through the socket each got, summed up per cell (sockets,
//!   direct ones, winning technique, time to socket);
//! * [`campaign`]: the measurement system end to end (relay, DHT, honeypot, server, targets
//!   and clients behind every preset), summed up from its database;
//! * [`html`]: the campaign's report as a self-contained page with plots;
//! * [`matrix`]: hole punches between every pair of NAT presets, each trial with fresh peers
//!   and flushed NAT state, summed up per cell (success rate with its 95% interval, outcomes,
//!   time to direct, attempts needed).
//!
//! The roles are the `natpunch` binary itself (`relay`, `peer listen`, `peer dial`), started in
//! the lab's namespaces, so what is measured is exactly what a user runs.
//!
//! What it does not do: build labs (natlab does), implement any role (it starts the binary, or
//! for the STUN and server benchmarks the library servers and coturn), or decide pass or fail:
//! it measures and reports.

pub mod args;
pub mod bench;
pub mod campaign;
pub mod connect;
pub mod html;
pub mod matrix;
pub mod stats;

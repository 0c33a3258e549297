//! labrun: natpunch's roles run inside a NAT lab, trial after trial.
//!
//! * [`matrix`]: hole punches between every pair of NAT presets, each trial with fresh peers
//!   and flushed NAT state, summed up per cell (success rate with its 95% interval, outcomes,
//!   time to direct, attempts needed).
//!
//! The roles are the `natpunch` binary itself (`relay`, `peer listen`, `peer dial`), started in
//! the lab's namespaces, so what is measured is exactly what a user runs.

pub mod matrix;
pub mod stats;

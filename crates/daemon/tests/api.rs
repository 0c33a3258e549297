//! The daemon crate from the outside: the direct techniques in the NAT lab ([`technique`]).
//! The daemon itself, with applications (a Python client written from `docs/daemon-api.md`
//! among them), is tested in the NAT lab through the `natpunch` binary
//! (`crates/natpunch/tests/cli/daemon.rs`).

mod technique;

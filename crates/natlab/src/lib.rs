//! natlab: a NAT lab on one Linux machine.
//!
//! natlab builds an isolated "internet" (a bridge in a network namespace), NAT routers (real
//! nftables and conntrack in their own namespaces), hosts behind them, public hosts, and chains
//! of routers such as a CGNAT in front of home routers. NAT behaviour is typed data in RFC 4787
//! terms ([`NatConfig`], [`Preset`]) rendered to nftables by a pure function ([`nft::render`]).
//! Links get delay, jitter and loss from an NFQUEUE delay line, because the kernels natpunch
//! runs on often lack `sch_netem`. A router's session table can be bounded, dropping new flows
//! or evicting the oldest when full ([`session`]). The lab measures itself ([`selftest`]).
//!
//! What it does not do: IPv6, port-block allocation, firewall profiles beyond NAT filtering, and
//! non-deterministic "bad NAT" modes. Routers can also run real miniupnpd for UPnP IGD, NAT-PMP
//! and PCP ([`portmap`]), and be rebooted or renumbered while a lab runs. A detached lab's
//! delay lines run in a [`holder`] process.
//!
//! Safety: every namespace carries the prefix `natlab.LAB.`; veths are created inside lab namespaces
//! only, so lab traffic never reaches the root namespace, and the internet namespace does not
//! forward, so nothing addressed outside the lab goes anywhere. A dropped [`Lab`] removes all
//! of it, and [`lab::sweep`] removes what crashed runs left behind.
//!
//! ```no_run
//! use natlab::{Lab, LabOptions, Topology};
//! let topology = Topology::from_toml(r#"
//!     [router.home]
//!     nat = "port-restricted"
//!     [host.alice]
//!     upstream = "home"
//! "#)?;
//! let lab = Lab::build(&topology, LabOptions::default())?;
//! let out = lab.exec("alice", "ip", &["-brief", "addr"])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod defaults;
pub mod delay;
pub mod environment;
mod error_chain;
pub mod holder;
pub mod lab;
pub mod nat;
pub mod net;
pub mod netns;
pub mod nft;
pub mod portmap;
pub mod probe;
mod queue;
pub mod selftest;
pub mod session;
pub mod topology;

pub use error_chain::{Chain, chain};
pub use lab::{Lab, LabError, LabOptions, LabProcess};
pub use nat::{
    Filtering, Mapping, NatConfig, PortAllocation, Preset, SessionOverflow, Unsolicited,
};
pub use topology::{LinkCondition, Topology, TopologyError};

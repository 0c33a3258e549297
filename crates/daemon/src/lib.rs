//! daemon: natpunch's connectivity daemon, which hands applications a connected socket, direct
//! when the NATs allow it and relayed when they do not.
//!
//! [`service`] is the daemon (`natpunch daemon`): a libp2p host that holds relay reservations,
//! serves the application API on a Unix socket, and connects applications to each other, the
//! two daemons talking over a relayed stream ([`signal`]).
//!
//! [`api`] is the application API: the requests an application sends over the daemon's Unix
//! socket, the events it gets back, and a sans-IO codec for the JSON lines they travel as,
//! bounded and safe on any bytes. `docs/daemon-api.md` specifies the same API for applications
//! in any language.
//!
//! [`plan`] decides which techniques a connection tries, from what both ends know of their NATs,
//! and runs them as a sans-IO sequencer (racing a stage's techniques, the relay standing by),
//! tested in virtual time.
//!
//! [`fdpass`] hands a socket over with its `ok` line (`SCM_RIGHTS`); [`socket`] places the API
//! socket (mode 0660, where `natpunch-client` looks) and replaces a dead daemon's; [`bridge`]
//! carries a relayed
//! connection's bytes (TCP) or framed datagrams (UDP) to the socket pair whose other end the
//! application gets.
//!
//! [`technique`] carries out the direct techniques as async functions: UDP hole punching and
//! TCP simultaneous open (plain, or NUTSS-style with a low-TTL first SYN and an nftables guard
//! against ICMP time exceeded), each checking a shared token on the wire and returning a
//! connected std socket.
//!
//! What it does not do (yet): port prediction for symmetric NATs (the hard-NAT work). Its
//! connection records go to a measurement server through `measure::daemon` (`natpunch daemon
//! --report-to`).

pub mod api;
pub mod bridge;
pub mod fdpass;
pub mod plan;
pub mod service;
pub mod signal;
pub mod socket;
pub mod technique;

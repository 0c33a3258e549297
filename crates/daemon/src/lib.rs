//! daemon: natpunch's connectivity daemon, which hands applications a connected socket, direct
//! when the NATs allow it and relayed when they do not.
//!
//! So far this crate holds the daemon's application API ([`api`]): the requests an application
//! sends over the daemon's Unix socket, the events it gets back, and a sans-IO codec for the
//! JSON lines they travel as, bounded and safe on any bytes. `docs/daemon-api.md` specifies the
//! same API for applications in any language.
//!
//! [`plan`] decides which techniques a connection tries, from what both ends know of their NATs,
//! and runs them as a sans-IO sequencer (racing a stage's techniques, the relay standing by),
//! tested in virtual time.
//!
//! [`fdpass`] hands a socket over with its `ok` line (`SCM_RIGHTS`), and takes it on the
//! client's side; [`socket`] places the API socket (mode 0660), replaces a dead daemon's, and
//! tells a client that finds no daemon how to start one; [`bridge`] carries a relayed
//! connection's bytes (TCP) or framed datagrams (UDP) to the socket pair whose other end the
//! application gets.
//!
//! [`technique`] carries out the direct techniques as async functions: UDP hole punching and
//! TCP simultaneous open (plain, or NUTSS-style with a low-TTL first SYN and an nftables guard
//! against ICMP time exceeded), each checking a shared token on the wire and returning a
//! connected std socket.
//!
//! What it does not do (yet): run the daemon; the shell around the sequencer comes next.

pub mod api;
pub mod bridge;
pub mod fdpass;
pub mod plan;
pub mod socket;
pub mod technique;

//! p2p: natpunch's libp2p side.
//!
//! * [`relay`]: the circuit relay v2 server (with identify, ping and the AutoNAT v2 server),
//!   every limit configurable, Prometheus metrics;
//! * [`peer`]: the hole-punching peer (relay reservation or relayed dial, then DCUtR), with our
//!   own DCUtR engine or rust-libp2p's, and [`record`]: what each side saw of a hole punch;
//! * [`punch`]: the hole-punch engine itself, sans-IO: events and `now` in, actions and its
//!   next timeout out, tested in virtual time;
//! * [`honeypot`]: a Kademlia DHT server that records the peers connecting to it;
//! * [`observed`]: a peer's NAT mapping class from what remotes at several addresses observe
//!   of it (when no flag or RFC 5780 check said);
//! * [`candidates`]: hands the swarm the addresses the relay observed, untouched;
//! * [`identity`]: keys kept in files, created on first use;
//! * [`birthday`]: birthday probing and port prediction for a hard NAT (a random port per
//!   destination), shared with the daemon's UDP punch;
//! * [`wire`]: a sans-IO codec for the DCUtR messages (length-prefixed protobuf);
//! * [`host`]: a server's TCP and QUIC listen addresses, and the swarm the relay and the
//!   honeypot build alike.
//!
//! Everything here speaks the real libp2p wire protocols (rust-libp2p 0.57), so go, js and nim
//! peers and punchr's clients interoperate with it.
//!
//! What it does not do: NAT discovery (`natcheck`), the port-mapping protocols (`portmap`, which
//! the peer drives), or keep measurements (the honeypot writes into `api`'s store).

pub mod birthday;
pub mod candidates;
pub mod honeypot;
pub mod host;
pub mod identity;
pub mod observed;
pub mod peer;
pub mod punch;
pub mod record;
pub mod relay;
pub mod wire;

//! stun: STUN Binding (RFC 8489) and RFC 5780 NAT behaviour discovery, sans-IO.
//!
//! * [`message`]: decoding untrusted datagrams (never panics; every failure has a kind) and
//!   encoding Binding requests and responses with the RFC 5780 attributes, on `stun_codec`.
//! * [`server`]: the four-address RFC 5780 server as a state machine: a datagram and the address
//!   it arrived on go in, the answer and the address to send it from come out.
//! * [`classify`]: pure functions from observations to mapping, filtering, port allocation and a
//!   verdict, in the RFC 4787 vocabulary of the `behaviour` crate.
//!
//! What it does not do: sockets, clocks, retransmission (the `natcheck` crate drives it),
//! authentication (MESSAGE-INTEGRITY is decoded, not required), TURN, TCP/TLS framing, PADDING.

pub mod attrs;
pub mod classify;
pub mod message;
pub mod server;

pub use message::{BindingResponse, DecodeError, binding_request, decode, parse_binding_response};
pub use server::{Counters, Server, Transmit};
